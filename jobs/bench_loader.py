#!/usr/bin/env python
"""Data-loader throughput per worker core, next to a plain PyAV decode of the same frames; and the loader
cores one GPU needs for each Kinetics recipe, under the ingest's default settings and cheaper ones.

Default run: writes a small dataset of shards like the ingest job makes (H.264, short side 256, 30 fps,
keyframe every 16 frames), then, on one core, times (a) the loader's pipeline for one worker (tar reading,
sampling, decoding, random scale/crop/flip, normalisation, batching) and (b) a plain PyAV loop that
decodes the same frames from the same bytes, for 8x224 (8 frames every 32) and 96x224 (96 every 4)
clips. Prints clips/s, the loader's overhead above raw decoding, and how many cores one GPU training
TimeSformer 8x224 and TimeSformer-L at the given rates needs.

    python jobs/bench_loader.py                 # both clip shapes
    python jobs/bench_loader.py --videos 16 --l-rate 15
    python jobs/bench_loader.py --verify-cost   # shard verification (size + sha256 as it streams) on vs off
    python jobs/bench_loader.py --cores         # cores per GPU for each recipe and ingest setting

``--verify-cost`` times the training pipeline with and without shard verification in the same run,
alternating the order each round (the same seed, so both decode the same clips), and prints each run,
the median overhead and the spread, and sha256 alone per clip (the floor of what verification costs).

``--cores`` makes one table: for each recipe (configs/recipes/k400_base, k400_hr, k400_long: their clip
shape, crop and scale jitter, uint8 output as on GPUs) and each ingest setting (``--ingest``: frame rate
and keyframe interval), the training pipeline's clips per CPU-second on one core, and the cores one GPU
needs at the training rates measured on an H200 (``--base-rate``, ``--hr-rate``, ``--l-rate``). Every
dataset is made the way the ingest job makes it (``pipeline.ingest.worker.transcode`` with
configs/ingest/k400.yaml's codec, crf and preset) from the same synthetic 10 s sources (Kinetics clips are
10 s), at configs/ingest/k400.yaml's short side, or at the recipe's largest scale when that is larger (HR
crops 448 from a short side of 448-512: its dataset is written at 512, so the loader never upsamples).
The sampler places a clip's frames in seconds (``sampling_rate / data.ref_fps`` apart; ref_fps stays 30
whatever the dataset's frame rate), so a dataset written at a lower frame rate covers the same seconds per
clip and decodes fewer frames: at ``matched`` (``ref_fps / sampling_rate``) every sampled time has a frame
of its own, the frames of a 30 fps clip whose start is rounded down to that frame rate's grid.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402

from pipeline.data.loader import (  # noqa: E402
    ClipConfig,
    FaultCounter,
    clip_pipeline,
    iterate_samples,
    open_shards,
    shard_samples,
)
from pipeline.data.shards import DatasetIndex, ShardInfo, ShardSample, commit_index, sha256_of, shard_bytes  # noqa: E402
from pipeline.data.storage import open_storage  # noqa: E402
from pipeline.data.video import FixedRateSampler, encode_video  # noqa: E402

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
    shards = []
    for s in range(0, videos, per_shard):
        data, count, keys = shard_bytes(samples[s:s + per_shard])
        url = f"shards/train/{s // per_shard:06d}.tar"
        storage.put_bytes(url, data)
        shards.append(ShardInfo(url, "train", count, len(data), sha256_of(data), keys))
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=8)
    p.add_argument("--clips", type=int, default=24, help="clips timed per shape")
    p.add_argument("--gpu-rate", type=float, default=15.0, help="TimeSformer-L clips/s one GPU trains at")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--verify-cost", action="store_true",
                   help="only compare verified and unverified shard streaming (96x224 uint8 clips)")
    p.add_argument("--rounds", type=int, default=3, help="--verify-cost: runs of each, alternating")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # one worker = one core
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
    for output in ("uint8", "float"):
        if ("96x224", output) in results:
            per_core = results[("96x224", output)]["loader_clips_s"]
            print(f"TimeSformer-L at {args.gpu_rate:g} clips/s per GPU needs about {args.gpu_rate / per_core:.1f} "
                  f"loader cores per GPU with {output} clips ({per_core:.2f} clips/s per core).")
    print("(uint8: clips are normalised on the GPU by pipeline.data.transforms.normalize_on_device; "
          "float: normalised by the loader. Overhead: the loader's time per clip over the baseline's - 1; "
          "plain PyAV converts each frame with frame.to_ndarray(format='rgb24'), which builds a new swscale "
          "context per frame; 'one converter' reuses one VideoReformatter per clip, as the loader does.)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Streaming clips from a committed dataset index (S3 or local) with a WebDataset pipeline.

The pipeline is a flat list of named stages (open_clip's style):

training    resampled shards (seeded) -> open -> tar members -> samples -> shuffle (seeded) -> clip
            (random position) -> transform -> batch -> epoch length
evaluation  this rank's shards -> this worker's shards -> open -> tar members -> samples -> clip
            (centre) -> transform -> batch (last one partial): every sample exactly once per pass

Node and worker splitting are explicit (rank and world size are arguments, not environment guesses).
Every random choice in training comes from a generator seeded by (seed, rank, worker, start step), so
a run resumed at step s draws new data instead of replaying the first epoch, and a given
(seed, rank, worker, step) always gives the same stream. Batches are ``(B, C, T, H, W)``.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds
from webdataset import tariterators

from pipeline.data.shards import DatasetIndex
from pipeline.data.storage import Storage
from pipeline.data.transforms import TestTransform, TrainTransform
from pipeline.data.video import FixedRateSampler, SegmentSampler, VideoDecodeError, decode_frames

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClipConfig:
    """How a sample becomes a clip: temporal sampling and spatial transform."""

    num_frames: int = 8
    sampling_rate: int = 32  # frames of a ref_fps timeline between sampled frames (fixed-rate sampling)
    ref_fps: float = 30.0
    sampler: str = "fixed_rate"  # fixed_rate or segment (SSv2)
    crop: int = 224
    scale: tuple[int, int] = (256, 320)
    flip: bool = True
    short_video: str = "loop"
    output: str = "float"  # float: normalised; uint8: normalise on the device (transforms.normalize_on_device)


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _role(skip_batches: int = 0) -> tuple[int, int]:
    """(role, workers): the stream this worker plays. A DataLoader hands out batches from its workers in
    turn, starting with worker 0; when a stream is resumed ``skip_batches`` batches in, worker j plays
    the stream of worker ``(j + skip_batches) % workers`` so the batches come out in the original order."""
    worker, workers = _worker()
    return (worker + skip_batches) % workers, workers


def _rng(seed: int, rank: int, start_step: int, stream: int, skip_batches: int = 0, *extra: int) -> np.random.Generator:
    role, _ = _role(skip_batches)
    return np.random.default_rng(np.random.SeedSequence([seed, rank, role, start_step, stream, *extra]))


# -- stages ---------------------------------------------------------------------------------------


def resampled_shards(urls: list[str], seed: int, rank: int, start_step: int, skip_batches: int = 0):
    """Stage: shard urls drawn with replacement, forever, from this (seed, rank, worker, step) stream."""
    def stage():
        rng = _rng(seed, rank, start_step, 0, skip_batches)
        while True:
            yield {"url": urls[int(rng.integers(len(urls)))]}
    return stage


def my_shards(urls: list[str], rank: int, world_size: int):
    """Stage: the shards of this rank, then of this worker: a partition of all shards."""
    def stage():
        worker, workers = _worker()
        for url in urls[rank::world_size][worker::workers]:
            yield {"url": url}
    return stage


def open_from(storage: Storage):
    """Stage: open each shard through the dataset's storage (a boto3 client per worker process)."""
    def stage(src):
        for item in src:
            # tarfile reads in 10 KiB blocks: a large buffer turns that into few big reads
            yield {**item, "stream": io.BufferedReader(_Raw(storage.open(item["url"])), buffer_size=4 << 20)}
    return stage


class _Raw(io.RawIOBase):
    """A raw reader over any object with read(n) (a file, a boto3 StreamingBody)."""

    def __init__(self, f) -> None:
        self.f = f

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.f.read(len(b))
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self.f.close()
        super().close()


def seeded_shuffle(bufsize: int, seed: int, rank: int, start_step: int, skip_batches: int = 0):
    """Stage: a shuffle buffer whose order is fixed by (seed, rank, worker, step)."""
    def stage(src):
        rng = _rng(seed, rank, start_step, 1, skip_batches)
        buf: list = []
        for sample in src:
            buf.append(sample)
            if len(buf) >= bufsize:
                yield buf.pop(int(rng.integers(len(buf))))
        while buf:
            yield buf.pop(int(rng.integers(len(buf))))
    return stage


def skip_consumed(skip_batches: int, batch_size: int):
    """Stage: number the samples of this worker's stream, and drop those that made the batches a
    resumed run already consumed, without decoding them (reading is cheap, decoding is not)."""
    def stage(src):
        role, workers = _role(skip_batches)
        drop = max(0, -(-(skip_batches - role) // workers)) * batch_size  # ceil((n - role) / workers) batches
        for i, sample in enumerate(src):
            if i >= drop:
                yield {**sample, "__n__": i}
    return stage


def to_clip(cfg: ClipConfig, train: bool, seed: int, rank: int, start_step: int, skip_batches: int = 0):
    """Stage: decode the sampled frames of each sample and transform them; a sample that does not
    decode is logged and skipped in training, and raises in evaluation (a pass must be complete).
    Each sample's random choices come from its own generator (seed, rank, worker, step, sample number),
    so skipping samples on resume leaves the following ones unchanged."""
    def stage(src):
        temporal = (SegmentSampler(cfg.num_frames) if cfg.sampler == "segment"
                    else FixedRateSampler(cfg.num_frames, cfg.sampling_rate, cfg.ref_fps, cfg.short_video))
        spatial_train = TrainTransform(crop=cfg.crop, scale=cfg.scale, flip=cfg.flip, output=cfg.output)
        spatial_test = TestTransform(crop=cfg.crop, num_crops=1, output=cfg.output)
        for sample in src:
            meta = sample["json"] if isinstance(sample["json"], dict) else json.loads(sample["json"])
            rng = _rng(seed, rank, start_step, 2, skip_batches, sample.get("__n__", 0))
            name = f"{sample.get('__url__', '?')}/{sample['__key__']}.mp4"
            if isinstance(temporal, SegmentSampler):
                spec = temporal.sample(meta["duration"], rng, train=train)
            else:
                spec = temporal.sample(meta["duration"], rng, position="random" if train else "center")
            try:
                frames = decode_frames(sample["mp4"], spec.times, name=name).frame_list
            except VideoDecodeError as e:
                if not train:
                    raise
                log.warning("skipping a sample that does not decode: %s", e)
                continue
            video = spatial_train(frames, rng) if train else spatial_test(frames)[0]
            yield {"video": video, "label": int(meta["label"]), "key": sample["__key__"], "short": spec.short}
    return stage


def to_views(cfg: ClipConfig, protocol: str, temporal_clips: int, spatial_crops: int):
    """Stage (test protocol): every view of a video as one ``(V, C, T, H, W)`` tensor: ``temporal_clips``
    uniformly spaced clips x ``spatial_crops`` crops (``multi_view``), or every non-overlapping clip
    covering the video x crops (``long_video``). SSv2-style segment sampling has one clip (the middle
    frame of each segment)."""
    def stage(src):
        spatial = TestTransform(crop=cfg.crop, num_crops=spatial_crops, output=cfg.output)
        for sample in src:
            meta = sample["json"] if isinstance(sample["json"], dict) else json.loads(sample["json"])
            name = f"{sample.get('__url__', '?')}/{sample['__key__']}.mp4"
            if cfg.sampler == "segment":
                specs = [SegmentSampler(cfg.num_frames).sample(meta["duration"], train=False)]
            else:
                temporal = FixedRateSampler(cfg.num_frames, cfg.sampling_rate, cfg.ref_fps, cfg.short_video)
                specs = (temporal.covering_clips(meta["duration"]) if protocol == "long_video"
                         else temporal.uniform_clips(meta["duration"], temporal_clips))
            views = [spatial(decode_frames(sample["mp4"], spec.times, name=name).frame_list) for spec in specs]
            yield {"views": torch.cat(views), "label": int(meta["label"]), "key": sample["__key__"],
                   "clips": len(specs)}
    return stage


def view_loader(index: DatasetIndex, storage: Storage, split: str, *, clip: ClipConfig, protocol: str,
                temporal_clips: int, spatial_crops: int, rank: int = 0, world_size: int = 1,
                num_workers: int = 2) -> torch.utils.data.DataLoader:
    """Videos of this rank's shards, one at a time, with all their test views (an exact pass)."""
    shards = index.split(split)
    if not shards:
        raise ValueError(f"dataset {index.dataset} v{index.version} has no shards for split {split!r}")
    pipeline = wds.DataPipeline(my_shards([s.url for s in shards], rank, world_size), open_from(storage),
                                tariterators.tar_file_expander, tariterators.group_by_keys,
                                to_views(clip, protocol, temporal_clips, spatial_crops))
    return torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=num_workers,
                                       pin_memory=torch.cuda.is_available())


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {"video": torch.stack([s["video"] for s in samples]),  # (B, C, T, H, W)
            "label": torch.tensor([s["label"] for s in samples]),
            "key": [s["key"] for s in samples],
            "short": torch.tensor([s["short"] for s in samples])}


# -- pipelines ------------------------------------------------------------------------------------


def clip_pipeline(index: DatasetIndex, storage: Storage, split: str, *, train: bool, batch_size: int,
                  clip: ClipConfig = ClipConfig(), rank: int = 0, world_size: int = 1, seed: int = 0,
                  start_step: int = 0, shuffle_buffer: int = 64,
                  batches_per_worker: int | None = None, skip_batches: int = 0) -> wds.DataPipeline:
    """The WebDataset pipeline for one rank (iterate it directly, or through ``make_loader``).

    Training streams are endless unless ``batches_per_worker`` gives an epoch length. ``skip_batches``
    resumes the stream of (seed, rank, start_step) that many batches in: the same batches follow as if
    it had never stopped (with the same number of DataLoader workers)."""
    shards = index.split(split)
    if not shards:
        raise ValueError(f"dataset {index.dataset} v{index.version} has no shards for split {split!r} "
                         f"(splits: {sorted({s.split for s in index.shards})})")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    urls = [s.url for s in shards]
    if train:
        stages = [resampled_shards(urls, seed, rank, start_step, skip_batches), open_from(storage),
                  tariterators.tar_file_expander, tariterators.group_by_keys,
                  seeded_shuffle(shuffle_buffer, seed, rank, start_step, skip_batches),
                  skip_consumed(skip_batches, batch_size),
                  to_clip(clip, True, seed, rank, start_step, skip_batches),
                  wds.batched(batch_size, collation_fn=collate)]
        pipeline = wds.DataPipeline(*stages)
        return pipeline if batches_per_worker is None else pipeline.with_epoch(batches_per_worker)
    stages = [my_shards(urls, rank, world_size), open_from(storage),
              tariterators.tar_file_expander, tariterators.group_by_keys,
              to_clip(clip, False, seed, rank, start_step),
              wds.batched(batch_size, collation_fn=collate, partial=True)]
    return wds.DataPipeline(*stages)


def make_loader(index: DatasetIndex, storage: Storage, split: str, *, train: bool, batch_size: int,
                num_workers: int = 2, epoch_samples: int | None = None, endless: bool = False,
                **kwargs) -> torch.utils.data.DataLoader:
    """A DataLoader over ``clip_pipeline``: ``num_workers`` processes, pinned memory on GPU machines.
    For training, ``epoch_samples`` is the number of clips this rank sees per epoch (or ``endless``:
    the caller stops)."""
    per_worker = None
    if train and not endless:
        if not epoch_samples:
            raise ValueError("training needs epoch_samples (clips per rank per epoch) or endless=True")
        per_worker = max(1, epoch_samples // (batch_size * max(1, num_workers)))
    pipeline = clip_pipeline(index, storage, split, train=train, batch_size=batch_size,
                             batches_per_worker=per_worker, **kwargs)
    return torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=num_workers,
                                       pin_memory=torch.cuda.is_available(),
                                       persistent_workers=False)


def iterate_samples(storage: Storage, url: str) -> Iterator[dict]:
    """The raw samples of one shard (for tools and tests)."""
    with storage.open(url) as f:
        data = f.read()
    yield from tariterators.group_by_keys(tariterators.tar_file_expander([{"url": url,
                                                                             "stream": io.BytesIO(data)}]))

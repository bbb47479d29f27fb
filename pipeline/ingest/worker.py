"""One shard of an ingest run (one Ray task): fetch each source, transcode it, write the tar, upload,
verify. A video that fails is quarantined with its reason and the shard goes on without it.

Transcoding streams frame by frame (long HowTo100M videos never sit in memory): frames are taken by
presentation time at the target frame rate inside [start, end), resized to the target short side and
encoded with a short keyframe interval for cheap seeking. Shards are uploaded whole under their final,
content-derived name (an S3 PUT is atomic: the object is complete or absent) and re-read to verify;
a shard that is already stored with the planned members is reused, which makes an interrupted run
resumable without duplicates.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.shards import ShardError, ShardInfo, ShardSample, read_shard, sha256_of, shard_bytes
from pipeline.data.storage import ObjectMissingError, Storage, open_storage
from pipeline.data.video import VideoDecodeError, _Opened, encode_video
from pipeline.ingest.plan import ShardPlan, Source


@dataclass(frozen=True)
class TranscodeConfig:
    short_side: int = 256
    fps: float = 30.0
    codec: str = "libx264"
    crf: int = 23
    preset: str = "veryfast"
    keyframe_interval: int = 16
    min_frames: int = 2  # a clip with fewer frames is quarantined as too short


def read_source(uri: str, source_storage: Storage | None) -> bytes:
    if source_storage is not None:
        return source_storage.get_bytes(uri)
    return Path(uri).read_bytes()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def transcode(data: bytes, name: str, cfg: TranscodeConfig, start: float | None = None,
              end: float | None = None) -> tuple[bytes, dict[str, Any]]:
    """The source's [start, end) at ``cfg.fps`` and ``cfg.short_side``, re-encoded; returns the bytes and
    (duration, fps, num_frames, width, height)."""
    start = max(0.0, start or 0.0)
    frames: list[np.ndarray] = []
    rotation = 0
    with _Opened(data, name, threads=1) as v:
        w, h = v.stream.codec_context.width, v.stream.codec_context.height
        if not w or not h:
            raise VideoDecodeError(name, "the video stream has no frame size")
        scale = cfg.short_side / min(w, h)
        tw, th = max(2, round(w * scale / 2) * 2), max(2, round(h * scale / 2) * 2)
        step = 1.0 / cfg.fps
        if start > 0:
            v.seek(start)  # to the keyframe before the span
        k, prev, prev_rgb = 0, None, None

        def emit() -> None:
            nonlocal prev_rgb
            if prev_rgb is None:  # convert a frame only once, and only if it is shown
                prev_rgb = prev.reformat(width=tw, height=th, format="rgb24").to_ndarray()
            frames.append(prev_rgb)

        for frame in v.frames():
            t = (frame.time - v.start) if frame.time is not None else 0.0
            while prev is not None and start + k * step < t and (end is None or start + k * step < end):
                emit()  # the previous frame is on screen until t
                k += 1
            if end is not None and t >= end and prev is not None:
                break
            prev, prev_rgb = frame, None
            rotation = int(round(getattr(frame, "rotation", 0) or 0)) % 360
        if prev is not None and (end is None or start + k * step < end):
            emit()  # the last frame stays on screen
        if rotation:
            frames = [np.rot90(f, k=rotation // 90) for f in frames]
    if len(frames) < cfg.min_frames:
        raise VideoDecodeError(name, f"too short: {len(frames)} frame(s) in the requested span at {cfg.fps:g} fps "
                                     f"(need {cfg.min_frames})")
    video = encode_video(frames, cfg.fps, codec=cfg.codec, keyframe_interval=cfg.keyframe_interval, crf=cfg.crf,
                         preset=cfg.preset)
    fh, fw = frames[0].shape[:2]
    return video, {"duration": len(frames) / cfg.fps, "fps": cfg.fps, "num_frames": len(frames),
                   "width": fw - fw % 2, "height": fh - fh % 2}


def _stored_shard(storage: Storage, plan: ShardPlan) -> ShardInfo | None:
    """A shard already stored by an earlier, interrupted run (same name = same planned inputs)."""
    try:
        data = storage.get_bytes(plan.url)
    except ObjectMissingError:
        return None
    try:
        keys = [s.key for s in read_shard(io.BytesIO(data), storage.uri(plan.url))]
    except ShardError:
        return None  # damaged: rebuild it
    planned = {s.entry.video_id for s in plan.sources}
    if not keys or not set(keys) <= planned:
        return None
    return ShardInfo(plan.url, plan.split, len(keys), len(data), sha256_of(data), keys)


def build_shard(plan: ShardPlan, output_uri: str, dataset: str, cfg: TranscodeConfig,
                source_uri: str | None = None) -> dict[str, Any]:
    """Make one shard. Returns {"shard": ShardInfo | None, "quarantine": {id: {sha256, reason}}, "stats": {...}}."""
    storage = open_storage(output_uri)
    existing = _stored_shard(storage, plan)
    if existing is not None:
        done = set(existing.keys)
        quarantine = {s.entry.video_id: {"sha256": s.sha256, "reason": "quarantined by an earlier attempt"}
                      for s in plan.sources if s.entry.video_id not in done}
        return {"shard": existing, "quarantine": quarantine, "stats": {"reused": 1, "videos": len(done),
                                                                       "bytes_in": 0}}
    source_storage = open_storage(source_uri) if source_uri and source_uri.startswith("s3://") else None
    samples, quarantine, bytes_in = [], {}, 0
    for src in plan.sources:
        e = src.entry
        try:
            data = read_source(src.uri, source_storage)
            bytes_in += len(data)
            video, info = transcode(data, src.uri, cfg, e.start if e.start else None, e.end)
        except (VideoDecodeError, OSError) as err:
            quarantine[e.video_id] = {"sha256": src.sha256, "reason": str(err)}
            continue
        samples.append(ShardSample(e.video_id, video, {
            "label": e.label, "label_name": e.label_name, "dataset": dataset, "split": e.split, "source": src.uri,
            "source_sha256": src.sha256, "start": e.start, "end": e.end, **info}))
    if not samples:
        return {"shard": None, "quarantine": quarantine, "stats": {"reused": 0, "videos": 0, "bytes_in": bytes_in}}
    data, count, keys = shard_bytes(samples)
    storage.put_bytes(plan.url, data)
    stored = storage.get_bytes(plan.url)  # verify what the store holds before anything may reference it
    if sha256_of(stored) != sha256_of(data):
        raise ShardError(f"{storage.uri(plan.url)}: stored bytes differ from the uploaded shard")
    return {"shard": ShardInfo(plan.url, plan.split, count, len(data), sha256_of(data), keys),
            "quarantine": quarantine, "stats": {"reused": 0, "videos": count, "bytes_in": bytes_in}}


def source_for(entry_filenames: tuple[str, ...], root: Path) -> Path | None:
    for name in entry_filenames:
        p = root / name
        if p.exists():
            return p
    return None


__all__ = ["TranscodeConfig", "build_shard", "transcode", "sha256_file", "source_for", "Source"]

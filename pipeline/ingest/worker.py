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
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.shards import ShardError, ShardInfo, ShardSample, read_shard, sha256_of, shard_bytes
from pipeline.data.storage import ObjectMissingError, Storage, StorageError, open_storage
from pipeline.data.video import VideoDecodeError, VideoReader
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


def read_source(location: str) -> bytes:
    """A source video's bytes from a local path or an ``s3://bucket/key`` URI."""
    if location.startswith("s3://"):
        bucket, _, key = location[5:].partition("/")
        return open_storage(f"s3://{bucket}").get_bytes(key)
    return Path(location).read_bytes()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class _Encoder:
    """An in-memory H.264 (or other) encoder fed one frame at a time, created on the first frame."""

    def __init__(self, cfg: TranscodeConfig) -> None:
        self.cfg, self.out, self.stream, self.count = cfg, None, None, 0
        self.buf = io.BytesIO()

    def _open(self, width: int, height: int) -> None:
        import av

        self.out = av.open(self.buf, "w", format="mp4")
        rate = max(1, round(self.cfg.fps))
        self.time_base = Fraction(1, rate)
        self.stream = self.out.add_stream(self.cfg.codec, rate=rate)
        self.stream.codec_context.time_base = self.time_base
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        options = {"g": str(self.cfg.keyframe_interval), "keyint_min": str(self.cfg.keyframe_interval)}
        if self.cfg.codec == "libx264":
            options.update(crf=str(self.cfg.crf), preset=self.cfg.preset)
        self.stream.options = options

    def add(self, frame) -> None:  # an av.VideoFrame in yuv420p at the output size
        if self.out is None:
            self._open(frame.width, frame.height)
        # constant output rate: frame n is shown at n / fps (the encoder takes its own reference to the
        # frame, so a source frame shown twice can be sent twice with a new pts)
        frame.pts, frame.time_base = self.count, self.time_base
        for packet in self.stream.encode(frame):
            self.out.mux(packet)
        self.count += 1

    def close(self) -> bytes:
        if self.out is None:
            return b""
        for packet in self.stream.encode():
            self.out.mux(packet)
        self.out.close()
        return self.buf.getvalue()


def transcode(data: bytes, name: str, cfg: TranscodeConfig, start: float | None = None,
              end: float | None = None) -> tuple[bytes, dict[str, Any]]:
    """The source's [start, end) at ``cfg.fps`` and ``cfg.short_side``, re-encoded frame by frame (a long
    video never sits in memory); returns the bytes and (duration, fps, num_frames, width, height)."""
    from av.video.frame import VideoFrame
    from av.video.reformatter import VideoReformatter

    scaler = VideoReformatter()  # one swscale context for the video; frame.reformat makes one per frame
    start = max(0.0, start or 0.0)
    enc = _Encoder(cfg)
    with VideoReader(data, name, threads=1) as v:
        w, h = v.stream.codec_context.width, v.stream.codec_context.height
        if not w or not h:
            raise VideoDecodeError(name, "the video stream has no frame size")
        scale = cfg.short_side / min(w, h)
        tw, th = max(2, round(w * scale / 2) * 2), max(2, round(h * scale / 2) * 2)
        step = 1.0 / cfg.fps
        if start > 0:
            v.seek(start)  # to the keyframe before the span
        k, prev, prev_out = 0, None, None

        def emit() -> None:
            nonlocal prev_out
            if prev_out is None:  # scale and convert a frame once, and only if it is shown
                rotation = int(round(getattr(prev, "rotation", 0) or 0)) % 360
                if rotation:  # rare: turn it upright through RGB
                    rgb = prev.reformat(width=tw, height=th, format="rgb24").to_ndarray()
                    upright = np.ascontiguousarray(np.rot90(rgb, k=rotation // 90))
                    prev_out = VideoFrame.from_ndarray(upright, format="rgb24").reformat(format="yuv420p")
                else:
                    prev_out = scaler.reformat(prev, width=tw, height=th, format="yuv420p")
            enc.add(prev_out)

        for frame in v.frames():
            t = (frame.time - v.start) if frame.time is not None else 0.0
            while prev is not None and start + k * step < t and (end is None or start + k * step < end):
                emit()  # the previous frame is on screen until t
                k += 1
            if end is not None and t >= end and prev is not None:
                break
            prev, prev_out = frame, None
        if prev is not None and (end is None or start + k * step < end):
            emit()  # the last frame stays on screen
    if enc.count < cfg.min_frames:
        enc.close()
        raise VideoDecodeError(name, f"too short: {enc.count} frame(s) in the requested span at {cfg.fps:g} fps "
                                     f"(need {cfg.min_frames})")
    out_w, out_h = enc.stream.width, enc.stream.height
    count = enc.count
    return enc.close(), {"duration": count / cfg.fps, "fps": cfg.fps, "num_frames": count,
                         "width": out_w, "height": out_h}


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


def build_shard(plan: ShardPlan, output_uri: str, dataset: str, cfg: TranscodeConfig) -> dict[str, Any]:
    """Make one shard. Returns {"shard": ShardInfo | None, "quarantine": {id: {sha256, reason}}, "stats": {...}}."""
    storage = open_storage(output_uri)
    existing = _stored_shard(storage, plan)
    if existing is not None:
        done = set(existing.keys)
        quarantine = {s.entry.video_id: {"sha256": s.sha256, "reason": "quarantined by an earlier attempt"}
                      for s in plan.sources if s.entry.video_id not in done}
        return {"shard": existing, "quarantine": quarantine, "stats": {"reused": 1, "videos": len(done),
                                                                       "bytes_in": 0}}
    samples, quarantine, bytes_in = [], {}, 0
    for src in plan.sources:
        e = src.entry
        try:
            data = read_source(src.uri)
            bytes_in += len(data)
            video, info = transcode(data, src.uri, cfg, e.start if e.start else None, e.end)
        except (VideoDecodeError, OSError, StorageError) as err:
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


__all__ = ["TranscodeConfig", "build_shard", "transcode", "sha256_file", "Source"]

"""One shard of an ingest run (one Ray task): fetch each source, transcode it, write the tar, upload,
verify. A video that fails, for any reason, is quarantined with its reason and the shard goes on without
it. Failures are classified: ``content`` (the file is bad: it does not decode, is over a decode limit,
the encoder refuses it) stays quarantined until the source (its checksum) or the limit that refused it
changes; ``transient`` (a read error, storage trouble, an unexpected error in our code, a worker that
died) is retried in place where cheap (reads) and otherwise planned again by the next run.

Transcoding streams frame by frame (long HowTo100M videos never sit in memory): frames are taken by
presentation time at the target frame rate inside [start, end), resized to the target short side and
encoded with a short keyframe interval for cheap seeking. Shards are uploaded whole under their final,
content-derived name (an S3 PUT is atomic: the object is complete or absent) and re-read to verify;
a shard that is already stored with the planned members is reused, which makes an interrupted run
resumable without duplicates.

Compaction (a ``ShardPlan`` with ``copy_from``): the surviving samples of sparse shards of the last version
are copied into a new shard, their clip and metadata bytes as they are; each old shard is read whole and
checked against its index entry (size and sha256) first, and nothing is transcoded. The same path rewrites the
metadata of a relabelled video (same source, same clip bounds, other label): its clip bytes are copied and its
``label`` and ``label_name`` are the manifest entry's (for every other copied sample they are the same values).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from pipeline.data.shards import ShardError, ShardInfo, ShardSample, put_shard, read_shard, sha256_file, sha256_of
from pipeline.data.storage import ObjectMissingError, Storage, StorageError, open_storage, split_s3_uri
from pipeline.data.video import DEFAULT_LIMITS, DecodeLimits, VideoDecodeError, VideoReader
from pipeline.ingest.plan import CONTENT, TRANSIENT, ShardPlan, Source

READ_ATTEMPTS = 3  # a source read that fails transiently is tried this often within the run
READ_BACKOFF_S = 0.5  # seconds before the second attempt; doubles after
T = TypeVar("T")


# Its fields are the preprocessing that names shards: a new field renames (and rebuilds) every shard.
@dataclass
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
        bucket, key = split_s3_uri(location, need_key=True)
        return open_storage(f"s3://{bucket}").get_bytes(key)
    return Path(location).read_bytes()


def _retry_helps(err: BaseException) -> bool:
    """A read error that may pass within seconds (EIO, a reset connection, storage after its own retries),
    not one that will still be there (no such file, no permission)."""
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False  # ObjectMissingError is a FileNotFoundError too
    return isinstance(err, (OSError, StorageError))


def with_retries(read: Callable[[], T], attempts: int = READ_ATTEMPTS) -> T:
    """``read()``, called again (after a short backoff) when it fails with an error that may be passing."""
    for attempt in range(1, attempts + 1):
        try:
            return read()
        except Exception as err:
            if attempt == attempts or not _retry_helps(err):
                raise
            time.sleep(READ_BACKOFF_S * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def read_source_with_retries(location: str, attempts: int = READ_ATTEMPTS) -> bytes:
    """``read_source``, tried again after errors that may be passing (EIO, a reset connection)."""
    return with_retries(lambda: read_source(location), attempts)


def classify(err: BaseException) -> str:
    """``content`` when the file itself is at fault (it fails the same way until it changes), else
    ``transient``: I/O, memory, and errors we did not expect (a bug must not condemn a video for good)."""
    import av

    if isinstance(err, VideoDecodeError):
        return CONTENT
    if isinstance(err, av.error.FFmpegError) and not isinstance(err, (OSError, MemoryError)):
        return CONTENT  # the decoder or the encoder refused this file's data
    return TRANSIENT


def failure(src: Source, err: BaseException, kind: str, limits: DecodeLimits) -> dict[str, str]:
    """The quarantine entry of one video: the source checksum, the reason (naming the file), the kind
    and, for a refusal by a decode limit, the limit and its value then (raising it retries the video)."""
    reason = str(err) if isinstance(err, VideoDecodeError) else f"{src.uri}: {type(err).__name__}: {err}"
    entry = {"sha256": src.sha256, "reason": reason, "kind": kind}
    limit = getattr(err, "limit", None)
    if kind == CONTENT and limit and hasattr(limits, limit):
        entry.update(limit=limit, limit_value=str(getattr(limits, limit)))
    return entry


def shard_failure(plan: ShardPlan, err: BaseException) -> dict[str, Any]:
    """The result of a shard whose task failed as a whole (its worker died, its upload failed after the
    retries): every video in it is quarantined as transient, so the next run plans them again."""
    last_line = (str(err).strip().splitlines() or [""])[-1]  # a Ray error carries the remote traceback
    reason = f"the shard task for {plan.url} failed ({type(err).__name__}: {last_line})"
    quarantine = {s.entry.video_id: {"sha256": s.sha256, "reason": f"{s.uri}: {reason}", "kind": TRANSIENT}
                  for s in plan.sources}
    # "url": which planned shard failed, so the run can put back the old shards a failed copy was to replace;
    # "shard_error": a shard that is not what its index entry says (an old shard damaged or replaced since):
    # those are not put back, their videos are transcoded from their sources by the next run
    bad_shard = isinstance(err, ShardError) or isinstance(getattr(err, "cause", None), ShardError)  # Ray wraps it
    return {"shard": None, "url": plan.url, "quarantine": quarantine,
            "stats": {"reused": 0, "videos": 0, "bytes_in": 0, "task_failed": 1, "shard_error": int(bad_shard)}}


class _Encoder:
    """An in-memory H.264 (or other) encoder fed one frame at a time, created on the first frame."""

    def __init__(self, cfg: TranscodeConfig) -> None:
        self.cfg, self.out, self.stream, self.count = cfg, None, None, 0
        self.buf = io.BytesIO()

    def _open(self, width: int, height: int) -> None:
        import av

        self.out = av.open(self.buf, "w", format="mp4")
        # the exact rate (12.5 or 29.97 fps too): frames are taken every 1/fps seconds and shown at n/rate
        rate = Fraction(self.cfg.fps).limit_denominator(1001)
        self.time_base = 1 / rate
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
              end: float | None = None, *, limits: DecodeLimits | None = None) -> tuple[bytes, dict[str, Any]]:
    """The source's [start, end) at ``cfg.fps`` and ``cfg.short_side``, re-encoded frame by frame (a long
    video never sits in memory); returns the bytes and (duration, fps, num_frames, width, height).
    ``limits`` bound the source (size, duration, frames decoded) and what the resampler produces: frames
    per video, and how long one source frame may be repeated to fill a gap in the timestamps."""
    import av
    from av.video.frame import VideoFrame
    from av.video.reformatter import VideoReformatter

    limits = limits or DEFAULT_LIMITS
    scaler = VideoReformatter()  # one swscale context for the video; frame.reformat makes one per frame
    start = max(0.0, start or 0.0)
    enc = _Encoder(cfg)
    with VideoReader(data, name, threads=1, limits=limits) as v:
        w, h = v.stream.codec_context.width, v.stream.codec_context.height
        if not w or not h:
            raise VideoDecodeError(name, "the video stream has no frame size")
        scale = cfg.short_side / min(w, h)
        tw, th = max(2, round(w * scale / 2) * 2), max(2, round(h * scale / 2) * 2)
        if tw * th > limits.max_pixels:  # an extreme aspect ratio (2x2048 at short side 256: 256x262144)
            raise v.over(f"{w}x{h} scales to {tw}x{th} at short_side={cfg.short_side}", "max_pixels",
                         limits.max_pixels)
        step = 1.0 / cfg.fps
        max_copies = max(1, int(limits.max_frame_gap / step))  # output frames one source frame may fill
        if start > 0:
            v.seek(start)  # to the keyframe before the span
        k, prev, prev_out, copies, prev_t = 0, None, None, 0, 0.0

        def held_too_long() -> VideoDecodeError:  # a gap in the timestamps would be filled with copies
            return v.over(f"one frame (at {prev_t:.1f}s) would stay on screen for more than "
                          f"{limits.max_frame_gap:g}s", "max_frame_gap", f"{limits.max_frame_gap:g}s")

        def emit() -> None:
            nonlocal prev_out, copies
            copies += 1
            if copies > max_copies:
                raise held_too_long()
            if enc.count >= limits.max_frames:
                raise v.over(f"more than {limits.max_frames} frames at {cfg.fps:g} fps", "max_frames",
                             limits.max_frames)
            if prev_out is None:  # scale and convert a frame once, and only if it is shown
                rotation = int(round(getattr(prev, "rotation", 0) or 0)) % 360
                if rotation:  # rare: turn it upright through RGB
                    rgb = prev.reformat(width=tw, height=th, format="rgb24").to_ndarray()
                    upright = np.ascontiguousarray(np.rot90(rgb, k=rotation // 90))
                    prev_out = VideoFrame.from_ndarray(upright, format="rgb24").reformat(format="yuv420p")
                else:
                    prev_out = scaler.reformat(prev, width=tw, height=th, format="yuv420p")
            try:
                enc.add(prev_out)
            except av.error.FFmpegError as e:  # libx264 refuses some sizes at open (ExternalError)
                raise VideoDecodeError(name, f"the {cfg.codec} encoder refused the {tw}x{th} output ({e})") from e

        for frame in v.frames():
            t = (frame.time - v.start) if frame.time is not None else 0.0
            shown_until = t if end is None else min(t, end)
            if prev is not None and shown_until - max(prev_t, start) > limits.max_frame_gap:
                raise held_too_long()  # now, rather than after encoding a minute of copies
            while prev is not None and start + k * step < t and (end is None or start + k * step < end):
                emit()  # the previous frame is on screen until t
                k += 1
            if end is not None and t >= end and prev is not None:
                break
            prev, prev_out, copies, prev_t = frame, None, 0, t  # (the encoder rewrites a frame's pts)
        if prev is not None and (end is None or start + k * step < end):
            emit()  # the last frame stays on screen
    try:
        if enc.count < cfg.min_frames:
            enc.close()
            raise VideoDecodeError(name, f"too short: {enc.count} frame(s) in the requested span at {cfg.fps:g} "
                                         f"fps (need {cfg.min_frames})")
        out_w, out_h = enc.stream.width, enc.stream.height
        count = enc.count
        video = enc.close()
    except av.error.FFmpegError as e:
        raise VideoDecodeError(name, f"the {cfg.codec} encoder failed to finish ({e})") from e
    return video, {"duration": count / cfg.fps, "fps": cfg.fps, "num_frames": count, "width": out_w, "height": out_h}


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


def copy_samples(storage: Storage, plan: ShardPlan) -> list[ShardSample]:
    """The samples a copy shard takes from the last version's shards, in the planned order, with the labels of
    their manifest entries (``plan.sources``: a relabel rewrites the metadata, never the clip). Each old shard
    is verified against its index entry before anything is taken from it: a shard that was damaged or
    replaced since is a ``ShardError`` (the task fails, its videos are quarantined as transient, and the
    next run transcodes them from their sources)."""
    samples: list[ShardSample] = []
    for old, keys in plan.copy_from:
        where = storage.uri(old.url)
        data = storage.get_bytes(old.url)
        if len(data) != old.bytes or sha256_of(data) != old.sha256:
            raise ShardError(f"{where}: differs from the index (bytes {len(data)} vs {old.bytes}); cannot copy "
                             f"its samples into {plan.url}")
        wanted = set(keys)
        found = {s.key: s for s in read_shard(io.BytesIO(data), where) if s.key in wanted}
        del data
        missing = [k for k in keys if k not in found]
        if missing:
            raise ShardError(f"{where}: lacks the samples {missing[:5]} its index entry lists; cannot copy them "
                             f"into {plan.url}")
        samples.extend(found[k] for k in keys)
    entries = {s.entry.video_id: s.entry for s in plan.sources}
    for sample in samples:  # the entry's labels: a relabelled video's new ones, the same for the others
        e = entries.get(sample.key)
        if e is not None:
            sample.meta = {**sample.meta, "label": e.label, "label_name": e.label_name}
    return samples


def build_shard(plan: ShardPlan, output_uri: str, dataset: str, cfg: TranscodeConfig,
                limits: DecodeLimits | None = None) -> dict[str, Any]:
    """Make one shard. Returns {"shard": ShardInfo | None, "quarantine": {id: {sha256, reason, kind, ...}},
    "stats": {...}}. No failure of one video escapes: it is quarantined and the shard goes on. A copy shard
    (``plan.copy_from``, compaction) copies its samples from the last version's shards instead."""
    limits = limits or DEFAULT_LIMITS
    storage = open_storage(output_uri)
    existing = _stored_shard(storage, plan)
    if existing is not None:
        done = set(existing.keys)
        # why the earlier attempt left them out is not recorded with the shard: let the next run retry them
        quarantine = {s.entry.video_id: {"sha256": s.sha256, "kind": TRANSIENT,
                                         "reason": f"{s.uri}: left out of {plan.url} by an interrupted earlier run "
                                                   "(reason not kept); the next run tries it again"}
                      for s in plan.sources if s.entry.video_id not in done}
        return {"shard": existing, "quarantine": quarantine, "stats": {"reused": 1, "videos": len(done),
                                                                       "bytes_in": 0}}
    if plan.is_copy:
        shard = put_shard(storage, plan.url, plan.split, copy_samples(storage, plan))
        if sha256_of(storage.get_bytes(plan.url)) != shard.sha256:
            raise ShardError(f"{storage.uri(plan.url)}: stored bytes differ from the uploaded shard")
        return {"shard": shard, "quarantine": {},
                "stats": {"reused": 0, "videos": shard.samples, "bytes_in": 0, "copied": shard.samples}}
    samples, quarantine, bytes_in = [], {}, 0
    for src in plan.sources:
        e = src.entry
        try:
            data = read_source_with_retries(src.uri)
        except Exception as err:  # whatever the read raised, it says nothing about the file's content
            quarantine[e.video_id] = failure(src, err, TRANSIENT, limits)
            continue
        bytes_in += len(data)
        try:
            video, info = transcode(data, src.uri, cfg, e.start if e.start else None, e.end, limits=limits)
        except Exception as err:
            quarantine[e.video_id] = failure(src, err, classify(err), limits)
            continue
        finally:
            del data  # a long source is not kept while the next one is read
        samples.append(ShardSample(e.video_id, video, {
            "label": e.label, "label_name": e.label_name, "dataset": dataset, "split": e.split, "source": src.uri,
            "source_sha256": src.sha256, "start": e.start, "end": e.end, **info}))
    if not samples:
        return {"shard": None, "quarantine": quarantine, "stats": {"reused": 0, "videos": 0, "bytes_in": bytes_in}}
    shard = put_shard(storage, plan.url, plan.split, samples)
    stored = storage.get_bytes(plan.url)  # verify what the store holds before anything may reference it
    if sha256_of(stored) != shard.sha256:
        raise ShardError(f"{storage.uri(plan.url)}: stored bytes differ from the uploaded shard")
    return {"shard": shard, "quarantine": quarantine,
            "stats": {"reused": 0, "videos": shard.samples, "bytes_in": bytes_in}}


__all__ = ["TranscodeConfig", "build_shard", "classify", "copy_samples", "read_source_with_retries", "shard_failure",
           "transcode", "sha256_file", "with_retries", "Source"]

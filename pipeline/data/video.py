"""Video decoding, clip sampling and clip transforms.

Decoding (PyAV) works from a path or from bytes and samples **by timestamp**: the frame for time t
is the frame on screen at t (the last one whose presentation time is <= t), so variable frame rate
and odd time bases come out right. Per request it picks the cheaper of seeking to the keyframe
before each target and one linear pass, from the stream's keyframe index (a long keyframe interval
makes seeking lose badly; sparse targets in a short-GOP file make the linear pass lose). Rotation
metadata is honoured. Anything that cannot be decoded raises ``VideoDecodeError`` naming the source
and the reason.

Samplers return times in seconds (``ClipSpec``): a fixed-rate clip (T frames every r frames at a
reference frame rate, the recipes' 8x32, 16x16, 96x4) at a random or given position, SSv2-style
segment sampling, k uniformly spaced test clips, and the non-overlapping clips covering a whole video
(long-video protocol). A video shorter than a clip is looped or padded, and the spec says so.

Transforms (which need torch) live in ``pipeline.data.transforms``, so that decoding and ingest workers
start without importing torch.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import numpy as np

SEEK_COST_FRAMES = 8.0  # a seek costs about as much as decoding this many frames (demuxer + flush)

VideoSource = str | os.PathLike | bytes | BinaryIO


class VideoDecodeError(ValueError):
    """A video that cannot be decoded: says which one and why."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source, self.reason = source, reason


def _name(source: VideoSource, name: str | None) -> str:
    if name:
        return name
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return f"<{len(source)} bytes>" if isinstance(source, bytes) else "<stream>"


# ---------------------------------------------------------------------------------------------------
# Probing and decoding


@dataclass(frozen=True)
class VideoInfo:
    width: int  # as displayed (after rotation)
    height: int
    fps: float  # average frame rate
    duration: float  # seconds, from the first frame's presentation time
    num_frames: int  # from the container when it says, else duration x fps
    codec: str
    rotation: int  # degrees counter-clockwise applied for display (0, 90, 180, 270)
    keyframe_times: tuple[float, ...] | None  # from the demuxer index; None when unknown


class VideoReader:
    """An open container with its video stream, time base and the source's name for errors (also used by
    the ingest worker's streaming transcode)."""

    def __init__(self, source: VideoSource, name: str | None, threads: int) -> None:
        import av

        self.name = _name(source, name)
        if isinstance(source, bytes):
            if not source:
                raise VideoDecodeError(self.name, "empty file (0 bytes)")
            source = io.BytesIO(source)
        elif isinstance(source, (str, os.PathLike)):
            if not Path(source).exists():
                raise VideoDecodeError(self.name, "no such file")
            if Path(source).stat().st_size == 0:
                raise VideoDecodeError(self.name, "empty file (0 bytes)")
        try:
            self.container = av.open(source if not isinstance(source, os.PathLike) else str(source))
        except (av.error.FFmpegError, OSError, ValueError) as e:
            raise VideoDecodeError(self.name, f"not a readable video container ({e})") from e
        if not self.container.streams.video:
            self.container.close()
            kinds = sorted({s.type for s in self.container.streams}) or ["none"]
            raise VideoDecodeError(self.name, f"no video stream (streams: {', '.join(kinds)})")
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO" if threads != 1 else "SLICE"
        self.stream.thread_count = max(0, threads)
        self.tb = float(self.stream.time_base)
        start = self.stream.start_time
        self.start = start * self.tb if start is not None else 0.0

    def close(self) -> None:
        self.container.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def fps(self) -> float:
        rate = self.stream.average_rate or self.stream.guessed_rate or self.stream.base_rate
        return float(rate) if rate else 0.0

    def duration(self) -> float | None:
        if self.stream.duration:
            return self.stream.duration * self.tb
        if self.container.duration:
            return self.container.duration / 1e6 - max(0.0, self.start)
        return None

    def _index(self) -> list | None:
        try:
            entries = self.stream.index_entries
        except AttributeError:  # older PyAV
            return None
        if entries is None or len(entries) < 2:
            return None  # no usable index (webm without cues, streamed input): plan a linear pass
        return list(entries)

    def keyframe_times(self) -> tuple[float, ...] | None:
        entries = self._index()
        return None if entries is None else tuple(e.timestamp * self.tb - self.start for e in entries if e.is_keyframe)

    def last_index_time(self) -> float | None:
        entries = self._index()
        return None if entries is None else max(e.timestamp for e in entries) * self.tb - self.start

    def frames(self):
        """Decoded frames in presentation order; corrupt data becomes a VideoDecodeError."""
        import av

        try:
            yield from self.container.decode(self.stream)
        except av.error.FFmpegError as e:
            raise VideoDecodeError(self.name, f"corrupt or truncated video data ({e})") from e

    def seek(self, t: float) -> None:
        import av

        try:
            self.container.seek(int((t + self.start) / self.tb), stream=self.stream, backward=True, any_frame=False)
        except av.error.FFmpegError as e:
            raise VideoDecodeError(self.name, f"cannot seek to {t:.3f}s ({e})") from e


def probe(source: VideoSource, name: str | None = None) -> VideoInfo:
    """Size, frame rate, duration, frame count, codec, rotation and keyframes. Decodes one frame (to
    prove the stream decodes and read its rotation), or all of them when the container states no
    duration or frame rate."""
    with VideoReader(source, name, threads=1) as v:
        fps, duration = v.fps(), v.duration()
        first = next(iter(v.frames()), None)
        if first is None:
            raise VideoDecodeError(v.name, "the video stream has no decodable frames")
        rotation = int(round(getattr(first, "rotation", 0) or 0)) % 360
        if duration is None or fps <= 0:
            times = [first.time] + [f.time for f in v.frames()]
            times = [t - v.start for t in times if t is not None]
            step = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 1.0 / (fps or 30.0)
            duration, fps, num_frames = times[-1] + step, fps or 1.0 / step, len(times)
        else:
            num_frames = v.stream.frames or max(1, round(duration * fps))
            last = v.last_index_time()  # the container's duration can understate a variable-rate stream
            if last is not None and num_frames > 1 and last >= duration:
                duration = last + duration / num_frames
        w, h = v.stream.codec_context.width, v.stream.codec_context.height
        if rotation in (90, 270):
            w, h = h, w
        return VideoInfo(width=w, height=h, fps=fps, duration=float(duration), num_frames=int(num_frames),
                         codec=v.stream.codec_context.name, rotation=rotation, keyframe_times=v.keyframe_times())


@dataclass
class DecodedClip:
    frame_list: list[np.ndarray]  # T arrays (H, W, 3) uint8, upright; repeated frames share one array
    times: list[float]  # presentation time of each returned frame (seconds from the first frame)
    strategy: str  # "linear" or "seek"
    decoded: int  # frames decoded to serve the request

    @property
    def frames(self) -> np.ndarray:
        """(T, H, W, 3) uint8. Transforms take ``frame_list`` directly and copy only what they crop."""
        return np.stack(self.frame_list)


def _keyframe_before(keyframes: Sequence[float], t: float) -> float:
    i = int(np.searchsorted(keyframes, t + 1e-9, side="right")) - 1
    return keyframes[max(0, i)]


def _seek_is_cheaper(keyframes: Sequence[float], fps: float, pos: float, target: float) -> bool:
    """From a decoder at ``pos``, is seeking to the keyframe before ``target`` cheaper than decoding on?"""
    kf = _keyframe_before(keyframes, target)
    return kf > pos and SEEK_COST_FRAMES + (target - kf) * fps < (target - pos) * fps


def plan_strategy(targets: Sequence[float], keyframes: Sequence[float] | None, fps: float) -> str:
    """``seek`` when jumping to the keyframe before targets (where that is cheaper than decoding on)
    costs fewer decoded frames than one linear pass from the start through the last target."""
    if not targets or not keyframes or fps <= 0:
        return "linear"
    kfs = sorted(keyframes)
    ts = sorted(targets)
    linear = ts[-1] * fps
    cost, pos = 0.0, -math.inf
    for t in ts:
        if pos == -math.inf or _seek_is_cheaper(kfs, fps, pos, t):
            cost += SEEK_COST_FRAMES + (t - _keyframe_before(kfs, t)) * fps
        else:
            cost += max(0.0, t - pos) * fps
        pos = t
    return "seek" if cost < linear else "linear"


def decode_frames(
    source: VideoSource,
    times: Sequence[float],
    *,
    name: str | None = None,
    strategy: str = "auto",
    threads: int = 1,
) -> DecodedClip:
    """The frames on screen at each of ``times`` (seconds from the first frame), upright, in the order
    asked. Times past the end give the last frame; use a sampler to loop or pad short videos."""
    if strategy not in ("auto", "seek", "linear"):
        raise ValueError(f"strategy={strategy!r}: expected auto, seek or linear")
    if len(times) == 0:
        raise ValueError("decode_frames: no times requested")
    with VideoReader(source, name, threads) as v:
        fps = v.fps() or 30.0
        keyframes = sorted(v.keyframe_times() or ())
        if strategy == "auto":
            strategy = plan_strategy(times, keyframes, fps)
        if strategy == "seek" and not keyframes:
            strategy = "linear"  # no index to plan seeks with
        order = sorted(range(len(times)), key=lambda i: times[i])
        picked: list = [None] * len(times)
        k, decoded, prev, eps = 0, 0, None, 1e-6
        seek_to = times[order[0]] if strategy == "seek" else None
        sought = -1  # the target the last seek was for: never seek twice for one target (a seek can
        # land before the planned keyframe, and planning again from there would loop forever)
        while k < len(order):
            if seek_to is not None:
                v.seek(seek_to)
                prev, seek_to, sought = None, None, k
            for frame in v.frames():
                decoded += 1
                t = (frame.time - v.start) if frame.time is not None else decoded / fps
                if prev is None:
                    prev = (frame, t)  # targets before the first frame shown get the first frame
                while k < len(order) and times[order[k]] < t - eps:  # prev is on screen until t
                    picked[order[k]] = prev
                    k += 1
                prev = (frame, t)
                if k >= len(order):
                    break
                if strategy == "seek" and k != sought and _seek_is_cheaper(keyframes, fps, t, times[order[k]]):
                    seek_to = times[order[k]]
                    break
            else:  # end of stream: the last frame stays on screen
                if prev is None:
                    raise VideoDecodeError(v.name, "the video stream has no decodable frames")
                while k < len(order):
                    picked[order[k]] = prev
                    k += 1
        rotation = int(round(getattr(picked[0][0], "rotation", 0) or 0)) % 360
        arrays: dict[int, np.ndarray] = {}
        # One converter for the clip: frame.to_ndarray(format="rgb24") builds a new swscale context for
        # every frame, which costs 10-20x the conversion itself (same pixels either way).
        from av.video.reformatter import VideoReformatter

        rgb = VideoReformatter()
        for frame, _ in picked:
            if id(frame) not in arrays:
                arrays[id(frame)] = rgb.reformat(frame, format="rgb24").to_ndarray()
        if rotation:
            arrays = {k: np.rot90(a, k=rotation // 90) for k, a in arrays.items()}
        return DecodedClip(frame_list=[arrays[id(frame)] for frame, _ in picked], times=[t for _, t in picked],
                           strategy=strategy, decoded=decoded)


# ---------------------------------------------------------------------------------------------------
# Clip samplers


@dataclass(frozen=True)
class ClipSpec:
    times: tuple[float, ...]
    short: bool = False  # the video is shorter than the clip
    fill: str = "none"  # how a short video was extended: none, loop or pad


@dataclass(frozen=True)
class FixedRateSampler:
    """``num_frames`` frames every ``rate`` frames of a ``ref_fps`` timeline (the original resamples to
    30 fps): 8x32 covers 8.5 s, 96x4 12.8 s. ``position``: random (training), center, start or a
    float fraction of the free range."""

    num_frames: int
    rate: int
    ref_fps: float = 30.0
    short_video: str = "loop"  # loop or pad

    @property
    def clip_seconds(self) -> float:
        return self.num_frames * self.rate / self.ref_fps

    def at(self, start: float, duration: float) -> ClipSpec:
        step = self.rate / self.ref_fps
        times = [start + i * step for i in range(self.num_frames)]
        return _fit(times, duration, self.short_video)

    def sample(self, duration: float, rng: np.random.Generator | None = None,
               position: str | float = "random") -> ClipSpec:
        free = max(0.0, duration - self.clip_seconds)
        if position == "random":
            frac = (rng or np.random.default_rng()).random()
        elif position == "center":
            frac = 0.5
        elif position == "start":
            frac = 0.0
        elif isinstance(position, (int, float)) and 0.0 <= position <= 1.0:
            frac = float(position)
        else:
            raise ValueError(f"position={position!r}: expected random, center, start or a fraction in [0, 1]")
        return self.at(frac * free, duration)

    def uniform_clips(self, duration: float, k: int) -> list[ClipSpec]:
        """k test clips with starts spread uniformly over the video (k=1: the middle clip)."""
        free = max(0.0, duration - self.clip_seconds)
        fracs = [0.5] if k == 1 else [i / (k - 1) for i in range(k)]
        return [self.at(f * free, duration) for f in fracs]

    def covering_clips(self, duration: float) -> list[ClipSpec]:
        """All non-overlapping clips that together cover the whole video (long-video protocol)."""
        n = max(1, math.ceil(duration / self.clip_seconds - 1e-9))
        return [self.at(i * self.clip_seconds, duration) for i in range(n)]


@dataclass(frozen=True)
class SegmentSampler:
    """SSv2-style (TSN) sampling: the video cut into ``num_frames`` equal segments, one frame each:
    a random one for training, the middle one for testing."""

    num_frames: int

    def sample(self, duration: float, rng: np.random.Generator | None = None, train: bool = True) -> ClipSpec:
        seg = duration / self.num_frames
        offs = (rng or np.random.default_rng()).random(self.num_frames) if train else np.full(self.num_frames, 0.5)
        return ClipSpec(times=tuple(float((i + o) * seg) for i, o in enumerate(offs)))


def _fit(times: list[float], duration: float, short_video: str) -> ClipSpec:
    if short_video not in ("loop", "pad"):
        raise ValueError(f"short_video={short_video!r}: expected loop or pad")
    if duration <= 0:
        return ClipSpec(times=tuple(0.0 for _ in times), short=True, fill=short_video)
    if times[-1] < duration:
        return ClipSpec(times=tuple(times))
    if short_video == "loop":
        fixed = tuple(t % duration for t in times)
    else:
        fixed = tuple(min(t, max(0.0, duration - 1e-3)) for t in times)
    return ClipSpec(times=fixed, short=True, fill=short_video)


# ---------------------------------------------------------------------------------------------------
# Encoding


def encode_video(
    frames_THWC: np.ndarray | Sequence[np.ndarray],
    fps: float = 30.0,
    *,
    codec: str = "libx264",
    container: str = "mp4",
    keyframe_interval: int | None = None,
    crf: int = 23,
    preset: str = "veryfast",
    times: Sequence[float] | None = None,
    rotation: int | None = None,
    pix_fmt: str = "yuv420p",
) -> bytes:
    """Encode uint8 RGB frames to a video file in memory. ``times`` (seconds) give each frame its own
    presentation time (variable frame rate); ``rotation`` writes display-matrix rotation metadata."""
    import av
    from av.video.frame import VideoFrame

    frames = list(frames_THWC)
    if not frames:
        raise ValueError("encode_video: no frames")
    h, w = frames[0].shape[:2]
    buf = io.BytesIO()
    out = av.open(buf, "w", format=container)
    rate = max(1, round(fps))
    stream = out.add_stream(codec, rate=rate)
    if pix_fmt == "yuv420p":
        w, h = w - w % 2, h - h % 2  # 4:2:0 chroma needs even sizes; yuv444p keeps odd ones
    stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
    options = {}
    if keyframe_interval:
        options["g"] = str(keyframe_interval)
        options["keyint_min"] = str(keyframe_interval)
    if codec == "libx264":
        options.update(crf=str(crf), preset=preset)
        if times is not None:
            options["bf"] = "0"  # own timestamps: no reordering, so decode order is presentation order
    elif codec == "libvpx-vp9":
        options.update(deadline="realtime", **{"cpu-used": "8"})
    stream.options = options
    if times is not None:
        stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
    if rotation:
        stream.set_display_rotation(rotation)
    for i, arr in enumerate(frames):
        frame = VideoFrame.from_ndarray(np.ascontiguousarray(arr[: stream.height, : stream.width]), format="rgb24")
        if times is not None:
            frame.pts = int(round(times[i] * 1000))
            frame.time_base = stream.time_base
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
    out.close()
    return buf.getvalue()

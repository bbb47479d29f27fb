"""Video decoding, clip sampling and clip transforms.

Decoding (PyAV) works from a path or from bytes and samples **by timestamp**: the frame for time t
is the frame on screen at t (the last one whose presentation time is <= t), so variable frame rate
and odd time bases come out right. Per request it picks the cheaper of seeking to the keyframe
before each target and one linear pass, from the stream's keyframe index (a long keyframe interval
makes seeking lose badly; sparse targets in a short-GOP file make the linear pass lose). Rotation
metadata is honoured. Anything that cannot be decoded raises ``VideoDecodeError`` naming the source
and the reason.

Decoding is bounded (``DecodeLimits``): pixels per frame, frames decoded or produced per video, frames
per clip, duration, and (ingest's resampler) how long one frame may stay on screen. The frame size is
checked against what the stream declares before the first frame is decoded (and FFmpeg itself is told
the bound, so neither stream probing nor a mid-stream size change can allocate past it); counts and
times are checked as frames come out. Still images (a PNG or JPEG renamed ``.mp4``) are refused unless
``allow_images``: that is decided by the demuxer (image2, png_pipe, gif, ...), so MJPEG or PNG video
in an AVI/MOV container still decodes.

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
    """A video that cannot be decoded: says which one and why (``limit``: the DecodeLimits field it
    exceeded, if that was the reason)."""

    def __init__(self, source: str, reason: str, limit: str | None = None) -> None:
        super().__init__(f"{source}: {reason}")
        self.source, self.reason, self.limit = source, reason, limit


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds on what decoding one video may cost; over one, ``VideoDecodeError`` names the field.

    The defaults are far above what Kinetics, SSv2, Diving-48 and HowTo100M need, and far below what a
    hostile file can ask for (an 8192x8192 H.264 file of 200 KB decodes to ~100 MB per frame):

    - ``max_pixels`` 4096x4096 = 16.8 Mpx per frame: 4K UHD (8.3 Mpx) and DCI 4K (8.8 Mpx) pass; the
      datasets' sources are YouTube downloads at 1080p or less. Raise it for 8K (33.2 Mpx) sources.
    - ``max_seconds`` 4 hours: HowTo100M videos average 6.5 minutes, with a tail past an hour; Kinetics
      clips are 10 s (their full source videos minutes), SSv2 2-6 s. Ingest holds a transcoded video in
      memory while its shard is built, so this also bounds that.
    - ``max_frames`` 1,000,000 frames decoded, or produced by ingest's resampler, per video: 4 hours at
      60 fps is 864,000. It bounds a file of many tiny-interval frames that stays under the duration.
    - ``max_clip_frames`` 512 frames per decoded clip (the frames a clip holds in memory at once): the
      largest recipe takes 96 (TimeSformer-L).
    - ``max_frame_gap`` 60 s that one frame may stay on screen before the next: ingest resamples to a
      constant rate, so a gap is filled with copies (two frames 600 s apart became 18,001 frames and
      256 MB of output). Constant-rate sources never come close; a minute-long frozen frame is a broken
      timestamp, not footage.
    - ``allow_images`` False: a still image (PNG, JPEG, BMP, WebP, GIF, TIFF, ...) is not a video.
    """

    max_pixels: int = 4096 * 4096
    max_seconds: float = 4 * 3600.0
    max_frames: int = 1_000_000
    max_clip_frames: int = 512
    max_frame_gap: float = 60.0
    allow_images: bool = False

    def problems(self) -> list[str]:
        """What is wrong with these limits (empty when they can be used), as ``field=value: why``."""
        out = []
        for key in ("max_pixels", "max_frames", "max_clip_frames"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                out.append(f"{key}={value!r}: expected a positive integer")
        for key in ("max_seconds", "max_frame_gap"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
                    or not math.isfinite(value):
                out.append(f"{key}={value!r}: expected a positive number of seconds")
        return out


DEFAULT_LIMITS = DecodeLimits()

# Demuxers of still images (or image sequences): a file they accept is a picture, whatever its name.
# The "*_pipe" demuxers (png_pipe, jpeg_pipe, bmp_pipe, webp_pipe, tiff_pipe, ...) are matched by suffix.
IMAGE_DEMUXERS = frozenset({"image2", "image2pipe", "gif", "apng", "ico", "alias_pix", "brender_pix", "fits",
                            "jpegxl_anim", "webp"})


def is_image_demuxer(format_name: str) -> bool:
    return any(n in IMAGE_DEMUXERS or n.endswith("_pipe") for n in format_name.split(","))


def _still_dispositions() -> int:
    """Stream dispositions that mark a picture, not moving video (cover art, still-image items)."""
    import av

    flags = av.stream.Disposition
    return int(flags.attached_pic) | int(getattr(flags, "still_image", 0))


def _mpx(pixels: int) -> str:
    return f"{pixels / 1e6:.3g} Mpx"


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
    the ingest worker's streaming transcode). Checks ``limits`` before anything is decoded, and as frames
    come out."""

    def __init__(self, source: VideoSource, name: str | None, threads: int,
                 limits: DecodeLimits | None = None) -> None:
        import av

        self.name = _name(source, name)
        self.limits = limits = limits or DEFAULT_LIMITS
        self.decoded = 0  # frames produced by frames(), over all passes and seeks
        if isinstance(source, bytes):
            if not source:
                raise VideoDecodeError(self.name, "empty file (0 bytes)")
            source = io.BytesIO(source)
        elif isinstance(source, (str, os.PathLike)):
            if not Path(source).exists():
                raise VideoDecodeError(self.name, "no such file")
            if Path(source).stat().st_size == 0:
                raise VideoDecodeError(self.name, "empty file (0 bytes)")
        # max_pixels reaches the decoders that stream probing opens (H.264 probing decodes a frame: 150 MB
        # at 8192x8192 before any check of ours could run); FFmpeg refuses larger frames there.
        bound = {"max_pixels": str(min(limits.max_pixels, 2**31 - 1))}  # FFmpeg's option is an int
        try:
            self.container = av.open(source if not isinstance(source, os.PathLike) else str(source), options=bound)
        except (av.error.FFmpegError, OSError, ValueError) as e:
            raise VideoDecodeError(self.name, f"not a readable video container ({e})") from e
        try:
            self.stream = self._video_stream()
        except BaseException:
            self.container.close()
            raise
        self.stream.codec_context.options = bound  # and to the decoder of the frames we ask for
        self.stream.thread_type = "AUTO" if threads != 1 else "SLICE"
        self.stream.thread_count = max(0, threads)
        self.tb = float(self.stream.time_base)
        start = self.stream.start_time
        self.start = start * self.tb if start is not None else 0.0
        declared = self.duration()
        if declared is not None and declared > limits.max_seconds:
            self.container.close()
            raise self.over(f"the container declares a duration of {declared:.0f}s", "max_seconds",
                            f"{limits.max_seconds:g}s")

    def over(self, what: str, limit: str, value: object) -> VideoDecodeError:
        """The error for a video beyond ``limits.<limit>``: what it asked for, and the setting to raise."""
        return VideoDecodeError(self.name, f"{what}, over the decode limit {limit}={value} (raise limits.{limit} "
                                           f"if the video is genuine)", limit=limit)

    def _video_stream(self):
        """The video stream, refused before decoding when it is a still image or too large."""
        lim, fmt = self.limits, self.container.format.name
        videos = list(self.container.streams.video)
        if not videos:
            kinds = sorted({s.type for s in self.container.streams}) or ["none"]
            raise VideoDecodeError(self.name, f"no video stream (streams: {', '.join(kinds)})")
        # cover art (an MP3 or M4A renamed .mp4) is a "video" stream holding one attached picture
        moving = [s for s in videos if not (int(s.disposition) & _still_dispositions())]
        if not lim.allow_images and (is_image_demuxer(fmt) or not moving):
            codec = videos[0].codec_context.name if videos[0].codec_context else "no decoder"
            what = (f"a still image ({fmt}, {codec}), not a video" if is_image_demuxer(fmt)
                    else f"no moving video, only a still picture attached to the {fmt} file (cover art)")
            raise VideoDecodeError(self.name, f"{what}; set limits.allow_images=true to accept images as one-frame "
                                              "videos", limit="allow_images")
        stream = (moving or videos)[0]
        cc = stream.codec_context
        if cc is None:
            raise VideoDecodeError(self.name, "corrupt or truncated video data (no decoder for its video stream: "
                                              "a damaged header or an unsupported codec)")
        w, h = cc.width, cc.height  # as the stream declares them: nothing is decoded yet
        if w * h > lim.max_pixels:
            raise self.over(f"frame size {w}x{h} ({_mpx(w * h)})", "max_pixels",
                            f"{lim.max_pixels} ({_mpx(lim.max_pixels)})")
        if stream.frames and stream.frames > lim.max_frames:
            raise self.over(f"the container declares {stream.frames} frames", "max_frames", lim.max_frames)
        return stream

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
        """Decoded frames in presentation order, within the limits; corrupt data becomes a VideoDecodeError."""
        import av

        lim = self.limits
        try:
            for frame in self.container.decode(self.stream):
                self.decoded += 1
                if self.decoded > lim.max_frames:
                    raise self.over(f"more than {lim.max_frames} frames decoded", "max_frames", lim.max_frames)
                if frame.width * frame.height > lim.max_pixels:  # the size changed mid-stream
                    raise self.over(f"a {frame.width}x{frame.height} frame ({_mpx(frame.width * frame.height)}) "
                                    f"at frame {self.decoded}", "max_pixels", lim.max_pixels)
                if frame.time is not None and frame.time - self.start > lim.max_seconds:
                    raise self.over(f"a frame at {frame.time - self.start:.0f}s", "max_seconds",
                                    f"{lim.max_seconds:g}s")
                yield frame
        except av.error.FFmpegError as e:
            cc = self.stream.codec_context
            if cc.width * cc.height > lim.max_pixels:  # FFmpeg refused a frame over the bound we gave it
                raise self.over(f"a {cc.width}x{cc.height} frame ({_mpx(cc.width * cc.height)})", "max_pixels",
                                lim.max_pixels) from e
            raise VideoDecodeError(self.name, f"corrupt or truncated video data ({e})") from e

    def seek(self, t: float) -> None:
        import av

        try:
            self.container.seek(int((t + self.start) / self.tb), stream=self.stream, backward=True, any_frame=False)
        except av.error.FFmpegError as e:
            raise VideoDecodeError(self.name, f"cannot seek to {t:.3f}s ({e})") from e


def probe(source: VideoSource, name: str | None = None, *, limits: DecodeLimits | None = None) -> VideoInfo:
    """Size, frame rate, duration, frame count, codec, rotation and keyframes. Decodes one frame (to
    prove the stream decodes and read its rotation), or all of them when the container states no
    duration or frame rate."""
    with VideoReader(source, name, threads=1, limits=limits) as v:
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
    limits: DecodeLimits | None = None,
) -> DecodedClip:
    """The frames on screen at each of ``times`` (seconds from the first frame), upright, in the order
    asked. Times past the end give the last frame; use a sampler to loop or pad short videos. ``limits``
    (default ``DEFAULT_LIMITS``) bound the frame size, the frames decoded and the clip's length."""
    if strategy not in ("auto", "seek", "linear"):
        raise ValueError(f"strategy={strategy!r}: expected auto, seek or linear")
    if len(times) == 0:
        raise ValueError("decode_frames: no times requested")
    limits = limits or DEFAULT_LIMITS
    if len(times) > limits.max_clip_frames:
        raise VideoDecodeError(_name(source, name), f"a clip of {len(times)} frames, over the decode limit "
                                                    f"max_clip_frames={limits.max_clip_frames}",
                               limit="max_clip_frames")
    with VideoReader(source, name, threads, limits) as v:
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
        # every frame, which costs more than the conversion itself (same pixels either way; docs/performance.md
        # "The data loader" has the loader next to a plain and a one-converter PyAV decode).
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

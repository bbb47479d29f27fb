"""Hostile videos against the decode limits (pipeline.data.video.DecodeLimits): huge frames refused before
anything is decoded (and with little memory), frame counts, clip length, duration, frozen-frame gaps in
ingest's resampler, and still images renamed .mp4. Every input is built here, at test time."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.video import (
    DEFAULT_LIMITS,
    DecodeLimits,
    VideoDecodeError,
    decode_frames,
    encode_video,
    is_image_demuxer,
    probe,
)
from pipeline.ingest.worker import TranscodeConfig, transcode

from .test_video import frame_numbers, numbered_frames

REPO = Path(__file__).resolve().parents[2]

# An 8192x8192 H.264 file of one flat colour: tiny on disk (~0.5 MB), ~100 MB per decoded YUV frame and
# 200 MB per RGB frame. Built in a child process: x264 needs ~700 MB for frames this size.
MAKE_HUGE = r"""
import sys
import av
from av.video.frame import VideoFrame
side, frames, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
with av.open(path, "w", format="mp4") as out:
    stream = out.add_stream("libx264", rate=1)
    stream.width = stream.height = side
    stream.pix_fmt = "yuv420p"
    stream.options = {"preset": "ultrafast", "crf": "51", "tune": "zerolatency", "threads": "1"}
    frame = VideoFrame(side, side, "yuv420p")
    for plane in frame.planes:
        plane.update(bytes(plane.buffer_size))
    for i in range(frames):
        frame.pts = i
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
"""

# Peak RSS growth of decoding a file in a fresh process, after the libraries are loaded and warmed up
# (decoding a tiny video first initialises FFmpeg's decoder tables, which would count otherwise).
MEASURE = r"""
import json, resource, sys
import numpy as np
from pipeline.data.video import DecodeLimits, VideoDecodeError, decode_frames, encode_video
path, max_pixels, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
decode_frames(encode_video(np.zeros((2, 16, 16, 3), np.uint8), fps=2), [0.0, 0.5])
def peak_mb():  # VmHWM, reset to the current RSS below (Linux); else the process's lifetime peak
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
before, error = peak_mb(), None
try:
    decode_frames(path, [float(i) for i in range(n)], limits=DecodeLimits(max_pixels=max_pixels))
except VideoDecodeError as e:
    error = str(e)
print(json.dumps({"growth_mb": peak_mb() - before, "error": error}))
"""


def _python(code: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def huge_video(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("huge") / "huge.mp4"
    _python(MAKE_HUGE, "8192", "8", str(path))
    assert path.stat().st_size < 2_000_000  # tiny in bytes: the threat is what it decodes to
    return path


def test_an_8192_square_h264_file_is_refused_fast_and_with_little_memory(huge_video):
    t0 = time.perf_counter()
    refused = json.loads(_python(MEASURE, str(huge_video), str(DEFAULT_LIMITS.max_pixels), "8"))
    elapsed = time.perf_counter() - t0
    assert refused["error"].startswith(f"{huge_video}: frame size 8192x8192")
    assert "max_pixels=16777216" in refused["error"] and "limits.max_pixels" in refused["error"]
    # Opening alone used to decode a probe frame (~150 MB); eight frames to RGB took 2.4 GB. What is left
    # (~21 MB) is the H.264 decoder's per-macroblock tables, set up while FFmpeg probes the stream.
    assert refused["growth_mb"] < 48, refused
    assert elapsed < 30
    # the measurement sees a decode: one frame of it, allowed, costs what the limit saves
    allowed = json.loads(_python(MEASURE, str(huge_video), str(8192 * 8192), "1"))
    assert allowed["error"] is None and allowed["growth_mb"] > 150, allowed
    print(f"peak RSS growth: refused {refused['growth_mb']:.1f} MB, one frame decoded {allowed['growth_mb']:.0f} MB")


def test_probe_and_transcode_refuse_it_before_decoding(huge_video):
    with pytest.raises(VideoDecodeError, match="frame size 8192x8192 .*max_pixels") as err:
        probe(huge_video)
    assert err.value.limit == "max_pixels"
    with pytest.raises(VideoDecodeError, match="frame size 8192x8192"):
        transcode(huge_video.read_bytes(), "huge.mp4", TranscodeConfig())


def test_the_pixel_limit_is_inclusive_and_configurable():
    video = encode_video(numbered_frames(4, 48, 64), fps=10)
    assert frame_numbers(decode_frames(video, [0.1], limits=DecodeLimits(max_pixels=64 * 48)).frames) == [1]
    with pytest.raises(VideoDecodeError, match=r"^v.mp4: frame size 64x48 .*max_pixels=3071"):
        decode_frames(video, [0.1], name="v.mp4", limits=DecodeLimits(max_pixels=64 * 48 - 1))


def test_a_frame_size_change_mid_stream_is_caught_as_frames_come_out():
    # MPEG-TS segments concatenate: the stream declares 64x48, its second half is 128x96
    video = (encode_video(numbered_frames(10, 48, 64), fps=10, container="mpegts")
             + encode_video(numbered_frames(10, 96, 128), fps=10, container="mpegts"))
    assert [f.shape for f in decode_frames(video, [0.0, 1.5]).frame_list] == [(48, 64, 3), (96, 128, 3)]
    with pytest.raises(VideoDecodeError, match=r"a 128x96 frame .*max_pixels=3072") as err:
        decode_frames(video, [0.0, 1.5], name="ts", limits=DecodeLimits(max_pixels=64 * 48))
    assert err.value.limit == "max_pixels"


def test_frames_decoded_per_video_are_counted():
    video = encode_video(numbered_frames(30), fps=10, container="mpegts")  # declares no frame count
    assert frame_numbers(decode_frames(video, [2.9], strategy="linear",
                                       limits=DecodeLimits(max_frames=30)).frames) == [29]
    with pytest.raises(VideoDecodeError, match=r"more than 10 frames decoded, over the decode limit max_frames=10"):
        decode_frames(video, [2.9], strategy="linear", limits=DecodeLimits(max_frames=10))
    declared = encode_video(numbered_frames(30), fps=10)  # MP4 states 30 frames: refused before decoding
    with pytest.raises(VideoDecodeError, match=r"the container declares 30 frames, over the decode limit max_frames"):
        decode_frames(declared, [0.0], limits=DecodeLimits(max_frames=10))


def test_a_clip_longer_than_the_limit_is_refused_before_opening():
    video = encode_video(numbered_frames(3), fps=10)
    assert DEFAULT_LIMITS.max_clip_frames >= 96  # the largest recipe (TimeSformer-L) takes 96 frames
    assert len(decode_frames(video, [0.0] * 96).frame_list) == 96
    with pytest.raises(VideoDecodeError, match=r"^c.mp4: a clip of 97 frames, over the decode limit max_clip_frames"):
        decode_frames(video, [0.0] * 97, name="c.mp4", limits=DecodeLimits(max_clip_frames=96))


def test_a_declared_duration_over_the_limit_is_refused_before_decoding():
    video = encode_video(numbered_frames(30), fps=10)  # 3 s
    assert DEFAULT_LIMITS.max_seconds >= 3600  # HowTo100M has videos past an hour
    with pytest.raises(VideoDecodeError, match=r"declares a duration of 3s, over the decode limit max_seconds=2s"):
        probe(video, limits=DecodeLimits(max_seconds=2))


def test_two_frames_600_s_apart_are_refused_by_ingest_at_once():
    """Resampled to 30 fps, the first frame would be repeated 18,000 times (256 MB of output when it is noise)."""
    rng = np.random.default_rng(0)
    gap = encode_video(rng.integers(0, 255, (2, 48, 64, 3), dtype=np.uint8), fps=30, times=[0.0, 600.0])
    t0 = time.perf_counter()
    with pytest.raises(VideoDecodeError, match=r"^gap.mp4: one frame \(at 0.0s\) would stay on screen for more than "
                                               r"60s, over the decode limit max_frame_gap") as err:
        transcode(gap, "gap.mp4", TranscodeConfig(short_side=48, fps=30))
    assert err.value.limit == "max_frame_gap" and time.perf_counter() - t0 < 5
    # with the gap allowed, the frame limit still bounds what the resampler produces
    with pytest.raises(VideoDecodeError, match=r"more than 500 frames at 30 fps, over the decode limit max_frames"):
        transcode(gap, "gap.mp4", TranscodeConfig(short_side=48, fps=30),
                  limits=DecodeLimits(max_frame_gap=1000, max_frames=500))


def test_a_genuine_pause_under_the_gap_limit_is_resampled():
    shown_at = [0.0, 5.0, 5.1]  # a frame held for 5 s (variable frame rate), then one more
    video, info = transcode(encode_video(numbered_frames(3), fps=30, times=shown_at, crf=10), "pause.mp4",
                            TranscodeConfig(short_side=48, fps=10))
    assert info["num_frames"] == 52  # 50 copies of frame 0, then frames 1 and 2
    assert frame_numbers(decode_frames(video, [0.0, 4.95, 5.05, 5.15]).frames) == [0, 0, 1, 2]


# -- still images renamed .mp4 ----------------------------------------------------------------------


def _image(codec: str, fmt: str, pix_fmt: str) -> bytes:
    import av
    from av.video.frame import VideoFrame

    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=1)
        stream.width, stream.height, stream.pix_fmt = 64, 48, pix_fmt
        frame = VideoFrame.from_ndarray(numbered_frames(8)[7], format="rgb24").reformat(format=pix_fmt)
        for packet in [*stream.encode(frame), *stream.encode()]:
            out.mux(packet)
    return buf.getvalue()


IMAGES = [("png", "image2pipe", "rgb24", "png_pipe"), ("mjpeg", "image2pipe", "yuvj420p", "jpeg_pipe"),
          ("bmp", "image2pipe", "bgr24", "bmp_pipe"), ("tiff", "image2pipe", "rgb24", "tiff_pipe"),
          ("libwebp", "webp", "yuv420p", "webp_pipe"), ("gif", "gif", "rgb8", "gif")]


@pytest.mark.parametrize("codec,fmt,pix_fmt,demuxer", IMAGES, ids=[i[3] for i in IMAGES])
def test_a_still_image_renamed_mp4_is_refused_unless_images_are_allowed(tmp_path, codec, fmt, pix_fmt, demuxer):
    path = tmp_path / "clip.mp4"
    path.write_bytes(_image(codec, fmt, pix_fmt))
    with pytest.raises(VideoDecodeError, match=rf"^{path}: a still image \({demuxer}, .*limits.allow_images") as err:
        decode_frames(path, [0.0])
    assert err.value.limit == "allow_images"
    with pytest.raises(VideoDecodeError, match="a still image"):
        transcode(path.read_bytes(), "clip.mp4", TranscodeConfig(short_side=48, min_frames=1))
    clip = decode_frames(path, [0.0, 1.0], limits=DecodeLimits(allow_images=True))  # asked for: one frame
    assert clip.frames.shape == (2, 48, 64, 3)


@pytest.mark.parametrize("codec,container,pix_fmt", [("mjpeg", "avi", "yuvj420p"), ("mjpeg", "mov", "yuvj420p"),
                                                      ("png", "mov", "rgb24")])
def test_mjpeg_and_png_video_in_a_video_container_still_decode(codec, container, pix_fmt):
    """Decided by the demuxer, not the codec: MJPEG in AVI/MOV is a video codec in a video container."""
    import av

    video = encode_video(numbered_frames(10), fps=10, codec=codec, container=container, pix_fmt=pix_fmt)
    assert av.open(io.BytesIO(video)).streams.video[0].codec_context.name == codec
    assert frame_numbers(decode_frames(video, [0.0, 0.45, 0.9]).frames) == [0, 4, 9]


def test_cover_art_without_moving_video_is_an_image():
    import av
    from av.video.frame import VideoFrame

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:  # a song with its cover picture, renamed .mp4
        audio = out.add_stream("aac", rate=8000)
        cover = out.add_stream("mjpeg", rate=1)
        cover.width, cover.height, cover.pix_fmt = 64, 48, "yuvj420p"
        cover.disposition = av.stream.Disposition.attached_pic
        picture = VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24").reformat(format="yuvj420p")
        for packet in [*cover.encode(picture), *cover.encode()]:
            out.mux(packet)
        sound = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.float32), format="fltp", layout="mono")
        sound.sample_rate, sound.pts = 8000, 0
        for packet in [*audio.encode(sound), *audio.encode()]:
            out.mux(packet)
    with pytest.raises(VideoDecodeError, match=r"^song.mp4: no moving video, only a still picture .*cover art"):
        decode_frames(buf.getvalue(), [0.0], name="song.mp4")


def test_image_demuxers_are_recognised_and_video_ones_are_not():
    for name in ("image2", "png_pipe", "jpeg_pipe", "webp_pipe", "gif", "apng"):
        assert is_image_demuxer(name), name
    for name in ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi", "mpegts", "yuv4mpegpipe", "flv"):
        assert not is_image_demuxer(name), name


def test_unusable_limits_are_reported_by_field():
    assert DEFAULT_LIMITS.problems() == []
    bad = DecodeLimits(max_pixels=0, max_seconds=float("nan"), max_frames=-1, max_clip_frames=True,
                       max_frame_gap=0.0)
    assert [p.partition("=")[0] for p in bad.problems()] == ["max_pixels", "max_frames", "max_clip_frames",
                                                             "max_seconds", "max_frame_gap"]

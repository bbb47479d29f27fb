"""The ingest worker's transcode: span, frame rate, size, rotation, too-short and broken sources."""

from __future__ import annotations

import pytest

from pipeline.data.video import VideoDecodeError, decode_frames, encode_video, probe
from pipeline.ingest.worker import TranscodeConfig, transcode

from .test_video import frame_numbers, numbered_frames


def test_a_span_is_resampled_by_time_and_resized():
    source = encode_video(numbered_frames(30, 240, 320), fps=10, crf=0)  # frame k shown during [k/10, (k+1)/10)
    video, info = transcode(source, "s.mp4", TranscodeConfig(short_side=64, fps=20, crf=5), start=1.0, end=2.5)
    assert info == {"duration": 1.5, "fps": 20, "num_frames": 30, "width": 86, "height": 64}
    got = probe(video)
    assert (got.width, got.height, got.num_frames, got.fps) == (86, 64, 30, 20.0)
    assert got.keyframe_times is not None and len(got.keyframe_times) >= 2  # short keyframe interval
    clip = decode_frames(video, [0.0, 0.05, 0.5, 1.45])
    assert frame_numbers(clip.frames) == [10, 10, 15, 24]


def test_rotated_sources_come_out_upright():
    source = encode_video(numbered_frames(5, 240, 320), fps=10, rotation=90)
    video, info = transcode(source, "r.mp4", TranscodeConfig(short_side=64, fps=10))
    assert (info["width"], info["height"]) == (64, 86) and probe(video).rotation == 0


def test_too_short_and_broken_sources_are_errors_with_the_name():
    source = encode_video(numbered_frames(10, 48, 64), fps=10)
    with pytest.raises(VideoDecodeError, match=r"^clip.mp4: too short: 1 frame"):
        transcode(source, "clip.mp4", TranscodeConfig(short_side=32, fps=10, min_frames=2), start=0.0, end=0.05)
    with pytest.raises(VideoDecodeError, match=r"^bad.mp4: empty file"):
        transcode(b"", "bad.mp4", TranscodeConfig())

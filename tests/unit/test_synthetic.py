"""The demo's temporal task (``order``): which colour came first. Its videos decode to the colours and the
switch they were made with, a frame cannot tell the class, and a model without a time embedding (space-only
attention) provably cannot either: reversing a clip's frames, which turns one class into its partner, leaves
its output unchanged. The divided model, given a time embedding that starts non-zero, can."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, load_recipe
from pipeline.data.synthetic import (
    ORDER_CLASSES,
    SyntheticSpec,
    balanced_order_spec,
    classes,
    make_corpus,
    make_video,
    order_frames,
    switch_range,
)
from pipeline.data.video import FixedRateSampler, decode_frames, probe
from pipeline.models.timesformer import TimeSformer, variant_config

SPEC = SyntheticSpec()
SQUARE = SPEC.square ** 2 / SPEC.size ** 2  # the square's share of a frame


def square_colour(frame: np.ndarray, colour: tuple[int, int, int]) -> float:
    """Fraction of pixels within 40 of ``colour`` on each channel."""
    return float((np.abs(frame.astype(int) - np.array(colour)).max(axis=-1) < 40).mean())


def test_order_videos_decode_to_the_first_colour_then_the_second():
    red, blue = (220, 40, 40), (50, 70, 230)
    data = make_video("order", "red_then_blue", seed=3)
    info = probe(data)
    assert info.num_frames == SPEC.num_frames
    frames = decode_frames(data, [0.0, info.duration - 1.0 / SPEC.fps]).frames
    assert square_colour(frames[0], red) > 0.8 * SQUARE and square_colour(frames[0], blue) < 0.1 * SQUARE
    assert square_colour(frames[1], blue) > 0.8 * SQUARE and square_colour(frames[1], red) < 0.1 * SQUARE


def test_the_switch_is_symmetric_about_its_centre():
    n = SPEC.num_frames
    firsts = []
    for seed in range(400):
        frames = order_frames("green_then_yellow", np.random.default_rng(seed))
        green = [square_colour(f, (40, 200, 60)) > 0.8 * SQUARE for f in frames]
        k = green.index(False)  # frames [0, k) are green, then yellow to the end
        assert all(green[:k]) and not any(green[k:])
        firsts.append(k)
    assert (min(firsts), max(firsts)) == switch_range(SPEC) == (11, 21)  # about frame 16 of 32
    assert abs(np.mean(firsts) - n / 2) < 0.5
    with pytest.raises(ValueError, match="frame boundary or half-way"):
        switch_range(SyntheticSpec(num_frames=32, switch_center=0.41))


def first_colour_share(spec: SyntheticSpec, sampler: FixedRateSampler) -> float:
    """Mean share of a training clip's frames that show the first colour, over switches and clip starts."""
    lo, hi = switch_range(spec)
    duration = spec.num_frames / spec.fps
    shares = []
    for k in range(lo, hi + 1):
        for pos in np.linspace(0, 1, 201):
            times = sampler.sample(duration, position=float(pos)).times
            shares.append(np.mean([int(t * spec.fps + 1e-9) < k for t in times]))
    return float(np.mean(shares))


def test_the_demo_videos_balance_the_colours_over_the_recipes_clips():
    """Over the clips the demo's sampler takes, each colour shows half the time, so a bag of frames says
    nothing about the order. A switch centred on the video is not enough: clips never reach its last
    sampling step, so the first colour would show more, and majority-first would beat chance."""
    data = load_recipe("demo_order").data
    sampler = FixedRateSampler(data.num_frames, data.sampling_rate, data.ref_fps)
    step = data.sampling_rate / data.ref_fps
    spec = balanced_order_spec(step, square=32)
    assert (spec.num_frames, spec.fps, switch_range(spec)) == (30, 15.0, (9, 18))
    assert abs(first_colour_share(spec, sampler) - 0.5) < 0.005
    centred = SyntheticSpec(num_frames=30, fps=15.0)  # switch about frame 15 of 30
    assert first_colour_share(centred, sampler) > 0.53
    with pytest.raises(ValueError, match="frame boundary"):
        balanced_order_spec(step, fps=16.0)  # 0.9 s = 14.4 frames: no symmetric spread


def test_classes_pair_up_by_colours_and_unknown_kinds_are_refused():
    assert len(classes("order")) == 4 and classes("order") == ORDER_CLASSES
    pairs = {frozenset(c.split("_then_")) for c in ORDER_CLASSES}
    assert len(pairs) == 2  # each pair of colours in both orders
    with pytest.raises(ValueError, match="expected motion, order or colour"):
        classes("orders")


def tiny(attention: str, te_std: float) -> TimeSformer:
    torch.manual_seed(0)
    return TimeSformer(variant_config("timesformer_tiny", num_frames=8, img_size=32, patch_size=8, num_classes=4,
                                      attention_type=attention, time_embed_init_std=te_std)).eval()


def test_space_only_cannot_tell_a_clip_from_its_reverse_but_divided_can():
    rng = np.random.default_rng(0)
    frames = order_frames("red_then_blue", rng)[::4, 16:48, 16:48]  # 8 frames, 32x32
    clip = torch.from_numpy(frames.copy()).permute(3, 0, 1, 2).float().div(255).sub(0.45).div(0.225)[None]
    reverse = clip.flip(2)  # blue then red
    with torch.no_grad():
        so = tiny("space_only", 0.0)
        assert torch.allclose(so(clip), so(reverse), atol=1e-5)
        divided = tiny("divided_space_time", 0.1)
        assert (divided(clip) - divided(reverse)).abs().max() > 1e-4
        original = tiny("divided_space_time", 0.0)  # the original's zero start: order-blind at step 0
        assert torch.allclose(original(clip), original(reverse), atol=1e-5)


def test_time_embed_init_std_is_zero_by_default_and_checked():
    assert tiny("divided_space_time", 0.0).time_embed.abs().max() == 0
    std = float(tiny("divided_space_time", 0.1).time_embed.detach().std())
    assert 0.07 < std < 0.12
    with pytest.raises(ValueError, match="time_embed_init_std"):
        variant_config("timesformer_tiny", time_embed_init_std=-0.1)
    with pytest.raises(ConfigError, match="model.time_embed_init_std"):
        load_recipe("demo_order", ["model.time_embed_init_std=2"])
    from pipeline.models.timesformer import model_config

    demo = load_recipe("demo_order")
    assert demo.model.time_embed_init_std > 0  # the demo's model is not order-blind at step 0
    assert model_config(demo).time_embed_init_std == demo.model.time_embed_init_std


def test_a_corpus_is_remade_when_its_spec_or_counts_change(tmp_path):
    make_corpus(tmp_path, "order", {"train": 1})
    first = (tmp_path / "videos/order00001.mp4").read_bytes()  # blue_then_red with 1 per class
    make_corpus(tmp_path, "order", {"train": 1})
    assert (tmp_path / "videos/order00001.mp4").read_bytes() == first  # kept
    csv_path = make_corpus(tmp_path, "order", {"train": 2})  # ids now mean other labels: made again
    assert "red_then_blue,order00001," in csv_path.read_text()
    assert (tmp_path / "videos/order00001.mp4").read_bytes() != first
    assert (tmp_path / "videos/order00001.mp4").read_bytes() == make_video("order", "red_then_blue", seed=1)

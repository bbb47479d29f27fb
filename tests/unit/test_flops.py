"""FLOPs per view in the paper's convention, checked against the paper and against PyTorch's counter."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pipeline.models.flops import cost_per_view, flops_per_view, training_flops_per_clip
from pipeline.models.timesformer import ATTENTION_TYPES, TimeSformer, variant_config

# fvcore on the original model (shared/notes/timesformer-reference.md, 5.2), GFLOPs per view
REFERENCE_GFLOPS = {
    ("timesformer_base", "divided_space_time"): 196.1,
    ("timesformer_hr", "divided_space_time"): 1704.5,
    ("timesformer_l", "divided_space_time"): 2382.5,
    ("timesformer_base", "joint_space_time"): 179.7,
    ("timesformer_base", "space_only"): 140.7,
}
PAPER_TFLOPS_3_VIEWS = {"timesformer_base": 0.59, "timesformer_hr": 5.11, "timesformer_l": 7.14}


@pytest.mark.parametrize("variant,scheme", list(REFERENCE_GFLOPS))
def test_flops_per_view_match_the_original_within_one_percent(variant, scheme):
    got = flops_per_view(variant_config(variant, attention_type=scheme)) / 1e9
    assert got == pytest.approx(REFERENCE_GFLOPS[(variant, scheme)], rel=0.01)


@pytest.mark.parametrize("variant", list(PAPER_TFLOPS_3_VIEWS))
def test_paper_tflops_are_three_views(variant):
    tflops = 3 * flops_per_view(variant_config(variant)) / 1e12
    assert round(tflops, 2) == pytest.approx(PAPER_TFLOPS_3_VIEWS[variant], abs=0.011)


def test_joint_is_cheaper_than_divided_at_8x224_but_not_at_16_frames():
    # the paper's Fig. 3 trend: divided wins from about 16 frames or 336 px up
    joint, divided = (variant_config("timesformer_base", attention_type=a)
                      for a in ("joint_space_time", "divided_space_time"))
    assert flops_per_view(joint) < flops_per_view(divided)
    assert flops_per_view(joint, num_frames=16) > flops_per_view(divided, num_frames=16)
    assert flops_per_view(joint, img_size=336) > flops_per_view(divided, img_size=336)


@pytest.mark.parametrize("scheme", ATTENTION_TYPES)
@pytest.mark.parametrize("frames,size", [(4, 32), (8, 48)])
def test_cost_model_equals_pytorch_operation_count(scheme, frames, size):
    """The analytic count is what the implementation executes (LayerNorm aside, which PyTorch's
    counter ignores): a wrong token count or a missed step in either would show here."""
    cfg = variant_config("timesformer_tiny", attention_type=scheme)
    model = TimeSformer(cfg).eval()
    x = torch.randn(2, 3, frames, size, size)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    cost = cost_per_view(cfg, num_frames=frames, img_size=size)
    assert counter.get_total_flops() == 2 * 2 * (cost.total - cost.layernorm)  # 2 clips, 2 FLOPs per MAC


def test_training_flops_count_backward_and_recompute():
    cfg = variant_config("timesformer_base")
    assert training_flops_per_clip(cfg) == 3 * flops_per_view(cfg)
    assert training_flops_per_clip(cfg, recompute_forward=True) == 4 * flops_per_view(cfg)

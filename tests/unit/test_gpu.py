"""The model on a CUDA device: same numbers as on the CPU, bf16 close to fp32, checkpointing exact."""

from __future__ import annotations

import pytest
import torch

from pipeline.models.timesformer import ATTENTION_TYPES, TimeSformer, apply_activation_checkpointing, variant_config

from .test_timesformer import randomize_

pytestmark = pytest.mark.gpu
SMALL = dict(num_frames=8, img_size=64, patch_size=16, embed_dim=128, depth=3, num_heads=4, num_classes=11)


@pytest.fixture(autouse=True)
def exact_fp32():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("scheme", ATTENTION_TYPES)
def test_cuda_fp32_matches_cpu(scheme):
    cpu = randomize_(TimeSformer(variant_config("timesformer_tiny", attention_type=scheme, **SMALL)), 0.05).eval()
    x = torch.randn(2, 3, 8, 64, 64)
    with torch.no_grad():
        expected = cpu(x)
        got = cpu.cuda()(x.cuda()).cpu()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scheme", ATTENTION_TYPES)
def test_bf16_training_step_is_close_to_fp32(scheme):
    model = randomize_(TimeSformer(variant_config("timesformer_tiny", attention_type=scheme, **SMALL)), 0.05).cuda()
    x, y = torch.randn(2, 3, 8, 64, 64, device="cuda"), torch.tensor([3, 9], device="cuda")
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        m = model.to(dtype)
        loss = torch.nn.functional.cross_entropy(m(x.to(dtype)).float(), y)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters())
        m.zero_grad(set_to_none=True)
        losses[dtype] = loss.item()
    assert losses[torch.bfloat16] == pytest.approx(losses[torch.float32], rel=0.03)


def test_hugging_face_parity_at_full_size_on_cuda():
    from transformers import TimesformerConfig, TimesformerForVideoClassification

    from pipeline.models.convert import hf_config_dict, load_checkpoint

    cfg = variant_config("timesformer_base", drop_path_rate=0.0)
    hf = TimesformerForVideoClassification(TimesformerConfig(**hf_config_dict(cfg))).cuda().eval()
    ours = load_checkpoint(TimeSformer(cfg), hf.state_dict()).cuda().eval()
    x = torch.randn(2, 3, 8, 224, 224, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(pixel_values=x.transpose(1, 2)).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("policy", ["full", "selective", "every_2"])
def test_checkpointing_policies_are_exact_on_cuda(policy):
    model = randomize_(TimeSformer(variant_config("timesformer_tiny", **SMALL)), 0.05).cuda().train()
    x, y = torch.randn(2, 3, 8, 64, 64, device="cuda"), torch.tensor([1, 2], device="cuda")

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    loss0, grads0 = loss_and_grads()
    apply_activation_checkpointing(model, policy)
    loss1, grads1 = loss_and_grads()
    assert loss1 == loss0
    for a, b in zip(grads0, grads1, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)

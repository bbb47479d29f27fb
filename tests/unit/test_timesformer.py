"""TimeSformer model: sizes, schemes, receptive fields, embeddings, checkpointing policy."""

from __future__ import annotations

import pytest
import torch

from pipeline.models.factory import create_model
from pipeline.models.flops import parameter_count
from pipeline.models.timesformer import (
    ATTENTION_TYPES,
    POS_EMBED_TYPES,
    VARIANTS,
    Block,
    TimeSformer,
    TimeSformerConfig,
    apply_activation_checkpointing,
    count_parameters,
    parse_checkpoint_policy,
    resize_pos_embed,
    resize_time_embed,
    variant_config,
)


def randomize_(module: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Every parameter random, zero-initialised ones included, so no path is silently inert."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def build_on_meta(name: str, **overrides) -> TimeSformer:
    with torch.device("meta"):
        return create_model(name, **overrides)


# ---------------------------------------------------------------------------------------------------
# Sizes


def test_divided_base_has_the_original_parameter_count():
    assert count_parameters(build_on_meta("timesformer_base", num_classes=400)) == 121_566_352


@pytest.mark.parametrize("scheme,expected", [("joint_space_time", 86_112_400), ("space_only", 86_106_256)])
def test_joint_and_space_only_are_vit_base_sized(scheme, expected):
    n = count_parameters(build_on_meta("timesformer_base", attention_type=scheme))
    assert n == expected
    assert round(n / 1e6, 2) == 86.11


def test_extra_steps_add_one_attention_set_each():
    # sparse local-global has one extra step like divided; axial two (paper Table 1: 121.4M / 156.8M).
    divided = count_parameters(build_on_meta("timesformer_base"))
    assert count_parameters(build_on_meta("timesformer_base", attention_type="sparse_local_global")) == divided
    axial = count_parameters(build_on_meta("timesformer_base", attention_type="axial"))
    assert axial - divided == divided - 86_106_256 - 8 * 768  # minus space_only, minus its time embedding


@pytest.mark.parametrize("scheme", ATTENTION_TYPES)
@pytest.mark.parametrize("pos", POS_EMBED_TYPES)
def test_parameter_formula_matches_the_built_model(scheme, pos):
    cfg = variant_config("timesformer_tiny", attention_type=scheme, pos_embed=pos)
    assert parameter_count(cfg) == count_parameters(TimeSformer(cfg))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_builds_with_the_paper_shape(name):
    m = build_on_meta(name)
    expected = {"timesformer_base": (8, 224), "timesformer_hr": (16, 448), "timesformer_l": (96, 224),
                "timesformer_tiny": (4, 32)}[name]
    assert (m.cfg.num_frames, m.cfg.img_size) == expected
    if name != "timesformer_tiny":
        assert (m.cfg.embed_dim, m.cfg.depth, m.cfg.num_heads, m.cfg.patch_size) == (768, 12, 12, 16)
        assert m.time_embed.shape == (1, expected[0], 768)


def test_drop_path_schedule_is_linear_from_zero():
    m = build_on_meta("timesformer_base")
    rates = [b.drop_path.p for b in m.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)
    assert all(b > a for a, b in zip(rates, rates[1:], strict=False))


# ---------------------------------------------------------------------------------------------------
# Forward


@pytest.mark.parametrize("scheme", ATTENTION_TYPES)
@pytest.mark.parametrize("pos", POS_EMBED_TYPES)
def test_every_scheme_classifies_a_clip(scheme, pos):
    m = create_model("timesformer_tiny", attention_type=scheme, pos_embed=pos).eval()
    logits = m(torch.randn(2, 3, 4, 32, 32))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


@pytest.mark.parametrize("scheme", ATTENTION_TYPES)
def test_other_frame_counts_and_resolutions_run_and_matching_ones_change_nothing(scheme):
    m = randomize_(create_model("timesformer_tiny", attention_type=scheme)).eval()
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        assert m(torch.randn(1, 3, 8, 48, 64)).shape == (1, 10)
        # resizing to the model's own sizes must be the identity
        assert torch.equal(resize_pos_embed(m.pos_embed, (4, 4), (4, 4)), m.pos_embed)
        torch.testing.assert_close(m(x), m(x))


def test_the_batch_is_independent():
    m = randomize_(create_model("timesformer_tiny")).eval()
    x = torch.randn(3, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x)[1:2], m(x[1:2]), atol=1e-5, rtol=1e-5)


def test_temporal_order_matters_for_divided_but_not_for_space_only_without_time_embedding():
    x = torch.randn(1, 3, 4, 32, 32)
    flipped = x.flip(2)
    divided = randomize_(create_model("timesformer_tiny")).eval()
    space = randomize_(create_model("timesformer_tiny", attention_type="space_only")).eval()
    with torch.no_grad():
        assert not torch.allclose(divided(x), divided(flipped), atol=1e-4)
        torch.testing.assert_close(space(x), space(flipped), atol=1e-5, rtol=1e-5)


def test_bad_input_and_bad_config_are_named():
    m = create_model("timesformer_tiny")
    with pytest.raises(ValueError, match=r"\(B, C=3, T, H, W\)"):
        m(torch.randn(1, 4, 3, 32, 32))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        m(torch.randn(1, 3, 4, 30, 32))
    with pytest.raises(ValueError, match="attention_type='divided'"):
        TimeSformerConfig(attention_type="divided")
    with pytest.raises(ValueError, match="unknown model field.*'frames'"):
        variant_config("timesformer_tiny", frames=8)
    with pytest.raises(ValueError, match="unknown model variant 'timesformer_xl'"):
        create_model("timesformer_xl")
    with pytest.raises(ValueError, match="even number of frames"):
        create_model("timesformer_tiny", attention_type="sparse_local_global", num_frames=3)


# ---------------------------------------------------------------------------------------------------
# Receptive fields: perturb one (frame, position) and see exactly which tokens move


T, GH, GW = 4, 4, 4
N = GH * GW


def _token_index(t: int, h: int, w: int) -> int:
    return t * N + h * GW + w  # frame-major patch order, without the CLS


def _changed(before: torch.Tensor, after: torch.Tensor) -> set:
    """Indices of the tokens (dim 1) that changed."""
    diff = (after - before).abs().amax(dim=-1)[0]
    return {i for i, d in enumerate(diff.tolist()) if d > 1e-6}


def _block(scheme: str) -> Block:
    cfg = variant_config("timesformer_tiny", attention_type=scheme, num_frames=T)
    return randomize_(Block(cfg, drop_path_rate=0.0), std=0.1).eval()


def _run_block(blk: Block, x: torch.Tensor, T: int = T, grid=(4, 4)) -> torch.Tensor:
    """A whole block on a joined [CLS] + patches sequence (grouped schemes keep the CLS apart)."""
    tokens = (x,) if blk.attention_type in ("joint_space_time", "space_only") else (x[:, :1], x[:, 1:])
    return torch.cat(blk(tokens, T, grid), dim=1)


def _perturbed(x: torch.Tensor, idx: int) -> torch.Tensor:
    y = x.clone()
    y[:, idx] += torch.randn(y.shape[-1])
    return y


T0, H0, W0 = 1, 2, 3
P0 = _token_index(T0, H0, W0)
ALL = set(range(T * N))
EXPECTED_STEP = {
    "temporal": {_token_index(t, H0, W0) for t in range(T)},
    "width": {_token_index(T0, H0, w) for w in range(GW)},
    "local": {_token_index(t, h, w) for t in range(T) for h in range(GH) for w in range(GW)
              if h // (GH // 2) == H0 // (GH // 2) and w // (GW // 2) == W0 // (GW // 2)},
}
# the ViT step that ends each grouped scheme (patch tokens that change; the CLS always does)
EXPECTED_LAST = {
    "divided_space_time": {_token_index(T0, h, w) for h in range(GH) for w in range(GW)},
    "axial": {_token_index(T0, h, W0) for h in range(GH)},
    "sparse_local_global": {_token_index(t, h, w) for t in range(T) for h in range(GH) for w in range(GW)
                            if (t % 2, h % 2, w % 2) == (T0 % 2, H0 % 2, W0 % 2)},
}


@pytest.mark.parametrize("step,scheme", [("temporal", "divided_space_time"), ("temporal", "axial"),
                                         ("width", "axial"), ("local", "sparse_local_global")])
def test_receptive_field_of_each_extra_step(step, scheme):
    blk = _block(scheme)
    xp = torch.randn(1, T * N, 64)
    fn = getattr(blk, f"_{step}_step")
    with torch.no_grad():
        changed = _changed(fn(xp, T, (GH, GW)), fn(_perturbed(xp, P0), T, (GH, GW)))
    assert changed == EXPECTED_STEP[step]


@pytest.mark.parametrize("scheme", list(EXPECTED_LAST))
def test_receptive_field_of_each_final_vit_step(scheme):
    blk = _block(scheme)
    cls, xp = torch.randn(1, 1, 64), torch.randn(1, T * N, 64)
    fn = getattr(blk, f"_{scheme}_last_step")
    with torch.no_grad():
        cls_a, a = fn(cls, xp, T, (GH, GW))
        cls_b, b = fn(cls, _perturbed(xp, P0), T, (GH, GW))
    assert _changed(a, b) == EXPECTED_LAST[scheme]
    assert not torch.allclose(cls_a, cls_b), "the CLS token attends to every group"


@pytest.mark.parametrize("scheme", ["divided_space_time", "axial", "sparse_local_global"])
def test_the_cls_token_is_not_a_key_of_the_extra_steps(scheme):
    blk = _block(scheme)
    x = torch.randn(1, 1 + T * N, 64)
    with torch.no_grad():
        before = x[:, 1:]
        for step in {"divided_space_time": ["temporal"], "axial": ["temporal", "width"],
                     "sparse_local_global": ["local"]}[scheme]:
            before = getattr(blk, f"_{step}_step")(before, T, (GH, GW))
        y = _perturbed(x, 0)  # only the CLS differs
        after = y[:, 1:]
        for step in {"divided_space_time": ["temporal"], "axial": ["temporal", "width"],
                     "sparse_local_global": ["local"]}[scheme]:
            after = getattr(blk, f"_{step}_step")(after, T, (GH, GW))
    assert torch.equal(before, after)


@pytest.mark.parametrize("scheme,expected", [
    ("joint_space_time", ALL),
    ("divided_space_time", ALL),  # time, then space: every frame, every position
    ("axial", ALL),  # time, width, height
    ("sparse_local_global", ALL),  # a local window holds every parity, the global lattice spans the clip
])
def test_receptive_field_of_a_whole_block(scheme, expected):
    blk = _block(scheme)
    x = torch.randn(1, 1 + T * N, 64)
    with torch.no_grad():
        a, b = _run_block(blk, x), _run_block(blk, _perturbed(x, 1 + P0))
    assert {i - 1 for i in _changed(a, b) if i > 0} == expected
    assert 0 in _changed(a, b)


def test_space_only_block_sees_only_its_frame():
    blk = _block("space_only")
    x = torch.randn(T, 1 + N, 64)  # frames as the batch, as the model passes them
    y = x.clone()
    y[T0, 1 + H0 * GW + W0] += 1.0
    with torch.no_grad():
        diff = (_run_block(blk, y, 1) - _run_block(blk, x, 1)).abs().amax(dim=(1, 2))
    assert [d > 1e-6 for d in diff.tolist()] == [t == T0 for t in range(T)]


def test_at_initialisation_divided_blocks_are_per_frame_image_blocks():
    # temporal_fc starts at zero: the temporal step adds nothing and frames stay independent.
    cfg = variant_config("timesformer_tiny", num_frames=T)
    blk = Block(cfg, drop_path_rate=0.0).eval()
    with torch.no_grad():
        blk.load_state_dict(TimeSformer(cfg).blocks[0].state_dict())  # the model's init zeroes temporal_fc
        x = torch.randn(1, 1 + T * N, 64)
        changed = _changed(_run_block(blk, x), _run_block(blk, _perturbed(x, 1 + P0)))
    assert {i - 1 for i in changed if i > 0} == EXPECTED_LAST["divided_space_time"]


# ---------------------------------------------------------------------------------------------------
# Embeddings


def test_pos_embed_resize_is_two_dimensional():
    # Encode each patch's row and column in the embedding; after 4x4 -> 8x8 every new patch must sit
    # between the old rows/cols it came from (the original's 1-D resize puts row-0 values in row 1).
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    pe = torch.cat([torch.zeros(1, 1, 2), torch.stack([rows, cols], -1).reshape(1, 16, 2)], dim=1)
    out = resize_pos_embed(pe, (4, 4), (8, 8), mode="bilinear")[0, 1:].reshape(8, 8, 2)
    assert torch.all(out[1:, :, 0] >= out[:-1, :, 0])  # rows increase down
    assert torch.all(out[:, 1:, 1] >= out[:, :-1, 1])  # cols increase right
    assert torch.allclose(out[:, :, 0].std(dim=1), torch.zeros(8))  # a row holds one row value
    nearest = resize_pos_embed(pe, (4, 4), (8, 8), mode="nearest")[0, 1:].reshape(8, 8, 2)
    assert torch.equal(nearest[2 * 1 + 1, 2 * 3], torch.tensor([1.0, 3.0]))


def test_time_embed_resize_nearest_repeats_like_the_original():
    te = torch.arange(8.0).view(1, 8, 1)
    assert resize_time_embed(te, 16)[0, :, 0].tolist() == [i // 2 for i in range(16)]
    assert resize_time_embed(te, 96)[0, :, 0].tolist() == [i // 12 for i in range(96)]


def test_initialisation_follows_the_original():
    m = create_model("timesformer_tiny")
    assert torch.count_nonzero(m.time_embed) == 0
    for blk in m.blocks:
        assert torch.count_nonzero(blk.temporal_fc.weight) == 0 and torch.count_nonzero(blk.temporal_fc.bias) == 0
        assert 0.01 < blk.attn.qkv.weight.std() < 0.03
    assert m.blocks[0].norm1.eps == 1e-6 and m.blocks[0].attn.qkv.bias is not None


# ---------------------------------------------------------------------------------------------------
# Activation checkpointing


def test_checkpoint_policy_parsing():
    assert [parse_checkpoint_policy(p) for p in ("none", "full", "every_block", "every_3", 2, None, "selective")] == [
        0, 1, 1, 3, 2, 0, "selective"]
    with pytest.raises(ValueError, match="every_<k>"):
        parse_checkpoint_policy("sometimes")
    m = create_model("timesformer_tiny", depth=5)
    assert apply_activation_checkpointing(m, "every_2") == [0, 2, 4]
    assert apply_activation_checkpointing(m, "none") == []
    assert all(b.checkpoint_fn is None for b in m.blocks)


def _loss_and_grads(model: TimeSformer, x: torch.Tensor, y: torch.Tensor):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # drop path draws
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("scheme", ["divided_space_time", "joint_space_time", "axial"])
def test_activation_checkpointing_changes_nothing_numerically(scheme):
    m = randomize_(create_model("timesformer_tiny", attention_type=scheme, drop_path_rate=0.2), std=0.05).train()
    x, y = torch.randn(2, 3, 4, 32, 32), torch.tensor([1, 7])
    loss_plain, grads_plain = _loss_and_grads(m, x, y)
    assert apply_activation_checkpointing(m, "full") == [0, 1]
    loss_ckpt, grads_ckpt = _loss_and_grads(m, x, y)
    assert torch.equal(loss_plain, loss_ckpt)
    for name, g in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_activation_checkpointing_recomputes_the_forward_of_checkpointed_blocks():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.models.flops import cost_per_view

    m = create_model("timesformer_tiny", depth=4)
    x = torch.randn(2, 3, 4, 32, 32)

    def train_flops() -> int:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            m(x).sum().backward()
        return counter.get_total_flops()

    plain = train_flops()
    c = cost_per_view(m.cfg)
    B, cfg = x.shape[0], m.cfg
    one_block_fwd = 2 * B * (c.attention_linear + c.attention_matmul + c.mlp) // cfg.depth
    # Non-reentrant checkpointing stops recomputing once every saved tensor is back: the block's last
    # op, mlp.fc2 over the patch tokens, whose output backward does not need, is not run again.
    fc2 = 2 * B * cfg.num_frames * cfg.num_patches * cfg.mlp_dim * cfg.embed_dim
    apply_activation_checkpointing(m, "every_2")
    assert train_flops() - plain == 2 * (one_block_fwd - fc2)
    apply_activation_checkpointing(m, "full")
    assert train_flops() - plain == 4 * (one_block_fwd - fc2)


def test_selective_checkpointing_is_exact_and_recomputes_no_matmul():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    m = randomize_(create_model("timesformer_tiny", depth=3, drop_path_rate=0.2), std=0.05).train()
    x, y = torch.randn(2, 3, 4, 32, 32), torch.tensor([1, 7])
    loss_plain, grads_plain = _loss_and_grads(m, x, y)

    def train_flops() -> int:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            m(x).sum().backward()
        return counter.get_total_flops()

    plain_flops = train_flops()
    assert apply_activation_checkpointing(m, "selective") == [0, 1, 2]
    loss_sel, grads_sel = _loss_and_grads(m, x, y)
    assert torch.equal(loss_plain, loss_sel)
    for name, g in grads_plain.items():
        torch.testing.assert_close(grads_sel[name], g, atol=1e-6, rtol=1e-5, msg=name)
    assert train_flops() == plain_flops  # matmuls and attention are kept, never recomputed
    apply_activation_checkpointing(m, "full")
    assert train_flops() > plain_flops
    with pytest.raises(ValueError, match="do not pass checkpoint_fn"):
        apply_activation_checkpointing(m, "selective", checkpoint_fn=lambda f, *a: f(*a))

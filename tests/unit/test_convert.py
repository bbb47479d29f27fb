"""Checkpoint conversion: Hugging Face parity, image-ViT inflation, original .pyth, safetensors, strictness."""

from __future__ import annotations

import pytest
import torch
from transformers import TimesformerConfig, TimesformerForVideoClassification, ViTConfig, ViTModel

from pipeline.models.convert import (
    CheckpointMismatchError,
    config_from_hf,
    detect_format,
    from_hf,
    hf_config_dict,
    inflate_vit,
    load_checkpoint,
    load_safetensors,
    read_checkpoint,
    save_safetensors,
    to_hf,
    to_official,
)
from pipeline.models.timesformer import TimeSformer, resize_pos_embed, resize_time_embed, variant_config

from .test_timesformer import randomize_

# A small model with a non-trivial shape: 8 frames, a 6x6 grid, 3 blocks.
SMALL = dict(num_frames=8, img_size=48, patch_size=8, embed_dim=96, depth=3, num_heads=4, num_classes=7)


def small_cfg(**overrides):
    return variant_config("timesformer_tiny", **{**SMALL, **overrides})


def hf_model(cfg, seed=0) -> TimesformerForVideoClassification:
    hf = TimesformerForVideoClassification(TimesformerConfig(**hf_config_dict(cfg)))
    return randomize_(hf, std=0.1, seed=seed).eval()


def clip(cfg, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, cfg.num_frames, cfg.img_size, cfg.img_size, generator=g)


# ---------------------------------------------------------------------------------------------------
# Hugging Face


@pytest.mark.parametrize("scheme", ["divided_space_time", "joint_space_time"])
def test_same_logits_as_hugging_face(scheme):
    cfg = small_cfg(attention_type=scheme)
    hf = hf_model(cfg)
    ours = load_checkpoint(TimeSformer(cfg), hf.state_dict()).eval()
    x = clip(cfg)
    with torch.no_grad():
        expected = hf(pixel_values=x.transpose(1, 2)).logits  # HF takes (B, T, C, H, W)
        got = ours(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scheme", ["divided_space_time", "joint_space_time", "space_only"])
def test_hugging_face_round_trip_is_exact(scheme):
    cfg = small_cfg(attention_type=scheme)
    ours = randomize_(TimeSformer(cfg), std=0.1).eval()
    hf = TimesformerForVideoClassification(TimesformerConfig(**hf_config_dict(cfg))).eval()
    hf.load_state_dict(to_hf(ours.state_dict()), strict=True)
    back = from_hf(hf.state_dict())
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
    assert config_from_hf(hf.config.to_dict()) == cfg.__class__(**{**cfg.to_dict(), "drop_path_rate": 0.0})
    if scheme != "space_only":
        x = clip(cfg)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), hf(pixel_values=x.transpose(1, 2)).logits, atol=1e-5, rtol=0)


def test_space_only_differs_from_hugging_face_only_by_frame_averaging():
    """HF's space_only classifies every frame's CLS and returns B*T logits; the original (and we)
    average all tokens over frames, then apply the final norm and head: one prediction per clip.
    The blocks are the same: our per-frame tokens through norm + head give HF's per-frame logits."""
    cfg = small_cfg(attention_type="space_only")
    hf = hf_model(cfg)
    ours = load_checkpoint(TimeSformer(cfg), hf.state_dict()).eval()
    x = clip(cfg)
    B, T = x.shape[0], cfg.num_frames
    with torch.no_grad():
        hf_logits = hf(pixel_values=x.transpose(1, 2)).logits
        tokens, _, _ = ours.forward_tokens(x)  # (B*T, 1+N, D)
        per_frame = ours.head(ours.norm(tokens[:, 0]))
        clip_logits = ours(x)
    assert hf_logits.shape == (B * T, cfg.num_classes) and clip_logits.shape == (B, cfg.num_classes)
    torch.testing.assert_close(per_frame, hf_logits, atol=1e-5, rtol=0)
    # ours: average the frames' tokens, then norm and head (the original's order) ...
    averaged = tokens.view(B, T, *tokens.shape[1:]).mean(1)[:, 0]
    torch.testing.assert_close(clip_logits, ours.head(ours.norm(averaged)), atol=1e-6, rtol=0)
    # ... which is not the mean of HF's frame logits, since the norm is not linear
    assert (clip_logits - hf_logits.view(B, T, -1).mean(1)).abs().max() > 1e-5


def test_schemes_hugging_face_lacks_are_refused_by_name():
    with pytest.raises(ValueError, match="no 'axial' attention"):
        hf_config_dict(small_cfg(attention_type="axial"))
    with pytest.raises(CheckpointMismatchError, match="no Hugging Face equivalent for key .blocks.0.width_"):
        to_hf(TimeSformer(small_cfg(attention_type="axial")).state_dict())


# ---------------------------------------------------------------------------------------------------
# ImageNet ViT inflation


def vit_reference(cfg, seed=3) -> tuple[ViTModel, dict[str, torch.Tensor]]:
    """A random image ViT (Hugging Face's implementation, independent of ours) and its weights in
    timm's vit_base_patch16_224 names, which is what inflate_vit reads."""
    vit = ViTModel(ViTConfig(hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
                             intermediate_size=cfg.mlp_dim, image_size=cfg.img_size, patch_size=cfg.patch_size,
                             layer_norm_eps=cfg.norm_eps, qkv_bias=True), add_pooling_layer=False)
    randomize_(vit, std=0.1, seed=seed).eval()
    s = vit.state_dict()
    timm = {"cls_token": s["embeddings.cls_token"], "pos_embed": s["embeddings.position_embeddings"],
            "patch_embed.proj.weight": s["embeddings.patch_embeddings.projection.weight"],
            "patch_embed.proj.bias": s["embeddings.patch_embeddings.projection.bias"],
            "norm.weight": s["layernorm.weight"], "norm.bias": s["layernorm.bias"],
            "head.weight": torch.randn(1000, cfg.embed_dim), "head.bias": torch.randn(1000)}
    for i in range(cfg.depth):
        p = f"layers.{i}."  # transformers 5.x names
        for kind in ("weight", "bias"):
            timm[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(
                [s[f"{p}attention.{n}_proj.{kind}"] for n in ("q", "k", "v")])
            timm[f"blocks.{i}.attn.proj.{kind}"] = s[f"{p}attention.o_proj.{kind}"]
            timm[f"blocks.{i}.norm1.{kind}"] = s[f"{p}layernorm_before.{kind}"]
            timm[f"blocks.{i}.norm2.{kind}"] = s[f"{p}layernorm_after.{kind}"]
            timm[f"blocks.{i}.mlp.fc1.{kind}"] = s[f"{p}mlp.fc1.{kind}"]
            timm[f"blocks.{i}.mlp.fc2.{kind}"] = s[f"{p}mlp.fc2.{kind}"]
    return vit, timm


def test_inflated_model_with_one_frame_is_the_image_vit():
    cfg = small_cfg(num_frames=1, pos_embed="space")
    vit, timm_state = vit_reference(cfg)
    model = load_checkpoint(TimeSformer(cfg), timm_state).eval()  # detected as an image ViT
    image = torch.randn(2, 3, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        expected = vit(pixel_values=image).last_hidden_state[:, 0]  # final-LN CLS
        got = model.forward_features(image.unsqueeze(2))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_inflation_copies_spatial_attention_zeroes_the_rest_and_drops_a_foreign_head():
    cfg = small_cfg(attention_type="axial")
    _, timm_state = vit_reference(cfg)
    model = TimeSformer(cfg)
    fresh_head = model.head.weight.clone()
    state = inflate_vit(timm_state, model)
    for i in range(cfg.depth):
        for step in ("temporal", "width"):
            assert torch.equal(state[f"blocks.{i}.{step}_attn.qkv.weight"], timm_state[f"blocks.{i}.attn.qkv.weight"])
            assert torch.equal(state[f"blocks.{i}.{step}_norm1.weight"], timm_state[f"blocks.{i}.norm1.weight"])
            assert torch.count_nonzero(state[f"blocks.{i}.{step}_fc.weight"]) == 0
    assert torch.count_nonzero(state["time_embed"]) == 0
    assert torch.equal(state["head.weight"], fresh_head)  # 1000 ImageNet classes vs 7: a new head


def test_inflated_divided_model_on_a_still_video_is_the_image_vit():
    # all frames equal: temporal attention has nothing to add (and its fc starts at zero)
    cfg = small_cfg(pos_embed="space_time")
    vit, timm_state = vit_reference(cfg)
    model = load_checkpoint(TimeSformer(cfg), timm_state).eval()
    image = torch.randn(1, 3, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        got = model.forward_features(image.unsqueeze(2).expand(-1, -1, cfg.num_frames, -1, -1))
        torch.testing.assert_close(got, vit(pixel_values=image).last_hidden_state[:, 0], atol=1e-5, rtol=0)


def test_inflation_resizes_the_position_grid_in_two_dimensions():
    cfg = small_cfg()  # 6x6 grid
    _, timm_state = vit_reference(variant_config("timesformer_tiny", **{**SMALL, "img_size": 32}))  # 4x4 grid
    state = inflate_vit(timm_state, TimeSformer(cfg))
    torch.testing.assert_close(state["pos_embed"], resize_pos_embed(timm_state["pos_embed"], (4, 4), (6, 6)))


# ---------------------------------------------------------------------------------------------------
# Original .pyth, safetensors, any file


def test_original_pyth_checkpoint_round_trip(tmp_path):
    cfg = small_cfg()
    model = randomize_(TimeSformer(cfg), std=0.1).eval()
    path = tmp_path / "checkpoint_epoch_00015.pyth"
    torch.save(to_official(model.state_dict(), cfg, epoch=15), path)
    raw = read_checkpoint(path)  # weights-only: a .pyth is tensors, numbers and a config
    assert all(k.startswith("model.") for k in raw["model_state"]) and detect_format(raw) == "official"
    loaded = load_checkpoint(TimeSformer(cfg), path).eval()
    x = clip(cfg)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_safetensors_round_trip_keeps_weights_and_config(tmp_path):
    cfg = small_cfg(attention_type="sparse_local_global")
    model = randomize_(TimeSformer(cfg), std=0.1).eval()
    path = save_safetensors(model, tmp_path / "export")
    assert path.name == "model.safetensors"
    loaded = load_safetensors(tmp_path / "export").eval()
    assert loaded.cfg == cfg
    x = clip(cfg)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_hugging_face_state_dict_file_loads_by_detection(tmp_path):
    cfg = small_cfg()
    hf = hf_model(cfg)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "model.safetensors"))
    model = load_checkpoint(TimeSformer(cfg), tmp_path / "model.safetensors").eval()
    x = clip(cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(pixel_values=x.transpose(1, 2)).logits, atol=1e-5, rtol=0)


def test_a_checkpoint_for_other_frames_and_resolution_is_resized_on_load():
    src = randomize_(TimeSformer(small_cfg(num_frames=4, img_size=32)), std=0.1)
    dst = load_checkpoint(TimeSformer(small_cfg(num_frames=8, img_size=48)), src.state_dict())
    assert torch.equal(dst.time_embed, resize_time_embed(src.time_embed, 8))
    assert torch.equal(dst.time_embed[0, 1], src.time_embed[0, 0])  # nearest: [0, 0, 1, 1, ...]
    assert torch.equal(dst.pos_embed, resize_pos_embed(src.pos_embed, (4, 4), (6, 6)))


# ---------------------------------------------------------------------------------------------------
# Strictness


@pytest.fixture
def good_state():
    return TimeSformer(small_cfg()).state_dict()


def test_a_missing_key_is_named(good_state):
    del good_state["blocks.1.temporal_fc.bias"]
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(1\): blocks.1.temporal_fc.bias"):
        load_checkpoint(TimeSformer(small_cfg()), good_state, fmt="ours")


def test_an_extra_key_is_named(good_state):
    good_state["blocks.0.attn.relative_bias"] = torch.zeros(3)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys \(1\): blocks.0.attn.relative_bias"):
        load_checkpoint(TimeSformer(small_cfg()), good_state, fmt="ours")


def test_a_wrong_key_is_named_both_ways(good_state):
    good_state["blocks.2.temporal_attn.qkv.wieght"] = good_state.pop("blocks.2.temporal_attn.qkv.weight")
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(TimeSformer(small_cfg()), good_state, fmt="ours")
    assert "missing keys (1): blocks.2.temporal_attn.qkv.weight" in str(err.value)
    assert "unexpected keys (1): blocks.2.temporal_attn.qkv.wieght" in str(err.value)


def test_a_shape_mismatch_is_an_error_unless_it_is_a_known_resize(good_state):
    good_state["blocks.0.mlp.fc1.weight"] = torch.zeros(10, 96)
    with pytest.raises(CheckpointMismatchError, match=r"blocks.0.mlp.fc1.weight: checkpoint \(10, 96\) vs model"):
        load_checkpoint(TimeSformer(small_cfg()), good_state, fmt="ours")


def test_a_head_for_other_classes_needs_reset_head(good_state):
    with pytest.raises(CheckpointMismatchError, match="reset_head=True"):
        load_checkpoint(TimeSformer(small_cfg(num_classes=3)), good_state, fmt="ours")
    model = TimeSformer(small_cfg(num_classes=3))
    fresh = model.head.weight.clone()
    load_checkpoint(model, good_state, fmt="ours", reset_head=True)
    assert torch.equal(model.head.weight, fresh)
    assert torch.equal(model.blocks[0].attn.qkv.weight, good_state["blocks.0.attn.qkv.weight"])


def test_a_truncated_file_is_reported_with_its_path(tmp_path):
    path = tmp_path / "broken.pyth"
    torch.save(to_official(TimeSformer(small_cfg()).state_dict(), small_cfg()), path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="broken.pyth: cannot be read"):
        load_checkpoint(TimeSformer(small_cfg()), path)
    with pytest.raises(FileNotFoundError, match="nothing.pyth"):
        load_checkpoint(TimeSformer(small_cfg()), tmp_path / "nothing.pyth")

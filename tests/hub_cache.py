"""A Hugging Face Hub cache built on disk, laid out exactly as huggingface_hub lays out what it downloads, so
that the real resolution code (``pipeline.models.hub``, huggingface_hub's ``snapshot_download`` in offline
mode) runs against it with no network:

    <cache>/models--<org>--<name>/blobs/<sha256 of the file>
    <cache>/models--<org>--<name>/snapshots/<commit>/<file>  -> ../../blobs/<sha256>  (relative symlinks)
    <cache>/models--<org>--<name>/refs/main                     <commit>

The repositories hold tiny models in the two layouts the hub has: a timm image ViT (timm key names,
``config.json`` with timm's ``pretrained_cfg``) and a Hugging Face ``TimesformerForVideoClassification``."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from pipeline.models.convert import hf_config_dict, hf_preprocessor_dict
from pipeline.models.timesformer import TimeSformer, TimeSformerConfig, variant_config

# the tiny model these repositories fit (a variant_config("timesformer_tiny", **TINY) model)
TINY = dict(num_frames=2, img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)
IMAGENET_CLASSES = 7  # the tiny ViT's image-classification head (ImageNet's 1000, in miniature)
HALF = [0.5, 0.5, 0.5]


def tiny_cfg(**overrides) -> TimeSformerConfig:
    return variant_config("timesformer_tiny", **{**TINY, **overrides})


def put_repo(cache: Path, repo: str, files: dict[str, bytes], *, revision: str = "main",
             commit: str | None = None) -> Path:
    """One revision of a repository in the cache; returns its snapshot folder."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    commit = commit or hashlib.sha1(repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items()))
                                    .encode()).hexdigest()
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (folder / "blobs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / revision).write_text(commit)
    return snapshot


def safetensors_bytes(state: dict[str, torch.Tensor], tmp: Path) -> bytes:
    from safetensors.torch import save_file

    path = tmp / "staging.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    data = path.read_bytes()
    path.unlink()
    return data


def torch_bytes(obj, tmp: Path) -> bytes:
    path = tmp / "staging.bin"
    torch.save(obj, path)
    data = path.read_bytes()
    path.unlink()
    return data


def tiny_vit_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """An image ViT's state dict under timm's key names (cls_token, pos_embed, patch_embed.proj, blocks.i.{norm1,
    attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm, head): a space-only TimeSformer is exactly that."""
    torch.manual_seed(seed)
    vit = TimeSformer(tiny_cfg(attention_type="space_only", num_classes=IMAGENET_CLASSES))
    return {k: v.detach().clone() for k, v in vit.state_dict().items()}


def timm_config(mean=HALF, std=HALF) -> dict:
    """The config.json timm writes to the hub (its pretrained_cfg carries the normalisation)."""
    return {"architecture": "vit_base_patch16_224", "num_classes": IMAGENET_CLASSES, "num_features": TINY["embed_dim"],
            "global_pool": "token",
            "pretrained_cfg": {"tag": "orig_in21k_ft_in1k", "custom_load": False, "input_size": [3, 16, 16],
                               "fixed_input_size": True, "interpolation": "bicubic", "crop_pct": 0.9,
                               "crop_mode": "center", "mean": list(mean), "std": list(std),
                               "num_classes": IMAGENET_CLASSES, "pool_size": None, "first_conv": "patch_embed.proj",
                               "classifier": "head"}}


def put_timm_vit(cache: Path, repo: str, tmp: Path, *, mean=HALF, std=HALF, state=None) -> Path:
    state = state or tiny_vit_state()
    return put_repo(cache, repo, {"model.safetensors": safetensors_bytes(state, tmp),
                                  "config.json": json.dumps(timm_config(mean, std)).encode()})


def hf_timesformer(seed: int = 1):
    """A tiny transformers ``TimesformerForVideoClassification`` that fits ``tiny_cfg()``."""
    from transformers import TimesformerConfig, TimesformerForVideoClassification

    torch.manual_seed(seed)
    cfg = tiny_cfg()
    model = TimesformerForVideoClassification(TimesformerConfig(**hf_config_dict(cfg))).eval()
    with torch.no_grad():  # HF starts temporal_dense random and the time embedding at zero: make every weight count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def put_hf_timesformer(cache: Path, repo: str, tmp: Path, model, *, weights: str = "model.safetensors") -> Path:
    """The repository ``save_pretrained`` writes (config.json, model.safetensors), with the preprocessor config
    the facebook/ repositories carry; ``weights="pytorch_model.bin"``: the older torch.save file instead."""
    staging = tmp / "hf-staging"
    model.save_pretrained(staging)
    files = {"config.json": (staging / "config.json").read_bytes(),
             "preprocessor_config.json": json.dumps(hf_preprocessor_dict(tiny_cfg())).encode()}
    if weights == "model.safetensors":
        files[weights] = (staging / "model.safetensors").read_bytes()
    else:
        files[weights] = torch_bytes({k: v.detach().clone() for k, v in model.state_dict().items()}, tmp)
    return put_repo(cache, repo, files)

"""The model registry: every model a recipe can name, by family, in this one file.

A *family* is an architecture with its own configuration (a frozen dataclass, torch-free, so that the run config
and the launcher read it without torch) and its own code: how to build it, its FLOPs per view and parameter count
in the paper's accounting (fvcore's: one multiply-add is one FLOP), and its converters (foreign checkpoint layouts
to ours). The torch side is named by ``"module:attribute"`` strings and imported on first use, so this file
imports no model code. A model built by any family follows one contract (what the trainer, the exporter and
predict rely on):

- ``model.cfg``: its config, which carries the input normalisation (``mean``/``std``) and ``num_classes``,
  ``num_frames``, ``img_size``, ``in_chans``, ``multi_label``;
- ``forward((B, C, T, H, W) normalised) -> (B, classes)`` logits; ``forward_features`` -> ``(B, features)``;
  the classifier is ``model.head`` (parameters ``head.*``);
- ``checkpoint_units()``: the modules activation checkpointing wraps (each honours a ``checkpoint_fn``);
- ``layer_of(name)`` and ``num_layers``: a parameter's depth for layer-wise learning-rate decay;
- ``no_weight_decay()``: parameter names a recipe may exempt from weight decay.

A *model* (what ``model.variant`` names) is a family plus field overrides and, optionally, the weights
``create_model(name, pretrained=True)`` starts from. Registering one is a decorated function here, the timm way::

    @register_model(family="resnet3d")
    def i3d_r50():
        \"\"\"I3D 8x8 R50 (paper Table 2)\"\"\"
        return dict(num_frames=8, img_size=224)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from pipeline.models.config import TimeSformerConfig
from pipeline.models.resnet3d_config import RESNET3D_VARIANTS, ResNet3DConfig


def _resolve(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Family:
    """An architecture: its config class and where its code is (``module:attribute``, imported on use)."""

    name: str
    description: str
    config: type  # a frozen dataclass with to_dict() / from_dict(d, where)
    model: str  # the nn.Module class, built as cls(config)
    flops: str  # flops_per_view(config, num_frames=None, img_size=None) -> multiply-adds per view
    params: str  # parameter_count(config) -> int, without building the model
    # (model, state dict or path, *, reset_head) -> the model with those weights, any layout the family converts
    load: str
    # the checkpoint layouts the family's loader converts, for messages and the docs
    converters: tuple[str, ...] = ()
    # what activation checkpointing wraps, in words (the units are model.checkpoint_units())
    checkpoint_units: str = ""
    # (config) -> {name: shape} of the model's state dict, computed without building it: a file's tensors are
    # checked against it before a model is built from the file's metadata
    shapes: str = ""

    def field_names(self) -> set[str]:
        return {f.name for f in fields(self.config)}

    def build(self, cfg: Any) -> Any:
        return _resolve(self.model)(cfg)

    def flops_per_view(self, cfg: Any, **kwargs: Any) -> int:
        return int(_resolve(self.flops)(cfg, **kwargs))

    def parameter_count(self, cfg: Any) -> int:
        return int(_resolve(self.params)(cfg))

    def state_shapes(self, cfg: Any) -> dict[str, tuple[int, ...]] | None:
        return _resolve(self.shapes)(cfg) if self.shapes else None

    def load_weights(self, model: Any, source: Any, **kwargs: Any) -> Any:
        return _resolve(self.load)(model, source, **kwargs)


@dataclass(frozen=True)
class Variant:
    """A registered model: a family, field overrides, and the weights ``create_model(..., pretrained=True)``
    starts from (a model source: ``hf-hub:``, ``s3://`` or a path, pipeline.models.hub; "" where there are none)."""

    description: str
    overrides: dict[str, Any] = field(default_factory=dict)
    pretrained: str = ""
    family: str = "timesformer"


FAMILIES: dict[str, Family] = {}
MODELS: dict[str, Variant] = {}


def register_family(family: Family) -> Family:
    """Add an architecture. Its config may share a field with another family's only with the same type (the run
    config's model section holds the union of all families' fields)."""
    if family.name in FAMILIES:
        raise ValueError(f"model family {family.name!r} is registered twice")
    for other in FAMILIES.values():
        theirs = {f.name: f.type for f in fields(other.config)}
        clash = [f.name for f in fields(family.config) if f.name in theirs and theirs[f.name] != f.type]
        if clash:
            raise ValueError(f"family {family.name!r}: field(s) {clash} have another type in family {other.name!r}; "
                             "a shared field must mean the same thing: rename them")
    FAMILIES[family.name] = family
    return family


def register_model(name: str | None = None, *, family: str, pretrained: str = "") -> Callable:
    """Decorator: the function returns the model's field overrides; its name (or ``name``) is the model's name,
    its docstring's first line the description. The overrides are checked against the family's config now."""

    def add(fn: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
        key = name or fn.__name__
        if key in MODELS:
            raise ValueError(f"model {key!r} is registered twice")
        if family not in FAMILIES:
            raise ValueError(f"model {key!r}: unknown family {family!r}; known: {', '.join(FAMILIES)}")
        overrides = dict(fn())
        FAMILIES[family].config.from_dict(overrides, where=f"model {key}")  # a bad entry fails at import
        MODELS[key] = Variant((fn.__doc__ or key).strip().splitlines()[0], overrides, pretrained, family)
        return fn

    return add


def family_of(what: Any) -> Family:
    """The family of a model name, a config, or a model (its ``cfg``, through training's wrappers)."""
    if isinstance(what, str):
        if what not in MODELS:
            raise ValueError(f"unknown model variant {what!r}; registered: {', '.join(MODELS)} "
                             "(pipeline.models.registry)")
        return FAMILIES[MODELS[what].family]
    for _ in range(4):
        for fam in FAMILIES.values():
            if isinstance(what, fam.config):
                return fam
        what = getattr(what, "cfg", None) or getattr(what, "module", None)
        if what is None:
            break
    raise ValueError("not a registered model or model config; registered families: " + ", ".join(FAMILIES))


def model_config_of(name: str, **overrides: Any) -> Any:
    """The config of a registered model with field overrides, in its family's config class."""
    fam = family_of(name)
    return fam.config.from_dict({**MODELS[name].overrides, **overrides}, where=f"model {name}")


def model_config(cfg: Any) -> Any:
    """The model of a run config (``pipeline.config.RunConfig``): its registered model (``model.variant``), with
    every field of that family the recipe sets (``model.*``; None: the model's own) and the data's frames and crop."""
    m = cfg.model
    fam = family_of(m.variant)
    own = {name: getattr(m, name) for name in fam.field_names() if getattr(m, name, None) is not None}
    return model_config_of(m.variant, **{**own, "num_frames": cfg.data.num_frames, "img_size": cfg.data.crop})


variant_config = model_config_of  # the name of earlier versions, when TimeSformer's variants were the only models


def build(cfg: Any) -> Any:
    """The model of a config of any family (random weights)."""
    return family_of(cfg).build(cfg)


def flops_per_view(cfg: Any, **kwargs: Any) -> int:
    """Multiply-adds per view of a config of any family (the paper's FLOPs)."""
    return family_of(cfg).flops_per_view(cfg, **kwargs)


def parameter_count(cfg: Any) -> int:
    """Parameters of a config of any family, without building it."""
    return family_of(cfg).parameter_count(cfg)


def scheme_of(cfg: Any) -> str:
    """How a model mixes time, in a word for tables and logs: a TimeSformer's attention scheme
    (``divided_space_time``...), else its family (``resnet3d``: 3D convolutions)."""
    return getattr(cfg, "attention_type", None) or family_of(cfg).name


def model_table() -> list[str]:
    """The registered models as printed lines (``jobs/launch.py --list-models``): family, clip, classes, parameters,
    GFLOPs per view at the model's own clip, input normalisation and default weights."""
    lines = [f"{'model':18s} {'family':12s} {'clip':>8s} {'classes':>7s} {'params':>8s} {'GFLOPs/view':>11s}  "
             "mean / std, default weights: description"]
    for name, v in MODELS.items():
        cfg = model_config_of(name)
        norm = f"{'/'.join(f'{x:g}' for x in cfg.mean)} / {'/'.join(f'{x:g}' for x in cfg.std)}"
        lines.append(f"{name:18s} {v.family:12s} {cfg.num_frames:>3d}x{cfg.img_size:<4d} {cfg.num_classes:>7d} "
                     f"{parameter_count(cfg) / 1e6:7.2f}M {flops_per_view(cfg) / 1e9:11.2f}  {norm}, "
                     f"{v.pretrained or 'none'}: {v.description}")
    return lines


def config_from_dict(family: str, d: dict[str, Any], where: str) -> Any:
    """A family's config from its ``to_dict()`` (a safetensors file's metadata, a Ray actor's arguments)."""
    if family not in FAMILIES:
        raise ValueError(f"{where}: unknown model family {family!r}; this version knows {', '.join(FAMILIES)} "
                         "(a file written by a newer version?)")
    return FAMILIES[family].config.from_dict(d, where=where)


# ---------------------------------------------------------------------------------------------------
# Families

register_family(Family(
    "timesformer", "TimeSformer: ViT-B/16 over frames with space-time attention (Bertasius et al., ICML 2021)",
    TimeSformerConfig, model="pipeline.models.timesformer:TimeSformer",
    flops="pipeline.models.flops:flops_per_view", params="pipeline.models.flops:parameter_count",
    load="pipeline.models.convert:load_checkpoint",
    converters=("ours", "official (TimeSformer .pyth)", "hf (TimesformerForVideoClassification)",
                "timm_vit (an image ViT, inflated)"),
    checkpoint_units="each transformer block"))
register_family(Family(
    "resnet3d", "3D ResNets of the paper's Table 2 (I3D, Slow; Feichtenhofer et al., PySlowFast's definitions)",
    ResNet3DConfig, model="pipeline.models.resnet3d:ResNet3D",
    flops="pipeline.models.resnet3d:flops_per_view", params="pipeline.models.resnet3d:parameter_count",
    load="pipeline.models.resnet3d:load_checkpoint",
    converters=("ours", "pyslowfast (PySlowFast .pyth)", "resnet2d (a timm/torchvision ImageNet ResNet, inflated)"),
    checkpoint_units="each residual block", shapes="pipeline.models.resnet3d:state_shapes"))

# ---------------------------------------------------------------------------------------------------
# Models

# The paper's ImageNet start (ImageNet-21k, fine-tuned on 1k: the original's jx_vit_base_p16_224-80ecf9dd.pth)
IMAGENET_VIT = "hf-hub:timm/vit_base_patch16_224.orig_in21k_ft_in1k"
# The ImageNet-1k ResNet-50 an I3D inflates (the paper's Table 2 baselines start from ImageNet-1k)
IMAGENET_RESNET50 = "hf-hub:timm/resnet50.tv_in1k"


@register_model(family="timesformer", pretrained="hf-hub:facebook/timesformer-base-finetuned-k400")
def timesformer_base():
    """TimeSformer 8x224, ViT-B/16, divided space-time (paper Table 5)"""
    return dict(num_frames=8, img_size=224)


@register_model(family="timesformer", pretrained="hf-hub:facebook/timesformer-hr-finetuned-k400")
def timesformer_hr():
    """TimeSformer-HR 16x448, ViT-B/16"""
    return dict(num_frames=16, img_size=448)


# facebook/ publishes no TimeSformer-L (a third-party conversion exists: fcakyon/timesformer-large-finetuned-k400,
# see docs/model.md); the default is the paper's start, the ImageNet ViT inflated to 96 frames
@register_model(family="timesformer", pretrained=IMAGENET_VIT)
def timesformer_l():
    """TimeSformer-L 96x224, ViT-B/16"""
    return dict(num_frames=96, img_size=224)


@register_model(family="timesformer")
def timesformer_tiny():
    """tiny test/demo model: 4 frames of 32x32, 8x8 patches, 2 blocks of width 64"""
    return dict(num_frames=4, img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10,
                drop_path_rate=0.0)


# ImageNet's statistics, which the ImageNet ResNet-50 the 3D CNNs start from was trained with (a model carries the
# normalisation of its weights; PySlowFast's own 0.45 / 0.225 is the config's default for other starts)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _resnet3d(name: str, **overrides: Any) -> dict[str, Any]:
    return {**RESNET3D_VARIANTS[name], **overrides}


@register_model(family="resnet3d", pretrained=IMAGENET_RESNET50)
def i3d_r50():
    """I3D 8x8 R50: inflated 3D ResNet-50, 8 frames at rate 8 (paper Table 2: 28.0M, 1.11 TFLOPs = 30 views of 8x256)"""
    return _resnet3d("i3d_r50", mean=IMAGENET_MEAN, std=IMAGENET_STD)


@register_model(family="resnet3d", pretrained=IMAGENET_RESNET50)
def slow_r50():
    """Slow 8x8 R50: the SlowFast network's slow pathway alone, temporal kernels in res4-res5 only"""
    return _resnet3d("slow_r50", mean=IMAGENET_MEAN, std=IMAGENET_STD)


@register_model(family="resnet3d")
def i3d_tiny():
    """tiny 3D-CNN test/demo model: I3D's anatomy, one block per stage, 4 frames of 32x32"""
    return _resnet3d("i3d_tiny")


# TimeSformer's own models (the name of earlier versions, when they were the only ones)
VARIANTS: dict[str, Variant] = {name: v for name, v in MODELS.items() if v.family == "timesformer"}

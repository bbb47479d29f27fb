"""3D ResNets (I3D, Slow) as PySlowFast defines them: the model, its cost in the paper's convention, converters.

The network (``slowfast/models/video_model_builder.py`` ``ResNet``, one pathway, no non-local blocks):

- stem: ``kt x 7 x 7`` convolution, stride ``1 x 2 x 2`` (temporal padding ``kt // 2``), BatchNorm, ReLU,
  ``1 x 3 x 3`` max-pool of stride ``1 x 2 x 2``;
- stages res2..res5 of bottleneck blocks: ``kt x 1 x 1`` (inner width), ``1 x 3 x 3`` (carrying the spatial stride:
  1 in res2, 2 later; PySlowFast's STRIDE_1X1 False), ``1 x 1 x 1`` (x4 width), each followed by BatchNorm, and a
  ``1 x 1 x 1`` projection shortcut (with the spatial stride) where the shape changes; ``kt`` cycles per stage
  (``ResNet3DConfig.temporal_kernels``); there is no temporal stride anywhere;
- I3D only: a ``2 x 1 x 1`` temporal max-pool after res2;
- head: global average pool, dropout, linear classifier.

Costs (``flops_per_view``) are multiply-adds, fvcore's convention (one multiply-add is one FLOP), over the
convolutions and the classifier. The published numbers leave BatchNorm out: with the view PySlowFast tests on
(8 frames at 256 x 256) the convolutions and classifier alone give I3D 37.10 GFLOPs (x 30 views = 1.113 TFLOPs, the
paper's 1.11) and Slow 54.52 GFLOPs (the SlowFast paper's 54.52); fvcore's eval-mode BatchNorm rule (2 per element
with an affine) would add 0.17 / 0.23 GFLOPs (1.118 TFLOPs for I3D). ``include_batchnorm=True`` adds it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.models.resnet3d_config import RESNET3D_VARIANTS, ResNet3DConfig, resnet3d_variant_config

__all__ = [
    "RESNET3D_VARIANTS", "ResNet3DConfig", "resnet3d_variant_config",
    "ResNet3D", "Bottleneck3D", "Stem3D", "build",
    "flops_per_view", "cost_per_view", "CostBreakdown", "parameter_count", "state_shapes",
    "FORMATS", "fit_state_dict", "inflate_resnet2d", "from_pyslowfast", "to_pyslowfast", "detect_format", "convert",
    "load_checkpoint",
]

BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
BN_FLOPS_PER_ELEMENT = 2  # fvcore's eval-mode BatchNorm with an affine: scale and shift
HEAD_INIT_STD = 0.01  # PySlowFast's MODEL.FC_INIT_STD


# ---------------------------------------------------------------------------------------------------
# The model


class BatchNorm3d(nn.BatchNorm3d):
    """BatchNorm that normalises in float32 whatever the activations' dtype, and returns theirs: mixed precision's
    usual rule, and what DeepSpeed's bf16/fp16 needs (it casts parameters to half precision but keeps buffers in
    float32, and a half-precision batch norm with float32 statistics fails). Two switches, set from outside:

    - ``frozen``: the statistics are not updated and the running ones normalise, in training too (a frozen
      backbone, ``train.freeze=backbone``: a linear probe must not change what it probes);
    - ``keep_stats``: one pass that must not update the running statistics (activation checkpointing's recompute of
      a block in the backward pass: the forward updated them already; ``Bottleneck3D``).

    The parameter and buffer names are nn.BatchNorm3d's (checkpoints load either way)."""

    frozen: bool = False
    keep_stats: bool = False
    scratch: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def spare_statistics(self) -> None:
        """Copies of the statistics for a recompute to update instead (made outside the checkpointed region: the
        recompute must run the very ops the forward ran, or torch's checkpoint refuses it)."""
        self.scratch = (self.running_mean.clone(), self.running_var.clone(), self.num_batches_tracked.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        use_batch = self.training and not self.frozen
        mean, var, count = self.running_mean, self.running_var, self.num_batches_tracked
        if use_batch and self.keep_stats and self.scratch is not None:
            mean, var, count = self.scratch
        if use_batch:
            count.add_(1)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        factor = self.momentum if self.momentum is not None else 1.0 / max(int(count), 1)  # None: nn's cumulative
        out = F.batch_norm(x.float(), mean, var, weight, bias, use_batch, factor, self.eps)
        return out.to(x.dtype)


def _bn(channels: int, eps: float) -> BatchNorm3d:
    return BatchNorm3d(channels, eps=eps)


class Stem3D(nn.Module):
    """``kt x 7 x 7`` convolution (stride ``1 x 2 x 2``), BatchNorm, ReLU, ``1 x 3 x 3`` max-pool (stride 2)."""

    def __init__(self, cfg: ResNet3DConfig):
        super().__init__()
        kt = cfg.stem_temporal_kernel
        self.conv = nn.Conv3d(cfg.in_chans, cfg.stem_width, (kt, 7, 7), stride=(1, 2, 2), padding=(kt // 2, 3, 3),
                              bias=False)
        self.bn = _bn(cfg.stem_width, cfg.bn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)), inplace=True)
        return F.max_pool3d(x, kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))


class Bottleneck3D(nn.Module):
    """``kt x 1 x 1`` -> ``1 x 3 x 3`` (spatial stride) -> ``1 x 1 x 1``, each with BatchNorm, plus the shortcut
    (a strided ``1 x 1 x 1`` projection with BatchNorm where the shape changes), then ReLU."""

    def __init__(self, dim_in: int, dim_inner: int, dim_out: int, temporal_kernel: int, stride: int, eps: float):
        super().__init__()
        kt = temporal_kernel
        self.conv1 = nn.Conv3d(dim_in, dim_inner, (kt, 1, 1), padding=(kt // 2, 0, 0), bias=False)
        self.bn1 = _bn(dim_inner, eps)
        self.conv2 = nn.Conv3d(dim_inner, dim_inner, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1),
                               bias=False)
        self.bn2 = _bn(dim_inner, eps)
        self.conv3 = nn.Conv3d(dim_inner, dim_out, 1, bias=False)
        self.bn3 = _bn(dim_out, eps)
        if dim_in != dim_out or stride != 1:
            self.shortcut_conv: nn.Conv3d | None = nn.Conv3d(dim_in, dim_out, 1, stride=(1, stride, stride),
                                                             bias=False)
            self.shortcut_bn: nn.BatchNorm3d | None = _bn(dim_out, eps)
        else:
            self.shortcut_conv = self.shortcut_bn = None
        self.temporal_kernel = kt
        self.stride = stride
        # Set from outside by activation checkpointing (checkpoint_fn(function, *tensors)); None runs plainly.
        self.checkpoint_fn: Callable[..., torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_fn is not None and torch.is_grad_enabled():
            norms = [m for m in self.modules() if isinstance(m, BatchNorm3d)]
            for m in norms:
                m.spare_statistics()
            calls = [0]

            def body(x: torch.Tensor) -> torch.Tensor:
                calls[0] += 1
                if calls[0] == 1:
                    return self._forward(x)
                # the recompute in the backward pass: the same batch statistics, and the running ones, which the
                # forward updated already, left alone (the spare copies take the second update)
                for m in norms:
                    m.keep_stats = True
                try:
                    return self._forward(x)
                finally:
                    for m in norms:
                        m.keep_stats = False

            return self.checkpoint_fn(body, x)  # the tensor positional, for reentrant implementations
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        shortcut = x if self.shortcut_conv is None else self.shortcut_bn(self.shortcut_conv(x))
        return F.relu(out + shortcut, inplace=True)


class ResNet3D(nn.Module):
    """A single-pathway 3D ResNet (I3D, Slow): ``(B, C, T, H, W)`` normalised video -> ``(B, num_classes)`` logits.

    Parameter names: ``stem.*``, ``stages.<stage>.<block>.*`` (stages from 0 = res2), ``head.*`` (the classifier).
    Global average pooling makes any frame count (at least ``temporal_pool``) and frame size work.
    """

    def __init__(self, cfg: ResNet3DConfig):
        super().__init__()
        if not isinstance(cfg, ResNet3DConfig):
            raise TypeError(f"ResNet3D needs a ResNet3DConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.stem = Stem3D(cfg)
        stages = []
        dim_in = cfg.stem_width
        widths = zip(cfg.stage_blocks, cfg.stage_inner_widths, cfg.stage_widths, strict=True)
        for s, (n, inner, out) in enumerate(widths):
            blocks = []
            for b in range(n):
                stride = 2 if (s > 0 and b == 0) else 1
                blocks.append(Bottleneck3D(dim_in, inner, out, cfg.block_temporal_kernel(s, b), stride, cfg.bn_eps))
                dim_in = out
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.head_drop = nn.Dropout(cfg.head_dropout)
        self.head: nn.Module = nn.Linear(cfg.feature_dim, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.reset_parameters()

    # -- initialisation and the generic interface ---------------------------------------------------------

    def reset_parameters(self) -> None:
        """PySlowFast's initialisation (``init_weights``): He-normal (fan-out) convolutions, BatchNorm scale 1 and
        shift 0 with fresh statistics, the last BatchNorm of each block at scale 0 (``zero_init_residual``: every
        block starts as the identity), a normal(0.01) classifier with zero bias."""
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                m.reset_running_stats()
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.cfg.zero_init_residual:
            for blk in self.checkpoint_units():
                nn.init.zeros_(blk.bn3.weight)
        if isinstance(self.head, nn.Linear):
            nn.init.normal_(self.head.weight, std=HEAD_INIT_STD)
            nn.init.zeros_(self.head.bias)

    def checkpoint_units(self) -> list[Bottleneck3D]:
        """The residual blocks in order: what activation checkpointing wraps (each honours ``checkpoint_fn``)."""
        return [blk for stage in self.stages for blk in stage]

    @property
    def num_layers(self) -> int:
        """Layers for layer-wise learning-rate decay: the stem (0), one per block (1..blocks); the head is this."""
        return self.cfg.num_blocks + 1

    def layer_of(self, name: str) -> int:
        """A parameter's layer for layer-wise learning-rate decay: 0 for the stem, ``k + 1`` for the ``k``-th
        block overall (stage by stage), ``num_layers`` for the head and anything else."""
        if name.startswith("stem."):
            return 0
        m = re.match(r"stages\.(\d+)\.(\d+)\.", name)
        if m:
            stage, block = int(m.group(1)), int(m.group(2))
            if stage < self.cfg.num_stages and block < self.cfg.stage_blocks[stage]:
                return sum(self.cfg.stage_blocks[:stage]) + block + 1
        return self.num_layers

    def no_weight_decay(self) -> set[str]:
        """The BatchNorm scales and shifts: PySlowFast trains them without weight decay (BN.WEIGHT_DECAY 0.0)."""
        return {f"{mod}.{p}" for mod, m in self.named_modules() if isinstance(m, nn.BatchNorm3d)
                for p, _ in m.named_parameters(recurse=False)}

    # -- forward --------------------------------------------------------------------------------------

    def feature_map(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        """The last stage's output, ``(B, feature_dim, T', H', W')`` (``T' = T // temporal_pool``, ``H' ~ H / 32``)."""
        cfg = self.cfg
        if video_BCTHW.ndim != 5 or video_BCTHW.shape[1] != cfg.in_chans:
            raise ValueError(
                f"ResNet3D expects video as (B, C={cfg.in_chans}, T, H, W); got shape {tuple(video_BCTHW.shape)}")
        if video_BCTHW.shape[2] < cfg.temporal_pool:
            raise ValueError(f"ResNet3D needs at least temporal_pool={cfg.temporal_pool} frames; got "
                             f"{video_BCTHW.shape[2]}")
        x = self.stem(video_BCTHW)
        for s, stage in enumerate(self.stages):
            x = stage(x)
            if s == 0 and cfg.temporal_pool > 1:
                x = F.max_pool3d(x, kernel_size=(cfg.temporal_pool, 1, 1), stride=(cfg.temporal_pool, 1, 1))
        return x

    def forward_features(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled features, ``(B, feature_dim)`` (before dropout and the classifier)."""
        return self.feature_map(video_BCTHW).mean(dim=(2, 3, 4))

    def forward(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.forward_features(video_BCTHW)))


def build(cfg: ResNet3DConfig) -> ResNet3D:
    """The model of a config, with PySlowFast's initialisation."""
    return ResNet3D(cfg)


# ---------------------------------------------------------------------------------------------------
# Layers, parameters and FLOPs from the config alone


@dataclass(frozen=True)
class _Conv:
    name: str  # our parameter prefix, e.g. "stages.0.1.conv1"
    c_in: int
    c_out: int
    kernel: tuple[int, int, int]
    bn: str  # the BatchNorm after it


def _convs(cfg: ResNet3DConfig) -> Iterator[_Conv]:
    """Every convolution of ``ResNet3D(cfg)``, in order."""
    yield _Conv("stem.conv", cfg.in_chans, cfg.stem_width, (cfg.stem_temporal_kernel, 7, 7), "stem.bn")
    dim_in = cfg.stem_width
    for s, (n, inner, out) in enumerate(zip(cfg.stage_blocks, cfg.stage_inner_widths, cfg.stage_widths, strict=True)):
        for b in range(n):
            p, stride = f"stages.{s}.{b}", (2 if (s > 0 and b == 0) else 1)
            yield _Conv(f"{p}.conv1", dim_in, inner, (cfg.block_temporal_kernel(s, b), 1, 1), f"{p}.bn1")
            yield _Conv(f"{p}.conv2", inner, inner, (1, 3, 3), f"{p}.bn2")
            yield _Conv(f"{p}.conv3", inner, out, (1, 1, 1), f"{p}.bn3")
            if dim_in != out or stride != 1:  # the shape changes: a projection shortcut (Bottleneck3D's rule)
                yield _Conv(f"{p}.shortcut_conv", dim_in, out, (1, 1, 1), f"{p}.shortcut_bn")
            dim_in = out


def state_shapes(cfg: ResNet3DConfig, include_buffers: bool = True) -> dict[str, tuple[int, ...]]:
    """The state dict of ``ResNet3D(cfg)``, name -> shape, computed from the config (no model is built).
    With ``include_buffers`` the BatchNorm statistics are in it (``num_batches_tracked`` has shape ``()``)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for conv in _convs(cfg):
        shapes[f"{conv.name}.weight"] = (conv.c_out, conv.c_in, *conv.kernel)
        for p in ("weight", "bias"):
            shapes[f"{conv.bn}.{p}"] = (conv.c_out,)
        if include_buffers:
            shapes.update({f"{conv.bn}.running_mean": (conv.c_out,), f"{conv.bn}.running_var": (conv.c_out,),
                           f"{conv.bn}.num_batches_tracked": ()})
    if cfg.num_classes:
        shapes["head.weight"] = (cfg.num_classes, cfg.feature_dim)
        shapes["head.bias"] = (cfg.num_classes,)
    return shapes


def parameter_count(cfg: ResNet3DConfig, include_head: bool = True) -> int:
    """Parameters (convolutions, BatchNorm scales and shifts, classifier) of a config, without building it."""
    total = 0
    for name, shape in state_shapes(cfg, include_buffers=False).items():
        if include_head or not name.startswith("head."):
            n = 1
            for d in shape:
                n *= d
            total += n
    return total


def _down(n: int) -> int:
    """Output length of the stride-2 layers here (k7 p3, k3 p1, k1 p0): ``ceil(n / 2)``."""
    return (n - 1) // 2 + 1


@dataclass(frozen=True)
class CostBreakdown:
    """Multiply-adds per view, by part; ``batchnorm`` is fvcore's eval-mode count (2 per element)."""

    conv: int
    head: int
    batchnorm: int

    def total(self, include_batchnorm: bool = False) -> int:
        return self.conv + self.head + (self.batchnorm if include_batchnorm else 0)


def cost_per_view(cfg: ResNet3DConfig, num_frames: int | None = None,
                  img_size: int | tuple[int, int] | None = None) -> CostBreakdown:
    """Multiply-adds of one clip of ``num_frames`` frames at ``img_size`` (int or (H, W); defaults: the config's),
    layer by layer as the model runs it (zero padding keeps the frame count; the I3D pool halves it after res2)."""
    t = num_frames or cfg.num_frames
    if img_size is None:
        h = w = cfg.img_size
    else:
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    if t < cfg.temporal_pool:
        raise ValueError(f"cost_per_view: {t} frames, fewer than temporal_pool={cfg.temporal_pool}")
    convs = {layer.name: layer for layer in _convs(cfg)}
    conv = bn = 0

    def add(name: str, frames: int, hh: int, ww: int) -> None:  # a convolution and its BatchNorm at this output size
        nonlocal conv, bn
        layer = convs[name]
        out_elems = layer.c_out * frames * hh * ww
        conv += out_elems * layer.c_in * layer.kernel[0] * layer.kernel[1] * layer.kernel[2]
        bn += BN_FLOPS_PER_ELEMENT * out_elems

    h, w = _down(h), _down(w)  # stem convolution, stride 2
    add("stem.conv", t, h, w)
    h, w = _down(h), _down(w)  # stem max-pool
    for s, n in enumerate(cfg.stage_blocks):
        for b in range(n):
            p = f"stages.{s}.{b}"
            add(f"{p}.conv1", t, h, w)
            if s > 0 and b == 0:
                h, w = _down(h), _down(w)
            add(f"{p}.conv2", t, h, w)
            add(f"{p}.conv3", t, h, w)
            if f"{p}.shortcut_conv" in convs:
                add(f"{p}.shortcut_conv", t, h, w)
        if s == 0:
            t //= cfg.temporal_pool
    return CostBreakdown(conv=conv, head=cfg.feature_dim * cfg.num_classes, batchnorm=bn)


def flops_per_view(cfg: ResNet3DConfig, num_frames: int | None = None, img_size: int | tuple[int, int] | None = None,
                   include_batchnorm: bool = False) -> int:
    """The paper's FLOPs (multiply-adds) for one view: convolutions and classifier, BatchNorm left out as in the
    published numbers (``include_batchnorm``: add fvcore's eval-mode BatchNorm count)."""
    return cost_per_view(cfg, num_frames, img_size).total(include_batchnorm)


# ---------------------------------------------------------------------------------------------------
# Checkpoints: fitting a state dict to a config, and the foreign layouts

StateDict = dict[str, torch.Tensor]

# Our block parts <-> PySlowFast's (slowfast/models/resnet_helper.py ResBlock / BottleneckTransform)
_PYSLOWFAST_PARTS = {"conv1": "branch2.a", "bn1": "branch2.a_bn", "conv2": "branch2.b", "bn2": "branch2.b_bn",
                     "conv3": "branch2.c", "bn3": "branch2.c_bn", "shortcut_conv": "branch1",
                     "shortcut_bn": "branch1_bn"}
_FROM_PYSLOWFAST_PARTS = {v: k for k, v in _PYSLOWFAST_PARTS.items()}
# Our block parts <- a torchvision/timm ResNet's (torchvision.models.resnet Bottleneck, timm's resnet.py)
_RESNET2D_PARTS = {"conv1": "conv1", "bn1": "bn1", "conv2": "conv2", "bn2": "bn2", "conv3": "conv3", "bn3": "bn3",
                   "downsample.0": "shortcut_conv", "downsample.1": "shortcut_bn"}

_OURS_BLOCK = re.compile(r"stages\.(\d+)\.(\d+)\.(conv[123]|bn[123]|shortcut_conv|shortcut_bn)\.(\w+)")
_PYSLOWFAST_BLOCK = re.compile(r"s(\d+)\.pathway0_res(\d+)\.(branch2\.[abc]|branch2\.[abc]_bn|branch1|branch1_bn)"
                               r"\.(\w+)")
_RESNET2D_BLOCK = re.compile(r"layer(\d+)\.(\d+)\.(conv[123]|bn[123]|downsample\.[01])\.(\w+)")


def _describe(cfg: ResNet3DConfig) -> str:
    return (f"ResNet3D(stage_blocks={list(cfg.stage_blocks)}, width {cfg.bottleneck_width}, "
            f"temporal_kernels={[list(c) for c in cfg.temporal_kernels]}, {cfg.num_classes} classes)")


def _unwrap(state: Mapping[str, Any]) -> dict[str, Any]:
    """The weights of a checkpoint dict (PySlowFast's ``model_state``, else ``state_dict`` / ``model``), without a
    DistributedDataParallel ``module.`` prefix."""
    for key in ("model_state", "state_dict", "model"):
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    state = dict(state)
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _fresh_head(cfg: ResNet3DConfig) -> StateDict:
    """A new classifier, initialised as ``ResNet3D.reset_parameters`` does (normal(0.01), zero bias)."""
    if not cfg.num_classes:
        return {}
    return {"head.weight": torch.randn(cfg.num_classes, cfg.feature_dim) * HEAD_INIT_STD,
            "head.bias": torch.zeros(cfg.num_classes)}


def fit_state_dict(state: Mapping[str, torch.Tensor], cfg: ResNet3DConfig, where: str = "checkpoint", *,
                   reset_head: bool = False) -> StateDict:
    """Check ``state`` (our key names) against ``ResNet3D(cfg)`` and return a state dict a strict load takes, or
    raise ``CheckpointMismatchError`` naming every missing, unexpected and mis-shaped key.

    BatchNorm ``num_batches_tracked`` counters a checkpoint lacks (PySlowFast's Caffe2 conversions, torchvision's
    ImageNet files) are filled with 0: they only matter to BatchNorm with ``momentum=None``. ``reset_head``: a head
    that is missing or does not fit (another class count) is replaced by a fresh one."""
    from pipeline.models.convert import CheckpointMismatchError, mismatch_lines, require_tensors

    require_tensors(state, where)
    want = state_shapes(cfg)
    out: StateDict = {}
    shape_errors, unexpected = [], []
    for key, value in state.items():
        if key not in want:
            if not (reset_head and key.startswith("head.")):  # a features-only model drops a classifier
                unexpected.append(key)
        elif tuple(value.shape) == want[key]:
            out[key] = value
        elif not (reset_head and key.startswith("head.")):
            shape_errors.append(f"{key}: checkpoint {tuple(value.shape)} vs model {want[key]}")
    for key in want:
        if key.endswith(".num_batches_tracked") and key not in out and key not in state:
            out[key] = torch.zeros((), dtype=torch.long)
    if reset_head and not all(k in out for k in ("head.weight", "head.bias") if k in want):
        out.update(_fresh_head(cfg))
    missing = [k for k in want if k not in out and k not in state]
    if missing or unexpected or shape_errors:
        lines = mismatch_lines(f"{where} does not fit {_describe(cfg)}:", missing, unexpected, shape_errors)
        if not any(e.startswith("head.") for e in shape_errors) and (missing or unexpected):
            lines.append("  (another depth or block layout? check stage_blocks against the checkpoint's)")
        raise CheckpointMismatchError("\n".join(lines))
    return out


def _rename_all(state: Mapping[str, Any], rename: Callable[[str], str | None], where: str, layout: str) -> dict:
    """Apply ``rename`` to every key; keys it does not know (None) are named in one error."""
    from pipeline.models.convert import CheckpointMismatchError

    out, unknown = {}, []
    for key, value in state.items():
        new = rename(key) if isinstance(key, str) else None
        if new is None:
            unknown.append(str(key))
        else:
            out[new] = value
    if unknown:
        hint = ""
        if any("nonlocal" in k for k in unknown):
            hint = " (non-local blocks, as in I3D NLN, are not part of this family)"
        raise CheckpointMismatchError(
            f"{where}: {len(unknown)} key(s) are not part of {layout}{hint}: {', '.join(sorted(unknown))}")
    return out


def to_pyslowfast(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Our state dict in PySlowFast's names (``s1.pathway0_stem.conv.weight``, ``s2.pathway0_res0.branch2.a.weight``,
    ``head.projection.weight``): what its ``ResNet`` with the same config loads."""

    def rename(key: str) -> str | None:
        if key.startswith(("stem.conv.", "stem.bn.")):
            return "s1.pathway0_stem." + key[len("stem."):]
        if key.startswith("head."):
            return "head.projection." + key[len("head."):]
        m = _OURS_BLOCK.fullmatch(key)
        if m:
            return f"s{int(m.group(1)) + 2}.pathway0_res{m.group(2)}.{_PYSLOWFAST_PARTS[m.group(3)]}.{m.group(4)}"
        return None

    return _rename_all(state, rename, "state dict", "a ResNet3D")


def from_pyslowfast(state: Mapping[str, Any], cfg: ResNet3DConfig, where: str = "PySlowFast checkpoint", *,
                    reset_head: bool = False) -> StateDict:
    """A PySlowFast ``ResNet`` checkpoint (a ``.pyth`` dict with ``model_state``, or the state dict itself) in our
    names, checked against ``cfg`` (``fit_state_dict``). The stage and block numbers carry over: ``s<k>`` is
    ``stages.<k - 2>``, ``pathway0_res<b>`` block ``b``."""

    def rename(key: str) -> str | None:
        for ours, theirs in (("stem.conv.", "s1.pathway0_stem.conv."), ("stem.bn.", "s1.pathway0_stem.bn."),
                             ("head.", "head.projection.")):
            if key.startswith(theirs):
                return ours + key[len(theirs):]
        m = _PYSLOWFAST_BLOCK.fullmatch(key)
        if m and int(m.group(1)) >= 2:
            return f"stages.{int(m.group(1)) - 2}.{m.group(2)}.{_FROM_PYSLOWFAST_PARTS[m.group(3)]}.{m.group(4)}"
        return None

    return fit_state_dict(_rename_all(_unwrap(state), rename, where, "a PySlowFast ResNet"), cfg, where,
                          reset_head=reset_head)


def inflate_resnet2d(state: Mapping[str, Any], cfg: ResNet3DConfig,
                     where: str = "ImageNet ResNet checkpoint") -> StateDict:
    """A 2D ImageNet ResNet (torchvision's or timm's names: ``conv1``, ``bn1``, ``layer<k>.<b>.conv1``,
    ``...downsample.0/1``, ``fc``) inflated to ``cfg``'s 3D ResNet, the I3D rule: each ``kh x kw`` kernel is
    repeated ``kt`` times over time and divided by ``kt``, so that on a clip of identical frames every convolution
    gives the image model's response (away from the zero-padded first and last frames). BatchNorm carries over;
    the image classifier (``fc``) is dropped and the head starts fresh (normal(0.01), zero bias)."""

    def rename(key: str) -> str | None:
        if key.startswith("fc."):
            return ""  # dropped below
        if key == "conv1.weight":
            return "stem.conv.weight"
        if key.startswith("bn1."):
            return "stem.bn." + key[len("bn1."):]
        m = _RESNET2D_BLOCK.fullmatch(key)
        if m and int(m.group(1)) >= 1:
            return f"stages.{int(m.group(1)) - 1}.{m.group(2)}.{_RESNET2D_PARTS[m.group(3)]}.{m.group(4)}"
        return None

    renamed = _rename_all(_unwrap(state), rename, where, "a torchvision/timm ResNet")
    renamed.pop("", None)
    want = state_shapes(cfg)
    out = {}
    for key, value in renamed.items():
        target = want.get(key)
        if (isinstance(value, torch.Tensor) and value.ndim == 4 and target is not None and len(target) == 5
                and tuple(value.shape[:2]) == target[:2] and tuple(value.shape[2:]) == target[3:]):
            kt = target[2]
            value = value.unsqueeze(2).repeat(1, 1, kt, 1, 1) / kt
        out[key] = value
    out.update(_fresh_head(cfg))
    return fit_state_dict(out, cfg, where)


def detect_format(state: Mapping[str, Any]) -> str:
    """``ours``, ``pyslowfast`` or ``resnet2d`` (a torchvision/timm image ResNet), from the keys."""
    keys = set(_unwrap(state))
    if "stem.conv.weight" in keys:
        return "ours"
    if "s1.pathway0_stem.conv.weight" in keys:
        return "pyslowfast"
    if "conv1.weight" in keys and "layer1.0.conv1.weight" in keys:
        return "resnet2d"
    shown = ", ".join(sorted(str(k) for k in keys)[:8])
    raise ValueError(f"not a 3D ResNet checkpoint this version reads (ours: stem.conv.weight; PySlowFast: "
                     f"s1.pathway0_stem.conv.weight; an image ResNet: conv1.weight, layer1.0.conv1.weight); its keys "
                     f"begin {shown or '(none)'}")


FORMATS = ("ours", "pyslowfast", "resnet2d")


def convert(state: Mapping[str, Any], cfg: ResNet3DConfig, where: str = "checkpoint", *, fmt: str = "auto",
            reset_head: bool = False) -> StateDict:
    """Any supported layout (``fmt``: auto, from the keys, or one of ``FORMATS``) as our state dict for ``cfg``,
    checked: a strict ``load_state_dict`` takes the result."""
    if fmt == "auto":
        fmt = detect_format(state)
    if fmt == "ours":
        return fit_state_dict(_unwrap(state), cfg, where, reset_head=reset_head)
    if fmt == "pyslowfast":
        return from_pyslowfast(state, cfg, where, reset_head=reset_head)
    if fmt == "resnet2d":
        return inflate_resnet2d(state, cfg, where)
    raise ValueError(f"unknown checkpoint format {fmt!r}: expected auto, {', '.join(FORMATS)}")


def load_checkpoint(model: ResNet3D, source: str | os.PathLike | Mapping[str, Any], *, fmt: str = "auto",
                    reset_head: bool = False) -> ResNet3D:
    """Load a checkpoint (a path or ``hf-hub:``/``s3://`` source read safely by ``convert.read_checkpoint``, or a
    loaded dict) of any supported layout into ``model``, strictly. An image ResNet always gets a fresh head."""
    from pipeline.models.convert import read_checkpoint

    where = "checkpoint" if isinstance(source, Mapping) else str(source)
    state = dict(source) if isinstance(source, Mapping) else read_checkpoint(source)
    model.load_state_dict(convert(state, model.cfg, where, fmt=fmt, reset_head=reset_head), strict=True)
    return model

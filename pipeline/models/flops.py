"""Parameters and FLOPs per view of any TimeSformer configuration, in the paper's convention.

The paper's "TFLOPs" are fvcore counts: one multiply-add is one FLOP, over linear layers, the patch
convolution, the two attention matrix products (q k^T and attention x v) and LayerNorm (5 per element,
fvcore's rule); softmax, GELU and additions are free. Its 0.59 / 5.11 / 7.14 TFLOPs for TimeSformer /
-HR / -L are 196.1 / 1704.5 / 2382.5 GFLOPs per view x 3 views (1 clip x 3 crops).

``flops_per_view`` follows our implementation step by step (which tokens each step touches and how
many keys each query sees) and is checked against PyTorch's own operation counter in the tests. One
difference from the original, which the count reflects: the final LayerNorm normalises only the CLS
token we classify (the original normalises the whole sequence, about 0.002% more).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.models.config import TimeSformerConfig, check_local_global_shape

LAYERNORM_FLOPS_PER_ELEMENT = 5  # fvcore: mean, variance, normalise, scale, shift


@dataclass(frozen=True)
class CostBreakdown:
    """Multiply-adds per view, by part. ``total`` is the paper's FLOPs per view."""

    patch_embed: int
    attention_linear: int  # qkv, proj and *_fc layers of every attention step
    attention_matmul: int  # q k^T and attention x v
    mlp: int
    layernorm: int
    head: int

    @property
    def total(self) -> int:
        return (self.patch_embed + self.attention_linear + self.attention_matmul + self.mlp
                + self.layernorm + self.head)


def _attention_step(groups: int, seq: int, dim: int, with_fc: bool) -> tuple[int, int, int]:
    """(linear MACs, matmul MACs, layernorm FLOPs) of one pre-LN attention step over ``groups``
    independent sequences of ``seq`` tokens."""
    tokens = groups * seq
    linear = tokens * dim * 3 * dim + tokens * dim * dim + (tokens * dim * dim if with_fc else 0)
    matmul = 2 * groups * seq * seq * dim
    return linear, matmul, LAYERNORM_FLOPS_PER_ELEMENT * tokens * dim


def cost_per_view(cfg: TimeSformerConfig, num_frames: int | None = None,
                  img_size: int | tuple[int, int] | None = None, include_head: bool = True) -> CostBreakdown:
    """Multiply-adds for one clip of ``num_frames`` frames at ``img_size`` (defaults: the config's)."""
    T = num_frames or cfg.num_frames
    if img_size is None:
        gh, gw = cfg.grid_size
    else:
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
        gh, gw = h // cfg.patch_size, w // cfg.patch_size
    N, D = gh * gw, cfg.embed_dim
    at = cfg.attention_type
    steps: list[tuple[int, int, bool]] = []  # (groups, seq, with_fc)
    if at == "space_only":
        steps = [(T, N + 1, False)]
        mlp_tokens = T * (N + 1)
    elif at == "joint_space_time":
        steps = [(1, T * N + 1, False)]
        mlp_tokens = T * N + 1
    elif at == "divided_space_time":
        steps = [(N, T, True), (T, N + 1, False)]
        mlp_tokens = T * N + 1
    elif at == "axial":
        steps = [(N, T, True), (T * gh, gw, True), (T * gw, gh + 1, False)]
        mlp_tokens = T * N + 1
    elif at == "sparse_local_global":
        check_local_global_shape(T, (gh, gw), where="cost_per_view")
        steps = [(4, T * N // 4, True), (8, T * N // 8 + 1, False)]
        mlp_tokens = T * N + 1
    else:  # the config validated it; keep the failure loud if a scheme is added without a cost
        raise ValueError(f"no cost model for attention_type={at!r}")

    lin = mm = ln = 0
    for groups, seq, with_fc in steps:
        a, b, c = _attention_step(groups, seq, D, with_fc)
        lin, mm, ln = lin + a, mm + b, ln + c
    mlp = 2 * mlp_tokens * D * cfg.mlp_dim
    ln += LAYERNORM_FLOPS_PER_ELEMENT * mlp_tokens * D
    depth = cfg.depth
    return CostBreakdown(
        patch_embed=T * N * cfg.in_chans * cfg.patch_size**2 * D,
        attention_linear=depth * lin,
        attention_matmul=depth * mm,
        mlp=depth * mlp,
        layernorm=depth * ln + LAYERNORM_FLOPS_PER_ELEMENT * D,  # + final norm of the CLS
        head=D * cfg.num_classes if include_head else 0,
    )


def flops_per_view(cfg: TimeSformerConfig, **kwargs) -> int:
    """The paper's FLOPs (multiply-adds) for one view; see ``cost_per_view`` for arguments."""
    return cost_per_view(cfg, **kwargs).total


def parameter_count(cfg: TimeSformerConfig, include_head: bool = True) -> int:
    """Parameters of a config, computed without building the model."""
    D, M = cfg.embed_dim, cfg.mlp_dim
    ln = 2 * D
    attn = D * 3 * D + (3 * D if cfg.qkv_bias else 0) + D * D + D
    extra_steps = {"space_only": 0, "joint_space_time": 0, "divided_space_time": 1,
                   "sparse_local_global": 1, "axial": 2}[cfg.attention_type]
    block = ln + attn + ln + (D * M + M + M * D + D) + extra_steps * (ln + attn + D * D + D)
    embed = cfg.in_chans * cfg.patch_size**2 * D + D + D  # conv weight + bias, cls token
    if cfg.pos_embed != "none":
        embed += (cfg.num_patches + 1) * D
    if cfg.has_time_embed:
        embed += cfg.num_frames * D
    head = (D * cfg.num_classes + cfg.num_classes) if (include_head and cfg.num_classes) else 0
    return embed + cfg.depth * block + ln + head


def training_flops_per_clip(cfg: TimeSformerConfig, recompute_forward: bool | float = False) -> int:
    """Multiply-adds of one training step per clip: forward + backward (2x forward), plus the forward that
    activation checkpointing recomputes (True: all of it; a number: that share, ``recompute_fraction``).
    Used for achieved TFLOP/s: without recompute the model FLOPs (MFU), with it the hardware FLOPs (HFU). Any
    registered family's config (its own FLOPs accounting, pipeline.models.registry)."""
    from pipeline.models.registry import flops_per_view as family_flops

    fwd = family_flops(cfg)
    return 3 * fwd + round(fwd * float(recompute_forward))


# Dense bf16 peak (TFLOP/s) per device for MFU, by device-name fragment (vendor data sheets, SXM parts).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "V100": 125.0}


def device_peak_tflops(device) -> float | None:
    """The dense bf16 (V100: fp16) peak of a CUDA device, or None when unknown or not a GPU."""
    import torch

    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)

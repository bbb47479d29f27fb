"""TimeSformer: ViT over video frames with space-time self-attention.

Bertasius, Wang, Torresani, "Is Space-Time Attention All You Need for Video Understanding?", ICML 2021.

Anatomy (as timm's vision_transformer): ``Attention``, ``Mlp``, ``Block``, ``TimeSformer``, then the
registered variants (``pipeline.models.factory.create_model`` builds one). Faithful to the original code
where it matters for weights and numbers: ViT-B/16, pre-LN with eps 1e-6, qkv bias, one CLS token, one
spatial position embedding shared by all frames, a separate time embedding on patch tokens only, temporal
attention first with the CLS token excluded, a zero-initialised ``temporal_fc`` after it, the CLS token
replicated into every frame for spatial attention and its per-frame outputs averaged, linear drop-path
schedule.

Layouts. Input is ``(B, C, T, H, W)``. Inside, the token sequence is ``[CLS] + (t h w)`` (frame-major);
the original and Hugging Face use ``(h w t)``. Token order changes no weight and no logit, only how
intermediate tensors are laid out; frame-major makes spatial grouping a free view.

Attention schemes (paper, Fig. 1 and Sec. 3). ``T`` frames, an ``H x W`` patch grid, ``N = H * W``.
Each row gives the keys one patch query attends to in one block:

* ``space_only`` -- plain ViT blocks per frame; a query sees its frame: ``N + 1`` keys (with that
  frame's own CLS). Frame tokens are averaged before the final norm, as in the original.
* ``joint_space_time`` -- one attention over the whole clip: ``T * N + 1`` keys.
* ``divided_space_time`` -- time (same position in every frame, CLS excluded): ``T`` keys; then
  space (own frame plus the CLS): ``N + 1`` keys. ``T + N + 1`` in all.
* ``sparse_local_global`` -- local: the ``T x H/2 x W/2`` window (the patch grid tiled in 2 x 2
  windows through all frames, CLS excluded): ``T * N / 4`` keys; then sparse global: every other
  patch along t, h and w over the whole clip, on the query's own parity lattice, plus the CLS:
  ``T * N / 8 + 1`` keys. Needs even ``T``, ``H`` and ``W``.
* ``axial`` -- time: ``T`` keys; then width (own frame and row): ``W`` keys; then height (own frame
  and column, plus the CLS): ``H + 1`` keys.

The schemes with several attention steps learn separate q/k/v for each step (paper, Sec. 3). The
last step always uses the ImageNet ViT's names ``norm1``/``attn``, so an image checkpoint loads into
it directly; the added steps (``temporal_*``, ``width_*``, ``local_*``) each have their own LayerNorm,
attention and zero-initialised output ``*_fc``, so at initialisation they add nothing.

Where the CLS token takes part in a grouped step it is replicated into every group and its updates
are averaged, as the original does for frames in divided attention.

Activation checkpointing is not built in: ``apply_activation_checkpointing`` sets a checkpoint
function on chosen blocks from outside, so DeepSpeed and plain PyTorch training share one policy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.checkpointing import (  # noqa: F401 -- re-exported: every family's models use them
    SELECTIVE,
    apply_activation_checkpointing,
    parse_checkpoint_policy,
    selective_checkpoint,
)
from pipeline.models.config import (  # noqa: F401 -- re-exported: the model's config lives beside it, torch-free
    ATTENTION_TYPES,
    EXTRA_STEPS,
    POS_EMBED_TYPES,
    TimeSformerConfig,
    check_local_global_shape,
)
from pipeline.models.registry import VARIANTS, Variant, model_config, variant_config  # noqa: F401 -- re-exported

# ---------------------------------------------------------------------------------------------------
# Layers


Rate = float | torch.Tensor  # a drop-path rate: a float, or a 0-d tensor on the activations' device


def drop_path_mask(x: torch.Tensor, p: float | torch.Tensor, training: bool) -> torch.Tensor | None:
    """Stochastic depth mask for the rows of dim 0: 0 with probability p, else 1/(1-p); None when off.
    ``p`` may be a 0-d tensor on ``x``'s device (how the model passes it to its blocks, so that a compiled block
    takes the rate as an input, not as a constant to specialise on)."""
    if not training or (not isinstance(p, torch.Tensor) and p == 0.0):
        return None
    keep = 1.0 - p
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    probs = keep.expand(shape) if isinstance(keep, torch.Tensor) else x.new_full(shape, keep, dtype=torch.float32)
    return torch.bernoulli(probs).div_(keep).to(x.dtype)


def drop_path(x: torch.Tensor, p: float | torch.Tensor, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole rows of dim 0 with probability p, rescale the rest (as the original)."""
    mask = drop_path_mask(x, p, training)
    return x if mask is None else x * mask


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p:.4f}"


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


# Sequences up to this length (the 8 or 16 frames of temporal attention) are attended with plain matrix
# products, softmax in fp32, instead of a fused attention kernel, whose 64-128-query tiles would be mostly
# padding: faster with compiled blocks, for training and inference (docs/performance.md); the 96 frames of
# TimeSformer-L stay on the fused kernel. 0: never. Tried and dropped: the same attention as broadcast products
# and sums for Inductor to fuse, slower than the small-tile GEMMs (benchmarks/results/train-loop-h200/run4.log).
MATH_ATTENTION_MAX_LEN = 16


class Attention(nn.Module):
    """Multi-head self-attention over dim 1 of ``(G, L, D)``; fused qkv as timm (q, k, v then heads)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x_GLD: torch.Tensor) -> torch.Tensor:
        G, L, D = x_GLD.shape
        qkv = self.qkv(x_GLD).view(G, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (G, heads, L, head_dim)
        drop = self.attn_drop if self.training else 0.0
        if L <= MATH_ATTENTION_MAX_LEN:  # short sequences (the 8 or 16 frames of temporal attention)
            a = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
            a = F.dropout(a.float().softmax(-1), drop, self.training).to(q.dtype)
            o = a @ v
        else:
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        o = o.transpose(1, 2).reshape(G, L, D)
        return self.proj_drop(self.proj(o))


class Block(nn.Module):
    """One TimeSformer block: the scheme's attention steps, then the MLP, each pre-LN and residual.

    ``forward(tokens, T, grid)`` takes and returns a tuple of token tensors:

    * ``joint_space_time`` and ``space_only``: ``(x,)``, one sequence with the CLS first,
      ``(B, 1 + T*H*W, D)``; for ``space_only`` the model passes frames as the batch,
      ``(B*T, 1 + H*W, D)``, with ``T = 1``.
    * the grouped schemes: ``(cls, patches)``, ``(B, 1, D)`` and ``(B, T*H*W, D)`` in ``(t h w)``
      order. Keeping the CLS apart spares every block two copies of the whole clip (stripping it
      before the grouped steps and prepending it after them).
    """

    def __init__(self, cfg: TimeSformerConfig, drop_path_rate: float) -> None:
        super().__init__()
        dim, eps = cfg.embed_dim, cfg.norm_eps
        self.attention_type = cfg.attention_type
        attn = partial(Attention, dim, cfg.num_heads, cfg.qkv_bias, cfg.attn_drop_rate, cfg.drop_rate)
        for step in EXTRA_STEPS[cfg.attention_type]:
            self.add_module(f"{step}_norm1", nn.LayerNorm(dim, eps=eps))
            self.add_module(f"{step}_attn", attn())
            self.add_module(f"{step}_fc", nn.Linear(dim, dim))
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = attn()
        self.drop_path = DropPath(drop_path_rate)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, cfg.mlp_dim, cfg.drop_rate)
        # Set from outside by apply_activation_checkpointing; None runs the block plainly.
        self.checkpoint_fn: Callable[..., tuple[torch.Tensor, ...]] | None = None

    def forward(self, tokens: tuple[torch.Tensor, ...], T: int, grid: tuple[int, int],
                drop_path_p: float | torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """``drop_path_p`` (default: this block's rate) comes in as an argument, a 0-d tensor from the model,
        so that a compiled block is not specialised on its rate: every block then shares one compiled graph."""
        p = self.drop_path.p if drop_path_p is None else drop_path_p
        if self.checkpoint_fn is not None and torch.is_grad_enabled():
            # tensors as positional arguments, so reentrant implementations (DeepSpeed's) work too
            return self.checkpoint_fn(self._forward, T, grid, p, *tokens)
        return self._forward(T, grid, p, *tokens)

    def _forward(self, T: int, grid: tuple[int, int], p: float, *tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(tokens) == 1:  # one sequence: a plain ViT block
            (x,) = tokens
            x = x + drop_path(self.attn(self.norm1(x)), p, self.training)
            return (x + drop_path(self.mlp(self.norm2(x)), p, self.training),)
        cls, xp = tokens
        for step in EXTRA_STEPS[self.attention_type]:
            xp = getattr(self, f"_{step}_step")(xp, T, grid, p)
        cls, xp = getattr(self, f"_{self.attention_type}_last_step")(cls, xp, T, grid, p)
        # MLP with one drop-path draw per video for its CLS and patches, as on the joined sequence
        keep = drop_path_mask(xp, p, self.training)
        r_cls, r_xp = self.mlp(self.norm2(cls)), self.mlp(self.norm2(xp))
        if keep is not None:
            r_cls, r_xp = r_cls * keep, r_xp * keep
        return cls + r_cls, xp + r_xp

    # -- attention steps ------------------------------------------------------------------------
    # Each takes the patches (B, T*H*W, D) in (t h w) order. Regrouping for an attention needs one
    # copy in; the update comes back through a strided view added to the patches (one kernel, and
    # the result keeps the patches' layout because they are the first operand).

    def _extra_step(self, step: str, xp_GLD: torch.Tensor, p: Rate = 0.0) -> torch.Tensor:
        """Residual update of a grouped extra step; drop-path per group row, then the zero-init fc."""
        r = drop_path(getattr(self, f"{step}_attn")(getattr(self, f"{step}_norm1")(xp_GLD)), p, self.training)
        return getattr(self, f"{step}_fc")(r)

    def _temporal_step(self, xp: torch.Tensor, T: int, grid: tuple[int, int], p: Rate = 0.0) -> torch.Tensor:
        B, L, D = xp.shape
        N = L // T
        r = self._extra_step("temporal", xp.view(B, T, N, D).transpose(1, 2).reshape(B * N, T, D), p)
        return (xp.view(B, T, N, D) + r.view(B, N, T, D).transpose(1, 2)).view(B, L, D)

    def _width_step(self, xp: torch.Tensor, T: int, grid: tuple[int, int], p: Rate = 0.0) -> torch.Tensor:
        B, L, D = xp.shape
        gh, gw = grid
        return xp + self._extra_step("width", xp.view(B * T * gh, gw, D), p).view(B, L, D)

    def _local_step(self, xp: torch.Tensor, T: int, grid: tuple[int, int], p: Rate = 0.0) -> torch.Tensor:
        B, L, D = xp.shape
        gh, gw = grid
        # (b t wy h' wx w') -> (b wy wx) (t h' w'): 2x2 windows of (gh/2, gw/2) through all frames
        x7 = xp.view(B, T, 2, gh // 2, 2, gw // 2, D)
        r = self._extra_step("local", x7.permute(0, 2, 4, 1, 3, 5, 6).reshape(B * 4, L // 4, D), p)
        r = r.view(B, 2, 2, T, gh // 2, gw // 2, D).permute(0, 3, 1, 4, 2, 5, 6)
        return (x7 + r).view(B, L, D)

    def _with_cls(self, cls: torch.Tensor, x: torch.Tensor, p: Rate = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """The ViT step over groups: ``x`` is ``(B, *groups, S, D)`` (any strides); the CLS is replicated
        into every group as its first token and its updates are averaged. Returns the new CLS and the
        patches' update as a ``(B, *groups, S, D)`` view."""
        B, S, D = x.shape[0], x.shape[-2], x.shape[-1]
        groups = x.shape[1:-2]
        G = math.prod(groups)
        cls_rep = cls.view(B, *(1,) * len(groups), 1, D).expand(B, *groups, 1, D)
        seq = torch.cat([cls_rep, x], dim=-2).view(B * G, 1 + S, D)  # one copy builds the sequences
        r = drop_path(self.attn(self.norm1(seq)), p, self.training)
        cls = cls + r[:, 0].view(B, G, D).mean(dim=1, keepdim=True)
        return cls, r[:, 1:].view(B, *groups, S, D)

    def _divided_space_time_last_step(self, cls, xp, T, grid, p=0.0):
        B, L, D = xp.shape
        x4 = xp.view(B, T, L // T, D)
        cls, r = self._with_cls(cls, x4, p)
        return cls, (x4 + r).view(B, L, D)

    def _axial_last_step(self, cls, xp, T, grid, p=0.0):
        B, L, D = xp.shape
        gh, gw = grid
        x5 = xp.view(B, T, gh, gw, D)
        cls, r = self._with_cls(cls, x5.transpose(2, 3), p)  # groups (t, w), sequence h
        return cls, (x5 + r.transpose(2, 3)).view(B, L, D)

    def _sparse_local_global_last_step(self, cls, xp, T, grid, p=0.0):
        B, L, D = xp.shape
        gh, gw = grid
        # (b t' pt h' ph w' pw) -> b (pt ph pw) (t' h' w'): 8 stride-2 lattices over the whole clip
        x8 = xp.view(B, T // 2, 2, gh // 2, 2, gw // 2, 2, D)
        lattices = x8.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(B, 8, L // 8, D)
        cls, r = self._with_cls(cls, lattices, p)
        r = r.view(B, 2, 2, 2, T // 2, gh // 2, gw // 2, D).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return cls, (x8 + r).view(B, L, D)


# ---------------------------------------------------------------------------------------------------
# Model


class TimeSformer(nn.Module):
    """TimeSformer video classifier: ``(B, C, T, H, W)`` normalised clips to ``(B, num_classes)`` logits.

    Frame count and resolution may differ from the config's at run time: the position embedding is
    resized over the 2-D patch grid and the time embedding over time (see ``resize_pos_embed``).
    """

    def __init__(self, cfg: TimeSformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, D)) if cfg.pos_embed != "none" else None
        self.time_embed = nn.Parameter(torch.zeros(1, cfg.num_frames, D)) if cfg.has_time_embed else None
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()  # also under meta init
        self.blocks = nn.ModuleList(Block(cfg, rates[i]) for i in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The original initialisation: trunc-normal(0.02) linears and embeddings, zero time embedding
        and zero ``*_fc`` layers, so that at step 0 the model is the spatial (image) ViT."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.time_embed is not None:
            if self.cfg.time_embed_init_std > 0:
                nn.init.trunc_normal_(self.time_embed, std=self.cfg.time_embed_init_std)
            else:
                nn.init.zeros_(self.time_embed)
        for blk in self.blocks:
            for step in EXTRA_STEPS[self.cfg.attention_type]:
                fc = getattr(blk, f"{step}_fc")
                nn.init.zeros_(fc.weight)
                nn.init.zeros_(fc.bias)

    def checkpoint_units(self) -> list[nn.Module]:
        """What activation checkpointing wraps (pipeline.models.checkpointing): the blocks, in order."""
        return list(self.blocks)

    @property
    def num_layers(self) -> int:
        """Layers for layer-wise learning-rate decay: the embeddings (0), each block, the top (norm and head)."""
        return len(self.blocks) + 1

    def layer_of(self, name: str) -> int:
        """A parameter's layer for layer-wise learning-rate decay: 0 for the patch, position and time embeddings
        and the cls token, ``i + 1`` for block ``i``, ``num_layers`` (the top) for the final norm and the head."""
        if name.startswith(("cls_token", "pos_embed", "time_embed", "patch_embed.")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.num_layers

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names that recipes may exempt from weight decay (the original decays all)."""
        return {"cls_token", "pos_embed", "time_embed"}

    # -- embeddings -------------------------------------------------------------------------------

    def embed(self, video_BCTHW: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], int, tuple[int, int]]:
        """Patchify and add embeddings. Returns the block tokens (see ``Block``), the frame count and
        the patch grid."""
        cfg = self.cfg
        if video_BCTHW.ndim != 5 or video_BCTHW.shape[1] != cfg.in_chans:
            raise ValueError(
                f"TimeSformer expects video as (B, C={cfg.in_chans}, T, H, W); got shape {tuple(video_BCTHW.shape)}"
            )
        B, C, T, H, W = video_BCTHW.shape
        if H % cfg.patch_size or W % cfg.patch_size:
            raise ValueError(f"frame size {H}x{W} is not a multiple of the patch size {cfg.patch_size}")
        if cfg.attention_type == "sparse_local_global":
            check_local_global_shape(T, (H // cfg.patch_size, W // cfg.patch_size), where="TimeSformer input")
        x, grid = self.patch_embed(video_BCTHW)  # (B*T, N, D)
        N, D = x.shape[1], x.shape[2]
        cls = self.cls_token
        if self.pos_embed is not None:
            pos = resize_pos_embed(self.pos_embed, self.cfg.grid_size, grid, self.cfg.pos_embed_resize)
            cls = cls + pos[:, :1]
            x = x + pos[:, 1:]
        if self.cfg.attention_type == "space_only":
            return (self.pos_drop(torch.cat([cls.expand(B * T, 1, D), x], dim=1)),), T, grid
        x = x.view(B, T, N, D)
        if self.time_embed is not None:
            x = x + resize_time_embed(self.time_embed, T, self.cfg.time_embed_resize).unsqueeze(2)
        x = x.reshape(B, T * N, D)
        cls = cls.expand(B, 1, D)
        if self.cfg.attention_type == "joint_space_time":
            return (self.pos_drop(torch.cat([cls, x], dim=1)),), T, grid
        # contiguous: every block then sees the same strides (a compiled block is not recompiled for the first)
        return (self.pos_drop(cls.contiguous()), self.pos_drop(x)), T, grid

    # -- forward ----------------------------------------------------------------------------------

    def _run_blocks(self, video_BCTHW: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], int, tuple[int, int]]:
        tokens, T, grid = self.embed(video_BCTHW)
        block_T = 1 if self.cfg.attention_type == "space_only" else T
        rates = self._drop_path_rates(tokens[0].device) if self.training else [None] * len(self.blocks)
        for blk, rate in zip(self.blocks, rates, strict=True):
            tokens = blk(tokens, block_T, grid, rate)
        return tokens, T, grid

    def _drop_path_rates(self, device: torch.device) -> list[torch.Tensor | None]:
        """Each block's drop-path rate as a 0-d float32 tensor on ``device``, made once per device and rates
        (a tensor per step from Python floats would be a blocking copy). The first block's 0 is a tensor too (a
        mask of ones), so that all blocks share one compiled graph; all None when the model has no drop-path."""
        rates = tuple(blk.drop_path.p for blk in self.blocks)
        key = (str(device), rates)
        cached = self.__dict__.setdefault("_rates_cache", {})
        if key not in cached:
            cached.clear()
            on = any(r > 0 for r in rates)
            cached[key] = [torch.tensor(r, dtype=torch.float32, device=device) if on else None for r in rates]
        return cached[key]

    def forward_tokens(self, video_BCTHW: torch.Tensor) -> tuple[torch.Tensor, int, tuple[int, int]]:
        """Token sequence ``[CLS] + (t h w)`` after the last block, before the final norm; for
        ``space_only`` one sequence per frame, ``(B*T, 1 + H*W, D)``."""
        tokens, T, grid = self._run_blocks(video_BCTHW)
        return torch.cat(tokens, dim=1), T, grid

    def forward_features(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        """Final-norm CLS feature, ``(B, D)``."""
        tokens, T, _ = self._run_blocks(video_BCTHW)
        x = tokens[0]  # the CLS tokens, or the sequence with the CLS first
        if self.cfg.attention_type == "space_only":
            # The original averages all tokens over frames, then applies the final norm.
            x = x.view(-1, T, x.shape[1], x.shape[2]).mean(dim=1)
        return self.norm(x[:, 0])  # LayerNorm is per token: normalising only the CLS is the same

    def forward(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(video_BCTHW))


class PatchEmbed(nn.Module):
    """Per-frame ``P x P`` stride-``P`` convolution, ``(B, C, T, H, W) -> (B*T, N, D)`` frame-major."""

    def __init__(self, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, video_BCTHW: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """The convolution computed as what it is, one matrix product over the patches (the convolution's
        weight viewed as ``(D, C*P*P)``; pixels past the last whole patch dropped, as the convolution does).
        One copy gathers the patches; cuDNN's strided convolution, its layout conversions and its weight
        gradient cost more (docs/performance.md, benchmarks/results/train-loop-h200/run4.log)."""
        B, C, T, H, W = video_BCTHW.shape
        P = self.proj.kernel_size[0]
        gh, gw = H // P, W // P
        v = video_BCTHW[..., : gh * P, : gw * P].reshape(B, C, T, gh, P, gw, P)
        patches = v.permute(0, 2, 3, 5, 1, 4, 6).reshape(B * T * gh * gw, C * P * P)  # (c, kh, kw) per patch
        x = F.linear(patches, self.proj.weight.view(self.proj.out_channels, -1), self.proj.bias)
        return x.view(B * T, gh * gw, -1), (gh, gw)  # tokens contiguous from here on


def resize_pos_embed(pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int],
                     mode: str = "bicubic") -> torch.Tensor:
    """Resize a ``(1, 1 + gh*gw, D)`` [CLS + raster] position embedding over its 2-D patch grid.

    Unlike the original's 1-D interpolation over the flattened raster (which scrambles rows), this
    interpolates the grid as an image. The CLS entry is kept as it is.
    """
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid == new_grid:
        return pos_embed
    D = pos_embed.shape[-1]
    if pos_embed.shape[1] != 1 + old_grid[0] * old_grid[1]:
        raise ValueError(
            f"pos_embed has {pos_embed.shape[1]} entries; a {old_grid[0]}x{old_grid[1]} grid needs "
            f"{1 + old_grid[0] * old_grid[1]} (CLS + patches)"
        )
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    img = grid.reshape(1, old_grid[0], old_grid[1], D).permute(0, 3, 1, 2)
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    img = F.interpolate(img.float(), size=new_grid, mode=mode, **kwargs).to(pos_embed.dtype)
    return torch.cat([cls, img.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], D)], dim=1)


def resize_time_embed(time_embed: torch.Tensor, num_frames: int, mode: str = "nearest") -> torch.Tensor:
    """Resize a ``(1, T, D)`` time embedding to ``num_frames`` along time (nearest: as the original,
    so 8 -> 16 repeats each entry twice)."""
    if time_embed.shape[1] == num_frames:
        return time_embed
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    t = F.interpolate(time_embed.float().transpose(1, 2), size=num_frames, mode=mode, **kwargs)
    return t.transpose(1, 2).to(time_embed.dtype)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "ATTENTION_TYPES", "POS_EMBED_TYPES", "VARIANTS", "TimeSformer", "TimeSformerConfig", "Block", "Attention",
    "apply_activation_checkpointing", "parse_checkpoint_policy", "variant_config", "model_config",
    "resize_pos_embed", "resize_time_embed", "count_parameters",
]

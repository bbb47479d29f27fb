"""Where the model looks: attention maps over the frames of a video, written as PNG images a person can read.

For the centre clip's centre crop of a video (what the model sees), a figure with one column per frame:

1. the frames;
2. **last block, space attention from the CLS token**: the CLS query's attention weights over the patches of
   each frame in the last block's spatial (ViT) attention, averaged over heads;
3. **attention rollout** (Abnar and Zuidema, 2020): the CLS token's attention propagated down through every
   attention step of every block (temporal and spatial), each step's head-averaged weights mixed half and half
   with the residual identity, so the map says how much each input patch of each frame reaches the CLS feature
   the classifier reads; the frame titles give each frame's share of it (its temporal weight);
4. (divided space-time) the last block's **temporal attention**, frame x frame, averaged over patch positions
   and heads: which frames a patch draws on.

The attention is computed on a side path: forward hooks keep the inputs of the attention modules during one
forward pass, and the weights are recomputed from those inputs with the module's own q/k projections. The model's
forward (fused ``scaled_dot_product_attention``, used by training and prediction) is not changed. Supported
schemes: ``divided_space_time`` (the paper's), ``joint_space_time`` and ``space_only``.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import torch

from pipeline.models.registry import scheme_of
from pipeline.models.timesformer import Attention, TimeSformer
from pipeline.predict.model import PredictError, Protocol, read_views

SUPPORTED = ("divided_space_time", "joint_space_time", "space_only")
MAX_FRAMES_SHOWN = 16  # frames (columns) in a figure; longer clips show this many, evenly spaced
CELL_INCHES, DPI = 1.6, 100


def attention_probs(attn: Attention, x_GLD: torch.Tensor) -> torch.Tensor:
    """The head-averaged attention weights ``(G, L, L)`` the module computes for its input ``x_GLD``."""
    G, L, _ = x_GLD.shape
    qkv = attn.qkv(x_GLD).view(G, L, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = qkv[0].float(), qkv[1].float()
    return ((q * attn.head_dim**-0.5) @ k.transpose(-2, -1)).softmax(-1).mean(1)


@torch.no_grad()
def attention_maps(model: TimeSformer, clip_1CTHW: torch.Tensor) -> dict[str, np.ndarray]:
    """``space`` and ``rollout`` ``(T, gh, gw)``, ``frame_share`` ``(T,)`` (the rollout's mass per frame) and, for
    divided attention, ``temporal`` ``(T, T)``, for one normalised clip ``(1, C, T, H, W)``."""
    cfg = model.cfg
    if getattr(cfg, "attention_type", None) not in SUPPORTED:
        raise PredictError(f"--explain supports {', '.join(SUPPORTED)} attention; this model uses "
                           f"{scheme_of(cfg)}")
    captured: list[tuple[int, str, torch.Tensor]] = []  # (block, module, its input), in the order they ran
    hooks = []
    for i, blk in enumerate(model.blocks):
        for name in ("temporal_attn", "attn"):
            module = getattr(blk, name, None)
            if module is not None:
                hooks.append(module.register_forward_hook(
                    lambda m, inp, out, i=i, name=name: captured.append((i, name, inp[0].detach()))))
    try:
        model.eval()
        model.forward_features(clip_1CTHW)
    finally:
        for h in hooks:
            h.remove()
    steps = [(name, attention_probs(getattr(model.blocks[i], name), x).cpu()) for i, name, x in captured]
    T = clip_1CTHW.shape[2]
    gh, gw = clip_1CTHW.shape[3] // cfg.patch_size, clip_1CTHW.shape[4] // cfg.patch_size
    N = gh * gw
    kind = cfg.attention_type
    last = steps[-1][1]
    space = last[0, 0, 1:].view(T, N) if kind == "joint_space_time" else last[:, 0, 1:]
    # rollout: the CLS row of (0.5 I + 0.5 A_last) ... (0.5 I + 0.5 A_first), as a row vector carried down
    v_cls = torch.full((T,), 1.0 / T) if kind == "space_only" else torch.ones(())
    v_p = torch.zeros(T, N)
    for name, P in reversed(steps):
        if name == "temporal_attn":  # P: (N, T, T), patch (t, n) attends to (t', n); the CLS takes no part
            new_cls, new_p = v_cls, torch.einsum("tn,ntu->un", v_p, P)
        elif kind == "joint_space_time":  # P: (1, 1 + T*N, 1 + T*N)
            u = torch.cat([v_cls.view(1), v_p.flatten()]) @ P[0]
            new_cls, new_p = u[0], u[1:].view(T, N)
        else:  # P: (T, 1 + N, 1 + N) per frame; divided: the CLS is replicated into every frame, updates averaged
            w_cls = v_cls if kind == "space_only" else v_cls.expand(T) / T
            u = torch.einsum("ti,tij->tj", torch.cat([w_cls[:, None], v_p], dim=1), P)
            new_cls = u[:, 0] if kind == "space_only" else u[:, 0].sum()
            new_p = u[:, 1:]
        v_cls, v_p = 0.5 * v_cls + 0.5 * new_cls, 0.5 * v_p + 0.5 * new_p
    out = {"space": space.reshape(T, gh, gw).numpy(), "rollout": v_p.reshape(T, gh, gw).numpy(),
           "frame_share": (v_p.sum(1) / v_p.sum().clamp_min(1e-12)).numpy()}
    temporal = [P for name, P in steps if name == "temporal_attn"]
    if temporal:
        out["temporal"] = temporal[-1].mean(0).numpy()
    return out


def figure_size(num_frames: int, temporal: bool = True) -> tuple[int, int]:
    """The PNG's size in pixels (width, height) for a clip of ``num_frames`` frames."""
    cols = min(num_frames, MAX_FRAMES_SHOWN)
    return round(max(cols, 3) * CELL_INCHES * DPI), round(4 * CELL_INCHES * DPI)


def png_name(input_id: str) -> str:
    """A file name for an input's figure: its stem made safe, and a hash of the whole id (two videos named
    alike in different folders do not collide)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(input_id.rstrip("/")).stem)[:80] or "video"
    return f"{stem}-{hashlib.sha1(input_id.encode()).hexdigest()[:8]}.png"


def explain(model: TimeSformer, input_id: str, source, protocol: Protocol, out_dir: Path,
            limits=None) -> Path:
    """Write the figure of one input into ``out_dir``; returns its path."""
    import dataclasses

    cfg = model.cfg
    centre = dataclasses.replace(protocol, temporal_clips=1, spatial_crops=1, mode="multi_view")
    views, _ = read_views(source, input_id, centre, cfg.mean, cfg.std, limits)
    param = next(model.parameters())
    clip = views[:1].to(param.device, param.dtype)
    maps = attention_maps(model, clip)
    mean = torch.tensor(cfg.mean).view(-1, 1, 1, 1)
    std = torch.tensor(cfg.std).view(-1, 1, 1, 1)
    frames = ((views[0] * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 3, 0).numpy()  # (T, H, W, C)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / png_name(input_id)
    _draw(path, input_id, frames, maps)
    return path


def _upsample(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None, None]
    return torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def _draw(path: Path, title: str, frames: np.ndarray, maps: dict[str, np.ndarray]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    T, H, W = frames.shape[:3]
    shown = np.unique(np.linspace(0, T - 1, min(T, MAX_FRAMES_SHOWN)).round().astype(int))
    width, height = figure_size(T)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    cols = max(len(shown), 3)
    grid = fig.add_gridspec(4, cols, left=0.01, right=0.99, top=0.9, bottom=0.06, hspace=0.35, wspace=0.05)
    fig.suptitle(title if len(title) < 110 else "..." + title[-107:], fontsize=7)
    rows = [("frame", None), ("space attention, last block (CLS -> patches)", maps["space"]),
            ("attention rollout (CLS, all blocks)", maps["rollout"])]
    for r, (label, m) in enumerate(rows):
        scale = (m.min(), m.max()) if m is not None else None  # one scale for all frames: comparable
        for c, t in enumerate(shown):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(frames[t])
            if m is not None:
                span = max(scale[1] - scale[0], 1e-12)
                ax.imshow((_upsample(m[t], (H, W)) - scale[0]) / span, cmap="jet", alpha=0.5, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"t={t}", fontsize=6)
            elif r == 2:
                ax.set_title(f"{100 * maps['frame_share'][t]:.0f}% of rollout", fontsize=6)
            if c == 0:
                ax.set_ylabel(label.split(",")[0].split(" (")[0], fontsize=6)
        fig.text(0.01, 0.9 - (r + 1) * 0.21 + 0.005, "" if m is None else label, fontsize=6)
    ax = fig.add_subplot(grid[3, : max(1, cols // 2)])
    ax.bar(range(T), maps["frame_share"], color="tab:red")
    ax.set_title("rollout share per frame (temporal weight)", fontsize=6)
    ax.tick_params(labelsize=5)
    if "temporal" in maps:
        ax = fig.add_subplot(grid[3, cols // 2:])
        ax.imshow(maps["temporal"], cmap="viridis", vmin=0)
        ax.set_title("temporal attention, last block (query frame x key frame)", fontsize=6)
        ax.tick_params(labelsize=5)
    fig.savefig(path, dpi=DPI)

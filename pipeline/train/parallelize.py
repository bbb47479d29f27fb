"""What is applied to the model from outside before the engine wraps it: activation checkpointing (a policy,
or ``auto``: the cheapest one that fits the device's memory, measured) and regional compilation.

As torchtitan's ``parallelize``: the model's code knows neither. ``prepare_model`` is the one call the
training entry point, the benchmarks and the tests make.

``auto`` tries the policies from the least recomputation to the most -- none, selective (matmul and attention
outputs kept, only elementwise work recomputed), every 4th / 3rd / 2nd block, every block -- runs one training
forward and backward of the real micro batch with each on the device, and keeps the first whose activation
peak, plus the engine's model and optimizer states, fits ``train.memory_fraction`` of the device's memory.
Every rank measures; all take the most frugal choice of any rank. On a CPU there is no device memory to fit:
``auto`` is ``none``.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.distributed import group_rank_world
from pipeline.models.checkpointing import (
    SELECTIVE,
    apply_activation_checkpointing,
    checkpoint_units,
    parse_checkpoint_policy,
)

log = logging.getLogger("pipeline.train")

AUTO = "auto"
# least recomputation first: the first that fits is the fastest that fits
AUTO_ORDER = ("none", "selective", "every_4", "every_3", "every_2", "full")
COMPILE_MODES = ("none", "blocks")
# Bytes per parameter the engine keeps besides what the probe holds (fp32 weights and gradients): bf16 weight
# and gradient copies, the fp32 master and AdamW's two moments (SGD needs less) -- the ZeRO-0 worst case.
ENGINE_STATE_BYTES_PER_PARAM = 20


def measure_policy(build: Callable[[], nn.Module], policy: str, micro_batch: int, clip_shape: tuple[int, ...],
                   num_classes: int, device: torch.device, dtype: torch.dtype) -> int | None:
    """Peak device bytes of one training forward + backward of a fresh model under ``policy`` at the micro
    batch, above what was allocated before; None when it ran out of memory."""
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    model = None
    try:
        model = build().to(device)
        apply_activation_checkpointing(model, policy)
        x = torch.randn(micro_batch, *clip_shape, device=device)
        y = torch.randint(0, max(num_classes, 1), (micro_batch,), device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(x)
        F.cross_entropy(logits.float(), y).backward()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        del model
        gc.collect()
        torch.cuda.empty_cache()


def choose_policy(measure: Callable[[str], int | None], capacity: int, reserve: int,
                  order: tuple[str, ...] = AUTO_ORDER) -> tuple[str, dict[str, int | None]]:
    """The first policy of ``order`` whose measured peak plus ``reserve`` fits ``capacity`` bytes; the last
    (full) when none does, so that the run fails, if at all, with the least memory the model can use.
    Returns the choice and what was measured on the way."""
    seen: dict[str, int | None] = {}
    for policy in order:
        peak = seen[policy] = measure(policy)
        if peak is not None and peak + reserve <= capacity:
            return policy, seen
    return order[-1], seen


def resolve_checkpointing(policy: str, build: Callable[[], nn.Module], micro_batch: int,
                          clip_shape: tuple[int, ...], num_classes: int, device: torch.device, dtype: torch.dtype,
                          memory_fraction: float, params: int | None = None) -> str:
    """``policy`` itself, or for ``auto`` the policy measured to fit (all ranks agreeing). ``params``: the
    model's parameter count (default: counted on a model from ``build``)."""
    if policy != AUTO:
        return policy
    if device.type != "cuda":
        log.info("activation checkpointing auto: no device memory to fit on %s, so none", device.type)
        return "none"
    total = torch.cuda.get_device_properties(device).total_memory
    capacity = int(total * memory_fraction)
    if params is None:
        params = sum(p.numel() for p in build().parameters())
    reserve = params * ENGINE_STATE_BYTES_PER_PARAM
    choice, seen = choose_policy(
        lambda p: measure_policy(build, p, micro_batch, clip_shape, num_classes, device, dtype), capacity, reserve)
    index = torch.tensor([AUTO_ORDER.index(choice)], device=device)
    if group_rank_world()[1] > 1:
        torch.distributed.all_reduce(index, op=torch.distributed.ReduceOp.MAX)
    agreed = AUTO_ORDER[int(index.item())]
    torch.cuda.reset_peak_memory_stats(device)  # the probes' peaks are not the run's (memory_gib)
    shown = ", ".join(f"{p} {'out of memory' if b is None else f'{b / 2**30:.1f} GiB'}" for p, b in seen.items())
    log.info("activation checkpointing auto: %s at micro batch %d (measured activation peaks: %s; %.1f GiB kept "
             "for model and optimizer states; fits under %.0f%% of %.1f GiB)%s", agreed, micro_batch, shown,
             reserve / 2**30, 100 * memory_fraction, total / 2**30,
             "" if agreed == choice else f"; this rank alone would take {choice}")
    return agreed


def recompute_fraction(policy: str, depth: int) -> float:
    """The share of the forward of a model's ``depth`` checkpointing units (TimeSformer's blocks, a 3D ResNet's
    residual blocks) that a policy recomputes in the backward pass, in matmul FLOPs
    (hardware-FLOPs utilisation counts it): every block for full, one in k for every_k, none for selective
    (it keeps every matmul and attention output; only elementwise work, which FLOP counts leave out)."""
    every = parse_checkpoint_policy(policy)
    if every == SELECTIVE or every == 0:
        return 0.0
    return len(range(0, depth, every)) / depth


def compile_blocks(model: nn.Module, mode: str | None = None) -> None:
    """Regional compilation: each checkpointing unit (a transformer block, a residual block) compiled in place
    (one graph, reused by every unit of the same shape), activation checkpointing traced inside it; embeddings
    and head stay eager. State-dict keys do not change. ``mode``: torch.compile's (None: its default)."""
    for blk in checkpoint_units(model):
        blk.compile(dynamic=False, mode=mode)


def prepare_model(model: nn.Module, cfg, device: torch.device, build: Callable[[], nn.Module],
                  micro_batch: int) -> str:
    """Apply the recipe's activation checkpointing (``auto`` resolved on the device) and compilation to
    ``model``; returns the policy in force."""
    from pipeline.train.engine import DTYPES

    t = cfg.train
    mc = model.cfg
    policy = resolve_checkpointing(t.activation_checkpointing, build, micro_batch,
                                   (mc.in_chans, mc.num_frames, mc.img_size, mc.img_size), mc.num_classes, device,
                                   DTYPES[t.precision], t.memory_fraction,
                                   params=sum(p.numel() for p in model.parameters()))
    apply_activation_checkpointing(model, policy)
    if t.compile == "blocks" and t.engine == "deepspeed" and t.zero_stage == 3:
        # ZeRO-3 gathers each block's parameters with hooks around the block's call; compiled blocks under it
        # are untested here, so they run eagerly rather than risk it
        log.warning("train.compile=blocks is not applied with ZeRO-3 (untested combination): blocks run eagerly")
    elif t.compile == "blocks":
        compile_blocks(model)
    return policy

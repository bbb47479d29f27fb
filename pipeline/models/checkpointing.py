"""Activation checkpointing, applied from outside the model, the same way for every family.

A model names its units (``model.checkpoint_units()``: TimeSformer's blocks, a 3D ResNet's residual blocks); each
unit runs its body through ``unit.checkpoint_fn`` when one is set. ``apply_activation_checkpointing`` sets it on the
units a policy chooses, so DeepSpeed and plain PyTorch training share one policy and state-dict keys never change.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint


def checkpoint_units(model: nn.Module) -> list[nn.Module]:
    """The modules a model recomputes as units (its ``checkpoint_units()``), through training's wrappers."""
    for _ in range(4):
        units = getattr(model, "checkpoint_units", None)
        if callable(units):
            return list(units())
        model = getattr(model, "module", None)
        if model is None:
            break
    raise ValueError("the model names no activation-checkpointing units (a checkpoint_units() method): "
                     "every registered family's model has one (pipeline.models.registry)")


SELECTIVE = "selective"


def parse_checkpoint_policy(policy: str | int | None) -> int | str:
    """``none``/0 -> 0; ``full``/``every_block``/1 -> 1; ``every_k`` or an int k -> every k-th block;
    ``selective`` -> every block, keeping matmul and attention outputs (see ``apply_activation_checkpointing``)."""
    if policy is None or policy in ("none", 0, False):
        return 0
    if policy in ("full", "every_block", True):
        return 1
    if policy == SELECTIVE:
        return SELECTIVE
    if isinstance(policy, int) and policy > 0:
        return policy
    if isinstance(policy, str) and policy.startswith("every_") and policy[6:].isdigit() and int(policy[6:]) > 0:
        return int(policy[6:])
    raise ValueError(
        f"activation checkpointing policy {policy!r}: expected 'none', 'full' (every block), "
        f"'every_<k>' (every k-th block), 'selective' (every block, matmul outputs kept) or a positive integer k"
    )


def _ops(*names: str) -> set:
    return {getattr(torch.ops.aten, n).default for n in names if hasattr(torch.ops.aten, n)}


# Outputs kept by the selective policy: the expensive ops (matmuls, attention, convolutions). Everything else
# (norms, GELU/ReLU, adds, copies) is recomputed in the backward pass, which costs memory bandwidth, not FLOPs.
_SELECTIVE_SAVE = _ops(
    "mm", "addmm", "bmm", "convolution",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
)


def _selective_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _SELECTIVE_SAVE else CheckpointPolicy.PREFER_RECOMPUTE


def selective_checkpoint(function: Callable, *args):
    """Non-reentrant checkpoint that keeps matmul and attention outputs (torchtitan's "op-level
    selective AC"): the backward recomputes only cheap elementwise work."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return torch_checkpoint(function, *args, use_reentrant=False,
                            context_fn=partial(create_selective_checkpoint_contexts, _selective_policy))


def apply_activation_checkpointing(
    model: nn.Module,
    policy: str | int | None,
    checkpoint_fn: Callable[..., tuple[torch.Tensor, ...]] | None = None,
) -> list[int]:
    """Recompute chosen blocks in the backward pass instead of keeping their activations.

    Policies: ``none``; ``full`` (every block; least memory); ``every_<k>``; ``selective`` (every
    block, but the outputs of matmuls and attention are kept, so only elementwise work is recomputed:
    most of full's saving of norm/GELU/copy activations at almost no extra compute). ``checkpoint_fn(
    function, *args)`` defaults to non-reentrant ``torch.utils.checkpoint``; pass DeepSpeed's
    ``deepspeed.checkpointing.checkpoint`` to use its implementation (not with ``selective``).
    Returns the indices of checkpointed blocks. State-dict keys do not change.
    """
    every = parse_checkpoint_policy(policy)
    if every == SELECTIVE:
        if checkpoint_fn is not None:
            raise ValueError("the 'selective' policy uses torch.utils.checkpoint; do not pass checkpoint_fn")
        fn, every = selective_checkpoint, 1
    else:
        fn = checkpoint_fn or partial(torch_checkpoint, use_reentrant=False)
    chosen = []
    for i, blk in enumerate(checkpoint_units(model)):
        on = every > 0 and i % every == 0
        blk.checkpoint_fn = fn if on else None
        if on:
            chosen.append(i)
    return chosen

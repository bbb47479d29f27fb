"""Elastic resume: a run continues on another number of ranks than the one that wrote its checkpoint.

Three things depend on the world size, and each is carried across a change of it:

* **The batch.** The global batch is the recipe's (``config.batch_plan``): the micro batch stays, the gradient
  accumulation is re-derived for the new world size, and a world size that cannot meet the global batch is
  refused (by launch, and again by the ranks).

* **The optimizer state.** The plain torch engine and DeepSpeed ZeRO-0 in fp32 keep the whole state on every
  rank: it loads on any world size. ZeRO-1/2 (and DeepSpeed's bf16 optimizer, ZeRO-0/1 in bf16) partition the
  fp32 master weights and the optimizer's moments across the ranks in flat per-group buffers.
  ``load_repartitioned`` reads every saved rank's file (weights-only, through the engine's allow-listed
  loader), joins the partitions into the world-size-independent flat group (padding dropped: the flat layout is
  the parameters of the group, in order, back to back), and cuts out this rank's partition of the new layout.
  The result is checked against the weights DeepSpeed loaded from the model states file (fp32: bit for bit; bf16:
  within bf16's rounding): a layout that did not match would fail there, not train on scrambled moments.
  ZeRO-3 partitions the parameters themselves: it resumes on the same world size only (refused with the fix).

* **The data stream.** Each rank of a run reads its own stream, seeded by (seed, data rank, worker, the step its
  interval began at; ``loop._interval_stream``), so the clips of one optimizer step are the union of the
  ``accumulation`` micro batches each data rank draws for it. The run keeps the number of *data ranks* it
  started with (``DataLayout``, recorded in every checkpoint marker) as long as the new world size divides it:
  each rank then plays ``data ranks / world size`` of those streams, one after the other, each resumed at the
  micro batch it had reached. Every step then trains on exactly the clips the uninterrupted run would have
  used: no clip repeated, none skipped, relative to that run. (The training stream itself draws shards with
  replacement, so "an epoch" is a count of clips, ``data.epoch_clips``, not an exact pass: what is exact is the
  sameness with the uninterrupted stream.) A world size that does not divide the data ranks (growing, or 3 of 4)
  re-splits: from the resume step to the end of its checkpoint interval every rank of the new layout draws a new
  stream, seeded by (seed, rank, worker, resume step), never one an earlier attempt drew; the step count, and so
  the number of clips consumed (step x global batch), continues. That is the documented approximation: the same
  distribution of clips, not the same clips; the run log and the MLflow tag ``data_layout`` say which held.

Stochastic layers (drop path) draw per (seed, physical rank, step, micro batch): a run with drop path on matches
the uninterrupted run in its data and optimizer state but not in its drop-path masks after a change of world size.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("pipeline.train")

# DeepSpeed's per-rank optimizer files: ZeRO-1/2 ("zero_pp_rank_<r>_mp_rank_00_optim_states.pt") and its bf16
# optimizer (ZeRO-0/1 in bf16: "bf16_zero_pp_rank_<r>_..."). ZeRO-3 adds per-rank model states.
OPTIM_FILE_RE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
ZERO3_MODEL_FILE_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_00_model_states\.pt$")

# keys of DeepSpeed's optimizer state dicts (deepspeed.checkpoint.constants)
BASE_STATE, FP32_GROUPS, PADDINGS = "base_optimizer_state", "single_partition_of_fp32_groups", "group_paddings"
ALIGNMENT_PADDINGS = "param_alignment_paddings"


class ElasticResumeError(RuntimeError):
    """A checkpoint cannot be resumed on this world size; the message says why and what to do instead."""


# ---------------------------------------------------------------------------------------------------------------
# The data layout


@dataclass(frozen=True)
class DataLayout:
    """The run's data streams: ``ranks`` streams (data ranks), the layout in force since step ``since``."""

    ranks: int
    since: int = 0

    def marker(self) -> dict[str, int]:
        """What a checkpoint marker records of it."""
        return {"data_ranks": self.ranks, "data_since": self.since}


def data_layout(marker: dict[str, Any] | None, world_size: int, step: int) -> tuple[DataLayout, bool]:
    """The data layout a start on ``world_size`` ranks continues with, from the marker of the checkpoint it resumes
    (None: a fresh run), and whether the stream is exactly the uninterrupted run's (True) or re-split (False).
    A marker written before data layouts were recorded had as many data ranks as ranks, since step 0."""
    if not marker:
        return DataLayout(world_size, 0), True
    ranks = marker.get("data_ranks", marker.get("world_size")) or world_size
    since = marker.get("data_since", 0) or 0
    if not isinstance(ranks, int) or isinstance(ranks, bool) or ranks < 1:
        raise ElasticResumeError(f"checkpoint marker at step {step}: data_ranks={ranks!r} is not a positive integer")
    if ranks % world_size == 0:
        return DataLayout(ranks, int(since)), True
    return DataLayout(world_size, step), False


def owned_streams(layout: DataLayout, world_size: int, rank: int) -> list[int]:
    """The data ranks physical rank ``rank`` of ``world_size`` plays (consecutive, in order)."""
    if layout.ranks % world_size:
        raise ValueError(f"{layout.ranks} data streams cannot be shared evenly by {world_size} ranks")
    k = layout.ranks // world_size
    return list(range(rank * k, (rank + 1) * k))


def interval_bounds(step: int, every: int, since: int, total: int) -> tuple[int, int]:
    """(first step of the stream's interval, its last step): intervals are ``train.ckpt_every`` steps long, except
    that one begins where a re-split layout took over (``since``), so its streams are seeded by that step."""
    base = (step // every) * every
    return max(base, since), min(base + every, total)


def stream_plan(step: int, every: int, layout: DataLayout, world_size: int, rank: int, grad_accum: int,
                total: int) -> tuple[list[tuple[int, int]], int, int, int]:
    """Which streams a rank reads for the interval that contains ``step``: ([(data rank, micro batches to skip)],
    micro batches per data rank per step, the interval's start step (the streams' seed), its end step)."""
    streams = owned_streams(layout, world_size, rank)
    if grad_accum % len(streams):
        raise ValueError(f"accumulation {grad_accum} on {world_size} rank(s) cannot be shared by {len(streams)} "
                         f"data streams per rank")
    per = grad_accum // len(streams)  # the accumulation of the layout's own world size
    start, end = interval_bounds(step, every, layout.since, total)
    return [(d, (step - start) * per) for d in streams], per, start, end


def interval_stream(layout: DataLayout) -> Callable[[Any, int], tuple[Iterator[dict[str, Any]], int]]:
    """The loop's data source (``LoopState.batches``) under ``layout``: for each step, the micro batches of this
    rank's data streams, each stream's in turn. With one stream per rank since step 0 it is the loop's own
    ``_interval_stream``."""
    from pipeline.data.loader import make_loader

    def stream(s, step: int):
        streams, per, start, end = stream_plan(step, s.cfg.train.ckpt_every, layout, s.world_size, s.rank,
                                               s.plan.grad_accum, s.total)
        iters = [iter(make_loader(s.index, s.storage, s.cfg.data.train_split, train=True,
                                  batch_size=s.plan.micro_batch, num_workers=s.cfg.data.num_workers, endless=True,
                                  clip=s.clip, rank=d, world_size=layout.ranks, seed=s.cfg.train.seed,
                                  start_step=start, shuffle_buffer=s.cfg.data.shuffle_buffer, skip_batches=skip))
                 for d, skip in streams]

        def batches():
            while True:
                for it in iters:
                    for _ in range(per):
                        yield next(it)
        return batches(), end
    return stream


def describe_layout(layout: DataLayout, exact: bool, world_size: int, saved_world: int | None) -> str:
    """A line for the run log and the MLflow tag ``data_layout``."""
    k = layout.ranks // world_size if layout.ranks % world_size == 0 else 1
    if exact:
        how = ("exact: the uninterrupted run's clips at every step" if saved_world in (None, world_size) and k == 1
               else f"exact: each rank plays {k} of the run's {layout.ranks} data streams, so every step trains on "
                    f"the uninterrupted run's clips")
    else:
        how = (f"re-split: {saved_world} data stream(s) cannot be shared by {world_size} ranks, so from step "
               f"{layout.since} to the end of its checkpoint interval each rank draws a new stream (same "
               f"distribution, other clips; nothing an earlier attempt drew is replayed)")
    return f"{layout.ranks} data stream(s) since step {layout.since}; {how}"


# ---------------------------------------------------------------------------------------------------------------
# The optimizer state


def saved_ranks(path: Path) -> tuple[int, bool, bool]:
    """(how many ranks wrote partitioned optimizer state in checkpoint directory ``path`` (0: none, the state is
    whole), whether it is DeepSpeed's bf16 optimizer's, whether it is ZeRO-3's)."""
    ranks, bf16 = set(), False
    for f in path.iterdir():
        m = OPTIM_FILE_RE.match(f.name)
        if m:
            ranks.add(int(m.group(2)))
            bf16 = bf16 or bool(m.group(1))
    zero3 = any(ZERO3_MODEL_FILE_RE.match(f.name) for f in path.iterdir())
    if ranks and ranks != set(range(len(ranks))):
        raise ElasticResumeError(f"{path}: optimizer files of ranks {sorted(ranks)}: some rank's file is missing. "
                                 f"Restore it, or move this checkpoint away to resume from the one before")
    return len(ranks), bf16, zero3


def zero3_refusal(path: Path, saved: int, world: int) -> ElasticResumeError:
    return ElasticResumeError(
        f"{path}: written by {saved} ranks under ZeRO-3, which partitions the parameters themselves; this job has "
        f"{world} rank(s), and a ZeRO-3 checkpoint resumes on its own world size only. Relaunch with the same "
        f"ranks (python jobs/launch.py --resume RUN --nodes N --gpus-per-node G with N x G = {saved}), or export "
        f"the weights (jobs/export.py) and start a new run from them (model.init=...)")


def _unpadded(state: dict[str, Any], group: int, bf16: bool) -> tuple[int, int]:
    """(this rank's partition length, how much of it is data rather than padding) for flat group ``group``."""
    fp32 = state[FP32_GROUPS][group]
    pad = int(state[PADDINGS][group])
    if bf16:  # the bf16 optimizer saves its partitions padded
        return fp32.numel(), fp32.numel() - pad
    return fp32.numel() + pad, fp32.numel()  # ZeRO-1/2 save theirs with the padding cut off


def merge_partitions(states: list[dict[str, Any]], bf16: bool) -> list[dict[str, Any]]:
    """Per flat group, the world-size-independent state: ``{"fp32": flat master weights, "state": {key: flat
    tensor, or a scalar that every rank holds alike}, "group": its saved hyperparameters}``, from the optimizer
    state dicts of every saved rank, in rank order. Padding (at the end of the last partitions) is dropped."""
    first = states[0]
    groups = len(first[FP32_GROUPS])
    for r, sd in enumerate(states):
        if any(any(int(p) for p in group) for group in sd.get(ALIGNMENT_PADDINGS) or []):
            raise ElasticResumeError(f"rank {r}'s optimizer state pads parameters inside its groups "
                                     f"(zero_optimization.parameter_alignment): not supported across world sizes")
        if len(sd[FP32_GROUPS]) != groups:
            raise ElasticResumeError(f"rank {r} saved {len(sd[FP32_GROUPS])} parameter groups, rank 0 {groups}")
    merged = []
    for i in range(groups):
        sizes = [_unpadded(sd, i, bf16) for sd in states]
        keeps = [keep for _, keep in sizes]
        fp32 = torch.cat([sd[FP32_GROUPS][i].reshape(-1)[:n].float() for sd, n in zip(states, keeps, strict=True)])
        per_rank = [sd[BASE_STATE]["state"].get(i, {}) for sd in states]
        state: dict[str, Any] = {}
        for key, value in per_rank[0].items():
            values = [ps.get(key) for ps in per_rank]
            if any(v is None for v in values):
                raise ElasticResumeError(f"optimizer state {key!r} of group {i} is missing on some rank")
            fulls = [full for full, _ in sizes]
            partitioned = all(torch.is_tensor(v) and v.numel() == full for v, full in zip(values, fulls, strict=True))
            if partitioned:
                state[key] = torch.cat([v.reshape(-1)[:keep] for v, keep in zip(values, keeps, strict=True)])
            else:  # a scalar (Adam's step): the same on every rank
                if not all(torch.equal(torch.as_tensor(v), torch.as_tensor(value)) for v in values):
                    raise ElasticResumeError(f"optimizer state {key!r} of group {i} differs between ranks")
                state[key] = value
        hyper = {k: v for k, v in first[BASE_STATE]["param_groups"][i].items() if k != "params"}
        merged.append({"fp32": fp32, "state": state, "group": hyper})
    return merged


def partition_of(flat: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Partition ``rank`` of length ``size`` of a flat group (DeepSpeed's equal partitions; zeros past the end)."""
    out = torch.zeros(size, dtype=flat.dtype)
    piece = flat[rank * size:(rank + 1) * size]
    out[:piece.numel()] = piece
    return out


def load_repartitioned(ds_engine, path: Path, saved: int, bf16: bool, precision: str,
                       read: Callable[[Path], Any], keep_options: tuple[str, ...]) -> None:
    """Load the partitioned optimizer state of checkpoint directory ``path`` (written by ``saved`` ranks) into
    ``ds_engine`` (a ``deepspeed`` engine on another number of ranks, whose module weights, schedule and step
    counters are loaded already). ``read`` reads a file weights-only; ``keep_options``: the param-group keys that
    are implementation choices, not state (kept as they are)."""
    import torch.distributed as dist

    optimizer = ds_engine.optimizer
    rank = dist.get_rank() if dist.is_initialized() else 0
    prefix = "bf16_" if bf16 else ""
    states = [read(path / f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
              for r in range(saved)]
    merged = merge_partitions(states, bf16)
    base = optimizer.optimizer
    if len(base.param_groups) != len(merged):
        raise ElasticResumeError(f"{path}: {len(merged)} parameter groups saved, this run's optimizer has "
                                 f"{len(base.param_groups)}: the recipe's optimizer changed since the checkpoint")
    optimizer.refresh_fp32_params()  # this rank's fp32 partition from the module weights DeepSpeed loaded
    worst = 0.0
    for i, (group, saved_group) in enumerate(zip(base.param_groups, merged, strict=True)):
        flat = group["params"][0]
        mine = partition_of(saved_group["fp32"], rank, flat.numel()).to(flat.device)
        diff = (mine - flat.detach().float()).abs()
        # fp32: the module weights are the master weights; bf16: the masters rounded to bf16
        allowed = 0.0 if precision == "fp32" else 2.0 ** -7 * mine.abs() + 1e-30
        if bool((diff > allowed).any()):
            raise ElasticResumeError(
                f"{path}: group {i}'s fp32 master weights, re-partitioned for rank {rank} of "
                f"{dist.get_world_size() if dist.is_initialized() else 1}, differ from the checkpoint's module "
                f"weights by up to {float(diff.max()):.3g}: the saved partition layout is not the one assumed. "
                f"Resume on {saved} rank(s)")
        worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
        flat.data.copy_(mine)
        state = {}
        for key, value in saved_group["state"].items():
            if torch.is_tensor(value) and value.dim() == 1 and value.numel() == saved_group["fp32"].numel():
                state[key] = partition_of(value, rank, flat.numel()).to(flat.device, torch.float32)
            else:
                state[key] = value.clone() if torch.is_tensor(value) else value
        base.state[flat] = state
        group.update({k: v for k, v in saved_group["group"].items() if k not in keep_options})
    if hasattr(optimizer, "_load_global_state"):  # ZeRO-1/2: the loss scaler (fp16) and gradient clipping
        optimizer._load_global_state(states[rank if rank < saved else 0])
    if hasattr(optimizer, "_link_all_hp_params"):  # DeepSpeed's per-parameter views of the new partitions
        optimizer._link_all_hp_params()
    log.info("optimizer state of %s re-partitioned from %d to %d rank(s) (%d group(s); fp32 masters match the "
             "module weights to %.3g)", path.name, saved, dist.get_world_size() if dist.is_initialized() else 1,
             len(merged), worst)

"""The training loop: it reads top to bottom; engine, data, evaluation and checkpoints are calls.

The data stream is cut into intervals of ``train.ckpt_every`` steps; each interval's stream is seeded by
(seed, rank, worker, first step of the interval). A run resumed at any step re-opens its interval's stream
and skips what was consumed (without decoding), so it sees exactly the batches the uninterrupted run saw,
and a later interval never replays an earlier one.

Broken samples are skipped by the loader; each batch carries its worker's counts (``batch["faults"]``).
The loop sums them (``FaultTally``), logs ``data/skipped``, ``data/skipped_fraction`` and
``data/samples_read`` (this process's attempt, all ranks summed) and stops every rank together with a
``DataQualityError`` when a rank skipped more than ``data.max_skip_fraction`` of what it read.

``train.keep_best``: a validation that beats the best so far (``BestCheckpoint``) saves a checkpoint at that step,
whatever ``train.ckpt_every`` says, and names it in ``checkpoints/best.json``; at the end, ``final_weights`` loads
it back for the test protocol and the export.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from pipeline.config import BatchPlan, RunConfig
from pipeline.data.loader import ClipConfig, DataQualityError, FaultTally, make_loader
from pipeline.data.shards import DatasetIndex
from pipeline.data.storage import Storage
from pipeline.distributed import group_rank_world
from pipeline.progress import format_duration
from pipeline.train import checkpoint as ckpt
from pipeline.train.ema import exports_ema
from pipeline.train.engine import Engine

log = logging.getLogger("pipeline.train")


class MetricSink(Protocol):
    """Where rank 0's metric lines go (``pipeline.tracking.sink.Sinks``: metrics.jsonl and MLflow)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


class Budget(Protocol):
    """The run's GPU-hour account (``pipeline.train.budget.GpuHours``)."""

    hours: float

    @property
    def exhausted(self) -> bool: ...

    def save(self) -> None: ...


class StopFlag(Protocol):
    """The first stop signal received (``pipeline.train.main.StopSignal``): preempted, terminated or None."""

    reason: str | None


Batches = Iterator[dict[str, Any]]


@dataclass
class LoopState:
    """What the loop works with: the run's config and batch plan, the engine, where the data comes from, this
    rank's place, and the run's services (sinks, budget, stop flag, and the trainer's checkpoint and validation
    calls)."""

    cfg: RunConfig
    engine: Engine
    plan: BatchPlan
    index: DatasetIndex | None  # None when ``batches`` supplies the data (benchmarks, tests)
    storage: Storage | None
    clip: ClipConfig | None
    rank: int
    world_size: int
    device: torch.device
    per_epoch: int
    total: int
    run_dir: Path
    sinks: MetricSink
    account: Budget
    stop: StopFlag
    save: Callable[[int], None]  # checkpoint at this step (every rank calls it)
    validate: Callable[[], dict[str, float]]
    flops_per_clip: float = 0.0  # model FLOPs of one training clip (forward + backward, no recompute): mfu
    hardware_flops_per_clip: float = 0.0  # what the device computes, recomputed forwards included: hfu
    peak_tflops: float | None = None  # per device, when known: MFU
    # (state, step) -> (batch iterator, last step it serves); default: the shard loader's interval stream
    batches: Callable[[LoopState, int], tuple[Batches, int]] | None = None
    # train.plan_by=budget: fits ``total`` to the budget as the run goes (pipeline.train.plan.BudgetPlanner)
    planner: Any = None
    # a sweep member's rung check at each validation (pipeline.train.sweep): True stops the run like its budget
    rung: Callable[[int, dict[str, float]], bool] | None = None


class DivergedError(RuntimeError):
    """A non-finite loss or gradient norm. Raised on every rank before that step reaches a checkpoint, so
    the newest complete checkpoint still holds finite weights."""


def _all_reduce(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if group_rank_world()[1] > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX if op == "max" else
                                     torch.distributed.ReduceOp.SUM)
    return t.tolist()


@dataclass(frozen=True)
class Verdict:
    """What every rank agreed on about one step (the maximum over ranks of each flag)."""

    step: int
    preempted: bool
    terminated: bool
    budget: bool
    bad_data: bool
    diverged: bool

    @property
    def stopping(self) -> bool:
        return self.preempted or self.terminated or self.budget

    def merged(self, earlier: Verdict) -> Verdict:
        """This step's verdict with an earlier step's flags added (any flag raised in either)."""
        flags = [getattr(self, f) or getattr(earlier, f) for f in StepChecks.FLAGS]
        return Verdict(self.step, *flags)


class StepChecks:
    """The questions every rank must answer alike after each step -- stop now (preemption, cancel, GPU-hour
    budget), has a rank skipped too much data, has training diverged -- without making the host wait for
    the device on every step.

    A step's host flags and the device's own non-finite check (loss or gradient norm; sticky, so a diverged
    step is never forgotten) are reduced across ranks on the device, asynchronously, then copied to pinned
    host memory behind an event. ``verdict(now=False)`` reads the previous step's answer, which the device
    finished while this step's work was queued behind it: a wait on an event, not a drain of the queue.
    ``verdict(now=True)`` waits for this step's own answer: the loop asks that on steps that log, validate or
    save, so a diverged step never reaches a checkpoint. All ranks read the same reduced values, so they
    act on the same step."""

    FLAGS = ("preempted", "terminated", "budget", "bad_data", "diverged")

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.distributed = group_rank_world()[1] > 1
        self.on_host = device.type != "cuda"  # a CPU computes as it goes: reading a value costs nothing
        pin = not self.on_host
        n = len(self.FLAGS)
        self._host_in = [torch.zeros(n, dtype=torch.float32, pin_memory=pin) for _ in range(2)]
        self._host_out = [torch.zeros(n, dtype=torch.float32, pin_memory=pin) for _ in range(2)]
        self._diverged = torch.zeros((), dtype=torch.bool, device=device)
        self._diverged_host = False
        self._pending: list[tuple[int, int, Any]] = []  # (step, ring slot, event or None)
        self._slot = 0

    def submit(self, step: int, preempted: bool, terminated: bool, budget: bool, bad_data: bool,
               loss: torch.Tensor, norm: torch.Tensor | float | None) -> None:
        """Queue this step's flags; nothing here waits for the device."""
        if len(self._pending) == 2:  # the caller skipped a verdict: settle the oldest before reusing its slot
            self._wait(self._pending.pop(0))
        slot, self._slot = self._slot, 1 - self._slot
        host_in, host_out = self._host_in[slot], self._host_out[slot]
        if self.on_host:
            values = [float(loss)] + ([] if norm is None else [float(norm)])
            self._diverged_host |= not all(math.isfinite(v) for v in values) or (norm is not None and values[1] < 0)
            flags = [float(preempted), float(terminated), float(budget), float(bad_data), float(self._diverged_host)]
            if self.distributed:
                host_in[:] = torch.tensor(flags)
                torch.distributed.all_reduce(host_in, op=torch.distributed.ReduceOp.MAX)
                flags = host_in.tolist()
            host_out[:] = torch.tensor(flags)
            self._pending.append((step, slot, None))
            return
        bad = ~torch.isfinite(loss.detach().float())
        if norm is not None:
            norm = norm.detach().float() if isinstance(norm, torch.Tensor) else torch.tensor(float(norm))
            norm = norm.to(self.device, non_blocking=True)
            bad = bad | ~torch.isfinite(norm) | (norm < 0)
        self._diverged |= bad
        host_in[:4] = torch.tensor([float(preempted), float(terminated), float(budget), float(bad_data)])
        flags = host_in.to(self.device, non_blocking=True)
        flags[4] = self._diverged.float()
        if self.distributed:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        host_out.copy_(flags, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((step, slot, event))

    def _wait(self, pending: tuple[int, int, Any]) -> Verdict:
        step, slot, event = pending
        if event is not None:
            event.synchronize()
        values = [bool(v) for v in self._host_out[slot].tolist()]
        return Verdict(step, *values)

    def verdict(self, now: bool) -> Verdict | None:
        """The newest submitted step's verdict (``now``), else the one before it (None on the first step).
        ``now`` also counts the flags of a step whose verdict was not read (complete once the newest is): a
        skip fraction can fall back under its ceiling a step later, and must not go unnoticed."""
        if now:
            pending, self._pending = self._pending, []
            latest = self._wait(pending[-1])
            for older in pending[:-1]:
                latest = latest.merged(self._wait(older))
            return latest
        if len(self._pending) < 2:
            return None
        return self._wait(self._pending.pop(0))


def seed_step(seed: int, device: torch.device) -> None:
    """Seed the random generators a training step draws from: the host's and this rank's GPU's. Not
    ``torch.manual_seed``: before CUDA is initialised (every CPU run) it queues a lazy seeding call with a
    formatted stack trace for each accelerator type, on every call: most of a CPU step's loop time, and a
    list that grows for the whole run."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()
                                      ].manual_seed(seed)


def _memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _interval_stream(s: LoopState, step: int):
    every = s.cfg.train.ckpt_every
    start = (step // every) * every
    loader = make_loader(s.index, s.storage, s.cfg.data.train_split, train=True, batch_size=s.plan.micro_batch,
                         num_workers=s.cfg.data.num_workers, endless=True, clip=s.clip, rank=s.rank,
                         world_size=s.world_size, seed=s.cfg.train.seed, start_step=start,
                         shuffle_buffer=s.cfg.data.shuffle_buffer, skip_batches=(step - start) * s.plan.grad_accum)
    return iter(loader), min(start + every, s.total)


class BestCheckpoint:
    """The best validation so far (``train.keep_best``): top-1 (or mAP for a multi-label model) of the weights
    the run exports, the EMA's (``val_top1_ema``) when ``train.ema_export`` is on. Every rank holds the same
    numbers (validation sums over ranks); rank 0 writes the record. A resumed run continues from the record of
    a checkpoint it can reach."""

    def __init__(self, cfg: RunConfig, run_dir: Path, rank: int, resumed_step: int) -> None:
        suffix = "_ema" if exports_ema(cfg) else ""
        self.keys = (f"val_top1{suffix}", f"val_map{suffix}")
        self.run_dir, self.rank = run_dir, rank
        record = ckpt.best_checkpoint(run_dir, up_to=resumed_step) if resumed_step else None
        known = record is not None and record["metric"] in self.keys
        self.step: int | None = record["step"] if known else None
        self.value: float | None = float(record["value"]) if known else None

    def improved(self, metrics: dict[str, float]) -> tuple[str, float] | None:
        """(metric, value) when ``metrics`` beat the best so far; None otherwise (or when they have neither)."""
        for key in self.keys:
            value = metrics.get(key)
            if value is not None and math.isfinite(value):
                return (key, float(value)) if self.value is None or value > self.value else None
        return None

    def record(self, step: int, metric: str, value: float) -> None:
        """After checkpoint ``step`` is complete: it is the best."""
        self.step, self.value = step, value
        if self.rank == 0:
            ckpt.record_best(self.run_dir, step, metric, value)
            log.info("step %d: best so far (%s=%.4g); kept as the run's final weights", step, metric, value)


def final_weights(engine: Engine, run_dir: Path, cfg: RunConfig) -> dict[str, Any]:
    """The weights the end of a run tests and exports: ``{"step", "tag", "ema"}`` (and ``metric``, ``value``
    for the best checkpoint). With ``train.keep_best`` the best validated checkpoint, loaded back into the engine
    (every rank calls this); otherwise the last step's. ``ema``: the EMA of the weights rather than the weights
    (``train.ema_export``). ``tag`` None: the newest checkpoint."""
    info: dict[str, Any] = {"step": engine.global_step, "tag": None, "ema": exports_ema(cfg)}
    if not cfg.train.keep_best:
        return info
    best = ckpt.best_checkpoint(run_dir)
    if best is None:
        log.warning("train.keep_best: no validation recorded a best checkpoint (no labelled validation clips?): "
                    "the last step's weights are tested and exported")
        return info
    if best["step"] != engine.global_step:
        engine.load(ckpt.checkpoint_root(run_dir), best["tag"])
    info.update(step=best["step"], tag=best["tag"], metric=best["metric"], value=best["value"])
    return info


def train_loop(s: LoopState) -> str:
    """Train up to ``s.total`` steps; returns done, budget, preempted or terminated.

    Steps that neither log, validate nor save never wait for the device: losses are summed on the device,
    and the stop, data and divergence checks of a step are read one step later (``StepChecks``)."""
    t = s.cfg.train
    val_every = s.per_epoch if t.val_every == 0 else t.val_every
    step = s.engine.global_step
    window = {"t0": time.perf_counter(), "wait": 0.0, "steps": 0, "loss": 0.0}
    faults = FaultTally()  # broken samples this rank's loaders skipped, over the whole attempt
    checks = StepChecks(s.device)
    stream = s.batches or _interval_stream
    best = BestCheckpoint(s.cfg, s.run_dir, s.rank, step) if t.keep_best else None
    while step < s.total:
        batches, interval_end = stream(s, step)
        while step < min(interval_end, s.total):  # a budget plan may move the total within an interval
            losses = []
            for micro in range(s.plan.grad_accum):
                t_wait = time.perf_counter()
                batch = next(batches)
                window["wait"] += time.perf_counter() - t_wait
                faults.add(batch.get("faults"))
                # drop-path draws depend only on (seed, rank, step, micro): a resumed run draws the same
                seed_step(int(np.random.SeedSequence([t.seed, s.rank, step, micro]).generate_state(1)[0]), s.device)
                losses.append(s.engine.train_micro_batch(batch["video"], batch["label"]))
            step = s.engine.global_step
            loss = torch.stack(losses).mean() if len(losses) > 1 else losses[0]
            window["loss"] = window["loss"] + loss.detach()  # stays on the device until a log step reads it
            window["steps"] += 1
            # fp16's loss scaler skips overflowing steps itself (an infinite norm there is routine)
            norm = s.engine.grad_norm_tensor() if t.precision != "fp16" else None
            checks.submit(step, preempted=s.stop.reason == "preempted", terminated=s.stop.reason == "terminated",
                          budget=s.rank == 0 and s.account.exhausted,
                          bad_data=faults.exceeds(s.cfg.data.max_skip_fraction), loss=loss, norm=norm)
            logs = step % t.log_every == 0 or step == s.total
            validates = val_every > 0 and (step % val_every == 0 or step == s.total)
            saves = step % t.ckpt_every == 0 or step == s.total
            v = checks.verdict(now=logs or validates or saves)
            if v is None:
                continue
            if v.stopping and v.step != step:
                # a stop read a step late: this step is the one saved, so its own checks come first (the stop
                # flags persist, so every rank reads the stop again, now with this step's divergence)
                v = checks.verdict(now=True)
            if v.diverged:
                raise DivergedError(
                    f"step {step}: training diverged (a rank saw a non-finite loss or gradient norm at or before "
                    f"step {v.step}; this rank's loss now {float(loss):.4g}, gradient norm "
                    f"{s.engine.grad_norm()}). Nothing of it was saved: the newest complete checkpoint under "
                    f"{s.run_dir}/checkpoints holds finite weights. If broken clips caused it, fix the data and "
                    f"`python jobs/launch.py --resume {s.run_dir}` continues from that checkpoint; a learning rate "
                    f"too high needs a new run with a lower optim.lr (now {s.cfg.optim.lr:g}) or a longer warm-up.")
            if v.bad_data:  # every rank stops here together (one alone would leave the others in a collective)
                mine = faults.exceeds(s.cfg.data.max_skip_fraction)
                who = f"step {step}, rank {s.rank}: " if mine else \
                    f"step {step}: another rank skipped too many samples; rank {s.rank}: "
                raise DataQualityError(
                    f"{faults.error(s.cfg.data.max_skip_fraction, who)}. Nothing of this step was saved; once the "
                    f"data is fixed, `python jobs/launch.py --resume {s.run_dir}` continues from the newest "
                    f"checkpoint")
            if logs:
                log_step(s, step, window, faults)
            improved = None
            if validates:
                t_val = time.perf_counter()
                metrics = s.validate()
                if s.planner is not None:
                    s.planner.validated(time.perf_counter() - t_val)
                if s.rank == 0:
                    s.sinks.log_metrics({**metrics, "gpu_hours": s.account.hours}, step)
                    log.info("step %d validation: %s", step, _fmt(metrics))
                improved = best.improved(metrics) if best is not None else None
                if s.rung is not None and s.rung(step, metrics):  # successive halving stopped this sweep member
                    v = Verdict(v.step, v.preempted, v.terminated, True, v.bad_data, v.diverged)
            if saves or v.stopping or improved:  # a new best is saved whatever ckpt_every says (keep_best)
                s.save(step)
            if improved:
                best.record(step, *improved)
            if s.planner is not None and not v.stopping:
                s.total = s.planner.after_step(step)  # the budget plan's total, re-fitted where due
            if v.stopping:
                return "preempted" if v.preempted else "terminated" if v.terminated else "budget"
        del batches  # the interval's workers exit; the next interval reseeds
    return "done"


def log_step(s: LoopState, step: int, window: dict[str, float], faults: FaultTally | None = None) -> None:
    elapsed = time.perf_counter() - window["t0"]
    faults = faults or FaultTally()
    loss_sum, wait, skipped, read = _all_reduce([float(window["loss"]), window["wait"], float(faults.skipped),
                                                 float(faults.read)], s.device)
    n = max(1, window["steps"])
    clips_per_s = n * s.plan.global_batch / max(elapsed, 1e-9)
    metrics = {
        "loss": loss_sum / (n * s.world_size),
        "lr": s.engine.lr,
        "epoch": step / s.per_epoch,
        "clips_per_s": clips_per_s,
        "data_wait_frac": min(1.0, wait / s.world_size / max(elapsed, 1e-9)),
        "memory_gib": _memory_gib(s.device),
        "gpu_hours": s.account.hours,
        # broken samples skipped since this attempt started, all ranks (the per-shard detail is in the log)
        "data/skipped": skipped,
        "data/skipped_fraction": skipped / read if read else 0.0,
        "data/samples_read": read,
    }
    if s.flops_per_clip:  # model FLOPs (forward + backward): mfu; with recomputed forwards: hfu
        metrics["tflops_per_s"] = clips_per_s * s.flops_per_clip / 1e12
        if s.peak_tflops:
            metrics["mfu"] = metrics["tflops_per_s"] / (s.peak_tflops * s.world_size)
            if s.hardware_flops_per_clip:
                metrics["hfu"] = clips_per_s * s.hardware_flops_per_clip / 1e12 / (s.peak_tflops * s.world_size)
    norm = s.engine.grad_norm()
    if norm is not None and math.isfinite(norm):
        metrics["grad_norm"] = norm
    if s.rank == 0:
        s.sinks.log_metrics(metrics, step)
        log.info("step %d/%d %s%s", step, s.total, _fmt({k: v for k, v in metrics.items() if "/" not in k}),
                 progress_note(step, s.total, elapsed / n, s.account))
        if skipped > window.get("skipped_seen", 0.0):  # new skips since the last metric line
            window["skipped_seen"] = skipped
            log.warning("step %d: %d of %d samples read were skipped as broken (%.3g%%, all ranks; "
                        "data.max_skip_fraction=%g per rank); this rank: %s", step, skipped, read,
                        100 * skipped / max(read, 1), s.cfg.data.max_skip_fraction, faults.describe(3))
        s.account.save()
    window.update(t0=time.perf_counter(), wait=0.0, steps=0, loss=0.0)


def progress_note(step: int, total: int, step_s: float, account: Budget) -> str:
    """`` | 42% eta 1h05m | 0.31 of 5000 gpu-hours``: where the run stands, for a person reading the log (the
    ETA at the last window's pace; the budget when the run has one)."""
    eta = max(0, total - step) * step_s
    note = f" | {100 * step / max(total, 1):.0f}% eta {format_duration(eta)}"
    budget = getattr(account, "budget", 0.0)
    if budget:
        note += f" | {account.hours:.4g} of {budget:g} {getattr(account, 'unit', 'gpu')}-hours"
    return note


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())

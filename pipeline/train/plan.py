"""Planning a run by its GPU-hour budget (``train.plan_by=budget``; docs/training.md "Planning by budget").

A budget alone only stops a run: a recipe planned for 15 epochs that reaches its budget at epoch 9 ends
mid-schedule, at a high learning rate. Planned by budget, the run instead measures what a step costs and fits its
number of steps so that training, the validations still to come and the final test protocol end at the budget;
the learning-rate schedule is laid over that total, so it ends where the budget ends.

Three pieces, each testable on its own:

* ``ProgressSchedule``: the recipe's schedule (linear warm-up, then cosine or the paper's steps) as a function
  of progress, a fraction of the planned total. Its shape comes from the recipe's epoch plan (its total
  ``T = train.max_steps or ceil(train.epochs x steps per epoch)``): warm-up ``warmup_epochs x per_epoch / T``,
  milestones ``lr_steps x per_epoch / T``; with a planned total of ``T`` it gives ``lr_factor``'s values. A
  re-fit anchors the progress reached at that step and spreads what is left over the new remaining steps, so
  the learning rate at the re-fit step is unchanged (bit for bit) and only its slope after changes.
  The scheduler saves it with the optimizer's checkpoint (``LambdaLR`` keeps a callable object's attributes,
  plain numbers here, so a weights-only load reads them back): a resumed run continues the plan it had.
* ``fit_total_steps``: the arithmetic. The largest total ``T`` with
  ``hours now + (T - step) x per-step cost + validations in (step, T] x a validation's cost + the test
  protocol's cost <= budget - plan_margin x (budget - hours now)``. The margin is a share of the hours still to
  plan, not of the whole budget: it covers the projection's error, which scales with how far the projection
  reaches, so the aim closes in on the budget as the run nears its end (a share of the whole budget left every
  run 2% of its budget unused: 10-20 steps of a one-minute run, several hours of a long one).
* ``BudgetPlanner``: the loop's hook. After a calibration window (``train.calibration_steps`` steps, after
  ``calibration_steps // 4`` skipped: start-up, compilation and the first steps' outliers) it measures the cost
  of a step from the GPU-hour account (devices x wall time, validation time taken out) and fits. Later fits
  measure a step's cost over as many recent steps as the plan has left to run (at least a calibration window;
  all of this attempt's steps while it has run fewer): the steps still to come are predicted by a window as
  long as they are, so a stall of a few seconds on a shared machine does not move a plan that has hundreds of
  steps to go, while a lasting change of speed still shows in full once the plan's end is near. (Measured over
  only the steps since the last fit, a shared machine's noise moved the total by up to 2x from one fit to the
  next, 17-28 re-fits in a one-minute run; each move changes the schedule's slope from there on.) A validation
  measures what a validation costs (until then: the clips' forward passes at a third of a training step's cost
  per clip). The test protocol is estimated from a validation's cost per clip times the test's views (videos x
  temporal clips x spatial crops): it runs once, at the end, when nothing is left to correct. At every metric
  line, after every validation, and at every step of the plan's last ``log_every`` steps (there only to shorten
  a plan that would overrun its aim), the planner projects
  where the run will end; when that ends short of the aim by more than one step's cost and by more than
  ``budget.refit_drift`` of the hours left, or past it by more than that share of the hours left, it re-fits
  (hysteresis: a few slow or fast steps do not move a long plan; near the end it is exact). A resumed
  run (another speed, another world size) calibrates again and re-fits. Every rank takes the same decisions:
  the measurements are reduced across ranks (their maximum) at steps all ranks reach.

The budget stop (``GpuHours.exhausted``) stays as the safety net: the planner aims below the budget.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from pipeline.config import RunConfig
from pipeline.distributed import group_rank_world

log = logging.getLogger("pipeline.train")

# a validation clip's forward pass against a training step per clip (forward + backward ~ 3 forwards): the
# estimate of a validation's cost until one is measured
FORWARD_SHARE = 1.0 / 3.0
EPS = 1e-12  # a milestone reached in floating point


def recipe_total(cfg: RunConfig, per_epoch: int) -> int:
    """The recipe's own number of steps (its epoch plan): the schedule's shape is defined over it."""
    return cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * per_epoch))


class ProgressSchedule:
    """The learning-rate multiplier as a function of progress through the planned total (a callable for
    ``LambdaLR``: ``schedule(step)``). Its attributes are plain numbers and lists, saved and restored with the
    scheduler's state; ``refit`` moves the total without moving the rate at the re-fit step."""

    def __init__(self, cfg: RunConfig, per_epoch: int, total: int | None = None) -> None:
        o = cfg.optim
        ref = recipe_total(cfg, per_epoch)
        self.kind = o.schedule  # cosine or steps
        self.warm = o.warmup_epochs * per_epoch / ref  # the warm-up's share of the run
        self.quantum = 1.0 / ref  # one step of the recipe's plan: warm-up counts the step being taken
        self.milestones = [e * per_epoch / ref for e in o.lr_steps]
        self.gamma = o.lr_gamma
        self.anchor_step = 0  # progress is anchor_progress at anchor_step, 1 at total, linear between
        self.anchor_progress = 0.0
        self.total = int(total or ref)
        self.version = 0  # fits so far (0: the provisional plan, the recipe's own total)

    def progress(self, step: int) -> float:
        """The fraction of the schedule done after ``step`` optimizer steps (at most 1)."""
        if step >= self.total:
            return 1.0  # exactly: the plan's last step leaves the schedule's final rate, not a rounding of it
        left = max(1, self.total - self.anchor_step)
        return min(1.0, self.anchor_progress + (step - self.anchor_step) * (1.0 - self.anchor_progress) / left)

    def factor(self, progress: float) -> float:
        """The multiplier at ``progress``: ``lr_factor``'s shape with epochs replaced by fractions of the run."""
        if self.warm > 0 and progress < self.warm:
            return (progress + self.quantum) / self.warm
        if self.kind == "cosine":
            done = min(1.0, max(0.0, (progress - self.warm) / max(self.quantum, 1.0 - self.warm)))
            return 0.5 * (1.0 + math.cos(math.pi * done))
        return self.gamma ** sum(1 for m in self.milestones if progress + EPS >= m)

    def __call__(self, step: int) -> float:
        return self.factor(self.progress(step))

    @property
    def final_factor(self) -> float:
        """The multiplier once the plan is done (cosine: 0; steps: gamma to the milestones passed)."""
        return self.factor(1.0)

    def refit(self, step: int, total: int) -> None:
        """From ``step`` on, the schedule ends at ``total`` (at least ``step + 1``): the progress reached at
        ``step`` is kept, so the rate there is unchanged, and the rest of the schedule spans the new remainder."""
        self.anchor_progress = self.progress(step)
        self.anchor_step = step
        self.total = max(int(total), step + 1)
        self.version += 1


def schedule_of(engine: Any) -> ProgressSchedule | None:
    """The ``ProgressSchedule`` behind an engine's scheduler (None for a run planned by epochs)."""
    lambdas = getattr(getattr(engine, "scheduler", None), "lr_lambdas", None) or []
    return lambdas[0] if lambdas and isinstance(lambdas[0], ProgressSchedule) else None


def validations_between(step: int, total: int, val_every: int) -> int:
    """Validations the loop runs after ``step`` up to ``total``: every ``val_every`` steps and at the end."""
    if val_every <= 0 or total <= step:
        return 0
    return total // val_every - step // val_every + (1 if total % val_every else 0)


@dataclass(frozen=True)
class Fit:
    """One fit of the plan: the total and what it was fitted from (GPU-hours of the run's account)."""

    total_steps: int
    step: int  # the step it was fitted at
    hours: float  # the account at that step
    gpu_hours_per_step: float
    val_gpu_hours: float  # one validation pass (measured, or estimated: val_measured)
    val_measured: bool
    validations: int  # still to come after ``step``
    test_gpu_hours: float  # the test protocol, estimated
    reserved_gpu_hours: float  # the validations still to come and the test protocol
    target_gpu_hours: float  # budget - margin x (budget - hours)
    budget_gpu_hours: float

    @property
    def projected_gpu_hours(self) -> float:
        """Where the account will stand after the test protocol, if every estimate holds."""
        return self.hours + (self.total_steps - self.step) * self.gpu_hours_per_step + self.reserved_gpu_hours


def fit_total_steps(step: int, hours: float, budget: float, margin: float, per_step: float, val_pass: float,
                    val_every: int, test: float, val_measured: bool = True) -> Fit:
    """The largest total ``T > step`` whose training, validations and test protocol fit ``budget - margin x
    (budget - hours)`` GPU-hours from ``hours`` spent at ``step`` (the margin is a share of the hours left: see
    the module's docstring); ``step + 1`` when nothing more fits (the budget stop is then the safety net)."""
    if per_step <= 0:
        raise ValueError(f"a step's cost must be positive to plan by it, got {per_step} GPU-hours")
    target = budget - margin * max(0.0, budget - hours)

    def cost(total: int) -> float:
        return (total - step) * per_step + validations_between(step, total, val_every) * val_pass + test

    room = target - hours
    per = per_step + (val_pass / val_every if val_every > 0 else 0.0)
    total = step + max(1, math.floor((room - test - (val_pass if val_every > 0 else 0.0)) / per))
    while total > step + 1 and cost(total) > room:
        total -= 1
    while cost(total + 1) <= room:
        total += 1
    n = validations_between(step, total, val_every)
    return Fit(total_steps=total, step=step, hours=hours, gpu_hours_per_step=per_step, val_gpu_hours=val_pass,
               val_measured=val_measured, validations=n, test_gpu_hours=test, reserved_gpu_hours=n * val_pass + test,
               target_gpu_hours=target, budget_gpu_hours=budget)


def _agreed(values: list[float], device: torch.device) -> list[float]:
    """The maximum over ranks of each value (every rank calls this at the same step)."""
    if group_rank_world()[1] <= 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.tolist()


class BudgetPlanner:
    """The training loop's planning hook for ``train.plan_by=budget`` (see the module's docstring).

    The loop calls ``validated(seconds)`` after each validation and ``after_step(step)`` after each step; the
    latter returns the run's total number of steps (changed by a fit). ``account`` is the run's GPU-hour
    account (``budget.GpuHours``), ``sinks`` rank 0's MLflow and metrics.jsonl."""

    def __init__(self, cfg: RunConfig, schedule: ProgressSchedule, account: Any, sinks: Any, *, rank: int,
                 device: torch.device, per_epoch: int, val_clips: int, test_views: int, resumed_step: int,
                 attempt: int = 1) -> None:
        t = cfg.train
        self.cfg, self.schedule, self.account, self.sinks = cfg, schedule, account, sinks
        self.rank, self.device, self.attempt = rank, device, attempt
        self.val_every = per_epoch if t.val_every == 0 else t.val_every
        self.val_clips, self.test_views = val_clips, test_views
        self.global_batch = t.global_batch
        self.log_every = t.log_every
        self.calibration = t.calibration_steps
        self.calibration_start = resumed_step + t.calibration_steps // 4
        self.calibration_end = self.calibration_start + t.calibration_steps
        if self.schedule.version == 0 and self.schedule.total <= self.calibration_end:
            # the recipe's own plan would end before the fit: the provisional plan runs past the calibration
            # (anchored where the run stands, as a re-fit is, so the rate does not move)
            self.schedule.anchor_progress = self.schedule.progress(resumed_step)
            self.schedule.anchor_step = resumed_step
            self.schedule.total = 2 * self.calibration_end
        self.mark: tuple[int, float, float] | None = None  # (step, hours, validation hours) where measuring began
        # (step, hours, validation hours) at the mark and at every step the planner looked since (agreed values)
        self.samples: list[tuple[int, float, float]] = []
        self.val_hours = 0.0  # validation hours this attempt (this rank)
        self.val_pass: float | None = None  # the newest validation's GPU-hours (this rank)
        self.validated_now = False
        self.fit: Fit | None = None
        self.fits: list[Fit] = []
        self.closing = False  # a fit found room for one more step only: the run ends there, no more re-fits

    @property
    def total(self) -> int:
        return self.schedule.total

    def validated(self, seconds: float) -> None:
        """A validation took ``seconds`` of wall time on this rank."""
        hours = seconds * self.account.devices / 3600
        self.val_hours += hours
        self.val_pass = hours
        self.validated_now = True

    def after_step(self, step: int) -> int:
        """After optimizer step ``step`` (its validation and checkpoint done): the run's total, re-fitted at the
        steps where that is due (the end of calibration; then metric lines and validations, when the
        projection misses)."""
        validated, self.validated_now = self.validated_now, False
        if self.mark is None and step >= self.calibration_start:
            # the first step the loop shows the planner at or after the start of calibration (the loop does not
            # call at every step: a short calibration_steps could otherwise fall between two calls and never fit)
            hours, val_hours = _agreed([self.account.hours, self.val_hours], self.device)
            self.mark = (step, hours, val_hours)
            self.samples = [self.mark]
            self.calibration_end = max(self.calibration_end, step + self.cfg.train.calibration_steps)
            return self.total
        if self.mark is None or step < self.calibration_end or self.closing or step >= self.total:
            return self.total  # (at the total the run has validated and saved its last step: it ends there)
        first = self.fit is None
        looks = first or validated or step % self.log_every == 0
        # between the plan's last metric line and its end: look at every step, for an overrun only (a run that
        # would pass its aim must end sooner; one that ends a few steps short loses little, and a window of a few
        # steps is too noisy to lengthen a plan by)
        ending = not looks and self.total - step < self.log_every
        if not looks and not ending:
            return self.total
        hours, val_hours, val_pass = _agreed([self.account.hours, self.val_hours, self.val_pass or -1.0], self.device)
        self.samples.append((step, hours, val_hours))
        per_step = max(self.step_cost(self.total - step), 1e-12)
        fit = self._fit(step, hours, per_step, val_pass if val_pass >= 0 else None)
        if not first:
            miss = self._projected(step, hours, per_step, fit) - fit.target_gpu_hours
            # the tolerance is a share of the training hours left (not of what is reserved for validations and the
            # test, which do not shrink as the run nears its end): it shrinks to nothing at the end
            drift = self.cfg.budget.refit_drift * max(0.0, fit.target_gpu_hours - hours - fit.reserved_gpu_hours)
            # an end short of the aim by less than a step is what a fit leaves (whole steps); an end past the aim
            # only within the drift and never past the budget itself, where the budget stop would cut the last steps
            over = min(drift, max(0.0, fit.budget_gpu_hours - fit.target_gpu_hours))
            if -max(per_step, drift) <= miss <= over or (ending and miss <= over):
                return self.total
        self._apply(step, fit, "calibrated" if first else "re-fit")
        self.closing = fit.total_steps <= step + 1
        return self.total

    def step_cost(self, horizon: int) -> float:
        """A training step's GPU-hours (validations taken out), averaged over the newest ``horizon`` steps the
        planner has seen (at least ``train.calibration_steps``; every step since the mark while there are fewer):
        the steps left to run are predicted by as many recent ones (see the module's docstring)."""
        step, hours, val_hours = self.samples[-1]
        span = max(self.calibration, horizon)
        start = self.samples[0]
        lo, hi = 0, len(self.samples) - 1  # the newest sample at least ``span`` steps back (steps are sorted)
        while lo <= hi:
            mid = (lo + hi) // 2
            if step - self.samples[mid][0] >= span:
                start, lo = self.samples[mid], mid + 1
            else:
                hi = mid - 1
        s_step, s_hours, s_val = start
        return (hours - s_hours - (val_hours - s_val)) / max(1, step - s_step)

    def _fit(self, step: int, hours: float, per_step: float, val_pass: float | None) -> Fit:
        measured = val_pass is not None
        if val_pass is None:  # no validation measured yet: its clips' forward passes
            val_pass = self.val_clips * per_step / self.global_batch * FORWARD_SHARE
        per_clip = val_pass / max(1, self.val_clips)
        b = self.cfg.budget
        return fit_total_steps(step, hours, b.gpu_hours, b.plan_margin, per_step, val_pass, self.val_every,
                               per_clip * self.test_views, val_measured=measured)

    def _projected(self, step: int, hours: float, per_step: float, fit: Fit) -> float:
        """Where the current total would end the run, at ``per_step`` and ``fit``'s reserves."""
        n = validations_between(step, self.total, self.val_every)
        return hours + (self.total - step) * per_step + n * fit.val_gpu_hours + fit.test_gpu_hours

    def _apply(self, step: int, fit: Fit, why: str) -> None:
        before = self.schedule(step)
        self.schedule.refit(step, fit.total_steps)
        assert self.schedule(step) == before  # the rate at the re-fit step never moves (ProgressSchedule.refit)
        self.fit = fit
        self.fits.append(fit)
        if self.rank != 0:
            return
        v = self.schedule.version
        unit = getattr(self.account, "unit", "gpu")
        log.info("plan v%d (%s at step %d): %d steps in all (%d to go) at %.4g %s-hours a step; %.4g reserved for "
                 "%d validation(s) at %.4g%s and the test protocol at %.4g (estimated); aiming at %.4g of the %g "
                 "budget (margin %g%% of the hours left), %.4g spent; the schedule continues at lr %.4g from "
                 "progress %.3f",
                 v, why, step, fit.total_steps, fit.total_steps - step, fit.gpu_hours_per_step, unit,
                 fit.reserved_gpu_hours, fit.validations, fit.val_gpu_hours, "" if fit.val_measured else " (estimated)",
                 fit.test_gpu_hours, fit.target_gpu_hours, fit.budget_gpu_hours, 100 * self.cfg.budget.plan_margin,
                 fit.hours, self.cfg.optim.lr * self.schedule(step), self.schedule.progress(step))
        self.sinks.log_metrics({"plan/version": float(v), "plan/total_steps": float(fit.total_steps),
                                "plan/gpu_hours_per_step": fit.gpu_hours_per_step,
                                "plan/reserved_gpu_hours": fit.reserved_gpu_hours,
                                "plan/val_gpu_hours": fit.val_gpu_hours, "plan/test_gpu_hours": fit.test_gpu_hours,
                                "plan/target_gpu_hours": fit.target_gpu_hours,
                                "plan/projected_gpu_hours": fit.projected_gpu_hours}, step)
        if v == 1 and self.attempt == 1:  # MLflow params are immutable: the first plan; re-fits are the metrics
            self.account.save()  # a restart counts as another attempt: it never logs these params again
            self.sinks.log_params({"plan.total_steps": fit.total_steps, "plan.fitted_at_step": step,
                                   "plan.gpu_hours_per_step": f"{fit.gpu_hours_per_step:.6g}",
                                   "plan.reserved_gpu_hours": f"{fit.reserved_gpu_hours:.6g}",
                                   "plan.val_gpu_hours": f"{fit.val_gpu_hours:.6g}",
                                   "plan.test_gpu_hours": f"{fit.test_gpu_hours:.6g}",
                                   "plan.target_gpu_hours": f"{fit.target_gpu_hours:.6g}"})

    def summary(self) -> dict[str, Any]:
        """The plan as it ended: for result.json and the end of the run's log."""
        last = asdict(self.fit) if self.fit is not None else None
        return {"version": self.schedule.version, "total_steps": self.total, "fits_this_attempt": len(self.fits),
                "last_fit": last, "final_lr_factor": self.schedule.final_factor}

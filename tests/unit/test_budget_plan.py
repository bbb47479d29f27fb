"""Planning a run by its GPU-hour budget (``train.plan_by=budget``, pipeline/train/plan.py): the fit's arithmetic,
the schedule over progress, re-fits without a jump in the learning rate, resume, the budget stop as safety net,
and one real run that ends by its plan."""

from __future__ import annotations

import json
import math
import socket
from types import SimpleNamespace

import pytest
import torch

from pipeline.config import ConfigError, batch_plan, dump, load_recipe, lr_factor
from pipeline.models.timesformer import TimeSformer, model_config
from pipeline.train import checkpoint as ckpt
from pipeline.train.engine import TorchEngine, build_scheduler
from pipeline.train.loop import LoopState, train_loop
from pipeline.train.plan import (
    BudgetPlanner,
    ProgressSchedule,
    fit_total_steps,
    schedule_of,
    validations_between,
)


def old_lr_factor(cfg, step: int, per_epoch: int) -> float:
    """``lr_factor`` as it was before planning by budget (frozen here: the epoch plan must not move)."""
    epoch = step / per_epoch
    o = cfg.optim
    if o.warmup_epochs > 0 and epoch < o.warmup_epochs:
        return (epoch + 1.0 / per_epoch) / o.warmup_epochs
    if o.schedule == "cosine":
        total = cfg.train.max_steps or math.ceil(cfg.train.epochs * per_epoch)
        start = o.warmup_epochs * per_epoch
        progress = min(1.0, max(0.0, (step - start) / max(1.0, total - start)))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return o.lr_gamma ** sum(1 for e in o.lr_steps if epoch >= e)


SCHEDULES = [("k400_base", [], 37), ("k400_base", ["optim.warmup_epochs=1.5"], 37), ("demo_order", [], 24),
             ("demo_order", ["optim.schedule=steps", "optim.lr_steps=[20,40]", "optim.warmup_epochs=2"], 24),
             ("smoke", ["optim.schedule=cosine", "optim.warmup_epochs=0.5", "train.max_steps=0"], 5)]


@pytest.mark.parametrize("recipe,overrides,per_epoch", SCHEDULES)
def test_the_epoch_plan_keeps_its_learning_rates_bit_for_bit(recipe, overrides, per_epoch):
    cfg = load_recipe(recipe, overrides)
    assert cfg.train.plan_by == "epochs"  # the default: recipes unchanged
    total = cfg.train.max_steps or math.ceil(cfg.train.epochs * per_epoch)
    steps = range(0, total + 3)
    assert [lr_factor(cfg, s, per_epoch) for s in steps] == [old_lr_factor(cfg, s, per_epoch) for s in steps]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    sched = build_scheduler(opt, cfg, per_epoch)
    assert schedule_of(SimpleNamespace(scheduler=sched)) is None
    assert sched.state_dict()["lr_lambdas"] == [None]  # a plain function: checkpoints keep their layout


@pytest.mark.parametrize("recipe,overrides,per_epoch", SCHEDULES)
def test_the_schedule_over_progress_is_the_epoch_schedule_when_the_fit_gives_the_epoch_total(recipe, overrides,
                                                                                             per_epoch):
    cfg = load_recipe(recipe, [*overrides, "train.plan_by=budget", "budget.gpu_hours=1"])
    schedule = ProgressSchedule(cfg, per_epoch)
    total = cfg.train.max_steps or math.ceil(cfg.train.epochs * per_epoch)
    assert schedule.total == total
    for s in range(total + 3):
        assert schedule(s) == pytest.approx(old_lr_factor(cfg, s, per_epoch), abs=1e-12), s
    assert schedule.milestones == pytest.approx([e * per_epoch / total for e in cfg.optim.lr_steps])


def test_plan_by_budget_needs_a_budget_and_known_values():
    with pytest.raises(ConfigError, match=r"train.plan_by=budget fits the run to budget.gpu_hours.*set budget"):
        load_recipe("demo_order", ["train.plan_by=budget"])
    with pytest.raises(ConfigError, match=r"train.plan_by"):
        load_recipe("demo_order", ["train.plan_by=time", "budget.gpu_hours=1"])
    with pytest.raises(ConfigError, match=r"budget.plan_margin"):
        load_recipe("demo_order", ["train.plan_by=budget", "budget.gpu_hours=1", "budget.plan_margin=0.7"])


def test_the_fit_reserves_validations_and_the_test_and_takes_the_largest_total_that_fits():
    # 0.205 spent at step 20; a step 0.01, a validation 0.05 every 50 steps (and one at the end), the test 0.1:
    # (T - 20) x 0.01 + validations x 0.05 + 0.1 <= 1.795. T = 169: 1.49 + 4 x 0.05 + 0.1 = 1.79; T = 170: 1.8
    fit = fit_total_steps(20, 0.205, budget=2.0, margin=0.0, per_step=0.01, val_pass=0.05, val_every=50, test=0.1)
    assert (fit.total_steps, fit.validations) == (169, 4)  # at 50, 100, 150 and the last step
    assert fit.reserved_gpu_hours == pytest.approx(0.3) and fit.projected_gpu_hours == pytest.approx(1.995)
    assert fit_total_steps(20, 0.205, 2.0, 0.0, 0.01, 0.05, -1, 0.1).total_steps == 189  # no validations
    # the margin is a share of the hours left: aims at 2 - 0.1 x (2 - 0.205) = 1.8205: 151.55 steps -> 171
    margin = fit_total_steps(20, 0.205, 2.0, 0.1, 0.01, 0.05, -1, 0.1)
    assert (margin.total_steps, margin.target_gpu_hours) == (171, pytest.approx(1.8205))
    late = fit_total_steps(900, 1.9, 2.0, 0.1, 0.01, 0.05, -1, 0.01)  # 0.1 left: aims at 1.99, 8 steps, not -2
    assert (late.total_steps, late.target_gpu_hours) == (908, pytest.approx(1.99))
    assert fit_total_steps(20, 1.99, 2.0, 0.0, 0.01, 0.05, 50, 0.1).total_steps == 21  # nothing fits: next step
    with pytest.raises(ValueError, match="positive"):
        fit_total_steps(20, 0.2, 2.0, 0.0, 0.0, 0.05, 50, 0.1)
    for step, hours, per_step, val, every in ((0, 0.0, 0.003, 0.02, 7), (13, 0.4, 0.0071, 0.1, 25), (5, 1, 0.02, 0, 1)):
        fit = fit_total_steps(step, hours, 3.0, 0.02, per_step, val, every, 0.05)

        def cost(t, step=step, hours=hours, per_step=per_step, val=val, every=every):
            return hours + (t - step) * per_step + validations_between(step, t, every) * val + 0.05
        assert cost(fit.total_steps) <= fit.target_gpu_hours < cost(fit.total_steps + 1)


def test_validations_counted_as_the_loop_runs_them():
    for step, total, every in ((0, 100, 10), (3, 95, 10), (10, 10, 10), (7, 8, 3), (0, 5, -1)):
        loop = sum(1 for s in range(step + 1, total + 1) if every > 0 and (s % every == 0 or s == total))
        assert validations_between(step, total, every) == loop


def scheduled(cfg, per_epoch: int):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    sched = build_scheduler(opt, cfg, per_epoch)
    return opt, sched, schedule_of(SimpleNamespace(scheduler=sched))


def lrs_through(opt, sched, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        opt.step()
        sched.step()
        out.append(sched.get_last_lr()[0])
    return out


@pytest.mark.parametrize("overrides,refit_at", [([], 100), ([], 5),  # cosine, after and during the warm-up
                                                (["optim.schedule=steps", "optim.lr_steps=[20,40]"], 300)])
def test_a_refit_changes_the_remaining_steps_without_a_jump_in_the_learning_rate(overrides, refit_at):
    cfg = load_recipe("demo_order", [*overrides, "train.plan_by=budget", "budget.gpu_hours=1"])
    opt, sched, schedule = scheduled(cfg, 24)
    lrs_through(opt, sched, refit_at)
    before = sched.get_last_lr()[0]  # the rate of the next step
    typical = max(abs(a - b) for a, b in zip(lrs_through(*scheduled(cfg, 24)[:2], 600)[:-1],
                                             lrs_through(*scheduled(cfg, 24)[:2], 600)[1:], strict=True))
    factor = schedule(refit_at)
    assert before == pytest.approx(cfg.optim.lr * factor, rel=1e-15)
    schedule.refit(refit_at, 500)  # the budget allows 500 steps, not the recipe's 1200
    assert schedule(refit_at) == factor  # exactly the rate it had
    after = lrs_through(opt, sched, 500 - refit_at)
    assert abs(after[0] - before) <= 3 * typical + 1e-12  # the next step moves as a step moves, no jump
    naive = cfg.optim.lr * ProgressSchedule(cfg, 24, total=500)(refit_at)  # the schedule restarted over 500 steps
    assert abs(naive - before) > 10 * (abs(after[0] - before) + 1e-9) or refit_at < 12
    assert after[-1] == pytest.approx(cfg.optim.lr * schedule.final_factor)  # ends at 500 at its final value
    assert schedule.progress(500) == 1.0
    if cfg.optim.schedule == "steps":  # the milestones are fractions: 20 and 40 of 50 epochs, passed by progress
        drops = [refit_at + 1 + i for i in range(1, len(after)) if after[i] < after[i - 1]]
        assert len(drops) == 2
        for at, fraction in zip(drops, (0.4, 0.8), strict=True):
            assert schedule.progress(at - 1) < fraction <= schedule.progress(at)


class FakeAccount:
    """A GPU-hour account on a clock that the test moves: ``cost(step)`` hours for each step."""

    def __init__(self, budget: float, cost, hours: float = 0.0) -> None:
        self.budget, self.cost, self.hours = budget, cost, hours
        self.devices, self.unit, self.attempts = 1, "cpu-process", [{}]

    @property
    def exhausted(self) -> bool:
        return self.hours >= self.budget

    def save(self) -> None:
        pass


class Sinks:
    def __init__(self) -> None:
        self.metrics: list[dict] = []
        self.params: dict = {}

    def log_metrics(self, metrics, step):
        self.metrics.append({"step": step, **metrics})

    def log_params(self, params):
        assert not set(params) & set(self.params), "MLflow params are immutable"
        self.params.update(params)


class ClockedEngine:
    """An engine whose step costs nothing but moves the fake account by ``account.cost(step)``, with the real
    progress schedule behind its scheduler."""

    def __init__(self, cfg, per_epoch: int, account: FakeAccount) -> None:
        self.opt, self.scheduler, _ = scheduled(cfg, per_epoch)
        self.cfg, self.account, self.steps = cfg, account, 0

    global_step = property(lambda self: self.steps)
    lr = property(lambda self: self.scheduler.get_last_lr()[0])

    def train_micro_batch(self, video, label):
        self.steps += 1
        self.opt.step()
        self.scheduler.step()
        self.account.hours += self.account.cost(self.steps)
        return torch.tensor(1.0)

    def grad_norm(self):
        return 1.0

    def grad_norm_tensor(self):
        return torch.tensor(1.0)


def clocked_run(tmp_path, cost, budget=1.0, overrides=(), resumed=0, engine=None, hours=0.0, test_views=0):
    cfg = load_recipe("demo_order", ["train.plan_by=budget", f"budget.gpu_hours={budget}", "train.global_batch=8",
                                     "train.micro_batch=8", "train.val_every=-1", "train.log_every=10",
                                     "train.calibration_steps=8", "train.ckpt_every=1000000", *overrides])
    account = FakeAccount(budget, cost, hours)
    engine = engine or ClockedEngine(cfg, 48, account)
    engine.account = account
    sinks = Sinks()
    planner = BudgetPlanner(cfg, schedule_of(engine), account, sinks, rank=0, device=torch.device("cpu"),
                            per_epoch=48, val_clips=96, test_views=test_views, resumed_step=resumed)
    batch = {"video": torch.zeros(8, 1), "label": torch.zeros(8, dtype=torch.long)}

    def batches(s, step):
        def endless():
            while True:
                yield batch
        return endless(), 10**12

    state = LoopState(cfg=cfg, engine=engine, plan=batch_plan(cfg, 1), index=None, storage=None, clip=None, rank=0,
                      world_size=1, device=torch.device("cpu"), per_epoch=48, total=planner.total, run_dir=tmp_path,
                      sinks=sinks, account=account, stop=SimpleNamespace(reason=None), save=lambda step: None,
                      validate=dict, batches=batches, planner=planner)
    return train_loop(state), state, planner, sinks, engine


def test_the_run_ends_by_its_plan_within_a_step_of_the_budget_and_refits_when_the_speed_drifts(tmp_path):
    # 1 hour, a step 0.002 hours, then from step 200 on 0.003: the first plan (about 490 steps) would overrun
    outcome, state, planner, sinks, engine = clocked_run(tmp_path, lambda s: 0.002 if s < 200 else 0.003)
    assert outcome == "done" and engine.global_step == state.total == planner.total
    # the first fit aims at 1 - 2% of the 0.98 hours left: (0.9804 - 0.02) / 0.002 = 480 more steps
    assert planner.fits[0].total_steps == 490 and planner.fits[0].step == 10  # 2 + 8
    assert planner.schedule.version >= 2 and planner.fits[-1].total_steps < 420  # re-fitted to the slower steps
    # the margin is a share of the hours left, so the aim closes in on the budget: the run ends within one step
    # of the budget itself, under it (no test protocol here), not 2% of the budget short of it
    assert 0 <= 1.0 - state.account.hours < 0.003
    assert engine.lr == pytest.approx(engine.cfg.optim.lr * planner.schedule.final_factor) and engine.lr == 0.0
    assert sinks.params["plan.total_steps"] == planner.fits[0].total_steps  # the first plan as params ...
    versions = [m for m in sinks.metrics if "plan/version" in m]  # ... every plan as metrics
    assert [m["plan/version"] for m in versions] == list(range(1, planner.schedule.version + 1))
    lrs = [m["lr"] for m in sinks.metrics if "lr" in m]
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False))  # cosine after warm-up: never back up


def test_the_budget_stop_still_fires_when_the_plan_cannot_see_it_coming(tmp_path):
    # one step stalls for half the budget: no projection could see it coming
    outcome, state, planner, _, engine = clocked_run(tmp_path, lambda s: 0.5 if s == 300 else 0.002,
                                                     overrides=["train.log_every=1000"])
    assert outcome == "budget" and engine.global_step <= 301  # the step read after the stall's, at the latest
    assert planner.fits[0].total_steps > 400 and state.account.hours >= 1.0


def test_a_slowdown_after_the_last_metric_line_shortens_the_plan_at_once(tmp_path):
    # metric lines every 50 steps; the last before the end is at step 450, and from step 480 on a step costs twice
    # as much: only a look at every step of the plan's last 50 sees the overrun coming (without it, the budget
    # stop cut the run at step 491 of 497, short of the schedule's end)
    outcome, state, planner, _, engine = clocked_run(tmp_path, lambda s: 0.002 if s < 480 else 0.004,
                                                     overrides=["train.log_every=50"])
    assert outcome == "done" and engine.global_step == planner.total < 497
    assert any(480 < f.step < planner.total and f.step % 50 for f in planner.fits)  # re-fitted between lines
    assert 0 <= 1.0 - state.account.hours < 0.004 and engine.lr == 0.0


def test_a_few_slow_steps_do_not_move_a_long_plan(tmp_path):
    """A shared machine: every 100 steps, 20 steps run 2.5 times slower (another job's burst), 0.0026 hours a step
    on average. Measured over the steps since the last fit, each burst looked like the new speed: the total
    swung between 318 and 459 steps. Measured over as many recent steps as the plan has left, it stays within a
    few percent of where the run ends."""
    def cost(s: int) -> float:
        return 0.005 if s % 100 >= 80 else 0.002
    outcome, state, planner, sinks, engine = clocked_run(tmp_path, cost, overrides=["train.calibration_steps=16"])
    assert outcome == "done" and 0 <= 1.0 - state.account.hours < 0.005  # within one (slow) step of the budget
    final = planner.total
    assert final == pytest.approx(1.0 / 0.0026, rel=0.03)
    after_calibration = [f.total_steps for f in planner.fits if f.step >= 100]  # once a burst has been seen
    assert max(abs(t - final) for t in after_calibration) <= 0.1 * final, [(f.step, f.total_steps)
                                                                          for f in planner.fits]
    assert engine.lr == 0.0  # the plan ended it, at the cosine's final rate


def test_a_resume_at_another_speed_refits_from_the_checkpointed_plan(tmp_path):
    cfg = load_recipe("smoke", [f"data.index={tmp_path}", "train.engine=torch", "train.zero_stage=0",
                                "train.plan_by=budget", "budget.gpu_hours=1", "optim.schedule=cosine"])
    run = tmp_path / "run"

    def engine():
        torch.manual_seed(0)
        return TorchEngine(TimeSformer(model_config(cfg)), cfg, batch_plan(cfg, 1), per_epoch=10,
                           device=torch.device("cpu"))
    first = engine()
    schedule = schedule_of(first)
    schedule.refit(0, 400)  # the first attempt's plan: 400 steps at 0.0025 hours a step
    for _ in range(3):
        first.scheduler.step()
        first.steps += 1
    first.save(ckpt.checkpoint_root(run), ckpt.tag_for(3), {"step": 3})
    lr_saved = first.lr
    second = engine()  # another attempt: weights-only load of the checkpoint, the plan with it
    second.load(ckpt.checkpoint_root(run), ckpt.tag_for(3))
    resumed = schedule_of(second)
    assert (resumed.total, resumed.version, second.lr) == (400, 1, lr_saved)
    # this attempt's steps cost twice as much (half the GPUs, say): 0.3 of the hour left after step 3 is spent
    cost = 0.0045
    account = FakeAccount(1.0, lambda s: cost, hours=0.3)
    sinks = Sinks()
    planner = BudgetPlanner(cfg, resumed, account, sinks, rank=0, device=torch.device("cpu"), per_epoch=10,
                            val_clips=0, test_views=0, resumed_step=3, attempt=2)
    assert planner.total == 400 and planner.calibration_end == 3 + 5 + 20
    for step in range(4, 40):
        account.hours += cost
        before = resumed(step)
        planner.after_step(step)
        assert resumed(step) == before  # no re-fit moves the rate at its step
    assert resumed.version == 2 and planner.fits[0].step == 28
    # 0.4125 = 0.3 + 25 x 0.0045 spent at step 28, 1 - 2% x 0.5875 = 0.98825 aimed at: 127 more steps at the
    # new speed (400 was the old plan)
    assert planner.total == 28 + 127 and planner.fits[0].gpu_hours_per_step == pytest.approx(cost)
    assert not sinks.params  # the params are the first attempt's first plan; re-fits go to metrics
    assert [m["plan/version"] for m in sinks.metrics] == [2.0]


@pytest.fixture
def colour_index(tmp_path):
    from tests.synthetic_data import write_dataset

    root = tmp_path / "colour"
    write_dataset(str(root), "colour", per_class={"train": 8, "val": 2})
    return root


class VirtualClock:
    """Seconds that pass only when the run works: ``step_s`` per optimizer step and ``clip_s`` per clip that a
    validation or the test protocol runs through the model; start-up, data, checkpoints and the machine's load cost
    nothing. It replaces the GPU-hour account's clock (``pipeline.train.budget.clock``) and the loop's timer, so a
    run planned by budget is exact and the same on any machine."""

    def __init__(self, step_s: float, clip_s: float) -> None:
        self.now, self.step_s, self.clip_s = 1_000_000.0, step_s, clip_s
        self.steps = self.clips = 0

    def __call__(self) -> float:
        return self.now

    def install(self, monkeypatch) -> None:
        from pipeline.train import budget
        from pipeline.train import loop as train_loop_module
        from pipeline.train import main as train_main

        monkeypatch.setattr(budget, "clock", self)
        monkeypatch.setattr(train_main, "process_start_time", self)  # the account starts at the run's start
        monkeypatch.setattr(train_loop_module, "time", SimpleNamespace(perf_counter=self))  # validation timing
        micro_batch = TorchEngine.train_micro_batch

        def stepping(engine, video, label):
            before = engine.global_step
            out = micro_batch(engine, video, label)
            if engine.global_step != before:  # an optimizer step (the last micro-batch of an accumulation)
                self.steps += 1
                self.now += self.step_s
            return out

        def forward_clips(fn):
            def counted(module, *args, **kwargs):
                def hook(_module, inputs, _output):
                    self.clips += inputs[0].shape[0]
                    self.now += self.clip_s * inputs[0].shape[0]

                handle = module.register_forward_hook(hook)
                try:
                    return fn(module, *args, **kwargs)
                finally:
                    handle.remove()
            return counted

        monkeypatch.setattr(TorchEngine, "train_micro_batch", stepping)
        monkeypatch.setattr(train_main, "validate", forward_clips(train_main.validate))
        monkeypatch.setattr(train_main, "test_protocol", forward_clips(train_main.test_protocol))


def test_a_real_run_ends_by_its_plan_at_its_budget_with_the_final_rate_and_the_test(tmp_path, colour_index,
                                                                                  monkeypatch):
    """The plain engine on the CPU, the smoke recipe's tiny model, a budget of 8 s on a virtual clock (1/8 s a step,
    a validation clip a third of a training clip): the plan (not the budget stop) ends it at exactly the last step
    that fits, within one step of the budget, at the schedule's final rate, then the test protocol.

    No wall-clock variant is kept: on a loaded machine any run timed by the wall clock can spend its budget on a
    stall and end by the budget stop, which is correct behaviour and not what this test is about."""
    from pipeline.train import main as train_main

    budget_s, step_s, val_every = 8.0, 0.125, 20
    cfg = load_recipe("smoke", [f"data.index={colour_index}", "train.engine=torch", "train.zero_stage=0",
                                "train.activation_checkpointing=none", "data.num_workers=0", "train.plan_by=budget",
                                f"budget.gpu_hours={budget_s / 3600!r}", "budget.plan_margin=0",
                                "train.calibration_steps=8", f"train.val_every={val_every}", "train.log_every=5",
                                "train.ckpt_every=1000", "optim.schedule=cosine", "optim.warmup_epochs=1",
                                "test.temporal_clips=1", "test.spatial_crops=1", "tracking.register=false"])
    # a validation clip costs what the planner assumes before it measures one (a third of a training clip): the
    # first fit is then exact, and so is the test protocol's estimate (its views at a validation clip's cost)
    clip_s = step_s / cfg.train.global_batch / 3
    clock = VirtualClock(step_s, clip_s)
    clock.install(monkeypatch)
    with socket.socket() as sock:  # the run's rendezvous on a free port: another run on this machine may hold 29500
        sock.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_PORT", str(sock.getsockname()[1]))
    run = tmp_path / "runs" / "plan"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump(cfg))
    threads = torch.get_num_threads()
    try:
        result = train_main.run(run)
    finally:
        torch.set_num_threads(threads)  # the recipe's OMP_NUM_THREADS=1 applied to this process
    assert result["outcome"] == "done" and result["exit_code"] == 0, result  # the plan ended it, not the budget
    plan = result["plan"]
    fit = plan["last_fit"]
    # the largest total whose steps, validations (every 20 steps and at the end) and test fit 8 s: 62 steps
    val_s, test_s = 8 * clip_s, 8 * clip_s  # 2 clips of each of 4 classes in val, which is also the test split

    def spent(total: int) -> float:
        return total * step_s + validations_between(0, total, val_every) * val_s + test_s

    expected = max(t for t in range(1, 1000) if spent(t) <= budget_s)
    assert expected == 62 and spent(expected + 1) > budget_s
    assert result["step"] == plan["total_steps"] == expected and clock.steps == expected, (result, plan)
    assert plan["version"] == 1 and fit["step"] == 2 + 8 and fit["val_measured"] is False  # one fit, exact
    assert fit["gpu_hours_per_step"] == pytest.approx(step_s / 3600, rel=1e-9)
    assert fit["test_gpu_hours"] == pytest.approx(test_s / 3600, rel=1e-9)
    assert clock.clips == 8 * validations_between(0, expected, val_every) + 8  # the validations, then the test
    # training and the test protocol end at exactly what the plan projected, within one step of the budget
    assert plan["gpu_hours_after_test"] == pytest.approx(spent(expected) / 3600, rel=1e-9)
    assert plan["test_gpu_hours_measured"] == pytest.approx(test_s / 3600, rel=1e-9)
    left = cfg.budget.gpu_hours - plan["gpu_hours_after_test"]
    assert 0 < left < step_s / 3600, left * 3600
    assert json.loads((run / "gpu_hours.json").read_text())["hours"] >= plan["gpu_hours_after_test"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["step"] == result["step"] and "lr" in r][-1]
    assert last["lr"] == pytest.approx(cfg.optim.lr * plan["final_lr_factor"]) and last["lr"] == 0.0
    assert max(r["lr"] for r in rows if "lr" in r) == pytest.approx(cfg.optim.lr, rel=0.05)
    assert "test_top1" in result and (run / "eval" / "test.json").exists()  # the test protocol ran
    assert (run / "export" / "model.safetensors").exists()
    assert any("plan/total_steps" in r for r in rows)


@pytest.mark.parametrize("calibration", [1, 4, 7])
def test_a_short_calibration_window_still_fits_the_plan(tmp_path, calibration):
    # the loop does not show the planner every step: a calibration start between two calls must not be missed
    outcome, state, planner, sinks, engine = clocked_run(tmp_path, lambda s: 0.002,
                                                         overrides=[f"train.calibration_steps={calibration}"])
    assert planner.fits and outcome == "done" and engine.lr == 0.0


def test_a_plan_never_accepts_a_projection_past_the_budget_when_the_test_reserve_is_large(tmp_path):
    # the test protocol is estimated at half the budget (6000 views at a 24th of a step each); steps 4% slower from
    # step 150: a tolerance measured over all the hours left (the test's reserve included) accepted a plan whose
    # training plus test ended 3.5 steps past the budget
    outcome, state, planner, sinks, engine = clocked_run(tmp_path, lambda s: 0.002 if s < 150 else 0.00208,
                                                         test_views=6000)
    test = 0.00208 / 24 * 6000  # what the test costs at the true step cost
    assert outcome == "done" and len(planner.fits) >= 2
    fits = [(f.step, f.total_steps) for f in planner.fits]
    assert state.account.hours + test <= 1.0, (state.account.hours, test, fits)

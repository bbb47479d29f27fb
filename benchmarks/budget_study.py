#!/usr/bin/env python
"""Planning by budget against planning by epochs, at the same GPU-hour budget, on the demo's task, over seeds.

Two arms per seed, the same recipe (configs/recipes/demo_order.yaml, its cosine schedule with warm-up), the same
budget in CPU-process-hours (one process, one thread: wall time), the same data and initial weights:

* ``epochs``: the recipe as it is (1200 steps planned), stopped by the budget (``budget.gpu_hours``) wherever
  its schedule then stands, then the final evaluation (what a budget did before ``train.plan_by``);
* ``budget``: ``train.plan_by=budget``: after its calibration window the run fits its number of steps so that
  training, its validations and the final evaluation end at the budget, and the schedule runs to its end.

Both train through the product's loop (``pipeline.train.loop.train_loop``: the budget stop, validation every
``--every`` steps, the planner's hooks), the product's engine (``make_engine``: optimizer, ``build_scheduler``)
and GPU-hour account (``pipeline.train.budget.GpuHours``), as ``benchmarks/demo_study.py`` does (the demo's
synthetic videos made in memory, the recipe's sampler and transforms, the torch engine at fp32 on the CPU).
The final evaluation is the validation pass of the final weights (96 clips, one centre view each); the
planner reserves its cost as the test protocol (one view per clip). The accounts start when training starts.

    python benchmarks/budget_study.py --clock virtual --budget-s 52 --seeds 0 1 2 3 4   # ~500 steps, exact
    python benchmarks/budget_study.py --clock virtual --budget-s 102 --seeds 0 1 2      # ~1000 steps
    python benchmarks/budget_study.py --budget-s 60 --seeds 0 1 2                       # wall time

Prints per seed and arm: the steps run, how it ended, the learning rate at the end, the hours used, the final
top-1 and validation loss, the budget arm's plan versions; then mean, min and max per arm, and a table per seed.
Arms run in parallel processes (--jobs), one thread each. With the default ``--clock wall`` the budget is wall
time, so a machine busy with other work gives both arms fewer steps, though not always alike (the budget arm's
total, and so its learning rates, follow the machine's speed). ``--clock virtual`` charges fixed costs instead
(``VirtualClock``): both arms get the steps the budget buys on any machine, and the comparison is repeatable.
Results: benchmarks/results/budget-study-cpu-2core.log.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

RECIPE = "demo_order"


class VirtualClock:
    """``--clock virtual``: seconds that pass only when the run works, ``step_s`` an optimizer step and a third of a
    training clip's share of it per validation clip (what the planner assumes before it measures one); start-up,
    data and the machine's load cost nothing. Both arms then get exactly the steps the budget buys, whatever else
    the machine runs: the comparison is of the schedules alone, and repeatable."""

    def __init__(self, step_s: float, clip_s: float) -> None:
        self.now, self.step_s, self.clip_s = 1_000_000.0, step_s, clip_s

    def __call__(self) -> float:
        return self.now

    def stepping(self, engine):
        inner = engine.train_micro_batch

        def step(video, label):
            before = engine.global_step
            out = inner(video, label)
            if engine.global_step != before:
                self.now += self.step_s
            return out
        return step


def run_one(setting: dict) -> dict:
    import numpy as np
    import torch
    from demo_study import PINNED

    from pipeline.config import batch_plan, load_recipe, steps_per_epoch, total_steps
    from pipeline.data.loader import clip_config
    from pipeline.data.synthetic import ORDER_CLASSES, balanced_order_spec, order_frames
    from pipeline.data.transforms import TestTransform, TrainTransform
    from pipeline.data.video import FixedRateSampler
    from pipeline.models.registry import build, model_config
    from pipeline.train.budget import GpuHours
    from pipeline.train.engine import make_engine
    from pipeline.train.evaluate import validate
    from pipeline.train.loop import LoopState, train_loop
    from pipeline.train.main import build_model
    from pipeline.train.parallelize import prepare_model
    from pipeline.train.plan import FORWARD_SHARE, BudgetPlanner, schedule_of

    torch.set_num_threads(1)
    s = setting
    hours = s["budget_s"] / 3600
    overrides = [f"train.seed={s['seed']}", f"train.val_every={s['every']}", "train.log_every=20",
                 f"budget.gpu_hours={hours}", *s["extra"], *PINNED]
    if s["arm"] == "budget":
        overrides += ["train.plan_by=budget", f"train.calibration_steps={s['calibration']}"]
    cfg = load_recipe(RECIPE, overrides)
    cc = clip_config(cfg)
    temporal = FixedRateSampler(cc.num_frames, cc.sampling_rate, cc.ref_fps, cc.short_video)
    train_tf = TrainTransform(crop=cc.crop, scale=cc.scale, flip=cc.flip, output=cc.output)
    test_tf = TestTransform(crop=cc.crop, num_crops=1, output=cc.output)
    spec = balanced_order_spec(cc.sampling_rate / cc.ref_fps, square=32)  # what jobs/demo.py makes

    def corpus(per_class: int, base: int) -> list:
        return [(order_frames(c, np.random.default_rng(base + 10007 * ci + i), spec), ci)
                for ci, c in enumerate(ORDER_CLASSES) for i in range(per_class)]

    train, val = corpus(96, 1), corpus(24, 999_999)
    duration = spec.num_frames / spec.fps

    def clip(frames, rng, training: bool) -> torch.Tensor:
        times = temporal.sample(duration, rng, position="random" if training else "center").times
        picked = [frames[max(0, min(spec.num_frames - 1, math.floor(t * spec.fps + 1e-9)))] for t in times]
        return train_tf(picked, rng) if training else test_tf(picked)[0]

    device = torch.device("cpu")
    plan = batch_plan(cfg, 1)
    vclock = None
    if s["clock"] == "virtual":  # the account's clock and the loop's timer see only the work, at fixed costs
        from pipeline.train import budget as budget_module
        from pipeline.train import loop as loop_module

        vclock = VirtualClock(s["step_s"], s["step_s"] / cfg.train.global_batch * FORWARD_SHARE)
        budget_module.clock = vclock  # this process runs one setting: nothing else reads these
        loop_module.time = SimpleNamespace(perf_counter=vclock)
    per_epoch = steps_per_epoch(cfg, len(train))
    mcfg = model_config(cfg)
    model = build_model(cfg)
    prepare_model(model, cfg, device, build=lambda: build(mcfg), micro_batch=plan.micro_batch)
    engine = make_engine(model, cfg, plan, per_epoch, device, model_factory=lambda: build(mcfg))
    if vclock is not None:
        engine.train_micro_batch = vclock.stepping(engine)
    rng = np.random.default_rng(s["seed"])
    vb = plan.micro_batch
    val_batches = [{"video": torch.stack([clip(f, None, False) for f, _ in val[i:i + vb]]),
                    "label": torch.tensor([c for _, c in val[i:i + vb]])} for i in range(0, len(val), vb)]

    def batches(state, step):
        def stream():
            while True:  # epochs: every training clip once, in a new random order each time
                for start in range(0, len(train), plan.micro_batch):
                    pick = order[start:start + plan.micro_batch]
                    yield {"video": torch.stack([clip(train[i][0], rng, True) for i in pick]),
                           "label": torch.tensor([train[i][1] for i in pick])}
                order[:] = rng.permutation(len(train)).tolist()
        return stream(), 10**12

    order = rng.permutation(len(train)).tolist()

    def evaluate() -> dict[str, float]:
        if vclock is not None:
            vclock.now += vclock.clip_s * len(val)
        with engine.eval_module() as (module, dtype):
            return validate(module, dtype, val_batches, device)

    curve: list[tuple[int, float]] = []
    lines: list[dict] = []

    def validated() -> dict[str, float]:
        metrics = evaluate()
        curve.append((engine.global_step, round(metrics["val_top1"], 1)))
        return metrics

    sinks = SimpleNamespace(log_metrics=lambda m, step: lines.append({"step": step, **m}), log_params=lambda p: None)
    with tempfile.TemporaryDirectory() as tmp:
        account = GpuHours(Path(tmp), 1, "cpu-process", cfg.budget.gpu_hours)  # starts now: training's clock
        planner = None
        if s["arm"] == "budget":
            planner = BudgetPlanner(cfg, schedule_of(engine), account, sinks, rank=0, device=device,
                                    per_epoch=per_epoch, val_clips=len(val), test_views=len(val), resumed_step=0)
        total = planner.total if planner else total_steps(cfg, len(train))
        state = LoopState(cfg=cfg, engine=engine, plan=plan, index=None, storage=None, clip=None, rank=0,
                          world_size=1, device=device, per_epoch=per_epoch, total=total, run_dir=Path(tmp),
                          sinks=sinks, account=account, stop=SimpleNamespace(reason=None), save=lambda step: None,
                          validate=validated, batches=batches, planner=planner)
        outcome = train_loop(state)
        train_hours = account.hours
        lr_end = engine.lr
        final = evaluate()  # the final evaluation (the test protocol's place)
        end_hours = account.hours
    step_hours = (s["step_s"] / 3600 if vclock is not None else planner.fit.gpu_hours_per_step
                  if planner is not None and planner.fit is not None else train_hours / max(1, engine.global_step))
    return {"seed": s["seed"], "arm": s["arm"], "outcome": outcome, "steps": engine.global_step,
            "planned_steps": state.total, "lr_end": lr_end, "lr_end_planned": cfg.optim.lr * (
                schedule_of(engine).final_factor if planner else 0.0),
            "plan_versions": planner.schedule.version if planner else 0, "train_hours": train_hours,
            "end_hours": end_hours, "budget_hours": cfg.budget.gpu_hours, "step_hours": step_hours,
            "final_top1": final["val_top1"], "final_loss": final["val_loss"], "curve": curve,
            "lrs": [(m["step"], m["lr"]) for m in lines if "lr" in m],
            "plans": [(m["step"], int(m["plan/total_steps"])) for m in lines if "plan/total_steps" in m]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.seed values")
    p.add_argument("--budget-s", type=float, default=45.0, help="the budget of each run: seconds of one process")
    p.add_argument("--every", type=int, default=100, help="validate every this many steps (train.val_every)")
    p.add_argument("--calibration", type=int, default=20, help="train.calibration_steps of the budget arm")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="more recipe overrides (both arms)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--clock", choices=["wall", "virtual"], default="wall",
                   help="wall: the budget is wall time; virtual: --step-s a step (see VirtualClock)")
    p.add_argument("--step-s", type=float, default=0.1, help="--clock virtual: seconds an optimizer step costs")
    p.add_argument("--arms", nargs="+", default=["epochs", "budget"], choices=["epochs", "budget"])
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    settings = [dict(seed=seed, arm=arm, budget_s=args.budget_s, every=args.every, calibration=args.calibration,
                     extra=list(args.set), clock=args.clock, step_s=args.step_s)
                for seed in args.seeds for arm in args.arms]
    clock = "wall time" if args.clock == "wall" else f"virtual clock, {args.step_s:g} s a step"
    print(f"recipe {RECIPE} (cosine with warm-up, 1200 steps planned by epochs); budget {args.budget_s:g} s of one "
          f"process ({args.budget_s / 3600:.5g} cpu-process-hours, {clock}) per run; validation every {args.every} "
          f"steps; seeds {args.seeds}", flush=True)
    results, t0 = [], time.time()
    with ProcessPoolExecutor(args.jobs) as pool:
        for r in pool.map(run_one, settings):
            results.append(r)
            slack = r["budget_hours"] - r["end_hours"]
            print(f"seed {r['seed']} {r['arm']:>6}: {r['outcome']:>6} at step {r['steps']} (planned "
                  f"{r['planned_steps']}, plan v{r['plan_versions']}), lr at the end {r['lr_end']:.3g}; "
                  f"{r['train_hours'] * 3600:.1f} s training, {r['end_hours'] * 3600:.1f} s with the final "
                  f"evaluation: budget left {slack * 3600:+.2f} s = {slack / r['step_hours']:+.1f} steps; final top-1 "
                  f"{r['final_top1']:.1f}% | " + " ".join(f"{s}:{a:g}" for s, a in r["curve"]), flush=True)
    print(f"\nsummary (final top-1 over seeds {args.seeds}, {time.time() - t0:.0f} s in all):")
    for arm in args.arms:
        rows = [r for r in results if r["arm"] == arm]
        tops = [r["final_top1"] for r in rows]
        print(f"  {arm:>6}: mean {statistics.mean(tops):.1f}% min {min(tops):.1f}% max {max(tops):.1f}% "
              f"({', '.join(f'{t:.1f}' for t in tops)}); steps {', '.join(str(r['steps']) for r in rows)}; ended by "
              f"{', '.join(r['outcome'] for r in rows)}")
    print(f"\nper seed (budget {args.budget_s:g} s; 'used': the account after the final evaluation, whose cost the "
          f"budget arm reserves; 'fits': the budget arm's plan versions)")
    print(f"  {'seed':>4} | {'arm':>6} {'top-1':>6} {'val loss':>8} {'steps':>5} {'ended by':>8} {'final lr':>9} "
          f"{'used s':>7} {'left (steps)':>12} {'fits':>4}")
    for seed in args.seeds:
        for r in (r for r in results if r["seed"] == seed):
            left = r["budget_hours"] - r["end_hours"]
            print(f"  {seed:>4} | {r['arm']:>6} {r['final_top1']:>5.1f}% {r['final_loss']:>8.4f} {r['steps']:>5} "
                  f"{r['outcome']:>8} {r['lr_end']:>9.3g} {r['end_hours'] * 3600:>7.2f} "
                  f"{left / r['step_hours']:>+12.1f} {r['plan_versions']:>4}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""How reliably the demo's tiny TimeSformer learns its task, over seeds, in minutes: the numbers behind
configs/recipes/demo_order.yaml. It trains through the product's own code: the recipe resolved by
``pipeline.config.load_recipe("demo_order", overrides)`` (optimizer, weight decay, learning-rate schedule and
warm-up, global and micro batch, drop path, model variant, patch size, frames, sampling rate, crop and scale),
the model built as training builds it (``pipeline.train.main.build_model``, seeded by ``train.seed``, then
``prepare_model``), the optimizer steps taken by the product's engine (``make_engine``: its parameter groups,
``lr_factor`` schedule and gradient accumulation) and validation by ``pipeline.train.evaluate.validate`` through
``engine.eval_module()``. Only what the study must change is pinned: the plain PyTorch engine
(``train.engine=torch``, ZeRO 0, one process, no process group), fp32 on the CPU, and no activation
checkpointing (it recomputes the same forward: slower, same numbers).

The data are not the product's shards: the synthetic videos' frames are made in memory (no encoding, no
ingest) as the demo makes its videos (``balanced_order_spec`` for the recipe's sampling rate, a 32-pixel
square), and each clip goes through the product's sampler and transforms (``clip_config`` of the recipe: random
clip and crop for training, centre clip and crop for validation, the frame on screen at each sampled time as the
decoder picks it). Training clips are drawn epoch by epoch, each clip once per epoch in a seeded random order.

    python benchmarks/demo_study.py                                      # the demo's recipe, seeds 0-4
    python benchmarks/demo_study.py --time-embed-init-std 0 0.1 0.5      # compare starts of the time embedding
    python benchmarks/demo_study.py --attention space_only               # the baseline the demo compares with
    python benchmarks/demo_study.py --set optim.warmup_epochs=0 optim.lr=0.001   # any recipe override

Prints the resolved recipe's training once, then per setting and seed validation top-1 every --every steps and
the first step at >= 90%; settings run in parallel processes (--jobs), one thread each.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor

RECIPE = "demo_order"
# What the study pins whatever the recipe says: one CPU process with no process group, so the plain PyTorch
# engine at fp32; activation checkpointing off (the same numbers, recomputed: only slower).
PINNED = ["train.engine=torch", "train.zero_stage=0", "train.precision=fp32", "cluster.accelerator=cpu",
          "train.activation_checkpointing=none", "train.compile=none"]


def resolve(setting: dict):
    """The run config of one setting: the recipe < the study's options < --set < what the study pins."""
    from pipeline.config import load_recipe

    return load_recipe(RECIPE, [*setting["overrides"], *setting["extra"], f"train.seed={setting['seed']}", *PINNED])


def describe(cfg, train_clips: int) -> str:
    """One line: what the resolved recipe trains with (the product's batch plan, schedule and optimizer)."""
    from pipeline.config import batch_plan, steps_per_epoch, total_steps

    o, m, d = cfg.optim, cfg.model, cfg.data
    per_epoch, total = steps_per_epoch(cfg, train_clips), total_steps(cfg, train_clips)
    decay = "every parameter" if o.decay_embeddings else "all but the embeddings"
    return (f"recipe {cfg.recipe}: {m.variant} patch {m.patch_size or 'default'} drop path {m.drop_path_rate}, "
            f"{d.num_frames} frames every {d.sampling_rate} at {d.ref_fps:g} fps, crop {d.crop} of short side "
            f"{d.scale}; {o.name} lr {o.lr:g} weight decay {o.weight_decay:g} on {decay}, {o.schedule} over "
            f"{total} steps after {o.warmup_epochs * per_epoch:g} warm-up steps ({o.warmup_epochs:g} epoch; an epoch: "
            f"{per_epoch} steps, {train_clips} clips), "
            f"grad clip {o.grad_clip or 'off'}; {batch_plan(cfg, 1).describe()}; {cfg.train.engine} engine, "
            f"{cfg.train.precision}, CPU")


def run_one(setting: dict) -> dict:
    import numpy as np
    import torch

    from pipeline.config import batch_plan, steps_per_epoch, total_steps
    from pipeline.data.loader import clip_config
    from pipeline.data.synthetic import MOTION_CLASSES, ORDER_CLASSES, balanced_order_spec, motion_frames, order_frames
    from pipeline.data.transforms import TestTransform, TrainTransform
    from pipeline.data.video import FixedRateSampler, SegmentSampler
    from pipeline.models.registry import build, model_config
    from pipeline.train.engine import make_engine
    from pipeline.train.evaluate import validate
    from pipeline.train.main import build_model
    from pipeline.train.parallelize import prepare_model

    torch.set_num_threads(1)
    s = setting
    cfg = resolve(s)
    cc = clip_config(cfg)  # the loader's clips for this recipe (pipeline.data.loader.to_clip)
    temporal = (SegmentSampler(cc.num_frames) if cc.sampler == "segment"
                else FixedRateSampler(cc.num_frames, cc.sampling_rate, cc.ref_fps, cc.short_video))
    train_tf = TrainTransform(crop=cc.crop, scale=cc.scale, flip=cc.flip, output=cc.output)
    test_tf = TestTransform(crop=cc.crop, num_crops=1, output=cc.output)
    spec = balanced_order_spec(cc.sampling_rate / cc.ref_fps, square=s["square"])  # what jobs/demo.py makes
    kind_classes = ORDER_CLASSES if s["kind"] == "order" else MOTION_CLASSES
    make = order_frames if s["kind"] == "order" else motion_frames

    def corpus(per_class: int, base: int) -> list:
        return [(make(c, np.random.default_rng(base + 10007 * ci + i), spec), ci)
                for ci, c in enumerate(kind_classes) for i in range(per_class)]

    train, val = corpus(s["train_per_class"], 1), corpus(s["val_per_class"], 999_999)
    duration = spec.num_frames / spec.fps

    def clip(frames: np.ndarray, rng: np.random.Generator | None, training: bool) -> torch.Tensor:
        if isinstance(temporal, SegmentSampler):
            times = temporal.sample(duration, rng, train=training).times
        else:
            times = temporal.sample(duration, rng, position="random" if training else "center").times
        # the frame on screen at each time, as decode_frames picks it from the encoded video
        picked = [frames[max(0, min(spec.num_frames - 1, math.floor(t * spec.fps + 1e-9)))] for t in times]
        return train_tf(picked, rng) if training else test_tf(picked)[0]

    device = torch.device("cpu")
    plan = batch_plan(cfg, 1)
    per_epoch, total = steps_per_epoch(cfg, len(train)), total_steps(cfg, len(train))
    mcfg = model_config(cfg)
    model = build_model(cfg)  # seeds torch with train.seed, as every rank of a run does
    prepare_model(model, cfg, device, build=lambda: build(mcfg), micro_batch=plan.micro_batch)
    engine = make_engine(model, cfg, plan, per_epoch, device, model_factory=lambda: build(mcfg))
    rng = np.random.default_rng(s["seed"])
    vb = plan.micro_batch  # validation batches as the run's validation loader makes them
    val_batches = [{"video": torch.stack([clip(f, None, False) for f, _ in val[i:i + vb]]),
                    "label": torch.tensor([c for _, c in val[i:i + vb]])} for i in range(0, len(val), vb)]

    def order():
        while True:  # epochs: every training clip once, in a new random order each time
            yield from rng.permutation(len(train)).tolist()

    stream = order()
    curve, lrs, first90, t0 = [], [], None, time.time()
    while engine.global_step < total:
        before = engine.global_step
        pick = [next(stream) for _ in range(plan.micro_batch)]
        x = torch.stack([clip(train[i][0], rng, True) for i in pick])
        y = torch.tensor([train[i][1] for i in pick])
        loss = float(engine.train_micro_batch(x, y))
        if not math.isfinite(loss):
            raise FloatingPointError(f"seed {s['seed']}: loss {loss} at step {engine.global_step}")
        step = engine.global_step
        if step != before and (step % s["every"] == 0 or step == total):
            with engine.eval_module() as (module, dtype):
                acc = validate(module, dtype, val_batches, device)["val_top1"]
            curve.append((step, round(acc, 1)))
            lrs.append((step, engine.lr))  # the rate of the next step, from the product's schedule
            if first90 is None and acc >= 90:
                first90 = step
    return {**s, "attention": cfg.model.attention_type, "time_embed_init_std": cfg.model.time_embed_init_std,
            "steps": total, "per_epoch": per_epoch, "curve": curve, "lr": lrs, "first_step_at_90": first90,
            "final_top1": curve[-1][1], "seconds": round(time.time() - t0)}


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import ConfigError

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="train.seed values")
    p.add_argument("--time-embed-init-std", type=float, nargs="+",
                   help="model.time_embed_init_std values to compare (default: the recipe's)")
    p.add_argument("--attention", nargs="+", help="model.attention_type values to compare (default: the recipe's)")
    p.add_argument("--steps", type=int, help="train.max_steps (default: the recipe's)")
    p.add_argument("--lr", type=float, help="optim.lr (default: the recipe's)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="more recipe overrides, as jobs/launch.py takes them (train.engine, zero stage, precision, "
                        "activation checkpointing and compile are the study's own)")
    p.add_argument("--square", type=int, nargs="+", default=[32], help="square side in the 64x64 video")
    p.add_argument("--kind", default="order", choices=["order", "motion"])
    p.add_argument("--every", type=int, default=100, help="validate every this many steps")
    p.add_argument("--train-per-class", type=int, default=96, help="the demo's: 96")
    p.add_argument("--val-per-class", type=int, default=24, help="the demo's: 24")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    common = [f"train.max_steps={args.steps}"] if args.steps is not None else []
    common += [f"optim.lr={args.lr}"] if args.lr is not None else []
    settings = [dict(seed=seed, square=sq, kind=args.kind, every=args.every, train_per_class=args.train_per_class,
                     val_per_class=args.val_per_class, extra=list(args.set),
                     overrides=[*common, *([f"model.attention_type={a}"] if a else []),
                                *([f"model.time_embed_init_std={std}"] if std is not None else [])])
                for a in args.attention or [None] for std in args.time_embed_init_std or [None]
                for sq in args.square for seed in args.seeds]
    try:
        cfgs = [resolve(s) for s in settings]  # a bad override is refused here, before any training
    except ConfigError as e:
        print(f"demo_study: {e}", file=sys.stderr)
        return 2
    clips = 4 * args.train_per_class
    for line in dict.fromkeys(describe(c, clips) for c in cfgs):
        print(line, flush=True)
    results = []
    t0 = time.time()
    with ProcessPoolExecutor(args.jobs) as pool:
        for r in pool.map(run_one, settings):
            results.append(r)
            curve = " ".join(f"{s}:{a:g}" for s, a in r["curve"])
            print(f"{r['kind']} {r['attention']} square={r['square']} time_embed_init_std={r['time_embed_init_std']} "
                  f"seed={r['seed']}: final {r['final_top1']:.1f}%, >=90% from step {r['first_step_at_90']} "
                  f"({r['seconds']} s) | {curve}", flush=True)
    print(f"\nsummary (final top-1 over seeds; {time.time() - t0:.0f} s in all):")
    keys = list(dict.fromkeys((r["attention"], r["time_embed_init_std"], r["square"], r["steps"]) for r in results))
    for key in keys:
        rows = [r for r in results if (r["attention"], r["time_embed_init_std"], r["square"], r["steps"]) == key]
        hit = sum(1 for r in rows if r["first_step_at_90"] is not None)
        finals = ", ".join(f"{r['final_top1']:.0f}" for r in rows)
        print(f"  {key[0]} time_embed_init_std={key[1]} square={key[2]}: {hit}/{len(rows)} seeds reach 90% in "
              f"{key[3]} steps; final {finals}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

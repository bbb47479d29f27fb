#!/usr/bin/env python
"""How reliably the demo's tiny TimeSformer learns its task, over seeds, in minutes: the numbers behind
configs/recipes/demo_order.yaml. Clips come from the synthetic videos' frames in memory (no encoding, no
shards, one process) through the product's sampler and transforms with the demo's geometry (8 frames
every 0.2 s of a 2 s video, short side in [32, 37], 32x32 crops, 8x8 patches); AdamW, cosine schedule.

    python benchmarks/demo_study.py                                      # the demo's settings, seeds 0-4
    python benchmarks/demo_study.py --time-embed-init-std 0 0.1 0.5      # compare starts of the time embedding
    python benchmarks/demo_study.py --attention space_only --steps 400   # the baseline the demo compares with

Prints, per setting and seed, validation top-1 every --every steps and the first step at >= 90%; two
settings share the machine's cores (--jobs) and each process uses one thread.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor


def run_one(setting: dict) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from pipeline.data.synthetic import MOTION_CLASSES, ORDER_CLASSES, balanced_order_spec, motion_frames, order_frames
    from pipeline.data.transforms import TestTransform, TrainTransform
    from pipeline.data.video import FixedRateSampler
    from pipeline.models.timesformer import TimeSformer, variant_config

    torch.set_num_threads(1)
    s = setting
    frames_n, rate, crop = 8, 6, 32  # the demo recipe's clips: 8 frames every 6 at 30 fps, 32x32 crops
    sampler = FixedRateSampler(frames_n, rate)
    spec = balanced_order_spec(rate / sampler.ref_fps, square=s["square"])  # what jobs/demo.py makes
    kind_classes = ORDER_CLASSES if s["kind"] == "order" else MOTION_CLASSES
    make = order_frames if s["kind"] == "order" else motion_frames

    def corpus(per_class: int, base: int) -> list:
        return [(make(c, np.random.default_rng(base + 10007 * ci + i), spec), ci)
                for ci, c in enumerate(kind_classes) for i in range(per_class)]

    train, val = corpus(s["train_per_class"], 1), corpus(s["val_per_class"], 999_999)
    duration = spec.num_frames / spec.fps
    train_tf = TrainTransform(crop=crop, scale=(crop, crop + 5), flip=False)
    test_tf = TestTransform(crop=crop, num_crops=1)

    def clip(frames: np.ndarray, rng: np.random.Generator, training: bool) -> torch.Tensor:
        times = sampler.sample(duration, rng, "random" if training else "center").times
        picked = [frames[min(spec.num_frames - 1, int(t * spec.fps + 1e-9))] for t in times]
        return train_tf(picked, rng) if training else test_tf(picked)[0]

    torch.manual_seed(s["seed"])
    rng = np.random.default_rng(s["seed"])
    model = TimeSformer(variant_config("timesformer_tiny", num_frames=frames_n, img_size=crop, num_classes=4,
                                       patch_size=8, attention_type=s["attention"],
                                       time_embed_init_std=s["time_embed_init_std"]))
    no_decay = model.no_weight_decay()
    groups = [{"params": [p for n, p in model.named_parameters() if n not in no_decay and p.ndim > 1],
               "weight_decay": 0.01},
              {"params": [p for n, p in model.named_parameters() if n in no_decay or p.ndim <= 1],
               "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=s["lr"])
    steps, warm = s["steps"], max(1, s["steps"] // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: (i + 1) / warm if i < warm else 0.5 * (1 + math.cos(math.pi * (i - warm) / (steps - warm))))
    vx = torch.stack([clip(f, rng, False) for f, _ in val])
    vy = torch.tensor([c for _, c in val])

    def accuracy() -> float:
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(vx[i:i + 64]).argmax(-1) for i in range(0, len(vx), 64)])
        model.train()
        return 100.0 * float((pred == vy).float().mean())

    curve, first90, t0 = [], None, time.time()
    for step in range(1, steps + 1):
        pick = rng.integers(0, len(train), size=16)
        x = torch.stack([clip(train[i][0], rng, True) for i in pick])
        y = torch.tensor([train[i][1] for i in pick])
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % s["every"] == 0 or step == steps:
            acc = accuracy()
            curve.append((step, round(acc, 1)))
            if first90 is None and acc >= 90:
                first90 = step
    return {**s, "curve": curve, "first_step_at_90": first90, "final_top1": curve[-1][1],
            "seconds": round(time.time() - t0)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--time-embed-init-std", type=float, nargs="+", default=[0.5])
    p.add_argument("--square", type=int, nargs="+", default=[32], help="square side in the 64x64 video")
    p.add_argument("--attention", default="divided_space_time")
    p.add_argument("--kind", default="order", choices=["order", "motion"])
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--train-per-class", type=int, default=96)
    p.add_argument("--val-per-class", type=int, default=24)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    settings = [dict(seed=seed, time_embed_init_std=std, square=sq, attention=args.attention, kind=args.kind,
                     steps=args.steps, lr=args.lr, every=args.every, train_per_class=args.train_per_class,
                     val_per_class=args.val_per_class)
                for std in args.time_embed_init_std for sq in args.square for seed in args.seeds]
    results = []
    with ProcessPoolExecutor(args.jobs) as pool:
        for r in pool.map(run_one, settings):
            results.append(r)
            curve = " ".join(f"{s}:{a:g}" for s, a in r["curve"])
            print(f"{r['kind']} {r['attention']} square={r['square']} time_embed_init_std={r['time_embed_init_std']} "
                  f"seed={r['seed']}: final {r['final_top1']:.1f}%, >=90% from step {r['first_step_at_90']} "
                  f"({r['seconds']} s) | {curve}", flush=True)
    print("\nsummary (final top-1 over seeds):")
    keys = sorted({(r["time_embed_init_std"], r["square"]) for r in results})
    for std, sq in keys:
        finals = [r["final_top1"] for r in results if (r["time_embed_init_std"], r["square"]) == (std, sq)]
        hit = sum(1 for r in results if (r["time_embed_init_std"], r["square"]) == (std, sq)
                  and r["first_step_at_90"] is not None)
        print(f"  time_embed_init_std={std} square={sq}: {hit}/{len(finals)} seeds reach 90%; final "
              f"{', '.join(f'{f:.0f}' for f in finals)}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""DeepSpeed's overhead: training steps of one model through our DeepSpeed engine (ZeRO, activation
checkpointing, bf16) next to plain PyTorch (AMP bf16, same checkpointing, same SGD) in the same process.

    python benchmarks/bench_train.py                                   # TimeSformer-L 96x224, micro batch 4, GPU
    python benchmarks/bench_train.py --recipe k400_hr --micro-batch 2
    python benchmarks/bench_train.py --device cpu --variant timesformer_tiny --frames 8 --size 64   # runs anywhere

Phases run A-B-A (plain, DeepSpeed, plain again; with --overflow-check DeepSpeed's default bf16 overflow
check gets a phase too) so drift shows; each phase reports the median step time,
clips/s and its own peak memory (the engine before it is freed). Inputs are random tensors already on
the host as the loader hands them to GPU recipes (uint8, pinned): each engine moves and normalises them, so
this measures the engine, not the data loader (benchmarks/bench_loader.py does that). TFLOP/s count the
recomputed forward of activation checkpointing (hardware FLOPs), so the utilisation printed is HFU; MFU counts
the model's forward and backward only (no recompute); both against the card's dense bf16 peak. The target
(issue 5): DeepSpeed's overhead <= 10%. Writes --out JSON when given. The training loop's own benchmark,
next to Hugging Face, is benchmarks/train_loop.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="k400_long")
    p.add_argument("--variant", help="model variant override (e.g. timesformer_tiny for a CPU check)")
    p.add_argument("--frames", type=int, help="frames per clip override")
    p.add_argument("--size", type=int, help="crop size override")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--zero-stage", type=int, default=2, help="the DeepSpeed engine's ZeRO stage (default 2)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--ac", default="full", help="activation checkpointing policy (none, full, every_2, selective; "
                                               "auto is measured per run: benchmarks/train_loop.py)")
    p.add_argument("--steps", type=int, default=10, help="measured steps per phase")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", help="write the numbers as JSON here")
    p.add_argument("--overflow-check", action="store_true",
                   help="also time DeepSpeed with its per-parameter bf16 overflow check on (its default; ours is off)")
    p.add_argument("--profile", help="after timing, profile 3 steps of each engine (torch.profiler) and write the "
                                     "ops' CPU and GPU times here: where an overhead comes from")
    args = p.parse_args(argv)
    if args.ac == "auto":
        p.error("--ac auto: name a policy here; benchmarks/train_loop.py runs the training loop with auto")

    from pipeline.distributed import DistEnv

    DistEnv.single().export()  # one process: rank 0 of 1 on 127.0.0.1
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if args.device == "cuda" else "cpu")
    import torch

    from pipeline.config import batch_plan, load_recipe
    from pipeline.models.flops import PEAK_TFLOPS, training_flops_per_clip
    from pipeline.models.timesformer import TimeSformer, apply_activation_checkpointing, model_config
    from pipeline.train.engine import DeepSpeedEngine, TorchEngine, deepspeed_config, init_distributed
    from pipeline.train.parallelize import recompute_fraction

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_train: no CUDA device; use --device cpu (and a small --variant) to check the script",
              file=sys.stderr)
        return 2
    overrides = [f"train.micro_batch={args.micro_batch}", f"train.global_batch={args.micro_batch}",
                 "train.engine=deepspeed", f"train.zero_stage={args.zero_stage}", f"train.precision={args.precision}",
                 f"train.activation_checkpointing={args.ac}", "optim.name=sgd",
                 f"cluster.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}", "data.index=unused"]
    if args.variant:
        overrides.append(f"model.variant={args.variant}")
    if args.frames:
        overrides.append(f"data.num_frames={args.frames}")
    if args.size:
        overrides += [f"data.crop={args.size}", f"data.scale=[{args.size},{args.size}]"]
    cfg = load_recipe(args.recipe, overrides)
    device = init_distributed(cfg, 0, 1, 0)
    plan = batch_plan(cfg, 1)
    mcfg = model_config(cfg)
    # uint8 clips on the host, as the loader hands them to GPU recipes: each engine moves and normalises them
    x = torch.randint(0, 256, (args.micro_batch, 3, mcfg.num_frames, mcfg.img_size, mcfg.img_size), dtype=torch.uint8)
    if device.type == "cuda":
        x = x.pin_memory()
    # hardware FLOPs (HFU): the forward share the policy recomputes
    flops = 2.0 * training_flops_per_clip(mcfg, recompute_forward=recompute_fraction(args.ac, mcfg.depth))
    model_flops = 2.0 * training_flops_per_clip(mcfg)  # forward + backward only: MFU
    y = torch.randint(0, mcfg.num_classes, (args.micro_batch,), device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def phase(kind: str) -> dict:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(0)
        model = TimeSformer(mcfg)
        apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
        if kind.startswith("deepspeed"):
            ds = deepspeed_config(cfg, plan)
            if kind == "deepspeed+check":
                ds["bf16"]["check_grad_overflow"] = True
            engine = DeepSpeedEngine(model, cfg, plan, per_epoch=1000, model_factory=lambda: TimeSformer(mcfg),
                                     ds_config=ds)
        else:
            engine = TorchEngine(model, cfg, plan, per_epoch=1000, device=device)
        times, losses = [], []
        for i in range(args.warmup + args.steps):
            sync()
            t0 = time.perf_counter()
            loss = engine.train_micro_batch(x, y)
            losses.append(float(loss))  # .item() syncs: the step is finished when the clock stops
            sync()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        if args.profile and kind not in profiled:
            profiled[kind] = profile(engine)
        step = statistics.median(times)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        del engine, model
        return {"engine": kind, "step_ms": 1000 * step, "clips_per_s": args.micro_batch / step, "peak_gib": peak,
                "tflops": flops * args.micro_batch / step / 1e12,
                "model_tflops": model_flops * args.micro_batch / step / 1e12,
                "first_loss": losses[0], "last_loss": losses[-1]}

    def profile(engine) -> str:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        sync()
        t0 = time.perf_counter()
        with torch_profile(activities=activities) as prof:
            for _ in range(3):
                float(engine.train_micro_batch(x, y))
            sync()
        wall = (time.perf_counter() - t0) / 3
        events = prof.key_averages()
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        gpu = sum(e.self_device_time_total for e in kernels) / 3 / 1000  # microseconds -> ms per step
        head = f"wall {1000 * wall:.1f} ms per step (profiled), GPU kernels busy {gpu:.1f} ms per step"
        cpu = events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
        cuda = events.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60)
        return f"{head}\n{cpu}\n{cuda}"

    profiled: dict[str, str] = {}
    kinds = ["torch", "deepspeed"] + (["deepspeed+check"] if args.overflow_check else []) + ["torch"]
    rows = [phase(k) for k in kinds]
    base = statistics.mean([rows[0]["clips_per_s"], rows[-1]["clips_per_s"]])
    overhead = base / rows[1]["clips_per_s"] - 1
    checked = base / rows[2]["clips_per_s"] - 1 if args.overflow_check else None
    import deepspeed

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in name), float("nan"))
    versions = {"torch": torch.__version__, "deepspeed": deepspeed.__version__}
    print(f"{cfg.model.variant} {mcfg.num_frames}x{mcfg.img_size}, micro batch {args.micro_batch}, {args.precision}, "
          f"activation checkpointing {args.ac}, ZeRO-{args.zero_stage}; device {name}; "
          f"torch {versions['torch']}, deepspeed {versions['deepspeed']}")
    print(f"{'engine':15s} {'step ms':>9s} {'clips/s':>9s} {'TFLOP/s':>8s} {'HFU':>6s} {'MFU':>6s} {'peak GiB':>9s} "
          f"{'loss first->last':>18s}")
    for r in rows:
        print(f"{r['engine']:15s} {r['step_ms']:9.1f} {r['clips_per_s']:9.2f} {r['tflops']:8.1f} "
              f"{100 * r['tflops'] / peak_tflops:5.1f}% {100 * r['model_tflops'] / peak_tflops:5.1f}% "
              f"{r['peak_gib']:9.2f} "
              f"{r['first_loss']:8.4f} -> {r['last_loss']:.4f}")
    drift = abs(rows[0]["clips_per_s"] / rows[-1]["clips_per_s"] - 1)
    print(f"DeepSpeed overhead vs plain PyTorch: {100 * overhead:+.1f}% (target <= 10%); "
          f"plain-PyTorch drift between its two phases {100 * drift:.1f}%")
    if checked is not None:
        print(f"with DeepSpeed's bf16 overflow check on (its default): {100 * checked:+.1f}%")
    if args.profile:
        with open(args.profile, "w") as f:
            for kind, text in profiled.items():
                f.write(f"=== {kind}: {text}\n\n")
        for kind, text in profiled.items():
            print(f"{kind:15s} {text.splitlines()[0]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "versions": versions, "args": vars(args), "rows": rows, "overhead": overhead,
                       "overhead_with_overflow_check": checked, "drift": drift}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

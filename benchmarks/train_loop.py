#!/usr/bin/env python
"""Training throughput through the product's real training loop, next to Hugging Face in the same run.

Each case runs ``pipeline.train.loop.train_loop`` itself -- the engine (DeepSpeed or plain PyTorch), the
activation-checkpointing policy (``auto``: measured to fit), regional compilation, the per-step stop and
divergence checks, metric logging, the uint8 clips normalised on the device -- on in-memory synthetic batches
(pinned uint8, as the loader hands them over), so it measures the step, not the data loader
(``benchmarks/bench_loader.py`` does that). Beside it, Hugging Face ``TimesformerForVideoClassification`` in a plain
bf16-autocast AdamW loop at the same batch (gradient checkpointing only if it does not fit otherwise).

Printed per case: clips/s; model-FLOPs utilisation (MFU: forward + backward, 3x the paper's forward FLOPs,
no recompute) and hardware-FLOPs utilisation (HFU: what the device computed, recomputed forwards included),
each against the device's spec dense bf16 peak and against a bf16 matmul measured in the same run; peak
memory; and the host time per step outside GPU work (the step's wall time minus the kernels' busy time per
step, which torch.profiler measures over 3 more steps: the GPU idle, waiting for the host).

    python benchmarks/train_loop.py                                  # GPU: every case; JSON + log to --out
    python benchmarks/train_loop.py --cases l_ds_compile,l_hf        # a subset (--list shows them)
    python benchmarks/train_loop.py --device cpu --cases tiny_loop,tiny_engine   # CPU: the loop's own cost

On a CPU the ``tiny`` cases time the loop's host overhead: the same engine steps through the loop and bare
(``tiny_engine``), so the difference is what the loop adds per step.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch


@dataclass(frozen=True)
class Case:
    name: str
    recipe: str
    micro_batch: int
    impl: str  # loop (our training loop), engine (our engine without the loop), hf (Hugging Face), infer, hf_infer
    engine: str = "deepspeed"
    ac: str = "auto"
    compile: str = "none"  # none, blocks (the product's), or experiments: blocks-autotune, model (whole model)
    zero_stage: int = 2
    steps: int = 10
    warmup: int = 3
    overrides: tuple[str, ...] = field(default=())
    math_attention: int | None = None  # timesformer.MATH_ATTENTION_MAX_LEN for this case (None: the product's)
    sdpa: str = "default"  # fused attention backend: default (torch's choice) or cudnn (an experiment)


GPU_CASES = [
    # The recipes' own settings (k400_long and k400_hr: DeepSpeed ZeRO-2, compiled blocks; k400_base: plain
    # PyTorch, compiled blocks; activation checkpointing auto), next to Hugging Face at the same batch.
    Case("l_ds_compile", "k400_long", 4, "loop", compile="blocks"),
    Case("l_hf", "k400_long", 4, "hf"),
    Case("hr_ds_compile", "k400_hr", 4, "loop", compile="blocks"),
    Case("hr_hf", "k400_hr", 4, "hf"),
    Case("base_torch_compile", "k400_base", 32, "loop", engine="torch", zero_stage=0, compile="blocks"),
    Case("base_hf", "k400_base", 32, "hf"),
    Case("base_infer_compile", "k400_base", 32, "infer", compile="blocks", steps=20),
    Case("base_infer_hf", "k400_base", 32, "hf_infer", steps=20),
    # engines and compilation, each size
    Case("l_ds", "k400_long", 4, "loop"),
    Case("l_torch", "k400_long", 4, "loop", engine="torch", zero_stage=0),
    Case("l_torch_compile", "k400_long", 4, "loop", engine="torch", zero_stage=0, compile="blocks"),
    Case("hr_ds", "k400_hr", 4, "loop"),
    Case("hr_torch", "k400_hr", 4, "loop", engine="torch", zero_stage=0),
    Case("base_ds_compile", "k400_base", 32, "loop", compile="blocks"),
    Case("base_ds", "k400_base", 32, "loop"),
    Case("base_torch", "k400_base", 32, "loop", engine="torch", zero_stage=0),
    Case("base_infer", "k400_base", 32, "infer", steps=20),
    # short steps: DeepSpeed's fixed cost per step, by ZeRO stage, against plain PyTorch
    Case("base2_torch", "k400_base", 2, "loop", engine="torch", zero_stage=0, ac="none", steps=20),
    Case("base2_zero0", "k400_base", 2, "loop", zero_stage=0, ac="none", steps=20),
    Case("base2_zero1", "k400_base", 2, "loop", zero_stage=1, ac="none", steps=20),
    Case("base2_zero2", "k400_base", 2, "loop", zero_stage=2, ac="none", steps=20),
    Case("base8_torch", "k400_base", 8, "loop", engine="torch", zero_stage=0, ac="none", steps=20),
    Case("base8_zero2", "k400_base", 8, "loop", zero_stage=2, ac="none", steps=20),
    Case("base2_torch_compile", "k400_base", 2, "loop", engine="torch", zero_stage=0, ac="none", compile="blocks",
         steps=20),
    Case("base2_zero2_compile", "k400_base", 2, "loop", zero_stage=2, ac="none", compile="blocks", steps=20),
    # experiments: a larger micro batch; cuDNN's fused attention; Inductor's max-autotune (Triton matmuls with
    # fused epilogues); the whole model as one graph; temporal attention through the fused kernel
    Case("l_ds_compile_mb8", "k400_long", 8, "loop", compile="blocks"),
    Case("l_ds_compile_cudnn", "k400_long", 4, "loop", compile="blocks", sdpa="cudnn"),
    Case("hr_ds_compile_cudnn", "k400_hr", 4, "loop", compile="blocks", sdpa="cudnn"),
    Case("base_torch_compile_cudnn", "k400_base", 32, "loop", engine="torch", zero_stage=0, compile="blocks",
         sdpa="cudnn"),
    Case("base_infer_compile_cudnn", "k400_base", 32, "infer", compile="blocks", steps=20, sdpa="cudnn"),
    Case("base_infer_model", "k400_base", 32, "infer", compile="model", steps=20),
    Case("base_torch_autotune", "k400_base", 32, "loop", engine="torch", zero_stage=0, compile="blocks-autotune"),
    Case("base_infer_autotune", "k400_base", 32, "infer", compile="blocks-autotune", steps=20),
    Case("l_ds_autotune", "k400_long", 4, "loop", compile="blocks-autotune"),
    Case("base_torch_compile_fused", "k400_base", 32, "loop", engine="torch", zero_stage=0, compile="blocks",
         math_attention=0),
]
TINY = ("model.variant=timesformer_tiny", "data.num_frames=8", "data.crop=32", "data.scale=[32,32]",
        "model.num_classes=10")
CPU_CASES = [
    Case("tiny_loop", "smoke", 4, "loop", engine="torch", zero_stage=0, ac="none", steps=200, warmup=20,
         overrides=TINY),
    Case("tiny_engine", "smoke", 4, "engine", engine="torch", zero_stage=0, ac="none", steps=200, warmup=20,
         overrides=TINY),
    Case("tiny_loop_ds", "smoke", 4, "loop", ac="none", steps=100, warmup=10, overrides=TINY),
    Case("tiny_engine_ds", "smoke", 4, "engine", ac="none", steps=100, warmup=10, overrides=TINY),
    Case("tiny_loop_ds_compile", "smoke", 4, "loop", ac="selective", compile="blocks", steps=100, warmup=10,
         overrides=TINY),
]
# --cases accepts these names for groups of cases
GROUPS = {"targets": [c.name for c in GPU_CASES[:8]]}
# targets of the issue (one H200, bf16): clips/s, and speed-up over Hugging Face
TARGETS = {"l_ds_compile": 24.0, "base_torch_compile": 330.0, "base_infer_compile": 1000.0}
HF_RATIO_TARGETS = {"k400_long": 2.5, "k400_hr": 2.5}


def recipe_config(case: Case, device: torch.device):
    from pipeline.config import load_recipe

    overrides = [f"train.micro_batch={case.micro_batch}", f"train.global_batch={case.micro_batch}",
                 f"train.zero_stage={case.zero_stage}", f"train.engine={case.engine}",
                 f"train.activation_checkpointing={case.ac}",
                 f"train.compile={case.compile if case.compile in ('none', 'blocks') else 'none'}",
                 f"train.precision={'bf16' if device.type == 'cuda' else 'fp32'}",
                 f"cluster.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}", "data.index=unused",
                 "train.log_every=1000000", "train.ckpt_every=1000000", "train.val_every=-1", *case.overrides]
    return load_recipe(case.recipe, overrides)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fresh(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def host_clip(mcfg, batch: int, device: torch.device) -> torch.Tensor:
    x = torch.randint(0, 256, (batch, mcfg.in_chans, mcfg.num_frames, mcfg.img_size, mcfg.img_size),
                      dtype=torch.uint8)
    return x.pin_memory() if device.type == "cuda" else x


# Kernel categories for the profile breakdown, first match wins (names as CUDA, cuBLAS, cuDNN, FlashAttention
# and Inductor give them).
KERNEL_CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("gemm", ("gemm", "xmma", "cutlass", "nvjet", "sm90_", "wgmma", "_mm_", "splitk")),
    ("compiled", ("triton",)),
    ("optimizer", ("multi_tensor", "adam", "sgd", "foreach")),
    ("copy", ("copy", "memcpy", "memset", "cat", "transpose")),
    ("reduce", ("reduce", "norm", "softmax", "sum", "mean", "max")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "gelu", "add", "mul")),
)


def kernel_category(name: str) -> str:
    low = name.lower()
    return next((cat for cat, keys in KERNEL_CATEGORIES if any(k in low for k in keys)), "other")


def union_ms(intervals: list[tuple[int, int]]) -> float:
    """Length of the union of ``(start_ns, end_ns)`` intervals, in ms: time the GPU had any work running."""
    busy, end = 0, None
    for s, e in sorted(intervals):
        if end is None or s > end:
            busy, end = busy + (e - s), e
        elif e > end:
            busy, end = busy + (e - end), e
    return busy / 1e6


def kernel_profile(fn, steps: int, device: torch.device) -> dict:
    """Profile ``fn(steps)``: wall ms per step, GPU busy ms per step (the union of every kernel's and copy's
    interval, so overlapping streams are not counted twice), the host gap (wall minus busy: the GPU waiting
    for the host), and kernel ms per step by category with the top kernels. Only the gap (nan) on a CPU."""
    if device.type != "cuda":
        return {"host_gap_ms": float("nan")}
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn(steps)
        sync(device)
    wall = (time.perf_counter() - t0) / steps * 1000
    events = [e for e in prof.profiler.kineto_results.events() if e.device_type() == DeviceType.CUDA]
    intervals = [(e.start_ns(), e.start_ns() + e.duration_ns()) for e in events]
    by_cat: dict[str, float] = {}
    by_name: dict[str, float] = {}
    for e in events:
        ms = e.duration_ns() / 1e6 / steps
        by_cat[kernel_category(e.name())] = by_cat.get(kernel_category(e.name()), 0.0) + ms
        by_name[e.name()] = by_name.get(e.name(), 0.0) + ms
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:15]
    busy = union_ms(intervals) / steps
    return {"profiled_step_ms": wall, "gpu_busy_ms": busy, "host_gap_ms": wall - busy,
            "kernels_ms": {k: round(v, 3) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
            "kernel_launches_per_step": len(events) / steps,
            "top_kernels_ms": [(name[:120], round(ms, 3)) for name, ms in top]}


def timed(steps, case: Case, device: torch.device, t_setup: float) -> tuple[float, float, dict]:
    """Warm up (compilation, allocator), then time ``case.steps`` steps and profile 3 more: (seconds from
    ``t_setup`` to the end of the warm-up, seconds per step, ``kernel_profile``'s numbers)."""
    steps(case.warmup)
    warm_s = time.perf_counter() - t_setup
    sync(device)
    t0 = time.perf_counter()
    steps(case.steps)
    sync(device)
    step_s = (time.perf_counter() - t0) / case.steps
    return warm_s, step_s, kernel_profile(steps, 3, device)


def compile_experiment(model, mode: str) -> None:
    """Compilation by the case's ``compile``: the product's ``blocks``, or experiments: ``blocks-autotune`` (each
    block with Inductor's max-autotune: Triton matmul templates with fused epilogues, tuned per shape, no CUDA
    graphs) and ``model`` (the whole model as one graph)."""
    from pipeline.train.parallelize import compile_blocks

    if mode == "blocks":
        compile_blocks(model)
    elif mode == "blocks-autotune":
        compile_blocks(model, mode="max-autotune-no-cudagraphs")
    elif mode == "model":
        model.compile(dynamic=False)
    elif mode != "none":
        raise ValueError(f"unknown compile mode {mode!r}")


@contextlib.contextmanager
def experiment(case: Case):
    """The case's model-level experiments for its duration: short attention as matrix products up to
    ``math_attention`` tokens, and the fused attention backend (``cudnn``: flash and memory-efficient off)."""
    from pipeline.models import timesformer

    saved = timesformer.MATH_ATTENTION_MAX_LEN
    flags = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
             torch.backends.cuda.cudnn_sdp_enabled())
    if case.math_attention is not None:
        timesformer.MATH_ATTENTION_MAX_LEN = case.math_attention
    if case.sdpa == "cudnn":
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(True)
    elif case.sdpa != "default":
        raise ValueError(f"unknown sdpa backend {case.sdpa!r}")
    try:
        yield
    finally:
        timesformer.MATH_ATTENTION_MAX_LEN = saved
        torch.backends.cuda.enable_flash_sdp(flags[0])
        torch.backends.cuda.enable_mem_efficient_sdp(flags[1])
        torch.backends.cuda.enable_cudnn_sdp(flags[2])


def run_loop(case: Case, device: torch.device) -> dict:
    """Our training loop (or, for ``engine``, the same engine's steps without it) on synthetic batches."""
    from pipeline.config import batch_plan
    from pipeline.models.flops import training_flops_per_clip
    from pipeline.models.timesformer import TimeSformer, model_config
    from pipeline.train.engine import make_engine
    from pipeline.train.loop import LoopState, train_loop
    from pipeline.train.parallelize import prepare_model, recompute_fraction

    cfg = recipe_config(case, device)
    plan = batch_plan(cfg, 1)
    mcfg = model_config(cfg)
    fresh(device)
    torch.manual_seed(0)
    model = TimeSformer(mcfg)
    t_setup = time.perf_counter()
    policy = prepare_model(model, cfg, device, build=lambda: TimeSformer(mcfg), micro_batch=case.micro_batch)
    if case.compile not in ("none", "blocks"):  # the product's modes are applied by prepare_model
        compile_experiment(model, case.compile)
    engine = make_engine(model, cfg, plan, per_epoch=10**6, device=device, model_factory=lambda: TimeSformer(mcfg))
    x = host_clip(mcfg, case.micro_batch, device)
    y = torch.randint(0, mcfg.num_classes, (case.micro_batch,))
    batch = {"video": x, "label": y}

    def stream(s, step):
        def endless():
            while True:
                yield batch
        return endless(), s.total

    metrics: list[dict] = []
    state = LoopState(
        cfg=cfg, engine=engine, plan=plan, index=None, storage=None, clip=None, rank=0, world_size=1, device=device,
        per_epoch=10**6, total=0, run_dir=Path("/nonexistent"),
        sinks=SimpleNamespace(log_metrics=lambda m, step: metrics.append(m)),
        account=SimpleNamespace(exhausted=False, hours=0.0, save=lambda: None), stop=SimpleNamespace(reason=None),
        save=lambda step: None, validate=dict, flops_per_clip=0.0, batches=stream)
    losses: list[float] = []

    def steps(n: int) -> None:
        if case.impl == "loop":
            state.total = engine.global_step + n
            state.cfg.train.log_every = n  # one metric line per timed window: what a run logs, amortised
            train_loop(state)
        else:
            for _ in range(n):
                engine.train_micro_batch(x, y)

    warm_s, step_s, prof = timed(steps, case, device, t_setup)
    losses.append(float(engine.train_micro_batch(x, y)))
    flops = 2.0 * training_flops_per_clip(mcfg)
    hw_flops = 2.0 * training_flops_per_clip(mcfg, recompute_forward=recompute_fraction(policy, mcfg.depth))
    out = {"policy": policy, "step_ms": 1000 * step_s, "clips_per_s": case.micro_batch / step_s,
           "model_tflops": flops * case.micro_batch / step_s / 1e12,
           "hardware_tflops": hw_flops * case.micro_batch / step_s / 1e12, "peak_gib": peak_gib(device),
           **prof, "setup_and_warmup_s": warm_s, "last_loss": losses[-1]}
    return out  # the engine and model are freed with this frame (fresh() collects them before the next case)


def hf_model(mcfg, device: torch.device):
    from transformers import TimesformerConfig, TimesformerForVideoClassification

    from pipeline.models.convert import hf_config_dict

    kwargs = hf_config_dict(mcfg)
    rate = kwargs.pop("drop_path_rate", 0.0)
    config = TimesformerConfig(**kwargs)
    # transformers 5.17's strict config types drop_path_rate as int and refuses 0.1: set it past the check
    object.__setattr__(config, "drop_path_rate", rate)
    return TimesformerForVideoClassification(config).to(device)


def run_hf(case: Case, device: torch.device) -> dict:
    """Hugging Face TimeSformer, fp32 weights, bf16 autocast, fused AdamW: a plain PyTorch training loop."""
    import torch.nn.functional as F

    from pipeline.data.transforms import normalize_on_device
    from pipeline.models.flops import training_flops_per_clip
    from pipeline.models.timesformer import model_config

    cfg = recipe_config(case, device)
    mcfg = model_config(cfg)
    x = host_clip(mcfg, case.micro_batch, device)
    y = torch.randint(0, mcfg.num_classes, (case.micro_batch,), device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    def plain_loop(model, opt):
        def steps(n: int) -> None:
            for _ in range(n):
                video = normalize_on_device(x, device).transpose(1, 2)  # HF takes (B, T, C, H, W)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    logits = model(pixel_values=video).logits
                F.cross_entropy(logits.float(), y).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        return steps

    for checkpointing in (False, True):
        fresh(device)
        torch.manual_seed(0)
        model = hf_model(mcfg, device)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        steps = plain_loop(model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda"))
        try:
            steps(case.warmup)
            sync(device)
            t0 = time.perf_counter()
            steps(case.steps)
            sync(device)
        except torch.cuda.OutOfMemoryError:
            model = steps = None  # freed before the try with checkpointing
            continue
        step_s = (time.perf_counter() - t0) / case.steps
        prof = kernel_profile(steps, 3, device)
        flops = 2.0 * training_flops_per_clip(mcfg)
        hw_flops = 2.0 * training_flops_per_clip(mcfg, recompute_forward=checkpointing)
        return {"policy": "full" if checkpointing else "none", "step_ms": 1000 * step_s,
                "clips_per_s": case.micro_batch / step_s, "model_tflops": flops * case.micro_batch / step_s / 1e12,
                "hardware_tflops": hw_flops * case.micro_batch / step_s / 1e12, "peak_gib": peak_gib(device),
                **prof}
    raise torch.cuda.OutOfMemoryError("Hugging Face TimeSformer does not fit even with gradient checkpointing")


def run_infer(case: Case, device: torch.device) -> dict:
    """Forward passes in bf16 weights under inference_mode: ours (optionally block-compiled) or Hugging Face."""
    from pipeline.data.transforms import normalize_on_device
    from pipeline.models.flops import flops_per_view
    from pipeline.models.timesformer import TimeSformer, model_config

    cfg = recipe_config(case, device)
    mcfg = model_config(cfg)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    fresh(device)
    torch.manual_seed(0)
    hf = case.impl == "hf_infer"
    model = (hf_model(mcfg, device) if hf else TimeSformer(mcfg).to(device)).to(dtype).eval()
    if not hf:
        compile_experiment(model, case.compile)
    x = host_clip(mcfg, case.micro_batch, device)

    def steps(n: int) -> None:
        with torch.inference_mode():
            for _ in range(n):
                video = normalize_on_device(x, device, dtype=dtype)
                model(pixel_values=video.transpose(1, 2)) if hf else model(video)

    warm_s, step_s, prof = timed(steps, case, device, time.perf_counter())
    flops = 2.0 * flops_per_view(mcfg)
    return {"policy": "-", "step_ms": 1000 * step_s, "clips_per_s": case.micro_batch / step_s,
            "model_tflops": flops * case.micro_batch / step_s / 1e12,
            "hardware_tflops": flops * case.micro_batch / step_s / 1e12, "peak_gib": peak_gib(device),
            **prof, "setup_and_warmup_s": warm_s}


def matmul_tflops(device: torch.device, n: int = 8192, reps: int = 10) -> float:
    """A bf16 n x n x n matrix product on random data, median of ``reps`` after warm-up (the achievable peak)."""
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del a, b
    return 2 * n**3 / statistics.median(times) / 1e12


def report(rows: list[dict], spec: float, measured: float) -> str:
    lines = [f"{'case':24s} {'AC':9s} {'clips/s':>9s} {'step ms':>9s} {'MFU spec':>9s} {'MFU mm':>7s} "
             f"{'HFU spec':>9s} {'HFU mm':>7s} {'peak GiB':>9s} {'host gap ms':>12s}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['case']:24s} FAILED: {r['error'].splitlines()[-1][:100]}")
            continue
        lines.append(f"{r['case']:24s} {r['policy']:9s} {r['clips_per_s']:9.2f} {r['step_ms']:9.2f} "
                     f"{100 * r['model_tflops'] / spec:8.1f}% {100 * r['model_tflops'] / measured:6.1f}% "
                     f"{100 * r['hardware_tflops'] / spec:8.1f}% {100 * r['hardware_tflops'] / measured:6.1f}% "
                     f"{r['peak_gib']:9.2f} {r['host_gap_ms']:12.2f}")
    ok = [r for r in rows if "error" not in r and "setup" in r]
    by = {r["case"]: r for r in rows if "error" not in r}
    lines.append("")

    def same(r: dict, other: dict, *keys: str) -> bool:
        return all(r["setup"][k] == other["setup"][k] for k in keys)

    for r in ok:  # every case of ours against Hugging Face at the same recipe and batch
        hf_impl = {"loop": "hf", "infer": "hf_infer"}.get(r["setup"]["impl"])
        hf = next((h for h in ok if h["setup"]["impl"] == hf_impl and same(r, h, "recipe", "micro_batch")), None)
        if hf:
            ratio = r["clips_per_s"] / hf["clips_per_s"]
            target = HF_RATIO_TARGETS.get(r["setup"]["recipe"]) if hf_impl == "hf" else None
            verdict = f" (target >= {target}x: {'met' if ratio >= target else 'MISSED'})" if target else ""
            lines.append(f"{r['case']:24s} vs Hugging Face: {ratio:.2f}x{verdict}")
    for ds in ok:  # DeepSpeed against plain PyTorch, everything else equal
        if ds["setup"]["impl"] != "loop" or ds["setup"]["engine"] != "deepspeed":
            continue
        for pt in ok:
            if pt["setup"]["engine"] == "torch" and same(ds, pt, "recipe", "micro_batch", "impl", "ac", "compile",
                                                         "math_attention", "sdpa"):
                overhead = pt["clips_per_s"] / ds["clips_per_s"] - 1
                lines.append(f"DeepSpeed overhead {ds['case']:20s} vs {pt['case']:20s}: {100 * overhead:+.1f}% "
                             "(target <= 5%)")
    for name, target in TARGETS.items():
        if name in by:
            got = by[name]["clips_per_s"]
            lines.append(f"{name:20s} {got:8.1f} clips/s, target >= {target:g}: {'met' if got >= target else 'MISSED'}")
    profiled = [r for r in rows if r.get("kernels_ms")]
    if profiled:
        lines.append("")
        lines.append("GPU time per step by kernel kind (ms; from torch.profiler over 3 steps):")
    for r in profiled:
        kinds = ", ".join(f"{k} {v:.1f}" for k, v in r["kernels_ms"].items())
        lines.append(f"{r['case']:24s} busy {r['gpu_busy_ms']:.1f} of {r['profiled_step_ms']:.1f}: {kinds}; "
                     f"{r['kernel_launches_per_step']:.0f} kernels")
    if "tiny_loop" in by and "tiny_engine" in by:
        for loop_case, bare in (("tiny_loop", "tiny_engine"), ("tiny_loop_ds", "tiny_engine_ds")):
            if loop_case in by and bare in by:
                extra = by[loop_case]["step_ms"] - by[bare]["step_ms"]
                lines.append(f"the loop's own cost per step ({loop_case} - {bare}): {1000 * extra:.0f} us")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--cases", help="comma-separated case names, or 'targets' for the recipes' settings next to "
                   "Hugging Face (default: every case of the device)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--out", help="write the numbers as JSON here (after every case, so a cut run keeps what ran)")
    args = p.parse_args(argv)
    cases = GPU_CASES if args.device == "cuda" else CPU_CASES
    if args.list:
        for c in GPU_CASES + CPU_CASES:
            print(f"{c.name:26s} {c.recipe:10s} micro batch {c.micro_batch:3d} {c.impl:8s} engine {c.engine:9s} "
                  f"AC {c.ac:9s} compile {c.compile:15s} ZeRO-{c.zero_stage} sdpa {c.sdpa}"
                  + ("" if c.math_attention is None else f" math attention <= {c.math_attention}"))
        return 0
    if args.cases:
        known = {c.name: c for c in GPU_CASES + CPU_CASES}
        names = [n for part in args.cases.split(",") for n in GROUPS.get(part, [part])]
        unknown = [n for n in names if n not in known]
        if unknown:
            p.error(f"unknown case(s) {', '.join(unknown)}; --list shows them")
        cases = [known[n] for n in names]
    if args.device == "cuda" and not torch.cuda.is_available():
        print("train_loop: no CUDA device; `--device cpu` runs the CPU cases", file=sys.stderr)
        return 2

    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipeline.train").setLevel(logging.INFO)  # the auto policy's measurements
    from pipeline.config import load_recipe
    from pipeline.distributed import DistEnv
    from pipeline.models.flops import PEAK_TFLOPS
    from pipeline.train.engine import init_distributed

    DistEnv.single().export()  # one process: rank 0 of 1 on 127.0.0.1
    os.environ.setdefault("DS_ACCELERATOR", args.device)
    device = init_distributed(load_recipe("smoke", [f"cluster.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
                                                    "data.index=unused"]), 0, 1, 0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    spec = next((v for k, v in PEAK_TFLOPS.items() if k in name), float("nan"))
    measured = matmul_tflops(device)
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import deepspeed

        versions["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    head = (f"device {name}; spec dense bf16 peak {spec:g} TFLOP/s; bf16 8192^3 matmul measured here "
            f"{measured:.0f} TFLOP/s; {versions}")
    print(head, flush=True)
    rows: list[dict] = []
    runners = {"loop": run_loop, "engine": run_loop, "hf": run_hf, "infer": run_infer, "hf_infer": run_infer}
    for case in cases:
        t0 = time.perf_counter()
        # compiled graphs are not reused across cases: a case's backend flags or compile mode are not all guarded,
        # and every model would count towards dynamo's recompile limit
        torch._dynamo.reset()
        try:
            with experiment(case):
                row = {"case": case.name, **runners[case.impl](case, device)}
        except Exception:  # noqa: BLE001 -- one case failing (an OOM, a compile error) must not lose the others
            row = {"case": case.name, "error": traceback.format_exc()}
            print(row["error"], file=sys.stderr, flush=True)
        row["case_s"] = time.perf_counter() - t0
        row["setup"] = asdict(case)
        rows.append(row)
        print(report([row], spec, measured).splitlines()[1], f"({row['case_s']:.0f} s)", flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"device": name, "spec_tflops": spec, "matmul_tflops": measured,
                                                  "versions": versions, "rows": rows}, indent=1))
    print()
    print(head)
    print(report(rows, spec, measured))
    return 0


if __name__ == "__main__":
    sys.exit(main())

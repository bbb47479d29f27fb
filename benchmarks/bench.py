#!/usr/bin/env python
"""Model throughput: our TimeSformer next to Hugging Face's TimesformerForVideoClassification.

Same configuration, batch, precision and input in the same process; prints clips/s, achieved TFLOP/s
(hardware convention: 2 FLOPs per multiply-add; training counts forward + backward, plus the
recomputed forward under activation checkpointing), peak memory and our speed-up over Hugging Face.

    python benchmarks/bench.py                       # CPU: a small configuration, fp32
    python benchmarks/bench.py --device cuda         # GPU: base, HR and L in bf16 (the issue's cases)
    python benchmarks/bench.py --device cuda --cases l_train,base_infer --compile base_infer --selective l_train
    python benchmarks/bench.py --dry-run             # list the cases and exit

Weights are random: throughput does not depend on them. bf16 here means bf16 weights and activations
(what DeepSpeed's bf16 mode runs), the same for both implementations.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from pipeline.models.convert import hf_config_dict, to_hf
from pipeline.models.flops import device_peak_tflops, flops_per_view
from pipeline.models.timesformer import (
    TimeSformer,
    apply_activation_checkpointing,
    variant_config,
)


@dataclass(frozen=True)
class Case:
    name: str
    variant: str
    train: bool
    batch: int
    checkpointing: bool = False
    overrides: tuple = ()


GPU_CASES = [
    Case("base_train", "timesformer_base", True, 8),
    Case("base_infer", "timesformer_base", False, 32),
    Case("hr_train", "timesformer_hr", True, 2, checkpointing=True),
    Case("hr_infer", "timesformer_hr", False, 4),
    Case("l_train", "timesformer_l", True, 4, checkpointing=True),
    Case("l_infer", "timesformer_l", False, 4),
]
# CPU: the base architecture's shape scaled down so a run takes a minute on 2 cores.
_SMALL = (("num_frames", 8), ("img_size", 112), ("patch_size", 16), ("embed_dim", 192), ("depth", 4),
          ("num_heads", 3), ("num_classes", 400))
CPU_CASES = [
    Case("small_train", "timesformer_base", True, 2, overrides=_SMALL),
    Case("small_infer", "timesformer_base", False, 4, overrides=_SMALL),
    Case("small_train_ckpt", "timesformer_base", True, 2, checkpointing=True, overrides=_SMALL),
]
TARGETS = {"l_train": 1.6, "base_infer": 1.4}  # issue: speed-up over Hugging Face on a GPU, bf16


def build(case: Case, impl: str, device: torch.device, dtype: torch.dtype, compile_blocks: bool,
          checkpoint_policy: str = "full"):
    cfg = variant_config(case.variant, drop_path_rate=0.0, **dict(case.overrides))
    torch.manual_seed(0)
    ours = TimeSformer(cfg)
    if impl == "ours":
        model = ours
        if case.checkpointing:
            apply_activation_checkpointing(model, checkpoint_policy)
        if compile_blocks:
            for blk in model.blocks:
                blk._forward = torch.compile(blk._forward)
    else:
        from transformers import TimesformerConfig, TimesformerForVideoClassification

        model = TimesformerForVideoClassification(TimesformerConfig(**hf_config_dict(cfg)))
        model.load_state_dict(to_hf(ours.state_dict()), strict=True)
        if case.checkpointing:
            model.gradient_checkpointing_enable()
    model = model.to(device=device, dtype=dtype)
    model.train(case.train)
    return cfg, model


def forward(impl: str, model, x_BCTHW: torch.Tensor) -> torch.Tensor:
    if impl == "ours":
        return model(x_BCTHW)
    return model(pixel_values=x_BCTHW.transpose(1, 2)).logits  # HF takes (B, T, C, H, W)


class Runner:
    """One implementation of one case, built once, stepped in timed rounds."""

    def __init__(self, case: Case, impl: str, device: torch.device, dtype: torch.dtype) -> None:
        self.case, self.impl, self.device = case, impl, device
        before = self.allocated()
        base, *flags = impl.split("+")  # "ours+compile", "ours+flash": variants of ours
        policy = self.policy = "selective" if "selective" in flags else "full"
        self.cfg, self.model = build(case, base, device, dtype, "compile" in flags, policy)
        self.backend = None
        if "flash" in flags:
            from torch.nn.attention import SDPBackend
            self.backend = SDPBackend.FLASH_ATTENTION
        g = torch.Generator(device="cpu").manual_seed(1)
        cfg = self.cfg
        self.x = torch.randn(case.batch, 3, cfg.num_frames, cfg.img_size, cfg.img_size, generator=g).to(device, dtype)
        self.y = torch.randint(0, cfg.num_classes, (case.batch,), generator=g).to(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9) if case.train else None
        self.fwd_impl = base
        for _ in range(3):  # warm-up (and compilation)
            self.step()
        self.sync()
        self.resident = self.allocated() - before  # weights and optimizer state, kept between rounds
        self.step_times: list[float] = []
        self.peak = 0.0

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self) -> None:
        if self.backend is not None:
            from torch.nn.attention import sdpa_kernel

            with sdpa_kernel(self.backend):
                return self._step()
        return self._step()

    def _step(self) -> None:
        if self.case.train:
            loss = torch.nn.functional.cross_entropy(forward(self.fwd_impl, self.model, self.x).float(), self.y)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode():
                forward(self.fwd_impl, self.model, self.x)

    def timed_step(self, others_resident: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        self.step()
        self.sync()
        self.step_times.append(time.perf_counter() - t0)
        if self.device.type == "cuda":
            self.peak = max(self.peak, (torch.cuda.max_memory_allocated(self.device) - others_resident) / 2**30)

    def result(self) -> dict:
        clips_s = self.case.batch / statistics.median(self.step_times)  # the median step: robust to hiccups
        # forward + backward (2x); full checkpointing recomputes the forward; selective keeps the matmuls
        recompute = self.case.checkpointing and self.policy == "full"
        passes = (4 if recompute else 3) if self.case.train else 1
        # hardware FLOPs (what the device computed, the recomputed forward included): HFU, not MFU
        tflops = 2 * flops_per_view(self.cfg) * passes * clips_s / 1e12
        return dict(case=self.case.name, impl=self.impl, batch=self.case.batch, train=self.case.train,
                    checkpointing=self.case.checkpointing, clips_per_s=clips_s, tflops=tflops,
                    peak_mem_gib=self.peak if self.device.type == "cuda" else float("nan"),
                    steps=len(self.step_times))


def measure_case(case: Case, impls: list[str], device: torch.device, dtype: torch.dtype,
                 seconds: float) -> list[dict]:
    """Build every implementation, then alternate single timed steps between them (swapping which goes
    first), so a noisy machine slows all of them alike; report the median step of each."""
    runners = []
    for impl in impls:
        try:
            runners.append(Runner(case, impl, device, dtype))
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # a variant that fails to build (e.g. a compiler error) must not sink the run
            print(f"{case.name:18s} {impl:15s} failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:120]}",
                  flush=True)
    residents = [sum(o.resident for o in runners if o is not run) for run in runners]
    start, i = time.perf_counter(), 0
    while time.perf_counter() - start < seconds * len(runners) or i < 6:
        order = list(zip(runners, residents, strict=True))
        for run, others in (order if i % 2 == 0 else order[::-1]):
            run.timed_step(others)
        i += 1
    results = [run.result() for run in runners]
    del runners
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def profile_case(case: Case, impl: str, device: torch.device, dtype: torch.dtype, top: int = 18) -> None:
    """Print where one implementation's step spends its time (kernels by self device time)."""
    from torch.profiler import ProfilerActivity, profile

    run = Runner(case, impl, device, dtype)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(3):
            run.step()
        run.sync()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"--- profile: {case.name} / {impl} (3 steps) ---")
    print(prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=60))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--cases", default=None, help="comma-separated case names (default: all for the device)")
    p.add_argument("--impls", default="ours,hf", help="which implementations to time (default: ours,hf)")
    p.add_argument("--seconds", type=float, default=None, help="timed seconds per implementation and case")
    p.add_argument("--compile", default=None, metavar="CASES",
                   help="also time ours with torch.compile'd blocks for these cases ('all' or comma-separated)")
    p.add_argument("--flash", default=None, metavar="CASES",
                   help="also time ours with SDPA restricted to FlashAttention for these cases")
    p.add_argument("--selective", default=None, metavar="CASES",
                   help="also time ours with the 'selective' activation-checkpointing policy for these cases")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--profile", default=None, help="after timing, profile these cases (comma-separated)")
    p.add_argument("--dry-run", action="store_true", help="print the cases and exit")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    cases = GPU_CASES if device.type == "cuda" else CPU_CASES
    known = {c.name: c for c in GPU_CASES + CPU_CASES}
    if args.cases:
        unknown = [n for n in args.cases.split(",") if n not in known]
        if unknown:
            p.error(f"unknown case(s) {unknown}; known: {', '.join(known)}")
        cases = [known[n] for n in args.cases.split(",")]
    impls = args.impls.split(",")
    def chosen(arg: str | None) -> set[str]:
        return {c.name for c in cases} if arg == "all" else set((arg or "").split(",")) - {""}

    variants = {"compile": chosen(args.compile), "flash": chosen(args.flash), "selective": chosen(args.selective)}

    def impls_for(case: Case) -> list[str]:
        return impls + [f"ours+{v}" for v, names in variants.items() if case.name in names]

    seconds = args.seconds or (3.0 if device.type == "cuda" else 10.0)
    if args.dry_run:
        for c in cases:
            cfg = variant_config(c.variant, **dict(c.overrides))
            print(f"{c.name:18s} {c.variant:17s} {cfg.num_frames}x{cfg.img_size} batch {c.batch} "
                  f"{'train' if c.train else 'infer'}{' +ckpt' if c.checkpointing else ''}  impls {impls_for(c)}")
        return 0
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()}"
    peak = device_peak_tflops(device)
    print(f"device: {name}   dtype: {dtype}   torch {torch.__version__}", flush=True)
    results = []
    header = f"{'case':18s} {'impl':15s} {'batch':>5s} {'clips/s':>9s} {'TFLOP/s':>8s} {'HFU':>6s} {'peak GiB':>9s}"
    print(header)
    print("-" * len(header))
    for case in cases:
        try:
            case_results = measure_case(case, impls_for(case), device, dtype, seconds)
        except torch.cuda.OutOfMemoryError as e:  # report and go on: other cases still tell something
            print(f"{case.name:18s} out of memory: {str(e).splitlines()[0]}", flush=True)
            torch.cuda.empty_cache()
            continue
        for r in case_results:
            results.append(r)
            mfu = f"{100 * r['tflops'] / peak:5.1f}%" if peak else "   n/a"  # hardware FLOPs / spec peak
            print(f"{case.name:18s} {r['impl']:15s} {r['batch']:5d} {r['clips_per_s']:9.2f} {r['tflops']:8.2f} "
                  f"{mfu:>6s} {r['peak_mem_gib']:9.2f}", flush=True)
    print()
    print("speed-up over Hugging Face (clips/s ratio):")
    by = {(r["case"], r["impl"]): r for r in results}
    verdicts = []
    for case in cases:
        hf = by.get((case.name, "hf"))
        for impl in impls_for(case):
            if impl == "hf" or (case.name, impl) not in by or hf is None:
                continue
            ratio = by[(case.name, impl)]["clips_per_s"] / hf["clips_per_s"]
            target = TARGETS.get(case.name) if device.type == "cuda" else 1.0
            verdict = "" if target is None else (f"  target >= {target}: " + ("met" if ratio >= target else "MISSED"))
            verdicts.append(dict(case=case.name, impl=impl, ratio=ratio, target=target))
            print(f"  {case.name:18s} {impl:15s} {ratio:5.2f}x{verdict}")
    for name in (args.profile.split(",") if args.profile else []):
        for impl in impls:
            profile_case(known[name], impl, device, dtype)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=name, dtype=str(dtype), torch=torch.__version__, results=results,
                           speedups=verdicts), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

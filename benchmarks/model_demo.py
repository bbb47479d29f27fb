#!/usr/bin/env python
"""Model demo: what each TimeSformer costs, and that every attention path runs.

Builds every TimeSformer variant and attention scheme, prints parameters and FLOPs per view next to
the paper's numbers, and classifies a generated clip (a square moving across a textured background)
with the models small enough for a CPU. Weights are random, so the predicted class means nothing yet;
what the demo shows is that every path runs and what each model costs.

    python benchmarks/model_demo.py         # everything (about a minute on 2 cores)
    python benchmarks/model_demo.py --quick # skip the base-size forward pass
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from tqdm import tqdm

from pipeline.models.flops import flops_per_view, parameter_count
from pipeline.models.timesformer import ATTENTION_TYPES, VARIANTS, TimeSformer, variant_config

PAPER = {  # paper Tables 1 and 5: parameters (M), inference TFLOPs for 1 clip x 3 crops
    "timesformer_base": (121.4, 0.59), "timesformer_hr": (121.4, 5.11), "timesformer_l": (121.4, 7.14),
}
PAPER_SCHEMES = {"space_only": 85.9, "joint_space_time": 85.9, "divided_space_time": 121.4,
                 "sparse_local_global": 121.4, "axial": 156.8}


def moving_square_clip(frames: int, size: int, seed: int = 0) -> torch.Tensor:
    """A normalised (1, 3, T, H, W) clip: a bright square moving left to right over fixed noise."""
    g = torch.Generator().manual_seed(seed)
    background = torch.rand(3, size, size, generator=g) * 0.5
    clip = background.unsqueeze(1).repeat(1, frames, 1, 1)
    side = max(2, size // 6)
    for t in range(frames):
        x0 = int((size - side) * t / max(1, frames - 1))
        clip[:, t, size // 2 - side // 2: size // 2 + side // 2, x0: x0 + side] = 1.0
    return ((clip - 0.45) / 0.225).unsqueeze(0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="skip the base-size forward pass")
    args = p.parse_args(argv)
    torch.manual_seed(0)

    print("TimeSformer variants (divided space-time attention, 400 classes)")
    print(f"{'variant':18s} {'clip':>8s} {'params':>10s} {'GFLOPs/view':>12s} {'x3 views':>9s} {'paper':>6s}")
    for name in VARIANTS:
        cfg = variant_config(name)
        gflops = flops_per_view(cfg) / 1e9
        paper = PAPER.get(name, (None, None))[1]
        print(f"{name:18s} {cfg.num_frames:>3d}x{cfg.img_size:<4d} {parameter_count(cfg) / 1e6:9.2f}M "
              f"{gflops:12.2f} {3 * gflops / 1e3:8.2f}T {paper if paper else '':>6}")

    print("\nAttention schemes at 8x224 (paper Table 1)")
    print(f"{'scheme':22s} {'params':>10s} {'paper':>7s} {'GFLOPs/view':>12s}")
    for scheme in ATTENTION_TYPES:
        cfg = variant_config("timesformer_base", attention_type=scheme)
        print(f"{scheme:22s} {parameter_count(cfg) / 1e6:9.2f}M {PAPER_SCHEMES[scheme]:6.1f}M "
              f"{flops_per_view(cfg) / 1e9:12.1f}")

    runs = [("timesformer_tiny", s) for s in ATTENTION_TYPES]
    if not args.quick:
        runs.append(("timesformer_base", "divided_space_time"))
    print("\nClassifying a generated clip (random weights: the class is arbitrary; this shows the path runs)")
    for name, scheme in tqdm(runs, desc="forward passes", unit="model", file=sys.stdout):
        cfg = variant_config(name, attention_type=scheme)
        model = TimeSformer(cfg).eval()
        clip = moving_square_clip(cfg.num_frames, cfg.img_size)
        t0 = time.perf_counter()
        with torch.inference_mode():
            probs = model(clip).softmax(-1)[0]
        tqdm.write(f"  {name:18s} {scheme:20s} input {tuple(clip.shape)} -> class {int(probs.argmax())} "
                   f"(p={float(probs.max()):.3f}) in {time.perf_counter() - t0:.2f}s", file=sys.stdout)
    print("\nNext: `make test` runs the test suite; benchmarks/bench.py compares speed with Hugging Face.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

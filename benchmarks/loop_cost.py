#!/usr/bin/env python
"""The training loop's own host cost per step, against the loop of an earlier commit in the same run.

The loop (``pipeline.train.loop.train_loop``, world size 1, CPU) drives an engine whose step costs nothing
(it returns a ready loss tensor), on an endless in-memory batch, so every microsecond measured is the loop's:
per-step seeding, the stop / data / divergence checks, loss bookkeeping. The baseline is the same
measurement on ``--baseline-ref`` (checked out into a temporary git worktree), run alternately with the
working tree's so that drift hits both.

    python benchmarks/loop_cost.py                          # against 5c2da56 (the loop before issue 15)
    python benchmarks/loop_cost.py --baseline-ref HEAD~3 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]


def measure(steps: int) -> float:
    """Microseconds per step of the loop around a free engine, in this process's ``pipeline``."""
    import torch

    from pipeline.config import batch_plan, load_recipe
    from pipeline.train import loop

    class FreeEngine:
        global_step, lr = 0, 0.1
        loss, norm = torch.tensor(1.0), torch.tensor(1.0)

        def train_micro_batch(self, video, label):
            self.global_step += 1
            return self.loss

        def grad_norm(self):
            return 1.0

        def grad_norm_tensor(self):
            return self.norm

    cfg = load_recipe("smoke", ["train.micro_batch=2", "train.global_batch=2", "train.val_every=-1",
                                "train.ckpt_every=1000000", "train.log_every=1000000"])
    batch = {"video": torch.zeros(2, 3, 1, 1, 1), "label": torch.tensor([0, 1])}

    def stream(s, step):
        def endless():
            while True:
                yield batch
        return endless(), s.total

    loop._interval_stream = stream  # older loops read their batches only from here
    engine = FreeEngine()
    state = loop.LoopState(cfg=cfg, engine=engine, plan=batch_plan(cfg, 1), index=None, storage=None, clip=None,
                           rank=0, world_size=1, device=torch.device("cpu"), per_epoch=10**6, total=0,
                           run_dir=Path("/nonexistent"), sinks=SimpleNamespace(log_metrics=lambda m, step: None),
                           account=SimpleNamespace(exhausted=False, hours=0.0, save=lambda: None),
                           stop=SimpleNamespace(reason=None), save=lambda step: None, validate=dict)

    def run(n: int) -> None:
        state.total = engine.global_step + n
        cfg.train.log_every = n  # one metric line per window, as a run's log_every amortises it
        loop.train_loop(state)

    run(min(500, steps))
    t0 = time.perf_counter()
    run(steps)
    return (time.perf_counter() - t0) / steps * 1e6


def in_tree(tree: Path, steps: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--measure", str(steps)], cwd=tree,
                         env=env, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline-ref", default="5c2da56", help="git commit whose loop is the baseline")
    p.add_argument("--steps", type=int, default=5000, help="steps per measurement")
    p.add_argument("--rounds", type=int, default=5, help="measurements of each, alternating")
    p.add_argument("--measure", type=int, help=argparse.SUPPRESS)  # internal: one measurement, printed
    args = p.parse_args(argv)
    if args.measure:
        print(f"{measure(args.measure):.3f}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(base), args.baseline_ref],
                       check=True)
        try:
            times: dict[str, list[float]] = {"baseline": [], "this tree": []}
            for r in range(args.rounds):
                order = [("baseline", base), ("this tree", REPO)]
                for name, tree in order if r % 2 == 0 else order[::-1]:
                    times[name].append(in_tree(tree, args.steps))
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)], check=False)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"the training loop's own cost per step (CPU, world size 1, an engine that costs nothing; "
          f"{args.rounds} rounds x {args.steps} steps, alternating):")
    for name, values in times.items():
        print(f"  {name:10s} {med[name]:8.1f} us/step   (each round: {', '.join(f'{v:.1f}' for v in values)})")
    print(f"  baseline = {args.baseline_ref}; cut {med['baseline'] / med['this tree']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

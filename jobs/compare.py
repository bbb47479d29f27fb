#!/usr/bin/env python
"""Compare training runs the way the paper does (Table 2): model, attention, frames x rate, resolution,
parameters, TFLOPs per view x views, GPU-hours, top-1, top-5, clips/s; and a plot of accuracy against
GPU-hours (validation curve per run, the test result as a star, budgets as dashed lines).

    python jobs/compare.py --experiment smoke
    python jobs/compare.py --experiment k400 --runs k400_base-2026... k400_attn_space_only-2026...
    python jobs/compare.py --experiment k400 --tracking-uri http://127.0.0.1:5000 --out reports/k400

Prints the table; writes table.txt/.csv/.md, runs.json and accuracy_vs_gpu_hours.png under --out
(default runs/compare-<experiment>), and logs them to MLflow as a comparison run in the same experiment
(--no-log to skip). Each run's MLflow status is a column; runs that did not finish (FAILED, KILLED,
RUNNING) are marked in the table and dotted in the plot, or left out with --finished-only.
Exit codes: 0 done, 2 no such experiment or runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", required=True, help="MLflow experiment (a recipe name by default)")
    p.add_argument("--runs", nargs="+", help="run ids or run names (default: every training run of the experiment)")
    p.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else runs/mlflow.db")
    p.add_argument("--runs-dir", default="runs", help="where the embedded default keeps mlflow.db (default runs/)")
    p.add_argument("--out", help="output directory (default <runs-dir>/compare-<experiment>)")
    p.add_argument("--no-log", action="store_true", help="do not log the comparison to MLflow")
    p.add_argument("--finished-only", action="store_true",
                   help="leave out runs whose status is not FINISHED (default: shown, and marked)")
    args = p.parse_args(argv)
    from pipeline.tracking.compare import fetch, log_comparison, table_text, write_report
    from pipeline.tracking.sink import default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri(args.runs_dir)
    try:
        summaries = fetch(uri, args.experiment, args.runs, finished_only=args.finished_only)
    except ValueError as e:
        print(f"compare: {e}", file=sys.stderr)
        return 2
    if not summaries:
        what = "finished training runs" if args.finished_only else "training runs"
        print(f"compare: experiment {args.experiment!r} has no {what} yet", file=sys.stderr)
        return 2
    out = Path(args.out or Path(args.runs_dir) / f"compare-{args.experiment}")
    paths = write_report(summaries, out, args.experiment)
    print(table_text(summaries))
    print(f"\nwrote {', '.join(sorted(paths))} in {out}\nplot: {paths['accuracy_vs_gpu_hours.png']}")
    if not args.no_log:
        run_id = log_comparison(uri, args.experiment, summaries, paths)
        print(f"logged to MLflow at {uri} as comparison run {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Compare training runs the way the paper does (Table 2): model, attention, frames x rate, resolution,
parameters, TFLOPs per view x views, GPU-hours, top-1, top-5, clips/s; and a plot of accuracy against
GPU-hours (validation curve per run, the test result as a star, budgets as dashed lines). A multi-label
run (model.multi_label) is scored by mAP instead of top-1/top-5; runs scored by different metrics get a
table and a plot panel each (their numbers do not compare).

    python jobs/compare.py --experiment smoke
    python jobs/compare.py --experiment k400 --runs k400_base-2026... k400_attn_space_only-2026...
    python jobs/compare.py --experiment k400 --tracking-uri http://127.0.0.1:5000 --out reports/k400
    python jobs/compare.py --experiment smoke --sweep attn --at-gpu-hours 0.5     # a sweep's members, budget-matched

The cost view, always: the Pareto front of accuracy against GPU-hours (pareto.txt, runs on the front marked *,
and pareto.png with the front drawn; accuracy is the test protocol's, else the last validation's), and with
--at-gpu-hours H every run's validation accuracy at H (the last validation at or before it; a run that ended
before H says so) as at_<H>h.txt and crosses on the plot. --sweep NAME compares the members of a sweep
(jobs/launch.py --sweep) as one group, with its halving decisions, and logs the report to the sweep's parent run.

The paper's other cost, inference: the table's "inference GFLOPs/video" (GFLOPs per test view x the test
protocol's views) and accuracy_vs_inference.png, test accuracy against it (log axis), one point per run.

Prints the table; writes table.txt/.csv/.md, runs.json, accuracy_vs_gpu_hours.png and accuracy_vs_inference.png
under --out (default runs/compare-<experiment>), and logs them to MLflow as a comparison run in the same experiment
(--no-log to skip). Each run's MLflow status is a column; runs that did not finish (FAILED, KILLED,
RUNNING) are marked in the table and dotted in the plot, or left out with --finished-only.
Runs of different datasets or dataset versions (the table's dataset column) are refused unless
--mix-datasets: their accuracies are not comparable.
Exit codes: 0 done, 1 the report was written but MLflow did not take it, 2 no such database,
experiment or runs, runs of several datasets, or an --out that cannot be written (nothing created).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", required=True, help="MLflow experiment (a recipe name by default)")
    p.add_argument("--runs", nargs="+", help="run ids or run names (default: every training run of the experiment)")
    p.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else runs/mlflow.db")
    p.add_argument("--runs-dir", default="runs", help="where the embedded default keeps mlflow.db (default runs/)")
    p.add_argument("--out", help="output directory (default <runs-dir>/compare-<experiment>)")
    p.add_argument("--sweep", help="compare the members of this sweep (its name; runs/<sweep>/sweep.json)")
    p.add_argument("--at-gpu-hours", type=float, metavar="H", help="every run's validation accuracy at H GPU-hours")
    p.add_argument("--no-log", action="store_true", help="do not log the comparison to MLflow")
    p.add_argument("--finished-only", action="store_true",
                   help="leave out runs whose status is not FINISHED (default: shown, and marked)")
    p.add_argument("--mix-datasets", action="store_true",
                   help="compare runs of different datasets or dataset versions (refused by default: their "
                        "accuracies are not comparable)")
    args = p.parse_args(argv)
    from pipeline.secrets import redact_text
    from pipeline.tracking.compare import (
        MixedDatasetsError,
        at_hours_text,
        check_one_dataset,
        fetch,
        log_comparison,
        log_to_run,
        pareto_front,
        pareto_text,
        sweep_parent,
        table_text,
        write_cost_report,
        write_report,
    )
    from pipeline.tracking.sink import default_tracking_uri, quick_failing_http

    uri = args.tracking_uri or default_tracking_uri(args.runs_dir)
    shown = redact_text(uri)  # a URI may carry a password or a token: never printed
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.is_file():  # MLflow would create an empty database (and its tables) here: reading creates nothing
            print(f"compare: no MLflow database at {db} (give --runs-dir where the runs were launched, or "
                  f"--tracking-uri)", file=sys.stderr)
            return 2
    quick_failing_http()  # an unreachable server: one error now, not minutes of retries
    try:
        if args.sweep:  # first, members whose job died are recorded crashed (runs FAILED, decisions on the parent)
            from pipeline.train.sweep import reconcile_sweep

            reconcile_sweep(args.runs_dir, args.sweep)
        summaries = fetch(uri, args.experiment, args.runs, finished_only=args.finished_only, sweep=args.sweep)
        parent, decisions = sweep_parent(uri, args.experiment, args.sweep) if args.sweep else (None, [])
    except Exception as e:  # noqa: BLE001 -- ValueError (no such experiment/run), MlflowException, network errors
        print(f"compare: {redact_text(' '.join(str(e).split()))[:1000]}", file=sys.stderr)
        return 2
    if not summaries:
        what = "finished training runs" if args.finished_only else "training runs"
        print(f"compare: experiment {args.experiment!r} has no {what} yet", file=sys.stderr)
        return 2
    if not args.mix_datasets:
        try:
            check_one_dataset(summaries)
        except MixedDatasetsError as e:
            print(f"compare: {e}", file=sys.stderr)
            return 2
    if args.at_gpu_hours is not None and not args.at_gpu_hours > 0:
        print(f"compare: --at-gpu-hours {args.at_gpu_hours}: expected a positive number of GPU-hours", file=sys.stderr)
        return 2
    title = f"{args.experiment} sweep {args.sweep}" if args.sweep else args.experiment
    out = Path(args.out or Path(args.runs_dir) / (f"compare-{args.sweep}" if args.sweep else
                                                   f"compare-{args.experiment}"))
    try:
        paths = write_report(summaries, out, title)
        paths.update(write_cost_report(summaries, out, title, args.at_gpu_hours, decisions))
    except OSError as e:
        print(f"compare: cannot write the report to {out} ({e.strerror or e}): choose another --out", file=sys.stderr)
        return 2
    print(table_text(summaries))
    print("\n" + pareto_text(summaries))
    if decisions:
        print("\nhalving decisions:\n" + "\n".join(f"  {d}" for d in decisions))
    if args.at_gpu_hours is not None:
        print("\n" + at_hours_text(summaries, args.at_gpu_hours))
    print(f"\nwrote {', '.join(sorted(paths))} in {out}\nplot: {paths['accuracy_vs_gpu_hours.png']}\n"
          f"inference plot: {paths['accuracy_vs_inference.png']}")
    if not args.no_log:
        try:
            if parent:  # a sweep's comparison belongs to its parent run
                log_to_run(uri, parent, paths, {"pareto_front": ",".join(s.run for s in pareto_front(summaries))})
                print(f"logged to MLflow at {shown} on the sweep's parent run {parent}")
                return 0
            run_id = log_comparison(uri, args.experiment, summaries, paths)
        except Exception as e:  # noqa: BLE001 -- the report is written; say why MLflow did not take it
            print(f"compare: the comparison was not logged to MLflow at {shown} "
                  f"({redact_text(' '.join(str(e).split()))[:500]}); the files above have it", file=sys.stderr)
            return 1
        print(f"logged to MLflow at {shown} as comparison run {run_id}")
    return 0

if __name__ == "__main__":
    sys.exit(main())

"""Launch a training run: a recipe becomes a run directory and a multi-node DeepSpeed job on Slurm
(through submitit), or local processes.

    python jobs/launch.py --nodes 4 --recipe k400_long                       # 4 nodes x 8 GPUs on Slurm
    python jobs/launch.py --nodes 4 --recipe k400_long --dry-run             # print everything, submit nothing
    python jobs/launch.py --nodes 2 --recipe smoke --local --wait            # 2 local ranks (CPU, gloo)
    python jobs/launch.py --nodes 2 --recipe k400_base --cluster configs/clusters/example_gpu.yaml \\
        --partition a100 --time 2-00:00:00 train.zero_stage=3 optim.lr=0.01
    python jobs/launch.py --resume runs/k400_long-20261126-101500           # continue a stopped run
    python jobs/launch.py --recipe smoke --sweep model.attention_type=divided_space_time,joint_space_time,space_only \\
        --sweep-budget 0.3 --halving "rungs=0.25,0.5 eta=2" --array-parallelism 2   # one Slurm job array
    python jobs/launch.py --sweep-status attn    # its members, hours used/granted, job states, decisions

Sweeps (--sweep key=v1,v2, repeated for a grid, or --sweep-file FILE) check every member first, then submit ONE
Slurm job array (--array-parallelism N at a time), or with --local run the members as local processes N at a
time while this command waits. Each member is a normal run directory under runs/<sweep>/, a child of the sweep's
MLflow parent run; runs/<sweep>/sweep.json records members, budgets and every halving decision. --sweep-budget
splits a total budget equally (else each member keeps the recipe's budget.gpu_hours); --halving stops, at each
rung (a fraction of the member budget in GPU-hours), members outside the top 1/eta of those that reported there
so far, and gives their unused hours to the members still training (docs/training.md, "Sweeps and successive
halving").

Recipes are configs/recipes/*.yaml (`--list`); any field can be overridden as key=value. The global batch
is the recipe's whatever the world size (gradient accumulation); a world size that cannot meet it is
refused here, not on the cluster. Everything that can be checked is checked before anything is created
(recipe, world size, dataset, model.init, Slurm); a submission the scheduler refuses removes the run
directory it made and marks its MLflow run FAILED. Run names are letters, digits, '.', '_' and '-'.

Secrets never go into the run directory or MLflow: cluster.env entries with secret-looking names
(*_SECRET*, *PASSWORD*, *TOKEN*, *ACCESS_KEY*, ...) or credentials in their value, and the password of a
tracking URI (https://user:pw@host), are written as *** and handed to the ranks by the job's environment
(Slurm passes the launching shell's environment; so do local processes). To --resume such a run, export
them again (the cluster.env names, and MLFLOW_TRACKING_URI with the full URI).

Exit codes: 0 submitted (or finished, with --wait), 1 the job failed, 2 a bad recipe, override, flag,
dataset or checkpoint (nothing was created), 3 the scheduler refused the submission (nothing left behind).
"""

from __future__ import annotations

import argparse
import math
import sys

from pipeline.config import ConfigError, list_recipes
from pipeline.secrets import redact_text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help="a recipe name (configs/recipes) or a YAML path")
    p.add_argument("--nodes", type=int, help="nodes (default 1, or the run's last on --resume); ranks = nodes x "
                   "--gpus-per-node")
    p.add_argument("--gpus-per-node", type=int, help="ranks per node (default: the recipe's cluster.gpus_per_node)")
    p.add_argument("--partition", help="Slurm partition")
    p.add_argument("--time", help="time limit: minutes, HH:MM:SS or D-HH:MM:SS (the job requeues itself at it)")
    p.add_argument("--name", help="run name (default <recipe>-<date>-<time>); the run directory's name")
    p.add_argument("--cluster", help="a cluster file (configs/clusters/*.yaml) applied over the recipe")
    p.add_argument("--runs-dir", help="where run directories go (default: runs/)")
    p.add_argument("--local", action="store_true", help="run the ranks as local processes instead of Slurm")
    p.add_argument("--dry-run", action="store_true", help="print config, DeepSpeed JSON, sbatch script; submit nothing")
    p.add_argument("--resume", metavar="RUN_DIR", help="submit a run again (resumes from its newest checkpoint)")
    p.add_argument("--wait", action="store_true", help="wait for the job and print its result")
    p.add_argument("--list", action="store_true", help="list the recipes and exit")
    p.add_argument("--list-models", action="store_true",
                   help="list the registered models (model.variant; pipeline/models/registry.py) and exit")
    p.add_argument("--sweep", action="append", metavar="KEY=V1,V2",
                   help="a sweep axis (repeat for a grid: the product of the axes)")
    p.add_argument("--sweep-file", help="a YAML sweep file (members: or grid:, budget:, halving:, array_parallelism:)")
    p.add_argument("--sweep-budget", type=float, metavar="GPU_HOURS",
                   help="the sweep's total budget, split equally across members (default: the recipe's each)")
    p.add_argument("--halving", metavar="'rungs=F1,F2 eta=N'",
                   help="asynchronous successive halving at these fractions of the member budget")
    p.add_argument("--array-parallelism", type=int, metavar="N",
                   help="members running at once (Slurm array %%N; local: default 1)")
    p.add_argument("--sweep-status", metavar="SWEEP",
                   help="a sweep's members (status, GPU-hours used of granted, job state) and decisions, after "
                        "recording members whose job died as crashed (SWEEP: its name under --runs-dir, or its "
                        "directory)")
    p.add_argument("overrides", nargs="*", help="key=value overrides (train.zero_stage=3 data.num_workers=4 ...)")
    args = p.parse_intermixed_args(argv)
    if args.list_models:
        from pipeline.models.registry import model_table

        print("\n".join(model_table()))
        return 0
    if args.list:
        from pipeline.config import load_recipe

        for name in list_recipes():
            try:
                print(f"{name:32s} {load_recipe(name).description}")
            except ConfigError as e:
                print(f"{name:32s} BROKEN: {e}")
        return 0
    from pipeline.train.launch import LaunchRequest, SubmissionError, launch

    if args.sweep_status:
        from pipeline.train.sweep_launch import sweep_status

        try:
            sweep_status(args.sweep_status, args.runs_dir)
        except ConfigError as e:
            print(f"launch: {redact_text(str(e))}", file=sys.stderr)
            return 2
        return 0
    sweeping = bool(args.sweep or args.sweep_file)
    if not sweeping and (args.sweep_budget is not None or args.halving or args.array_parallelism is not None):
        print("launch: --sweep-budget, --halving and --array-parallelism go with --sweep or --sweep-file",
              file=sys.stderr)
        return 2
    req = LaunchRequest(recipe=args.recipe, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                        partition=args.partition, time=args.time, name=args.name, local=args.local,
                        dry_run=args.dry_run, resume=args.resume, cluster_file=args.cluster,
                        runs_dir=args.runs_dir, overrides=args.overrides)
    if sweeping:
        return sweep_main(args, req)
    try:
        info = launch(req)
    except ConfigError as e:  # the message may quote what was typed: credentials in it are masked
        print(f"launch: {redact_text(str(e))}", file=sys.stderr)
        return 2
    except SubmissionError as e:
        print(f"launch: {redact_text(str(e))}", file=sys.stderr)
        return 3
    if not args.wait or args.dry_run:
        return 0
    return wait_for(info)


def sweep_main(args, req) -> int:
    """``--sweep``/``--sweep-file``: check every member, then one job array (or local processes)."""
    from pipeline.train.launch import SubmissionError
    from pipeline.train.sweep import SweepSpec, grid_from_args, load_sweep_file, parse_halving, summary
    from pipeline.train.sweep_launch import launch_sweep, wait_sweep

    try:
        if args.sweep_file and args.sweep:
            raise ConfigError("give --sweep axes or --sweep-file, not both")
        spec = load_sweep_file(args.sweep_file) if args.sweep_file else SweepSpec(grid_from_args(args.sweep))
        if args.sweep_budget is not None:
            if not (math.isfinite(args.sweep_budget) and args.sweep_budget > 0):
                raise ConfigError(f"--sweep-budget {args.sweep_budget}: expected the sweep's total GPU-hours, a finite "
                                  f"number above 0")
            spec.total_budget = args.sweep_budget
        if args.halving:
            spec.halving = parse_halving(args.halving)
        if args.array_parallelism is not None:
            if args.array_parallelism < 1:
                raise ConfigError(f"--array-parallelism {args.array_parallelism}: expected a positive number")
            spec.array_parallelism = args.array_parallelism
        launched = launch_sweep(spec, req)
    except ConfigError as e:
        print(f"launch: {redact_text(str(e))}", file=sys.stderr)
        return 2
    except SubmissionError as e:
        print(f"launch: {redact_text(str(e))}", file=sys.stderr)
        return 3
    if args.dry_run:
        return 0
    code = 0
    if not req.local and args.wait:
        code = wait_sweep(launched)
    if launched.state is not None and (req.local or args.wait):
        print(summary(launched.state))
        if req.local:
            code = 1 if any(m["status"] in ("crashed", "failed") for m in launched.state["members"]) else 0
    return code


class LogFollower:
    """Prints the lines rank 0 logs about the run (progress, validation, checkpoints, warnings) as they are
    written to its log file, which appears once the job starts."""

    MARKERS = ("pipeline.train:", " WARNING ", " ERROR ")

    def __init__(self, path: str) -> None:
        self.path, self.offset, self.partial = path, 0, b""

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:  # not started yet
            return
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace")
            if any(m in line for m in self.MARKERS):
                print(line, flush=True)


def wait_for(info: dict, poll_s: float = 2.0) -> int:
    """Wait for the job (requeues included), following rank 0's progress lines; print its result or the
    failure."""
    import json
    import time
    from pathlib import Path

    job = info["job"]
    result_file = Path(info["run_dir"]) / "result.json"
    log_file = f"{info['logs']}_0_log.out"
    print(f"waiting for job {job.job_id}; rank 0's progress follows (full log: {log_file})", flush=True)
    follower = LogFollower(log_file)
    try:
        while not job.done():
            follower.poll()
            time.sleep(poll_s)
        follower.poll()
        job.results()
    except Exception as e:  # noqa: BLE001 -- a failed job: say why, with the log to read
        if result_file.exists():  # a requeued job finished under the same id
            print(json.dumps(json.loads(result_file.read_text()), indent=1))
            return 0
        print(f"job {job.job_id} failed: {str(e)[-3000:]}", file=sys.stderr)
        return 1
    if result_file.exists():
        print(json.dumps(json.loads(result_file.read_text()), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

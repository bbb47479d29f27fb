"""Launch a training run: a recipe becomes a run directory and a multi-node DeepSpeed job on Slurm
(through submitit), or local processes.

    python jobs/launch.py --nodes 4 --recipe k400_long                       # 4 nodes x 8 GPUs on Slurm
    python jobs/launch.py --nodes 4 --recipe k400_long --dry-run             # print everything, submit nothing
    python jobs/launch.py --nodes 2 --recipe smoke --local --wait            # 2 local ranks (CPU, gloo)
    python jobs/launch.py --nodes 2 --recipe k400_base --cluster configs/clusters/example_gpu.yaml \\
        --partition a100 --time 2-00:00:00 train.zero_stage=3 optim.lr=0.01
    python jobs/launch.py --resume runs/k400_long-20261126-101500           # continue a stopped run

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
    p.add_argument("overrides", nargs="*", help="key=value overrides (train.zero_stage=3 data.num_workers=4 ...)")
    args = p.parse_intermixed_args(argv)
    if args.list:
        from pipeline.config import load_recipe

        for name in list_recipes():
            try:
                print(f"{name:32s} {load_recipe(name).description}")
            except ConfigError as e:
                print(f"{name:32s} BROKEN: {e}")
        return 0
    from pipeline.train.launch import LaunchRequest, SubmissionError, launch

    req = LaunchRequest(recipe=args.recipe, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                        partition=args.partition, time=args.time, name=args.name, local=args.local,
                        dry_run=args.dry_run, resume=args.resume, cluster_file=args.cluster,
                        runs_dir=args.runs_dir, overrides=args.overrides)
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

"""One rank's run of a training job, from a run directory that ``jobs/launch.py`` prepared.

distributed init -> model -> activation checkpointing -> engine -> resume from the newest complete
checkpoint -> the loop (periodic validation and checkpoints) -> final test protocol -> export.

A preemption or time-limit signal (Slurm's USR2, sent ``cluster.signal_delay_s`` before the end) is
turned into a flag that all ranks agree on at the next step: they save a checkpoint, rank 0 requeues the
job (submitit: ``scontrol requeue``, or a restart of the local tasks), and the requeued job resumes into
the same run directory and MLflow run. SIGTERM (a cancel) saves and stops without requeueing.

The MLflow run says how the job ended: FINISHED; KILLED for a cancel (SIGTERM; outside the training loop,
where there is nothing to save, it stops at once); FAILED when a rank dies of an exception (that rank
marks it, whichever it is); still RUNNING across a requeue.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.config import ConfigError, RunConfig, batch_plan, load_resolved, steps_per_epoch, total_steps
from pipeline.data.loader import clip_config, make_loader
from pipeline.data.shards import load_index
from pipeline.distributed import DistEnv
from pipeline.models.convert import load_checkpoint
from pipeline.models.timesformer import TimeSformer, model_config
from pipeline.secrets import reveal_env
from pipeline.train import checkpoint as ckpt
from pipeline.train.budget import GpuHours
from pipeline.train.engine import init_distributed, make_engine
from pipeline.train.evaluate import RUN_DATASET_FILE, test_protocol, validate
from pipeline.train.export import export_model
from pipeline.train.loop import LoopState, train_loop
from pipeline.train.parallelize import prepare_model, recompute_fraction

log = logging.getLogger("pipeline.train")
EXIT_REQUEUED = 3


def build_model(cfg: RunConfig) -> TimeSformer:
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank and every restart
    model = TimeSformer(model_config(cfg))
    if cfg.model.init:
        load_checkpoint(model, cfg.model.init, reset_head=cfg.model.init_reset_head)
    return model


class StoppedForNow(SystemExit):
    """The process leaves after its stop checkpoint (``requeue_or_exit``), which has already set the MLflow
    run as it should be: open for the requeued job, or KILLED. A SystemExit: the exit code is the one given."""


class RunCancelled(BaseException):
    """SIGTERM outside the training loop (start-up, the final test, the export): stop now, the run KILLED.
    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` on the way swallows it."""


class StopSignal:
    """Remembers the first preemption (USR2) or termination (TERM) signal; the loop polls it. Inside the
    loop (``deferred``) a TERM waits for the next step's checkpoint; outside it there is nothing to save,
    so it raises ``RunCancelled`` at once (before Slurm's KillWait ends in a SIGKILL that marks nothing)."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.deferred = False
        self.pid = os.getpid()  # forked DataLoader workers inherit the handler: only this process raises
        signal.signal(signal.SIGUSR2, self._on("preempted"))
        signal.signal(signal.SIGTERM, self._on("terminated"))

    def _on(self, reason: str):
        def handler(signum, frame):
            if self.reason is None:
                self.reason = reason
                cancel_now = reason == "terminated" and not self.deferred and os.getpid() == self.pid
                log.warning("received %s: %s", signal.Signals(signum).name, "stopping now" if cancel_now else
                            "checkpoint at the next step, then " + ("requeue" if reason == "preempted" else "stop"))
                if cancel_now:
                    raise RunCancelled(f"cancelled ({signal.Signals(signum).name}) outside the training loop")
        return handler

    @contextlib.contextmanager
    def deferring(self):
        """The training loop: a TERM becomes a flag that the loop turns into a checkpoint and a stop."""
        self.deferred = True
        try:
            yield
        finally:
            self.deferred = False


class RunEnd:
    """Marks the MLflow run when ``run`` leaves by an exception: KILLED for a cancel (TERM, Ctrl-C),
    FAILED for anything else, with the error in the ``last_failure`` tag. Rank 0 goes through its sinks
    (what is queued first); any other rank, or rank 0 before its sinks are open, through a client of its
    own: the rank that died is the one that knows, and the others may hang in a collective."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.rank: int | None = None
        self.sinks = None
        self.stop: StopSignal | None = None
        self.decided = False

    def failed(self, error: BaseException) -> str | None:
        if self.decided or isinstance(error, StoppedForNow):
            return None
        from pipeline.secrets import redact_text
        from pipeline.tracking.sink import end_run

        cancelled = isinstance(error, (RunCancelled, KeyboardInterrupt)) or (
            self.stop is not None and self.stop.reason == "terminated")
        status = "KILLED" if cancelled else "FAILED"
        what = redact_text(f"{type(error).__name__}: {error}")[:2000]
        tags = {"last_failure": what, "failed_rank": str(self.rank)} if status == "FAILED" else {"last_stop": "cancel"}
        log.error("rank %s: the run ends %s (%s)", self.rank, status, what)
        if self.sinks is not None and self.sinks.tracks_mlflow and not self.sinks.closed:
            self.sinks.set_tags(tags)
            self.sinks.close(status)
        else:
            end_run(self.run_dir, status, tags)
        self.decided = True
        return status


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    for noisy in ("torch.distributed", "DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run(run_dir: str | Path) -> dict[str, Any]:
    """One rank's run; its result, or an exception after the MLflow run was marked (see ``RunEnd``)."""
    run_dir = Path(run_dir).resolve()
    end = RunEnd(run_dir)
    try:
        return _run(run_dir, end)
    except BaseException as e:
        end.failed(e)
        raise


def _run(run_dir: Path, end: RunEnd) -> dict[str, Any]:
    cfg = load_resolved(run_dir / "config.yaml")
    # config.yaml holds *** for secrets: their real values came with the job's environment (launch.stored_config)
    os.environ.update(reveal_env(cfg.cluster.env))
    if "OMP_NUM_THREADS" in cfg.cluster.env:  # torch read the variable at import; the recipe's value rules
        torch.set_num_threads(int(cfg.cluster.env["OMP_NUM_THREADS"]))
    stop = end.stop = StopSignal()
    denv = DistEnv.detect().export()
    end.rank = denv.rank
    setup_logging(denv.rank)
    record_process(run_dir, denv)
    device = init_distributed(cfg, denv.rank, denv.world_size, denv.local_rank)
    plan = batch_plan(cfg, denv.world_size)
    index, storage = load_index(cfg.data.index, cfg.data.version or None)
    record_dataset(run_dir, index, write=denv.is_main)
    per_epoch = steps_per_epoch(cfg, index.num_samples(cfg.data.train_split))
    total = total_steps(cfg, index.num_samples(cfg.data.train_split))
    if denv.is_main:
        log.info("run %s: %s; %d steps (%d per epoch) on dataset %s v%d (%d train clips); %s launcher",
                 run_dir.name, plan.describe(), total, per_epoch, index.dataset, index.version,
                 index.num_samples(cfg.data.train_split), denv.launcher)

    model = build_model(cfg)
    policy = prepare_model(model, cfg, device, build=lambda: TimeSformer(model_config(cfg)),
                           micro_batch=plan.micro_batch)
    engine = make_engine(model, cfg, plan, per_epoch, device, model_factory=lambda: TimeSformer(model_config(cfg)))
    resumed = resume(engine, run_dir, denv.world_size)

    from pipeline.tracking.sink import MLFLOW_FILE, create_run, default_tracking_uri, open_sinks

    if denv.is_main and not (run_dir / MLFLOW_FILE).exists():  # MLflow was unreachable at launch: try again
        from pipeline.tracking.sink import mlflow_tags

        create_run(run_dir, cfg.tracking.uri or default_tracking_uri(run_dir.parent), cfg.tracking.experiment or
                   cfg.recipe, cfg.name, mlflow_tags(cfg, denv.num_nodes, launch_record(run_dir).get("git", {})))
    sinks = end.sinks = open_sinks(run_dir, denv.is_main)
    devices = denv.world_size
    account = GpuHours(run_dir, devices, "gpu" if device.type == "cuda" else "cpu-process", cfg.budget.gpu_hours,
                       start=process_start_time())
    if denv.is_main:
        sinks.set_running()  # an earlier attempt may have left it FAILED or KILLED
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
        sinks.set_tags({"resumed_from_step": str(resumed), "world_size": str(denv.world_size), "device": device_name,
                        "activation_checkpointing": policy,
                        "attempts": str(len(account.attempts)), "slurm_job_id": os.environ.get("SLURM_JOB_ID", "")})
        if resumed == 0:
            sinks.log_params(cfg.flat())
            for name in ("config.yaml", "deepspeed.json", "launch.json"):
                if (run_dir / name).exists():
                    sinks.log_artifact(run_dir / name)
    from pipeline.models.flops import device_peak_tflops, training_flops_per_clip

    state = LoopState(cfg=cfg, engine=engine, plan=plan, index=index, storage=storage, clip=clip_config(cfg),
                      rank=denv.rank, world_size=denv.world_size, device=device, per_epoch=per_epoch,
                      total=total, run_dir=run_dir, sinks=sinks, account=account, stop=stop,
                      save=lambda s: save_checkpoint(engine, run_dir, s, cfg, account, denv),
                      validate=lambda: run_validation(engine, cfg, index, storage, device, denv),
                      flops_per_clip=2.0 * training_flops_per_clip(model_config(cfg)),
                      hardware_flops_per_clip=2.0 * training_flops_per_clip(
                          model_config(cfg), recompute_forward=recompute_fraction(policy, model.cfg.depth)),
                      peak_tflops=device_peak_tflops(device))
    try:
        with stop.deferring():
            outcome = train_loop(state)
    except BaseException:
        if denv.is_main:
            account.save()  # the hours of a failed attempt count; run() marks the MLflow run
        raise
    step = engine.global_step
    if outcome in ("preempted", "terminated"):
        requeue_or_exit(outcome, run_dir, cfg, denv, sinks)
    # done, or the budget ended it: the final test protocol, then the consolidated model
    if outcome == "budget" and denv.is_main:
        log.warning("GPU-hour budget %.3g reached at step %d (%.4g %s-hours): stopping, then the test protocol",
                    cfg.budget.gpu_hours, step, account.hours, account.unit)
        sinks.set_tags({"stopped_by": "budget"})
    report = None
    if cfg.test.enabled:
        report = run_test(engine, cfg, index, storage, device, denv)
    result: dict[str, Any] = {"rank": denv.rank, "outcome": outcome, "step": step, "resumed_from": resumed}
    if denv.is_main:
        if report is not None:
            out = run_dir / "eval" / "test.json"
            out.parent.mkdir(exist_ok=True)
            out.write_text(json.dumps(report, indent=1))
            sinks.log_metrics({**report_metrics(report), "gpu_hours": account.hours}, step)
            sinks.log_artifact(out, "eval")
            if report["top1"] is None:  # an unlabelled test split: predictions, and no made-up accuracy
                log.error("test split %r: no labelled video (%d unlabelled, %d skipped), so no test accuracy; "
                          "the predictions are in %s", cfg.data.test_split, report["unlabelled"], report["skipped"],
                          out)
                sinks.set_tags({"test": "no labelled videos"})
            seen = report["read"] or (report["videos"] + report["unlabelled"] + report["skipped"])
            if report["skipped"] > cfg.data.max_skip_fraction * seen:
                log.error("test: %d of %d videos could not be read (above data.max_skip_fraction=%g): the test "
                          "accuracy covers part of the split only; %s says which shards", report["skipped"], seen,
                          cfg.data.max_skip_fraction, out)
                sinks.set_tags({"test": f"partial: {report['skipped']} of {seen} videos skipped"})
            image = confusion_image(report, index.classes, out.with_name("confusion.png"))
            if image is not None:
                sinks.log_artifact(image, "eval")
            result.update(test_top1=report["top1"], test_top5=report["top5"], test_videos=report["videos"],
                          test_unlabelled=report["unlabelled"], test_skipped=report["skipped"])
        export = export_model(run_dir, cfg, classes=index.classes)
        sinks.log_artifact(export, "model")
        account.save()
        sinks.set_tags({"outcome": outcome, "gpu_hours": f"{account.hours:.6f}", "gpu_hours_unit": account.unit})
        sinks.close("FINISHED")
        end.decided = True  # finished: what may still fail below (result.json, the last barrier) does not undo it
        result.update(export=str(export), gpu_hours=account.hours, run_dir=str(run_dir))
        (run_dir / "result.json").write_text(json.dumps(result, indent=1))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return result


def launch_record(run_dir: Path) -> dict[str, Any]:
    """``launch.json``: who launched the run, where, from which commit (``git``); {} when unreadable (the
    ranks only use it to tag an MLflow run created late)."""
    try:
        record = json.loads((run_dir / "launch.json").read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def report_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The test protocol's numbers for MLflow: accuracy only when something labelled was scored; what
    was left out (unlabelled, skipped videos) when anything was."""
    metrics = {} if report["top1"] is None else {"test_top1": report["top1"], "test_top5": report["top5"]}
    metrics.update({f"test_{k}": float(report[k]) for k in ("unlabelled", "skipped") if report.get(k)})
    return metrics


def record_dataset(run_dir: Path, index, write: bool) -> None:
    """``dataset.json``: the dataset this run trains on and its class list (exports and evaluation name
    the model's classes from it). A resumed run whose dataset now lists other classes is refused: its
    labels would mean other things than the ones the model learnt."""
    path = run_dir / RUN_DATASET_FILE
    if path.exists():
        try:
            recorded = json.loads(path.read_text())
            classes = recorded["classes"]
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{path}: not a dataset record ({type(e).__name__}: {e}); it is written at the "
                              f"run's first start: restore it or start a new run") from None
        if classes != index.classes:
            differ = next((i for i, (a, b) in enumerate(zip(classes, index.classes, strict=False)) if a != b),
                          min(len(classes), len(index.classes)))
            raise ConfigError(
                f"{run_dir}: this run trained on {recorded.get('dataset')} v{recorded.get('version')} with "
                f"{len(classes)} classes; data.index now gives {index.dataset} v{index.version} with "
                f"{len(index.classes)}, first differing at class {differ}. Pin data.version="
                f"{recorded.get('version')} to resume, or start a new run (model.init=...) for the new classes")
        return
    if write:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({"dataset": index.dataset, "version": index.version, "classes": index.classes},
                                  indent=1))
        os.replace(tmp, path)


def process_start_time() -> float:
    """When this process started: the account counts the allocation from there (start-up included)."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 -- without psutil, from now
        return time.time()


def record_process(run_dir: Path, denv: DistEnv) -> None:
    """``pids/rank<r>.json``: where each rank runs (to find, signal or kill a rank of a live job)."""
    import socket

    (run_dir / "pids").mkdir(exist_ok=True)
    (run_dir / "pids" / f"rank{denv.rank}.json").write_text(json.dumps(
        {"rank": denv.rank, "pid": os.getpid(), "host": socket.gethostname(), "launcher": denv.launcher,
         "job_id": os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID"), "time": time.time()}))


def resume(engine, run_dir: Path, world_size: int) -> int:
    """Load the newest complete checkpoint, if any; the step it was taken at (0 when starting fresh)."""
    latest = ckpt.latest_complete(run_dir)
    if latest is None:
        return 0
    step, tag = latest
    marker = ckpt.read_marker(run_dir, tag)
    if marker.get("world_size") not in (None, world_size) and marker.get("zero_stage", 0) > 0:
        raise RuntimeError(
            f"{run_dir}: checkpoint {tag} was written by {marker['world_size']} ranks with ZeRO stage "
            f"{marker['zero_stage']}, and this job has {world_size}: its optimizer shards do not fit. Relaunch "
            f"with the same --nodes x --gpus-per-node, or export it (jobs/export.py) and fine-tune from the model.")
    engine.load(ckpt.checkpoint_root(run_dir), tag)
    if engine.global_step != step:
        raise RuntimeError(f"{run_dir}/{tag}: engine resumed at step {engine.global_step}, marker says {step}")
    log.info("resumed from %s (step %d)", tag, step)
    return step


def save_checkpoint(engine, run_dir: Path, step: int, cfg: RunConfig, account: GpuHours, denv: DistEnv) -> None:
    tag = ckpt.tag_for(step)
    t0 = time.time()
    engine.save(ckpt.checkpoint_root(run_dir), tag, {"step": step})
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank's shard is on disk before the marker
    if denv.is_main:
        ckpt.mark_complete(run_dir, tag, {"step": step, "world_size": denv.world_size,
                                          "zero_stage": cfg.train.zero_stage if cfg.train.engine == "deepspeed" else 0,
                                          "engine": cfg.train.engine, "gpu_hours": account.hours})
        account.save()
        removed = ckpt.prune(run_dir, cfg.train.keep_checkpoints)
        log.info("checkpoint %s saved in %.1fs%s", tag, time.time() - t0, f"; pruned {removed}" if removed else "")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def run_validation(engine, cfg: RunConfig, index, storage, device, denv: DistEnv) -> dict[str, float]:
    loader = make_loader(index, storage, cfg.data.val_split, train=False, batch_size=cfg.train.micro_batch,
                         num_workers=min(cfg.data.num_workers, 2), rank=denv.rank, world_size=denv.world_size,
                         clip=clip_config(cfg))
    with engine.eval_module() as (module, dtype):
        return validate(module, dtype, loader, device)


def run_test(engine, cfg: RunConfig, index, storage, device, denv: DistEnv) -> dict[str, Any] | None:
    with engine.eval_module() as (module, dtype):
        return test_protocol(module, dtype, index, storage, split=cfg.data.test_split, clip=clip_config(cfg),
                             protocol=cfg.test.protocol, temporal_clips=cfg.test.temporal_clips,
                             spatial_crops=cfg.test.spatial_crops, batch_size=cfg.test.batch_size, device=device,
                             num_workers=min(cfg.data.num_workers, 2), max_videos=cfg.test.max_videos)


def confusion_image(report: dict[str, Any], classes: list[str], path: Path) -> Path | None:
    """The test confusion matrix as a PNG (rows: true class, columns: predicted), for people to look at."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    matrix = report["confusion"]
    n = len(matrix)
    size = min(20.0, 2.0 + 0.35 * n)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    if n <= 60:
        names = [c[:20] for c in classes[:n]]
        ax.set_xticks(range(n), names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), names, fontsize=7)
        if n <= 20:
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, str(matrix[i][j]), ha="center", va="center", fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top1 = "no labelled videos" if report["top1"] is None else f"top-1 {report['top1']:.1f}%"
    ax.set_title(f"{report['split']}: {top1} over {report['videos']} videos ({report['protocol']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def requeue_or_exit(reason: str, run_dir: Path, cfg: RunConfig, denv: DistEnv, sinks) -> None:
    """After the signal checkpoint: rank 0 requeues the job (preemption/time limit) and every rank exits
    without a result, so the scheduler runs it again; a termination just stops (resume with --resume)."""
    requeues_file = run_dir / "requeues.json"
    if denv.is_main:
        history = json.loads(requeues_file.read_text()) if requeues_file.exists() else []
        requeue = reason == "preempted" and len(history) < cfg.cluster.max_requeues
        history.append({"time": time.time(), "reason": reason, "requeued": requeue,
                        "job_id": os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")})
        requeues_file.write_text(json.dumps(history, indent=1))
        sinks.set_tags({"requeues": str(sum(h["requeued"] for h in history)), "last_stop": reason})
        if requeue and denv.launcher in ("slurm", "submitit-local"):
            log.warning("requeueing the job (%d of at most %d)", len(history), cfg.cluster.max_requeues)
            sinks.close(None)  # deliver what is queued; the run stays open for the requeued job
            if denv.launcher == "slurm":
                subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=True, timeout=60)
            else:
                from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE

                raise StoppedForNow(LOCAL_REQUEUE_RETURN_CODE)
        else:
            log.warning("stopped (%s) after a checkpoint; continue with: python jobs/launch.py --resume %s",
                        reason, run_dir)
            sinks.close("KILLED")
    raise StoppedForNow(EXIT_REQUEUED)


class TrainJob:
    """The submitit callable: picklable, and stateless (everything is in the run directory)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = str(run_dir)

    def __call__(self) -> dict[str, Any]:
        return run(self.run_dir)

    def checkpoint(self, *args, **kwargs):
        """submitit's own preemption handler (a signal before ours is installed): requeue as is; the
        run resumes from its newest complete checkpoint."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(self.run_dir))


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.train.main RUN_DIR``: one rank under torchrun or srun."""
    import argparse

    p = argparse.ArgumentParser(description="Run one rank of a prepared training run (see jobs/launch.py).")
    p.add_argument("run_dir")
    args = p.parse_args(argv)
    run(args.run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

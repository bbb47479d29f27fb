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
from torch import nn

from pipeline.config import ConfigError, RunConfig, batch_plan, load_resolved, steps_per_epoch, total_steps
from pipeline.data.loader import clip_config, make_loader, test_clip_config
from pipeline.data.shards import load_index, settle_multi_label
from pipeline.distributed import DistEnv
from pipeline.models.registry import build, family_of, model_config
from pipeline.secrets import reveal_env
from pipeline.train import checkpoint as ckpt
from pipeline.train.budget import GpuHours
from pipeline.train.engine import apply_freeze, init_distributed, make_engine
from pipeline.train.evaluate import (
    RUN_DATASET_FILE,
    accuracy_metrics,
    headline,
    recorded_dataset,
    run_data_version,
    test_protocol,
    validate,
)
from pipeline.train.export import export_model
from pipeline.train.loop import LoopState, final_weights, train_loop
from pipeline.train.parallelize import prepare_model, recompute_fraction
from pipeline.train.snapshot import describe_running_code

log = logging.getLogger("pipeline.train")
EXIT_REQUEUED = 3


def build_model(cfg: RunConfig, load_init: bool = True) -> nn.Module:
    """The run's model (any registered family's, pipeline.models.registry) with its initial weights: ``model.init``
    loaded, unless ``load_init`` is False (a run that resumes from a checkpoint, which replaces every weight:
    model.init is then neither needed nor read, so a cleaned cache does not stop a requeued job)."""
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank and every restart
    model = build(model_config(cfg))
    if cfg.model.init and load_init:
        if not Path(cfg.model.init).exists():
            source = f" (resolved at launch from {cfg.model.init_source})" if cfg.model.init_source else ""
            raise FileNotFoundError(
                f"model.init={cfg.model.init}{source}: no such file or directory, and the run has no complete "
                f"checkpoint to resume from, so it needs these weights: relaunch with `python jobs/launch.py "
                f"--resume <run dir>` (launch fetches model.init_source again), or restore the file")
        family_of(model).load_weights(model, cfg.model.init, reset_head=cfg.model.init_reset_head)
    return model


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
        self._previous = {sig: signal.signal(sig, self._on(reason))
                          for sig, reason in ((signal.SIGUSR2, "preempted"), (signal.SIGTERM, "terminated"))}

    def restore(self) -> None:
        """The handlers that were there before (a run in a process that goes on: tests, notebooks)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

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
        if self.decided:
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


class Trainer:
    """One rank's training run from a run directory that the launcher prepared, in four calls (as
    torchtitan's ``Trainer``): ``setup`` (config, signals, distributed init, dataset index, model with its
    checkpointing policy and compilation, engine, resume, tracking, GPU-hour account), ``train`` (the loop;
    returns its outcome), ``finish`` (after a stop signal: requeue or stop; otherwise the test protocol, the
    report and the exported model; returns the result) and ``close`` (one ExitStack releases what setup
    took: signal handlers, sinks). The library returns outcomes: ``result["exit_code"]`` says how the process
    should leave, and only the entry points (``TrainJob``, ``main``) turn it into an exit."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.end = RunEnd(self.run_dir)
        self._resources = contextlib.ExitStack()

    # -- setup -------------------------------------------------------------------------------------------

    def setup(self) -> None:
        run_dir = self.run_dir
        cfg = self.cfg = load_resolved(run_dir / "config.yaml")
        # config.yaml holds *** for secrets: their real values came with the job's environment (launch.stored_config)
        os.environ.update(reveal_env(cfg.cluster.env))
        if "OMP_NUM_THREADS" in cfg.cluster.env:  # torch read the variable at import; the recipe's value rules
            torch.set_num_threads(int(cfg.cluster.env["OMP_NUM_THREADS"]))
        self.stop = self.end.stop = StopSignal()
        self._resources.callback(self.stop.restore)
        denv = self.denv = DistEnv.detect().export()
        self.end.rank = denv.rank
        setup_logging(denv.rank)
        record_process(run_dir, denv)
        self.device = init_distributed(cfg, denv.rank, denv.world_size, denv.local_rank)
        self.plan = batch_plan(cfg, denv.world_size)
        self.index, self.storage = load_index(cfg.data.index, run_data_version(cfg, run_dir) or None)
        cfg.model.multi_label = settle_multi_label(cfg.model.multi_label, self.index)  # launch set it; null: the data's
        record_dataset(run_dir, self.index, write=denv.is_main)
        train_clips = self.index.num_samples(cfg.data.train_split)
        self.per_epoch, self.total = steps_per_epoch(cfg, train_clips), total_steps(cfg, train_clips)
        if denv.is_main:
            log.info("run %s: %s; %d steps (%d per epoch) on dataset %s v%d (%d train clips); %s launcher",
                     run_dir.name, self.plan.describe(), self.total, self.per_epoch, self.index.dataset,
                     self.index.version, train_clips, denv.launcher)
            log.log(*describe_running_code(run_dir))  # the run's code snapshot (or the live checkout, said so)
        self._build()
        self._open_tracking()
        self.planner = self._planner()

    def _build(self) -> None:
        """Model, activation checkpointing and compilation (applied from outside), engine, resume."""
        cfg = self.cfg
        mcfg = model_config(cfg)
        # a checkpoint to resume from replaces every weight: model.init is loaded only when there is none
        self.model = build_model(cfg, load_init=ckpt.latest_complete(self.run_dir) is None)
        trainable = apply_freeze(self.model, cfg.train.freeze)
        if cfg.train.freeze != "none" and self.denv.is_main:
            log.info("train.freeze=%s: %d of %d parameters train", cfg.train.freeze, trainable,
                     sum(p.numel() for p in self.model.parameters()))
        self.policy = prepare_model(self.model, cfg, self.device, build=lambda: build(mcfg),
                                    micro_batch=self.plan.micro_batch)
        self.engine = make_engine(self.model, cfg, self.plan, self.per_epoch, self.device,
                                  model_factory=lambda: build(mcfg))
        self.resumed = resume(self.engine, self.run_dir, self.denv.world_size)
        self._data_layout()

    def _data_layout(self) -> None:
        """The run's data streams (``elastic.DataLayout``): kept from the resumed checkpoint when this world size
        divides them (each rank plays several: the uninterrupted run's clips), re-split otherwise."""
        from pipeline.train import elastic

        marker = ckpt.read_marker(self.run_dir, ckpt.tag_for(self.resumed)) if self.resumed else None
        world = self.denv.world_size
        self.saved_world = marker.get("world_size") if marker else None
        self.layout, exact = elastic.data_layout(marker, world, self.resumed)
        self.layout_note = elastic.describe_layout(self.layout, exact, world, self.saved_world)
        if self.denv.is_main and self.resumed:
            (log.info if exact else log.warning)("data at step %d: %s; %s", self.resumed, self.layout_note,
                                                  self.plan.describe())

    def _open_tracking(self) -> None:
        """The run's sinks (MLflow on rank 0, created late if it was unreachable at launch) and its GPU-hour
        account; on a first start, the config and launch files as params and artifacts."""
        from pipeline.tracking.sink import MLFLOW_FILE, create_run, default_tracking_uri, mlflow_tags, open_sinks

        cfg, denv, run_dir = self.cfg, self.denv, self.run_dir
        if denv.is_main and not (run_dir / MLFLOW_FILE).exists():  # MLflow was unreachable at launch: try again
            create_run(run_dir, cfg.tracking.uri or default_tracking_uri(run_dir.parent),
                       cfg.tracking.experiment or cfg.recipe, cfg.name,
                       mlflow_tags(cfg, denv.num_nodes, launch_record(run_dir).get("git", {})))
        self.sinks = self.end.sinks = open_sinks(run_dir, denv.is_main)
        self._resources.callback(self._close_sinks)
        cuda = self.device.type == "cuda"
        self.account = GpuHours(run_dir, denv.world_size, "gpu" if cuda else "cpu-process", cfg.budget.gpu_hours,
                                start=process_start_time())
        from pipeline.train.sweep import attach_member

        self.sweep = attach_member(self)  # None outside a sweep; a member's budget follows the sweep's state
        if not denv.is_main:
            return
        self.sinks.set_running()  # an earlier attempt may have left it FAILED or KILLED
        device_name = torch.cuda.get_device_name(self.device) if cuda else f"cpu ({os.cpu_count()} cores)"
        self.sinks.set_tags({"resumed_from_step": str(self.resumed), "world_size": str(denv.world_size),
                             "device": device_name, "activation_checkpointing": self.policy,
                             "attempts": str(len(self.account.attempts)),
                             "dataset": f"{self.index.dataset} v{self.index.version}",
                             "slurm_job_id": os.environ.get("SLURM_JOB_ID", "")})
        if self.resumed:  # the batch and data layout of this attempt (another world size keeps the global batch)
            self.sinks.set_tags({"data_layout": self.layout_note[:4000], "batch_plan": self.plan.describe()})
            self.sinks.log_metrics({"batch/global": self.plan.global_batch, "batch/grad_accum": self.plan.grad_accum,
                                    "batch/world_size": self.denv.world_size}, self.resumed)
        if self.resumed == 0:
            self._log_datasets()
            self.sinks.log_params(cfg.flat())
            for name in ("config.yaml", "deepspeed.json", "launch.json"):
                if (run_dir / name).exists():
                    self.sinks.log_artifact(run_dir / name)

    def _planner(self):
        """``train.plan_by=budget``: the loop's planning hook over the engine's progress schedule (None when the run
        is planned by epochs); the loop then runs to the plan's total, restored from the checkpoint on a resume."""
        from pipeline.train.plan import BudgetPlanner, schedule_of

        schedule = schedule_of(self.engine)
        if self.cfg.train.plan_by != "budget" or schedule is None:
            return None
        cfg, index = self.cfg, self.index
        videos = index.num_samples(cfg.data.test_split) if cfg.test.enabled else 0
        videos = min(videos, cfg.test.max_videos) if cfg.test.max_videos else videos
        planner = BudgetPlanner(cfg, schedule, self.account, self.sinks, rank=self.denv.rank, device=self.device,
                                per_epoch=self.per_epoch, val_clips=index.num_samples(cfg.data.val_split),
                                test_views=videos * cfg.test.temporal_clips * cfg.test.spatial_crops,
                                resumed_step=self.resumed, attempt=len(self.account.attempts))
        self.total = planner.total
        if self.denv.is_main:
            log.info("train.plan_by=budget: %d steps until the plan is fitted to %g %s-hours after step %d (plan v%d "
                     "so far); the budget stop stays as a safety net", self.total, cfg.budget.gpu_hours,
                     self.account.unit, planner.calibration_end, schedule.version)
        return planner

    def _log_datasets(self) -> None:
        """Each split the run reads, as an MLflow dataset input: ``<dataset>-v<version>/<split>``, digested from
        its shards' sha256, with how the run uses it (train, validation, test; Kinetics tests on val)."""
        cfg, index = self.cfg, self.index
        uses: dict[str, list[str]] = {}
        for use, split in (("train", cfg.data.train_split), ("validation", cfg.data.val_split),
                           ("test", cfg.data.test_split)):
            uses.setdefault(split, []).append(use)
        for split, used_for in uses.items():
            digest = index.split_digest(split)
            self.sinks.log_dataset(f"{index.dataset}-v{index.version}/{split}", digest, cfg.data.index,
                                   "+".join(used_for), {"split": split, "version": str(index.version),
                                                        "samples": str(index.num_samples(split))})

    def _close_sinks(self) -> None:
        if not self.sinks.closed:  # ended without a verdict (RunEnd gives one on errors): deliver what is queued
            self.sinks.close(None)

    # -- train -------------------------------------------------------------------------------------------

    def loop_state(self) -> LoopState:
        from pipeline.models.checkpointing import checkpoint_units
        from pipeline.models.flops import device_peak_tflops, training_flops_per_clip

        mcfg = model_config(self.cfg)
        recomputed = recompute_fraction(self.policy, len(checkpoint_units(self.model)))
        return LoopState(cfg=self.cfg, engine=self.engine, plan=self.plan, index=self.index, storage=self.storage,
                         clip=clip_config(self.cfg), rank=self.denv.rank, world_size=self.denv.world_size,
                         device=self.device, per_epoch=self.per_epoch, total=self.total, run_dir=self.run_dir,
                         sinks=self.sinks, account=self.account, stop=self.stop, save=self.save_checkpoint,
                         validate=self.validate, flops_per_clip=2.0 * training_flops_per_clip(mcfg),
                         hardware_flops_per_clip=2.0 * training_flops_per_clip(mcfg, recompute_forward=recomputed),
                         peak_tflops=device_peak_tflops(self.device), planner=self.planner,
                         rung=self.sweep.check if getattr(self, "sweep", None) else None,
                         batches=self._stream())

    def _stream(self):
        """The loop's data source: its own per-rank streams, unless the data layout differs from one stream per
        rank since step 0 (a run resumed on another world size: ``elastic.interval_stream``)."""
        from pipeline.train.elastic import DataLayout, interval_stream

        layout = getattr(self, "layout", None)
        if layout is None or layout == DataLayout(self.denv.world_size, 0):
            return None
        return interval_stream(layout)

    def train(self) -> str:
        """The training loop; its outcome: done, budget, preempted or terminated."""
        try:
            with self.stop.deferring():
                return train_loop(self.loop_state())
        except BaseException:
            if self.denv.is_main:
                self.account.save()  # the hours of a failed attempt count; run() marks the MLflow run
            raise

    def save_checkpoint(self, step: int) -> None:
        engine, run_dir, cfg, denv = self.engine, self.run_dir, self.cfg, self.denv
        tag = ckpt.tag_for(step)
        t0 = time.time()
        engine.save(ckpt.checkpoint_root(run_dir), tag, {"step": step})
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank's shard is on disk before the marker
        if denv.is_main:
            zero_stage = cfg.train.zero_stage if cfg.train.engine == "deepspeed" else 0
            layout = getattr(self, "layout", None)
            ckpt.mark_complete(run_dir, tag, {"step": step, "world_size": denv.world_size, "zero_stage": zero_stage,
                                              "engine": cfg.train.engine, "gpu_hours": self.account.hours,
                                              "global_batch": self.plan.global_batch,
                                              **(layout.marker() if layout is not None else {})})
            self.account.save()
            removed = ckpt.prune(run_dir, cfg.train.keep_checkpoints)
            log.info("checkpoint %s saved in %.1fs%s", tag, time.time() - t0, f"; pruned {removed}" if removed else "")
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    def validate(self) -> dict[str, float]:
        """Clip-level validation of the weights; with ``train.ema_decay``, of their EMA too (``val_top1_ema``...)."""
        cfg, denv = self.cfg, self.denv

        def loader():
            return make_loader(self.index, self.storage, cfg.data.val_split, train=False,
                               batch_size=cfg.train.micro_batch, num_workers=min(cfg.data.num_workers, 2),
                               rank=denv.rank, world_size=denv.world_size, clip=clip_config(cfg))
        with self.engine.eval_module() as (module, dtype):
            metrics = validate(module, dtype, loader(), self.device)
        if getattr(self.engine, "ema", None) is not None:
            with self.engine.eval_module(ema=True) as (module, dtype):
                averaged = validate(module, dtype, loader(), self.device)
            metrics.update({f"{k}_ema": v for k, v in averaged.items() if k in ("val_loss", "val_top1", "val_top5",
                                                                               "val_map")})
        return metrics

    # -- finish ------------------------------------------------------------------------------------------

    def finish(self, outcome: str) -> dict[str, Any]:
        """After a stop signal's checkpoint: requeue or stop (``exit_code`` set). Otherwise (done, or the
        budget ended it): the final test protocol, the report and the consolidated model, registered in MLflow's
        model registry (``pipeline.tracking.registry``)."""
        cfg, denv, sinks, account = self.cfg, self.denv, self.sinks, self.account
        step = self.engine.global_step
        result: dict[str, Any] = {"rank": denv.rank, "outcome": outcome, "step": step, "resumed_from": self.resumed,
                                  "exit_code": 0}
        if outcome in ("preempted", "terminated"):
            result.update(self._stop_for_now(outcome))
            return result
        if outcome == "budget" and getattr(self, "sweep", None) is not None and self.sweep.stopped:
            outcome = result["outcome"] = "halted"  # a sweep's successive halving stopped it at a rung
        if outcome == "budget" and denv.is_main:
            log.warning("GPU-hour budget %.3g reached at step %d (%.4g %s-hours): stopping, then the test protocol",
                        cfg.budget.gpu_hours, step, account.hours, account.unit)
            sinks.set_tags({"stopped_by": "budget"})
        planner = getattr(self, "planner", None)
        if planner is not None and outcome == "done" and denv.is_main:
            log.info("step %d: the end of the budget plan (v%d), at %.4g of %g %s-hours: the test protocol and the "
                     "export follow", step, planner.schedule.version, account.hours, cfg.budget.gpu_hours, account.unit)
            sinks.set_tags({"ended_by": "plan"})
        test_from = account.hours
        # train.keep_best: the best validated checkpoint, loaded back; train.ema_export: the EMA of the weights
        final = self.final = final_weights(self.engine, self.run_dir, cfg)
        report = self.test() if cfg.test.enabled else None
        if denv.is_main and planner is not None:
            result["plan"] = {**planner.summary(), "gpu_hours_at_end_of_training": test_from,
                              "gpu_hours_after_test": account.hours,
                              "test_gpu_hours_measured": account.hours - test_from}
            sinks.log_metrics({"plan/test_gpu_hours_measured": account.hours - test_from}, step)
        if denv.is_main:
            result.update(weights_step=final["step"], weights="ema" if final["ema"] else "trained")
            if final["tag"] is not None:
                log.info("testing and exporting the best checkpoint, step %d (%s=%.4g)%s", final["step"],
                         final["metric"], final["value"], ", its EMA weights" if final["ema"] else "")
                sinks.set_tags({"final_weights": f"best: step {final['step']} "
                                                 f"({final['metric']}={final['value']:.4g})"})
            if report is not None:  # eval/test.json says which weights it scored
                report["weights"] = {"step": final["step"], "ema": final["ema"], "best": final["tag"] is not None}
                result.update(self._report(report, step))
            export = export_model(self.run_dir, cfg, tag=final["tag"], classes=self.index.classes, ema=final["ema"])
            sinks.log_artifact(export, "model")
            account.save()
            if getattr(self, "sweep", None) is not None:
                self.sweep.ended(outcome, account.hours)  # sweep.json; the last member closes the parent run
            sinks.set_tags({"outcome": outcome, "gpu_hours": f"{account.hours:.6f}", "gpu_hours_unit": account.unit})
            sinks.close("FINISHED")
            self.end.decided = True  # finished: what may still fail below (result.json, the barrier) does not undo it
            result.update(export=str(export), gpu_hours=account.hours, run_dir=str(self.run_dir))
            # the model in MLflow's registry (tracking.register); a registry that fails is a warning, not a failure
            from pipeline.tracking.registry import register_run_model

            registered = register_run_model(self.run_dir, cfg, export, index=self.index, step=step)
            result["registered_model"] = registered["model_uri"] if registered else None
            (self.run_dir / "result.json").write_text(json.dumps(result, indent=1))
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        return result

    def test(self) -> dict[str, Any] | None:
        cfg = self.cfg
        with self.engine.eval_module(ema=getattr(self, "final", {}).get("ema", False)) as (module, dtype):
            return test_protocol(module, dtype, self.index, self.storage, split=cfg.data.test_split,
                                 clip=test_clip_config(cfg), protocol=cfg.test.protocol,
                                 temporal_clips=cfg.test.temporal_clips, spatial_crops=cfg.test.spatial_crops,
                                 batch_size=cfg.test.batch_size, device=self.device,
                                 num_workers=min(cfg.data.num_workers, 2), max_videos=cfg.test.max_videos)

    def _report(self, report: dict[str, Any], step: int) -> dict[str, Any]:
        """Rank 0: the test report to eval/test.json, MLflow and a confusion-matrix image; its numbers for the
        result. An unlabelled or partly unreadable test split is said so, never scored as if complete."""
        cfg, sinks = self.cfg, self.sinks
        out = self.run_dir / "eval" / "test.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
        sinks.log_metrics({**report_metrics(report), "gpu_hours": self.account.hours}, step)
        sinks.log_artifact(out, "eval")
        if headline(report)[1] is None:  # an unlabelled test split: predictions, and no made-up accuracy
            log.error("test split %r: no labelled video (%d unlabelled, %d skipped), so no test accuracy; "
                      "the predictions are in %s", cfg.data.test_split, report["unlabelled"], report["skipped"], out)
            sinks.set_tags({"test": "no labelled videos"})
        seen = report["read"] or (report["videos"] + report["unlabelled"] + report["skipped"])
        if report["skipped"] > cfg.data.max_skip_fraction * seen:
            log.error("test: %d of %d videos could not be read (above data.max_skip_fraction=%g): the test "
                      "accuracy covers part of the split only; %s says which shards", report["skipped"], seen,
                      cfg.data.max_skip_fraction, out)
            sinks.set_tags({"test": f"partial: {report['skipped']} of {seen} videos skipped"})
        image = confusion_image(report, self.index.classes, out.with_name("confusion.png"))
        if image is not None:
            sinks.log_artifact(image, "eval")
        return {**accuracy_metrics(report), "test_videos": report["videos"],
                "test_unlabelled": report["unlabelled"], "test_skipped": report["skipped"]}

    def _stop_for_now(self, reason: str) -> dict[str, Any]:
        """After the signal checkpoint: rank 0 requeues the job (preemption/time limit) and every rank leaves
        without a result, so the scheduler runs it again; a termination just stops (resume with --resume).
        The MLflow run is left as it should be: open for the requeued job, or KILLED."""
        run_dir, cfg, denv, sinks = self.run_dir, self.cfg, self.denv, self.sinks
        outcome, code = "stopped", EXIT_REQUEUED
        if denv.is_main:
            requeues_file = run_dir / "requeues.json"
            history = json.loads(requeues_file.read_text()) if requeues_file.exists() else []
            requeue = reason == "preempted" and len(history) < cfg.cluster.max_requeues
            history.append({"time": time.time(), "reason": reason, "requeued": requeue,
                            "job_id": os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")})
            requeues_file.write_text(json.dumps(history, indent=1))
            sinks.set_tags({"requeues": str(sum(h["requeued"] for h in history)), "last_stop": reason})
            if requeue and denv.launcher in ("slurm", "submitit-local"):
                log.warning("requeueing the job (%d of at most %d)", len(history), cfg.cluster.max_requeues)
                sinks.close(None)  # deliver what is queued; the run stays open for the requeued job
                outcome = "requeued"
                if denv.launcher == "slurm":
                    subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=True, timeout=60)
                else:
                    from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE

                    code = LOCAL_REQUEUE_RETURN_CODE
            else:
                log.warning("stopped (%s) after a checkpoint; continue with: python jobs/launch.py --resume %s",
                            reason, run_dir)
                sinks.close("KILLED")
        self.end.decided = True
        return {"outcome": outcome, "stop_reason": reason, "exit_code": code}

    # -- close -------------------------------------------------------------------------------------------

    def close(self) -> None:
        self._resources.close()


def run(run_dir: str | Path) -> dict[str, Any]:
    """One rank's run: its result (``exit_code`` 0 when it finished; else how the process should leave), or
    an exception after the MLflow run was marked (see ``RunEnd``)."""
    trainer = Trainer(run_dir)
    try:
        trainer.setup()
        return trainer.finish(trainer.train())
    except BaseException as e:
        trainer.end.failed(e)
        raise
    finally:
        trainer.close()


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
    metrics = {k: v for k, v in accuracy_metrics(report).items() if v is not None}  # test_top1/5, or test_map
    metrics.update({f"test_{k}": float(report[k]) for k in ("unlabelled", "skipped") if report.get(k)})
    return metrics


def record_dataset(run_dir: Path, index, write: bool) -> None:
    """``dataset.json``: the dataset this run trains on and its class list (exports and evaluation name
    the model's classes from it). A resumed run whose dataset now lists other classes is refused: its
    labels would mean other things than the ones the model learnt."""
    path = run_dir / RUN_DATASET_FILE
    recorded = recorded_dataset(run_dir)
    if recorded is not None:
        classes = recorded["classes"]
        if recorded.get("version") and recorded["version"] != index.version:
            raise ConfigError(
                f"{run_dir}: this run started on {recorded.get('dataset')} v{recorded['version']}, and this start "
                f"reads v{index.version}: a run stays on its dataset version. Resume it with jobs/launch.py "
                f"--resume (which pins the version), or start a new run for v{index.version}")
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
    saved = marker.get("world_size")
    if saved not in (None, world_size) and marker.get("zero_stage", 0) == 3:
        from pipeline.train.elastic import zero3_refusal

        raise zero3_refusal(ckpt.checkpoint_root(run_dir) / tag, saved, world_size)
    # another world size: the engine re-partitions a ZeRO-1/2 optimizer state (pipeline.train.elastic)
    engine.load(ckpt.checkpoint_root(run_dir), tag)
    if engine.global_step != step:
        raise RuntimeError(f"{run_dir}/{tag}: engine resumed at step {engine.global_step}, marker says {step}")
    elastic = f", written by {saved} rank(s), now on {world_size}" if saved not in (None, world_size) else ""
    log.info("resumed from %s (step %d%s)", tag, step, elastic)
    return step


def confusion_image(report: dict[str, Any], classes: list[str], path: Path) -> Path | None:
    """The test confusion matrix as a PNG (rows: true class, columns: predicted), for people to look at."""
    if report.get("confusion") is None:  # a multi-label model's report has per-class AP, no confusion matrix
        return None
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


class TrainJob:
    """The submitit callable: picklable, and stateless (everything is in the run directory)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = str(run_dir)

    def __call__(self) -> dict[str, Any]:
        result = run(self.run_dir)
        if result["exit_code"]:  # stopped after a signal checkpoint: the MLflow run is already as it should be
            raise SystemExit(result["exit_code"])
        return result

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
    return run(args.run_dir)["exit_code"]


if __name__ == "__main__":
    sys.exit(main())

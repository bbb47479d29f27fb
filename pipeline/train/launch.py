"""Turn a recipe into a run directory and a job: Slurm through submitit, or local processes.

The run directory is fixed at launch and survives requeues: ``config.yaml`` (resolved), ``deepspeed.json``
(derived), ``launch.json`` (who, where, which commit, which jobs), ``mlflow.json`` (the MLflow run), then
checkpoints, metrics, evaluation reports, the exported model and the job logs (``submitit/``).
"""

from __future__ import annotations

import getpass
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import (
    ConfigError,
    RunConfig,
    apply_layer,
    batch_plan,
    dump,
    load_recipe,
    load_resolved,
    parse_overrides,
)
from pipeline.config import validate as validate_config

REPO = Path(__file__).resolve().parents[2]


@dataclass
class LaunchRequest:
    recipe: str | None = None
    nodes: int | None = None  # None: 1, or on --resume the nodes of the run's last job
    gpus_per_node: int | None = None
    partition: str | None = None
    time: str | None = None
    name: str | None = None
    local: bool = False
    dry_run: bool = False
    resume: str | None = None
    cluster_file: str | None = None
    runs_dir: str | None = None
    overrides: list[str] = field(default_factory=list)


def parse_time(value: str) -> int:
    """Minutes from ``90``, ``1:30:00``, ``2-00:00:00`` (Slurm's forms)."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value.strip())
    if not m:
        raise ConfigError(f"--time {value!r}: expected minutes, HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = m.groups()
    if b is None:  # minutes only (or D-HH)
        minutes = int(a) * (60 if days else 1)
    elif c is None:  # MM:SS, or D-HH:MM
        minutes = int(a) * 60 + int(b) if days else int(a) + (1 if int(b) else 0)
    else:
        minutes = int(a) * 60 + int(b) + (1 if int(c) else 0)
    return minutes + int(days or 0) * 24 * 60


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"sha": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "branch": git("rev-parse", "--abbrev-ref", "HEAD")}


def resolve(req: LaunchRequest) -> tuple[RunConfig, Path]:
    """The resolved config and the run directory (not created) for a request."""
    flags = []
    if req.gpus_per_node is not None:
        flags.append(f"cluster.gpus_per_node={req.gpus_per_node}")
    if req.partition is not None:
        flags.append(f"cluster.partition={req.partition}")
    if req.time is not None:
        flags.append(f"cluster.time_min={parse_time(req.time)}")
    if req.runs_dir is not None:
        flags.append(f"runs_dir={req.runs_dir}")
    if req.resume:
        run_dir = Path(req.resume).resolve()
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume {req.resume}: no config.yaml there; give a run directory made by launch.py")
        cfg = load_resolved(run_dir / "config.yaml")
        if req.overrides or flags:  # only where to run may change on resume; the recipe stays
            layer = parse_overrides(req.overrides + flags)
            bad = sorted(k for k in layer if k not in ("cluster", "runs_dir", "tracking"))
            if bad:
                raise ConfigError(f"--resume: only cluster.* and tracking.* can change on a resumed run, "
                                  f"not {bad} (the recipe of a run is fixed; launch a new run instead)")
            apply_layer(cfg, layer, "command line")
            validate_config(cfg)
        return cfg, run_dir
    if not req.recipe:
        raise ConfigError("--recipe is required (or --resume RUN_DIR)")
    extra = [req.cluster_file] if req.cluster_file else []
    cfg = load_recipe(req.recipe, req.overrides + flags, extra_files=extra)
    # local paths are read by the ranks, whose working directory may differ: fix them to absolute here
    if cfg.data.index and "://" not in cfg.data.index:
        cfg.data.index = str(Path(cfg.data.index).resolve())
    if cfg.model.init and "://" not in cfg.model.init:
        cfg.model.init = str(Path(cfg.model.init).resolve())
    name = req.name or cfg.name or f"{cfg.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg.name = name
    run_dir = (Path(cfg.runs_dir) if Path(cfg.runs_dir).is_absolute() else Path.cwd() / cfg.runs_dir) / name
    return cfg, run_dir


def slurm_parameters(cfg: RunConfig, nodes: int, run_dir: Path) -> dict[str, Any]:
    c = cfg.cluster
    params: dict[str, Any] = {
        "job_name": cfg.name, "nodes": nodes, "ntasks_per_node": c.gpus_per_node, "cpus_per_task": c.cpus_per_task,
        "time": c.time_min, "signal_delay_s": c.signal_delay_s,
        "additional_parameters": {"requeue": True},
        "setup": [f"export {k}={v}" for k, v in c.env.items()] + list(c.setup),
    }
    if c.accelerator == "gpu":
        params["gpus_per_node"] = c.gpus_per_node
    for key, value in (("partition", c.partition), ("account", c.account), ("qos", c.qos),
                       ("constraint", c.constraint)):
        if value:
            params[key] = value
    if c.mem_gb:
        params["mem"] = f"{c.mem_gb}GB"
    return params


def make_executor(cfg: RunConfig, nodes: int, run_dir: Path, local: bool):
    import submitit

    folder = run_dir / "submitit" / "%j"
    if local:
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(tasks_per_node=nodes * cfg.cluster.gpus_per_node, nodes=1,
                             timeout_min=cfg.cluster.time_min, signal_delay_s=cfg.cluster.signal_delay_s)
        return ex
    if shutil.which("sbatch") is None:
        raise ConfigError("Slurm is not available here (no sbatch on PATH): run on the cluster's login node, "
                          "start the development cluster (python infra/slurm_dev.py up), or use --local")
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=cfg.cluster.max_requeues)
    ex.update_parameters(**slurm_parameters(cfg, nodes, run_dir))
    return ex


def sbatch_script(cfg: RunConfig, nodes: int, run_dir: Path) -> str:
    """The sbatch script submitit would write (for --dry-run)."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = slurm_parameters(cfg, nodes, run_dir)
    command = f"{sys.executable} -u -m submitit.core._submit {run_dir / 'submitit' / '%j'}"
    return _make_sbatch_string(command=command, folder=str(run_dir / "submitit" / "%j"), **params)


def check_data(cfg: RunConfig) -> str:
    """Fail at launch (not on the cluster an hour later) when the dataset cannot be read."""
    from pipeline.data.shards import ShardError, load_index
    from pipeline.data.storage import StorageError

    try:
        index, _ = load_index(cfg.data.index, cfg.data.version or None)
    except (ShardError, StorageError, FileNotFoundError) as e:
        raise ConfigError(f"data.index={cfg.data.index!r} cannot be read: {e}. Ingest the dataset first "
                          f"(python jobs/ingest.py --config configs/ingest/<dataset>.yaml) or fix data.index") from None
    missing = [s for s in (cfg.data.train_split, cfg.data.val_split, cfg.data.test_split) if not index.split(s)]
    if missing:
        raise ConfigError(f"dataset {index.dataset} v{index.version} at {cfg.data.index} has no shards for "
                          f"split(s) {missing}; splits present: {sorted({s.split for s in index.shards})}")
    if cfg.model.num_classes != len(index.classes):
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but dataset {index.dataset} has "
                          f"{len(index.classes)} classes; set model.num_classes={len(index.classes)}")
    return f"{index.dataset} v{index.version}: " + ", ".join(
        f"{s} {index.num_samples(s)} clips" for s in dict.fromkeys(
            (cfg.data.train_split, cfg.data.val_split, cfg.data.test_split)))


def mlflow_tags(cfg: RunConfig, nodes: int, git: dict[str, Any]) -> dict[str, str]:
    from pipeline.models.flops import flops_per_view, parameter_count
    from pipeline.models.timesformer import model_config

    mc = model_config(cfg)
    return {"recipe": cfg.recipe, "variant": cfg.model.variant, "attention_type": cfg.model.attention_type,
            "frames": str(cfg.data.num_frames), "sampling_rate": str(cfg.data.sampling_rate),
            "resolution": str(cfg.data.crop), "nodes": str(nodes), "gpus_per_node": str(cfg.cluster.gpus_per_node),
            "accelerator": cfg.cluster.accelerator, "git_sha": git.get("sha", ""),
            "params": str(parameter_count(mc)), "gflops_per_view": f"{flops_per_view(mc) / 1e9:.2f}",
            "mlflow.note.content": cfg.description}


def launch(req: LaunchRequest, out=print) -> dict[str, Any]:
    """Resolve, prepare the run directory, create the MLflow run and submit. Returns what was done."""
    from pipeline.train.engine import deepspeed_config

    cfg, run_dir = resolve(req)
    nodes = req.nodes
    if nodes is None:
        nodes = 1
        if req.resume and (run_dir / "launch.json").exists():
            jobs = json.loads((run_dir / "launch.json").read_text()).get("jobs", [])
            nodes = jobs[-1]["nodes"] if jobs else 1
    world = nodes * cfg.cluster.gpus_per_node
    plan = batch_plan(cfg, world)
    ds_json = deepspeed_config(cfg, plan)
    try:
        data = check_data(cfg)
    except ConfigError as e:
        if not req.dry_run:
            raise
        data = f"NOT READABLE from here ({e})"
    git = git_state()
    executor_kind = "local" if req.local else "slurm"
    info: dict[str, Any] = {"run_dir": str(run_dir), "recipe": cfg.recipe, "nodes": nodes,
                            "gpus_per_node": cfg.cluster.gpus_per_node, "world_size": world,
                            "batch": plan.describe(), "executor": executor_kind, "data": data}
    if req.dry_run:
        out(f"[dry run] nothing is written or submitted\nrecipe      {cfg.recipe}: {cfg.description}")
        out(f"run dir     {run_dir}\nworld       {nodes} node(s) x {cfg.cluster.gpus_per_node} = {world} rank(s); "
            f"{plan.describe()}\ndata        {data}\nexecutor    {executor_kind}")
        out("--- config.yaml\n" + dump(cfg) + "--- deepspeed.json\n" + json.dumps(ds_json, indent=1))
        if not req.local:
            out("--- sbatch script (submitit)\n" + sbatch_script(cfg, nodes, run_dir))
        info["deepspeed"] = ds_json
        return info
    if req.resume:
        if not run_dir.is_dir():
            raise ConfigError(f"--resume {run_dir}: not a directory")
    else:
        if run_dir.exists():
            raise ConfigError(f"run directory {run_dir} exists: choose another --name, or continue it with "
                              f"--resume {run_dir}")
        run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump(cfg))
    (run_dir / "deepspeed.json").write_text(json.dumps(ds_json, indent=1))
    record_path = run_dir / "launch.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {
        "created": time.time(), "user": getpass.getuser(), "host": socket.gethostname(), "git": git,
        "recipe": cfg.recipe, "jobs": []}
    from pipeline.tracking.sink import MLFLOW_FILE, create_run, default_tracking_uri

    tracking = None
    if (run_dir / MLFLOW_FILE).exists():
        tracking = json.loads((run_dir / MLFLOW_FILE).read_text())
    else:
        uri = cfg.tracking.uri or default_tracking_uri(run_dir.parent)
        tracking = create_run(run_dir, uri, cfg.tracking.experiment or cfg.recipe, cfg.name,
                              mlflow_tags(cfg, nodes, git))
    executor = make_executor(cfg, nodes, run_dir, req.local)
    from pipeline.train.main import TrainJob

    job = executor.submit(TrainJob(run_dir))
    record["jobs"].append({"job_id": str(job.job_id), "submitted": time.time(), "executor": executor_kind,
                           "nodes": nodes, "gpus_per_node": cfg.cluster.gpus_per_node, "argv": sys.argv,
                           "git": git, "resume": bool(req.resume)})
    record_path.write_text(json.dumps(record, indent=1))
    info.update(job_id=str(job.job_id), job=job, mlflow=tracking,
                logs=str(run_dir / "submitit" / str(job.job_id) / str(job.job_id)))
    out(f"submitted   job {job.job_id} ({executor_kind}, {nodes} node(s) x {cfg.cluster.gpus_per_node} rank(s))")
    out(f"run dir     {run_dir}\nbatch       {plan.describe()}\ndata        {data}")
    out(f"logs        {info['logs']}_<rank>_log.out")
    if tracking:
        out(f"mlflow      run {tracking['run_id']} in experiment {tracking['experiment']!r} at "
            f"{tracking['tracking_uri']}")
        if tracking["tracking_uri"].startswith("sqlite:"):
            out(f"            UI: mlflow ui --backend-store-uri {tracking['tracking_uri']} --host 127.0.0.1")
    else:
        out("mlflow      unavailable at launch; rank 0 logs to metrics.jsonl in the run directory")
    return info

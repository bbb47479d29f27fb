"""Turn a recipe into a run directory and a job: Slurm through submitit, or local processes.

The run directory is fixed at launch and survives requeues: ``config.yaml`` (resolved), ``deepspeed.json``
(derived), ``launch.json`` (who, where, which commit, which jobs), ``mlflow.json`` (the MLflow run), then
checkpoints, metrics, evaluation reports, the exported model and the job logs (``submitit/``). ``code/`` is a
copy of the ``pipeline`` package made at launch: the ranks import it from there, on every requeue and resume
(see ``pipeline.train.snapshot``), so a change to the checkout during a run does not change the run.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import shlex
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
    check_model,
    check_run_name,
    dump,
    load_recipe,
    load_resolved,
    parse_overrides,
)
from pipeline.config import validate as validate_config
from pipeline.models.hub import SourceError, is_reference, resolve_source
from pipeline.secrets import (
    SecretUnavailableError,
    has_credentials,
    is_secret_env,
    redact,
    redact_env,
    redact_text,
    reveal_env,
    reveal_uri,
)
from pipeline.train.snapshot import (
    CODE_DIR,
    SnapshotError,
    code_hash,
    code_path,
    package_dir,
    rank_environment,
    shell_exports,
    snapshot_code,
)

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
    # sweeps (pipeline.train.sweep): check_only runs every check and returns before anything is created; hold
    # creates the run directory and its MLflow run but submits nothing (the sweep submits one job array);
    # files are written into the new run directory before its MLflow run is created (sweep_member.json)
    check_only: bool = False
    hold: bool = False
    files: dict[str, str] = field(default_factory=dict)


def parse_time(value: str) -> int:
    """Minutes from ``90``, ``1:30:00``, ``2-00:00:00`` (Slurm's forms); a limit of zero minutes is refused."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value.strip())
    if not m:
        raise ConfigError(f"--time {value!r}: expected minutes, HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = m.groups()
    if any(part is not None and int(part) > 59 for part in ((b, c) if c is not None else (b,))):
        raise ConfigError(f"--time {value!r}: minutes and seconds after a ':' are 0..59")
    if b is None:  # minutes only (or D-HH)
        minutes = int(a) * (60 if days else 1)
    elif c is None:  # MM:SS, or D-HH:MM
        minutes = int(a) * 60 + int(b) if days else int(a) + (1 if int(b) else 0)
    else:
        minutes = int(a) * 60 + int(b) + (1 if int(c) else 0)
    minutes += int(days or 0) * 24 * 60
    if minutes < 1:
        raise ConfigError(f"--time {value!r}: expected a time limit of at least a minute")
    return minutes


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
    if req.gpus_per_node is not None and req.gpus_per_node < 1:
        raise ConfigError(f"--gpus-per-node {req.gpus_per_node}: expected a positive number of ranks per node")
    if req.nodes is not None and req.nodes < 1:
        raise ConfigError(f"--nodes {req.nodes}: expected a positive number of nodes")
    if req.name is not None:
        check_run_name(req.name, "--name")
    # the flags' values are taken as given (not parsed as YAML, as key=value overrides are): --runs-dir 2024
    # is a directory name, not a number
    flags: dict[str, Any] = {}
    cluster_flags: dict[str, Any] = {}
    if req.gpus_per_node is not None:
        cluster_flags["gpus_per_node"] = req.gpus_per_node
    if req.partition is not None:
        cluster_flags["partition"] = req.partition
    if req.time is not None:
        cluster_flags["time_min"] = parse_time(req.time)
    if cluster_flags:
        flags["cluster"] = cluster_flags
    if req.runs_dir is not None:
        flags["runs_dir"] = req.runs_dir
    if req.resume:
        run_dir = Path(req.resume).resolve()
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume {req.resume}: no config.yaml there; give a run directory made by launch.py")
        if (run_dir / "result.json").is_file():  # written by rank 0 once the run, its test and export are done
            raise ConfigError(f"--resume {req.resume}: this run finished (result.json); resuming would train nothing "
                              f"and redo its test and export. Evaluate it (python jobs/evaluate.py {req.resume}) or "
                              f"launch a new run")
        cfg = load_resolved(run_dir / "config.yaml")
        if not cfg.data.version:  # launched before runs were pinned: the version its ranks recorded at first start
            from pipeline.train.evaluate import EvaluationError, run_data_version

            try:
                cfg.data.version = run_data_version(cfg, run_dir)
            except EvaluationError as e:
                raise ConfigError(str(e)) from None
        if req.overrides or flags:  # only where to run may change on resume; the recipe stays
            layer = parse_overrides(req.overrides)
            bad = sorted(k for k in layer if k not in ("cluster", "runs_dir", "tracking"))
            if bad:
                raise ConfigError(f"--resume: only cluster.* and tracking.* can change on a resumed run, "
                                  f"not {bad} (the recipe of a run is fixed; launch a new run instead)")
            apply_layer(cfg, layer, "command line")
            apply_layer(cfg, flags, "command-line flags")
            validate_config(cfg)
        return cfg, run_dir
    if not req.recipe:
        raise ConfigError("--recipe is required (or --resume RUN_DIR)")
    extra = [req.cluster_file] if req.cluster_file else []
    cfg = load_recipe(req.recipe, req.overrides, extra_files=extra)
    if flags:
        apply_layer(cfg, flags, "command-line flags")
        validate_config(cfg)
    # local paths are read by the ranks, whose working directory may differ: fix them to absolute here
    if cfg.data.index and "://" not in cfg.data.index:
        cfg.data.index = str(Path(cfg.data.index).resolve())
    if cfg.model.init and "://" not in cfg.model.init and not is_reference(cfg.model.init):
        cfg.model.init = str(Path(cfg.model.init).resolve())  # an hf-hub:/s3:// source is resolved by check_init
    name = req.name or cfg.name or f"{cfg.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
    # a new run directory: the full rule, whether the name came from --name, the recipe's name: or its file
    check_run_name(name, "--name" if req.name else "name" if cfg.name else
                   "the run name made from the recipe's name (give --name)")
    cfg.name = name
    # the name rule (no '/', no leading '.') keeps the run directory a direct child of runs_dir
    run_dir = (Path(cfg.runs_dir) if Path(cfg.runs_dir).is_absolute() else Path.cwd() / cfg.runs_dir) / name
    return cfg, run_dir


def resume_world_note(cfg: RunConfig, run_dir: Path, world: int) -> str:
    """On --resume: "" when the newest complete checkpoint was written by ``world`` ranks (or there is none); a
    note when it was written by another number (the run resumes elastically: pipeline.train.elastic); a
    ConfigError for a ZeRO-3 checkpoint, which resumes on its own world size only."""
    from pipeline.train import checkpoint as ckpt

    latest = ckpt.latest_complete(run_dir)
    if latest is None:
        return ""
    try:
        marker = ckpt.read_marker(run_dir, latest[1])
    except ckpt.CheckpointMarkerError:
        return ""
    saved = marker.get("world_size")
    if saved in (None, world):
        return ""
    if marker.get("zero_stage", 0) == 3:
        from pipeline.train.elastic import zero3_refusal

        raise ConfigError(f"--resume: {zero3_refusal(ckpt.checkpoint_root(run_dir) / latest[1], saved, world)}")
    return (f"; resumes checkpoint {latest[1]} written by {saved} rank(s) on {world}: optimizer state re-partitioned,"
            f" accumulation re-derived ({plan_note(cfg, saved)} before)")


def plan_note(cfg: RunConfig, world: int) -> str:
    try:
        return batch_plan(cfg, world).describe()
    except ConfigError:
        return f"{world} rank(s)"


def slurm_parameters(cfg: RunConfig, nodes: int, run_dir: Path, code: Path | None = None) -> dict[str, Any]:
    """submitit's Slurm parameters; with ``code`` (the run's snapshot) the script's last setup lines make the
    ranks import ``pipeline`` from it (they run again on every requeue)."""
    c = cfg.cluster
    params: dict[str, Any] = {
        "job_name": cfg.name, "nodes": nodes, "ntasks_per_node": c.gpus_per_node, "cpus_per_task": c.cpus_per_task,
        "time": c.time_min, "signal_delay_s": c.signal_delay_s,
        "additional_parameters": {"requeue": True},
        # quoted: a value is data, never shell syntax; secrets are not written here (the job's environment
        # carries them, see stored_config), so the script submitit keeps in the run directory holds none
        "setup": [f"export {k}={shlex.quote(v)}" for k, v in c.env.items() if not is_secret_env(k, v)]
        + list(c.setup) + (shell_exports(code) if code is not None else []),
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


def check_slurm() -> None:
    """Slurm's commands that submitit needs at submission (sbatch, and srun it looks for first)."""
    missing = [b for b in ("sbatch", "srun") if shutil.which(b) is None]
    if missing:
        raise ConfigError(f"Slurm is not available here (no {' or '.join(missing)} on PATH): run on the cluster's "
                          f"login node, start the development cluster (python infra/slurm_dev.py up), or use --local")


def make_executor(cfg: RunConfig, nodes: int, run_dir: Path, local: bool, code: Path | None = None):
    """The executor of a run's job. Local processes get the snapshot's environment from ``job_environment``
    at submission (see ``launch``); a Slurm job from its script (``slurm_parameters``)."""
    import submitit

    folder = run_dir / "submitit" / "%j"
    if local:
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(tasks_per_node=nodes * cfg.cluster.gpus_per_node, nodes=1,
                             timeout_min=cfg.cluster.time_min, signal_delay_s=cfg.cluster.signal_delay_s)
        return ex
    check_slurm()
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=cfg.cluster.max_requeues)
    ex.update_parameters(**slurm_parameters(cfg, nodes, run_dir, code))
    return ex


def sbatch_script(cfg: RunConfig, nodes: int, run_dir: Path, code: Path | None = None) -> str:
    """The sbatch script submitit would write (for --dry-run)."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = slurm_parameters(cfg, nodes, run_dir, code)
    command = f"{sys.executable} -u -m submitit.core._submit {run_dir / 'submitit' / '%j'}"
    return _make_sbatch_string(command=command, folder=str(run_dir / "submitit" / "%j"), **params)


def check_data(cfg: RunConfig) -> str:
    """Fail at launch (not on the cluster an hour later) when the dataset cannot be read; pin ``cfg.data.version``
    to the version found (0 means the newest: the run then stays on it) and ``cfg.model.multi_label`` to the
    dataset's kind (null: the index's; a contradiction is refused); a line describing the dataset."""
    from pipeline.data.shards import ShardError, load_index, settle_multi_label
    from pipeline.data.storage import StorageError

    try:
        index, _ = load_index(cfg.data.index, cfg.data.version or None)
    except (ShardError, StorageError, OSError, ValueError, RecursionError) as e:
        if cfg.data.version:
            raise ConfigError(f"data.index={cfg.data.index!r} version {cfg.data.version} cannot be read: "
                              f"{' '.join(str(e).split())}. Give a committed version (a resumed run is pinned to "
                              f"the one it started on: restore it, or launch a new run)") from None
        raise ConfigError(f"data.index={cfg.data.index!r} cannot be read: {' '.join(str(e).split())}. Ingest the "
                          f"dataset first (python jobs/ingest.py --config configs/ingest/<dataset>.yaml) or fix "
                          f"data.index") from None
    missing = [s for s in (cfg.data.train_split, cfg.data.val_split, cfg.data.test_split) if not index.split(s)]
    if missing:
        raise ConfigError(f"dataset {index.dataset} v{index.version} at {cfg.data.index} has no shards for "
                          f"split(s) {missing}; splits present: {sorted({s.split for s in index.shards})}")
    if cfg.model.num_classes != len(index.classes):
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but dataset {index.dataset} has "
                          f"{len(index.classes)} classes; set model.num_classes={len(index.classes)}")
    try:  # null: the dataset's kind (several labels per video or one); a recipe that says otherwise is refused
        cfg.model.multi_label = settle_multi_label(cfg.model.multi_label, index)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.data.version and index.version != cfg.data.version:  # data.index names one index file: it wins silently
        raise ConfigError(f"data.index={cfg.data.index!r} is dataset version {index.version}, and data.version="
                          f"{cfg.data.version}: give the dataset root with data.version, or the index file alone")
    pinned = "" if cfg.data.version else f" (the newest: the run is pinned to it, data.version={index.version})"
    cfg.data.version = index.version  # a run reads one version for its whole life: resume and evaluation too
    return f"{index.dataset} v{index.version}{pinned}: " + ", ".join(
        f"{s} {index.num_samples(s)} clips" for s in dict.fromkeys(
            (cfg.data.train_split, cfg.data.val_split, cfg.data.test_split)))


# torch.save's legacy (non-zip) format starts with the pickled magic number 0x1950a86a20f9469cfc6c
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def init_cache_dir(cfg: RunConfig) -> Path:
    """Where launch downloads an ``s3://`` model.init: beside the run directories, which every rank sees."""
    runs = Path(cfg.runs_dir) if Path(cfg.runs_dir).is_absolute() else Path.cwd() / cfg.runs_dir
    return runs / ".init-cache"


def resolve_init(cfg: RunConfig, why: str = "") -> str:
    """Resolve an ``hf-hub:`` or ``s3://`` model.init once, here on the submitting host, to the local path the
    ranks load; ``cfg.model.init`` becomes that path and ``cfg.model.init_source`` keeps the reference, pinned: a
    hub reference as ``hf-hub:<org>/<name>@<commit>``, the snapshot it resolved to, so that fetching it again later
    gets the same weights even after the repository's branch moved on (both land in config.yaml, and in MLflow's
    params as model.init / model.init_source). On --resume the recorded path is used while it exists, and fetched
    again from model.init_source when the cache was emptied (``why`` says why it is needed then). Returns a
    "<reference> -> " prefix for the launch output ("" when nothing was resolved)."""
    from pipeline.models.hub import pinned_reference

    init, source = cfg.model.init, cfg.model.init_source
    if is_reference(init):
        source = init
    elif not (source and init and not Path(init).exists()):
        return ""
    try:
        path = resolve_source(source, cache_dir=init_cache_dir(cfg))
    except SourceError as e:
        raise ConfigError(redact_text(f"model.init={source!r} cannot be resolved{why}: {e}")) from None
    cfg.model.init, cfg.model.init_source = str(path.resolve()), pinned_reference(source, path)
    return f"{cfg.model.init_source} -> "


def check_init(cfg: RunConfig, resume_dir: Path | None = None) -> str:
    """Fail at launch when ``model.init`` cannot be what the ranks load: a source that cannot be resolved (see
    ``resolve_init``), a missing file, another URI scheme, a file that is neither safetensors nor a torch
    checkpoint, weights recorded with other input normalisation than the run's. Reads headers only (the
    safetensors header, a zip directory, a magic number, JSON configs): nothing is unpickled here.

    ``resume_dir``: the run being resumed. When it has a complete checkpoint the ranks load that and never
    model.init (``pipeline.train.main.build_model``), so nothing is resolved or read: a cleaned cache or an
    unreachable hub does not stop the run."""
    import zipfile

    from pipeline.models.hub import weights_in
    from pipeline.train import checkpoint as ckpt

    if not cfg.model.init:
        if cfg.model.init_source:  # it would name, on the card and in MLflow, a base model that was never used
            raise ConfigError(f"model.init_source={cfg.model.init_source!r} with an empty model.init: init_source "
                              f"records where model.init came from (launch sets it); give the weights as model.init, "
                              f"or leave both empty for random initialisation")
        return "random initialisation"
    why = ""
    if resume_dir is not None:
        latest = ckpt.latest_complete(resume_dir)
        if latest is not None:
            return (f"not loaded: the run resumes from its checkpoint {latest[1]} (it started from "
                    f"{cfg.model.init_source or cfg.model.init})")
        why = (" (--resume: the run has no complete checkpoint yet, so it starts again from model.init and "
               "needs these weights)")
    resolved = resolve_init(cfg, why)
    init = cfg.model.init
    if "://" in init:
        raise ConfigError(f"model.init={init!r}: the ranks load a path (a file or a directory on a file system "
                          f"they see), an s3://bucket/key (downloaded at launch) or hf-hub:<org>/<name>; copy the "
                          f"checkpoint there and give its path")
    path = Path(init)
    if path.is_dir():
        path = weights_in(path)
    if not path.is_file():
        raise ConfigError(f"model.init={init!r}: no such checkpoint{why} (expected a .safetensors/.pth/.pyth file or "
                          f"a directory with model.safetensors or pytorch_model.bin)")
    norm = check_init_normalization(cfg, Path(init))
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                names, meta = list(f.keys()), f.metadata() or {}
            if not names:
                raise ValueError("it holds no tensors")
            check_init_family(cfg, init, names, meta)
            return f"{resolved}{path} (safetensors, {len(names)} tensors{norm})"
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_TORCH_MAGIC))
        if head == _LEGACY_TORCH_MAGIC:
            return f"{resolved}{path} (torch checkpoint, legacy format{norm})"
        with zipfile.ZipFile(path) as z:  # torch.save's format: a zip holding <name>/data.pkl
            if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in z.namelist()):
                raise ValueError("a zip file without data.pkl is not a torch checkpoint")
        return f"{resolved}{path} (torch checkpoint{norm})"
    except Exception as e:  # noqa: BLE001 -- OSError, BadZipFile, safetensors' own error type: all one answer
        raise ConfigError(f"model.init={init!r}: {path} is not a readable checkpoint ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:300]})") from None


# Which family's weights a file holds, from its tensor names: TimeSformer's own, the original's, Hugging Face's and
# an image ViT's (inflated); a 3D ResNet's own, PySlowFast's, and a 2D ImageNet ResNet's (inflated)
FAMILY_KEY_PREFIXES = {
    "timesformer": ("blocks.", "cls_token", "timesformer.", "model.blocks.", "vit."),
    "resnet3d": ("stages.", "stem.conv", "s1.pathway0_stem", "layer1.", "conv1.weight"),
}


def check_init_family(cfg: RunConfig, init: str, names: list[str], meta: dict[str, str]) -> None:
    """Refuse at launch weights of another model family than the run's (a TimeSformer export as an I3D's
    model.init): the ranks would fail on every key after the job was queued."""
    from pipeline.models.registry import family_of

    ours = family_of(cfg.model.variant).name
    theirs = meta.get("model_family") or ("timesformer" if "timesformer_config" in meta else None)
    if theirs is None:
        found = [f for f, prefixes in FAMILY_KEY_PREFIXES.items() if any(n.startswith(prefixes) for n in names)]
        theirs = found[0] if len(found) == 1 else None
    if theirs is not None and theirs != ours:
        raise ConfigError(f"model.init={init!r} holds the weights of a {theirs} model, and model.variant="
                          f"{cfg.model.variant} is a {ours} model: give weights of its family (python jobs/launch.py "
                          f"--list-models; docs/model.md lists what each family converts), or a {theirs} variant")


def check_init_normalization(cfg: RunConfig, path: Path) -> str:
    """Refuse to start from weights trained on other input normalisation than the run's: fine-tuning would feed
    them inputs shifted and scaled from what they learnt on, with nothing to say so. Returns what the weights
    record, for the launch output ("" when they record nothing)."""
    from pipeline.models.convert import checkpoint_normalization

    shown = f"{cfg.model.init_source} ({path})" if cfg.model.init_source else str(path)
    try:
        recorded = checkpoint_normalization(path)
    except ValueError as e:
        raise ConfigError(f"model.init={shown!r}: {e}") from None
    if recorded is None:  # a format that does not say (a .pth): the recipe's model.mean/std are taken as given
        return ""
    mean, std = recorded
    ours = (tuple(cfg.model.mean), tuple(cfg.model.std))
    if len(mean + std) != len(ours[0] + ours[1]) or any(
            abs(a - b) > 1e-6 for a, b in zip(mean + std, ours[0] + ours[1], strict=True)):
        fmt = ",".join
        raise ConfigError(
            f"model.init={shown!r} was trained on inputs normalised with mean {list(mean)} and std {list(std)}, "
            f"and this run normalises with model.mean={list(ours[0])} model.std={list(ours[1])}: set "
            f"model.mean=[{fmt(map(str, mean))}] model.std=[{fmt(map(str, std))}] to fine-tune it as it was trained")
    return f"; trained on inputs normalised with mean {list(mean)} std {list(std)}, as this run"


def stored_config(cfg: RunConfig, tracking_uri: str) -> tuple[RunConfig, dict[str, str], str]:
    """What the run directory may hold, and what only the job's environment may carry.

    Returns the config to write (``cluster.env`` secrets and the credentials of ``tracking.uri`` as ``***``),
    the environment the job is submitted with (the secrets themselves; Slurm and the local executor hand
    the submitting process's environment to the ranks), and the real tracking URI (for this process only).
    A credential in a field the ranks need and no variable can carry (data.index, model.init, cluster.setup,
    ...) is refused."""
    import copy

    stored = copy.deepcopy(cfg)
    job_env: dict[str, str] = {}
    try:
        revealed = reveal_env(cfg.cluster.env)  # on --resume: "***" values come from this shell
    except SecretUnavailableError as e:
        raise ConfigError(str(e)) from None
    for name, value in cfg.cluster.env.items():
        if is_secret_env(name, value):
            job_env[name] = revealed[name]
    stored.cluster.env = redact_env(cfg.cluster.env)
    try:
        real_uri = reveal_uri(tracking_uri)
    except SecretUnavailableError as e:
        raise ConfigError(f"tracking: {e}") from None
    if has_credentials(real_uri):
        job_env["MLFLOW_TRACKING_URI"] = real_uri  # the ranks' sink reads the real URI from here
    stored.tracking.uri = redact_text(cfg.tracking.uri)
    stored.description = redact_text(cfg.description)
    flat, clean = stored.flat(), redact(stored.flat())
    leaked = sorted(k for k in flat if k != "cluster.env" and flat[k] != clean[k])
    if leaked:
        raise ConfigError(f"{', '.join(leaked)} hold(s) a credential (a password or token in a URI, or NAME=secret): "
                          f"the run directory would keep it. Give credentials by environment (AWS_* for S3, "
                          f"cluster.env for the ranks: its secrets are passed by environment, never written)")
    if job_env and not os.environ.get("SBATCH_EXPORT", "ALL").upper().startswith("ALL"):
        raise ConfigError(f"SBATCH_EXPORT={os.environ['SBATCH_EXPORT']!r} keeps this shell's environment from the "
                          f"job, and the secrets {sorted(job_env)} travel only by environment: unset SBATCH_EXPORT")
    return stored, job_env, real_uri


@contextlib.contextmanager
def job_environment(env: dict[str, str]):
    """``env`` added to this process's environment while a job is submitted (the job inherits it), then
    the environment as it was."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class SubmissionError(RuntimeError):
    """The scheduler refused the job; what launch created for it has been removed (or marked FAILED)."""


# what launch itself writes into a new run directory; anything else there was written by a rank
_LAUNCH_FILES = {"config.yaml", "deepspeed.json", "launch.json", "mlflow.json", "submitit", CODE_DIR,
                 "sweep_member.json"}


def _undo_launch(run_dir: Path, created: bool, tracking: dict[str, str] | None, real_uri: str,
                 error: BaseException) -> str:
    """After a failed submission: the MLflow run this launch created is marked FAILED (with the reason)
    and a run directory it created is removed, so the name can be used again. Returns what was done."""
    done = []
    if tracking is not None:
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(real_uri)
            client.set_tag(tracking["run_id"], "launch_error", redact_text(" ".join(str(error).split()))[:4000])
            client.set_terminated(tracking["run_id"], "FAILED")
            done.append(f"MLflow run {tracking['run_id']} marked FAILED")
        except Exception as e:  # noqa: BLE001 -- the submission error is the one to report
            done.append(f"MLflow run {tracking['run_id']} could not be marked FAILED ({redact_text(str(e))[:200]})")
    if created and run_dir.is_dir():
        foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in _LAUNCH_FILES)
        if foreign:
            done.append(f"{run_dir} kept: it holds {foreign}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
            done.append(f"{run_dir} removed")
    return "; ".join(done)


def launch(req: LaunchRequest, out=print) -> dict[str, Any]:
    """Check everything that can be checked, then create the run directory and the MLflow run and submit.
    A bad request creates nothing; a refused submission leaves nothing behind but a FAILED MLflow run."""
    from pipeline.train.engine import deepspeed_config

    cfg, run_dir = resolve(req)
    nodes = req.nodes
    if nodes is None:
        nodes = 1
        if req.resume and (run_dir / "launch.json").exists():
            try:
                jobs = json.loads((run_dir / "launch.json").read_text()).get("jobs", [])
                raw = jobs[-1]["nodes"] if jobs else 1
                nodes = int(raw) if not isinstance(raw, (bool, float)) else 0
                if not 1 <= nodes <= 100_000:  # what launch writes; anything else was edited or damaged
                    raise ValueError(f"its last job has nodes={str(raw)[:40]}, not a number of nodes")
            except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
                raise ConfigError(f"--resume: {run_dir / 'launch.json'} cannot be read ({type(e).__name__}: "
                                  f"{str(e)[:300]}); give --nodes") from None
    if nodes < 1:
        raise ConfigError(f"--nodes {nodes}: expected a positive number of nodes")
    from pipeline.tracking.sink import MLFLOW_FILE, create_run, default_tracking_uri, mlflow_tags

    record_file = run_dir / MLFLOW_FILE
    if req.resume and record_file.exists():
        try:
            tracking = json.loads(record_file.read_text())
            uri = tracking["tracking_uri"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"--resume: {record_file} cannot be read ({type(e).__name__}: {e})") from None
    else:
        tracking, uri = None, cfg.tracking.uri or default_tracking_uri(run_dir.parent)
    # first: a credential where it would be written is refused before any message could repeat it
    stored, job_env, real_uri = stored_config(cfg, uri)
    world = nodes * cfg.cluster.gpus_per_node
    plan = batch_plan(cfg, world)
    elastic_note = resume_world_note(cfg, run_dir, world) if req.resume else ""
    check_model(cfg)
    ds_json = deepspeed_config(cfg, plan)
    checks = {}
    for what, check in (("data", check_data),
                        ("init", lambda c: check_init(c, run_dir if req.resume else None))):
        try:
            checks[what] = check(cfg)
        except ConfigError as e:
            if not req.dry_run:
                raise
            checks[what] = f"NOT READABLE from here ({e})"
    data = checks["data"]
    stored.data.version = cfg.data.version  # pinned by check_data when the recipe said 0 (the newest)
    stored.model.multi_label = cfg.model.multi_label  # the dataset's kind, settled by check_data (null: the index's)
    # resolved by check_init: the ranks load the local path; the reference it came from is kept beside it
    stored.model.init, stored.model.init_source = cfg.model.init, cfg.model.init_source
    if not req.local and not req.dry_run:
        check_slurm()
    git = git_state()
    # the code the ranks run: a new run's snapshot (copied below), a resumed run's own (never copied again),
    # or, for a run directory made before snapshots, the live checkout
    if req.resume:
        try:
            code = code_path(run_dir)
        except SnapshotError as e:
            raise ConfigError(f"--resume: {e}") from None
        code_note = (f"live checkout {package_dir()}: this run directory predates code snapshots, so a change to "
                     f"the checkout changes the run") if code is None else f"snapshot {code} (made at launch)"
    else:
        code = run_dir / CODE_DIR
        code_note = f"snapshot of {package_dir()} to be copied to {code}"
    if code is not None and os.pathsep in str(code):  # PYTHONPATH would split it, and the checkout would run
        raise ConfigError(f"the run directory {run_dir} contains {os.pathsep!r}, which PYTHONPATH cannot hold: the "
                          f"ranks could not import the run's code snapshot; choose a runs_dir without it")
    executor_kind = "local" if req.local else "slurm"
    info: dict[str, Any] = {"run_dir": str(run_dir), "recipe": cfg.recipe, "nodes": nodes,
                            "gpus_per_node": cfg.cluster.gpus_per_node, "world_size": world,
                            "batch": plan.describe() + elastic_note, "executor": executor_kind, "data": data}
    if req.check_only:  # a sweep's members are all checked before any is created
        if not req.resume and run_dir.exists() and not req.dry_run:
            raise ConfigError(f"run directory {run_dir} exists: choose another --name")
        info.update(experiment=cfg.tracking.experiment or cfg.recipe, tracking_uri=real_uri, stored=stored,
                    budget=cfg.budget.gpu_hours, unit="gpu" if cfg.cluster.accelerator == "gpu" else "cpu-process")
        return info
    if req.dry_run:
        out(f"[dry run] nothing is written or submitted (an hf-hub:/s3:// model.init is fetched into its cache, "
            f"as launch would)\nrecipe      {cfg.recipe}: {stored.description}")
        out(f"run dir     {run_dir}\nworld       {nodes} node(s) x {cfg.cluster.gpus_per_node} = {world} rank(s); "
            f"{plan.describe()}{elastic_note}\ndata        {data}\ninit        {checks['init']}\n"
            f"executor    {executor_kind}")
        out(f"code        {code_note}")
        if job_env:
            out(f"secrets     {', '.join(sorted(job_env))}: passed to the job by environment, written nowhere")
        out("--- config.yaml\n" + dump(stored) + "--- deepspeed.json\n" + json.dumps(ds_json, indent=1))
        if not req.local:
            out("--- sbatch script (submitit)\n" + sbatch_script(stored, nodes, run_dir, code))
        info["deepspeed"] = ds_json
        return info
    created = False
    if req.resume:
        if not run_dir.is_dir():
            raise ConfigError(f"--resume {run_dir}: not a directory")
    else:
        if run_dir.exists():
            raise ConfigError(f"run directory {run_dir} exists: choose another --name, or continue it with "
                              f"--resume {run_dir}")
        try:
            run_dir.mkdir(parents=True)
        except OSError as e:
            raise ConfigError(f"cannot create the run directory {run_dir} ({e.strerror}); check runs_dir") from None
        created = True
    created_tracking = None  # an MLflow run made here, to mark FAILED if the submission fails
    try:
        for fname, text in req.files.items():  # before the MLflow run: a sweep member's names its parent
            (run_dir / fname).write_text(text)
        (run_dir / "config.yaml").write_text(dump(stored))
        (run_dir / "deepspeed.json").write_text(json.dumps(ds_json, indent=1))
        record_path = run_dir / "launch.json"
        record = json.loads(record_path.read_text()) if record_path.exists() else {
            "created": time.time(), "user": getpass.getuser(), "host": socket.gethostname(), "git": git,
            "recipe": cfg.recipe, "jobs": []}
        if not req.resume:
            try:
                record["code"] = snapshot_code(run_dir)
            except (OSError, SnapshotError) as e:
                raise ConfigError(f"cannot copy the code into {code} ({e}); check runs_dir") from None
            job_code = {"path": record["code"]["path"], "sha256": record["code"]["sha256"]}
            code_note = (f"snapshot {code} ({record['code']['files']} files, {record['code']['bytes'] // 1024} KiB,"
                         f" sha256 {record['code']['sha256'][:16]})")
        elif code is not None:
            digest = code_hash(code)[0]
            job_code = {"path": str(code), "sha256": digest}
            recorded = record["code"].get("sha256") if isinstance(record.get("code"), dict) else None
            code_note = f"snapshot {code} (sha256 {digest[:16]}" + (
                f"; EDITED since launch, which recorded {recorded[:16]})" if recorded and recorded != digest else ")")
        else:
            job_code = {"live": str(package_dir())}
        executor = None if req.hold else make_executor(stored, nodes, run_dir, req.local, code)
        if tracking is None:
            tracking = created_tracking = create_run(run_dir, real_uri, cfg.tracking.experiment or cfg.recipe,
                                                     cfg.name, redact(mlflow_tags(cfg, nodes, git)))
        if req.hold:  # a sweep member: the sweep submits the job array, then record_submission
            record_path.write_text(json.dumps(record, indent=1))
            info.update(held=True, mlflow=tracking, created_tracking=created_tracking, real_uri=real_uri,
                        code=job_code, code_dir=str(code) if code is not None else None, job_env=job_env,
                        stored=stored, resume=bool(req.resume))
            return info
        from pipeline.train.main import TrainJob

        # a local job's processes inherit this environment; a Slurm job gets the snapshot from its script
        with job_environment({**job_env, **rank_environment(code)} if req.local and code is not None else job_env):
            job = executor.submit(TrainJob(run_dir))
    except BaseException as e:
        undone = _undo_launch(run_dir, created, created_tracking, real_uri, e)
        if isinstance(e, (ConfigError, KeyboardInterrupt)):
            raise
        raise SubmissionError(f"the job could not be submitted: {redact_text(' '.join(str(e).split()))[-1500:]}"
                              f" ({undone or 'nothing to undo'})") from e
    record["jobs"].append(job_entry(job, executor_kind, nodes, cfg.cluster.gpus_per_node, git, bool(req.resume),
                                   job_env, job_code))
    record_path.write_text(json.dumps(record, indent=1))
    info.update(job_id=str(job.job_id), job=job, mlflow=tracking, code=job_code,
                logs=str(run_dir / "submitit" / str(job.job_id) / str(job.job_id)))
    out(f"submitted   job {job.job_id} ({executor_kind}, {nodes} node(s) x {cfg.cluster.gpus_per_node} rank(s))")
    out(f"run dir     {run_dir}\ncode        {code_note}\nbatch       {plan.describe()}{elastic_note}\n"
        f"data        {data}")
    if job_env:
        out(f"secrets     {', '.join(sorted(job_env))}: passed by environment; export them again to --resume")
    out(f"logs        {info['logs']}_<rank>_log.out")
    if tracking:
        shown = redact_text(tracking["tracking_uri"])
        out(f"mlflow      run {tracking['run_id']} in experiment {tracking['experiment']!r} at {shown}")
        if shown.startswith("sqlite:"):
            out(f"            UI: mlflow ui --backend-store-uri {shown} --host 127.0.0.1")
    else:
        out("mlflow      unavailable at launch; rank 0 logs to metrics.jsonl in the run directory")
    return info


def job_entry(job, executor_kind: str, nodes: int, gpus_per_node: int, git: dict[str, Any], resume: bool,
              job_env: dict[str, str], job_code: dict[str, str], **extra: Any) -> dict[str, Any]:
    """One submission as launch.json's ``jobs`` list records it."""
    return {"job_id": str(job.job_id), "submitted": time.time(), "executor": executor_kind, "nodes": nodes,
            "gpus_per_node": gpus_per_node, "argv": redact(list(sys.argv)), "git": git, "resume": resume,
            "secrets_by_environment": sorted(job_env), "code": job_code, **extra}


def record_submission(info: dict[str, Any], job) -> None:
    """After a sweep's job array was submitted: a held member's job in its launch.json (and ``info``)."""
    run_dir = Path(info["run_dir"])
    record_path = run_dir / "launch.json"
    record = json.loads(record_path.read_text())
    logs = Path(job.paths.folder) / str(job.job_id)
    record["jobs"].append(job_entry(job, info["executor"], info["nodes"], info["gpus_per_node"], record.get("git", {}),
                                    info["resume"], info["job_env"], info["code"], array=True, logs=str(logs)))
    record_path.write_text(json.dumps(record, indent=1))
    info.update(job_id=str(job.job_id), job=job, logs=str(logs))

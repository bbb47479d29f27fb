"""An ingest run: annotations + sources -> manifest -> plan against the last version -> one Ray task per
shard -> commit a new immutable dataset index -> quarantine report.

Runs on a local Ray (``ray.init``) or an existing cluster (``address`` / ``RAY_ADDRESS``), with a bounded
number of shards in flight and Ray's retries for workers that die. Two runs on one dataset are
excluded by a lease object in the dataset root (created only if absent, with an expiry, so a crashed
run's lease does not block forever); the second run says who holds it and exits cleanly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from pipeline.data.datasets import Manifest, read_diving48, read_howto100m, read_kinetics, read_ssv2
from pipeline.data.shards import DatasetIndex, ShardError, commit_index, index_key, index_versions, load_index
from pipeline.data.storage import Storage, StorageError, open_storage
from pipeline.ingest.plan import Plan, Source, make_plan
from pipeline.ingest.worker import TranscodeConfig, build_shard, sha256_file

log = logging.getLogger(__name__)
LEASE_KEY = "lease.json"


@dataclass
class IngestConfig:
    dataset: str
    format: str  # kinetics, ssv2, diving48, howto100m
    annotations: list[str]  # annotation files, as the format needs them
    source: str  # source videos: a directory, an s3:// prefix, or a .txt file list
    output: str  # dataset root: s3://bucket/prefix or a local directory
    split: str = "train"  # for formats whose files are per split (ssv2, diving48)
    samples_per_shard: int = 64
    transcode: TranscodeConfig = field(default_factory=TranscodeConfig)
    max_in_flight: int = 0  # shards at once; 0 = twice the cluster's CPUs
    lease_seconds: float = 6 * 3600

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> IngestConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
        d = dict(d)
        if isinstance(d.get("transcode"), dict):
            tknown = {f.name for f in fields(TranscodeConfig)}
            bad = sorted(set(d["transcode"]) - tknown)
            if bad:
                raise ValueError(f"{where}: unknown transcode key(s) {bad}; known: {sorted(tknown)}")
            d["transcode"] = TranscodeConfig(**d["transcode"])
        missing = [k for k in ("dataset", "format", "annotations", "source", "output") if k not in d]
        if missing:
            raise ValueError(f"{where}: missing required key(s) {missing}")
        if isinstance(d["annotations"], str):
            d["annotations"] = [d["annotations"]]
        return cls(**d)

    @classmethod
    def load(cls, path: str | None, overrides: list[str]) -> IngestConfig:
        d: dict[str, Any] = {}
        if path:
            with open(path) as f:
                d = yaml.safe_load(f) or {}
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"override {item!r}: expected key=value")
            target = d
            parts = key.split(".")
            for p in parts[:-1]:
                target = target.setdefault(p, {})
            target[parts[-1]] = yaml.safe_load(value)
        return cls.from_dict(d, where=path or "command line")


def read_manifest(cfg: IngestConfig) -> Manifest:
    a = cfg.annotations
    missing = [f for f in a if not Path(f).is_file()]
    if missing:
        raise ValueError(f"annotation file(s) not found: {missing} (config key 'annotations', or --annotations)")
    if cfg.format == "kinetics":
        return read_kinetics(a, dataset=cfg.dataset)
    if cfg.format == "ssv2":
        return read_ssv2(a[0], a[1], cfg.split)
    if cfg.format == "diving48":
        return read_diving48(a[0], cfg.split, a[1] if len(a) > 1 else None)
    if cfg.format == "howto100m":
        return read_howto100m(a[0], a[1], a[2] if len(a) > 2 else None)
    raise ValueError(f"format={cfg.format!r}: expected kinetics, ssv2, diving48 or howto100m")


def _source_index(source: str) -> tuple[dict[str, str], dict[str, str]]:
    """File name -> location, and location -> checksum when the listing gives one without reading the
    bytes (S3 ETag and size), for a local directory, an ``s3://`` prefix or a file list (``.txt``: one
    local path or ``s3://`` URI per line)."""
    if source.startswith("s3://"):
        storage = open_storage(source)
        storage.check()
        names, sums = {}, {}
        for obj in storage.list():
            uri = storage.uri(obj.key)
            names[Path(obj.key).name] = uri
            sums[uri] = f"s3:{obj.etag}:{obj.size}" if obj.etag else ""
        return names, sums
    path = Path(source)
    if path.is_file() and path.suffix == ".txt":
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        return {Path(ln).name: ln for ln in lines}, {}
    if path.is_dir():
        return {p.name: str(p) for p in path.iterdir() if p.is_file()}, {}
    raise ValueError(f"source {source}: expected a directory, an s3:// prefix or a .txt file list")


def _checksum(location: str, listed: dict[str, str]) -> str:
    if listed.get(location):
        return listed[location]  # S3: ETag + size change whenever the object does
    if location.startswith("s3://"):
        bucket, _, key = location[5:].partition("/")
        return "sha256:" + hashlib.sha256(open_storage(f"s3://{bucket}").get_bytes(key)).hexdigest()
    return sha256_file(location)


def resolve_sources(manifest: Manifest, source: str) -> tuple[list[Source], dict[str, dict[str, str]]]:
    """Each manifest entry's file and checksum; entries without a file go to the quarantine."""
    names, listed = _source_index(source)
    sources, missing = [], {}
    for e in manifest.entries:
        location = next((names[n] for n in e.filenames if n in names), None)
        if location is None:
            tried = ", ".join(e.filenames)
            missing[e.video_id] = {"sha256": "", "reason": f"source file not found in {source} (tried {tried})"}
            continue
        if not location.startswith("s3://") and not Path(location).exists():
            missing[e.video_id] = {"sha256": "", "reason": f"{location}: listed but does not exist"}
            continue
        sources.append(Source(e, location, _checksum(location, listed)))
    return sources, missing


# -- the lease -------------------------------------------------------------------------------------


def acquire_lease(storage: Storage, seconds: float) -> dict[str, Any]:
    lease = {"owner": f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}", "started": time.time(),
             "expires": time.time() + seconds}
    for _ in range(2):
        try:
            storage.put_bytes(LEASE_KEY, json.dumps(lease).encode(), if_absent=True)
            return lease
        except StorageError as e:
            if "already exists" not in str(e):
                raise
            held = json.loads(storage.get_bytes(LEASE_KEY))
            if held.get("expires", 0) > time.time() and not _holder_is_dead(held):
                raise LeaseHeldError(
                    f"another ingest run holds {storage.uri(LEASE_KEY)} (owner {held.get('owner')}, started "
                    f"{time.ctime(held.get('started', 0))}, expires {time.ctime(held['expires'])}); "
                    f"this run exits without changes. Delete the lease only if that run is dead.") from None
            storage.delete(LEASE_KEY)  # expired: the run that held it is gone
    raise LeaseHeldError(f"{storage.uri(LEASE_KEY)}: could not take the lease")


class LeaseHeldError(RuntimeError):
    pass


def _holder_is_dead(held: dict[str, Any]) -> bool:
    """A lease taken on this host by a process that no longer exists (killed, crashed) is stale."""
    host, _, rest = str(held.get("owner", "")).partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another host: only the expiry can tell
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def release_lease(storage: Storage, lease: dict[str, Any]) -> None:
    try:
        held = json.loads(storage.get_bytes(LEASE_KEY))
    except StorageError:
        return
    if held.get("owner") == lease["owner"]:
        storage.delete(LEASE_KEY)


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class IngestResult:
    version: int | None  # the committed version; None when nothing changed or a dry run
    plan: dict[str, Any]
    videos_in: int = 0
    videos_out: int = 0
    failed: int = 0
    bytes_in: int = 0
    seconds: float = 0.0
    quarantine: dict[str, dict[str, str]] = field(default_factory=dict)
    message: str = ""
    mlflow_run_id: str | None = None


def _build_all(plan: Plan, cfg: IngestConfig, ray_address: str | None, progress: bool) -> list[dict[str, Any]]:
    import ray
    from tqdm import tqdm

    started_here = not ray.is_initialized()
    if started_here:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep a local Ray on 127.0.0.1
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address=ray_address or os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False,
                 log_to_driver=False)
    try:
        # a worker that dies is retried by Ray; so is a task that hit a storage error (network, throttling)
        task = ray.remote(max_retries=3, retry_exceptions=[StorageError])(build_shard)
        limit = cfg.max_in_flight or max(2, int(2 * ray.cluster_resources().get("CPU", 1)))
        todo, running, results = list(plan.build), [], []
        bar = tqdm(total=len(todo), unit="shard", desc="ingest", disable=not progress)
        while todo or running:
            while todo and len(running) < limit:
                p = todo.pop(0)
                running.append(task.remote(p, cfg.output, cfg.dataset, cfg.transcode))
            done, running = ray.wait(running, num_returns=1)
            results.extend(ray.get(done))
            bar.update(len(done))
        bar.close()
        return results
    finally:
        if started_here:
            ray.shutdown()


def log_to_mlflow(cfg: IngestConfig, result: IngestResult, tracking_uri: str) -> str | None:
    """Params, metrics and the quarantine report of a committed ingest, as an MLflow run in the experiment
    ``ingest/<dataset>``. An unreachable tracking server is a warning, never an ingest failure."""
    try:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment(f"ingest/{cfg.dataset}")
        with mlflow.start_run(run_name=f"{cfg.dataset}-v{result.version}") as run:
            mlflow.log_params({"dataset": cfg.dataset, "version": result.version, "output": cfg.output,
                               "samples_per_shard": cfg.samples_per_shard,
                               **{f"transcode.{k}": v for k, v in asdict(cfg.transcode).items()}})
            mlflow.log_metrics({"videos_in": result.videos_in, "videos_out": result.videos_out,
                                "videos_failed": result.failed, "bytes_in": result.bytes_in,
                                "seconds": result.seconds,
                                "videos_per_s": result.videos_in / result.seconds if result.seconds else 0.0,
                                **{f"plan.{k}": v for k, v in result.plan.items()}})
            mlflow.log_dict(result.quarantine, "quarantine.json")
            return run.info.run_id
    except Exception as e:  # tracking must not undo a committed dataset version
        log.warning("could not log the ingest to MLflow at %s: %s", tracking_uri, e)
        return None


def run_ingest(cfg: IngestConfig, *, ray_address: str | None = None, dry_run: bool = False,
               progress: bool = True, tracking_uri: str | None = None) -> IngestResult:
    t0 = time.time()
    storage = open_storage(cfg.output)
    storage.check()
    manifest = read_manifest(cfg)
    sources, missing = resolve_sources(manifest, cfg.source)
    preprocessing = {"transcode": asdict(cfg.transcode)}

    def plan_now() -> tuple[DatasetIndex | None, Plan]:
        last = load_index(cfg.output)[0] if index_versions(storage) else None
        return last, make_plan(sources, preprocessing, cfg.samples_per_shard, last)

    if dry_run:
        _, plan = plan_now()
        return IngestResult(None, plan.summary(), videos_in=len(manifest.entries),
                            message=f"dry run: {plan.summary()}; {len(missing)} source file(s) missing")
    lease = acquire_lease(storage, cfg.lease_seconds)
    result = IngestResult(None, {}, videos_in=len(manifest.entries))
    try:
        last, plan = plan_now()  # under the lease: no other run can commit in between
        result.plan = plan.summary()
        new_missing = {k: v for k, v in missing.items() if last is None or k not in last.quarantine}
        if plan.is_noop and not new_missing:
            result.message = (f"nothing to do: version {last.version} is up to date ({last.num_samples()} videos)"
                              if last is not None else "nothing to do: the manifest lists no videos")
            return result
        built = _build_all(plan, cfg, ray_address, progress)
        quarantine = dict(missing)
        if last is not None:  # unchanged quarantined videos stay quarantined
            by_id = {s.entry.video_id: s for s in sources}
            quarantine.update({k: q for k, q in last.quarantine.items()
                               if k in by_id and by_id[k].sha256 == q.get("sha256")})
        shards = list(plan.keep)
        for r in built:
            quarantine.update(r["quarantine"])
            result.bytes_in += r["stats"]["bytes_in"]
            if r["shard"] is not None:
                shards.append(r["shard"])
        in_shards = {k for s in shards for k in s.keys}
        checksums = {s.entry.video_id: s.sha256 for s in sources if s.entry.video_id in in_shards}
        version = (last.version + 1) if last is not None else 1
        index = DatasetIndex(cfg.dataset, version, manifest.classes, preprocessing, shards,
                             source_checksums=checksums, quarantine=quarantine)
        commit_index(storage, index)  # last: readers see the new version only now
        storage.put_bytes(f"reports/v{version:06d}-quarantine.json", json.dumps(quarantine, indent=1).encode())
        result.version, result.quarantine = version, quarantine
        result.videos_out, result.failed = len(in_shards), len(quarantine)
        result.message = (f"committed {storage.uri(index_key(version))}: {len(in_shards)} videos in {len(shards)} "
                          f"shards ({len(plan.keep)} kept), {len(quarantine)} quarantined")
        return result
    finally:
        release_lease(storage, lease)
        result.seconds = time.time() - t0
        tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if tracking_uri and result.version is not None:
            result.mlflow_run_id = log_to_mlflow(cfg, result, tracking_uri)


__all__ = ["IngestConfig", "IngestResult", "LeaseHeldError", "run_ingest", "ShardError"]

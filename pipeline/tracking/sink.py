"""Where rank 0's metrics go: one small interface, a JSON-lines file in the run directory (always) and
MLflow behind it. An unreachable MLflow server never stops training: calls that fail are kept in a
buffer and retried on the next call, with a warning. While the MLflow sink is open, MLflow's own
system-metrics monitor samples the host (CPU, memory, disk, network and, with ``nvidia-ml-py``, each GPU's
utilisation, memory and power) and its numbers go through the same buffer.

The MLflow run is created at launch (``create_run``) and its id kept in ``<run_dir>/mlflow.json``, so a
requeued or resumed job continues the same run. Training and ingest set MLflow up the same way
(``mlflow_client``, ``experiment_id``): an sqlite store keeps its artifacts in ``mlartifacts/`` next to the
database file, never in ``./mlruns`` of whatever directory the process started in."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from pipeline.secrets import redact, redact_text, reveal_uri

log = logging.getLogger(__name__)
MLFLOW_FILE = "mlflow.json"


def default_tracking_uri(runs_dir: str | Path) -> str:
    """$MLFLOW_TRACKING_URI, else an sqlite file next to the run directories (the embedded default)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(runs_dir).resolve() / 'mlflow.db'}"


ARTIFACTS_DIR = "mlartifacts"


def artifact_root(tracking_uri: str) -> str | None:
    """Where a new experiment of ``tracking_uri`` keeps its artifacts: for an sqlite store,
    ``mlartifacts/`` next to the database file (MLflow's own default, ``./mlruns``, is relative to the
    current directory, so a run started from the repository would write into it). None where the store
    decides: a tracking server (its ``--default-artifact-root`` or ``--artifacts-destination``) and a file
    store (inside its own directory)."""
    if not tracking_uri.startswith("sqlite:"):
        return None
    path = tracking_uri[len("sqlite:"):].split("?", 1)[0]
    if not path.startswith("///") or path in ("///", "///:memory:"):
        return None  # in memory: nothing to put artifacts next to
    return (Path(path[3:]).resolve().parent / ARTIFACTS_DIR).as_uri()


def mlflow_client(tracking_uri: str):
    """An MLflow client for ``tracking_uri`` that fails fast (our callers retry, or give up with a warning)
    and takes a redacted URI's credentials from $MLFLOW_TRACKING_URI (``reveal_uri``)."""
    quick_failing_http()
    from mlflow.tracking import MlflowClient

    return MlflowClient(reveal_uri(tracking_uri))


def experiment_id(client, tracking_uri: str, name: str) -> str:
    """The id of experiment ``name``, created when missing with its artifacts where ``artifact_root`` says.
    Two processes creating it at once (two launches, an ingest and a launch) both get the one that won."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root(tracking_uri))
    except Exception:
        exp = client.get_experiment_by_name(name)  # created by another process in between
        if exp is None:
            raise
        return exp.experiment_id


def create_run(run_dir: Path, tracking_uri: str, experiment: str, run_name: str,
               tags: dict[str, str]) -> dict[str, str] | None:
    """Create the MLflow run of a training run (at launch) and record it in the run directory.
    Returns the record, or None (with a warning) when the server cannot be reached. The record keeps
    the URI without its credentials (``user:***@``); ``MLflowSink`` finds them in $MLFLOW_TRACKING_URI."""
    shown = redact_text(tracking_uri)
    tags = {**sweep_tags(run_dir), **tags}
    try:
        client = mlflow_client(tracking_uri)
        exp_id = experiment_id(client, tracking_uri, experiment)
        run = client.create_run(exp_id, run_name=run_name, tags=redact(dict(tags)))
    except Exception as e:  # tracking must never block a launch
        log.warning("MLflow at %s not reachable (%s); the run starts without it and retries from rank 0",
                    shown, redact_text(str(e)))
        return None
    record = {"tracking_uri": shown, "experiment": experiment, "experiment_id": exp_id,
              "run_id": run.info.run_id, "run_name": run_name}
    (Path(run_dir) / MLFLOW_FILE).write_text(json.dumps(record, indent=1))
    return record


SWEEP_MEMBER_FILE = "sweep_member.json"  # written by a sweep's launch (pipeline.train.sweep.MEMBER_FILE)


def sweep_tags(run_dir: str | Path) -> dict[str, str]:
    """A sweep member's run is a child of the sweep's parent run (MLflow's ``mlflow.parentRunId`` tag), whether
    launch creates it or rank 0 does later; {} for a run outside a sweep."""
    path = Path(run_dir) / SWEEP_MEMBER_FILE
    try:
        member = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        member = None
    if not isinstance(member, dict):
        return {}
    tags = {"sweep": str(member.get("sweep", "")), "sweep_member": str(member.get("index", ""))}
    if member.get("parent_run_id"):
        tags["mlflow.parentRunId"] = str(member["parent_run_id"])
    return tags


class JsonlSink:
    """``metrics.jsonl`` in the run directory: one line per logged step, appended across requeues."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def set_running(self) -> None:
        pass

    def log_dataset(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self, status: str | None = "FINISHED") -> None:
        pass


class MLflowSink:
    """Rank 0's MLflow client for one run. Calls are queued and delivered by a background thread, so a
    slow or unreachable server never holds up a training step; failed deliveries are retried with
    backoff (the queue keeps their order), warned about once a minute, and flushed on close.

    ``system_metrics`` is the sampling interval in seconds of MLflow's system-metrics monitor for this run
    (``SystemMetrics``; $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it, as everywhere in MLflow),
    None for none; $MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false turns it off too."""

    def __init__(self, record: dict[str, str], max_buffer: int = 100_000, flush_timeout: float = 60.0,
                 system_metrics: float | None = 10.0) -> None:
        import queue
        import threading

        self.client = mlflow_client(record["tracking_uri"])  # credentials: from the environment
        self.tracking_uri = reveal_uri(record["tracking_uri"])
        self.run_id = record["run_id"]
        self.uri = redact_text(record["tracking_uri"])  # for log lines
        self.queue: queue.Queue = queue.Queue(maxsize=max_buffer)
        self.flush_timeout = flush_timeout
        self.warned_at = 0.0
        self.failures = 0
        self.thread = threading.Thread(target=self._deliver, name="mlflow-sink", daemon=True)
        self.thread.start()
        off = os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").strip().lower() in ("false", "0", "no")
        self.system = SystemMetrics(self, system_metrics) if system_metrics and not off else None

    def _deliver(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            fn, args = item
            delay = 1.0
            while True:
                try:
                    getattr(self, f"_{fn}")(*args)
                    break
                except Exception as e:  # noqa: BLE001 -- the server is down or refused: retry, never raise
                    self.failures += 1
                    if time.time() - self.warned_at > 60:
                        log.warning("MLflow at %s unavailable (%s); %d call(s) queued, retrying (metrics.jsonl in "
                                    "the run directory has every number)", self.uri, redact_text(str(e)),
                                    self.queue.qsize() + 1)
                        self.warned_at = time.time()
                    if self._closing and time.time() > self._deadline:
                        return
                    time.sleep(delay)
                    delay = min(delay * 2, 30.0)

    _closing = False
    _deadline = 0.0

    def _call(self, name: str, *args) -> None:
        import queue

        try:
            self.queue.put_nowait((name, args))
        except queue.Full:
            log.warning("MLflow queue full (%d calls): dropping %s; metrics.jsonl keeps everything",
                        self.queue.maxsize, name)

    def _metrics(self, metrics: dict[str, float], step: int, timestamp_ms: int) -> None:
        from mlflow.entities import Metric

        items = [Metric(k, float(v), timestamp_ms, step) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def _params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        # credentials never reach MLflow: secret-named keys and URI passwords become *** (cluster.env, tracking.uri)
        items = [Param(k, str(v)[:6000]) for k, v in redact(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def _tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in redact(tags).items()])

    def _artifact(self, path: str, artifact_path: str | None) -> None:
        self.client.log_artifact(self.run_id, path, artifact_path)

    def _dataset(self, name: str, digest: str, source: str, context: str, tags: dict[str, str]) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        tags = {"mlflow.data.context": context, **tags}
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(
            Dataset(name=name, digest=digest, source_type="pipeline-dataset-index", source=redact_text(source)),
            tags=[InputTag(k, str(v)) for k, v in tags.items()])])

    def _terminate(self, status: str) -> None:
        if status == "KILLED" and self.client.get_run(self.run_id).info.status == "FAILED":
            return  # a rank died first and said so; the cancel that followed does not hide it
        self.client.set_terminated(self.run_id, status)

    def _running(self) -> None:
        self.client.update_run(self.run_id, status="RUNNING")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        # stamped now: numbers delivered late (a server that was down) keep the time they were measured
        self._call("metrics", dict(metrics), step, int(time.time() * 1000))

    def log_params(self, params: dict[str, Any]) -> None:
        self._call("params", dict(params))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._call("tags", dict(tags))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._call("artifact", str(path), artifact_path)

    def set_running(self) -> None:
        """The run is going again (a resumed or requeued job): RUNNING, whatever an earlier attempt left."""
        self._call("running")

    def log_dataset(self, name: str, digest: str, source: str, context: str = "train",
                    tags: dict[str, str] | None = None) -> None:
        """The dataset version a run reads, as an MLflow input (the UI's Datasets column): name, digest,
        source and how it is used (``context``: train, validation, test)."""
        self._call("dataset", name, digest, source, context, dict(tags or {}))

    def close(self, status: str | None = "FINISHED") -> None:
        """Stop the system-metrics monitor (its last sample is queued), deliver what is queued, then stop
        the thread: ``flush_timeout`` seconds for all of it. ``status`` None leaves the run open (a requeued
        job continues it)."""
        deadline = time.time() + self.flush_timeout
        if self.system is not None:
            self.system.stop(self.flush_timeout)
        if status is not None:
            self._call("terminate", status)
        self._closing, self._deadline = True, deadline
        self.queue.put(None)
        self.thread.join(max(0.0, deadline - time.time()) + 5)
        left = self.queue.qsize()
        if self.thread.is_alive() or left:
            log.warning("MLflow at %s: %d call(s) not delivered before exit; metrics.jsonl in the run directory "
                        "has the numbers", self.uri, left)


class SystemMetrics:
    """MLflow's system-metrics monitor (``mlflow.system_metrics``) for the sink's run: every ``interval``
    seconds a sample of the host, averaged over ``samples_before_logging`` samples and logged as MLflow
    names it: ``system/cpu_utilization_percentage``, ``system/system_memory_usage_megabytes`` and
    ``_percentage``, ``system/disk_usage_percentage``, ``_megabytes``, ``system/disk_available_megabytes``,
    ``system/network_receive_megabytes``, ``system/network_transmit_megabytes`` and, where ``nvidia-ml-py``
    finds NVIDIA GPUs, ``system/gpu_<i>_utilization_percentage``, ``system/gpu_<i>_memory_usage_percentage``,
    ``_megabytes``, ``system/gpu_<i>_power_usage_watts``, ``_percentage`` for each GPU of the host
    ($MLFLOW_SYSTEM_METRICS_NODE_ID adds ``<node>/`` after ``system/``). Steps count samples logged,
    continuing a resumed run's (MLflow's ``resume_logging``).

    MLflow measures; delivery is the sink's: the numbers go through its queue, so a server that is down
    costs the sampling thread nothing and loses nothing (MLflow's own loop calls the server at every sample
    and stops for good at the first failure). ``stop`` takes one last sample, so even a short run has one."""

    def __init__(self, sink: MLflowSink, interval: float, samples_before_logging: int = 1) -> None:
        import threading

        self.sink = sink
        self.monitor = None  # built on the thread: resuming asks the server for the run's last step
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, args=(interval, samples_before_logging),
                                       name="mlflow-system-metrics", daemon=True)
        self.thread.start()

    def _build(self, interval: float, samples_before_logging: int):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        kwargs = {"sampling_interval": interval, "samples_before_logging": samples_before_logging,
                  "tracking_uri": self.sink.tracking_uri}
        try:
            monitor = SystemMetricsMonitor(self.sink.run_id, resume_logging=True, **kwargs)
        except Exception:  # noqa: BLE001 -- no server to say where the last attempt stopped: count from 0
            monitor = SystemMetricsMonitor(self.sink.run_id, **kwargs)
        monitor.mlflow_logger = _QueuedMetrics(self.sink)  # publish_metrics logs through the sink's queue
        return monitor

    def _watch(self, interval: float, samples_before_logging: int) -> None:
        try:
            monitor = self.monitor = self._build(interval, samples_before_logging)
            taken = 0
            while not self._stop.wait(float(monitor.sampling_interval)):
                monitor.collect_metrics()
                taken += 1
                if taken >= int(monitor.samples_before_logging):
                    monitor.publish_metrics(monitor.aggregate_metrics())  # averages, queues, clears
                    taken = 0
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
        except Exception as e:  # noqa: BLE001 -- the host's numbers are extras: training goes on without them
            log.warning("MLflow system metrics stopped for run %s: %s", self.sink.run_id, redact_text(str(e)))

    def stop(self, timeout: float = 30.0) -> None:
        """Take the last sample, queue it and end the thread (waiting up to ``timeout`` seconds)."""
        self._stop.set()
        self.thread.join(timeout)
        if self.thread.is_alive():
            log.warning("MLflow system metrics for run %s did not stop within %.0f s (the server is slow to "
                        "answer); left to end with the process", self.sink.run_id, timeout)


class _QueuedMetrics:
    """Stands in for the monitor's ``BatchMetricsLogger``: what ``SystemMetricsMonitor.publish_metrics``
    records goes to the sink's queue."""

    def __init__(self, sink: MLflowSink) -> None:
        self.sink = sink

    def record_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.sink.log_metrics(metrics, step or 0)

    def flush(self) -> None:
        pass


def quick_failing_http() -> None:
    """MLflow's HTTP client retries a refused call for minutes by default; our sink retries on its own."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


class Sinks:
    """Fan out to several sinks (rank 0); on other ranks, an empty list makes every call a no-op."""

    def __init__(self, sinks: list) -> None:
        self.sinks = sinks
        self.closed = False

    @property
    def tracks_mlflow(self) -> bool:
        return any(isinstance(s, MLflowSink) for s in self.sinks)

    def close(self, status: str | None = "FINISHED") -> None:
        for s in self.sinks:
            s.close(status)
        self.closed = True

    def __getattr__(self, name: str):
        def call(*args, **kwargs):
            for s in self.sinks:
                getattr(s, name)(*args, **kwargs)
        return call


def open_sinks(run_dir: Path, is_main: bool) -> Sinks:
    if not is_main:
        return Sinks([])
    sinks: list = [JsonlSink(run_dir)]
    record_path = Path(run_dir) / MLFLOW_FILE
    if record_path.exists():
        try:
            sinks.append(MLflowSink(json.loads(record_path.read_text())))
        except Exception as e:
            log.warning("MLflow sink unavailable (%s); metrics go to metrics.jsonl only", redact_text(str(e)))
    return Sinks(sinks)


def end_run(run_dir: str | Path, status: str, tags: dict[str, str] | None = None,
            keep_failed: bool = True) -> bool:
    """Mark the MLflow run of ``run_dir`` (its ``mlflow.json``) ended with ``status`` (FAILED, KILLED) from
    a process without open sinks: a rank other than 0, or rank 0 before it opened them. A run already
    FAILED stays FAILED when ``keep_failed`` (a cancel after a crash does not hide the crash). Returns
    whether the server took it; a server that cannot be reached is warned about, never raised."""
    record_path = Path(run_dir) / MLFLOW_FILE
    if not record_path.exists():
        return False
    try:
        record = json.loads(record_path.read_text())
        from mlflow.entities import RunTag

        client = mlflow_client(record["tracking_uri"])  # as MLflowSink: credentials from the environment
        current = client.get_run(record["run_id"]).info.status
        if current == "FINISHED":  # rank 0 finished it (test, export, result): a rank failing after that, in
            return True            # the last barrier, does not undo a complete run
        if tags:
            client.log_batch(record["run_id"], tags=[RunTag(k, str(v)[:5000]) for k, v in redact(tags).items()])
        if keep_failed and current == "FAILED":
            return True
        client.set_terminated(record["run_id"], status)
    except Exception as e:  # noqa: BLE001 -- ending a run must never mask the error that ended it
        log.warning("could not mark the MLflow run of %s %s (%s); it may show RUNNING", run_dir, status,
                    redact_text(str(e)))
        return False
    return True


def mlflow_tags(cfg: Any, nodes: int, git: dict[str, Any]) -> dict[str, str]:
    """A run's MLflow tags: what it trains (recipe, model, clip), on what, from which commit."""
    from pipeline.models.registry import family_of, flops_per_view, model_config, parameter_count

    mc = model_config(cfg)
    # the inference cost of one test view (the test protocol's size: a 3D CNN tests at 256 after training at 224)
    test_gflops = flops_per_view(mc, img_size=cfg.test.crop or cfg.data.crop)
    # the attention scheme is a TimeSformer's; a 3D CNN's "attention" column says what it is instead
    scheme = getattr(cfg.model, "attention_type", None) or family_of(mc).name
    return {"recipe": cfg.recipe, "variant": cfg.model.variant, "family": family_of(mc).name,
            "attention_type": scheme,
            "frames": str(cfg.data.num_frames), "sampling_rate": str(cfg.data.sampling_rate),
            "resolution": str(cfg.data.crop), "nodes": str(nodes), "gpus_per_node": str(cfg.cluster.gpus_per_node),
            "accelerator": cfg.cluster.accelerator, "git_sha": git.get("sha", ""),
            "params": str(parameter_count(mc)), "gflops_per_view": f"{test_gflops / 1e9:.4g}",
            "mlflow.note.content": cfg.description}

"""Where rank 0's metrics go: one small interface, a JSON-lines file in the run directory (always) and
MLflow behind it. An unreachable MLflow server never stops training: calls that fail are kept in a
buffer and retried on the next call, with a warning.

The MLflow run is created at launch (``create_run``) and its id kept in ``<run_dir>/mlflow.json``, so a
requeued or resumed job continues the same run."""

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


def _experiment_id(client, name: str, artifact_root: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root)


def create_run(run_dir: Path, tracking_uri: str, experiment: str, run_name: str,
               tags: dict[str, str]) -> dict[str, str] | None:
    """Create the MLflow run of a training run (at launch) and record it in the run directory.
    Returns the record, or None (with a warning) when the server cannot be reached. The record keeps
    the URI without its credentials (``user:***@``); ``MLflowSink`` finds them in $MLFLOW_TRACKING_URI."""
    shown = redact_text(tracking_uri)
    try:
        tracking_uri = reveal_uri(tracking_uri)
        _quick_failing_http()
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri)
        artifact_root = None
        if tracking_uri.startswith("sqlite:") or tracking_uri.startswith("file:"):
            artifact_root = (Path(run_dir).resolve().parent / "mlartifacts").as_uri()
        exp_id = _experiment_id(client, experiment, artifact_root)
        run = client.create_run(exp_id, run_name=run_name, tags=redact(dict(tags)))
    except Exception as e:  # tracking must never block a launch
        log.warning("MLflow at %s not reachable (%s); the run starts without it and retries from rank 0",
                    shown, redact_text(str(e)))
        return None
    record = {"tracking_uri": shown, "experiment": experiment, "experiment_id": exp_id,
              "run_id": run.info.run_id, "run_name": run_name}
    (Path(run_dir) / MLFLOW_FILE).write_text(json.dumps(record, indent=1))
    return record


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

    def close(self, status: str | None = "FINISHED") -> None:
        pass


class MLflowSink:
    """Rank 0's MLflow client for one run. Calls are queued and delivered by a background thread, so a
    slow or unreachable server never holds up a training step; failed deliveries are retried with
    backoff (the queue keeps their order), warned about once a minute, and flushed on close."""

    def __init__(self, record: dict[str, str], max_buffer: int = 100_000, flush_timeout: float = 60.0) -> None:
        import queue
        import threading

        _quick_failing_http()
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(reveal_uri(record["tracking_uri"]))  # credentials: from the environment
        self.run_id = record["run_id"]
        self.uri = redact_text(record["tracking_uri"])  # for log lines
        self.queue: queue.Queue = queue.Queue(maxsize=max_buffer)
        self.flush_timeout = flush_timeout
        self.warned_at = 0.0
        self.failures = 0
        self.thread = threading.Thread(target=self._deliver, name="mlflow-sink", daemon=True)
        self.thread.start()

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

    def _metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
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

    def _terminate(self, status: str) -> None:
        if status == "KILLED" and self.client.get_run(self.run_id).info.status == "FAILED":
            return  # a rank died first and said so; the cancel that followed does not hide it
        self.client.set_terminated(self.run_id, status)

    def _running(self) -> None:
        self.client.update_run(self.run_id, status="RUNNING")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._call("metrics", dict(metrics), step)

    def log_params(self, params: dict[str, Any]) -> None:
        self._call("params", dict(params))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._call("tags", dict(tags))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._call("artifact", str(path), artifact_path)

    def set_running(self) -> None:
        """The run is going again (a resumed or requeued job): RUNNING, whatever an earlier attempt left."""
        self._call("running")

    def close(self, status: str | None = "FINISHED") -> None:
        """Deliver what is queued (up to ``flush_timeout`` seconds), then stop the thread. ``status`` None
        leaves the run open (a requeued job continues it)."""
        if status is not None:
            self._call("terminate", status)
        self._closing, self._deadline = True, time.time() + self.flush_timeout
        self.queue.put(None)
        self.thread.join(self.flush_timeout + 5)
        left = self.queue.qsize()
        if self.thread.is_alive() or left:
            log.warning("MLflow at %s: %d call(s) not delivered before exit; metrics.jsonl in the run directory "
                        "has the numbers", self.uri, left)


def _quick_failing_http() -> None:
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
        _quick_failing_http()
        from mlflow.entities import RunTag
        from mlflow.tracking import MlflowClient

        client = MlflowClient(reveal_uri(record["tracking_uri"]))  # as MLflowSink: credentials from the environment
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
    from pipeline.models.flops import flops_per_view, parameter_count
    from pipeline.models.timesformer import model_config

    mc = model_config(cfg)
    return {"recipe": cfg.recipe, "variant": cfg.model.variant, "attention_type": cfg.model.attention_type,
            "frames": str(cfg.data.num_frames), "sampling_rate": str(cfg.data.sampling_rate),
            "resolution": str(cfg.data.crop), "nodes": str(nodes), "gpus_per_node": str(cfg.cluster.gpus_per_node),
            "accelerator": cfg.cluster.accelerator, "git_sha": git.get("sha", ""),
            "params": str(parameter_count(mc)), "gflops_per_view": f"{flops_per_view(mc) / 1e9:.2f}",
            "mlflow.note.content": cfg.description}

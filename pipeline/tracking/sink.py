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
    Returns the record, or None (with a warning) when the server cannot be reached."""
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri)
        artifact_root = None
        if tracking_uri.startswith("sqlite:") or tracking_uri.startswith("file:"):
            artifact_root = (Path(run_dir).resolve().parent / "mlartifacts").as_uri()
        exp_id = _experiment_id(client, experiment, artifact_root)
        run = client.create_run(exp_id, run_name=run_name, tags=tags)
    except Exception as e:  # tracking must never block a launch
        log.warning("MLflow at %s not reachable (%s); the run starts without it and retries from rank 0",
                    tracking_uri, e)
        return None
    record = {"tracking_uri": tracking_uri, "experiment": experiment, "experiment_id": exp_id,
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

    def close(self, status: str = "FINISHED") -> None:
        pass


class MLflowSink:
    """Rank 0's MLflow client for one run; failed calls are buffered and replayed, never raised."""

    def __init__(self, record: dict[str, str], max_buffer: int = 100_000) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(record["tracking_uri"])
        self.run_id = record["run_id"]
        self.uri = record["tracking_uri"]
        self.pending: list[tuple[str, tuple, dict]] = []
        self.max_buffer = max_buffer
        self.warned_at = 0.0

    def _call(self, name: str, *args, **kwargs) -> None:
        self.pending.append((name, args, kwargs))
        if len(self.pending) > self.max_buffer:
            self.pending = self.pending[-self.max_buffer:]
        while self.pending:
            fn, a, kw = self.pending[0]
            try:
                getattr(self, f"_{fn}")(*a, **kw)
            except Exception as e:
                if time.time() - self.warned_at > 60:
                    log.warning("MLflow at %s unavailable (%s); %d call(s) buffered, retrying on the next one",
                                self.uri, e, len(self.pending))
                    self.warned_at = time.time()
                return
            self.pending.pop(0)

    def _metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def _params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def _tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def _artifact(self, path: str, artifact_path: str | None) -> None:
        self.client.log_artifact(self.run_id, path, artifact_path)

    def _terminate(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._call("metrics", metrics, step)

    def log_params(self, params: dict[str, Any]) -> None:
        self._call("params", params)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._call("tags", tags)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._call("artifact", str(path), artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        self._call("terminate", status)
        if self.pending:
            log.warning("MLflow at %s: %d call(s) could not be delivered; metrics.jsonl in the run directory "
                        "has the numbers", self.uri, len(self.pending))


class Sinks:
    """Fan out to several sinks (rank 0); on other ranks, an empty list makes every call a no-op."""

    def __init__(self, sinks: list) -> None:
        self.sinks = sinks

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
            log.warning("MLflow sink unavailable (%s); metrics go to metrics.jsonl only", e)
    return Sinks(sinks)

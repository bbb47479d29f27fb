"""The metric sink never holds up training: an unreachable MLflow server costs nothing per step."""

from __future__ import annotations

import json
import logging
import socket
import time

from pipeline.tracking.sink import JsonlSink, MLflowSink, Sinks, create_run


def closed_port_uri() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there once the socket is closed


def test_an_unreachable_server_is_queued_warned_about_and_never_raises(tmp_path, caplog):
    uri = closed_port_uri()
    t0 = time.time()
    assert create_run(tmp_path, uri, "exp", "run", {}) is None  # the launch goes on without it
    assert time.time() - t0 < 30 and not (tmp_path / "mlflow.json").exists()
    caplog.set_level(logging.WARNING)
    sink = MLflowSink({"tracking_uri": uri, "run_id": "0" * 32}, flush_timeout=1.0)
    sinks = Sinks([JsonlSink(tmp_path), sink])
    t0 = time.time()
    for step in range(200):
        sinks.log_metrics({"loss": 1.0 / (step + 1)}, step)
    assert time.time() - t0 < 1.0  # a training step never waits for the server
    t0 = time.time()
    sinks.close("FINISHED")
    assert time.time() - t0 < 10
    assert "unavailable" in caplog.text and uri in caplog.text
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 200 and json.loads(lines[-1])["step"] == 199  # the numbers are kept locally

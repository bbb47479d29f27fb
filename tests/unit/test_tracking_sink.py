"""The metric sink never holds up training: an unreachable MLflow server costs nothing per step."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.tracking.sink import JsonlSink, MLflowSink, Sinks, artifact_root, create_run, end_run
from tests.synthetic_data import write_dataset


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
    assert not live_threads()  # the system-metrics monitor ended with the sink, server or not


def live_threads() -> list[str]:
    """The sink's threads still running: its delivery thread and the system-metrics monitor."""
    return [t.name for t in threading.enumerate() if t.name in ("mlflow-sink", "mlflow-system-metrics")]


# -- MLflow's system metrics, and one MLflow setup for training and ingest -----------------------------

def test_the_sink_logs_mlflows_system_metrics_for_its_run_and_stops_the_monitor_on_close(tmp_path, monkeypatch):
    """MLflow's monitor samples the host for the sink's run (its names, its steps), through the sink's
    queue; close takes a last sample and leaves no thread; a resumed run's samples continue its steps."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # nothing may land in the current directory (./mlruns, ./mlflow.db)
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", raising=False)
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", raising=False)
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_NODE_ID", raising=False)
    store = tmp_path / "store"
    run_dir = store / "run"
    run_dir.mkdir(parents=True)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    record = create_run(run_dir, uri, "system", "r", {})
    sink = MLflowSink(record, system_metrics=0.05)
    assert "mlflow-system-metrics" in live_threads()
    t0 = time.time()
    for step in range(50):
        sink.log_metrics({"loss": 1.0}, step)
    assert time.time() - t0 < 0.5  # the monitor costs a step nothing
    time.sleep(0.6)
    sink.close("FINISHED")
    assert not live_threads()
    client = MlflowClient(uri)
    metrics = client.get_run(record["run_id"]).data.metrics
    for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
                "system/system_memory_usage_percentage", "system/disk_usage_percentage",
                "system/disk_available_megabytes", "system/network_receive_megabytes"):
        assert key in metrics, sorted(metrics)
    assert 0 <= metrics["system/system_memory_usage_percentage"] <= 100
    steps = [m.step for m in client.get_metric_history(record["run_id"], "system/cpu_utilization_percentage")]
    assert len(steps) >= 3 and steps == list(range(len(steps)))  # one per interval, and the last at close
    # a requeued job's sink continues the same run: its samples follow the first attempt's
    sink = MLflowSink(record, system_metrics=0.05)
    sink.set_running()
    time.sleep(0.3)
    sink.close("FINISHED")
    later = [m.step for m in client.get_metric_history(record["run_id"], "system/cpu_utilization_percentage")]
    assert later[:len(steps)] == steps and len(later) > len(steps) and min(later[len(steps):]) == len(steps)
    # MLflow's switch turns it off; so does system_metrics=None
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    sink = MLflowSink(record)
    assert sink.system is None and "mlflow-system-metrics" not in live_threads()
    sink.close(None)
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING")
    sink = MLflowSink(record, system_metrics=None)
    assert sink.system is None
    sink.close(None)
    assert not live_threads()
    # the run's experiment keeps its artifacts next to the store, as the ingest's do
    exp = client.get_experiment(record["experiment_id"])
    assert exp.artifact_location == (store / "mlartifacts").as_uri()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_the_artifact_root_of_a_store(tmp_path):
    assert artifact_root(f"sqlite:///{tmp_path / 'm.db'}") == (tmp_path / "mlartifacts").as_uri()
    assert artifact_root(f"sqlite:///{tmp_path / 'm.db'}?timeout=30") == (tmp_path / "mlartifacts").as_uri()
    assert artifact_root("sqlite:///m.db") == (Path.cwd() / "mlartifacts").as_uri()  # relative: as sqlite reads it
    assert artifact_root("sqlite://") is None and artifact_root("sqlite:///:memory:") is None
    assert artifact_root("http://127.0.0.1:5000") is None  # the server's own artifact root
    assert artifact_root(str(tmp_path / "mlruns")) is None and artifact_root((tmp_path / "x").as_uri()) is None


def ingest_logged(tmp_path: Path, tracking_uri: str):
    from pipeline.ingest.run import IngestConfig, IngestResult, log_to_mlflow

    cfg = IngestConfig(dataset="toy", format="kinetics", output=str(tmp_path / "out"))
    result = IngestResult(3, {"build": 2, "keep": 1}, videos_in=12, videos_out=9, failed=3, seconds=2.0,
                          quarantine={"v1": {"reason": "truncated", "kind": "content"}})
    return log_to_mlflow(cfg, result, tracking_uri)


def test_an_ingest_is_set_up_in_mlflow_as_a_training_run_is(tmp_path, monkeypatch, caplog):
    """The ingest's run: in ``ingest/<dataset>`` with its artifacts next to an sqlite store (before:
    ./mlruns in whatever directory the ingest started in), FINISHED; an unreachable server is one warning
    without credentials, fast."""
    from mlflow.tracking import MlflowClient

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    run_id = ingest_logged(tmp_path, uri)
    assert run_id is not None
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "toy-v3"
    assert run.data.metrics["videos_failed"] == 3 and run.data.metrics["videos_per_s"] == 6.0
    assert run.data.metrics["plan.build"] == 2 and run.data.params["version"] == "3"
    assert run.data.tags["kind"] == "ingest"
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "ingest/toy" and exp.artifact_location == (tmp_path / "store" / "mlartifacts").as_uri()
    quarantine = tmp_path / "store" / "mlartifacts" / run_id / "artifacts" / "quarantine.json"
    assert run.info.artifact_uri == quarantine.parent.as_uri()
    assert json.loads(quarantine.read_text()) == {"v1": {"reason": "truncated", "kind": "content"}}
    assert list(cwd.iterdir()) == []  # no ./mlruns
    assert ingest_logged(tmp_path, uri) != run_id  # the experiment exists now: found, not created again
    caplog.set_level(logging.WARNING)
    t0 = time.time()
    down = closed_port_uri().replace("http://", "http://ingest:s3cret-pw@")
    assert ingest_logged(tmp_path, down) is None
    assert time.time() - t0 < 30 and "could not log the ingest" in caplog.text and "s3cret-pw" not in caplog.text


# -- how a run ends: FINISHED, FAILED, KILLED, in a real (sqlite) MLflow store --------------------------

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("colour")
    write_dataset(str(root), "colour", per_class={"train": 1, "val": 1})
    return root


def prepared_run(tmp_path: Path, data: Path, name: str, *overrides: str) -> tuple[Path, dict]:
    """A run directory as jobs/launch.py leaves it (config.yaml, mlflow.json) for a one-rank CPU run with
    the plain engine, tracked in an sqlite store under tmp_path."""
    from pipeline.config import dump, load_recipe

    cfg = load_recipe("smoke", [f"data.index={data}", "train.engine=torch", "train.zero_stage=0",
                                "train.max_steps=2", "train.log_every=1", "train.ckpt_every=2", "train.val_every=-1",
                                "data.num_workers=0", "test.max_videos=2", "test.temporal_clips=1",
                                "test.spatial_crops=1", f"name={name}", *overrides])
    run_dir = tmp_path / "runs" / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump(cfg))
    record = create_run(run_dir, f"sqlite:///{tmp_path / 'mlflow.db'}", "status", name, {"recipe": "smoke"})
    assert record is not None
    return run_dir, record


def start_rank(run_dir: Path) -> subprocess.Popen:
    """One rank, as srun or torchrun would start it (a free rendezvous port; no launcher variables)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_", "MLFLOW_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        env["MASTER_PORT"] = str(s.getsockname()[1])
    return subprocess.Popen([sys.executable, "-m", "pipeline.train.main", str(run_dir)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def mlflow_run(record: dict):
    from mlflow.tracking import MlflowClient

    return MlflowClient(record["tracking_uri"]).get_run(record["run_id"])


def test_a_run_that_ends_normally_is_finished_and_its_export_names_its_classes(tmp_path, colour_data):
    from pipeline.train.evaluate import model_classes

    run_dir, record = prepared_run(tmp_path, colour_data, "finished")
    rank = start_rank(run_dir)
    out, _ = rank.communicate(timeout=300)
    assert rank.returncode == 0, out[-3000:]
    run = mlflow_run(record)
    assert run.info.status == "FINISHED" and run.data.tags["outcome"] == "done"
    assert "last_failure" not in run.data.tags
    # MLflow's system-metrics monitor ran beside the training (disk usage: only MLflow's monitor logs it)
    assert {"system/cpu_utilization_percentage", "system/disk_usage_percentage"} <= set(run.data.metrics)
    classes, _ = model_classes(run_dir / "export" / "model.safetensors")
    assert classes == ["red", "green", "blue", "yellow"]  # from the dataset it trained on (dataset.json)
    assert json.loads((run_dir / "dataset.json").read_text())["classes"] == classes
    # the dataset version it read, as MLflow inputs, one per use
    inputs = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "validation+test"}  # the smoke recipe tests on its val split, as Kinetics
    assert {i.dataset.name for i in inputs.values()} == {"test-colour-v1/train", "test-colour-v1/val"}
    assert {t.key: t.value for t in inputs["train"].tags}["samples"] == "4"  # colour_data: 1 video per class
    assert run.data.tags["dataset"] == "test-colour v1"  # what compare groups runs by


@pytest.mark.parametrize("where", ["start-up", "training loop"])
def test_a_rank_that_dies_marks_its_run_failed_with_the_error(tmp_path, colour_data, where):
    if where == "start-up":  # before the sinks are open: the rank marks the run with a client of its own
        empty = tmp_path / "no-dataset"
        empty.mkdir()
        run_dir, record = prepared_run(tmp_path, colour_data, "dies-early", f"data.index={empty}")
        expected = "ShardError"
    else:  # a learning rate far too high: the loop's divergence check raises at the first steps
        run_dir, record = prepared_run(tmp_path, colour_data, "diverges", "optim.name=sgd", "optim.lr=1e30",
                                       "optim.grad_clip=0", "train.max_steps=20", "train.ckpt_every=10")
        expected = "DivergedError"
    rank = start_rank(run_dir)
    out, _ = rank.communicate(timeout=300)
    assert rank.returncode != 0 and expected in out, out[-3000:]
    run = mlflow_run(record)
    assert run.info.status == "FAILED", out[-3000:]  # before: RUNNING for ever (start-up), FAILED (loop)
    assert run.data.tags["last_failure"].startswith(expected) and run.data.tags["failed_rank"] == "0"


@pytest.mark.parametrize("when", ["start-up", "training loop"])
def test_a_cancelled_run_is_killed(tmp_path, colour_data, when):
    """SIGTERM (scancel, no requeue): in the loop, a checkpoint and KILLED; outside it (start-up here),
    KILLED at once, before Slurm's SIGKILL would leave the run RUNNING."""
    run_dir, record = prepared_run(tmp_path, colour_data, f"cancel-{when.replace(' ', '-')}",
                                   "train.max_steps=100000", "train.ckpt_every=100000")
    rank = start_rank(run_dir)
    deadline = time.time() + 240
    ready = (lambda: (run_dir / "pids" / "rank0.json").exists()) if when == "start-up" else (
        lambda: (run_dir / "metrics.jsonl").exists() and '"loss"' in (run_dir / "metrics.jsonl").read_text())
    while not ready() and rank.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert rank.poll() is None, rank.communicate()[0][-3000:]
    rank.send_signal(signal.SIGTERM)
    out, _ = rank.communicate(timeout=240)
    assert rank.returncode != 0, out[-3000:]
    run = mlflow_run(record)
    assert run.info.status == "KILLED", out[-3000:]
    assert "last_failure" not in run.data.tags
    checkpoints = list((run_dir / "checkpoints").glob("*")) if (run_dir / "checkpoints").exists() else []
    if when == "training loop":  # the loop's stop: a checkpoint to resume from, and the stop recorded
        assert run.data.tags["last_stop"] == "terminated" and checkpoints
    else:  # stopped where it was: no training step ran after the signal (before: one step and a checkpoint)
        assert run.data.tags["last_stop"] == "cancel" and not checkpoints
        assert not (run_dir / "metrics.jsonl").exists() or '"loss"' not in (run_dir / "metrics.jsonl").read_text()


def test_ending_a_run_from_another_rank_and_resuming_it(tmp_path):
    """end_run (a rank without sinks) marks the run; a cancel after a crash keeps FAILED; a resumed
    job's sinks make it RUNNING again."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    record = create_run(run_dir, f"sqlite:///{tmp_path / 'mlflow.db'}", "status", "r", {})
    assert end_run(run_dir, "FAILED", {"last_failure": "RuntimeError: rank 3 ran out of memory"})
    assert end_run(run_dir, "KILLED")  # the launcher then cancels the others: the crash stays visible
    run = mlflow_run(record)
    assert run.info.status == "FAILED" and run.data.tags["last_failure"].endswith("out of memory")
    sinks = Sinks([JsonlSink(run_dir), MLflowSink(record)])
    sinks.set_running()
    sinks.close(None)  # a requeue: delivered, and left open
    assert sinks.closed and mlflow_run(record).info.status == "RUNNING"
    sinks = Sinks([MLflowSink(record)])
    sinks.close("KILLED")
    assert mlflow_run(record).info.status == "KILLED"
    assert not end_run(tmp_path / "elsewhere", "FAILED")  # no mlflow.json: nothing to mark, no error
    sinks = Sinks([MLflowSink(record)])
    sinks.set_running()
    sinks.close("FINISHED")  # rank 0 finished the run; another rank then fails in the last barrier
    assert end_run(run_dir, "FAILED", {"last_failure": "RuntimeError: barrier timed out"})
    run = mlflow_run(record)
    assert run.info.status == "FINISHED" and "barrier" not in run.data.tags.get("last_failure", "")
    assert end_run(run_dir.parent / "run", "KILLED") and mlflow_run(record).info.status == "FINISHED"


def test_compare_shows_each_runs_status_and_marks_the_unfinished(tmp_path, monkeypatch):
    """Four runs in a real store, one per status: the table has a status column and a note naming the
    unfinished ones, the plot labels them and draws them dotted, and --finished-only leaves them out."""
    import matplotlib.figure
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import compare

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("cmp", artifact_location=(tmp_path / "art").as_uri())
    for name, status in (("done", "FINISHED"), ("crashed", "FAILED"), ("cancelled", "KILLED"), ("going", "RUNNING")):
        run = client.create_run(exp, run_name=name, tags={"variant": "timesformer_tiny", "attention_type": "x"})
        client.log_batch(run.info.run_id, params=[Param("test.temporal_clips", "1"), Param("test.spatial_crops", "3")],
                         tags=[RunTag("gflops_per_view", "1.0")],
                         metrics=[Metric("gpu_hours", 0.1 * s, 0, s) for s in (1, 2)]
                         + [Metric("val_top1", 10.0 * s, 0, s) for s in (1, 2)]
                         + ([Metric("test_top1", 55.0, 0, 2)] if status == "FINISHED" else []))
        if status != "RUNNING":
            client.set_terminated(run.info.run_id, status)
    summaries = compare.fetch(uri, "cmp")
    assert {s.run: s.status for s in summaries} == {"done": "FINISHED", "crashed": "FAILED", "cancelled": "KILLED",
                                                   "going": "RUNNING"}
    lines = compare.table_text(summaries).splitlines()
    assert lines[0].split()[-1] == "status"
    for name, status in (("done", "FINISHED"), ("crashed", "FAILED"), ("cancelled", "KILLED"), ("going", "RUNNING")):
        assert next(line for line in lines if line.startswith(name)).split()[-1] == status
    assert "not finished, numbers partial: FAILED: crashed; KILLED: cancelled; RUNNING: going" in lines[-1]
    assert compare.table_csv(summaries).splitlines()[0].split(",").count("status") == 1
    assert "| FAILED |" in compare.table_markdown(summaries)
    drawn = {}

    def capture(fig, path, **kw):  # what the plot shows: each line's legend label and its style
        for line in fig.axes[0].get_lines():
            if not line.get_label().startswith("_"):
                drawn[line.get_label()] = line.get_linestyle()
        Path(path).write_bytes(b"png")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capture)
    compare.plot(summaries, tmp_path / "plot.png", "cmp")
    assert drawn == {"done (x)": "-", "crashed (x) [FAILED]": ":", "cancelled (x) [KILLED]": ":",
                     "going (x) [RUNNING]": ":"}
    assert [s.run for s in compare.fetch(uri, "cmp", finished_only=True)] == ["done"]
    cli = [sys.executable, str(REPO / "jobs" / "compare.py"), "--experiment", "cmp", "--tracking-uri", uri, "--no-log"]
    p = subprocess.run(cli + ["--out", str(tmp_path / "all")], capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    assert "status" in p.stdout.splitlines()[0] and "KILLED" in p.stdout and "not finished" in p.stdout
    p = subprocess.run(cli + ["--out", str(tmp_path / "done"), "--finished-only"], capture_output=True, text=True,
                       timeout=180)
    assert p.returncode == 0, p.stderr
    assert "done" in p.stdout and "crashed" not in p.stdout and "not finished" not in p.stdout


def test_compare_refuses_runs_of_different_datasets_unless_asked(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import compare

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("mix", artifact_location=(tmp_path / "art").as_uri())
    for name, dataset in (("on-v1", "k400 v1"), ("on-v2", "k400 v2"), ("old", None)):
        tags = {"variant": "timesformer_tiny", **({"dataset": dataset} if dataset else {})}
        run = client.create_run(exp, run_name=name, tags=tags)
        client.set_terminated(run.info.run_id, "FINISHED")
    summaries = compare.fetch(uri, "mix")
    assert {s.run: s.dataset for s in summaries} == {"on-v1": "k400 v1", "on-v2": "k400 v2", "old": "?"}
    assert compare.table_text(summaries).splitlines()[0].split()[:2] == ["run", "dataset"]
    with pytest.raises(compare.MixedDatasetsError, match=r"2 datasets \(k400 v1: on-v1; k400 v2: on-v2\)"):
        compare.check_one_dataset(summaries)
    compare.check_one_dataset([s for s in summaries if s.run != "on-v2"])  # one dataset (and a run before tags)
    cli = [sys.executable, str(REPO / "jobs" / "compare.py"), "--experiment", "mix", "--tracking-uri", uri, "--no-log",
           "--out", str(tmp_path / "out")]
    p = subprocess.run(cli, capture_output=True, text=True, timeout=180)
    assert p.returncode == 2 and "--mix-datasets" in p.stderr and not (tmp_path / "out").exists()
    p = subprocess.run(cli + ["--mix-datasets"], capture_output=True, text=True, timeout=180)
    assert p.returncode == 0 and "k400 v2" in p.stdout, p.stderr


def test_compare_puts_each_runs_inference_cost_in_the_table_and_plots_accuracy_against_it(tmp_path, monkeypatch):
    """The paper's Table-2 inference cost from a real store: GFLOPs per view (the tag) x the test protocol's views
    (its params) in the table, the CSV and runs.json; the plot has one point per run at exactly (that cost, its test
    top-1) on a log axis, a legend entry per model; a whole-video protocol and a run without a test are not drawn."""
    from dataclasses import replace

    import matplotlib.figure
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import compare

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("t2", artifact_location=(tmp_path / "art").as_uri())
    # name: (variant, scheme, GFLOPs per view tag, protocol params, test top-1)
    runs = {"tsf-0": ("timesformer_tiny", "divided_space_time", "0.02083", {"temporal_clips": "2",
                                                                             "spatial_crops": "3"}, 97.5),
            "tsf-1": ("timesformer_tiny", "divided_space_time", "0.02083", {"temporal_clips": "2",
                                                                             "spatial_crops": "3"}, 90.0),
            "i3d-0": ("i3d_r50", "resnet3d", "37.1", {"temporal_clips": "10", "spatial_crops": "3"}, 71.0),
            "long": ("timesformer_base", "divided_space_time", "590", {"protocol": "long_video"}, 60.0),
            "untested": ("i3d_r50", "resnet3d", "37.1", {"temporal_clips": "10", "spatial_crops": "3"}, None)}
    for name, (variant, scheme, gflops, protocol, top1) in runs.items():
        run = client.create_run(exp, run_name=name, tags={"variant": variant, "attention_type": scheme})
        client.log_batch(run.info.run_id, params=[Param(f"test.{k}", v) for k, v in protocol.items()],
                         tags=[RunTag("gflops_per_view", gflops)],
                         metrics=[Metric("gpu_hours", 0.5, 0, 10), Metric("val_top1", 50.0, 0, 10)]
                         + ([Metric("test_top1", top1, 0, 10)] if top1 is not None else []))
        client.set_terminated(run.info.run_id, "FINISHED" if top1 is not None else "KILLED")
    summaries = compare.fetch(uri, "t2")
    expected = {"tsf-0": 0.02083 * 6, "tsf-1": 0.02083 * 6, "i3d-0": 37.1 * 30, "long": None, "untested": 37.1 * 30}
    assert {s.run: s.inference_gflops for s in summaries} == pytest.approx(expected)
    lines = compare.table_text(summaries).splitlines()
    at = lines[0].index("inference GFLOPs/video")
    assert lines[0].split()[-1] == "status"  # the new column comes before the status, which stays last
    cells = {line.split()[0]: line[at:].split()[0] for line in lines[2:] if line and not line.startswith("(")}
    assert cells == {"tsf-0": "0.125", "tsf-1": "0.125", "i3d-0": "1113", "long": "-", "untested": "1113"}
    header, *body = compare.table_csv(summaries).splitlines()
    col = header.split(",").index("inference_gflops")
    assert [row.split(",")[col] for row in body] == [str(0.02083 * 6), str(0.02083 * 6), str(37.1 * 30), "",
                                                    str(37.1 * 30)]
    assert "| inference GFLOPs/video |" in compare.table_markdown(summaries)
    points = compare.inference_points(summaries, "top1")
    assert [s.run for s, _, _ in points] == ["tsf-0", "tsf-1", "i3d-0"]
    assert [v for _, g, a in points for v in (g, a)] == pytest.approx([0.02083 * 6, 97.5, 0.02083 * 6, 90.0,
                                                                        37.1 * 30, 71.0])

    drawn = {}

    def capture(fig, path, **kw):  # what the inference plot shows: its points, labels, axis scale and title
        if Path(path).name == "accuracy_vs_inference.png":
            ax = fig.axes[0]
            drawn.update(points=[v for x, y in sorted((float(x), float(y)) for line in ax.get_lines()
                                                      for x, y in zip(line.get_xdata(), line.get_ydata(), strict=True))
                                 for v in (x, y)],
                         legend=[t.get_text() for t in ax.get_legend().get_texts()],
                         notes=sorted(t.get_text() for t in ax.texts), xscale=ax.get_xscale(), title=ax.get_title())
        Path(path).write_bytes(b"png")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capture)
    paths = compare.write_report(summaries, tmp_path / "out", "t2")
    assert paths["accuracy_vs_inference.png"] == tmp_path / "out" / "accuracy_vs_inference.png"
    assert paths["accuracy_vs_inference.png"].exists() and (tmp_path / "out" / "accuracy_vs_gpu_hours.png").exists()
    assert drawn["points"] == pytest.approx([0.02083 * 6, 90.0, 0.02083 * 6, 97.5, 37.1 * 30, 71.0])
    assert drawn["xscale"] == "log"
    assert drawn["legend"] == ["timesformer_tiny (divided_space_time)", "i3d_r50 (resnet3d)"]
    assert drawn["notes"] == ["i3d_r50", "timesformer_tiny", "timesformer_tiny"]  # each point named by its model
    twins = [replace(s, run=f"{s.run}-twin", run_id=f"{s.run_id}-twin") for s in summaries if s.run == "i3d-0"]
    compare.plot_inference(summaries + twins, tmp_path / "out" / "accuracy_vs_inference.png", "t2")
    assert drawn["notes"] == ["i3d_r50 x2", "timesformer_tiny", "timesformer_tiny"]  # two runs on one spot
    assert "not drawn (no test result, or no FLOPs count per video): long, untested" in drawn["title"]
    saved = json.loads((tmp_path / "out" / "runs.json").read_text())
    assert {r["run"]: r["inference_gflops"] for r in saved} == pytest.approx(expected)
    run_id = compare.log_comparison(uri, "t2", summaries, paths)  # logged beside the other plot
    assert "comparison/accuracy_vs_inference.png" in {a.path for a in client.list_artifacts(run_id, "comparison")}

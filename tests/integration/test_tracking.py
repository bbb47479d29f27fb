"""Tracking against a real `mlflow server` with artifacts on SeaweedFS: what a training run logs, the
GPU-hour budget across a requeue, the comparison report, and the UI in a real browser."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.train.launch import LaunchRequest, launch
from tests.integration.test_train import losses, wait_for_step
from tests.synthetic_data import write_dataset

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def motion_index(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("motion")
    write_dataset(str(root), "motion", per_class={"train": 4, "val": 2})
    return str(root)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, mlflow_server, motion_index):
    """Divided space-time and space-only attention, trained the same way, logged to the server."""
    tmp = tmp_path_factory.mktemp("runs")
    infos = {}
    for scheme in ("divided_space_time", "space_only"):
        info = launch(LaunchRequest(recipe="smoke", nodes=2, local=True, name=scheme, runs_dir=str(tmp), overrides=[
            f"data.index={motion_index}", f"model.attention_type={scheme}", "train.max_steps=12",
            "train.val_every=4", "train.ckpt_every=6", "train.log_every=2", f"tracking.uri={mlflow_server.uri}",
            "tracking.experiment=schemes", "budget.gpu_hours=1"]), out=lambda *a: None)
        info["results"] = info["job"].results()
        infos[scheme] = info
    return infos


def test_a_training_run_logs_params_tags_metrics_and_artifacts_to_s3(two_runs, mlflow_server, seaweedfs):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    info = two_runs["divided_space_time"]
    record = info["mlflow"]
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "divided_space_time"
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    assert params["model.attention_type"] == "divided_space_time" and params["train.max_steps"] == "12"
    assert params["cluster.env"] == "{'OMP_NUM_THREADS': '1'}" and params["budget.gpu_hours"] == "1.0"
    for key, value in {"recipe": "smoke", "variant": "timesformer_tiny", "attention_type": "divided_space_time",
                       "frames": "4", "resolution": "32", "nodes": "2", "accelerator": "cpu", "outcome": "done",
                       "gpu_hours_unit": "cpu-process"}.items():
        assert tags[key] == value, key
    assert len(tags["git_sha"]) == 40 and int(tags["params"]) > 0 and float(tags["gflops_per_view"]) > 0
    for key in ("loss", "lr", "clips_per_s", "data_wait_frac", "gpu_hours", "tflops_per_s", "val_top1", "val_top5",
                "test_top1", "test_top5", "system/cpu_utilization_percentage", "system/disk_usage_percentage"):
        assert key in metrics, key
    assert [m.step for m in client.get_metric_history(record["run_id"], "val_top1")] == [4, 8, 12]
    hours = [m.value for m in client.get_metric_history(record["run_id"], "gpu_hours")]
    assert hours == sorted(hours) and 0 < hours[-1] < 0.1
    names = {a.path for a in client.list_artifacts(record["run_id"])}
    assert {"config.yaml", "deepspeed.json", "launch.json", "eval", "model"} <= names
    assert {a.path for a in client.list_artifacts(record["run_id"], "eval")} == {"eval/test.json", "eval/confusion.png"}
    # the artifacts are objects in the S3 bucket, not files next to the server
    import boto3

    s3 = boto3.client("s3", endpoint_url=seaweedfs.endpoint, region_name="us-east-1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow", Prefix="artifacts/")["Contents"]]
    assert any(k.endswith(f"{record['run_id']}/artifacts/model/model.safetensors") for k in keys)
    assert any(k.endswith(f"{record['run_id']}/artifacts/eval/confusion.png") for k in keys)


@pytest.fixture(scope="module")
def compared(two_runs, mlflow_server, tmp_path_factory):
    """jobs/compare.py over the two runs (once: the UI test looks for the comparison run it logs)."""
    out = tmp_path_factory.mktemp("cmp")
    p = subprocess.run([sys.executable, str(REPO / "jobs" / "compare.py"), "--experiment", "schemes",
                        "--tracking-uri", mlflow_server.uri, "--out", str(out / "cmp")],
                       capture_output=True, text=True, timeout=180)
    return p, out


def test_compare_builds_the_table_and_plot_from_two_runs_and_logs_them(compared, mlflow_server):
    p, tmp_path = compared
    assert p.returncode == 0, p.stderr
    table = p.stdout
    assert "divided_space_time" in table and "space_only" in table and "TFLOPs x views" in table
    rows = (tmp_path / "cmp" / "table.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("run_id,run,dataset,model,attention")
    md = (tmp_path / "cmp" / "table.md").read_text()
    assert md.count("\n") == 4 and "| space_only |" in md.replace("space_only | space_only", "space_only")
    png = tmp_path / "cmp" / "accuracy_vs_gpu_hours.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    runs = json.loads((tmp_path / "cmp" / "runs.json").read_text())
    assert {r["attention"] for r in runs} == {"divided_space_time", "space_only"}
    assert all(len(r["curve"]) == 3 and r["budget"] == 1.0 for r in runs)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("schemes")
    comparisons = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("kind") == "comparison"]
    assert len(comparisons) == 1
    arts = {a.path for a in client.list_artifacts(comparisons[0].info.run_id, "comparison")}
    assert "comparison/accuracy_vs_gpu_hours.png" in arts and "comparison/table.md" in arts


def test_a_budget_stops_training_within_a_step_and_hours_survive_a_requeue(tmp_path, mlflow_server, motion_index):
    budget = 0.02  # process-hours: ~36 s of 2 ranks, start-up included (two start-ups on a loaded CI box fit)
    info = launch(LaunchRequest(recipe="smoke", nodes=2, local=True, name="budget", runs_dir=str(tmp_path), overrides=[
        f"data.index={motion_index}", "train.max_steps=100000", "train.log_every=1", "train.ckpt_every=1000",
        "train.val_every=-1", f"budget.gpu_hours={budget}", f"tracking.uri={mlflow_server.uri}",
        "tracking.experiment=budget", "test.max_videos=4"]), out=lambda *a: None)
    run_dir = Path(info["run_dir"])
    wait_for_step(run_dir, 5)
    for rank in (0, 1):  # the scheduler's preemption signal, to every rank
        os.kill(json.loads((run_dir / "pids" / f"rank{rank}.json").read_text())["pid"], signal.SIGUSR2)
    result = info["job"].results()[0]
    assert result["outcome"] == "budget" and result["resumed_from"] >= 5
    history = json.loads((run_dir / "requeues.json").read_text())
    assert len(history) == 1 and history[0]["requeued"]
    account = json.loads((run_dir / "gpu_hours.json").read_text())
    assert len(account["attempts"]) == 2 and account["unit"] == "cpu-process"
    counted = sum(a["seconds"] * a["devices"] for a in account["attempts"]) / 3600
    assert account["hours"] == pytest.approx(counted, rel=1e-6)  # both attempts, each counted once
    assert budget <= account["hours"] < budget + 0.01  # the test protocol and export after the stop count too
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    over = [r["step"] for r in rows if r["gpu_hours"] >= budget]
    assert len(over) <= 2 and over[-1] == rows[-1]["step"] == result["step"]  # stopped within one step
    first_attempt = [r for r in rows if r["step"] <= result["resumed_from"]]
    assert first_attempt and first_attempt[-1]["gpu_hours"] < rows[-1]["gpu_hours"]
    assert (run_dir / "eval" / "test.json").exists()  # the final test protocol still ran
    from mlflow.tracking import MlflowClient

    run = MlflowClient(mlflow_server.uri).get_run(info["mlflow"]["run_id"])
    assert run.data.tags["stopped_by"] == "budget" and run.data.tags["requeues"] == "1"
    assert run.data.metrics["gpu_hours"] >= budget and run.info.status == "FINISHED"
    assert len(losses(run_dir)) == len({r["step"] for r in rows})


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"], env=env,
                       capture_output=True, timeout=900)
        path = shutil.which("chromium")
        if path is None:
            pytest.fail("apt-get install chromium did not give a chromium binary")
    if path is None:  # not root on Debian: nothing to install with
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    return path


def test_the_mlflow_ui_shows_the_runs_and_the_comparison_plot(compared, mlflow_server, chromium, tmp_path):
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import sync_playwright

    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("schemes")
    comparison = next(r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("kind") == "comparison")
    shots = Path(os.environ.get("PIPELINE_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    external: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.on("request", lambda r: external.append(r.url) if "127.0.0.1" not in r.url and
                r.url.startswith("http") else None)
        page.goto(f"{mlflow_server.uri}/#/experiments/{exp.experiment_id}/runs", wait_until="load")
        for name in ("divided_space_time", "space_only"):
            page.get_by_text(name, exact=True).first.wait_for(timeout=60_000)
        page.screenshot(path=str(shots / "mlflow-runs.png"))
        page.goto(f"{mlflow_server.uri}/#/experiments/{exp.experiment_id}/runs/{comparison.info.run_id}/artifacts/"
                  "comparison/accuracy_vs_gpu_hours.png", wait_until="load")
        page.get_by_text("accuracy_vs_gpu_hours.png").first.wait_for(timeout=60_000)
        image = page.locator("img[src^='blob:']").first  # the UI fetches the artifact and shows it as a blob
        image.wait_for(timeout=60_000)
        page.wait_for_function("(img) => img.complete && img.naturalWidth > 400", arg=image.element_handle(),
                               timeout=60_000)  # the plot itself (880 px wide), not an icon
        page.screenshot(path=str(shots / "mlflow-comparison-plot.png"))
        browser.close()
    assert (shots / "mlflow-runs.png").stat().st_size > 20_000
    assert (shots / "mlflow-comparison-plot.png").stat().st_size > 20_000
    assert not external, f"the UI reached outside this machine: {external[:5]}"


def test_the_servers_store_uris_travel_by_environment_not_on_any_command_line(mlflow_server):
    """`ps` shows every user each process's argv: the backend URI (a database password, for PostgreSQL)
    must be on none of the mlflow server's processes' (the server, its uvicorn worker); it is in the
    server's environment, which only its owner can read."""
    group = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if int(fields[2]) == mlflow_server.proc.pid:  # process group: the server started its own session
            group.append(stat_file.parent)
    assert len(group) >= 2  # the CLI and its uvicorn worker: both checked
    for proc in group:
        argv = (proc / "cmdline").read_bytes().decode(errors="replace")
        assert mlflow_server.backend not in argv and "mlflow.db" not in argv, argv
    server_env = (Path("/proc") / str(mlflow_server.proc.pid) / "environ").read_bytes().split(b"\0")
    assert f"MLFLOW_BACKEND_STORE_URI={mlflow_server.backend}".encode() in server_env

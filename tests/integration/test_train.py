"""Distributed training for real: DeepSpeed on gloo with 2 ranks (local processes through submitit, and a
Slurm cluster of fake nodes), data streamed from shards, checkpoints, preemption and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.train.launch import LaunchRequest, launch
from tests.synthetic_data import write_dataset

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
# 30 steps of 8 clips (2 ranks x micro batch 2 x accumulation 2), a checkpoint (and data reseed) every 10
SHORT = ["train.max_steps=30", "train.ckpt_every=10", "train.log_every=1", "train.val_every=-1",
         "train.micro_batch=2", "test.enabled=false"]


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            out[row["step"]] = row["loss"]
    return out


def wait_for_step(run_dir: Path, step: int, timeout: float = 300) -> int:  # generous: ranks start slowly on a busy host
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists():
            done = losses(run_dir)
            if done and max(done) >= step:
                return max(done)
        time.sleep(0.05)
    raise TimeoutError(f"{run_dir} did not reach step {step} in {timeout}s")


def run_local(tmp_path: Path, name: str, index: str, overrides: list[str], wait: bool = True) -> dict:
    info = launch(LaunchRequest(recipe="smoke", nodes=2, local=True, name=name, runs_dir=str(tmp_path),
                                overrides=[f"data.index={index}", *overrides]), out=lambda *a: None)
    if wait:
        info["results"] = info["job"].results()
    return info


@pytest.fixture(scope="module")
def colour_index(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("colour")
    write_dataset(str(root), "colour")
    return str(root)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, colour_index) -> dict[int, float]:
    """The uninterrupted run the resumed ones must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    info = run_local(tmp, "reference", colour_index, SHORT)
    assert info["results"][0]["outcome"] == "done"
    ref = losses(Path(info["run_dir"]))
    assert sorted(ref) == list(range(1, 31))
    return ref


def test_zero_stages_and_activation_checkpointing_train_the_same_model(tmp_path, colour_index, reference):
    """ZeRO 1, 2 and 3 each train the tiny model on 2 ranks; checkpointing on and off give the same loss.
    (fp32: the stages partition optimizer state, gradients and parameters, not the arithmetic.)"""
    runs = {}
    for stage, ac in ((1, "full"), (3, "full"), (2, "none")):
        info = run_local(tmp_path, f"zero{stage}-{ac}", colour_index,
                         SHORT + ["train.max_steps=6", f"train.zero_stage={stage}", "train.val_every=6",
                                  f"train.activation_checkpointing={ac}"])
        run_dir = Path(info["run_dir"])
        runs[(stage, ac)] = losses(run_dir)
        assert json.loads((run_dir / "deepspeed.json").read_text())["zero_optimization"]["stage"] == stage
        assert json.loads((run_dir / "deepspeed.json").read_text())["gradient_accumulation_steps"] == 2
        assert (run_dir / "export" / "model.safetensors").exists()
        val = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "val_top1" in line]
        assert len(val) == 1 and val[0]["val_clips"] == 8  # every val video once (ZeRO-3: weights gathered)
    base = {s: reference[s] for s in range(1, 7)}  # ZeRO-2 with full checkpointing
    for key, got in runs.items():
        assert sorted(got) == list(range(1, 7)), key
        for s in got:
            assert got[s] == pytest.approx(base[s], abs=2e-5), (key, s, got[s], base[s])
    assert sum(reference[s] for s in range(26, 31)) < sum(reference[s] for s in range(1, 6))  # it learns


def test_a_killed_rank_resumes_from_the_last_checkpoint_and_reproduces_the_losses(tmp_path, colour_index,
                                                                                      reference):
    info = run_local(tmp_path, "killed", colour_index, SHORT, wait=False)
    run_dir = Path(info["run_dir"])
    wait_for_step(run_dir, 13)  # past the checkpoint at step 10
    victim = json.loads((run_dir / "pids" / "rank1.json").read_text())["pid"]
    os.kill(victim, signal.SIGKILL)
    t0 = time.time()
    with pytest.raises(Exception):  # noqa: B017 -- the job fails: a rank died
        info["job"].results()
    assert time.time() - t0 < 100, "rank 0 should notice a dead peer quickly, not wait for the timeout"
    killed_at = max(losses(run_dir))
    assert killed_at < 30
    resumed = launch(LaunchRequest(resume=str(run_dir), nodes=2, local=True), out=lambda *a: None)
    result = resumed["job"].results()[0]
    assert result["outcome"] == "done" and result["resumed_from"] == 10
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    restart = [i for i, r in enumerate(rows) if r["step"] == 11][-1]
    after = {r["step"]: r["loss"] for r in rows[restart:] if "loss" in r}
    assert sorted(after) == list(range(11, 31))
    assert after == {s: reference[s] for s in range(11, 31)}  # exactly: same data, same arithmetic
    launch_record = json.loads((run_dir / "launch.json").read_text())
    assert len(launch_record["jobs"]) == 2 and launch_record["jobs"][1]["resume"]


# -- on the Slurm development cluster ------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_colour_index(seaweedfs):
    bucket = "train-smoke"
    seaweedfs.create_bucket(bucket)
    write_dataset(f"s3://{bucket}/colour", "colour")
    return f"s3://{bucket}/colour"


def launch_cli(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / "launch.py"), *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.mark.slurm
def test_smoke_recipe_on_two_slurm_nodes_streams_from_s3_and_completes_the_run(tmp_path, slurm_cluster,
                                                                                 s3_colour_index):
    p = launch_cli(["--nodes", "2", "--recipe", "smoke", "--runs-dir", str(tmp_path), "--name", "smoke",
                    "--wait", f"data.index={s3_colour_index}"], slurm_cluster.env())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "submitted   job" in p.stdout and "(slurm, 2 node(s) x 1 rank(s))" in p.stdout
    # --wait follows rank 0's progress lines as the job writes them
    assert "step 60/60 " in p.stdout and "100% eta 0s" in p.stdout and "checkpoint step000000060" in p.stdout
    run_dir = tmp_path / "smoke"
    printed_logs = next(line.split()[1] for line in p.stdout.splitlines() if line.startswith("logs "))
    assert Path(printed_logs.replace("<rank>", "0")).exists()  # the log path it prints is where the log is
    # one rank on each fake node
    logs = "".join(f.read_text() for f in run_dir.glob("submitit/*/*_log.out"))
    assert "node=0(2), global_rank=0(2)" in logs and "node=1(2), global_rank=1(2)" in logs
    # the loss goes down
    curve = losses(run_dir)
    steps = sorted(curve)
    assert steps[-1] == 60
    first, last = [curve[s] for s in steps[:3]], [curve[s] for s in steps[-3:]]
    assert sum(last) / 3 < sum(first) / 3 - 0.2, curve
    # the run directory is complete
    for name in ("config.yaml", "deepspeed.json", "launch.json", "mlflow.json", "gpu_hours.json", "result.json",
                 "eval/test.json", "export/model.safetensors"):
        assert (run_dir / name).exists(), name
    ds = json.loads((run_dir / "deepspeed.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_batch_size"] == 8
    assert (run_dir / "checkpoints" / "step000000060" / "COMPLETE").exists()
    report = json.loads((run_dir / "eval" / "test.json").read_text())
    assert report["videos"] == 8 and report["views_per_video"] == 6  # 2 clips x 3 crops, every val video once
    assert report["top1"] >= 50  # colour classes are easy: well above chance (25%) after 60 steps
    from pipeline.models.convert import load_safetensors

    assert load_safetensors(run_dir / "export" / "model.safetensors").cfg.num_classes == 4
    # and the MLflow run has params, metrics, tags and artifacts
    from mlflow.tracking import MlflowClient

    record = json.loads((run_dir / "mlflow.json").read_text())
    client = MlflowClient(record["tracking_uri"])
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.zero_stage"] == "2" and run.data.tags["recipe"] == "smoke"
    assert {"loss", "lr", "clips_per_s", "val_top1", "test_top1", "gpu_hours"} <= set(run.data.metrics)
    assert len(client.get_metric_history(record["run_id"], "loss")) == 12  # every 5 steps
    artifacts = {a.path for a in client.list_artifacts(record["run_id"])}
    assert {"config.yaml", "deepspeed.json", "eval", "model"} <= artifacts


@pytest.mark.slurm
def test_preemption_signal_checkpoints_requeues_and_resumes_exactly(tmp_path, slurm_cluster, colour_index,
                                                                       reference):
    env = slurm_cluster.env()
    p = launch_cli(["--nodes", "2", "--recipe", "smoke", "--runs-dir", str(tmp_path), "--name", "preempted",
                    f"data.index={colour_index}", *SHORT], env)
    assert p.returncode == 0, p.stderr[-3000:]
    run_dir = tmp_path / "preempted"
    job_id = json.loads((run_dir / "launch.json").read_text())["jobs"][0]["job_id"]
    wait_for_step(run_dir, 14)  # mid-interval: the resumed data stream has to skip what was consumed
    subprocess.run(["scancel", "--signal=USR2", job_id], env={**os.environ, **env}, check=True)
    deadline = time.time() + 120
    while not (run_dir / "result.json").exists():
        assert time.time() < deadline, "the requeued job did not finish"
        state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %r"], env={**os.environ, **env},
                               capture_output=True, text=True).stdout.split()
        if state[:2] == ["PENDING", "BeginTime"]:  # Slurm holds a requeued job ~2 min; let it start now
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env={**os.environ, **env})
        time.sleep(0.5)
    history = json.loads((run_dir / "requeues.json").read_text())
    assert [h["reason"] for h in history] == ["preempted"] and history[0]["requeued"]
    result = json.loads((run_dir / "result.json").read_text())
    stopped_at = result["resumed_from"]
    assert 14 <= stopped_at < 30 and stopped_at % 10  # the signal's own checkpoint, not a periodic one
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    restart = [i for i, r in enumerate(rows) if r["step"] == stopped_at + 1][-1]
    resumed = {r["step"]: r["loss"] for r in rows[restart:] if "loss" in r}
    assert sorted(resumed) == list(range(stopped_at + 1, 31))
    assert resumed == {s: reference[s] for s in resumed}
    gpu_hours = json.loads((run_dir / "gpu_hours.json").read_text())
    assert len(gpu_hours["attempts"]) == 2 and gpu_hours["unit"] == "cpu-process"

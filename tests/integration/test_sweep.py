"""Sweeps for real: members as local processes and as ONE Slurm job array on the development cluster, a total
GPU-hour budget split across them, asynchronous successive halving deciding in the members' own processes, the
MLflow parent and child runs, and the budget-matched comparison of the sweep (Pareto front, plot).

Budgets are tiny (CPU process-hours: 0.004 h is 14.4 s of one process) and counted on a virtual clock: with
``PIPELINE_FAKE_CLOCK`` (a test seam, ``pipeline.train.budget.fake_step_seconds``) a member's account counts
STEP_S seconds per optimizer step and nothing else, so where each member reaches a rung or its budget is a step
number, whatever the load of the machine (start-up alone can take a loaded CI box longer than a budget)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.train.launch import LaunchRequest
from pipeline.train.sweep import SweepSpec, load_sweep_file
from pipeline.train.sweep_launch import launch_sweep
from tests.synthetic_data import write_dataset

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
# unbounded steps: the budget ends each member; a validation every 3 steps is a rung check
STEP_S = 0.5  # virtual seconds per optimizer step: a member budget of 0.004 h is 28.8 steps
FAST = ["train.max_steps=100000", "train.val_every=3", "train.log_every=3", "train.ckpt_every=100000",
        "train.zero_stage=0", "test.enabled=false", "tracking.register=false"]


@pytest.fixture(scope="module")
def colour_index(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("colour")
    write_dataset(str(root), "colour", per_class={"train": 8, "val": 6})
    return str(root)


@pytest.fixture(scope="module")
def one_val_clip_index(tmp_path_factory) -> str:
    """The colour dataset with ONE validation clip (v2: the other val clips tombstoned): every val_top1 is 0 or
    100, so three members reporting at a rung cannot all beat those before them, and one is stopped."""
    from dataclasses import replace

    from pipeline.data.shards import commit_index, load_index

    root = tmp_path_factory.mktemp("colour1")
    write_dataset(str(root), "colour", per_class={"train": 8, "val": 1})
    index, storage = load_index(str(root))
    shards = [replace(s, dropped=s.keys[1:]) if s.split == "val" else s for s in index.shards]
    commit_index(storage, replace(index, version=2, shards=shards))
    assert load_index(str(root))[0].num_samples("val") == 1
    return str(root)


def check_decisions(state: dict) -> None:
    """Every decision in sweep.json is the ASHA rule applied to the scores reported at its rung before it (in the
    order they were recorded: arrival order under the state's lock)."""
    from pipeline.train.sweep import asha_continues

    eta = state["halving"]["eta"]
    for r, rung in enumerate(state["rungs"]):
        for k, report in enumerate(rung["reports"]):
            go_on, _, _ = asha_continues([x["value"] for x in rung["reports"][:k]], report["value"], eta)
            assert report["decision"] == ("continue" if go_on else "stop"), (r, k, rung["reports"])
            d = next(d for d in state["decisions"] if d["member"] == report["member"] and d["rung"] == r)
            assert d["decision"] == report["decision"] and d["value"] == report["value"]


def mlflow_runs(tracking_uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id])


def compare_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / "compare.py"), *args], env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def test_local_sweep_stops_a_member_at_a_rung_and_gives_its_hours_to_a_survivor(tmp_path, colour_index,
                                                                                monkeypatch):
    # members 0 and 1 cannot move their weights (learning rates of 1e-30 and 2e-30 are below float32's resolution
    # of every weight), from the same seed: whenever each reaches the rung, both score the same. Members run one
    # after the other (local, parallelism 1): member 0 arrives first and continues; member 1 ties it, and a tie
    # does not displace an earlier arrival, so it stops; member 0 has finished by then and member 2 is still
    # waiting, so member 2 receives all that member 1 did not use
    (tmp_path / "s.yaml").write_text("name: lr\nmembers:\n  - {optim.lr: 1.0e-30}\n  - {optim.lr: 2.0e-30}\n"
                                     "  - {optim.lr: 0.002, train.seed: 1}\nbudget: 0.012\n"
                                     "halving: {rungs: [0.6], eta: 2}\n")
    monkeypatch.setenv("PIPELINE_FAKE_CLOCK", str(STEP_S))  # the members' processes inherit it
    spec = load_sweep_file(tmp_path / "s.yaml")
    lines: list[str] = []
    launched = launch_sweep(spec, LaunchRequest(recipe="smoke", nodes=1, local=True, runs_dir=str(tmp_path),
                                                overrides=[f"data.index={colour_index}", *FAST]), out=lines.append)
    sweep_dir = tmp_path / "lr"
    state = json.loads((sweep_dir / "sweep.json").read_text())
    assert state == launched.state
    members = state["members"]
    assert [m["name"] for m in members] == ["lr-0-lr-1.0e-30", "lr-1-lr-2.0e-30", "lr-2-lr-0.002_seed-1"]
    assert all(m["base_budget"] == pytest.approx(0.004) for m in members) and state["total_budget"] == 0.012
    assert members[0]["status"] == "finished" and members[1]["status"] == "stopped", "\n".join(lines)
    reports = state["rungs"][0]["reports"]
    assert [r["member"] for r in reports] == [0, 1, 2] and reports[0]["value"] == reports[1]["value"]  # the tie
    check_decisions(state)
    assert [d["member"] for d in state["decisions"]] == [0, 1, 2]  # one report each, at the one rung
    stop = state["decisions"][1]
    assert stop["decision"] == "stop" and stop["rung"] == 0 and stop["place"] == 2
    # the rung is 0.6 x 28.8 = 17.28 steps: the first validation past it is step 18, at 9 s; the rest is freed,
    # exactly, all to member 2 (the only member alive)
    assert stop["rung_hours"] == 0.6 * members[1]["base_budget"] and stop["step"] == 18
    assert stop["hours"] == pytest.approx(18 * STEP_S / 3600, rel=1e-12)
    assert stop["freed"] == members[1]["base_budget"] - stop["hours"] == pytest.approx(0.004 - 0.0025, rel=1e-9)
    assert [r["step"] for r in reports] == [18, 18, 18] and members[0]["hours"] >= 0.004  # its budget ended it
    assert stop["given_to"] == {members[2]["name"]: stop["freed"]} and members[1]["budget"] == stop["hours"]
    if state["decisions"][2]["decision"] == "continue":  # member 2 beat the tie: it trained on the grown budget
        assert members[2]["budget"] == members[2]["base_budget"] + stop["freed"] and members[2]["status"] == "finished"
    else:
        assert members[2]["status"] == "stopped" and members[2]["budget"] == state["decisions"][2]["hours"]
    for m in members:  # each member's normal run directory, tested and exported
        run_dir = Path(m["run_dir"])
        assert run_dir.parent == sweep_dir and (run_dir / "export" / "model.safetensors").exists()
        assert json.loads((run_dir / "sweep_member.json").read_text())["index"] == m["index"]
    log_text = "".join(f.read_text() for f in Path(members[1]["run_dir"]).glob("submitit/*/*_0_log.out"))
    assert "-> STOP" in log_text  # the decision in the member's own run log
    # the grown budget is what member 2 trained on: it used more than its base share unless it was stopped too
    hours2 = json.loads((Path(members[2]["run_dir"]) / "gpu_hours.json").read_text())
    assert hours2["budget"] == pytest.approx(members[2]["budget"]) or members[2]["status"] == "stopped"
    # MLflow: one parent, three children
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client, runs = mlflow_runs(uri, "smoke")
    parent = next(r for r in runs if r.data.tags.get("kind") == "sweep")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(m["name"] for m in members)
    assert parent.data.tags["sweep"] == "lr" and parent.data.tags["members"] == "3"
    assert parent.info.status == "FINISHED" and any(k.startswith("halving.") for k in parent.data.tags)
    stopped = next(r for r in children if r.info.run_name == members[1]["name"])
    assert stopped.data.tags["stopped_by"] == "halving" and stopped.data.tags["outcome"] == "halted"
    assert "sweep/rung0" in stopped.data.metrics
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "sweep")] == ["sweep/sweep.json"]
    # the budget-matched comparison of the sweep
    p = compare_cli(["--experiment", "smoke", "--runs-dir", str(tmp_path), "--sweep", "lr", "--at-gpu-hours",
                     "0.003", "--out", str(tmp_path / "cmp")])
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Pareto front" in p.stdout and "stopped at rung 0" in p.stdout and "-> STOP" in p.stdout
    assert "acc@0.003h" in p.stdout
    front = [line.split()[1] for line in (tmp_path / "cmp" / "pareto.txt").read_text().splitlines()
             if line.startswith("*")]
    assert front and set(front) <= {m["name"] for m in members}
    assert (tmp_path / "cmp" / "pareto.png").stat().st_size > 10_000
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")} >= {
        "comparison/pareto.png", "comparison/pareto.txt", "comparison/at_0.003h.txt"}


def test_a_bad_member_is_refused_before_anything_is_created(tmp_path, colour_index):
    spec = SweepSpec([{"optim.lr": "0.01"}, {"optim.lr": "-1"}])
    with pytest.raises(Exception, match="sweep member 1"):
        launch_sweep(spec, LaunchRequest(recipe="smoke", nodes=1, local=True, runs_dir=str(tmp_path),
                                         overrides=[f"data.index={colour_index}"]), out=lambda *a: None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slurm
def test_attention_ablation_is_one_job_array_with_a_total_budget_and_halving(tmp_path, slurm_cluster,
                                                                              one_val_clip_index):
    env = {**os.environ, **slurm_cluster.env(), "PIPELINE_FAKE_CLOCK": str(STEP_S)}
    p = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "launch.py"), "--recipe", "smoke", "--nodes", "1", "--runs-dir",
         str(tmp_path), "--name", "attn", "--sweep",
         "model.attention_type=divided_space_time,joint_space_time,space_only", "--sweep-budget", "0.012",
         "--halving", "rungs=0.3,0.5,0.7 eta=2", "--array-parallelism", "2", "--wait",
         f"data.index={one_val_clip_index}", *FAST], env=env, capture_output=True, text=True, timeout=400, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "submitted   job array" in p.stdout
    state = json.loads((tmp_path / "attn" / "sweep.json").read_text())
    members = state["members"]
    array = {m["job_id"].split("_")[0] for m in members}
    assert len(array) == 1 and sorted(m["job_id"].split("_")[1] for m in members) == ["0", "1", "2"]  # ONE array
    assert [m["overrides"] for m in members] == [[f"model.attention_type={a}"] for a in
                                                 ("divided_space_time", "joint_space_time", "space_only")]
    assert all(m["base_budget"] == pytest.approx(0.004) for m in members)
    # every member reports at the first rung (0.3 of its budget); with one validation clip the three scores take
    # at most two values, so they cannot rise strictly in arrival order: at least one member is stopped there
    check_decisions(state)
    first = state["rungs"][0]["reports"]
    assert sorted(r["member"] for r in first) == [0, 1, 2] and {r["value"] for r in first} <= {0.0, 100.0}, first
    assert any(r["decision"] == "stop" for r in first), first
    stopped = [m for m in members if m["status"] == "stopped"]
    assert {m["index"] for m in stopped} == {d["member"] for d in state["decisions"] if d["decision"] == "stop"}
    assert all(m["status"] in ("stopped", "finished") for m in members)
    logs = (tmp_path / "attn" / "submitit")
    assert len(list(logs.glob("*_*/*_0_log.out"))) == 3  # the array's tasks log in the sweep directory
    client, runs = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "smoke")
    parent = next(r for r in runs if r.data.tags.get("kind") == "sweep")
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {m["name"] for m in members} and parent.info.status == "FINISHED"
    assert {children[m["name"]].data.tags["attention_type"] for m in members} == {
        "divided_space_time", "joint_space_time", "space_only"}
    assert all(children[m["name"]].data.tags.get("stopped_by") == "halving" for m in stopped)
    p = compare_cli(["--experiment", "smoke", "--runs-dir", str(tmp_path), "--sweep", "attn", "--out",
                     str(tmp_path / "cmp")])
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "cmp" / "pareto.png").stat().st_size > 10_000 and "Pareto front" in p.stdout


@pytest.mark.slurm
def test_a_member_whose_job_died_without_wait_is_seen_crashed_and_its_hours_go_to_the_survivor(
        tmp_path, slurm_cluster, colour_index):
    # no --wait: nobody watches the array. Member 1 waits behind member 0 (%1) and is cancelled before it starts;
    # member 0, at its first rung (0.3 of 0.004 h: step 9), reconciles the sweep with Slurm before deciding, finds
    # member 1's job CANCELLED, records it crashed, receives its 0.004 h and trains on to 0.008 h
    env = {**os.environ, **slurm_cluster.env(), "PIPELINE_FAKE_CLOCK": str(STEP_S)}
    p = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "launch.py"), "--recipe", "smoke", "--nodes", "1", "--runs-dir",
         str(tmp_path), "--name", "crash", "--sweep", "optim.lr=0.002,0.001", "--sweep-budget", "0.008",
         "--halving", "rungs=0.3 eta=2", "--array-parallelism", "1", f"data.index={colour_index}", *FAST],
        env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    sweep_json = tmp_path / "crash" / "sweep.json"
    victim = json.loads(sweep_json.read_text())["members"][1]
    subprocess.run(["scancel", victim["job_id"]], env=env, check=True, timeout=60)
    deadline = time.monotonic() + 300  # member 0's job runs to its end: wait for it (polling, no race)
    while json.loads(sweep_json.read_text())["members"][0]["status"] in ("pending", "running"):
        assert time.monotonic() < deadline, sweep_json.read_text()[-3000:]
        time.sleep(2)
    state = json.loads(sweep_json.read_text())
    m0, m1 = state["members"]
    assert m1["status"] == "crashed" and m1["crashed"]["job_state"] == "CANCELLED" and m1["hours"] == 0.0
    crash = state["decisions"][0]
    assert (crash["kind"], crash["member"], crash["freed"]) == ("crash", 1, pytest.approx(0.004))
    assert crash["given_to"] == {m0["name"]: pytest.approx(0.004)}
    assert state["decisions"][1]["decision"] == "continue" and state["decisions"][1]["member"] == 0  # then its rung
    assert m0["status"] == "finished" and m0["budget"] == pytest.approx(0.008) and m0["hours"] >= 0.008 - 1e-9
    assert state["parent_closed"]  # the last member alive closed the parent run
    p = subprocess.run([sys.executable, str(REPO / "jobs" / "launch.py"), "--sweep-status", "crash", "--runs-dir",
                        str(tmp_path)], env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"{m1['name']} CRASHED: its job {victim['job_id']} is CANCELLED" in p.stdout
    assert "crashed" in p.stdout.splitlines()[2] and "finished" in p.stdout.splitlines()[1]
    client, runs = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "smoke")
    child = next(r for r in runs if r.info.run_name == m1["name"])
    assert child.info.status == "FAILED" and child.data.tags["crashed"] == "CANCELLED"
    parent = next(r for r in runs if r.data.tags.get("kind") == "sweep")
    assert parent.info.status == "FAILED" and parent.data.tags["crashed_members"] == f"{m1['name']} (CANCELLED)"
    p = compare_cli(["--experiment", "smoke", "--runs-dir", str(tmp_path), "--sweep", "crash", "--out",
                     str(tmp_path / "cmp"), "--no-log"])
    assert p.returncode == 0, p.stderr[-2000:]
    assert "CRASHED" in p.stdout and "FAILED" in p.stdout

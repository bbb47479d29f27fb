"""Sweeps: grid expansion, sweep files, the ASHA rule, budget redistribution under the shared state's lock, and
the cost view of the comparison (Pareto front, accuracy at a GPU-hour mark)."""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.config import ConfigError
from pipeline.tracking.compare import RunSummary, accuracy_at, pareto_front, pareto_text
from pipeline.train import sweep
from pipeline.train.sweep import (
    Halving,
    SweepSpec,
    SweepState,
    asha_continues,
    grid_from_args,
    load_sweep_file,
    member_name,
    new_state,
    parse_halving,
    report_rung,
    split_values,
)


def test_grid_is_the_product_of_the_axes_and_list_values_stay_whole():
    members = grid_from_args(["optim.lr=0.01,0.005", "data.scale=[32,40],[36,44]"])
    assert members == [{"optim.lr": "0.01", "data.scale": "[32,40]"}, {"optim.lr": "0.01", "data.scale": "[36,44]"},
                       {"optim.lr": "0.005", "data.scale": "[32,40]"}, {"optim.lr": "0.005", "data.scale": "[36,44]"}]
    assert split_values("a,'b,c',{x: 1, y: 2}") == ["a", "'b,c'", "{x: 1, y: 2}"]
    for bad in (["optim.lr"], ["optim.lr=0.1,,0.2"], ["optim.lr=1,1"], ["optim.lr=1", "optim.lr=2"]):
        with pytest.raises(ConfigError):
            grid_from_args(bad)


def test_sweep_file_lists_members_or_a_grid_and_refuses_what_it_does_not_know(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("name: ab\nmembers:\n  - {optim.lr: 0.01, data.scale: [32, 40]}\n  - {optim.lr: 0.005}\n"
                 "budget: 2\nhalving: {rungs: [0.25, 0.5], eta: 3}\narray_parallelism: 2\n")
    spec = load_sweep_file(f)
    assert spec.overrides(0) == ["optim.lr=0.01", "data.scale=[32, 40]"] and spec.name == "ab"
    assert spec.total_budget == 2 and spec.halving == Halving([0.25, 0.5], 3.0) and spec.array_parallelism == 2
    f.write_text("grid: {model.attention_type: [divided_space_time, space_only]}\n")
    assert len(load_sweep_file(f).members) == 2
    for text in ("grid: {a: [1]}\nmembers: [{a: 1}]\n", "members: []\n", "grid: {a: [1]}\nbogus: 1\n",
                 "grid: {a: [1]}\nhalving: {rungs: [1.5]}\n", "grid: {a: [1]}\nbudget: -1\n",
                 "!!python/object/apply:os.system ['true']\n"):
        f.write_text(text)
        with pytest.raises(ConfigError):
            load_sweep_file(f)


def test_halving_flag_and_member_names():
    assert parse_halving("rungs=0.25,0.5 eta=2") == Halving([0.25, 0.5], 2.0)
    for bad in ("rungs=0.5,0.25", "eta=2", "rungs=0.5 eta=1", "rungs=x", "rungs=0.5 speed=3"):
        with pytest.raises(ConfigError):
            parse_halving(bad)
    name = member_name("attn", 2, {"model.attention_type": "space_only", "data.scale": "[32, 40]"})
    assert name == "attn-2-attention_type-space_only_scale-32-40"


def test_asha_keeps_the_top_1_over_eta_of_those_reported_so_far_and_the_first_arrival():
    assert asha_continues([], 10.0, 2) == (True, 1, 1)  # the first to arrive continues
    assert asha_continues([50.0], 40.0, 2) == (False, 2, 2)
    assert asha_continues([50.0], 50.0, 2) == (False, 2, 2)  # a tie does not displace the earlier arrival
    assert asha_continues([50.0], 60.0, 2) == (True, 1, 2)
    assert asha_continues([50.0, 70.0, 10.0], 60.0, 2) == (True, 2, 4)  # top 2 of 4
    assert asha_continues([50.0, 70.0, 10.0], 60.0, 4) == (False, 2, 4)  # top 1 of 4


def _state(n: int = 3, base: float = 1.0) -> dict:
    spec = SweepSpec([{}] * n, total_budget=n * base, halving=Halving([0.25, 0.5], 2))
    rows = [{"name": f"m{i}", "overrides": [], "run_dir": f"/r/m{i}", "base_budget": base} for i in range(n)]
    return new_state("s", spec, "smoke", rows, "local", None)


def test_a_stopped_member_frees_its_unused_hours_to_the_members_still_alive():
    s = _state()
    s["members"][0]["status"] = "finished"  # finished members take nothing
    s["members"][1]["status"] = "running"
    assert report_rung(s, 1, 0, 40.0, 0.3, 10, "val_top1")["decision"] == "continue"  # first at rung 0
    s["members"][2]["status"] = "running"
    d = report_rung(s, 2, 0, 30.0, 0.25, 9, "val_top1")
    assert d["decision"] == "stop" and d["freed"] == pytest.approx(0.75) and d["given_to"] == {"m1": 0.75}
    assert s["members"][2]["status"] == "stopped" and s["members"][2]["budget"] == 0.25
    assert s["members"][1]["budget"] == pytest.approx(1.75) and s["members"][0]["budget"] == 1.0
    assert "STOP" in sweep.describe(d) and "m1 +0.75 h" in sweep.describe(d)
    d = report_rung(s, 1, 1, 10.0, 0.6, 20, "val_top1")  # alone at rung 1: continues
    assert d["decision"] == "continue" and len(s["decisions"]) == 3
    s["members"][1]["status"] = "finished"
    s2 = _state(2)
    s2["members"][0]["status"] = "finished"
    report_rung(s2, 0, 0, 50.0, 0.3, 5, "val_top1")
    s2["members"][1]["status"] = "running"
    d = report_rung(s2, 1, 0, 20.0, 0.3, 5, "val_top1")
    assert d["given_to"] == {} and s2["unallocated"] == pytest.approx(0.7)  # nobody alive to take it


def _report_many(path: str, member: int, n: int) -> None:
    state = SweepState(path)
    for i in range(n):
        with state.update() as s:
            s["members"][member]["hours"] += 1.0
            s["decisions"].append({"member": member, "i": i})


def test_the_shared_state_is_updated_under_a_lock_by_several_processes(tmp_path):
    state = SweepState(tmp_path)
    state.write(_state(2))
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_report_many, args=(str(tmp_path), m, 40)) for m in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    s = json.loads((tmp_path / "sweep.json").read_text())
    assert len(s["decisions"]) == 80 and [m["hours"] for m in s["members"]] == [40.0, 40.0]  # nothing lost


def _run(name: str, hours: float | None, test: float | None, curve: list[tuple[float, float]]) -> RunSummary:
    return RunSummary(run_id=name, run=name, model="m", attention="a", clip="", resolution="", params_m=None,
                      tflops_views="", gpu_hours=hours, gpu_hours_unit="gpu", top1=test, top5=None, clips_per_s=None,
                      budget=None, status="FINISHED", curve=curve)


def test_pareto_front_and_accuracy_at_a_gpu_hour_mark():
    a = _run("a", 1.0, 60.0, [(0.5, 40.0), (1.0, 58.0)])
    b = _run("b", 2.0, 70.0, [(1.0, 50.0), (2.0, 69.0)])
    c = _run("c", 2.5, 65.0, [(1.2, 60.0), (2.5, 64.0)])  # dominated by b: more hours, less accuracy
    d = _run("d", 0.4, None, [(0.2, 30.0), (0.4, 35.0)])  # no test: its last validation counts
    assert [s.run for s in pareto_front([a, b, c, d])] == ["d", "a", "b"]
    assert accuracy_at(b, 1.5) == (50.0, "")
    assert accuracy_at(c, 1.0) == (None, "no validation by then")
    assert accuracy_at(d, 1.5)[0] == 35.0 and accuracy_at(d, 1.5)[1].startswith("never reached")
    text = pareto_text([a, b, c, d])
    marked = {line.split()[1] for line in text.splitlines()[3:] if line.startswith("*")}
    assert marked == {"a", "b", "d"} and "35.00 (val)" in text


def test_sweep_inputs_that_are_not_finite_or_not_whole_are_refused_naming_the_input(tmp_path, capsys):
    f = tmp_path / "s.yaml"
    for text, says in (("grid: {a: [1, 2]}\nbudget: .nan\n", "budget=nan: expected the sweep's total GPU-hours, a "
                        "finite number"),
                       ("grid: {a: [1, 2]}\nbudget: .inf\n", "budget=inf: expected the sweep's total GPU-hours"),
                       ("grid: {a: [1, 2]}\nhalving: {rungs: [0.5], eta: .inf}\n", "halving eta=inf: expected a "
                        "finite number above 1"),
                       ("grid: {a: [1, 2]}\nhalving: {rungs: [.nan]}\n", "halving rungs=[nan]"),
                       ("grid: {optim.lr: [0.1, 0.2, 0.1]}\n", "grid: optim.lr: 0.1 listed twice"),
                       ("grid: {data.scale: [[32, 40], [32, 40]]}\n", r"grid: data.scale: [32, 40] listed twice")):
        f.write_text(text)
        with pytest.raises(ConfigError) as e:
            load_sweep_file(f)
        assert str(e.value).startswith(f"sweep file {f}: ") and says in str(e.value), str(e.value)
    f.write_text("grid: {optim.lr: [1, 1.0]}\n")  # two values as typed (the CLI compares what was typed, too)
    assert len(load_sweep_file(f).members) == 2
    with pytest.raises(ConfigError, match=r"halving eta=inf: expected a finite number above 1"):
        parse_halving("rungs=0.5 eta=inf")
    with pytest.raises(ConfigError, match="halving eta=nan"):
        parse_halving("rungs=0.5 eta=nan")
    # quotes and brackets must close: "0.1,'0.2" is not a member with the value '0.2
    for item, says in (("optim.lr=0.1,'0.2", "the quote ' is never closed"),
                       ('optim.lr=0.1,"0.2', 'the quote " is never closed'),
                       ("data.scale=[32,40", "a bracket is never closed"),
                       ("data.scale=32,40]", "']' closes a bracket that was never opened")):
        with pytest.raises(ConfigError) as e:
            grid_from_args([item])
        assert str(e.value).startswith(f"--sweep {item.partition('=')[0]}=") and says in str(e.value), str(e.value)
    assert grid_from_args(["optim.lr=0.1,'0.2'"]) == [{"optim.lr": "0.1"}, {"optim.lr": "'0.2'"}]
    # the command line's total budget: blamed on --sweep-budget, before any member is looked at or created
    from pipeline.cli.launch import main as launch_main

    for value in ("inf", "nan", "-1"):
        code = launch_main(["--recipe", "smoke", "--local", "--runs-dir", str(tmp_path / "runs"), "--sweep",
                            "optim.lr=0.1,0.2", "--sweep-budget", value])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"launch: --sweep-budget {float(value)}: expected the sweep's total "
                                            f"GPU-hours, a finite number above 0"), err
    assert not (tmp_path / "runs").exists()


def test_sweep_parent_refuses_names_that_would_break_the_filter_and_unknown_experiments(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.compare import sweep_parent

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("smoke")
    parent = client.create_run(exp, run_name="lr", tags={"kind": "sweep", "sweep": "lr", "halving.002": "second",
                                                         "halving.001": "first"})
    client.create_run(exp, run_name="other", tags={"kind": "sweep", "sweep": "lr2"})
    assert sweep_parent(uri, "smoke", "lr") == (parent.info.run_id, ["first", "second"])
    assert sweep_parent(uri, "smoke", "nope") == (None, [])
    for name in ("lr' or tags.sweep = 'lr2", "a b", "../x", ""):
        with pytest.raises(ValueError, match="sweep=.*expected letters, digits"):
            sweep_parent(uri, "smoke", name)
    with pytest.raises(ValueError, match=r"no experiment 'missing' at sqlite:.*experiments there: \[.*'smoke'"):
        sweep_parent(uri, "missing", "lr")


# -- members that die, members that end early, budget-planned members --------------------------------------


def _fake_slurm(tmp_path, monkeypatch, states: dict, squeue: bool = True) -> None:
    """``squeue``, ``scontrol`` and ``sacct`` on PATH answering from ``states`` (job id -> state), as a cluster with
    accounting does. A plain state is what the controller and accounting both say; ``{"controller": ...,
    "accounting": ...}`` says each one's (a key left out: that one does not know the job). The controller's
    commands answer for the jobs it knows (``squeue --jobs=a,b``: the known ones, one line each; one id it does
    not know: ``Invalid job id specified``), ``sacct -X -n -P`` ``id|STATE`` rows for the jobs accounting knows.
    Every call is logged to ``calls.log``; a file ``hang`` (seconds) makes every command sleep that long first.
    ``squeue=False``: a cluster without squeue (scontrol is asked)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (tmp_path / "states.json").write_text(json.dumps(states))
    head = (f"#!{sys.executable}\nimport json, os, sys, time\nroot = {str(tmp_path)!r}\n"
            "with open(os.path.join(root, 'calls.log'), 'a') as f:\n"
            "    f.write(' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:]) + '\\n')\n"
            "if os.path.exists(os.path.join(root, 'hang')):\n"
            "    time.sleep(float(open(os.path.join(root, 'hang')).read()))\n"
            "raw = json.load(open(os.path.join(root, 'states.json')))\n"
            "states = {k: v if isinstance(v, dict) else {'controller': v, 'accounting': v} for k, v in raw.items()}\n"
            "controller = {k: v['controller'] for k, v in states.items() if v.get('controller')}\n"
            "accounting = {k: v['accounting'] for k, v in states.items() if v.get('accounting')}\n"
            "invalid = 'slurm_load_jobs error: Invalid job id specified'\n")
    (bin_dir / "sacct").write_text(head + (
        "ids = sys.argv[sys.argv.index('-j') + 1].split(',')\n"
        "assert {'-X', '-n', '-P'} <= set(sys.argv), sys.argv\n"
        "for i in ids:\n"
        "    if i in accounting:\n"
        "        print(f'{i}|{accounting[i]}')\n"))
    (bin_dir / "scontrol").write_text(head + (
        "job = sys.argv[-1]\n"
        "if job in controller:\n"
        "    print(f'JobId=1 ArrayJobId=77 JobName=x JobState={controller[job]} Reason=None')\n"
        "else:\n"
        "    print(invalid, file=sys.stderr)\n"
        "    sys.exit(1)\n"))
    if squeue:
        (bin_dir / "squeue").write_text(head + (
            "assert {'--noheader', '--array', '--states=all', '--format=%i|%T'} <= set(sys.argv), sys.argv\n"
            "ids = next(a for a in sys.argv if a.startswith('--jobs=')).removeprefix('--jobs=').split(',')\n"
            "if len(ids) == 1 and ids[0] not in controller:\n"
            "    print(invalid, file=sys.stderr)\n"
            "    sys.exit(1)\n"
            "for i in ids:\n"
            "    if i in controller:\n"
            "        print(f'{i}|{controller[i].split()[0]}')\n"))
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    # without squeue: these commands alone (a squeue installed here must not answer instead)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}" if squeue else str(bin_dir))


def _calls(tmp_path) -> list[str]:
    log = tmp_path / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def _sweep_on_disk(tmp_path, n: int, base: float = 1.0, executor: str = "slurm", halving: bool = True):
    spec = SweepSpec([{}] * n, total_budget=n * base, halving=Halving([0.25, 0.5], 2) if halving else None)
    rows = [{"name": f"m{i}", "overrides": [], "run_dir": str(tmp_path / f"m{i}"), "base_budget": base}
            for i in range(n)]
    for row in rows:
        Path(row["run_dir"]).mkdir()
    state = SweepState(tmp_path)
    state.write(new_state("s", spec, "smoke", rows, executor, None))
    return state


def _mlflow_runs(tmp_path, state: SweepState, members: list[int]):
    """A parent run for the sweep and child runs for ``members``, recorded as launch records them."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("smoke")
    parent = client.create_run(exp, run_name="s", tags={"kind": "sweep", "sweep": "s"})
    record = {"tracking_uri": uri, "experiment": "smoke", "experiment_id": exp, "run_id": parent.info.run_id}
    with state.update() as s:
        s["mlflow"] = record
    children = {}
    for i in members:
        run = client.create_run(exp, run_name=f"m{i}", tags={"sweep": "s"})
        (tmp_path / f"m{i}" / "mlflow.json").write_text(json.dumps({**record, "run_id": run.info.run_id}))
        children[i] = run.info.run_id
    return client, parent.info.run_id, children


def test_a_slurm_member_whose_job_died_is_recorded_crashed_and_its_hours_go_to_the_survivors(tmp_path, monkeypatch,
                                                                                           capsys):
    # five members, all "running" in sweep.json; Slurm says: 0 ran out of memory, 1 was preempted (it will be
    # requeued: alive), 2 runs, 3 was cancelled, 4 is no longer known anywhere (ended and purged)
    _fake_slurm(tmp_path, monkeypatch, {"77_0": "OUT_OF_MEMORY", "77_1": "PREEMPTED", "77_2": "RUNNING",
                                        "77_3": "CANCELLED by 1000"})
    state = _sweep_on_disk(tmp_path, 5)
    with state.update() as s:
        for m in s["members"]:
            m.update(status="running", job_id=f"77_{m['index']}")
        s["members"][3]["hours"] = 0.1  # its last rung check
    (tmp_path / "m0" / "gpu_hours.json").write_text(json.dumps({"hours": 0.3}))  # its account, last saved
    client, parent, children = _mlflow_runs(tmp_path, state, [0, 2])
    from pipeline.cli.launch import main as launch_main

    assert launch_main(["--sweep-status", tmp_path.name, "--runs-dir", str(tmp_path.parent)]) == 0
    shown = capsys.readouterr().out
    s = state.read()
    assert [m["status"] for m in s["members"]] == ["crashed", "running", "running", "crashed", "crashed"]
    assert [m.get("crashed", {}).get("job_state") for m in s["members"]] == [
        "OUT_OF_MEMORY", None, None, "CANCELLED", "GONE"]
    # 0.7 + 0.9 + 1.0 unused hours, in equal parts to the two alive (none to a member that died with them)
    assert [m["budget"] for m in s["members"]] == pytest.approx([0.3, 2.3, 2.3, 0.1, 0.0])
    assert sum(m["budget"] for m in s["members"]) + s["unallocated"] == pytest.approx(s["total_budget"])
    crashes = [d for d in s["decisions"] if d["kind"] == "crash"]
    assert [(d["member"], d["job_state"], d["freed"]) for d in crashes] == [
        (0, "OUT_OF_MEMORY", pytest.approx(0.7)), (3, "CANCELLED", pytest.approx(0.9)), (4, "GONE", 1.0)]
    assert crashes[0]["given_to"] == {"m1": pytest.approx(0.35), "m2": pytest.approx(0.35)}
    assert "m0 CRASHED: its job 77_0 is OUT_OF_MEMORY" in shown and "0.7 h freed (m1 +0.35 h, m2 +0.35 h)" in shown
    assert "job 77_1 PREEMPTED" in shown and "crashed   0.3 of 0.3 h" in shown
    # the crashed member's MLflow run is FAILED (it would stay RUNNING); the parent has the decisions in order
    run = client.get_run(children[0])
    assert run.info.status == "FAILED" and run.data.tags["crashed"] == "OUT_OF_MEMORY"
    assert client.get_run(children[2]).info.status == "RUNNING"
    tags = client.get_run(parent).data.tags
    assert [tags[f"halving.{k:03d}"].split(":")[0] for k in (1, 2, 3)] == ["m0 CRASHED", "m3 CRASHED", "m4 CRASHED"]
    assert client.get_run(parent).info.status == "RUNNING"  # two members are alive
    assert sweep.reconcile(state) == []  # once: a second look changes nothing
    # the two survivors die too: nobody is left alive, the hours are unallocated and the parent is closed FAILED
    (tmp_path / "states.json").write_text(json.dumps({"77_1": "NODE_FAIL", "77_2": "TIMEOUT"}))
    assert [d["job_state"] for d in sweep.reconcile(state)] == ["NODE_FAIL", "TIMEOUT"]
    s = state.read()
    assert s["unallocated"] == pytest.approx(4.6) and s["parent_closed"]
    assert client.get_run(parent).info.status == "FAILED" and client.get_run(parent).data.tags[
        "crashed_members"].startswith("m0 (OUT_OF_MEMORY),m1 (NODE_FAIL)")


def test_a_job_slurm_cannot_tell_about_or_that_runs_again_is_left_alone(tmp_path, monkeypatch):
    # pending and requeued jobs are alive; a pending array task accounting does not know yet (still folded into its
    # array's record) is found by the controller; without any Slurm command nothing can be told, so nothing is
    # decided
    _fake_slurm(tmp_path, monkeypatch, {"77_0": "PENDING", "77_1": "REQUEUED", "77_2": {"controller": "PENDING"},
                                        "77_3": "RUNNING"})
    state = _sweep_on_disk(tmp_path, 4)
    with state.update() as s:
        for m in s["members"]:
            m.update(status="running" if m["index"] else "pending", job_id=f"77_{m['index']}")
    seen: dict[int, str] = {}
    assert sweep.reconcile(state, seen=seen) == [] and seen == {0: "PENDING", 1: "REQUEUED", 2: "PENDING",
                                                               3: "RUNNING"}
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert sweep.slurm_job_states(["77_0"]) == {} and sweep.reconcile(state) == []
    # a member that started again (another attempt) between the probe and the lock is not judged on the old answer
    def probe(s, members):
        with state.update() as st:
            st["members"][3].setdefault("attempts", []).append({"started": 1.0})
        return {3: "FAILED"}
    assert sweep.reconcile(state, probe=probe) == [] and state.read()["members"][3]["status"] == "running"


def test_a_local_member_whose_process_is_gone_is_recorded_crashed(tmp_path):
    import subprocess

    state = _sweep_on_disk(tmp_path, 5, executor="local")
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    live, dead, reused = subprocess.Popen(sleeper), subprocess.Popen(sleeper), subprocess.Popen(sleeper)
    launcher = subprocess.Popen(sleeper)
    try:
        with state.update() as s:
            s["launcher"] = sweep.local_process(launcher.pid)
            for i, p in enumerate((live, dead, reused)):
                s["members"][i].update(status="running", job_id=str(p.pid), process=sweep.local_process(p.pid))
            s["members"][2]["process"]["start"] = "1"  # the pid now names another process
            s["members"][3].update(status="running", job_id="1", process={**sweep.local_process(1), "host": "other"})
            s["members"][4]["status"] = "pending"  # not started yet
        dead.kill()
        os.waitid(os.P_PID, dead.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie, ended all the same
        assert sweep.reconcile(state) and [m["status"] for m in state.read()["members"]] == [
            "running", "crashed", "crashed", "running", "pending"]  # another host's process: cannot be told
        assert state.read()["members"][1]["crashed"]["job_state"] == "EXITED"
        launcher.kill()
        launcher.wait()  # the launcher is gone: the pending member never starts
        (d,) = sweep.reconcile(state)  # its hour, and the thirds of the two crashed members' it had received
        assert (d["member"], d["job_state"], d["freed"]) == (4, "NOT_STARTED", pytest.approx(1 + 2 / 3))
        assert d["given_to"] == {"m0": pytest.approx(5 / 6), "m3": pytest.approx(5 / 6)}
    finally:
        for p in (live, dead, reused, launcher):
            p.kill()
            p.wait()


def test_a_member_that_ends_before_its_budget_gives_the_rest_back(tmp_path):
    state = _sweep_on_disk(tmp_path, 4)
    with state.update() as s:
        s["members"][1]["status"] = "running"
        s["members"][3]["status"] = "stopped"  # halving stopped it: takes nothing
        s["members"][3]["budget"] = 0.2
        s["members"][0]["status"] = "running"
    assert sweep.record_end(state.read(), 1, "budget", 1.0001) is None  # its budget ended it: nothing left
    trainer = SimpleNamespace(denv=SimpleNamespace(is_main=True), device=None, sinks=_Sinks(),
                              account=SimpleNamespace(budget=1.0), cfg=None)
    member = sweep.SweepMember({"index": 0, "sweep_dir": str(tmp_path), "sweep": "s"}, trainer)
    member.ended("done", 0.4)  # its steps ran out at 0.4 of its 1.0 h
    s = state.read()
    d = s["decisions"][-1]
    assert (d["kind"], d["member"], d["outcome"], d["freed"]) == ("finish", 0, "done", pytest.approx(0.6))
    assert d["given_to"] == {"m1": pytest.approx(0.3), "m2": pytest.approx(0.3)}  # running and pending alike
    assert [m["budget"] for m in s["members"]] == pytest.approx([0.4, 1.3, 1.3, 0.2])
    assert s["members"][0]["status"] == "finished" and trainer.sinks.tags["sweep_returned_hours"] == "0.6"
    assert sweep.describe(d) == "m0 FINISHED EARLY (done) after 0.4 h of its 1 h; 0.6 h freed (m1 +0.3 h, m2 +0.3 h)"


class _Sinks:
    def __init__(self) -> None:
        self.tags: dict = {}
        self.metrics: list = []

    def set_tags(self, tags):
        self.tags.update(tags)

    def log_metrics(self, metrics, step):
        self.metrics.append({"step": step, **metrics})

    def log_params(self, params):
        pass


def test_a_budget_planned_member_refits_its_schedule_to_hours_it_is_granted(tmp_path, monkeypatch):
    """``train.plan_by=budget`` in a sweep: when another member ends early and its hours are granted to this one,
    the next validation's check makes the grant the run's budget and the plan re-fits its total to it (on a
    virtual clock: 3.6 s, 0.001 process-hours, a step)."""
    import torch

    from pipeline.config import load_recipe
    from pipeline.train import budget
    from pipeline.train.plan import BudgetPlanner, ProgressSchedule, fit_total_steps

    now = [1000.0]
    monkeypatch.setattr(budget, "clock", lambda: now[0])
    monkeypatch.delenv(budget.FAKE_CLOCK_ENV, raising=False)
    state = _sweep_on_disk(tmp_path, 2, halving=False)
    run_dir = tmp_path / "m0"
    (run_dir / sweep.MEMBER_FILE).write_text(json.dumps({"sweep": "s", "sweep_dir": str(tmp_path), "index": 0}))
    cfg = load_recipe("demo_order", ["train.plan_by=budget", "budget.gpu_hours=1.0", "train.global_batch=8",
                                     "train.micro_batch=8", "train.val_every=-1", "train.log_every=10",
                                     "train.calibration_steps=8"])
    sinks = _Sinks()
    trainer = SimpleNamespace(cfg=cfg, run_dir=run_dir, denv=SimpleNamespace(is_main=True), device=torch.device("cpu"),
                              sinks=sinks, account=budget.GpuHours(run_dir, 1, "cpu-process", 1.0), engine=None)
    member = sweep.attach_member(trainer)
    assert isinstance(trainer.account, sweep.SweepHours)
    schedule = ProgressSchedule(cfg, 48)
    planner = BudgetPlanner(cfg, schedule, trainer.account, sinks, rank=0, device=torch.device("cpu"), per_epoch=48,
                            val_clips=96, test_views=0, resumed_step=0)
    for step in range(1, 101):
        now[0] += 3.6
        planner.after_step(step)
    first = planner.total
    assert planner.fits[-1].budget_gpu_hours == 1.0 and 960 <= first <= 1000  # about 0.98 h at 0.001 h a step
    with state.update() as s:  # member 1 ends early, unused: its whole hour is granted to member 0
        s["members"][0]["status"] = "running"
        assert sweep.record_end(s, 1, "done", 0.0)["given_to"] == {"m0": 1.0}
    rate = schedule(100)
    assert member.check(100, {"val_top1": 50.0}) is False  # the validation's check reads the grant ...
    planner.after_step(100)  # ... and the plan re-fits to it at once, without moving the rate
    assert cfg.budget.gpu_hours == 2.0 and trainer.account.budget == 2.0
    assert planner.fits[-1].budget_gpu_hours == 2.0 and schedule(100) == rate
    expected = fit_total_steps(100, 0.1, 2.0, cfg.budget.plan_margin, 0.001, 0.0, -1, 0.0).total_steps
    assert planner.total == pytest.approx(expected, abs=1) and planner.total > 1.9 * first  # about 1.96 h
    assert {"sweep/budget": 2.0, "step": 100} in sinks.metrics


# -- review fixes: the controller first, the attempt running now, a budget of nothing, one deadline, pid reuse ------


@pytest.mark.parametrize("controller", ["squeue", "scontrol"])
def test_the_controller_wins_over_accounting_and_only_jobs_it_no_longer_knows_are_asked_of_sacct(
        tmp_path, monkeypatch, controller):
    # 0: requeued after a node failure (same id): the controller has it PENDING, accounting still says NODE_FAIL;
    # 1: preempted with PreemptMode=CANCEL and purged: only accounting knows it, PREEMPTED -- it never runs again;
    # 2: preempted, held by the controller (it is requeued): alive; 3: failed and purged; 4: running
    _fake_slurm(tmp_path, monkeypatch, {"77_0": {"controller": "PENDING", "accounting": "NODE_FAIL"},
                                        "77_1": {"accounting": "PREEMPTED"}, "77_2": {"controller": "PREEMPTED"},
                                        "77_3": {"accounting": "FAILED"}, "77_4": "RUNNING"},
                squeue=controller == "squeue")
    state = _sweep_on_disk(tmp_path, 5, halving=False)
    with state.update() as s:
        for m in s["members"]:
            m.update(status="running", job_id=f"77_{m['index']}")
    seen: dict[int, str] = {}
    decisions = sweep.reconcile(state, seen=seen)
    assert [(d["member"], d["job_state"]) for d in decisions] == [(1, "PREEMPTED"), (3, "FAILED")]
    assert [m["status"] for m in state.read()["members"]] == ["running", "crashed", "running", "crashed", "running"]
    assert seen[0] == "PENDING" and seen[2] == "PREEMPTED" and seen[1].startswith("PREEMPTED (ended")
    calls = _calls(tmp_path)
    if controller == "squeue":  # one call for every job, then accounting for the two it no longer knows
        assert [c.split()[0] for c in calls] == ["squeue", "sacct"]
        assert calls[0].endswith("--jobs=77_0,77_1,77_2,77_3,77_4") and calls[1].endswith("-j 77_1,77_3")
    else:
        assert [c.split()[0] for c in calls] == ["scontrol"] * 5 + ["sacct"]
    # one job id the controller does not know (squeue answers "Invalid job id") nor accounting: gone
    assert sweep.slurm_job_states(["99"]) == {"99": "GONE"}


def test_a_hung_controller_cannot_hold_a_reconcile_past_one_deadline(tmp_path, monkeypatch):
    import time

    _fake_slurm(tmp_path, monkeypatch, {"77_0": "FAILED", "77_1": "RUNNING", "77_2": "TIMEOUT"})
    (tmp_path / "hang").write_text("20")  # every Slurm command hangs (a controller that does not answer)
    state = _sweep_on_disk(tmp_path, 3, halving=False)
    with state.update() as s:
        for m in s["members"]:
            m.update(status="running", job_id=f"77_{m['index']}")
    monkeypatch.setattr(sweep, "SLURM_PROBE_S", 1.5, raising=False)
    t0 = time.monotonic()
    assert sweep.reconcile(state) == []  # nothing told in time: every member is left as it is (unknown = alive)
    assert time.monotonic() - t0 < 6
    assert [m["status"] for m in state.read()["members"]] == ["running"] * 3
    # a member's own check (rank 0, the other ranks waiting in a collective) also keeps within a quarter of the
    # run's collective timeout, here 4 s
    monkeypatch.setattr(sweep, "SLURM_PROBE_S", 60.0, raising=False)
    _no_job_env(monkeypatch)
    trainer = _trainer(SimpleNamespace(budget=1.0, unit="gpu"))
    trainer.cfg.train = SimpleNamespace(dist_timeout_s=4)
    member = sweep.SweepMember({"index": 0, "sweep_dir": str(tmp_path), "sweep": "s"}, trainer)
    t0 = time.monotonic()
    assert sweep.reconcile(state, probe=member._probe(), me=0) == [] and time.monotonic() - t0 < 5
    (tmp_path / "hang").unlink()
    assert [d["job_state"] for d in sweep.reconcile(state)] == ["TIMEOUT"]  # answered: decided


def _trainer(account, cfg_budget: float = 1.0):
    return SimpleNamespace(denv=SimpleNamespace(is_main=True), device=None, sinks=_Sinks(), account=account,
                           cfg=SimpleNamespace(budget=SimpleNamespace(gpu_hours=cfg_budget)), engine=None)


def _no_job_env(monkeypatch) -> None:
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SUBMITIT_LOCAL_JOB_ID"):
        monkeypatch.delenv(key, raising=False)


def test_a_member_resumed_by_hand_is_probed_as_the_job_it_runs_now(tmp_path, monkeypatch):
    # Slurm: array task 77_0 failed and was recorded crashed; its --resume runs as job 91, which Slurm has RUNNING
    _no_job_env(monkeypatch)
    _fake_slurm(tmp_path, monkeypatch, {"77_0": "FAILED", "77_1": "RUNNING", "91": "RUNNING"})
    state = _sweep_on_disk(tmp_path, 2, halving=False)
    with state.update() as s:
        for m in s["members"]:
            m.update(status="running", job_id=f"77_{m['index']}")
    assert [d["member"] for d in sweep.reconcile(state)] == [0]
    monkeypatch.setenv("SLURM_JOB_ID", "91")
    sweep.SweepMember({"index": 0, "sweep_dir": str(tmp_path), "sweep": "s"}, _trainer(SimpleNamespace(
        budget=1.0, unit="gpu")))
    m0 = state.read()["members"][0]
    assert (m0["status"], m0["job_id"], m0.get("process"), m0["attempts"][-1]["job"]) == ("running", "91", None, "91")
    assert sweep.reconcile(state, me=1) == [] and state.read()["members"][0]["status"] == "running"
    # a --wait launcher that sees the array task 77_0 end now does not mark the member running as job 91
    assert sweep.mark_crashed(state, 0, "FAILED", "77_0") is None and state.read()["members"][0]["status"] == "running"
    # an array task records the array's id for it (SLURM_JOB_ID is the task's own job id)
    monkeypatch.setenv("SLURM_JOB_ID", "80")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    sweep.SweepMember({"index": 1, "sweep_dir": str(tmp_path), "sweep": "s"}, _trainer(SimpleNamespace(
        budget=1.0, unit="gpu")))
    assert state.read()["members"][1]["job_id"] == "77_1"


def test_a_local_member_resumed_by_hand_is_probed_as_the_process_it_runs_now(tmp_path, monkeypatch):
    import subprocess

    _no_job_env(monkeypatch)
    state = _sweep_on_disk(tmp_path, 2, executor="local", halving=False)
    first = subprocess.Popen([sys.executable, "-c", "pass"])
    first.wait()  # member 0's first process: gone
    with state.update() as s:
        s["members"][0].update(status="running", job_id=str(first.pid), process=sweep.local_process(first.pid))
        s["members"][1]["status"] = "running"
    assert [d["member"] for d in sweep.reconcile(state, me=1)] == [0]
    # resumed by hand in this process (no Slurm, no submitit): this process is the one to probe
    sweep.SweepMember({"index": 0, "sweep_dir": str(tmp_path), "sweep": "s"}, _trainer(SimpleNamespace(
        budget=1.0, unit="gpu")))
    m0 = state.read()["members"][0]
    assert m0["job_id"] == str(os.getpid()) and m0["process"] == sweep.local_process(os.getpid())
    assert sweep.reconcile(state, me=1) == [] and state.read()["members"][0]["status"] == "running"


def test_a_revived_member_with_nothing_left_stops_instead_of_training_its_launch_budget(tmp_path, monkeypatch):
    from pipeline.train import budget

    _no_job_env(monkeypatch)
    monkeypatch.delenv(budget.FAKE_CLOCK_ENV, raising=False)
    state = _sweep_on_disk(tmp_path, 2, halving=False)
    with state.update() as s:
        s["members"][1]["status"] = "running"
        s["members"][0]["job_id"] = "77_0"
    # member 0, pending, is told gone: recorded crashed having used nothing, its whole hour goes to member 1
    (d,) = sweep.reconcile(state, probe=lambda s, ms: {0: "GONE"})
    assert (d["freed"], d["given_to"]) == (1.0, {"m1": 1.0})
    # ... and its job starts after all, with the budget.gpu_hours it was launched with (1.0)
    run_dir = tmp_path / "m0"
    (run_dir / sweep.MEMBER_FILE).write_text(json.dumps({"sweep": "s", "sweep_dir": str(tmp_path), "index": 0}))
    trainer = _trainer(budget.GpuHours(run_dir, 1, "gpu", 1.0))
    trainer.run_dir = run_dir
    member = sweep.attach_member(trainer)
    s = state.read()
    assert s["members"][0]["status"] == "running" and s["decisions"][-1]["kind"] == "resume"
    assert trainer.account.budget == 0.0 and trainer.account.exhausted  # a stop, not "no budget"
    assert "nothing left, it stops at its first step" in sweep.describe(s["decisions"][-1])
    # what the sweep's members may use is still its total: nobody spends the freed hour twice
    assert trainer.account.budget + s["members"][1]["budget"] + s["unallocated"] == pytest.approx(s["total_budget"])
    # hours freed later reach it like any member alive: then it trains on
    with state.update() as st:
        sweep.record_end(st, 1, "done", 1.5)
    assert not trainer.account.exhausted and trainer.account.budget == pytest.approx(0.5) and member.budgeted


def test_a_member_without_a_budget_is_not_stopped_by_a_zero_in_sweep_json(tmp_path, monkeypatch):
    from pipeline.train import budget

    _no_job_env(monkeypatch)
    monkeypatch.delenv(budget.FAKE_CLOCK_ENV, raising=False)
    state = _sweep_on_disk(tmp_path, 2, base=0.0, halving=False)  # the recipe has no budget: 0 means none
    run_dir = tmp_path / "m0"
    (run_dir / sweep.MEMBER_FILE).write_text(json.dumps({"sweep": "s", "sweep_dir": str(tmp_path), "index": 0}))
    trainer = _trainer(budget.GpuHours(run_dir, 1, "gpu", 0.0), cfg_budget=0.0)
    trainer.run_dir = run_dir
    member = sweep.attach_member(trainer)
    assert not member.budgeted and trainer.account.budget == 0.0 and not trainer.account.exhausted
    assert state.read()["members"][0]["status"] == "running"


def test_a_process_record_without_a_start_time_is_dead_even_when_its_pid_runs_again(tmp_path):
    import subprocess

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        # recorded when the pid named no process (it had ended); the pid now names a running process
        record = {**sweep.local_process(live.pid), "start": None}
        assert sweep.local_process(live.pid)["start"] is not None and sweep.local_alive(record) is False
        assert sweep.local_alive(sweep.local_process(live.pid)) is True
        assert sweep.local_alive({**record, "host": "another-host"}) is None  # another host: cannot be told
        state = _sweep_on_disk(tmp_path, 2, executor="local", halving=False)
        with state.update() as s:
            s["members"][0].update(status="running", job_id=str(live.pid), process=record)
            s["members"][1].update(status="running", job_id=str(live.pid), process=sweep.local_process(live.pid))
        assert [(d["member"], d["job_state"]) for d in sweep.reconcile(state)] == [(0, "EXITED")]
    finally:
        live.kill()
        live.wait()

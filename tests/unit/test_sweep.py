"""Sweeps: grid expansion, sweep files, the ASHA rule, budget redistribution under the shared state's lock, and
the cost view of the comparison (Pareto front, accuracy at a GPU-hour mark)."""

from __future__ import annotations

import json
import multiprocessing

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

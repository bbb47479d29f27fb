"""The model benchmarks and studies (benchmarks/) run end to end as a user runs them (small settings); the user
commands (jobs/, and the console scripts of pyproject.toml) start from any directory."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_job(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_demo_prints_the_paper_numbers_and_classifies():
    out = run_job("benchmarks/model_demo.py", "--quick")
    assert out.returncode == 0, out.stderr
    assert "121.57M" in out.stdout and "0.59T" in out.stdout and "7.15T" in out.stdout
    assert out.stdout.count("-> class") == 5  # one forward pass per attention scheme


def test_bench_compares_with_hugging_face_and_writes_json(tmp_path):
    result = tmp_path / "bench.json"
    out = run_job("benchmarks/bench.py", "--cases", "small_infer", "--seconds", "0.2", "--out", str(result))
    assert out.returncode == 0, out.stderr
    data = json.loads(result.read_text())
    impls = {r["impl"]: r for r in data["results"]}
    assert set(impls) == {"ours", "hf"} and all(r["clips_per_s"] > 0 for r in impls.values())
    assert data["speedups"][0]["ratio"] == impls["ours"]["clips_per_s"] / impls["hf"]["clips_per_s"]


def test_bench_rejects_an_unknown_case_by_name():
    out = run_job("benchmarks/bench.py", "--cases", "huge_train")
    assert out.returncode == 2 and "unknown case(s) ['huge_train']" in out.stderr


def test_demo_study_trains_over_seeds_and_reports_each(tmp_path):
    result = tmp_path / "study.json"
    out = run_job("benchmarks/demo_study.py", "--seeds", "0", "1", "--steps", "4", "--every", "2",
                  "--train-per-class", "2", "--val-per-class", "1", "--jobs", "1", "--out", str(result))
    assert out.returncode == 0, out.stderr
    rows = json.loads(result.read_text())
    assert [r["seed"] for r in rows] == [0, 1]
    assert all([s for s, _ in r["curve"]] == [2, 4] and 0 <= r["final_top1"] <= 100 for r in rows)
    assert "time_embed_init_std=0.5 square=32: " in out.stdout and "seeds reach 90%" in out.stdout


def test_demo_study_trains_with_the_recipe_and_its_overrides(tmp_path):
    """The study's steps follow the product's schedule for the resolved recipe (issue 16): the learning rate the
    engine holds after each step is ``optim.lr x lr_factor`` of demo_order with the study's overrides."""
    from pipeline.config import load_recipe, lr_factor

    result = tmp_path / "study.json"
    out = run_job("benchmarks/demo_study.py", "--seeds", "0", "--steps", "6", "--every", "1", "--train-per-class", "4",
                  "--val-per-class", "1", "--jobs", "1", "--set", "optim.lr=0.004", "optim.warmup_epochs=2",
                  "--out", str(result))
    assert out.returncode == 0, out.stderr
    assert "adamw lr 0.004" in out.stdout and "torch engine" in out.stdout
    (row,) = json.loads(result.read_text())
    cfg = load_recipe("demo_order", ["optim.lr=0.004", "optim.warmup_epochs=2", "train.max_steps=6"])
    assert row["per_epoch"] == 1 and [s for s, _ in row["lr"]] == [1, 2, 3, 4, 5, 6]
    assert [lr for _, lr in row["lr"]] == [0.004 * lr_factor(cfg, s, 1) for s in range(1, 7)]
    bad = run_job("benchmarks/demo_study.py", "--set", "optim.nme=sgd")
    assert bad.returncode == 2 and "optim.nme" in bad.stderr


def test_the_user_commands_are_console_scripts_and_run_from_any_directory(tmp_path):
    """Each [project.scripts] entry is a jobs/<name>.py of the checkout running the same main(); both start
    outside the repository (the package is installed, no sys.path edits), as do the infra/ service scripts."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    names = sorted(path.stem for path in (ROOT / "jobs").glob("*.py"))
    assert sorted(scripts) == [f"timesformer-{name}" for name in names]
    for name in names:
        assert scripts[f"timesformer-{name}"] == f"pipeline.cli.{name}:main"
        module = importlib.import_module(f"pipeline.cli.{name}")
        assert callable(module.main)
        out = subprocess.run([sys.executable, str(ROOT / "jobs" / f"{name}.py"), "--help"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and module.__doc__.splitlines()[0] in out.stdout, (name, out.stderr[-2000:])
    for script in ("infra/seaweedfs.py", "infra/mlflow_server.py"):
        out = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0 and "usage:" in out.stdout, (script, out.stderr[-2000:])

"""A run executes the code it was launched with: launch copies the ``pipeline`` package into
``<run_dir>/code`` and every rank imports it from there, through the local executor and the sbatch script
alike, on resume and requeue too; a run directory made before snapshots runs the live checkout (issue 16).

The ranks here are real submitit processes started the way launch starts them (same environment, and the
repository as working directory, which ``python -m`` would put first on sys.path); only their payload is
a probe instead of a training run: it reports where ``pipeline`` came from."""

from __future__ import annotations

import functools
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError
from pipeline.train import snapshot
from pipeline.train.launch import LaunchRequest, launch
from pipeline.train.snapshot import (
    PACKAGE_DATA,
    SnapshotError,
    code_hash,
    code_path,
    describe_running_code,
    package_dir,
    snapshot_code,
)
from tests.synthetic_data import write_dataset

REPO = Path(__file__).resolve().parents[2]
LIVE = package_dir()

# evaluated in a rank: by then unpickling ``req`` (a LaunchRequest) has imported pipeline.train.launch,
# as unpickling TrainJob imports pipeline.train.main in a real rank
PROBE = ("(lambda sys, os, snap: {"
         "'pipeline': sys.modules['pipeline'].__file__, "
         "'launch': sys.modules['pipeline.train.launch'].__file__, "
         "'sink': __import__('pipeline.tracking.sink', fromlist=['_']).__file__, "
         "'marker': getattr(sys.modules['pipeline'], 'MARKER', None), "
         "'cwd': os.getcwd(), 'path': list(sys.path), "
         "'describe': snap.describe_running_code(run_dir)})"
         "(__import__('sys'), __import__('os'), __import__('pipeline.train.snapshot', fromlist=['_']))")


def probe_job(run_dir) -> functools.partial:
    """Stands in for ``TrainJob(run_dir)``: picklable, and needs nothing but the package to run."""
    return functools.partial(eval, PROBE, {"run_dir": str(run_dir), "req": LaunchRequest(name="probe")})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("ds") / "colour"
    write_dataset(str(root), "colour", per_class={"train": 1, "val": 1})
    return str(root)


@pytest.fixture
def probed(monkeypatch):
    """launch() submits the probe instead of a training run, creates no MLflow run, and runs from the
    repository (the working directory a user launches from, and the one that would shadow the snapshot)."""
    import pipeline.tracking.sink
    import pipeline.train.main

    monkeypatch.setattr(pipeline.train.main, "TrainJob", probe_job)
    monkeypatch.setattr(pipeline.tracking.sink, "create_run", lambda *a, **k: None)
    monkeypatch.chdir(REPO)


def request(tmp_path: Path, dataset: str, **kw) -> LaunchRequest:
    kw.setdefault("local", True)
    if not kw.get("resume"):
        kw.setdefault("recipe", "smoke")
        kw.setdefault("name", "snap")
        kw.setdefault("runs_dir", str(tmp_path / "runs"))
        kw.setdefault("overrides", [f"data.index={dataset}"])
    return LaunchRequest(**kw)


def run_local(req: LaunchRequest) -> tuple[dict, dict, list[str]]:
    """launch's info, what the (first) rank saw, and the lines launch printed."""
    printed: list[str] = []
    info = launch(req, out=printed.append)
    return info, info["job"].results()[0], "\n".join(printed).splitlines()


def assert_from(seen: dict, code: Path) -> None:
    pkg = code.resolve() / "pipeline"
    for key in ("pipeline", "launch", "sink"):  # pipeline.tracking is a namespace package: it follows too
        assert Path(seen[key]).resolve().is_relative_to(pkg), (key, seen[key], pkg)
    assert seen["cwd"] == str(REPO)  # the checkout was the working directory, and still did not win
    assert str(REPO) not in seen["path"] and "" not in seen["path"]


def make_writable(code: Path, rel: str) -> Path:
    path = code / "pipeline" / rel
    path.chmod(0o644)
    return path


# -- the copy -----------------------------------------------------------------------------------------


def test_the_snapshot_holds_the_packages_modules_and_no_caches(tmp_path):
    source = tmp_path / "src" / "pipeline"
    shutil.copytree(LIVE, source, ignore=shutil.ignore_patterns("__pycache__"))
    (source / "__pycache__").mkdir()
    (source / "__pycache__" / "config.cpython-311.pyc").write_bytes(b"\0" * 16)
    (source / "train" / "__pycache__").mkdir(exist_ok=True)
    (source / "train" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    (source / ".hidden.py").write_text("x = 1\n")
    (source / "notes.txt").write_text("not package data\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    record = snapshot_code(run_dir, source)
    code = run_dir / "code"
    copied = sorted(p.relative_to(code / "pipeline").as_posix() for p in code.rglob("*") if p.is_file())
    expected = sorted(p.relative_to(LIVE).as_posix() for p in LIVE.rglob("*.py")
                      if "__pycache__" not in p.parts and not p.name.startswith("."))
    assert copied == expected
    assert "tracking/sink.py" in copied and "train/main.py" in copied and "__init__.py" in copied
    assert not any(p.name == "__pycache__" for p in code.rglob("*"))
    assert sorted(p.name for p in run_dir.iterdir()) == ["code"]  # no partial copy left behind
    for rel in copied:
        assert (code / "pipeline" / rel).read_bytes() == (source / rel).read_bytes()
        assert not (code / "pipeline" / rel).stat().st_mode & 0o222  # read-only: not the place to edit
    assert record["path"] == str(code.resolve()) and record["source"] == str(source.resolve())
    assert record["files"] == len(copied) and record["bytes"] == sum(len((source / r).read_bytes()) for r in copied)
    assert (record["sha256"], record["files"], record["bytes"]) == code_hash(code)
    assert record["bytes"] < 5_000_000 and record["seconds"] < 5
    # the hash is of the content: the same package copied elsewhere hashes the same; an edit changes it
    other = tmp_path / "other"
    other.mkdir()
    assert snapshot_code(other, source)["sha256"] == record["sha256"]
    (code / "pipeline" / "__pycache__").mkdir()  # what a rank's import writes there
    (code / "pipeline" / "__pycache__" / "config.cpython-311.pyc").write_bytes(b"\1")
    assert code_hash(code)[0] == record["sha256"]
    make_writable(code, "config.py").write_text("# edited\n")
    assert code_hash(code)[0] != record["sha256"]


def test_a_snapshot_is_made_once_and_never_replaced(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = snapshot_code(run_dir)
    with pytest.raises(SnapshotError, match="copied once"):
        snapshot_code(run_dir)
    assert code_hash(run_dir / "code")[0] == first["sha256"]


def test_a_failed_copy_leaves_neither_a_snapshot_nor_a_partial_copy(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    calls = []
    original = Path.write_bytes

    def failing_write(self, data):
        calls.append(self)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return original(self, data)

    monkeypatch.setattr(Path, "write_bytes", failing_write)
    with pytest.raises(OSError, match="No space"):
        snapshot_code(run_dir)
    monkeypatch.undo()
    assert list(run_dir.iterdir()) == []
    assert code_path(run_dir) is None


def test_the_package_has_no_data_file_the_snapshot_would_leave_out():
    """Only modules are copied (and PACKAGE_DATA): a file the package reads at run time must be listed there."""
    data = sorted(p.relative_to(LIVE).as_posix() for p in LIVE.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".py", ".pyc")
                  and not p.name.startswith(".") and not p.name.endswith("~"))
    listed = {p.relative_to(LIVE).as_posix() for pattern in PACKAGE_DATA for p in LIVE.glob(pattern)}
    assert [d for d in data if d not in listed] == [], "add these to pipeline.train.snapshot.PACKAGE_DATA"


def test_code_path_of_an_old_run_is_none_and_a_damaged_snapshot_is_refused(tmp_path):
    assert code_path(tmp_path) is None
    level, message = describe_running_code(tmp_path)
    assert level == logging.INFO and f"the live checkout {LIVE}" in message and "no code snapshot" in message
    (tmp_path / "code" / "pipeline").mkdir(parents=True)
    with pytest.raises(SnapshotError, match="damaged"):
        code_path(tmp_path)


def test_a_process_that_imported_the_checkout_says_it_is_not_running_the_snapshot(tmp_path):
    snapshot_code(tmp_path)
    level, message = describe_running_code(tmp_path)  # this test process imports the checkout
    assert level == logging.WARNING and "NOT this run's snapshot" in message and "PYTHONSAFEPATH=1" in message


# -- the ranks import it --------------------------------------------------------------------------------


def test_local_ranks_import_the_snapshot_even_from_the_checkout_and_resume_reuses_it(tmp_path, dataset, probed,
                                                                                    monkeypatch):
    # a stand-in checkout, so that a "git pull" after launch can be made without touching the real one
    checkout = tmp_path / "checkout" / "pipeline"
    shutil.copytree(LIVE, checkout, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(snapshot, "package_dir", lambda: checkout.resolve())
    before = dict(os.environ)
    info, seen, lines = run_local(request(tmp_path, dataset))
    assert dict(os.environ) == before  # the launching process's environment is as it was
    run_dir = Path(info["run_dir"])
    code = run_dir / "code"
    assert_from(seen, code)
    assert seen["marker"] is None
    record = json.loads((run_dir / "launch.json").read_text())
    assert record["code"]["path"] == str(code.resolve()) and record["code"]["source"] == str(checkout.resolve())
    assert record["code"]["sha256"] == code_hash(code)[0] == record["jobs"][0]["code"]["sha256"]
    assert any(line.startswith(f"code        snapshot {code}") for line in lines), lines
    level, message = seen["describe"]  # what rank 0 logs
    assert level == logging.INFO and f"snapshot {code}" in message and record["code"]["sha256"][:16] in message

    # the checkout changes after launch ("git pull"): a resumed run keeps its snapshot, copied nothing again
    (checkout / "__init__.py").write_text((checkout / "__init__.py").read_text() + "MARKER = 'pulled'\n")
    info, seen, lines = run_local(request(tmp_path, dataset, resume=str(run_dir)))
    assert_from(seen, code)
    assert seen["marker"] is None
    assert code_hash(code)[0] == record["code"]["sha256"]
    assert json.loads((run_dir / "launch.json").read_text())["code"] == record["code"]

    # what the ranks run is the snapshot itself: an edit there (a deliberate fix) is what the resumed run runs
    init = make_writable(code, "__init__.py")
    init.write_text(init.read_text() + "MARKER = 'snapshot'\n")
    info, seen, lines = run_local(request(tmp_path, dataset, resume=str(run_dir)))
    assert_from(seen, code)
    assert seen["marker"] == "snapshot"
    level, message = seen["describe"]
    assert level == logging.WARNING and "EDITED since launch" in message
    assert any("EDITED since launch" in line for line in lines), lines
    jobs = json.loads((run_dir / "launch.json").read_text())["jobs"]
    assert len(jobs) == 3 and jobs[2]["code"]["sha256"] == code_hash(code)[0] != record["code"]["sha256"]


def test_slurm_ranks_import_the_snapshot_through_the_sbatch_script(tmp_path, dataset, probed, monkeypatch):
    """The script submitit hands sbatch is run as Slurm would (on every requeue too), with the repository
    as working directory and the node's own PYTHONPATH kept after the snapshot."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/bash\necho "Submitted batch job 77"\n')
    # srun: drop its options, run the command (one task)
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do\n'
                                  '  case "$1" in --output|--error) shift 2;; *) shift;; esac\ndone\nexec "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    info = launch(request(tmp_path, dataset, local=False), out=lambda *_: None)
    run_dir = Path(info["run_dir"])
    script = next((run_dir / "submitit").rglob("*.sh"))
    assert f"export PYTHONPATH={run_dir / 'code'}" in script.read_text()
    extra = tmp_path / "node-site"
    extra.mkdir()
    env = {**os.environ, "PYTHONPATH": str(extra), "SLURM_JOB_ID": "77", "SLURM_NTASKS": "1",
           "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
           "SLURM_JOB_NODELIST": "localhost"}
    env.pop("PYTHONSAFEPATH", None)
    done = subprocess.run(["bash", str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    status, seen = pickle.loads((run_dir / "submitit" / "77" / "77_0_result.pkl").read_bytes())
    assert status == "success", seen
    assert_from(seen, run_dir / "code")
    assert seen["path"].index(str(run_dir / "code")) < seen["path"].index(str(extra))  # the node's own stays, after


def test_an_old_run_directory_without_a_snapshot_runs_the_live_checkout(tmp_path, dataset, probed):
    info, _, _ = run_local(request(tmp_path, dataset))
    run_dir = Path(info["run_dir"])
    shutil.rmtree(run_dir / "code")  # as launched before snapshots
    record = json.loads((run_dir / "launch.json").read_text())
    del record["code"], record["jobs"][0]["code"]
    (run_dir / "launch.json").write_text(json.dumps(record))
    info, seen, lines = run_local(request(tmp_path, dataset, resume=str(run_dir)))
    assert not (run_dir / "code").exists()  # a resume never makes one
    assert Path(seen["pipeline"]).resolve() == LIVE / "__init__.py"
    level, message = seen["describe"]
    assert level == logging.INFO and "live checkout" in message and "no code snapshot" in message
    assert any(line.startswith("code        live checkout") and "predates code snapshots" in line for line in lines)
    assert json.loads((run_dir / "launch.json").read_text())["jobs"][1]["code"] == {"live": str(LIVE)}


def test_a_resume_with_a_damaged_snapshot_or_a_run_dir_path_holding_the_path_separator_is_refused(tmp_path, dataset,
                                                                                                  probed):
    info, _, _ = run_local(request(tmp_path, dataset))
    run_dir = Path(info["run_dir"])
    make_writable(run_dir / "code", "__init__.py").unlink()
    with pytest.raises(ConfigError, match="--resume: .*damaged"):
        launch(request(tmp_path, dataset, resume=str(run_dir)), out=lambda *_: None)
    runs = tmp_path / f"a{os.pathsep}b"
    with pytest.raises(ConfigError, match="PYTHONPATH cannot hold"):
        launch(request(tmp_path, dataset, runs_dir=str(runs)), out=lambda *_: None)
    assert not runs.exists()


def test_the_dry_run_says_which_code_would_run_and_shows_the_exports(tmp_path, dataset):
    lines: list[str] = []
    launch(request(tmp_path, dataset, local=False, dry_run=True), out=lines.append)
    text = "\n".join(lines)
    assert f"code        snapshot of {LIVE} to be copied to {tmp_path / 'runs' / 'snap' / 'code'}" in text
    assert f"export PYTHONPATH={tmp_path / 'runs' / 'snap' / 'code'}" in text and "export PYTHONSAFEPATH=1" in text
    assert not (tmp_path / "runs").exists()


def test_the_editable_install_does_not_outrank_the_snapshot(tmp_path):
    """The premise, checked on this interpreter: with PYTHONSAFEPATH the working directory is not on
    sys.path, and PYTHONPATH comes before the editable install's finder."""
    snapshot_code(tmp_path)
    env = {**os.environ, **snapshot.rank_environment(tmp_path / "code", {})}
    p = subprocess.run([sys.executable, "-c", "import pipeline; print(pipeline.__file__)"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert Path(p.stdout.strip()).resolve() == (tmp_path / "code" / "pipeline" / "__init__.py").resolve()
    if not (REPO / "pipeline").is_dir():
        return  # tests run beside an installed package (infra/check_install.sh): no checkout to shadow the snapshot
    env.pop("PYTHONSAFEPATH")
    p = subprocess.run([sys.executable, "-c", "import pipeline; print(pipeline.__file__)"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert Path(p.stdout.strip()).resolve() == LIVE / "__init__.py"  # why PYTHONSAFEPATH is set

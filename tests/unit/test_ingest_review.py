"""infra/schedule/ingest.sh reads its env file as data: a value is exported literally (spaces kept, one pair
of surrounding quotes removed, never evaluated), and a line that is not NAME=value stops the run with its line
number (exit 2) before anything runs. The wrapper runs under /bin/sh with cron's minimal environment; the
Python it starts is a stub that records its arguments and environment."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WRAPPER = REPO / "infra" / "schedule" / "ingest.sh"


def run_wrapper(tmp_path: Path, env_lines: list[str], wrapper: Path = WRAPPER) -> tuple[subprocess.CompletedProcess,
                                                                                        Path]:
    home = tmp_path / "checkout"
    home.mkdir(exist_ok=True)
    (home / "a.yaml").write_text("")  # a glob in INGEST_ARGS would match it
    record = tmp_path / "called.json"
    stub = tmp_path / "python"
    code = "import json, os, sys; json.dump({'argv': sys.argv[1:], 'env': dict(os.environ)}, open(sys.argv[1], 'w'))"
    stub.write_text(f'#!/bin/sh\nexec "{sys.executable}" -c "{code}" "{record}" "$@"\n')
    stub.chmod(0o755)
    env_file = tmp_path / "ingest.env"
    env_file.write_text("\n".join(env_lines + [f"PIPELINE_HOME={home}", f"PIPELINE_PYTHON={stub}"]) + "\n")
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "SHELL": "/bin/sh", "PIPELINE_INGEST_ENV": str(env_file)}
    done = subprocess.run(["/bin/sh", str(wrapper)], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    return done, record


def test_the_env_file_is_read_as_data_and_ingest_args_reach_the_command(tmp_path):
    marker = tmp_path / "ran"
    done, record = run_wrapper(tmp_path, [
        "# settings", "", "   # an indented comment",
        "INGEST_CONFIG=configs/ingest/k400.yaml",
        "INGEST_ARGS=--ray-address auto *.yaml",
        f"MLFLOW_TRACKING_URI=$(touch {marker})",
        f"AWS_PROFILE=\"`touch {marker}` $HOME; touch {marker}\"",
        "RAY_ADDRESS='10.0.0.1:6379'",
    ])
    assert done.returncode == 0, done.stderr
    assert not marker.exists(), "a value in the env file was run as a command"
    called = json.loads(record.read_text())
    assert called["argv"][1:] == ["jobs/ingest.py", "--config", "configs/ingest/k400.yaml", "--no-progress",
                                  "--ray-address", "auto", "*.yaml"]  # split on spaces, never globbed
    env = called["env"]
    assert env["MLFLOW_TRACKING_URI"] == f"$(touch {marker})"
    assert env["AWS_PROFILE"] == f"`touch {marker}` $HOME; touch {marker}"  # one pair of quotes removed
    assert env["RAY_ADDRESS"] == "10.0.0.1:6379" and env["INGEST_ARGS"] == "--ray-address auto *.yaml"
    assert "not found" not in done.stderr


def test_a_line_that_is_not_name_value_stops_the_wrapper_with_its_line_number(tmp_path):
    marker = tmp_path / "ran"
    for bad in (f"touch {marker}", f"export X=1; touch {marker}", f"1X=$(touch {marker})", f"A B=c{marker}"):
        done, record = run_wrapper(tmp_path, ["INGEST_CONFIG=c.yaml", "# fine", bad])
        assert done.returncode == 2, (bad, done.stderr)
        assert "line 3: not a NAME=value line" in done.stderr and bad in done.stderr
        assert not marker.exists() and not record.exists()

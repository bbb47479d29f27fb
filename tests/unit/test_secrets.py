"""Secrets stay out of what the product writes, logs and shows in ``ps`` (issue 13): redaction, the
launch (run directory, launch record, sbatch script, MLflow), the development servers."""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_recipe, load_resolved
from pipeline.secrets import (
    REDACTED,
    SecretUnavailableError,
    redact,
    redact_env,
    redact_text,
    reveal_env,
    reveal_uri,
)
from pipeline.train.launch import LaunchRequest, launch
from tests.synthetic_data import write_dataset
from tests.unit.test_hostile_config import fake_slurm

REPO = Path(__file__).resolve().parents[2]


def test_redaction_masks_credentials_in_uris_assignments_and_mappings_and_keeps_the_rest():
    cases = {
        "postgresql://mlflow:pw-1@db:5432/mlflow": "postgresql://mlflow:***@db:5432/mlflow",
        "https://ghp_0tok1tok1tok1tok1tok1@github.com/x": "https://***@github.com/x",  # a token as user name
        "export PASS=hunter2; db.password: 'a b'": "export PASS=***; db.password: '***'",
        # tokens that say what they are, under any name or none
        "GH=ghp_" + "a1" * 18: "GH=***", "see hf_" + "Q" * 34 + " here": "see *** here",
        "glpat-" + "x" * 20 + " sk-" + "y9" * 24: "*** ***",
        "runs/sk-learn-experiment-number-one": "runs/sk-learn-experiment-number-one",  # a name, not a key
        "https://h/x?sig=abc&x=1": "https://h/x?sig=***&x=1",
        "cluster.env={AWS_SECRET_ACCESS_KEY: k-1, A: b}": "cluster.env={AWS_SECRET_ACCESS_KEY: ***, A: b}",
        "export HF_TOKEN='a b; c' && run": "export HF_TOKEN='***' && run",
        '{"DB_PASSWORD": "x y"}': '{"DB_PASSWORD": "***"}',
    }
    for text, expected in cases.items():
        assert redact_text(text) == expected
    # not secrets: a switch or a number under a token's name, a reference to a variable, a plain user name,
    # a name that only contains a secret's word
    for plain in ("s3://bucket/datasets/k400", "http://127.0.0.1:5000", "OMP_NUM_THREADS=1", "sqlite:////tmp/m.db",
                  "TOKENIZERS_PARALLELISM=false", "HF_HUB_DISABLE_IMPLICIT_TOKEN=1", "export HF_TOKEN=$HF_TOKEN",
                  "postgresql://mlflow@db:5432/mlflow", "tokenizer: bert", "BYPASS=x"):
        assert redact_text(plain) == plain
    nested = redact({"cluster.env": {"MLFLOW_TRACKING_PASSWORD": "p", "NCCL_IB_DISABLE": "0"},
                     "tracking.uri": "http://u:p@h", "lr": 0.1})
    assert nested == {"cluster.env": {"MLFLOW_TRACKING_PASSWORD": REDACTED, "NCCL_IB_DISABLE": "0"},
                      "tracking.uri": "http://u:***@h", "lr": 0.1}


def test_secrets_stored_as_stars_come_back_from_the_environment_only(monkeypatch):
    env = {"AWS_SECRET_ACCESS_KEY": "k", "DB": "postgresql://u:pw@h/db", "OMP_NUM_THREADS": "1"}
    stored = redact_env(env)
    assert stored == {"AWS_SECRET_ACCESS_KEY": REDACTED, "DB": REDACTED, "OMP_NUM_THREADS": "1"}
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    monkeypatch.delenv("DB", raising=False)
    with pytest.raises(SecretUnavailableError, match="AWS_SECRET_ACCESS_KEY, DB are secrets.*export"):
        reveal_env(stored)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "k")
    monkeypatch.setenv("DB", "postgresql://u:pw@h/db")
    assert reveal_env(stored) == env
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://u:other@h")
    with pytest.raises(SecretUnavailableError, match="MLFLOW_TRACKING_URI is set to another URI"):
        reveal_uri("http://u:***@h2")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://u:pw@h2")
    assert reveal_uri("http://u:***@h2") == "http://u:pw@h2" and reveal_uri("http://h3") == "http://h3"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("ds") / "colour"
    write_dataset(str(root), "colour", per_class={"train": 1, "val": 1})
    return str(root)


SECRETS = {"AWS_SECRET_ACCESS_KEY": "s3cr3t-Q1", "DB_URL": "postgresql://u:pw-Q2@db/x"}
TRACKING = "http://bob:pass-Q3@127.0.0.1:9"  # nothing listens there: MLflow is unreachable at launch


def all_text(root: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in root.rglob("*") if p.is_file())


def test_launch_writes_no_secret_and_hands_them_to_the_job_by_environment(tmp_path, dataset, monkeypatch, caplog):
    captured = tmp_path / "sbatch-env"
    monkeypatch.setenv("PATH", fake_slurm(tmp_path, f'env > {captured}\necho "Submitted batch job 9"'))
    monkeypatch.setattr(sys, "argv", ["jobs/launch.py", f"tracking.uri={TRACKING}"])
    for name in (*SECRETS, "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    env = "{" + ", ".join(f"{k}: '{v}'" for k, v in SECRETS.items()) + ", PLAIN: 'a b'}"
    lines: list[str] = []
    caplog.set_level(logging.INFO)
    launch(LaunchRequest(recipe="smoke", runs_dir=str(tmp_path / "runs"), name="sec",
                         overrides=[f"data.index={dataset}", f"cluster.env={env}", f"tracking.uri={TRACKING}",
                                    "description=see https://ghp-tok-Q4-0000000000000@wiki/x"]), out=lines.append)
    written = all_text(tmp_path / "runs")  # config.yaml, launch.json, deepspeed.json, the sbatch script
    shown = "\n".join(lines) + caplog.text
    for secret in ("s3cr3t-Q1", "pw-Q2", "pass-Q3", "tok-Q4"):
        assert secret not in written and secret not in shown, secret
    job_env = dict(line.split("=", 1) for line in captured.read_text().splitlines() if "=" in line)
    assert {k: job_env[k] for k in SECRETS} == SECRETS and job_env["MLFLOW_TRACKING_URI"] == TRACKING
    assert not {*SECRETS, "MLFLOW_TRACKING_URI"} & set(os.environ)  # the launching process's own stays as it was
    stored = load_resolved(tmp_path / "runs" / "sec" / "config.yaml")
    assert stored.cluster.env == {"AWS_SECRET_ACCESS_KEY": "***", "DB_URL": "***", "PLAIN": "a b"}
    assert stored.tracking.uri == "http://bob:***@127.0.0.1:9"
    script = next((tmp_path / "runs" / "sec" / "submitit").rglob("*.sh")).read_text()
    assert "export PLAIN='a b'" in script and "AWS_SECRET_ACCESS_KEY" not in script
    # a resume without the secrets in the shell is refused (they exist nowhere else), with them it goes
    with pytest.raises(ConfigError, match="AWS_SECRET_ACCESS_KEY, DB_URL are secrets"):
        launch(LaunchRequest(resume=str(tmp_path / "runs" / "sec")), out=lambda *_: None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", TRACKING)
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    captured.unlink()
    launch(LaunchRequest(resume=str(tmp_path / "runs" / "sec")), out=lambda *_: None)
    assert "s3cr3t-Q1" in captured.read_text() and "s3cr3t-Q1" not in all_text(tmp_path / "runs")


@pytest.mark.parametrize("override, field", [("data.index=https://u:pw-Q5@host/ds", "data.index"),
                                             ("cluster.setup=['export HF_TOKEN=hf-Q5']", "cluster.setup")])
def test_a_credential_in_a_field_no_environment_can_carry_is_refused_unrepeated(tmp_path, dataset, override, field):
    with pytest.raises(ConfigError, match=rf"{field} hold\(s\) a credential") as e:
        launch(LaunchRequest(recipe="smoke", runs_dir=str(tmp_path / "runs"), local=True,
                             overrides=[f"data.index={dataset}", override]), out=lambda *_: None)
    assert "Q5" not in str(e.value) and not (tmp_path / "runs").exists()


def test_mlflow_params_tags_and_the_run_record_hold_no_secret(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.sink import MLflowSink, create_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    record = create_run(tmp_path, uri, "secrets", "r", {"mlflow.note.content": "token at https://ghp-tok-Q6-0000000000000@wiki",
                                                        "HF_TOKEN": "hf-Q7"})
    cfg = load_recipe("smoke", ["data.index=/d", "cluster.env={MLFLOW_TRACKING_PASSWORD: pw-Q8, A: b}",
                                "tracking.uri=https://u:pw-Q9@mlflow.example.org"])
    sink = MLflowSink(record, flush_timeout=30)
    sink.log_params(cfg.flat())
    sink.set_tags({"source": "postgresql://u:pw-Q10@h/db"})
    sink.close("FINISHED")
    run = MlflowClient(uri).get_run(record["run_id"])
    logged = json.dumps({**run.data.params, **run.data.tags})
    for secret in ("Q6", "Q7", "Q8", "Q9", "Q10"):
        assert secret not in logged, secret
    assert run.data.params["cluster.env"] == "{'MLFLOW_TRACKING_PASSWORD': '***', 'A': 'b'}"
    assert run.data.params["optim.lr"] == "0.001"  # everything else is logged as it was


def test_a_redacted_tracking_uri_is_completed_from_the_environment_in_the_sink(tmp_path, monkeypatch, caplog):
    from pipeline.tracking.sink import MLflowSink, create_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(SecretUnavailableError):
        MLflowSink({"tracking_uri": "http://u:***@127.0.0.1:9", "run_id": "0" * 32})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://u:pw-Q11@127.0.0.1:9")
    sink = MLflowSink({"tracking_uri": "http://u:***@127.0.0.1:9", "run_id": "0" * 32}, flush_timeout=0.5)
    assert sink.client._tracking_client.tracking_uri == "http://u:pw-Q11@127.0.0.1:9"
    sink.close(None)
    caplog.set_level(logging.WARNING)
    assert create_run(tmp_path, "http://u:***@127.0.0.1:9", "e", "r", {}) is None  # unreachable: a warning
    assert "pw-Q11" not in caplog.text and "127.0.0.1:9" in caplog.text


# -- development servers --------------------------------------------------------------------------------


def test_seaweedfs_never_adopts_the_shells_aws_credentials_nor_prints_them(tmp_path, monkeypatch, capsys):
    from infra import seaweedfs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-REAL-Q12")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "real-cloud-secret-Q12")
    monkeypatch.delenv("SEAWEEDFS_ACCESS_KEY", raising=False)
    monkeypatch.delenv("SEAWEEDFS_SECRET_KEY", raising=False)
    root = tmp_path / "sw"
    assert seaweedfs.main(["up", "--dir", str(root), "--port", "0"]) == 0
    try:
        up = capsys.readouterr()
        kept = json.loads((root / "env.json").read_text())
        assert stat.S_IMODE((root / "env.json").stat().st_mode) == 0o600
        assert stat.S_IMODE(root.stat().st_mode) == 0o700  # the objects and the pid file are not for others
        assert "Q12" not in json.dumps(kept) and "Q12" not in (root / "weed.log").read_text()
        assert len(kept["AWS_SECRET_ACCESS_KEY"]) >= 32  # generated, not a fixed well-known default
        assert kept["AWS_SECRET_ACCESS_KEY"] not in up.out + up.err  # `up` prints no credential
        assert seaweedfs.main(["env", "--dir", str(root)]) == 0  # `env` prints them: asked for, for `eval`
        assert f"export AWS_SECRET_ACCESS_KEY={kept['AWS_SECRET_ACCESS_KEY']}" in capsys.readouterr().out
        # the server takes the generated credentials (and refuses the shell's)
        server = seaweedfs.SeaweedFS(root, s3_port=int(kept["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]))
        assert (server.access_key, server.secret_key) == (kept["AWS_ACCESS_KEY_ID"], kept["AWS_SECRET_ACCESS_KEY"])
        server.client().list_buckets()
        from botocore.exceptions import ClientError

        server.access_key, server.secret_key = "AKIA-REAL-Q12", "real-cloud-secret-Q12"
        with pytest.raises(ClientError):
            server.client().list_buckets()
    finally:
        seaweedfs.main(["down", "--dir", str(root)])
    monkeypatch.setenv("SEAWEEDFS_ACCESS_KEY", "given-key")
    monkeypatch.setenv("SEAWEEDFS_SECRET_KEY", "given-secret")
    assert (seaweedfs.SeaweedFS(tmp_path / "other").access_key, seaweedfs.SeaweedFS(tmp_path / "other").secret_key) \
        == ("given-key", "given-secret")


def test_mlflow_server_passes_its_backend_by_environment_not_argv(tmp_path, capsys):
    from infra.mlflow_server import MLflowServer, main

    server = MLflowServer(tmp_path, port=1, backend="postgresql://mlflow:pw-Q13@db:5432/mlflow",
                          artifacts="s3://mlflow/artifacts")
    assert not any("Q13" in a or "postgresql" in a for a in server.command())
    assert server.environment()["MLFLOW_BACKEND_STORE_URI"] == "postgresql://mlflow:pw-Q13@db:5432/mlflow"
    assert server.environment()["MLFLOW_ARTIFACTS_DESTINATION"] == "s3://mlflow/artifacts"
    main(["env", "--dir", str(tmp_path), "--backend", "postgresql://mlflow:pw-Q13@db:5432/mlflow"])
    err = capsys.readouterr().err
    assert "holds a password" in err and "Q13" not in err


def test_a_service_state_directory_is_private_and_never_someone_elses(tmp_path, monkeypatch):
    from pipeline.secrets import private_dir

    fresh = private_dir(tmp_path / "a" / "state")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o777)
    os.chmod(loose, 0o777)
    assert stat.S_IMODE(private_dir(loose).stat().st_mode) == 0o700  # one of ours, tightened
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(tmp_path).st_uid + 1)  # as if another user owned it
    with pytest.raises(PermissionError, match="not by you"):
        private_dir(loose)

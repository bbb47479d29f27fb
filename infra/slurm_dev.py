#!/usr/bin/env python3
"""A Slurm development cluster on one machine: munge, slurmctld and several slurmd as fake nodes.

    python infra/slurm_dev.py up [--nodes 2]      # installs slurm-wlm + munge if missing (Debian, root)
    eval "$(python infra/slurm_dev.py env)"       # SLURM_CONF, and PATH with the sacct shim
    python infra/slurm_dev.py status
    python infra/slurm_dev.py down                # cancels jobs, stops what it started (by pid), undoes /etc/hosts

Everything lives in one directory (``--dir``, default $SLURM_DEV_DIR or /tmp/pipeline-slurm). Nodes
n1..nN share this host's CPUs (``SlurmdParameters=config_overrides``), each slurmd on its own port; their
names go into /etc/hosts so submitit's rendezvous address (the first node's name) resolves. Without
accounting, submitit needs ``sacct`` to notice a job that died without a result: a small shim answers
from ``scontrol``. Debian 12's Slurm 22.05 is what this was written against.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HOSTS_TAG = "# pipeline-slurm-dev"
SACCT_SHIM = r'''#!/usr/bin/env python3
"""sacct for a cluster without accounting: job states from scontrol (what submitit asks for)."""
import subprocess, sys

args, fields, ids = sys.argv[1:], ["JobID", "State", "NodeList"], []
i = 0
while i < len(args):
    a = args[i]
    if a in ("-o", "--format") and i + 1 < len(args):
        fields = args[i + 1].split(","); i += 2; continue
    if a.startswith("--format="):
        fields = a.split("=", 1)[1].split(","); i += 1; continue
    if a in ("-j", "--jobs") and i + 1 < len(args):
        ids += args[i + 1].split(","); i += 2; continue
    i += 1
print("|".join(fields))
for jid in ids:
    out = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True).stdout
    for line in out.splitlines():
        kv = dict(t.split("=", 1) for t in line.split() if "=" in t)
        if "JobId" not in kv:
            continue
        job = kv["JobId"]
        if kv.get("ArrayTaskId") not in (None, "N/A"):
            job = kv["ArrayJobId"] + "_" + kv["ArrayTaskId"]
        row = {"JobID": job, "State": kv.get("JobState", "UNKNOWN"), "NodeList": kv.get("NodeList", ""),
               "JobName": kv.get("JobName", ""), "ExitCode": kv.get("ExitCode", "")}
        print("|".join(row.get(f, "") for f in fields))
'''


def log(msg: str) -> None:
    print(f"[slurm-dev {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class SlurmDevCluster:
    def __init__(self, root: str | Path | None = None, nodes: int = 2, port: int = 6817) -> None:
        self.root = Path(root or os.environ.get("SLURM_DEV_DIR", "/tmp/pipeline-slurm")).resolve()
        self.nodes = nodes
        self.port = port
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.node_names = [f"n{i}" for i in range(1, nodes + 1)]

    # -- environment ------------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf), "PATH": f"{self.root / 'bin'}:{os.environ.get('PATH', '')}"}

    def _run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        env = {**os.environ, **self.env()}
        return subprocess.run(list(cmd), env=env, capture_output=True, text=True, check=check, timeout=timeout)

    # -- up ---------------------------------------------------------------------------------------

    def install(self) -> None:
        missing = [b for b in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(b) is None]
        if not missing:
            return
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise RuntimeError(f"Slurm is not installed ({', '.join(missing)} missing) and this is not a Debian "
                               f"root shell: install slurm-wlm and munge (apt-get install slurm-wlm munge)")
        log("installing slurm-wlm and munge (apt-get, ~15 s)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "slurm-wlm", "munge"],
                       check=True, env=env, capture_output=True, timeout=900)

    def _write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        cpus = os.cpu_count() or 1  # not nproc: it follows OMP_NUM_THREADS
        r = self.root
        self.conf.write_text("\n".join([
            "ClusterName=pipeline-dev", f"SlurmctldHost={host}(127.0.0.1)", "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", f"AuthInfo=socket={self.munge_socket}", "CredType=cred/munge",
            f"SlurmctldPort={self.port}", f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={r / 'log' / 'slurmd-%n.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "SchedulerType=sched/backfill", "MpiDefault=none",
            "JobCompType=jobcomp/none", "ReturnToService=2", "SlurmctldTimeout=30", "SlurmdTimeout=30",
            "InactiveLimit=0", "MinJobAge=3600", "KillWait=5", "Waittime=0", "SlurmdParameters=config_overrides",
            "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
            f"NodeName=n[1-{self.nodes}] NodeHostname={host} NodeAddr=127.0.0.1 "
            f"Port=[{self.port + 184}-{self.port + 183 + self.nodes}] CPUs={cpus} RealMemory=4000 State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))

    def _hosts(self, add: bool) -> None:
        """Add (or remove) ``127.0.0.1 n1 n2 ...`` in /etc/hosts, in place (it may be a bind mount)."""
        try:
            lines = Path("/etc/hosts").read_text().splitlines()
            kept = [ln for ln in lines if not ln.endswith(HOSTS_TAG)]
            if add:
                kept.append(f"127.0.0.1 {' '.join(self.node_names)} {HOSTS_TAG}")
            if kept != lines:
                with open("/etc/hosts", "w") as f:
                    f.write("\n".join(kept) + "\n")
        except PermissionError:
            if add:
                log("cannot edit /etc/hosts (not root): node names n1.. must resolve for multi-node jobs")

    def up(self, timeout: float = 60) -> SlurmDevCluster:
        self.install()
        if self.running():
            log(f"already up ({self.conf})")
            return self
        for sub in ("munge", "log", "state", "spool", "bin"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o711)
        key = self.root / "munge" / "munge.key"
        if not key.exists():  # created owner-only from the first byte (no window where others could read it)
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(1024))
        subprocess.run(["munged", "--force", "-S", str(self.munge_socket), f"--key-file={key}",
                        f"--log-file={self.root / 'log' / 'munged.log'}",
                        f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                        f"--seed-file={self.root / 'munge' / 'munged.seed'}"], check=True, timeout=30)
        self._write_conf()
        shim = self.root / "bin" / "sacct"
        shim.write_text(SACCT_SHIM)
        shim.chmod(0o755)
        self._hosts(add=True)
        self._run("slurmctld", "-f", str(self.conf))
        for n in self.node_names:
            (self.root / "spool" / n).mkdir(parents=True, exist_ok=True)
            self._run("slurmd", "-f", str(self.conf), "-N", n)
        deadline = time.time() + timeout
        while time.time() < deadline:
            states = self._run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
            if len(states) == self.nodes and all(s == "idle" for s in states):
                log(f"up: {self.nodes} node(s) idle; SLURM_CONF={self.conf}")
                return self
            time.sleep(0.3)
        tails = "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text().splitlines()[-10:])
                          for p in sorted((self.root / "log").glob("*.log")))
        self.down()
        raise RuntimeError(f"the Slurm development cluster did not come up in {timeout:.0f}s; logs:\n{tails}")

    def running(self) -> bool:
        pid_file = self.root / "slurmctld.pid"
        return pid_file.exists() and _alive(int(pid_file.read_text().strip() or 0))

    # -- down -------------------------------------------------------------------------------------

    def down(self) -> None:
        if self.running():
            self._run("scancel", "--user", os.environ.get("USER", "root"), check=False)
            deadline = time.time() + 15
            while time.time() < deadline and self._run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.3)
        pid_files = sorted(self.root.glob("slurmd-*.pid")) + [self.root / "slurmctld.pid",
                                                               self.root / "munge" / "munged.pid"]
        for f in pid_files:
            if f.exists():
                pid = int(f.read_text().strip() or 0)
                if pid and _alive(pid):
                    os.kill(pid, signal.SIGTERM)
                    deadline = time.time() + 20
                    while _alive(pid) and time.time() < deadline:
                        time.sleep(0.1)
                f.unlink(missing_ok=True)
        self._hosts(add=False)
        log("down")

    def status(self) -> str:
        return self._run("sinfo", check=False).stdout + self._run("squeue", check=False).stdout


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["up", "down", "env", "status"])
    p.add_argument("--dir", help="state directory (default $SLURM_DEV_DIR or /tmp/pipeline-slurm)")
    p.add_argument("--nodes", type=int, default=2, help="fake nodes (default 2)")
    p.add_argument("--port", type=int, default=6817, help="slurmctld port; slurmd ports follow it")
    args = p.parse_args(argv)
    cluster = SlurmDevCluster(args.dir, args.nodes, args.port)
    if args.command == "up":
        cluster.up()
    elif args.command == "down":
        cluster.down()
    elif args.command == "env":
        print(" ".join(f"export {k}={shlex.quote(v)}" for k, v in cluster.env().items()))
    else:
        print(cluster.status(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

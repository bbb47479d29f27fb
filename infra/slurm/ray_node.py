#!/usr/bin/env python
"""Helpers for ``infra/slurm/ray-cluster.sbatch``: start one Ray node, wait until the cluster has its nodes,
find a free block of ports for nodes that share a host.

    python infra/slurm/ray_node.py start [--shared-host] -- <ray start arguments>
    python infra/slurm/ray_node.py wait --address HOST:PORT --nodes N [--timeout 180]
    python infra/slurm/ray_node.py free-ports --count 200      # the first of 200 free consecutive ports

``start --shared-host`` is for Slurm nodes that are not separate machines: the development cluster of
``infra/slurm_dev.py`` runs every fake node's slurmd on this one host, at 127.0.0.1. Ray refuses a second
node on a loopback address unless told it is a real cluster, and when told so it swaps 127.0.0.1 for the
host's routable address and listens on every interface. Here every Ray node (head and workers) keeps
127.0.0.1 and listens on it only, as an ingest's local Ray does (``pipeline.ingest.run.start_local_ray``);
the batch script gives each node its own ports and temporary directory. On a real cluster (one Ray node per
machine, each at its own address) ``start`` runs ``ray start`` unchanged.

``wait`` polls the GCS (``ray.nodes()``) until N nodes are alive, and fails with the nodes it saw, and which
Slurm nodes are missing (by each Ray node's ``slurm_node`` label), after the timeout.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path


def start(shared_host: bool, ray_args: list[str]) -> int:
    """``ray start`` in this process (``--block`` keeps it as the srun step's process)."""
    if shared_host:
        # read by Ray at import: loopback node address, loopback-only listeners, here and in the
        # processes this node starts (raylet, agents, workers)
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants, services
    from ray.scripts.scripts import main as ray_main

    if shared_host:
        # Ray ties "a node may join a cluster" to "advertise a routable address"; keep the first, not the
        # second: every fake node stays on 127.0.0.1 (no public API says so, hence the two private names)
        ray_constants.ENABLE_RAY_CLUSTER = True
        services.get_node_ip_address = lambda address=None: "127.0.0.1"
    sys.argv = ["ray", "start", *ray_args]
    return ray_main()


def _connect(address: str) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", "30")  # a GCS gone: fail, do not hang
    import ray

    ray.init(address=address, log_to_driver=False, logging_level="WARNING")


def _slurm_node(node: dict) -> str:
    return (node.get("Labels") or {}).get("slurm_node", "?")


def _ended(steps: dict[str, int]) -> list[str]:
    """The Slurm nodes whose ``ray start`` step (srun, a child of the batch script) has exited."""
    gone = []
    for node, pid in steps.items():
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            state = "gone"
        except OSError:  # no /proc: not Linux; only the timeout then
            continue
        if state in ("gone", "Z", "X"):  # exited (a zombie until the batch script reaps it)
            gone.append(node)
    return gone


def wait(address: str, nodes: int, timeout: float, steps: dict[str, int]) -> int:
    """Poll until ``nodes`` Ray nodes are alive; exit 1 with what is missing after ``timeout`` seconds, or at
    once when the ``ray start`` step of one of ``steps`` (Slurm node -> srun pid) has ended."""
    import ray

    t0 = time.time()
    deadline = t0 + timeout
    expected = list(steps)

    def step_ended() -> bool:
        gone = _ended(steps)
        if gone:
            print(f"ray_node wait: `ray start` ended on {', '.join(gone)} before the cluster was up; its "
                  f"error is above in the job log", file=sys.stderr)
        return bool(gone)

    host, _, port = address.rpartition(":")
    while True:  # until the head's GCS accepts connections (ray.init would block on a GCS that is not there)
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            break
        except OSError as e:
            if step_ended():
                return 1
            if time.time() > deadline:
                print(f"ray_node wait: the Ray head at {address} did not listen within {timeout:.0f}s ({e})",
                      file=sys.stderr)
                return 1
            time.sleep(0.5)
    _connect(address)
    try:
        while True:
            alive = [n for n in ray.nodes() if n.get("Alive")]
            if len(alive) >= nodes:
                names = sorted(_slurm_node(n) for n in alive)
                print(f"ray_node wait: {len(alive)} Ray node(s) up after {time.time() - t0:.1f}s: "
                      f"{', '.join(names)}", flush=True)
                return 0
            if step_ended():
                return 1
            if time.time() > deadline:
                seen = sorted(_slurm_node(n) for n in alive)
                missing = sorted(set(expected) - set(seen)) if expected else []
                print(f"ray_node wait: only {len(alive)} of {nodes} Ray node(s) joined within {timeout:.0f}s "
                      f"(up: {', '.join(seen) or 'none'}; missing: {', '.join(missing) or '?'}); see the "
                      f"job log for the missing nodes' `ray start` output", file=sys.stderr)
                return 1
            time.sleep(0.5)
    finally:
        ray.shutdown()


def free_ports(count: int, low: int = 20000, high: int = 60000) -> int:
    """The first of ``count`` consecutive ports on 127.0.0.1 that nothing listens on now (a random block,
    so that two jobs on one host rarely race for the same one)."""
    import random
    import socket

    for _ in range(200):
        base = random.randrange(low, high - count)
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        print(base)
        return 0
    print(f"ray_node free-ports: no {count} free consecutive ports in {low}..{high}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start", help="ray start (arguments after --)")
    s.add_argument("--shared-host", action="store_true", help="Slurm nodes that share this host (fake nodes)")
    s.add_argument("ray_args", nargs=argparse.REMAINDER)
    w = sub.add_parser("wait", help="wait until N Ray nodes are alive")
    w.add_argument("--address", required=True)
    w.add_argument("--nodes", type=int, required=True)
    w.add_argument("--timeout", type=float, default=180)
    w.add_argument("--steps", nargs="*", default=[], metavar="NODE=PID",
                   help="each Slurm node and the pid of its `ray start` step: name the missing, fail fast")
    f = sub.add_parser("free-ports", help="print the first of COUNT free consecutive ports on 127.0.0.1")
    f.add_argument("--count", type=int, required=True)
    args = p.parse_args(argv)
    if args.command == "start":
        ray_args = args.ray_args[1:] if args.ray_args[:1] == ["--"] else args.ray_args
        return start(args.shared_host, ray_args)
    if args.command == "wait":
        steps = {}
        for item in args.steps:
            node, _, pid = item.rpartition("=")
            if not node or not pid.isdigit():
                p.error(f"--steps {item!r}: expected NODE=PID")
            steps[node] = int(pid)
        return wait(args.address, args.nodes, args.timeout, steps)
    return free_ports(args.count)


if __name__ == "__main__":
    sys.exit(main())

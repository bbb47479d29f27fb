#!/usr/bin/env python
"""Ingest throughput across Ray nodes: videos/s with 1, 2 and 4 Ray workers, each on its own fake node, next
to the plain single-process transcode loop, over the same videos in the same run.

The nodes are real ``ray start`` processes on this host, started the way infra/slurm/ray-cluster.sbatch starts
them on fake Slurm nodes (``infra/slurm/ray_node.py start --shared-host``: 127.0.0.1, a block of ports and a
temp dir per node, the label slurm_node=<name>): a head with no CPUs for tasks (GCS, the driver's node) and one
worker node of 1 CPU per Ray worker. The ingest is the real job (manifest, checksums, plan, one Ray task per
shard, tar, store, verify, commit) driven from this process; its reports/v000001-tasks.json says which node
built each shard. The plain loop (benchmarks/bench_ingest.py ``plain_transcode``, one reused scaler, as ingest
does) is the per-core rate; starting a cluster is timed apart from the ingest.

On a 2-core machine, more than 2 workers cannot be faster: the numbers then show the cost of distribution
(start-up, scheduling, per-task overhead, oversubscription), not scaling.

    python benchmarks/bench_ingest_nodes.py                       # 12 videos of 8 s at 480x360; 1, 2, 4 workers
    python benchmarks/bench_ingest_nodes.py --videos 24 --workers 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
HELPER = REPO / "infra" / "slurm" / "ray_node.py"
STRIDE = 100  # ports per node


def node_args(base: int, i: int, tmp: Path, name: str) -> list[str]:
    p = base + i * STRIDE
    return ["--node-ip-address=127.0.0.1", f"--node-manager-port={p + 2}", f"--object-manager-port={p + 3}",
            f"--dashboard-agent-listen-port={p + 4}", f"--dashboard-agent-grpc-port={p + 5}",
            f"--metrics-export-port={p + 6}", f"--runtime-env-agent-port={p + 7}", f"--min-worker-port={p + 10}",
            f"--max-worker-port={p + STRIDE - 1}", f"--object-store-memory={256 << 20}", f"--temp-dir={tmp / name}",
            f"--labels=slurm_node={name}", "--disable-usage-stats", "--block"]


class FakeNodes:
    """A head (0 CPUs) and ``workers`` worker nodes of 1 CPU each, as separate ``ray start`` processes."""

    def __init__(self, workers: int, tmp: Path) -> None:
        self.workers, self.tmp, self.procs = workers, tmp, []

    def __enter__(self) -> FakeNodes:
        t0 = time.perf_counter()
        count = STRIDE * (self.workers + 1)
        base = int(subprocess.run([sys.executable, str(HELPER), "free-ports", "--count", str(count)],
                                  check=True, capture_output=True, text=True).stdout)
        self.address = f"127.0.0.1:{base}"
        self.log = open(self.tmp / "nodes.log", "w")  # noqa: SIM115 (closed in __exit__)
        self._start(["--head", f"--port={base}", "--num-cpus=0", "--include-dashboard=false",
                     *node_args(base, 0, self.tmp, "head")])
        self._wait(1)
        for i in range(1, self.workers + 1):
            self._start([f"--address={self.address}", "--num-cpus=1", *node_args(base, i, self.tmp, f"w{i}")])
        self._wait(self.workers + 1)
        self.start_s = time.perf_counter() - t0
        return self

    def _start(self, args: list[str]) -> None:
        self.procs.append(subprocess.Popen([sys.executable, str(HELPER), "start", "--shared-host", "--", *args],
                                           stdout=self.log, stderr=subprocess.STDOUT))

    def _wait(self, nodes: int) -> None:
        steps = [f"n{i}={p.pid}" for i, p in enumerate(self.procs)]
        subprocess.run([sys.executable, str(HELPER), "wait", "--address", self.address, "--nodes", str(nodes),
                        "--timeout", "120", "--steps", *steps], check=True, stdout=subprocess.DEVNULL)

    def __exit__(self, *exc) -> None:
        for p in reversed(self.procs):  # workers, then the head
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.log.close()


def timed_ingest(address: str, root: Path, output: Path, cfg) -> tuple[float, dict[str, int]]:
    from pipeline.ingest.run import IngestConfig, run_ingest

    ic = IngestConfig(dataset="bench", format="kinetics", annotations=[str(root / "annotations.csv")],
                      source=str(root / "videos"), output=str(output), samples_per_shard=1, transcode=cfg)
    t0 = time.perf_counter()
    result = run_ingest(ic, ray_address=address, progress=False)
    elapsed = time.perf_counter() - t0
    if result.failed or result.version != 1:
        raise RuntimeError(f"the benchmark corpus should ingest cleanly: {result.message} {result.quarantine}")
    report = json.loads((output / "reports" / "v000001-tasks.json").read_text())
    return elapsed, report["shards_per_node"]


def make_hd(root: Path, videos: int, seconds: float) -> list[Path]:
    """``videos`` clips at 1280x720 30 fps (a moving texture, as make_sources at 480x360)."""
    import numpy as np

    from pipeline.data.video import encode_video

    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    paths = []
    for v in range(videos):
        base = rng.integers(0, 255, size=(180, 320, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
        frames = [np.roll(base, shift=(t, 2 * t), axis=(0, 1)) for t in range(int(seconds * 30))]
        paths.append(root / f"hd{v:02d}.mp4")
        paths[-1].write_bytes(encode_video(frames, 30, keyframe_interval=60))
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=12)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--hd", type=int, default=2, help="also time the plain loop on this many 10 s 1280x720 videos")
    args = p.parse_args(argv)
    # this process is the driver on the head's fake node: Ray keeps it on 127.0.0.1 (read when Ray is imported)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # these nodes' own cluster
    from bench_ingest import make_sources, plain_transcode

    from pipeline.ingest.worker import TranscodeConfig

    cfg = TranscodeConfig(short_side=256, fps=30, keyframe_interval=16)
    print(f"# python benchmarks/bench_ingest_nodes.py {' '.join(argv if argv is not None else sys.argv[1:])}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    with tempfile.TemporaryDirectory(prefix="bn", dir="/tmp") as tmp:  # short: Ray's sockets live under it
        tmp = Path(tmp)
        root = tmp / "src"
        t0 = time.perf_counter()
        make_sources(root, args.videos, args.seconds)
        print(f"sources: {args.videos} videos of {args.seconds:g}s at 480x360 30 fps "
              f"({time.perf_counter() - t0:.1f}s to make); target short side {cfg.short_side}, {cfg.fps:g} fps")

        def plain_rate() -> float:
            t0 = time.perf_counter()
            for path in sorted((root / "videos").glob("*.mp4")):
                plain_transcode(path, cfg, one_scaler=True)
            return args.videos / (time.perf_counter() - t0)

        plain = plain_rate()
        print(f"plain PyAV transcode loop, 1 process : {plain:6.2f} videos/s  (the per-core rate)")
        rates = {}
        for n in args.workers:
            run_tmp = tmp / f"w{n}"
            run_tmp.mkdir()
            with FakeNodes(n, run_tmp) as nodes:
                elapsed, placed = timed_ingest(nodes.address, root, run_tmp / "out", cfg)
            rates[n] = args.videos / elapsed
            spread = ", ".join(f"{k}: {v}" for k, v in sorted(placed.items()))
            print(f"ingest, {n} Ray worker(s) on {n} node(s): {rates[n]:6.2f} videos/s  ({rates[n] / plain:.2f} of "
                  f"plain; {rates[n] / n / plain:.2f} per worker; {elapsed:.1f}s; cluster start {nodes.start_s:.1f}s "
                  f"not counted; shards by node: {spread})")
        again = plain_rate()  # the machine may be busier (or quieter) now than at the start
        print(f"plain PyAV transcode loop, again     : {again:6.2f} videos/s")
        if args.hd:  # the ingest's own transcode, in this process, on 360p and on 720p sources
            from pipeline.ingest.worker import transcode

            def transcode_rate(paths: list[Path]) -> float:
                t0 = time.perf_counter()
                for path in paths:
                    transcode(path.read_bytes(), str(path), cfg)
                return len(paths) / (time.perf_counter() - t0)

            sd = transcode_rate(sorted((root / "videos").glob("*.mp4"))[:args.hd])
            hd = transcode_rate(make_hd(tmp / "hd", args.hd, 10.0))
            print(f"ingest transcode(), 1 process: {sd:5.2f} videos/s on 8 s 480x360 sources, {hd:5.2f} on 10 s "
                  f"1280x720 ({sd / hd:.1f}x the time per video)")
    one = rates.get(1)
    if one:
        for n, r in rates.items():
            if n != 1:
                print(f"speed-up {n} workers over 1: {r / one:.2f}x")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())

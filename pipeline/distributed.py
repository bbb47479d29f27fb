"""Who am I in the job: rank, world size, local rank and the rendezvous address, from torchrun,
Slurm's srun, or submitit (whose Slurm and local executors both look like one of those).

``DistEnv.detect()`` reads the environment; ``export()`` writes the variables torch.distributed reads
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so DeepSpeed and plain PyTorch initialise the
same way whatever started the process. ``DistEnv.single()`` is a one-process group (benchmarks, tests).

Once the process group is up, ``group_rank_world()`` gives this process's rank and world size from it
(``(0, 1)`` without one): what code below the entry point asks (DDP or not, which rank writes, whether a
collective is needed) without reading the environment again.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun, slurm, submitit-local, single

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))

    def export(self) -> DistEnv:
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(self.local_rank),
                          LOCAL_WORLD_SIZE=str(self.local_world_size), MASTER_ADDR=self.master_addr,
                          MASTER_PORT=str(self.master_port))
        return self

    @classmethod
    def detect(cls, environ: dict[str, str] | None = None) -> DistEnv:
        """A job submitted by submitit says which executor ran it (its variables win: a launching shell's
        stray RANK must not leak into a Slurm job); otherwise torchrun's variables, then srun's."""
        env = os.environ if environ is None else environ
        executor = env.get("SUBMITIT_EXECUTOR", "")
        if executor == "local" and "SUBMITIT_LOCAL_GLOBALID" in env:
            return cls._submitit_local(env)
        if executor == "slurm" and "SLURM_PROCID" in env:
            return cls._slurm(env)
        if "RANK" in env and "WORLD_SIZE" in env and "MASTER_ADDR" in env:  # torchrun, or exported already
            return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])), env["MASTER_ADDR"],
                       int(env.get("MASTER_PORT", 29500)), "torchrun")
        if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_JOB_ID" in env:  # srun python -m ...
            return cls._slurm(env)
        if "SUBMITIT_LOCAL_GLOBALID" in env:
            return cls._submitit_local(env)
        return cls.single(int(env.get("MASTER_PORT", 29500)))

    @classmethod
    def single(cls, port: int | None = None) -> DistEnv:
        """One process, rank 0 of 1, its rendezvous on 127.0.0.1 at ``port`` (default: a free one): what a
        benchmark or test exports before it initialises a process group of its own."""
        return cls(0, 1, 0, 1, "127.0.0.1", free_port() if port is None else port, "single")

    @classmethod
    def _slurm(cls, env) -> DistEnv:
        ntasks = int(env["SLURM_NTASKS"])
        nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", 1)))
        return cls(int(env["SLURM_PROCID"]), ntasks, int(env.get("SLURM_LOCALID", 0)), max(1, ntasks // max(1, nodes)),
                   first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")), job_port(env["SLURM_JOB_ID"]), "slurm")

    @classmethod
    def _submitit_local(cls, env) -> DistEnv:
        n = int(env["SUBMITIT_LOCAL_NTASKS"])
        return cls(int(env["SUBMITIT_LOCAL_GLOBALID"]), n, int(env["SUBMITIT_LOCAL_LOCALID"]), n, "127.0.0.1",
                   job_port(env.get("SUBMITIT_LOCAL_JOB_ID", "0")), "submitit-local")


def group_rank_world() -> tuple[int, int]:
    """This process's rank and the world size of the initialised torch.distributed process group, or
    ``(0, 1)`` when there is none (one process, or torch built without distributed support)."""
    import torch.distributed as dist  # here: launching a job (DistEnv, free_port) must not import torch

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def job_port(job_id: str) -> int:
    """A rendezvous port every task of a job agrees on without talking (the same rule submitit uses:
    derived from the job id), away from the well-known range."""
    digits = re.sub(r"\D", "", str(job_id)) or "0"
    return 20000 + int(digits[-4:]) % 20000


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it): the rendezvous of a one-process group
    (benchmarks, tests) and the ports of the local development services (infra/)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expand_nodelist(nodelist: str) -> list[str]:
    """``n[1-3,5],gpu7`` -> ``['n1', 'n2', 'n3', 'n5', 'gpu7']`` (scontrol's rule; used without scontrol)."""
    hosts: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist):
        prefix, ranges = m.group(1), m.group(2)
        if not ranges:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            width = len(lo)
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{width}d}")
    return hosts


def first_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=10, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return expand_nodelist(nodelist)[0]

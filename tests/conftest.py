"""Shared test setup: GPU-marked tests run only where CUDA is visible."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    """A real SeaweedFS S3 server on 127.0.0.1 for this test session; its credentials and endpoint are
    exported the usual boto3 way (environment) for the duration, and the server is stopped after."""
    from infra.seaweedfs import SeaweedFS

    server = SeaweedFS(Path(tmp_path_factory.mktemp("seaweedfs")), access_key="test-key",
                       secret_key="test-secret-value").start()
    from pipeline.train.launch import job_environment

    try:
        with job_environment(server.env()):
            yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(seaweedfs) -> str:
    """A fresh bucket on the session's SeaweedFS."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    seaweedfs.create_bucket(name)
    return name


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """The Slurm development cluster (infra/slurm_dev.py): 2 fake nodes, started for this session and
    stopped after; installs slurm-wlm and munge first where they are missing (Debian, root)."""
    import socket

    from infra.slurm_dev import SlurmDevCluster

    with socket.socket() as s:  # a free port for slurmctld; the slurmd ports follow it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1] % 20000 + 30000
    cluster = SlurmDevCluster(tmp_path_factory.mktemp("slurm"), nodes=2, port=port)
    try:
        cluster.install()
    except RuntimeError as e:  # not root on Debian: nothing to install with; elsewhere (CI) this fails loudly
        pytest.skip(f"Slurm cannot be installed here: {e}")
    cluster.up()  # installed but not starting is a failure, not a skip
    try:
        yield cluster
    finally:
        cluster.down()


@pytest.fixture(scope="session")
def mlflow_server(seaweedfs, tmp_path_factory):
    """A real `mlflow server` (sqlite backend, artifacts in a SeaweedFS bucket) on 127.0.0.1."""
    from infra.mlflow_server import MLflowServer
    from infra.seaweedfs import free_port

    seaweedfs.create_bucket("mlflow")
    server = MLflowServer(tmp_path_factory.mktemp("mlflow"), port=free_port(),
                          artifacts="s3://mlflow/artifacts").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def deepspeed_rank():
    """One DeepSpeed rank (gloo, CPU) in this test process, for every in-process DeepSpeed test: DeepSpeed keeps
    its process groups in module globals, so a second init after a destroy in the same process finds stale
    ones ("Group ... is not registered"); initialised once, destroyed when the session ends."""
    import socket

    from pipeline.config import load_recipe
    from pipeline.train.engine import init_distributed
    from pipeline.train.launch import job_environment

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    with job_environment(env):
        try:
            yield init_distributed(load_recipe("smoke", ["data.index=unused"]), 0, 1, 0)
        finally:
            torch.distributed.destroy_process_group()

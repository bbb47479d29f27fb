"""The paper's Table-2 comparison in the product: a 3D CNN (the registry's resnet3d family) trained by the same
launcher on the Slurm cluster of fake nodes (DeepSpeed ZeRO-2, 2 ranks), tested, exported, tracked, and compared
beside a TimeSformer run in one jobs/compare.py table and plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.train.launch import LaunchRequest, launch
from tests.synthetic_data import write_dataset

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
SHORT = ["train.max_steps=30", "train.ckpt_every=30", "train.log_every=5", "train.val_every=10",
         "tracking.experiment=table2", "tracking.register=false"]


def cli(script: str, args: list[str], env: dict[str, str] | None = None, timeout: float = 300):
    return subprocess.run([sys.executable, str(REPO / "jobs" / script), *args], env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.mark.slurm
def test_a_3d_cnn_trains_on_slurm_and_compares_beside_a_timesformer(tmp_path, slurm_cluster):
    from mlflow.tracking import MlflowClient

    from pipeline.models.convert import load_safetensors
    from pipeline.models.registry import model_config_of, parameter_count

    data = tmp_path / "colour"
    write_dataset(str(data), "colour")
    runs = tmp_path / "runs"
    p = cli("launch.py", ["--nodes", "2", "--recipe", "smoke_i3d", "--runs-dir", str(runs), "--name", "i3d",
                          "--wait", f"data.index={data}", *SHORT], slurm_cluster.env())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "(slurm, 2 node(s) x 1 rank(s))" in p.stdout
    run_dir = runs / "i3d"
    logs = "".join(f.read_text() for f in run_dir.glob("submitit/*/*_log.out"))
    assert "node=0(2), global_rank=0(2)" in logs and "node=1(2), global_rank=1(2)" in logs
    result = json.loads((run_dir / "result.json").read_text())
    assert result["outcome"] == "done" and result["step"] == 30
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    loss = [r["loss"] for r in rows if "loss" in r]
    assert sum(loss[-2:]) < sum(loss[:2]), loss  # it learns (slower than the TimeSformer on this task: the square
    # is a small part of the frame, and global average pooling dilutes it; the Table-2 study trains for longer)
    report = json.loads((run_dir / "eval" / "test.json").read_text())
    assert report["videos"] == 8 and report["views_per_video"] == 6 and report["top1"] is not None
    exported = load_safetensors(run_dir / "export" / "model.safetensors")
    assert type(exported).__name__ == "ResNet3D" and exported.cfg.num_classes == 4

    # the TimeSformer side, same data and experiment (local ranks: the cluster's part is shown above)
    info = launch(LaunchRequest(recipe="smoke", nodes=2, local=True, name="tsf", runs_dir=str(runs),
                                overrides=[f"data.index={data}", *SHORT]), out=lambda *a: None)
    assert all(r["outcome"] == "done" for r in info["job"].results())

    out = tmp_path / "report"
    c = cli("compare.py", ["--experiment", "table2", "--runs-dir", str(runs), "--out", str(out), "--no-log"])
    assert c.returncode == 0, c.stdout[-3000:] + c.stderr[-3000:]
    table = json.loads((out / "runs.json").read_text())
    by_model = {r["model"]: r for r in table}
    assert set(by_model) == {"i3d_tiny", "timesformer_tiny"}, table
    assert by_model["i3d_tiny"]["attention"] == "resnet3d"
    assert by_model["timesformer_tiny"]["attention"] == "divided_space_time"
    cnn = model_config_of("i3d_tiny", num_classes=4, num_frames=4, img_size=32)
    assert by_model["i3d_tiny"]["params_m"] == pytest.approx(parameter_count(cnn) / 1e6)
    assert all(r["gpu_hours"] and r["top1"] is not None for r in table)
    assert "i3d_tiny" in c.stdout and "timesformer_tiny" in c.stdout  # one printed table
    assert (out / "accuracy_vs_gpu_hours.png").stat().st_size > 10_000
    # the MLflow tags that put the CNN in the table
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    record = json.loads((run_dir / "mlflow.json").read_text())
    tags = client.get_run(record["run_id"]).data.tags
    assert tags["family"] == "resnet3d" and tags["variant"] == "i3d_tiny"

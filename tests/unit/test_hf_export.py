"""The Hugging Face export others load: transformers' own video-classification pipeline classifies a video file
with it as our model does, its model card tells a run's story (and a bare model's shorter one), and
--push-to-hub calls huggingface_hub with the directory it wrote (up to the upload: no network here)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.cli.export import main as export_main
from pipeline.config import batch_plan, dump, load_recipe
from pipeline.data.shards import load_index
from pipeline.data.transforms import TestTransform
from pipeline.data.video import decode_frames, encode_video
from pipeline.models import create_model
from pipeline.models.convert import load_safetensors, save_safetensors
from pipeline.train import checkpoint as ckpt
from pipeline.train.engine import TorchEngine
from pipeline.train.export import export_hf
from pipeline.train.main import build_model
from tests.synthetic_data import write_dataset

CLASSES = ["red", "green", "blue", "yellow"]  # the colour dataset's, in its index order


def blocky_clip(path: Path, height: int, width: int, frames: int = 10, fps: int = 15, seed: int = 1) -> Path:
    """A short H.264 clip of coarse random blocks (so resizing it is well defined), encoded with PyAV."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (frames, 6, 8, 3)).astype(np.uint8)
    up = np.ones((height // 6 + 1, width // 8 + 1, 1), dtype=np.uint8)
    video = np.stack([np.kron(f, up)[:height, :width] for f in small])
    path.write_bytes(encode_video(video, fps, crf=18))
    return path


def our_probabilities(model_path: Path, video: Path, fps: int = 15) -> dict[str, float]:
    """Our prediction for the first T frames of ``video`` (what transformers' pipeline looks at by default): our
    decoder, short side to the crop size and a centre crop (the test transform), our model's normalisation."""
    model = load_safetensors(model_path).eval()
    cfg = model.cfg
    clip = decode_frames(str(video), [i / fps for i in range(cfg.num_frames)])
    views = TestTransform(crop=cfg.img_size, num_crops=1, mean=cfg.mean, std=cfg.std)(clip.frame_list)
    with torch.no_grad():
        probs = model(views).softmax(-1)[0]
    names = json.loads((model_path.parent / "hf" / "config.json").read_text())["id2label"]
    return {names[str(i)]: float(p) for i, p in enumerate(probs)}


@pytest.fixture
def bare_model(tmp_path) -> Path:
    """A tiny model with non-default normalisation (0.5 / 0.5) and a decisive head, saved with its classes."""
    torch.manual_seed(0)
    model = create_model("timesformer_tiny", num_classes=4, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    with torch.no_grad():
        model.head.weight.mul_(10)  # clear margins between classes: top-1 is well defined on any clip
    return save_safetensors(model, tmp_path / "model" / "model.safetensors", classes=CLASSES)


@pytest.mark.parametrize("size", [(32, 48), (72, 96)], ids=["crop-only", "resized"])
def test_transformers_pipeline_classifies_a_video_file_as_our_model_does(bare_model, tmp_path, size):
    """transformers.pipeline("video-classification") on the export: its PyAV decode of the first frames, its image
    processor from preprocessor_config.json (no torchvision needed). Where the frames need no resize the two
    agree to float precision, which pins the crop, the normalisation, the frame order and the labels; resized,
    PIL's antialiased resize and ours differ slightly, and the top-1 is the same."""
    from transformers import pipeline

    hf_dir = export_hf(bare_model, bare_model.parent / "hf")
    assert {p.name for p in hf_dir.iterdir()} == {"config.json", "preprocessor_config.json", "model.safetensors",
                                                 "README.md"}
    video = blocky_clip(tmp_path / "clip.mp4", *size)
    classify = pipeline("video-classification", model=str(hf_dir))
    theirs = {r["label"]: r["score"] for r in classify(str(video), top_k=4)}
    ours = our_probabilities(bare_model, video)
    assert set(theirs) == set(CLASSES)
    assert max(theirs, key=theirs.get) == max(ours, key=ours.get)
    tolerance = 1e-5 if size == (32, 48) else 0.1  # the two resizes differ (antialiased or not), logits x10
    assert all(abs(theirs[c] - ours[c]) < tolerance for c in CLASSES), (theirs, ours)
    assert max(ours.values()) > 0.4  # a decisive model: the agreement is not between two near-uniform guesses


def test_a_bare_model_gets_a_short_card(bare_model):
    card = (export_hf(bare_model, bare_model.parent / "hf") / "README.md").read_text()
    meta, body = front_matter(card)
    assert meta == {"library_name": "transformers", "pipeline_tag": "video-classification",
                    "tags": ["video-classification", "timesformer", "divided-space-time"]}
    assert "4 classes" in body and "`red`, `green`, `blue`, `yellow`" in body
    assert "mean [0.5, 0.5, 0.5] and std [0.5, 0.5, 0.5]" in body
    assert 'pipeline("video-classification", model="path/to/this/directory")' in body
    assert "## Training data" not in body and "## Evaluation" not in body and "frame_sampling_rate" not in body


def front_matter(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n")
    head, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run directory as a finished run leaves it: config, a complete checkpoint, its dataset record (v1 of the
    colour dataset), the test report and the GPU-hour account."""
    index = write_dataset(str(tmp_path / "ds"), "colour", per_class={"train": 1, "val": 1})
    cfg = load_recipe("smoke", [f"data.index={tmp_path / 'ds'}", "train.engine=torch", "train.zero_stage=0",
                                "test.temporal_clips=2", "test.spatial_crops=3", "model.mean=[0.5]", "model.std=[0.5]"])
    run = tmp_path / "smoke-20261130-101500"
    run.mkdir()
    (run / "config.yaml").write_text(dump(cfg))
    model = build_model(cfg)
    engine = TorchEngine(model, cfg, batch_plan(cfg, 1), per_epoch=1, device=torch.device("cpu"))
    engine.train_micro_batch(torch.randn(4, 3, 4, 32, 32), torch.tensor([0, 1, 2, 3]))
    engine.save(ckpt.checkpoint_root(run), ckpt.tag_for(1), {"step": 1})
    ckpt.mark_complete(run, ckpt.tag_for(1), {"step": 1})
    (run / "dataset.json").write_text(json.dumps({"dataset": index.dataset, "version": index.version,
                                                  "classes": index.classes}))
    (run / "eval").mkdir()
    (run / "eval" / "test.json").write_text(json.dumps({
        "protocol": "multi_view", "split": "val", "dataset": index.dataset, "version": index.version, "videos": 4,
        "unlabelled": 0, "skipped": 1, "views_per_video": 6, "top1": 75.0, "top5": 100.0}))
    (run / "gpu_hours.json").write_text(json.dumps({"hours": 0.0123, "unit": "cpu-process", "attempts": []}))
    (run / "result.json").write_text(json.dumps({"step": 1}))
    return run


def test_a_runs_card_says_what_it_was_trained_on_how_and_how_well(run_dir, tmp_path, capsys):
    assert export_main([str(run_dir), "--hf", str(tmp_path / "hf")]) == 0, capsys.readouterr().err
    card = (tmp_path / "hf" / "README.md").read_text()
    meta, body = front_matter(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "video-classification"
    assert meta["datasets"] == ["test-colour"] and meta["metrics"] == ["accuracy", "top_5_accuracy"]
    result = meta["model-index"][0]["results"][0]
    assert result["dataset"] == {"name": "test-colour v1", "type": "test-colour", "split": "val"}
    assert result["metrics"][0] == {"type": "accuracy", "value": 75.0, "name": "top-1 accuracy (%)"}
    index = load_index(str(tmp_path / "ds"), 1)[0]
    digest = index.split_digest("train")
    assert f"Dataset `test-colour` version 1, digest `{digest}` of its `train` split's shards (4 training" in body
    assert "recipe `smoke`, model variant `timesformer_tiny`" in body
    assert "`multi_view` test protocol (6 views: 2 temporal clip(s) x 3 spatial crop(s) per video" in body
    assert "- initial weights: random" in body
    assert "top-1 **75.00%**, top-5 100.00% (1 skipped videos left out)" in body
    assert "0.0123 cpu-process-hours" in body
    assert "mean [0.5, 0.5, 0.5] and std [0.5, 0.5, 0.5]" in body
    assert "4: `red`, `green`, `blue`, `yellow`." in body
    assert f"frame_sampling_rate={load_recipe('smoke').data.sampling_rate}" in body
    assert "python jobs/predict.py" in body
    labels = json.loads((tmp_path / "hf" / "config.json").read_text())["id2label"]
    assert labels == {str(i): c for i, c in enumerate(CLASSES)}


def test_push_to_hub_creates_the_repository_and_uploads_the_export(run_dir, monkeypatch, capsys):
    import huggingface_hub

    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs, self.token))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):  # what goes up, at the upload call, as huggingface_hub filters it
        from huggingface_hub.utils import filter_repo_objects

        files = sorted(filter_repo_objects([p.name for p in Path(kwargs["folder_path"]).iterdir()],
                                           allow_patterns=kwargs.get("allow_patterns"),
                                           ignore_patterns=kwargs.get("ignore_patterns")))
        calls.append(("upload_folder", kwargs, files, (Path(kwargs["folder_path"]) / "README.md").read_text()))
        return huggingface_hub.CommitInfo(commit_url="https://huggingface.co/me/tiny/commit/abc", commit_message="",
                                          commit_description="", oid="abc")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_value")
    stray = run_dir / "export" / "hf"
    stray.mkdir(parents=True)
    (stray / "notes-private.txt").write_text("not for the Hub")  # left there by a person: never uploaded
    (stray / "old.ckpt").write_bytes(b"\0" * 8)
    assert export_main([str(run_dir), "--push-to-hub", "me/tiny", "--private"]) == 0, capsys.readouterr().err
    (kind, repo, kwargs, token), (kind2, upload, files, card) = calls
    assert (kind, repo, kwargs, token) == ("create_repo", "me/tiny", {"private": True, "exist_ok": True,
                                                                      "repo_type": "model"}, "hf_test_token_value")
    assert kind2 == "upload_folder" and upload["repo_id"] == "me/tiny" and upload["repo_type"] == "model"
    assert Path(upload["folder_path"]) == run_dir / "export" / "hf"  # the default export directory
    assert files == ["README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
    assert 'pipeline("video-classification", model="me/tiny")' in card and "jobs/predict.py hf-hub:me/tiny" in card
    out = capsys.readouterr().out
    assert "commit/abc" in out
    assert "pushed README.md, config.json, preprocessor_config.json, model.safetensors of" in out

    # a failed upload: exit 3, the reason said, the token never printed
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import httpx

    def refused(self, **kwargs):
        response = httpx.Response(403, request=httpx.Request("POST", "https://huggingface.co/api/models/me/tiny"))
        raise HfHubHTTPError("403 Forbidden: hf_test_token_value cannot write to me/tiny", response=response)

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", refused)
    assert export_main([str(run_dir), "--push-to-hub", "me/tiny"]) == 3
    err = capsys.readouterr().err
    assert "pushing" in err and "failed (HfHubHTTPError: 403 Forbidden" in err and "hf_test_token_value" not in err


def test_push_to_hub_without_a_token_or_with_a_bad_id_says_so_before_exporting(run_dir, tmp_path, monkeypatch,
                                                                                 capsys):
    import huggingface_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda *a, **k: pytest.fail("uploaded"))
    assert export_main([str(run_dir), "--push-to-hub", "me/tiny"]) == 2
    err = capsys.readouterr().err
    assert "no Hugging Face token" in err and "HF_TOKEN" in err and "hf auth login" in err
    assert not (run_dir / "export").exists()  # refused before any export work
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    assert export_main([str(run_dir), "--push-to-hub", "not a repo/x y"]) == 2
    assert "not a Hugging Face repository id" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export_main([str(run_dir), "--private"])  # --private without --push-to-hub: a usage error


def test_the_card_and_registry_describe_the_protocol_that_ran_and_never_a_private_init(run_dir, tmp_path):
    """A long_video test takes every covering clip (not test.temporal_clips), and a card that is published names
    a hub base model (pinned) but not a local path or a private s3:// URI."""
    from pipeline.config import load_resolved
    from pipeline.tracking.registry import describe_version, version_tags
    from pipeline.train.model_card import model_card, run_facts

    cfg = load_resolved(run_dir / "config.yaml")
    report = json.loads((run_dir / "eval" / "test.json").read_text())
    (run_dir / "eval" / "test.json").write_text(json.dumps({**report, "protocol": "long_video",
                                                            "views_per_video": None}))
    model = load_safetensors_model(run_dir, tmp_path)
    facts = run_facts(run_dir, cfg)
    card = model_card(model.cfg, CLASSES, facts)
    assert "`long_video` test protocol (every non-overlapping clip covering the video x 3 spatial crop(s) per " \
           "video" in card and "temporal clip" not in card
    tags = version_tags(facts, model.cfg)
    assert tags["test_protocol"] == "long_video: every non-overlapping clip covering the video x 3 spatial crop(s) " \
                                    "on val"
    assert "2x3" not in describe_version(facts, model.cfg) and "every non-overlapping clip" in \
        describe_version(facts, model.cfg)

    pinned = "hf-hub:timm/vit_base_patch16_224.augreg_in21k@" + "a" * 40
    for init, shown in ((pinned, f"`{pinned}` (Hugging Face Hub)"), ("s3://private-bucket/team/secret/model.pth",
                        "an s3 checkpoint"), (str(tmp_path / "home" / "alice" / "vit.pth"), "a local checkpoint")):
        cfg.model.init, cfg.model.init_source = (init, "") if not init.startswith("hf-hub:") else ("/x", init)
        card = model_card(model.cfg, CLASSES, run_facts(run_dir, cfg))
        assert card.split("- initial weights: ")[1].split("\n")[0] == shown
        assert "private-bucket" not in card and "alice" not in card
    assert "base_model: timm/vit_base_patch16_224.augreg_in21k" in model_card(
        model.cfg, CLASSES, {**run_facts(run_dir, cfg), "init": pinned})


def load_safetensors_model(run_dir: Path, tmp_path: Path):
    from pipeline.config import load_resolved
    from pipeline.train.export import export_model

    return load_safetensors(export_model(run_dir, load_resolved(run_dir / "config.yaml"),
                                         out=tmp_path / "m" / "model.safetensors"))

"""A multi-label dataset trains and reports mAP, end to end: a JSON Lines manifest with a list of labels per video
(synthetic clips: a colour video shows one colour, an order video two) is ingested by the ingest run (shards built
in this process, no Ray), jobs/launch.py's path takes model.multi_label from the dataset index, one local CPU rank
trains the tiny model a few steps with the plain engine (binary cross-entropy), and validation, the test protocol,
the MLflow run, the exported model and compare all speak of mAP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.data.loader import iterate_samples
from pipeline.data.shards import load_index
from pipeline.data.synthetic import SyntheticSpec, make_video
from pipeline.ingest import run as ingest_run
from pipeline.ingest.run import IngestConfig, run_ingest
from pipeline.ingest.worker import build_shard
from pipeline.train.launch import LaunchRequest, launch

pytestmark = [pytest.mark.integration]
SPEC = SyntheticSpec(size=32, num_frames=16, fps=16.0, square=12)
# (kind, synthetic label, the video's label set)
VIDEOS = [("colour", "red", ["red"]), ("order", "red_then_blue", ["red", "blue"]), ("colour", "green", ["green"]),
          ("order", "yellow_then_green", ["yellow", "green"]), ("colour", "blue", ["blue"]),
          ("colour", "yellow", ["yellow"]), ("order", "blue_then_red", ["blue", "red"]),
          ("order", "green_then_yellow", ["green", "yellow"])]


@pytest.fixture
def multilabel_dataset(tmp_path, monkeypatch) -> Path:
    """The ingest run on a manifest of label lists; shard tasks run here, one after the other (the same
    build_shard Ray runs)."""
    def build_all(plan, cfg, ray_address, progress):
        return [build_shard(p, cfg.output, cfg.dataset, cfg.transcode, cfg.decode_limits()) for p in plan.build]

    monkeypatch.setattr(ingest_run, "_build_all", build_all)
    videos = tmp_path / "videos"
    videos.mkdir()
    rows = []
    for split, offset in (("train", 0), ("val", 100)):
        for i, (kind, name, label_set) in enumerate(VIDEOS):
            path = f"{split}/{name}-{i}.mp4"
            (videos / path).parent.mkdir(exist_ok=True)
            (videos / path).write_bytes(make_video(kind, name, offset + i, SPEC))
            rows.append({"path": path, "label": label_set, "split": split})
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = IngestConfig.load(None, ["dataset=colours", "format=manifest", f"annotations={manifest}",
                                   f"source={videos}", f"output={tmp_path / 'ds'}", "samples_per_shard=8",
                                   "transcode.short_side=32", "transcode.fps=16", "transcode.keyframe_interval=4",
                                   "transcode.min_frames=1"])
    result = run_ingest(cfg, progress=False)
    assert result.version == 1 and not result.quarantine, result.message
    return tmp_path / "ds"


def test_a_multi_label_dataset_trains_and_reports_map(tmp_path, multilabel_dataset):
    from mlflow.tracking import MlflowClient

    from pipeline.models.convert import load_safetensors
    from pipeline.tracking import compare

    index, storage = load_index(str(multilabel_dataset))
    assert index.multi_label and index.classes == ["blue", "green", "red", "yellow"]
    metas = [json.loads(s["json"]) for shard in index.split("val") for s in iterate_samples(storage, shard.url)]
    assert sorted((m["label"], m["label_name"]) for m in metas if "then" in m["source"]) == [
        ([0, 2], ["blue", "red"]), ([0, 2], ["blue", "red"]), ([1, 3], ["green", "yellow"]),
        ([1, 3], ["green", "yellow"])]  # the two colours of each order video, as sorted class indices and names
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    info = launch(LaunchRequest(recipe="smoke", nodes=1, local=True, name="ml", runs_dir=str(tmp_path / "runs"),
                                overrides=[f"data.index={multilabel_dataset}", "train.engine=torch",
                                           "train.zero_stage=0", "train.max_steps=4", "train.log_every=2",
                                           "train.val_every=2", "train.ckpt_every=4", "data.num_workers=0",
                                           "test.temporal_clips=2", "test.spatial_crops=1", f"tracking.uri={uri}",
                                           "tracking.experiment=multilabel"]), out=lambda *a: None)
    result = info["job"].results()[0]
    run_dir = Path(info["run_dir"])
    assert result["outcome"] == "done" and "test_map" in result and "test_top1" not in result
    assert "multi_label: true" in (run_dir / "config.yaml").read_text()  # launch took it from the index
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    validation = [row for row in lines if "val_map" in row]
    assert [row["step"] for row in validation] == [2, 4] and all(0 < row["val_map"] <= 100 for row in validation)
    assert not any("val_top1" in row for row in lines)
    report = json.loads((run_dir / "eval" / "test.json").read_text())
    assert report["metric"] == "map" and report["videos"] == len(VIDEOS) and report["classes_scored"] == 4
    assert report["map"] == pytest.approx(result["test_map"]) and not (run_dir / "eval" / "confusion.png").exists()
    exported = load_safetensors(run_dir / "export" / "model.safetensors")
    assert exported.cfg.multi_label and exported.cfg.num_classes == 4  # the saved model says how to score it
    # MLflow: the metrics by their names, and compare's table titles the column by the run's metric
    client = MlflowClient(uri)
    run = client.get_run(json.loads((run_dir / "mlflow.json").read_text())["run_id"])
    assert {"val_map", "test_map"} <= set(run.data.metrics) and "test_top1" not in run.data.metrics
    assert run.data.params["model.multi_label"] == "True"
    (summary,) = compare.fetch(uri, "multilabel")
    assert summary.metric == "map" and summary.score == pytest.approx(result["test_map"]) and len(summary.curve) == 2
    header = compare.table_text([summary]).splitlines()[0].split()
    assert "mAP" in header and "top-1" not in header

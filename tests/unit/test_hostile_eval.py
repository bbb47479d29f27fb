"""Evaluation never misleads: unlabelled videos are counted, not scored; labels a model cannot predict and
class lists that differ are refused (before the pass where they can be known); a request that scores
nothing gives no accuracy and a non-zero exit; an earlier report is never replaced silently.

Every dataset here is written at test time: real H.264 clips in real shards under a committed index."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import batch_plan, dump, load_recipe
from pipeline.data.loader import clip_config
from pipeline.data.shards import (
    DatasetIndex,
    ShardError,
    ShardSample,
    commit_index,
    put_shard,
    shard_url,
)
from pipeline.data.storage import open_storage
from pipeline.data.synthetic import COLOUR_CLASSES, SyntheticSpec, make_video
from pipeline.models.factory import create_model
from pipeline.train import checkpoint as ckpt
from pipeline.train import evaluate as ev
from pipeline.train.engine import TorchEngine
from pipeline.train.evaluate import EvaluationError, check_classes, model_classes, validate
from pipeline.train.export import export_model
from pipeline.train.main import build_model

REPO = Path(__file__).resolve().parents[2]
SPEC = SyntheticSpec(size=32, num_frames=8)
CPU = torch.device("cpu")


def write_split(root: Path, labels: list[int], classes: tuple[str, ...] = COLOUR_CLASSES, split: str = "val",
                per_shard: int = 4, broken: tuple[int, ...] = ()) -> DatasetIndex:
    """A dataset with one split whose samples carry exactly ``labels`` (-1: unlabelled, as ingest writes for
    test rows; anything else as given). The clip shows the colour of the label when it has one; the
    samples numbered in ``broken`` hold bytes that are no video."""
    storage = open_storage(str(root))
    samples = []
    for n, label in enumerate(labels):
        colour = COLOUR_CLASSES[label] if 0 <= label < len(COLOUR_CLASSES) else COLOUR_CLASSES[0]
        meta = {"label": label, "label_name": classes[label] if 0 <= label < len(classes) else "",
                "dataset": "hostile", "split": split, "source": "synthetic", "duration": SPEC.num_frames / SPEC.fps,
                "fps": SPEC.fps, "num_frames": SPEC.num_frames, "source_sha256": "-"}
        video = b"\x00not a video" * 50 if n in broken else make_video("colour", colour, n, SPEC)
        samples.append(ShardSample(f"v{n:04d}", video, meta))
    shards = []
    for i in range(0, len(samples), per_shard):
        shards.append(put_shard(storage, shard_url(split, i // per_shard), split, samples[i:i + per_shard]))
    index = DatasetIndex("hostile", 1, list(classes), {}, shards)
    commit_index(storage, index)
    return index


def cfg_for(root: Path, *extra: str):
    return load_recipe("smoke", [f"data.index={root}", "train.engine=torch", "train.zero_stage=0",
                                 "test.temporal_clips=1", "test.spatial_crops=1", *extra])


def run_test(model, index, root, **kw):
    cfg = cfg_for(root)
    return ev.test_protocol(model, torch.float32, index, open_storage(str(root)), split="val", clip=clip_config(cfg),
                         protocol="multi_view", temporal_clips=1, spatial_crops=1, batch_size=4, device=CPU,
                         num_workers=0, **kw)


def tiny(num_classes: int = 4):
    torch.manual_seed(0)
    return create_model("timesformer_tiny", num_frames=4, num_classes=num_classes).eval()


def test_unlabelled_videos_are_predicted_but_neither_scored_nor_put_in_a_confusion_row(tmp_path):
    labels = [0, -1, 1, 2, -1, 3, -1]  # one video per class, three without a label
    index = write_split(tmp_path, labels)
    report = run_test(tiny(), index, tmp_path)
    assert report["videos"] == 4 and report["unlabelled"] == 3 and report["skipped"] == 0
    assert len(report["predictions"]) == 7  # the unlabelled ones are predicted all the same
    confusion = report["confusion"]
    assert sum(map(sum, confusion)) == 4
    assert [sum(row) for row in confusion] == [1, 1, 1, 1]  # before: the last row took the 3 unlabelled
    scored = [r for r in report["predictions"] if r["label"] != -1]
    assert report["top1"] == pytest.approx(100 * sum(r["pred"] == r["label"] for r in scored) / 4)
    assert report["top5"] == pytest.approx(100.0)  # 4 classes: every label is in the top 5 of the scored


def test_nothing_labelled_gives_no_accuracy_and_max_videos_must_be_a_count(tmp_path):
    index = write_split(tmp_path, [-1, -1, -1])
    report = run_test(tiny(), index, tmp_path)
    assert report["videos"] == 0 and report["unlabelled"] == 3
    assert report["top1"] is None and report["top5"] is None  # not 0.0: there is no accuracy to report
    with pytest.raises(EvaluationError, match=r"max_videos=-1"):
        run_test(tiny(), index, tmp_path, max_videos=-1)


def test_a_label_the_model_cannot_predict_stops_the_pass_at_that_video(tmp_path):
    index = write_split(tmp_path, [7] + [0, 1, 2, 3] * 3)  # the index lists 4 classes; one sample says 7
    model = tiny()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ShardError, match=r"shards/val/000000\.tar.*label") as err:
        run_test(model, index, tmp_path)
    assert len(calls) <= 1, "the pass went on after the impossible label"  # 12 good videos follow it
    assert "re-ingest" in str(err.value)


def test_a_label_that_reaches_the_scoring_is_refused_naming_the_video(tmp_path, monkeypatch):
    """Whatever the loader lets through: the scoring itself refuses a label outside the model's classes
    (a float label, as metadata could say 2.9, too), at that video, not after the pass."""
    index = write_split(tmp_path, [0, 1])
    for bad, match in ((9, r"video v0001: label 9 is outside the model's classes 0\.\.3"),
                       (2.9, r"video v0001: label 2\.9 is not an integer")):
        items = [{"views": torch.randn(1, 3, 4, 32, 32), "label": label, "key": f"v{n:04d}", "clips": 1}
                 for n, label in enumerate([0, bad] + [1] * 8)]
        monkeypatch.setattr(ev, "view_loader", lambda *a, items=items, **k: iter(items))
        model = tiny()
        calls = []
        model.register_forward_hook(lambda *a, calls=calls: calls.append(1))
        with pytest.raises(ShardError, match=match):
            run_test(model, index, tmp_path)
        assert len(calls) == 1  # the good video only: neither the bad one nor the eight after it ran


def test_a_dataset_with_other_classes_is_refused_before_any_video_is_read(tmp_path, monkeypatch):
    index = write_split(tmp_path, [0, 1], classes=("red", "green", "blue", "yellow", "purple"))
    monkeypatch.setattr(ev, "view_loader", lambda *a, **k: pytest.fail("the pass started"))
    with pytest.raises(EvaluationError, match=r"predicts 4 classes and dataset hostile v1 has 5"):
        run_test(tiny(4), index, tmp_path)
    same_size = DatasetIndex("other", 3, ["red", "green", "yellow", "blue"], {}, [])
    with pytest.raises(EvaluationError) as err:
        check_classes(same_size, 4, list(COLOUR_CLASSES))
    message = str(err.value)
    assert "4 classes and dataset other v3 has 4" in message
    assert "differ at class 2: model 'blue', dataset 'yellow'" in message
    shorter = DatasetIndex("other", 3, ["red", "green", "blue"], {}, [])
    with pytest.raises(EvaluationError, match=r"has 3.*class 3: model 'yellow', dataset \(none"):
        check_classes(shorter, 4, list(COLOUR_CLASSES))
    check_classes(DatasetIndex("same", 1, list(COLOUR_CLASSES), {}, []), 4, list(COLOUR_CLASSES))  # no error


def test_validation_leaves_unlabelled_clips_out_and_refuses_impossible_labels():
    model = tiny(3)
    torch.manual_seed(1)
    video = torch.randn(4, 3, 4, 32, 32)
    labels = torch.tensor([0, -1, 2, -1])
    out = validate(model, torch.float32, [{"video": video, "label": labels, "key": ["a", "b", "c", "d"]}], CPU)
    assert out["val_clips"] == 2 and out["val_unlabelled"] == 2
    with torch.no_grad():
        logits = model(video[[0, 2]])
    assert out["val_loss"] == pytest.approx(float(F.cross_entropy(logits, torch.tensor([0, 2]))), abs=1e-5)
    none = validate(model, torch.float32, [{"video": video, "label": torch.full((4,), -1)}], CPU)
    assert none == {"val_clips": 0.0, "val_unlabelled": 4.0}  # no loss, no accuracy
    for labels, match in ((torch.tensor([0, 1, 3, 1]), r"clip c: label 3 is not one of the model's classes 0\.\.2"),
                          (torch.tensor([0.0, 2.9, 1.0, 1.0]), r"clip a: label 0\.0 is not one of")):
        with pytest.raises(ShardError, match=match):  # before: an IndexError, or a float label taken as soft
            validate(model, torch.float32, [{"video": video, "label": labels, "key": ["a", "b", "c", "d"]}], CPU)


# -- jobs/evaluate.py -------------------------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path):
    """A run directory trained (one step) on a 4-class dataset whose val split has 4 labelled and 2
    unlabelled videos; its dataset.json names the classes, as run() writes it."""
    root = tmp_path / "ds"
    index = write_split(root, [0, -1, 1, 2, -1, 3])
    cfg = cfg_for(root)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump(cfg))
    (run / "dataset.json").write_text(json.dumps({"dataset": index.dataset, "version": 1, "classes": index.classes}))
    model = build_model(cfg)
    engine = TorchEngine(model, cfg, batch_plan(cfg, 1), per_epoch=1, device=CPU)
    engine.train_micro_batch(torch.randn(4, 3, 4, 32, 32), torch.tensor([0, 1, 2, 3]))
    engine.save(ckpt.checkpoint_root(run), ckpt.tag_for(0), {"step": 0})
    ckpt.mark_complete(run, ckpt.tag_for(0), {"step": 0})
    return run


def evaluate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / "evaluate.py"), "--workers", "0", *args],
                          capture_output=True, text=True, timeout=300)


def test_the_export_carries_the_class_names_and_evaluation_compares_them(run_dir, tmp_path):
    path = export_model(run_dir, load_recipe("smoke", [f"data.index={tmp_path / 'ds'}"]))
    assert model_classes(path) == (list(COLOUR_CLASSES), f"4 from the metadata of {path}")
    other = tmp_path / "other"  # as many classes, another list: a model scored there would be meaningless
    write_split(other, [0, 1, 2, 3], classes=("red", "green", "yellow", "blue"))
    p = evaluate(str(run_dir), f"data.index={other}")
    assert p.returncode == 2, p.stdout
    assert "trained on 4 classes and dataset hostile v1 has 4" in p.stderr
    assert "model 'blue', dataset 'yellow'" in p.stderr and "Traceback" not in p.stderr
    assert not (run_dir / "eval").exists()  # refused before the pass: nothing written
    bare = tmp_path / "bare.safetensors"  # an export without names (an older one): the count still counts
    from pipeline.models.convert import save_safetensors

    save_safetensors(create_model("timesformer_tiny", num_frames=4, num_classes=4), bare)
    assert model_classes(bare)[0] is None
    assert model_classes(bare, run_dir)[0] == list(COLOUR_CLASSES)  # the run's record names them


def test_evaluate_reports_unlabelled_videos_and_never_replaces_a_report_silently(run_dir):
    p = evaluate(str(run_dir))
    assert p.returncode == 0, p.stderr
    first = run_dir / "eval" / "test-val.json"
    report = json.loads(first.read_text())
    assert report["videos"] == 4 and report["unlabelled"] == 2 and sum(map(sum, report["confusion"])) == 4
    assert "4 labelled videos" in p.stdout and "2 unlabelled videos excluded" in p.stdout
    before = first.read_bytes()
    p = evaluate(str(run_dir), "--max-videos", "3")  # another evaluation: a new name, the first one kept
    assert p.returncode == 0, p.stderr
    assert first.read_bytes() == before
    second = run_dir / "eval" / "test-val-2.json"
    assert json.loads(second.read_text())["videos"] + json.loads(second.read_text())["unlabelled"] == 3
    assert f"an earlier report is at {first}" in p.stderr and "test-val-2.json" in p.stdout
    p = evaluate(str(run_dir), "--out", str(second))  # a named report that exists: refused before the pass
    assert p.returncode == 2 and "--overwrite" in p.stderr and "top-1" not in p.stdout
    p = evaluate(str(run_dir), "--out", str(second), "--overwrite")
    assert p.returncode == 0 and json.loads(second.read_text())["unlabelled"] == 2


def test_evaluate_refuses_negative_counts_and_scoring_nothing(run_dir, tmp_path):
    p = evaluate(str(run_dir), "--max-videos", "-1")
    assert p.returncode == 2 and "expected a number of videos >= 0" in p.stderr
    assert not (run_dir / "eval").exists()
    unlabelled = tmp_path / "unlabelled"
    write_split(unlabelled, [-1, -1])
    p = evaluate(str(run_dir), f"data.index={unlabelled}")
    assert p.returncode == 2, p.stdout
    assert "no labelled video was evaluated, so there is no accuracy" in p.stderr and "top-1" not in p.stdout
    report = json.loads((run_dir / "eval" / "test-val.json").read_text())  # the predictions are kept
    assert report["top1"] is None and report["unlabelled"] == 2 and len(report["predictions"]) == 2


def test_videos_that_cannot_be_read_are_counted_and_too_many_fail_the_evaluation(run_dir, tmp_path):
    damaged = tmp_path / "damaged"
    index = write_split(damaged, [0, 1, 2, 3, 0, 1], broken=(2,))
    report = run_test(tiny(), index, damaged)
    assert report["videos"] == 5 and report["skipped"] == 1 and report["skipped_by_reason"] == {"undecodable": 1}
    assert report["skipped_by_shard"] == {str(damaged / "shards/val/000000.tar"): {"undecodable": 1}}
    assert "v0002" not in {r["key"] for r in report["predictions"]}
    p = evaluate(str(run_dir), f"data.index={damaged}")  # 1 of 6 > data.max_skip_fraction (0.01)
    assert p.returncode == 2 and "1 of 6 videos could not be read" in p.stderr and "max_skip_fraction" in p.stderr
    p = evaluate(str(run_dir), f"data.index={damaged}", "data.max_skip_fraction=0.5")
    assert p.returncode == 0, p.stderr
    assert "5 labelled videos" in p.stdout and "1 videos skipped, not scored" in p.stdout

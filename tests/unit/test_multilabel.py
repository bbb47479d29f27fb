"""Multi-label datasets (several labels per video, as Charades): the manifest forms, the dataset index and the
shards, the loader's multi-hot labels, the loss the engines choose, mAP in validation and the test protocol, the
launch check of model.multi_label, the Hugging Face problem type, and compare's separate tables.

Datasets here are real encoded synthetic clips in real shards (colour videos show one colour, order videos two:
a label set a frame can tell)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError, load_recipe
from pipeline.data.datasets import read_manifest_files
from pipeline.data.loader import ClipConfig, FaultTally, check_meta, make_loader
from pipeline.data.shards import (
    DatasetIndex,
    ShardError,
    ShardSample,
    commit_index,
    load_index,
    put_shard,
    settle_multi_label,
    shard_url,
)
from pipeline.data.storage import open_storage
from pipeline.data.synthetic import COLOUR_CLASSES, SyntheticSpec, make_video
from pipeline.train import evaluate
from pipeline.train.evaluate import (
    EvaluationError,
    accuracy_metrics,
    average_precision,
    describe,
    headline,
    mean_average_precision,
    validate,
)

SPEC = SyntheticSpec(size=32, num_frames=16, fps=16.0, square=12)
CLIP = ClipConfig(num_frames=2, sampling_rate=8, crop=32, scale=(32, 40), flip=False)
CLASSES = list(COLOUR_CLASSES)  # red, green, blue, yellow
# (kind, synthetic label, the video's label set): a colour video shows one colour, an order video two
VIDEOS = [("colour", "red", ["red"]), ("order", "red_then_blue", ["red", "blue"]), ("colour", "green", ["green"]),
          ("order", "yellow_then_green", ["yellow", "green"]), ("colour", "blue", ["blue"]),
          ("order", "blue_then_red", ["blue", "red"])]


# -- average precision ------------------------------------------------------------------------------------


def test_average_precision_by_hand():
    # ranks 1..4, positives at 1 and 3: (1/1 + 2/3) / 2
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])) == pytest.approx(5 / 6)
    assert average_precision(np.array([0.1, 0.9, 0.5]), np.array([0, 1, 1])) == pytest.approx(1.0)  # perfect
    assert average_precision(np.array([0.9, 0.1]), np.array([0, 1])) == pytest.approx(0.5)  # positive ranked 2nd
    # a tie is one threshold: at 0.5 one of two is positive (precision 1/2, recall 1/2), at 0.2 two of three
    # (precision 2/3, recall 1): 1/2 * 1/2 + 1/2 * 2/3; the tie's order in the input changes nothing
    for order in ([0.5, 0.5, 0.2], [0.5, 0.5, 0.2][::-1]):
        positives = [1, 0, 1] if order[0] == 0.5 else [1, 0, 1][::-1]
        assert average_precision(np.array(order), np.array(positives)) == pytest.approx(0.25 + 1 / 3)
    assert average_precision(np.array([0.3, 0.2]), np.array([0, 0])) is None  # no positive: no AP


def test_map_is_the_mean_over_classes_with_a_positive_in_percent():
    scores = np.array([[0.9, 0.1, 0.3], [0.2, 0.8, 0.4], [0.7, 0.3, 0.2]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [0, 1, 0]])  # class 2 has no positive: left out
    mean_ap, per_class = mean_average_precision(scores, targets)
    # class 0: its one positive ranked first (AP 1); class 1: positives ranked 1st and 2nd (AP 1)
    assert per_class == {0: pytest.approx(100.0), 1: pytest.approx(100.0)} and mean_ap == pytest.approx(100.0)
    targets[0, 1] = 1  # class 1 now: positives at ranks 1, 2, 3 -> still 1; swap a score to lose precision
    scores[2, 0] = 0.95  # class 0: the negative video 2 now ranks above the positive: AP 1/2
    mean_ap, per_class = mean_average_precision(scores, targets)
    assert per_class[0] == pytest.approx(50.0) and mean_ap == pytest.approx(75.0)
    assert mean_average_precision(scores, np.zeros_like(targets)) == (None, {})


def test_average_precision_agrees_with_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for trial in range(30):
        n = int(rng.integers(2, 60))
        positive = rng.random(n) < rng.uniform(0.05, 0.7)
        if not positive.any():
            positive[0] = True
        scores = rng.random(n)
        if trial % 3 == 0:  # ties, as rounded sigmoid scores give
            scores = np.round(scores, 1)
        assert average_precision(scores, positive) == pytest.approx(
            metrics.average_precision_score(positive, scores), abs=1e-12)
    targets = rng.random((40, 6)) < 0.3
    targets[:, 5] = False  # a class without a positive: scikit-learn's macro average would count it as 0
    scores = rng.random((40, 6))
    expected = np.mean([metrics.average_precision_score(targets[:, c], scores[:, c]) for c in range(5)])
    assert mean_average_precision(scores, targets)[0] == pytest.approx(100 * expected)


# -- manifests -------------------------------------------------------------------------------------------


def test_label_lists_in_json_lines_and_bars_in_csv_make_a_multi_label_manifest(tmp_path):
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in (
        {"path": "a.mp4", "label": ["running", "jumping"]},
        {"path": "b.mp4", "labels": ["sitting"]},
        {"path": "c.mp4", "label": []},  # labelled: none of the classes happens
        {"path": "d.mp4", "label": "jumping"},  # one name: a set of one in a multi-label dataset
        {"path": "e.mp4"},  # no label in a labelled split: no positive class either
        {"path": "t.mp4", "split": "test"})))  # the test split has no labels at all: unlabelled
    csv_file = tmp_path / "more.csv"
    csv_file.write_text("path,label\nf.mp4,sitting | running\ng.mp4,jumping\n")
    m = read_manifest_files([jsonl, csv_file], "mine")
    assert m.multi_label and m.classes == ["jumping", "running", "sitting"]
    by_id = {e.video_id: e for e in m.entries}
    assert by_id["a"].label == (0, 1) and by_id["a"].label_name == ("jumping", "running")
    assert by_id["b"].label == (2,) and by_id["c"].label == () and by_id["d"].label == (0,)
    assert by_id["e"].label == () and by_id["t"].label == -1 and by_id["t"].label_name == ""
    assert by_id["f"].label == (1, 2) and by_id["g"].label == (0,)


def test_a_single_label_manifest_is_read_as_before_and_the_option_makes_it_multi_label(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("path,label\na.mp4,cat\nb.mp4,dog\nc.mp4,\n")
    m = read_manifest_files([path], "pets")
    assert not m.multi_label and [(e.label, e.label_name) for e in m.entries] == [(0, "cat"), (1, "dog"), (-1, "")]
    # the entry's fields are exactly the ones hashed into shard names before: unchanged single-label shards
    from dataclasses import asdict
    assert set(asdict(m.entries[0])) == {"video_id", "filenames", "label", "label_name", "split", "start", "end"}
    forced = read_manifest_files([path], "pets", multi_label=True)  # ingest config multi_label: true
    assert forced.multi_label and [e.label for e in forced.entries] == [(0,), (1,), ()]


@pytest.mark.parametrize("name, text, problem", [
    ("m.csv", "path,label\na.mp4,run;jump\n", ":2: label='run;jump': separate the labels of one video with '|'"),
    ("m.csv", "path,label\na.mp4,run|jump\nb.mp4,\"sit,stand\"\n", ":3: label 'sit,stand': in a multi-label dataset"),
    ("m.csv", "path,label\na.mp4,run||jump\n", ":2: label='run||jump': an empty label between '|'"),
    ("m.csv", "path,label\na.mp4,run|run\n", "label(s) ['run'] given twice"),
    ("m.jsonl", '{"path": "a.mp4", "label": "x", "labels": ["y"]}', ":1: both 'label' and 'labels' are given"),
    ("m.jsonl", '{"path": "a.mp4", "label": ["x", {"y": 1}]}', ":1: label=['x', {'y': 1}]: expected a list of class"),
    ("m.jsonl", '{"path": "a.mp4", "label": ["x", ""]}', "expected a list of class names (non-empty strings)"),
])
def test_a_label_set_that_cannot_be_read_is_named(tmp_path, name, text, problem):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError) as e:
        read_manifest_files([path], "mine")
    assert problem in str(e.value) and str(path) in str(e.value)


def test_a_comma_in_a_single_label_class_name_is_still_a_name(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('path,label\na.mp4,"Putting something, somewhere"\n')
    assert read_manifest_files([path], "x").classes == ["Putting something, somewhere"]


# -- the index -------------------------------------------------------------------------------------------


def test_the_index_says_multi_label_and_a_single_label_index_is_written_as_before(tmp_path):
    multi = DatasetIndex("d", 1, ["a", "b"], {}, [], multi_label=True)
    again = DatasetIndex.from_json(multi.to_json())
    assert again.multi_label and json.loads(multi.to_json())["multi_label"] is True
    single = DatasetIndex("d", 1, ["a", "b"], {}, [], created=1.0)
    assert "multi_label" not in json.loads(single.to_json())  # the same JSON as before: older readers load it
    assert DatasetIndex.from_json(single.to_json()).multi_label is False  # and an old index reads single-label
    with pytest.raises(ShardError, match=r"multi_label='yes': expected true or false"):
        DatasetIndex.from_json(json.dumps({**json.loads(multi.to_json()), "multi_label": "yes"}))


def test_model_multi_label_follows_the_dataset_and_a_contradiction_is_refused_with_the_fix():
    multi, single = DatasetIndex("charades", 2, ["a"], {}, [], multi_label=True), DatasetIndex("k", 1, ["a"], {}, [])
    assert settle_multi_label(None, multi) is True and settle_multi_label(None, single) is False
    assert settle_multi_label(True, multi) is True
    with pytest.raises(ValueError, match=r"model.multi_label=false but dataset charades v2 has several labels per "
                                         r"video \(multi-label\): set model.multi_label=true, or leave it out"):
        settle_multi_label(False, multi)
    with pytest.raises(ValueError, match=r"has one label per video: set model.multi_label=false"):
        settle_multi_label(True, single)


def test_no_shard_of_the_last_version_is_kept_when_its_label_indices_would_mean_other_classes():
    from pipeline.data.datasets import ManifestEntry
    from pipeline.data.shards import ShardInfo
    from pipeline.ingest.plan import Source, make_plan

    sources = [Source(ManifestEntry("a", ("a.mp4",), 0, "cat", "train"), "a.mp4", "sha-a")]
    shard = ShardInfo(make_plan(sources, {}, 4).build[0].url, "train", 1, 10, "0" * 64, ["a"])
    last = DatasetIndex("d", 1, ["cat"], {}, [shard], source_checksums={"a": "sha-a"})
    assert make_plan(sources, {}, 4, last, labels=(["cat"], False)).keep == [shard]  # nothing changed: kept
    # a new class sorted before "cat" shifts its index; single- against multi-label changes the label's form
    assert make_plan(sources, {}, 4, last, labels=(["aardvark", "cat"], False)).keep == []
    assert make_plan(sources, {}, 4, last, labels=(["cat"], True)).keep == []


def test_the_ingest_option_is_for_manifests():
    from pipeline.ingest.run import IngestConfig

    base = ["dataset=x", "source=/videos", "output=/out"]
    assert IngestConfig.load(None, [*base, "format=manifest", "annotations=m.csv", "multi_label=true"]).multi_label
    with pytest.raises(ConfigError, match=r"multi_label=True: expected false for format folder"):
        IngestConfig.load(None, [*base, "format=folder", "multi_label=true"])


# -- a real multi-label dataset ----------------------------------------------------------------------------


def write_multilabel(root, videos=VIDEOS, splits=("train", "val"), labels=None) -> DatasetIndex:
    """A committed multi-label dataset: each split holds ``videos`` (one shard per split); ``labels`` replaces
    the label written for some keys (broken samples)."""
    storage = open_storage(str(root))
    shards = []
    for split in splits:
        samples = []
        for i, (kind, name, label_set) in enumerate(videos):
            key = f"{split}{i:03d}"
            label = sorted(CLASSES.index(c) for c in label_set)
            meta = {"label": (labels or {}).get(key, label), "label_name": sorted(label_set), "dataset": "ml",
                    "split": split, "source": "synthetic", "duration": SPEC.num_frames / SPEC.fps, "fps": SPEC.fps,
                    "num_frames": SPEC.num_frames, "source_sha256": "-"}
            samples.append(ShardSample(key, make_video(kind, name, i, SPEC), meta))
        shards.append(put_shard(storage, shard_url(split, 0), split, samples))
    index = DatasetIndex("ml", 1, CLASSES, {}, shards, multi_label=True)
    commit_index(storage, index)
    return index


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ml")
    write_multilabel(root)
    return load_index(str(root))


def expected_multi_hot(videos=VIDEOS) -> torch.Tensor:
    out = torch.zeros(len(videos), len(CLASSES))
    for i, (_, _, label_set) in enumerate(videos):
        for c in label_set:
            out[i, CLASSES.index(c)] = 1.0
    return out


def test_the_loader_gives_multi_hot_labels_in_training_and_evaluation(dataset):
    index, storage = dataset
    assert index.multi_label
    batches = list(make_loader(index, storage, "val", train=False, batch_size=4, num_workers=0, clip=CLIP))
    labels = torch.cat([b["label"] for b in batches if "label" in b])
    keys = [k for b in batches if "key" in b for k in b["key"]]
    assert labels.dtype == torch.float32 and labels.shape == (len(VIDEOS), len(CLASSES))
    assert torch.equal(labels[np.argsort(keys)], expected_multi_hot())
    train = make_loader(index, storage, "train", train=True, batch_size=3, num_workers=0, clip=CLIP, endless=True)
    batch = next(iter(train))
    assert batch["label"].shape == (3, len(CLASSES)) and set(batch["label"].unique().tolist()) <= {0.0, 1.0}
    assert (batch["label"].sum(1) >= 1).all()  # every video here has a class


def test_broken_label_sets_are_skipped_and_counted(tmp_path):
    index = write_multilabel(tmp_path, splits=("train",), labels={
        "train000": 0,  # a bare class index (a single-label shard) in a multi-label dataset
        "train001": [0, 9],  # a class the dataset does not have
        "train002": [1, 1],  # a class twice
        "train003": -1})  # unlabelled: evaluation only
    storage = open_storage(str(tmp_path))
    tally = FaultTally()
    batches = list(make_loader(index, storage, "train", train=False, batch_size=8, num_workers=0, clip=CLIP))
    for b in batches:
        tally.add(b["faults"])
    assert tally.by_reason == {"bad_label": 3}  # -1 passes in evaluation: an unlabelled video
    labels = torch.cat([b["label"] for b in batches if "label" in b])
    assert labels.shape == (3, 4) and (labels == -1).all(1).sum() == 1  # the unlabelled row is all -1
    assert check_meta(json.dumps({"label": -1, "duration": 1.0}).encode(), 4, train=True, multi_label=True)[1][0] \
        == "bad_label"  # nothing unlabelled to train on
    assert check_meta(json.dumps({"label": [2], "duration": 1.0}).encode(), 4, train=True)[1][0] == "bad_label"


# -- the loss ----------------------------------------------------------------------------------------------


def tiny_cfg(*overrides: str):
    return load_recipe("smoke", ["train.engine=torch", "train.zero_stage=0", "model.multi_label=true", *overrides])


def test_the_engine_trains_a_multi_label_model_with_binary_cross_entropy():
    from pipeline.config import batch_plan
    from pipeline.train.engine import TorchEngine, classification_loss
    from pipeline.train.main import build_model

    cfg = tiny_cfg()
    model = build_model(cfg)
    assert model.cfg.multi_label
    engine = TorchEngine(model, cfg, batch_plan(cfg, 1), per_epoch=1, device=torch.device("cpu"))
    assert engine.multi_label
    video = torch.randn(4, 3, 4, 32, 32)
    target = expected_multi_hot()[:4]
    with torch.no_grad():
        expected = F.binary_cross_entropy_with_logits(model(video), target)
    assert float(engine.train_micro_batch(video, target)) == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ValueError, match=r"multi-hot labels of shape \(4, 4\).*got \(4,\)"):
        engine.train_micro_batch(video, torch.tensor([0, 1, 2, 3]))
    # single-label: cross-entropy as before; mixed precision: the loss is float32 either way
    logits = torch.randn(4, 4, dtype=torch.bfloat16)
    assert classification_loss(logits, torch.tensor([0, 1, 2, 3]), False).dtype == torch.float32
    assert float(classification_loss(logits, torch.tensor([0, 1, 2, 3]), False)) == pytest.approx(
        float(F.cross_entropy(logits.float(), torch.tensor([0, 1, 2, 3]))))
    assert classification_loss(logits, target, True).dtype == torch.float32


# -- validation and the test protocol --------------------------------------------------------------------


class Oracle(torch.nn.Module):
    """A 'model' scoring each video by the colours it shows (mean colour of the square's channels): enough to
    check the metric's plumbing with a known ranking."""

    def __init__(self, multi_label: bool = True) -> None:
        super().__init__()
        from pipeline.models.config import TimeSformerConfig

        self.cfg = TimeSformerConfig(num_classes=4, num_frames=2, img_size=32, patch_size=8, embed_dim=8, depth=1,
                                     num_heads=1, multi_label=multi_label)
        self.fixed = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        rgb = x.float().mean(dim=(2, 3, 4))  # (B, 3)
        red, green, blue = rgb[:, 0], rgb[:, 1], rgb[:, 2]
        return torch.stack([red - green, green - red, blue - red, red + green - 2 * blue], dim=1) * 10


def test_validation_and_the_test_protocol_report_map(dataset):
    index, storage = dataset
    loader = make_loader(index, storage, "val", train=False, batch_size=4, num_workers=0, clip=CLIP)
    metrics = validate(Oracle(), torch.float32, loader, torch.device("cpu"))
    assert set(metrics) == {"val_loss", "val_map", "val_clips"} and metrics["val_clips"] == len(VIDEOS)
    assert 0 < metrics["val_map"] <= 100
    report = evaluate.test_protocol(Oracle(), torch.float32, index, storage, split="val", clip=CLIP,
                                    protocol="multi_view", temporal_clips=2, spatial_crops=1, batch_size=4,
                                    device=torch.device("cpu"), num_workers=0)
    assert report["metric"] == "map" and report["videos"] == len(VIDEOS) and report["confusion"] is None
    assert report["top1"] is None and headline(report) == ("map", report["map"])
    assert accuracy_metrics(report) == {"test_map": report["map"]}
    # the report's mAP is the AP of the rows' own (view-averaged sigmoid) scores, over the classes with a positive
    rows = sorted(report["predictions"], key=lambda r: r["key"])
    targets = expected_multi_hot()
    assert [r["label"] for r in rows] == [sorted(CLASSES.index(c) for c in v[2]) for v in VIDEOS]
    assert report["map"] == pytest.approx(mean_average_precision(np.array([r["scores"] for r in rows]),
                                                                 targets.numpy())[0])
    assert report["classes_scored"] == 4 and set(report["per_class_ap"]) == {0, 1, 2, 3}
    assert all(0.0 <= s <= 1.0 for r in rows for s in r["scores"])  # sigmoid scores, not a softmax
    assert "mAP" in describe(report)


def test_a_model_of_the_other_kind_is_refused_before_the_pass(dataset):
    index, storage = dataset
    with pytest.raises(EvaluationError, match="the model is single-label and dataset ml v1 is multi-label"):
        evaluate.test_protocol(Oracle(multi_label=False), torch.float32, index, storage, split="val", clip=CLIP,
                      protocol="multi_view", temporal_clips=1, spatial_crops=1, batch_size=4,
                      device=torch.device("cpu"), num_workers=0)
    loader = make_loader(index, storage, "val", train=False, batch_size=4, num_workers=0, clip=CLIP)
    with pytest.raises(ShardError, match="its label is a label set .* and the model is single-label"):
        validate(Oracle(multi_label=False), torch.float32, loader, torch.device("cpu"))


# -- launch ------------------------------------------------------------------------------------------------


def test_launch_sets_model_multi_label_from_the_index_and_refuses_a_contradiction(dataset, tmp_path):
    from pipeline.train.launch import check_data

    root = str(dataset[1].uri(""))
    cfg = load_recipe("smoke", [f"data.index={root}", "data.test_split=val"])
    assert cfg.model.multi_label is None  # null: the dataset's
    check_data(cfg)
    assert cfg.model.multi_label is True and cfg.data.version == 1
    cfg = load_recipe("smoke", [f"data.index={root}", "model.multi_label=false"])
    with pytest.raises(ConfigError, match=r"model.multi_label=false but dataset ml v1 has several labels"):
        check_data(cfg)
    from tests.synthetic_data import write_dataset

    write_dataset(str(tmp_path / "single"), "colour", per_class={"train": 1, "val": 1})
    cfg = load_recipe("smoke", [f"data.index={tmp_path / 'single'}", "model.multi_label=true"])
    with pytest.raises(ConfigError, match="has one label per video: set model.multi_label=false"):
        check_data(cfg)


# -- the exported model and compare ------------------------------------------------------------------------


def test_the_hugging_face_config_says_multi_label_classification():
    from pipeline.models.convert import config_from_hf, hf_config_dict
    from pipeline.models.registry import variant_config

    cfg = variant_config("timesformer_tiny", multi_label=True)
    hf = hf_config_dict(cfg)
    assert hf["problem_type"] == "multi_label_classification" and config_from_hf(hf).multi_label
    assert "problem_type" not in hf_config_dict(variant_config("timesformer_tiny"))
    assert not config_from_hf(hf_config_dict(variant_config("timesformer_tiny"))).multi_label
    from transformers import TimesformerConfig

    assert TimesformerConfig(**hf).problem_type == "multi_label_classification"


def test_compare_names_each_runs_metric_and_never_puts_top1_and_map_in_one_column():
    from pipeline.tracking.compare import RunSummary, table_csv, table_markdown, table_text

    def run(name, top1=None, map_=None, metric="top1"):
        return RunSummary(name, name, "tiny", "divided", "4 x 8", "32", 0.1, "1e-05 x 6", 0.1, "gpu", top1,
                          None if top1 is None else 90.0, 10.0, None, "FINISHED", metric=metric, map=map_)

    maps = [run("ml-a", map_=41.25, metric="map"), run("ml-b", map_=38.5, metric="map")]
    text = table_text(maps)
    header = text.splitlines()[0].split()
    assert "mAP" in header and "top-1" not in header and "top-5" not in header
    assert "41.25" in text and "38.50" in text
    mixed = table_text([run("k400", top1=77.7), *maps])
    assert "top-1 (single-label models):" in mixed and "mAP (multi-label models):" in mixed
    sections = mixed.split("mAP (multi-label models):")
    assert "77.70" in sections[0] and "41.25" not in sections[0] and "41.25" in sections[1]
    assert "do not compare" in mixed.splitlines()[-1]
    assert "do not compare" in table_markdown([run("k400", top1=77.7), *maps])
    rows = table_csv([run("k400", top1=77.7), *maps]).splitlines()
    assert rows[0].startswith("run_id,run,dataset") and rows[0].endswith("metric,map,gpu_hours_unit,budget")
    assert ",map,41.25," in rows[1 + 1]

"""Your own videos: a manifest (CSV or JSON Lines) or class folders become a dataset version like the benchmark
formats do: class names kept in the index, splits from the rows or the folders, incremental reruns, and a
manifest or layout that does not say what it needs refused with the file, the line and the field.

Shards are built in this process (run_ingest with Ray replaced by a serial loop over the same build_shard); the
videos are real H.264 files encoded here."""

from __future__ import annotations

import json

import pytest

from pipeline.config import ConfigError
from pipeline.data.datasets import read_folder, read_manifest_files
from pipeline.data.shards import load_index
from pipeline.data.video import encode_video
from pipeline.ingest import run as ingest_run
from pipeline.ingest.run import IngestConfig, run_ingest
from pipeline.ingest.worker import build_shard

from .test_video import numbered_frames


@pytest.fixture
def serial(monkeypatch):
    def build_all(plan, cfg, ray_address, progress):
        return [build_shard(p, cfg.output, cfg.dataset, cfg.transcode, cfg.decode_limits()) for p in plan.build]

    monkeypatch.setattr(ingest_run, "_build_all", build_all)


def video(n: int = 10) -> bytes:
    return encode_video(numbered_frames(n, 32, 48), fps=10)  # n / 10 seconds


def ingest_config(root, fmt: str, *extra: str) -> IngestConfig:
    return IngestConfig.load(None, ["dataset=mine", f"format={fmt}", f"source={root / 'videos'}",
                                    f"output={root / 'out'}", "samples_per_shard=4", "transcode.short_side=32",
                                    "transcode.fps=10", "transcode.keyframe_interval=4", "transcode.min_frames=1",
                                    *extra])


def test_a_manifest_in_csv_or_json_lines_gives_classes_splits_and_clips(tmp_path):
    csv_file = tmp_path / "m.csv"
    csv_file.write_text("path,label,split,start,end\n"
                        "walk/a.mp4,walking,train,,\n"
                        "run/b.mp4,running,val,1,3.5\n"
                        "c.mp4,,test,,\n")
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text(json.dumps({"path": "walk/d.mp4", "label": "walking"}) + "\n\n"
                     + json.dumps({"path": "run/b.mp4", "label": "running", "start": 4, "end": 6, "split": "val"}))
    m = read_manifest_files([csv_file, jsonl], "mine", default_split="train")
    assert m.classes == ["running", "walking"]  # sorted label names
    by_id = {e.video_id: e for e in m.entries}
    assert set(by_id) == {"walk_a", "run_b_000001_000003", "c", "walk_d", "run_b_000004_000006"}
    b = by_id["run_b_000001_000003"]
    assert (b.label, b.split, b.start, b.end, b.filenames) == (0, "val", 1.0, 3.5, ("run/b.mp4",))
    assert by_id["c"].label == -1 and by_id["c"].split == "test"  # unlabelled
    assert by_id["walk_d"].split == "train" and by_id["walk_d"].label_name == "walking"  # the default split


@pytest.mark.parametrize("text, problem", [
    ("file,label\na.mp4,x\n", "missing column(s) ['path']"),
    ("path,label,start\na.mp4,x,soon\n", ":2: start='soon': expected seconds"),
    ("path,label,start,end\na.mp4,x,5,2\n", ":2: start=5 end=2: expected 0 <= start < end"),
    ("path,label,colour\na.mp4,x,red\n", ":2: unknown field(s) ['colour']"),
    ("path,label\na.mp4,x\na.mp4,y\n", ":3: id 'a' is used twice (first at"),
    ("path,label\n../escape.mp4,x\n", ":2: path='../escape.mp4': expected the video's path relative"),
    ("path,label\na.mp4,x,extra\n", ":2: more values than the header has columns"),
])
def test_a_manifest_row_that_does_not_say_what_it_needs_is_named(tmp_path, text, problem):
    path = tmp_path / "m.csv"
    path.write_text(text)
    with pytest.raises(ValueError) as e:
        read_manifest_files([path], "mine")
    assert problem in str(e.value) and str(path) in str(e.value)


def test_class_folders_with_or_without_split_folders(tmp_path):
    flat = read_folder(["dog/1.mp4", "cat/2.webm", "cat/notes.txt", "dog/3.MOV"], "pets")
    assert flat.classes == ["cat", "dog"] and {e.split for e in flat.entries} == {"train"}
    assert sorted((e.video_id, e.label) for e in flat.entries) == [("cat_2", 0), ("dog_1", 1), ("dog_3", 1)]
    split = read_folder(["train/dog/1.mp4", "val/cat/2.mp4", "train/cat/3.mp4"], "pets")
    assert split.classes == ["cat", "dog"]
    assert sorted((e.split, e.label_name) for e in split.entries) == [("train", "cat"), ("train", "dog"),
                                                                     ("val", "cat")]
    with pytest.raises(ValueError, match="does not fit the layout"):
        read_folder(["dog/1.mp4", "train/cat/2.mp4"], "pets")
    with pytest.raises(ValueError, match="no video files"):
        read_folder(["readme.txt"], "pets")
    with pytest.raises(ValueError, match="make the same sample id"):
        read_folder(["dog/a.mp4", "dog/a.webm"], "pets")


def test_a_folder_dataset_is_ingested_with_its_class_names_and_reruns_incrementally(tmp_path, serial):
    for rel in ("train/cat/c1.mp4", "train/cat/c2.mp4", "train/dog/d1.mp4", "val/cat/c3.mp4", "val/dog/d2.mp4"):
        (tmp_path / "videos" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "videos" / rel).write_bytes(video())
    (tmp_path / "videos" / "README.txt").write_text("not a video")
    cfg = ingest_config(tmp_path, "folder")  # no annotation file: the folders are the labels
    first = run_ingest(cfg, progress=False)
    index, _ = load_index(str(tmp_path / "out"))
    assert first.version == 1 and index.classes == ["cat", "dog"] and not first.quarantine
    assert (index.num_samples("train"), index.num_samples("val")) == (3, 2)
    assert run_ingest(cfg, progress=False).version is None  # nothing new: nothing committed
    (tmp_path / "videos" / "train" / "dog" / "d3.mp4").write_bytes(video(12))
    third = run_ingest(cfg, progress=False)
    assert third.version == 2 and load_index(str(tmp_path / "out"))[0].num_samples("train") == 4


def test_a_manifest_dataset_finds_videos_in_subfolders_of_the_source(tmp_path, serial):
    (tmp_path / "videos" / "a").mkdir(parents=True)
    (tmp_path / "videos" / "a" / "x.mp4").write_bytes(video())
    (tmp_path / "videos" / "y.mp4").write_bytes(video())
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in (
        {"path": "a/x.mp4", "label": "left", "split": "train"}, {"path": "y.mp4", "label": "right", "split": "val"},
        {"path": "a/missing.mp4", "label": "left"})))
    result = run_ingest(ingest_config(tmp_path, "manifest", f"annotations={manifest}"), progress=False)
    index, _ = load_index(str(tmp_path / "out"))
    assert index.classes == ["left", "right"] and (index.num_samples("train"), index.num_samples("val")) == (1, 1)
    assert set(result.quarantine) == {"a_missing"}  # not in the source: quarantined, retried by the next run
    assert "not found" in result.quarantine["a_missing"]["reason"]


def test_the_folder_format_needs_no_annotations_and_the_others_still_do(tmp_path):
    assert ingest_config(tmp_path, "folder").annotations == []
    with pytest.raises(ConfigError, match="missing required key"):
        ingest_config(tmp_path, "manifest")


def test_a_manifest_path_never_falls_back_to_another_folders_file_of_that_name(tmp_path, serial):
    """cats/a.mp4 is missing; a.mp4 and dogs/a.mp4 exist: the row is quarantined, never ingested as the dog."""
    (tmp_path / "videos" / "dogs").mkdir(parents=True)
    (tmp_path / "videos" / "a.mp4").write_bytes(video())
    (tmp_path / "videos" / "dogs" / "a.mp4").write_bytes(video())
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\ncats/a.mp4,cat\ndogs/a.mp4,dog\n")
    result = run_ingest(ingest_config(tmp_path, "manifest", f"annotations={manifest}"), progress=False)
    assert set(result.quarantine) == {"cats_a"} and load_index(str(tmp_path / "out"))[0].num_samples("train") == 1
    # a file list as the source: a manifest path matches the listed file that ends with it, and only that one
    listed = tmp_path / "list.txt"
    listed.write_text(f"{tmp_path / 'videos' / 'dogs' / 'a.mp4'}\n{tmp_path / 'videos' / 'a.mp4'}\n")
    names, _, _ = ingest_run._source_index(str(listed))
    assert names["dogs/a.mp4"] == str(tmp_path / "videos" / "dogs" / "a.mp4") and "cats/a.mp4" not in names

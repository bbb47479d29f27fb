"""Annotation readers: Kinetics-400/600, Something-Something-v2, Diving-48 and HowTo100M into one
video manifest (id, expected file name, label, split, start/end) that ingestion consumes.

Formats read (as the datasets publish them):

* Kinetics: CSV ``label,youtube_id,time_start,time_end,split`` (extra columns such as ``is_cc``
  ignored; the test CSV may lack ``label``). Clips are named ``<id>_<start:06d>_<end:06d>.mp4`` by the
  common downloaders; the manifest also accepts ``<id>.mp4``.
* Something-Something-v2: ``something-something-v2-{train,validation}.json`` (``id``, ``template`` ...)
  and ``something-something-v2-labels.json`` (template without brackets -> class index); ``<id>.webm``.
* Diving-48: ``Diving48_V2_{train,test}.json`` (``vid_name``, ``label``, ``start_frame``, ``end_frame``)
  and optionally ``Diving48_vocab.json`` for class names; ``<vid_name>.mp4``.
* HowTo100M: ``HowTo100M_v1.csv`` (``video_id,category_1,category_2,rank,task_id``), ``task_ids.csv``
  (tab-separated ``task_id<TAB>task name``) and an optional ``video_id,split`` CSV; ``<video_id>.mp4``.

A file that does not have what its format needs raises ``ValueError`` naming the file and the field.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ManifestEntry:
    video_id: str  # stable id from the source dataset: the shard sample key
    filenames: tuple[str, ...]  # file names the source video may have, most specific first
    label: int  # class index, -1 when the split is unlabelled
    label_name: str
    split: str
    start: float | None = None  # seconds; None = from the beginning
    end: float | None = None  # seconds; None = to the end


@dataclass
class Manifest:
    dataset: str
    classes: list[str]
    entries: list[ManifestEntry] = field(default_factory=list)

    def split(self, name: str) -> list[ManifestEntry]:
        return [e for e in self.entries if e.split == name]


def _require(row_keys: Iterable[str], needed: Iterable[str], where: str) -> None:
    missing = [k for k in needed if k not in set(row_keys)]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}; found {sorted(row_keys)}")


def _safe_key(video_id: str) -> str:
    """Sample keys may not contain '.' or '/' (WebDataset splits names at the first dot)."""
    return video_id.replace(".", "_").replace("/", "_")


def read_kinetics(csv_paths: Iterable[str | Path], dataset: str = "kinetics400",
                  classes: list[str] | None = None) -> Manifest:
    rows = []
    for path in csv_paths:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            _require(reader.fieldnames or [], ("youtube_id", "time_start", "time_end", "split"), str(path))
            for i, row in enumerate(reader, start=2):
                try:
                    start, end = int(float(row["time_start"])), int(float(row["time_end"]))
                except ValueError as e:
                    raise ValueError(f"{path}:{i}: time_start/time_end must be numbers ({e})") from None
                rows.append((row.get("label", "") or "", row["youtube_id"], start, end, row["split"]))
    names = classes or sorted({r[0] for r in rows if r[0]})
    index = {n: i for i, n in enumerate(names)}
    manifest = Manifest(dataset, names)
    for label, yid, start, end, split in rows:
        if label and label not in index:
            raise ValueError(f"class {label!r} of video {yid} is not in the given class list")
        vid = f"{yid}_{start:06d}_{end:06d}"
        manifest.entries.append(ManifestEntry(_safe_key(vid), (f"{vid}.mp4", f"{yid}.mp4"),
                                              index.get(label, -1), label, split, float(start), float(end)))
    return manifest


def read_ssv2(annotation_json: str | Path, labels_json: str | Path, split: str) -> Manifest:
    with open(labels_json) as f:
        label_map = json.load(f)
    if not isinstance(label_map, dict):
        raise ValueError(f"{labels_json}: expected an object of template -> class index")
    names = [n for n, _ in sorted(label_map.items(), key=lambda kv: int(kv[1]))]
    with open(annotation_json) as f:
        items = json.load(f)
    manifest = Manifest("ssv2", names)
    for i, item in enumerate(items):
        if "id" not in item:
            raise ValueError(f"{annotation_json}: entry {i} has no 'id'")
        template = item.get("template")
        if template is None:
            label, name = -1, ""
        else:
            name = template.replace("[", "").replace("]", "")
            if name not in label_map:
                raise ValueError(f"{annotation_json}: entry {item['id']}: template {name!r} not in {labels_json}")
            label = int(label_map[name])
        manifest.entries.append(ManifestEntry(_safe_key(str(item["id"])), (f"{item['id']}.webm",), label, name, split))
    return manifest


def read_diving48(annotation_json: str | Path, split: str, vocab_json: str | Path | None = None,
                  fps: float = 30.0) -> Manifest:
    with open(annotation_json) as f:
        items = json.load(f)
    names: list[str] = []
    if vocab_json:
        with open(vocab_json) as f:
            names = ["_".join(parts) for parts in json.load(f)]
    labels = sorted({int(it["label"]) for it in items if "label" in it})
    if not names:
        names = [str(i) for i in range(max(labels, default=-1) + 1)]
    manifest = Manifest("diving48", names)
    for i, item in enumerate(items):
        for k in ("vid_name", "label"):
            if k not in item:
                raise ValueError(f"{annotation_json}: entry {i} has no {k!r}")
        label = int(item["label"])
        if not 0 <= label < len(names):
            raise ValueError(f"{annotation_json}: entry {item['vid_name']}: label {label} outside {len(names)} classes")
        start = item.get("start_frame")
        end = item.get("end_frame")
        manifest.entries.append(ManifestEntry(
            _safe_key(item["vid_name"]), (f"{item['vid_name']}.mp4",), label, names[label], split,
            start / fps if start is not None else None, end / fps if end is not None else None))
    return manifest


def read_howto100m(videos_csv: str | Path, task_ids: str | Path, splits_csv: str | Path | None = None) -> Manifest:
    tasks: dict[str, str] = {}
    with open(task_ids, newline="") as f:
        for i, row in enumerate(csv.reader(f, delimiter="\t"), start=1):
            if len(row) < 2:
                raise ValueError(f"{task_ids}:{i}: expected 'task_id<TAB>task name'")
            tasks[row[0].strip()] = row[1].strip()
    ids = sorted(tasks, key=lambda t: (len(t), t))
    index = {t: i for i, t in enumerate(ids)}
    split_of: dict[str, str] = {}
    if splits_csv:
        with open(splits_csv, newline="") as f:
            reader = csv.DictReader(f)
            _require(reader.fieldnames or [], ("video_id", "split"), str(splits_csv))
            split_of = {r["video_id"]: r["split"] for r in reader}
    manifest = Manifest("howto100m", [tasks[t] for t in ids])
    with open(videos_csv, newline="") as f:
        reader = csv.DictReader(f)
        _require(reader.fieldnames or [], ("video_id", "task_id"), str(videos_csv))
        for row in reader:
            task = row["task_id"].strip()
            if task not in index:
                raise ValueError(f"{videos_csv}: video {row['video_id']}: task {task} not in {task_ids}")
            if split_of and row["video_id"] not in split_of:
                continue  # not in the chosen split file
            manifest.entries.append(ManifestEntry(_safe_key(row["video_id"]), (f"{row['video_id']}.mp4",),
                                                  index[task], tasks[task], split_of.get(row["video_id"], "train")))
    return manifest

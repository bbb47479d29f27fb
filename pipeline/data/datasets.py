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

Your own videos (``read_manifest_files``, ``read_folder``):

* a manifest: CSV (``path,label[,start,end,split,id]``) or JSON Lines with the same fields; ``path``
  relative to the ingest source; several labels per video (a multi-label dataset) as a JSON list or
  ``labels`` field, or ``a|b`` in a CSV label cell;
* a folder layout: ``<class>/<video>`` or ``<split>/<class>/<video>`` under the ingest source.

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
    # class index, -1 when the split is unlabelled; in a multi-label dataset the sorted tuple of class indices
    # (empty: none of the classes happens in the video), or -1 when unlabelled
    label: int | tuple[int, ...]
    label_name: str | tuple[str, ...]  # the class name(s), as ``label``
    split: str
    start: float | None = None  # seconds; None = from the beginning
    end: float | None = None  # seconds; None = to the end


@dataclass
class Manifest:
    dataset: str
    classes: list[str]
    entries: list[ManifestEntry] = field(default_factory=list)
    multi_label: bool = False  # several labels per video: every labelled entry's label is a tuple

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


# -- your own dataset ---------------------------------------------------------------------------------

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg")
MANIFEST_FIELDS = ("path", "label", "labels", "start", "end", "split", "id")
LABEL_SEPARATOR = "|"  # between the labels of one video in a label string (a CSV cell): "jumping|running"


def _row_labels(row: dict, where: str, n: int) -> tuple[tuple[str, ...] | None, bool, bool]:
    """The class names a manifest row gives: (names or None when it gives none, whether it gave them as a
    label set (a JSON list, a ``labels`` field, or ``a|b``), whether they came from a label string)."""
    given = {k: row[k] for k in ("label", "labels") if row.get(k) not in (None, "")}
    if len(given) == 2:
        raise ValueError(f"{where}:{n}: both 'label' and 'labels' are given: give the video's labels in one of them")
    listed = "labels" in row  # a labels field or column says the dataset has label sets, even where it is empty
    if not given:
        return None, listed, False
    key, value = next(iter(given.items()))
    if isinstance(value, list):
        names = []
        for item in value:
            if isinstance(item, bool) or not isinstance(item, (str, int)) or not str(item).strip():
                raise ValueError(f"{where}:{n}: {key}={value!r}: expected a list of class names (non-empty strings)")
            names.append(str(item).strip())
        from_text = False
        listed = True
    else:
        text = str(value).strip()
        if ";" in text:
            raise ValueError(f"{where}:{n}: {key}={text!r}: separate the labels of one video with "
                             f"{LABEL_SEPARATOR!r} (a{LABEL_SEPARATOR}b; ';' is not a separator, nor allowed in a "
                             f"class name written as text)")
        names = [part.strip() for part in text.split(LABEL_SEPARATOR)]
        if "" in names:
            raise ValueError(f"{where}:{n}: {key}={text!r}: an empty label between {LABEL_SEPARATOR!r} separators")
        from_text = True
        listed = listed or len(names) > 1
    twice = sorted({x for x in names if names.count(x) > 1})
    if twice:
        raise ValueError(f"{where}:{n}: {key}={value!r}: label(s) {twice} given twice")
    return tuple(names), listed, from_text


def read_manifest_files(paths: Iterable[str | Path], dataset: str, default_split: str = "train",
                        multi_label: bool = False) -> Manifest:
    """Your own dataset as a manifest: CSV files (a header row) or JSON Lines (``.jsonl``, one object per line)
    with ``path`` (the video's path relative to the ingest source, or its file name), ``label`` (a class name;
    empty or absent: unlabelled), and optionally ``start`` and ``end`` (seconds), ``split`` (default: the ingest
    config's ``split``) and ``id`` (default: the path without its suffix, plus the clip's bounds when given).
    Classes are the label names, sorted. A row that does not say what it needs is an error naming the file,
    the line and the field; so is an id used twice.

    Several labels per video make a multi-label dataset (as does ``multi_label``, the ingest config's
    ``multi_label: true``): a JSON list (``"label": ["jumping", "running"]``, or a ``labels`` field), or in a
    label string the names separated by ``|`` (``jumping|running``; ``;`` is refused, and in a multi-label
    dataset so is ``,``: both are taken for a mistaken separator). Each entry's label is then the sorted tuple of
    its class indices. ``[]`` is a video where none of the classes happens; a row without a label is one too
    when other rows of its split have labels, and unlabelled (-1, predicted but not scored) when no row of its
    split has any (a test split without answers)."""
    rows: list[tuple[str, int, dict]] = []
    for path in paths:
        path = Path(path)
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            for n, line in enumerate(path.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{path}:{n}: not a JSON object ({e})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{n}: expected a JSON object with 'path' and 'label', got "
                                     f"{type(row).__name__}")
                rows.append((str(path), n, row))
        else:
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                _require(reader.fieldnames or [], ("path",), str(path))
                rows.extend((str(path), n, row) for n, row in enumerate(reader, start=2))
    entries: list[tuple[str, int, str, str, tuple[str, ...] | None, bool, float | None, float | None, str]] = []
    for where, n, row in rows:
        if None in row:  # csv.DictReader's key for the values past the header's columns
            raise ValueError(f"{where}:{n}: more values than the header has columns")
        unknown = sorted(set(row) - set(MANIFEST_FIELDS))
        if unknown:
            raise ValueError(f"{where}:{n}: unknown field(s) {unknown}; a manifest row has "
                             f"{', '.join(MANIFEST_FIELDS)}")
        rel = str(row.get("path") or "").strip()
        if not rel or rel.startswith("/") or ".." in Path(rel).parts:
            raise ValueError(f"{where}:{n}: path={rel!r}: expected the video's path relative to the ingest source")
        names, listed, from_text = _row_labels(row, where, n)
        multi_label = multi_label or listed
        bounds = []
        for key in ("start", "end"):
            value = row.get(key)
            if value in (None, ""):
                bounds.append(None)
                continue
            try:
                bounds.append(float(value))
            except (TypeError, ValueError):
                raise ValueError(f"{where}:{n}: {key}={value!r}: expected seconds") from None
        start, end = bounds
        if start is not None and end is not None and not 0 <= start < end:
            raise ValueError(f"{where}:{n}: start={start:g} end={end:g}: expected 0 <= start < end")
        split = str(row.get("split") or default_split).strip()
        base = str(row.get("id") or "").strip() or rel.rsplit(".", 1)[0]
        if row.get("id") in (None, "") and (start is not None or end is not None):
            base += f"_{int(start or 0):06d}_{int(end) if end is not None else 0:06d}"
        entries.append((where, n, _safe_key(base), rel, names, from_text, start, end, split))
    if multi_label:
        for where, n, _, _, names, from_text, *_ in entries:
            if from_text and any("," in name for name in names):
                raise ValueError(f"{where}:{n}: label {LABEL_SEPARATOR.join(names)!r}: in a multi-label dataset the "
                                 f"labels of one video are separated by {LABEL_SEPARATOR!r} (a{LABEL_SEPARATOR}b), not "
                                 f"','; a class name with a comma can be given in a JSON list (a .jsonl manifest)")
    names_all = sorted({name for e in entries if e[4] for name in e[4]})
    index = {name: i for i, name in enumerate(names_all)}
    labelled_splits = {e[8] for e in entries if e[4] is not None}
    manifest = Manifest(dataset, names_all, multi_label=multi_label)
    seen: dict[str, str] = {}
    for where, n, vid, rel, names, _, start, end, split in entries:
        if vid in seen:
            raise ValueError(f"{where}:{n}: id {vid!r} is used twice (first at {seen[vid]}); give each row its own "
                             f"'id' (two clips of one video: their start and end make them differ)")
        seen[vid] = f"{where}:{n}"
        label: int | tuple[int, ...]
        label_name: str | tuple[str, ...]
        if not multi_label:
            label_name = names[0] if names else ""
            label = index.get(label_name, -1)
        elif names is None and split not in labelled_splits:
            label, label_name = -1, ""  # a split without answers: predicted, not scored
        else:
            label = tuple(sorted(index[name] for name in names or ()))
            label_name = tuple(names_all[i] for i in label)
        # the path as given, never its bare file name: another folder's file of that name is another video
        manifest.entries.append(ManifestEntry(vid, (rel,), label, label_name, split, start, end))
    return manifest


def read_folder(relative_paths: Iterable[str], dataset: str, default_split: str = "train",
                where: str = "source") -> Manifest:
    """Your own dataset as folders: ``<class>/<video>`` (every video in ``default_split``) or
    ``<split>/<class>/<video>``, from the relative paths of the ingest source's files. Files that are not
    videos (by suffix: ``VIDEO_SUFFIXES``) are left out; the two layouts mixed, or a video outside a class
    folder, is an error naming the file."""
    videos = sorted(p for p in relative_paths if Path(p).suffix.lower() in VIDEO_SUFFIXES)
    if not videos:
        raise ValueError(f"{where}: no video files ({', '.join(VIDEO_SUFFIXES)}) under it; a folder dataset is "
                         f"<class>/<video> or <split>/<class>/<video>")
    depths = {len(Path(p).parts) for p in videos}
    if len(depths) > 1 or not depths <= {2, 3}:
        odd = next(p for p in videos if len(Path(p).parts) != min(depths) or len(Path(p).parts) not in (2, 3))
        raise ValueError(f"{where}: {odd!r} does not fit the layout: every video must be <class>/<video> or every "
                         f"video <split>/<class>/<video> (found depths {sorted(depths)})")
    parts = [Path(p).parts for p in videos]
    names = sorted({p[-2] for p in parts})
    index = {name: i for i, name in enumerate(names)}
    manifest = Manifest(dataset, names)
    seen: dict[str, str] = {}
    for rel, p in zip(videos, parts, strict=True):
        split = p[0] if len(p) == 3 else default_split
        vid = _safe_key(rel.rsplit(".", 1)[0])
        if vid in seen:  # a.mp4 beside a.webm, or names that differ only in '.', '/' and '_'
            raise ValueError(f"{where}: {rel!r} and {seen[vid]!r} make the same sample id {vid!r}: rename one")
        seen[vid] = rel
        manifest.entries.append(ManifestEntry(vid, (rel,), index[p[-2]], p[-2], split))
    return manifest

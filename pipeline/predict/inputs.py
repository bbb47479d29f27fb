"""What to predict: the INPUTS of ``jobs/predict.py`` expanded to a list of videos, each named by an id that is
reported in the outputs and matched when a run resumes (an absolute local path, or an ``s3://`` URI).

* a video file: taken whatever its extension (it is named, so it is meant);
* a folder: every file with a video extension under it, recursively, in sorted order;
* a list file: ``@list.txt``, or any argument ending in ``.txt`` or ``.csv``: one input per line (blank lines and
  ``#`` comments skipped; a CSV's ``path``, ``uri``, ``video``, ``file`` or ``input`` column when its header has
  one, else its first column); relative paths are relative to the list file's folder; an entry may be a
  folder or an ``s3://`` prefix too;
* ``s3://bucket/prefix``: every object with a video extension under the prefix (listed and read through
  ``pipeline.data.storage``: endpoint and credentials the usual boto3 way); ``s3://bucket/key.mp4``: that object.

Inputs named twice are predicted once. A missing file is not an error here: it is reported in the outputs as
that input's error, with the others predicted.
"""

from __future__ import annotations

import csv
import functools
import io
import os
from pathlib import Path

from pipeline.predict.errors import PredictError

VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv",
                              ".3gp", ".ts", ".mts", ".ogv"})
LIST_SUFFIXES = (".txt", ".csv")
LIST_COLUMNS = ("path", "uri", "video", "file", "input")


def is_video_name(name: str) -> bool:
    return Path(name).suffix.lower() in VIDEO_EXTENSIONS


def expand_inputs(args: list[str]) -> tuple[list[str], list[str]]:
    """The input ids, in order and without repeats, and one note per argument saying what it gave."""
    ids: list[str] = []
    notes: list[str] = []
    for arg in args:
        found = _expand(arg, allow_lists=True)
        notes.append(f"{arg}: {len(found)} video{'s' if len(found) != 1 else ''}")
        ids.extend(found)
    unique = list(dict.fromkeys(ids))
    if len(unique) < len(ids):
        notes.append(f"{len(ids) - len(unique)} input(s) named more than once: predicted once")
    if not unique:
        raise PredictError(f"no videos found in {' '.join(args)} (video extensions: "
                           f"{', '.join(sorted(VIDEO_EXTENSIONS))})")
    return unique, notes


def _expand(arg: str, allow_lists: bool, base: Path | None = None) -> list[str]:
    if arg.startswith("s3://"):
        return _expand_s3(arg)
    if "://" in arg:
        raise PredictError(f"{arg}: unsupported scheme; inputs are local paths, folders, list files or s3:// URIs")
    is_list = arg.startswith("@") or (allow_lists and arg.lower().endswith(LIST_SUFFIXES))
    if is_list and allow_lists:
        return _read_list(Path(arg.removeprefix("@")).expanduser())
    path = Path(arg).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    path = Path(os.path.normpath(path.absolute()))  # one id per file however it is named (a/../b is b)
    if path.is_dir():
        return [str(p) for p in sorted(path.rglob("*")) if p.is_file() and is_video_name(p.name)
                and not any(part.startswith(".") for part in p.relative_to(path).parts)]
    return [str(path)]  # a file, or a missing one: reported per input


def _read_list(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise PredictError(f"{path}: cannot read the list file ({e}); give one video path or URI per line") from None
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    entries: list[str]
    if path.suffix.lower() == ".csv":
        rows = [r for r in csv.reader(io.StringIO("\n".join(lines))) if r and r[0].strip()]
        header = [c.strip().lower() for c in rows[0]] if rows else []
        column = next((header.index(c) for c in LIST_COLUMNS if c in header), None)
        if column is not None:
            rows = rows[1:]
        column = column or 0
        bad = [i for i, r in enumerate(rows) if len(r) <= column]
        if bad:
            raise PredictError(f"{path}: row {bad[0] + 2} has no column {column + 1}")
        entries = [r[column].strip() for r in rows]
    else:
        entries = [line.strip() for line in lines]
    out: list[str] = []
    for entry in entries:
        out.extend(_expand(entry, allow_lists=False, base=path.parent.absolute()))
    return out


@functools.lru_cache(maxsize=32)
def _bucket(bucket: str):
    """One storage client per bucket and process (boto3 clients are costly to make)."""
    from pipeline.data.storage import open_storage

    return open_storage(f"s3://{bucket}")


def _expand_s3(uri: str) -> list[str]:
    from pipeline.data.storage import StorageError, split_s3_uri

    try:
        bucket, key = split_s3_uri(uri)
        storage = _bucket(bucket)
        if is_video_name(key) and storage.exists(key):
            return [f"s3://{bucket}/{key}"]
        prefix = key.strip("/")
        listed = storage.list(prefix + "/" if prefix else "")
    except StorageError as e:
        raise PredictError(str(e)) from None
    return [f"s3://{bucket}/{o.key}" for o in listed if is_video_name(o.key)]


def read_source(input_id: str) -> str | bytes:
    """What the decoder reads for an input: the local path itself, or the object's bytes."""
    if input_id.startswith("s3://"):
        from pipeline.data.storage import split_s3_uri

        bucket, key = split_s3_uri(input_id, need_key=True)
        return _bucket(bucket).get_bytes(key)
    return input_id

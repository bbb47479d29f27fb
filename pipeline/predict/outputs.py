"""What a prediction writes: one row per input (JSONL or CSV by the suffix of ``--out``, else a table on
stdout), the features file (safetensors: input id -> ``[D]`` float32), and what an earlier, interrupted run
already wrote (so that a rerun skips it).

Rows are written and flushed as each input finishes, so an interrupted run loses at most the input in flight.
A rerun with the same ``--out``: inputs with a row are skipped; rows that record an error (and a last line cut
short by the interruption) are dropped from the file and those inputs tried again, so the file ends with
exactly one row per input. ``<out>.meta.json`` records the model and protocol the rows came from: a rerun with
another model or protocol is refused rather than mixed into the same file.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from pipeline.predict.model import PredictError, Result, topk

CSV_COLUMNS = ("input", "label", "score", "top_labels", "top_scores", "labels", "views", "clips", "error")
LIST_SEPARATOR = "|"  # between labels in a CSV cell (class names hold spaces, commas and quotes, not this)


def result_row(result: Result, classes: list[str], k: int, multi_label: bool = False,
               threshold: float = 0.5) -> dict[str, Any]:
    """A result as the row written for it: ``label`` / ``score`` (top-1), ``top`` (the top-k, highest first),
    ``labels`` for a multi-label model (every class scoring at least ``threshold``), ``views``, ``clips``,
    ``error`` (None when it was predicted)."""
    if result.error is not None or result.scores is None:
        return {"input": result.input, "error": result.error or "no scores"}
    order = topk(result.scores, k)
    row: dict[str, Any] = {
        "input": result.input, "label": classes[order[0]], "score": round(float(result.scores[order[0]]), 6),
        "top": [{"label": classes[i], "index": i, "score": round(float(result.scores[i]), 6)} for i in order],
    }
    if multi_label:
        above = [int(i) for i in np.argsort(-result.scores, kind="stable") if result.scores[i] >= threshold]
        row["labels"] = [{"label": classes[i], "index": i, "score": round(float(result.scores[i]), 6)} for i in above]
    row.update(views=result.views, clips=result.clips, error=None)
    return row


def csv_cells(row: dict[str, Any]) -> dict[str, Any]:
    top = row.get("top") or []
    labels = row.get("labels")
    return {"input": row["input"], "label": row.get("label", ""), "score": row.get("score", ""),
            "top_labels": LIST_SEPARATOR.join(t["label"] for t in top),
            "top_scores": LIST_SEPARATOR.join(f"{t['score']:.6f}" for t in top),
            "labels": LIST_SEPARATOR.join(t["label"] for t in labels) if labels is not None else "",
            "views": row.get("views", ""), "clips": row.get("clips", ""), "error": row.get("error") or ""}


def output_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    raise PredictError(f"--out {path}: the format comes from the suffix: .jsonl (one JSON object per line) or .csv")


# ---------------------------------------------------------------------------------------------------
# Resuming


def read_done(path: Path) -> tuple[set[str], int, list[str]]:
    """What an earlier run left in ``path``: the inputs with a prediction (kept), how many error rows there were,
    and the lines to keep (the file is rewritten with only these, so errors are retried). A malformed line
    other than the last (a run cut short mid-line) means the file is not ours: refused."""
    fmt = output_format(path)
    text = path.read_text()
    done: set[str] = set()
    keep: list[str] = []
    errors = 0
    if fmt == "jsonl":
        lines = text.splitlines(keepends=True)
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("input"), str):
                    raise ValueError("not a row with an input")
            except ValueError as e:
                if n == len(lines) and not line.endswith("\n"):
                    continue  # the line being written when the run stopped
                raise PredictError(f"--out {path}: line {n} is not a prediction row ({e}); it was not written by "
                                   f"this command: choose another --out, or pass --overwrite") from None
            if row.get("error"):
                errors += 1
                continue
            done.add(row["input"])
            keep.append(line if line.endswith("\n") else line + "\n")
        return done, errors, keep
    complete = text if text.endswith("\n") or not text else text[: text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(complete))
    if reader.fieldnames is None and not complete:
        return done, 0, []
    if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
        raise PredictError(f"--out {path}: its header is not this command's ({', '.join(CSV_COLUMNS)}); choose "
                           f"another --out, or pass --overwrite")
    rows = list(reader)
    for row in rows:
        if row.get("error"):
            errors += 1
            continue
        done.add(row["input"])
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(r for r in rows if not r.get("error"))
    return done, errors, [buf.getvalue()]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def check_record(path: Path, record: dict[str, Any], overwrite: bool) -> None:
    """Refuse to resume ``path`` with another model or protocol than wrote it; write the record otherwise."""
    meta = path.with_name(path.name + ".meta.json")
    if meta.exists() and not overwrite and path.exists():
        try:
            earlier = json.loads(meta.read_text())
        except ValueError:
            earlier = None
        differs = [k for k in record if not isinstance(earlier, dict) or earlier.get(k) != record[k]]
        if differs:
            raise PredictError(f"{path} was written with another {' and '.join(differs)} ({meta}): its rows would "
                               f"be mixed with these; choose another output, or pass --overwrite to start over")
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(meta, json.dumps(record, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------------
# Writers


class RowWriter:
    """Rows to a JSONL or CSV file (appended to what a resumed file keeps, flushed per row), or a table."""

    def __init__(self, path: Path | None, *, resume_lines: Iterable[str] = (), stream: TextIO | None = None,
                 show: Any = None) -> None:
        self.path, self.show = path, show
        self.fmt = output_format(path) if path is not None else "table"
        self.rows = 0
        if path is None:
            self.file = stream or sys.stdout
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = "".join(resume_lines)
        _atomic_write(path, kept)  # the file as resumed: done rows only
        self.file = open(path, "a", newline="")  # noqa: SIM115 (closed in close())
        if self.fmt == "csv" and not kept:
            csv.DictWriter(self.file, CSV_COLUMNS, lineterminator="\n").writeheader()
            self.file.flush()

    def write(self, row: dict[str, Any]) -> None:
        if self.fmt == "jsonl":
            self.file.write(json.dumps(row) + "\n")
        elif self.fmt == "csv":
            csv.DictWriter(self.file, CSV_COLUMNS, lineterminator="\n").writerow(csv_cells(row))
        else:
            self.file.write(table_line(row) + "\n") if self.show is None else self.show(table_line(row))
        self.file.flush()
        self.rows += 1

    def close(self) -> None:
        if self.path is not None:
            self.file.close()


def table_line(row: dict[str, Any]) -> str:
    """One input's row for people: its top-1 and top-k, or its error."""
    if row.get("error"):
        return f"{row['input']}\tERROR\t{row['error']}"
    top = ", ".join(f"{t['label']} {t['score']:.3f}" for t in row["top"])
    extra = ""
    if "labels" in row:
        extra = "\tlabels: " + (", ".join(t["label"] for t in row["labels"]) or "(none above the threshold)")
    return f"{row['input']}\t{row['label']}\t{row['score']:.3f}\ttop: {top}{extra}"


class FeatureStore:
    """Per-input features in one safetensors file: tensor ``<input id>`` -> ``[D]`` float32, with metadata
    ``inputs`` (the ids, in the order written), ``model``, ``protocol``, ``feature`` (what the vector is) and
    ``dim``. Nothing in it is pickled. Rewritten atomically at most every ``flush_s`` seconds and at the end,
    so an interrupted run keeps what was flushed; a rerun loads it and skips those inputs."""

    def __init__(self, path: Path, record: dict[str, str], *, resume: bool, flush_s: float = 60.0) -> None:
        if path.suffix != ".safetensors":
            raise PredictError(f"--features {path}: features are written as safetensors (name it *.safetensors)")
        self.path, self.record, self.flush_s = path, record, flush_s
        self.features: dict[str, np.ndarray] = {}
        self.dirty, self.last = False, time.monotonic()
        if resume and path.exists():
            self._load()

    def _load(self) -> None:
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="np") as f:
                meta = f.metadata() or {}
                order = json.loads(meta.get("inputs", "[]"))
                self.features = {k: f.get_tensor(k) for k in order}
        except Exception as e:  # noqa: BLE001 -- not safetensors, no metadata, keys missing: one answer
            raise PredictError(f"--features {self.path}: cannot resume from it ({type(e).__name__}: {e}); choose "
                               f"another file, or pass --overwrite") from None
        differs = [k for k in ("model", "protocol", "feature") if meta.get(k) != self.record.get(k)]
        if differs:
            raise PredictError(f"--features {self.path} holds features of another {' and '.join(differs)} "
                               f"({meta.get(differs[0])!r}); choose another file, or pass --overwrite")

    def __contains__(self, input_id: str) -> bool:
        return input_id in self.features

    def __len__(self) -> int:
        return len(self.features)

    def add(self, input_id: str, feature: np.ndarray) -> None:
        self.features[input_id] = np.ascontiguousarray(feature, dtype=np.float32)
        self.dirty = True
        if time.monotonic() - self.last >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        from safetensors.numpy import save_file

        self.last = time.monotonic()
        if not self.dirty and self.path.exists():
            return
        dims = {v.shape[0] for v in self.features.values()}
        meta = {**self.record, "inputs": json.dumps(list(self.features)), "dim": str(dims.pop() if dims else 0)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        save_file(self.features, str(tmp), metadata=meta)
        os.replace(tmp, self.path)
        self.dirty = False


def load_features(path: str | os.PathLike) -> tuple[list[str], np.ndarray, dict[str, str]]:
    """A features file as (input ids in order, ``(N, D)`` float32 array, metadata)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        meta = f.metadata() or {}
        ids = json.loads(meta.get("inputs", "[]"))
        arr = np.stack([f.get_tensor(k) for k in ids]) if ids else np.zeros((0, int(meta.get("dim", 0))), np.float32)
    return ids, arr, meta

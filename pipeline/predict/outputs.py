"""What a prediction writes: one row per input (JSONL or CSV by the suffix of ``--out``, else a table on
stdout), the features file (safetensors: input id -> ``[D]`` float32), and what an earlier, interrupted run
already wrote (so that a rerun skips it).

Rows are written and flushed as each input finishes, so an interrupted run loses at most the input in flight.
A rerun with the same ``--out``: inputs with a row are skipped; rows that record an error (and a last line cut
short by the interruption) are dropped from the file and those inputs tried again, so the file ends with
exactly one row per input. ``<out>.meta.json`` records the model (where it was loaded from, and the sha256 of its
weights) and the protocol the rows came from: a rerun with another model, other weights under the same name, or
another protocol is refused rather than mixed into the same file. The features file records the same.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
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


def _shown(value: Any) -> str:
    if value is None:
        return "not recorded"
    text = str(value)
    return text[:19] + "..." if text.startswith("sha256:") else repr(text)


def check_record(path: Path, record: dict[str, Any], overwrite: bool) -> None:
    """Refuse to resume ``path`` with another model (its description or its weights' digest) or protocol than
    wrote it; write the record otherwise."""
    meta = path.with_name(path.name + ".meta.json")
    if meta.exists() and not overwrite and path.exists():
        try:
            earlier = json.loads(meta.read_text())
        except ValueError:
            earlier = None
        differs = [k for k in record if not isinstance(earlier, dict) or earlier.get(k) != record[k]]
        if differs:
            was = earlier if isinstance(earlier, dict) else {}
            detail = "; ".join(f"{k}: {_shown(was.get(k))} then, {_shown(record[k])} now" for k in differs)
            what = " and ".join("other weights (another model, or the same file rewritten with other weights)"
                                if k == "weights" else f"another {k}" for k in differs)
            raise PredictError(f"{path} was written with {what} ({detail}; recorded in {meta}): its rows "
                               f"would be mixed with these; write to another --out (and --features), or pass "
                               f"--overwrite to start over")
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


# ---------------------------------------------------------------------------------------------------
# Features

FEATURES_FORMAT = "pipeline-features-2"  # features [N, D] float32, id_lengths [N] int64, ids [bytes] uint8
PARTS_SUFFIX = ".parts"  # OUT.parts/00001.safetensors ...: the rows of each flush, merged into OUT at the end
_READ_ROWS = 65536  # rows copied at a time when parts are merged (bounded memory, whatever N)


def _encode_ids(ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Ids as (UTF-8 bytes joined by "\\n" as uint8, each id's byte length as int64). The lengths make the split
    exact even for a file name holding a line break; paths that are not UTF-8 keep their bytes (surrogateescape)."""
    encoded = [i.encode("utf-8", "surrogateescape") for i in ids]
    lengths = np.fromiter((len(b) for b in encoded), np.int64, len(encoded))
    return np.frombuffer(b"\n".join(encoded), np.uint8), lengths


def _decode_ids(raw: np.ndarray, lengths: np.ndarray | None) -> list[str]:
    data = raw.tobytes()
    if lengths is None:
        return data.decode("utf-8", "surrogateescape").split("\n") if data else []
    ids, at = [], 0
    for n in lengths.tolist():
        ids.append(data[at:at + n].decode("utf-8", "surrogateescape"))
        at += n + 1
    if at - 1 != len(data) and (len(lengths) or data):
        raise ValueError(f"its ids ({len(data)} bytes) do not match their {len(lengths)} lengths")
    return ids


class _Part:
    """One features file (OUT or a part) opened for reading: metadata, ids, rows on demand. Reads this format,
    and the first one (a tensor per input id, the ids in the metadata's ``inputs``: written by this command
    before parts existed)."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = path
        self._file = safe_open(str(path), framework="np")
        self.f = self._file.__enter__()
        try:
            self._read()
        except BaseException:
            self.close()
            raise

    def _read(self) -> None:
        f = self.f
        self.meta = f.metadata() or {}
        names = set(f.keys())
        if "features" in names:
            self.legacy = False
            self.ids = _decode_ids(f.get_tensor("ids"), f.get_tensor("id_lengths") if "id_lengths" in names else None)
            shape = f.get_slice("features").get_shape()
            if len(shape) != 2 or shape[0] != len(self.ids):
                raise ValueError(f"'features' has shape {shape} for {len(self.ids)} ids")
            self.dim = int(shape[1])
        elif "inputs" in self.meta:
            self.legacy = True
            self.ids = json.loads(self.meta["inputs"])
            self.dim = int(self.meta.get("dim", 0)) if not self.ids else int(f.get_slice(self.ids[0]).get_shape()[0])
        else:
            raise ValueError("it holds no 'features' tensor (not a features file written by jobs/predict.py)")

    def rows(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.zeros((0, self.dim), np.float32)
        if self.legacy:
            return np.stack([self.f.get_tensor(k) for k in self.ids[start:stop]]).astype(np.float32, copy=False)
        return np.asarray(self.f.get_slice("features")[start:stop], np.float32)

    def close(self) -> None:
        self._file.__exit__(None, None, None)


def _write_features(path: Path, meta: dict[str, str], dim: int, ids: list[str],
                    chunks: Iterable[np.ndarray]) -> None:
    """A features file written as a stream: the safetensors header (tensors ``id_lengths`` [N] int64,
    ``features`` [N, D] float32, ``ids`` [bytes] uint8), then the rows as ``chunks`` yields them (N rows in all),
    then the ids; into a temporary file renamed over ``path`` when whole. Tensors have no size limit (the header
    does: 100 MB), so this holds millions of inputs."""
    raw, lengths = _encode_ids(ids)
    n = len(ids)
    sizes = {"id_lengths": lengths.nbytes, "features": n * dim * 4, "ids": raw.nbytes}
    header: dict[str, Any] = {"__metadata__": {**meta, "format": FEATURES_FORMAT, "dim": str(dim), "count": str(n)}}
    at = 0
    for name, dtype, shape in (("id_lengths", "I64", [n]), ("features", "F32", [n, dim]), ("ids", "U8", [raw.size])):
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + sizes[name]]}
        at += sizes[name]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as out:
            out.write(len(text).to_bytes(8, "little"))
            out.write(text)
            out.write(lengths.astype("<i8").tobytes())
            written = 0
            for chunk in chunks:
                chunk = np.ascontiguousarray(chunk, dtype="<f4")
                if chunk.ndim != 2 or chunk.shape[1] != dim:
                    raise ValueError(f"rows of shape {chunk.shape} in a file of {dim}-wide features")
                out.write(chunk.tobytes())
                written += len(chunk)
            if written != n:
                raise ValueError(f"{written} feature rows for {n} ids")
            out.write(raw.tobytes())
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class FeatureStore:
    """Per-input features for ``--features OUT.safetensors``: one safetensors file with tensors ``features``
    ([N, D] float32, row i the feature of input i), ``ids`` (the input ids, UTF-8, joined by "\\n", as uint8) and
    ``id_lengths`` ([N] int64, each id's byte length), and metadata ``model``, ``weights``, ``protocol``,
    ``feature`` (what the vector is), ``dim``, ``count``. Nothing in it is pickled, and the ids are a tensor, not
    tensor names or metadata, so no header limit caps the number of inputs.

    While a run goes, each flush (at most every ``flush_s`` seconds) writes only the rows added since the last one,
    as the next part ``OUT.parts/00001.safetensors``, ``00002``, ... (the same layout); the end of the run merges
    OUT and the parts into OUT, streaming the rows, and removes the parts. An interrupted run keeps what was
    flushed; a rerun reads OUT and the parts, skips those inputs and merges everything at its end."""

    def __init__(self, path: Path, record: dict[str, str], *, resume: bool, flush_s: float = 60.0) -> None:
        if path.suffix != ".safetensors":
            raise PredictError(f"--features {path}: features are written as safetensors (name it *.safetensors)")
        self.path, self.record, self.flush_s = path, record, flush_s
        self.parts_dir = path.with_name(path.name + PARTS_SUFFIX)
        self.done: set[str] = set()
        self.pending_ids: list[str] = []
        self.pending: list[np.ndarray] = []
        self.dim: int | None = None
        self.next_part = 1
        self.last = time.monotonic()
        if not resume:
            self._remove(self.path)
            self._remove(self.parts_dir)
            return
        for part in self._sources():
            try:
                with contextlib.closing(_Part(part)) as p:
                    self._check(part, p)
                    self.done.update(p.ids)
            except PredictError:
                raise
            except Exception as e:  # noqa: BLE001 -- not safetensors, cut short, keys missing: one answer
                raise PredictError(f"--features {part}: cannot resume from it ({type(e).__name__}: "
                                   f"{' '.join(str(e).split())[:300]}); choose another file, or pass --overwrite to "
                                   f"start over") from None

    def _remove(self, path: Path) -> None:
        try:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except OSError as e:
            raise PredictError(f"--features {self.path}: cannot remove {path} to start over ({type(e).__name__}: "
                               f"{e})") from None

    def _parts(self) -> list[Path]:
        if not self.parts_dir.is_dir():
            return []
        parts = sorted(p for p in self.parts_dir.iterdir() if p.suffix == ".safetensors" and p.stem.isdigit())
        if parts:
            self.next_part = max(self.next_part, int(parts[-1].stem) + 1)
        return parts

    def _sources(self) -> list[Path]:
        """OUT (when there is one), then the parts in the order they were written."""
        return ([self.path] if self.path.exists() else []) + self._parts()

    def _check(self, where: Path, part: _Part) -> None:
        differs = [k for k in ("model", "weights", "protocol", "feature") if part.meta.get(k) != self.record.get(k)]
        if differs:
            k = differs[0]
            what = " and ".join("other weights" if d == "weights" else f"another {d}" for d in differs)
            raise PredictError(f"--features {self.path}: {where} holds features of {what} "
                               f"({k} {part.meta.get(k)!r} there, {self.record.get(k)!r} now); choose another file, "
                               f"or pass --overwrite to start over")
        if self.dim is None and part.ids:
            self.dim = part.dim
        elif part.ids and part.dim != self.dim:
            raise PredictError(f"--features {where}: {part.dim}-wide features beside {self.dim}-wide ones; choose "
                               f"another file, or pass --overwrite")

    def __contains__(self, input_id: str) -> bool:
        return input_id in self.done

    def __len__(self) -> int:
        return len(self.done)

    def add(self, input_id: str, feature: np.ndarray) -> None:
        if input_id in self.done:
            return
        feature = np.ascontiguousarray(feature, dtype=np.float32).reshape(-1)
        if self.dim is None:
            self.dim = feature.shape[0]
        elif feature.shape[0] != self.dim:
            raise PredictError(f"--features {self.path}: a {feature.shape[0]}-wide feature for {input_id} among "
                               f"{self.dim}-wide ones")
        self.done.add(input_id)
        self.pending_ids.append(input_id)
        self.pending.append(feature)
        if time.monotonic() - self.last >= self.flush_s:
            self.flush()

    def _write_error(self, what: Path, e: Exception) -> PredictError:
        return PredictError(f"--features {self.path}: cannot write {what} ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:300]}); free space or choose a writable place for the "
                            f"features, then run the command again (what was flushed before is kept and resumed)")

    def flush(self) -> None:
        """The rows added since the last flush as the next part (nothing when there are none)."""
        self.last = time.monotonic()
        if not self.pending_ids:
            return
        self._parts()  # the next free number, also when another process wrote parts meanwhile
        part = self.parts_dir / f"{self.next_part:05d}.safetensors"
        try:
            self.parts_dir.mkdir(parents=True, exist_ok=True)
            _write_features(part, self.record, int(self.dim or 0), self.pending_ids, [np.stack(self.pending)])
        except (OSError, ValueError) as e:
            raise self._write_error(part, e) from None
        self.next_part += 1
        self.pending_ids, self.pending = [], []

    def close(self) -> None:
        """Flush, then merge OUT and the parts into OUT (each input once, in the order written) and remove the
        parts. Also writes an empty OUT when nothing was predicted (the file asked for exists)."""
        self.flush()
        sources = self._sources()
        if sources == [self.path]:
            return  # already one file
        opened: list[_Part] = []
        try:
            try:
                for source in sources:
                    opened.append(_Part(source))
            except Exception as e:  # noqa: BLE001 -- a part damaged since it was read: say which
                raise PredictError(f"--features {self.path}: cannot read {source} to merge it ({type(e).__name__}: "
                                   f"{' '.join(str(e).split())[:300]}); remove it (its inputs are predicted again) "
                                   f"or pass --overwrite") from None
            seen: set[str] = set()
            ids: list[str] = []
            keep: list[np.ndarray] = []
            for p in opened:
                mask = np.zeros(len(p.ids), bool)
                for i, x in enumerate(p.ids):
                    if x not in seen:
                        seen.add(x)
                        mask[i] = True
                        ids.append(x)
                keep.append(mask)
            dim = int(self.dim if self.dim is not None else next((p.dim for p in opened if p.ids), 0))

            def rows():
                for p, mask in zip(opened, keep, strict=True):
                    for a in range(0, len(p.ids), _READ_ROWS):
                        yield p.rows(a, min(a + _READ_ROWS, len(p.ids)))[mask[a:a + _READ_ROWS]]
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                _write_features(self.path, self.record, dim, ids, rows())
            except (OSError, ValueError) as e:
                raise self._write_error(self.path, e) from None
        finally:
            for p in opened:
                p.close()
        self._remove(self.parts_dir)


def load_features(path: str | os.PathLike) -> tuple[list[str], np.ndarray, dict[str, str]]:
    """A features file as (input ids in order, ``(N, D)`` float32 array, metadata). Reads the files of this
    format and of the first one (a tensor per id). A run that was interrupted left its rows in ``OUT.parts/``:
    rerun the command to merge them (this reads OUT only, and says so when parts are beside it)."""
    path = Path(path)
    parts = path.with_name(path.name + PARTS_SUFFIX)
    if not path.exists():
        hint = (f"; {parts} holds the parts of an interrupted run: rerun the same command to finish and merge them"
                if parts.is_dir() else "")
        raise FileNotFoundError(f"{path}: no such features file{hint}")
    with contextlib.closing(_Part(path)) as p:
        return list(p.ids), p.rows(0, len(p.ids)), dict(p.meta)

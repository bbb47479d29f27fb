"""Checkpoints in the run directory: ``checkpoints/step000000100/`` written by every rank through the
engine, then a ``COMPLETE`` marker written last by rank 0. A checkpoint without a valid marker (a job killed
while saving, a node that crashed before the marker reached the disk) is never resumed from; on start, a run
resumes from the newest complete one.

Durability: each rank fsyncs the files it wrote (``sync_tree``, called by the engines' ``save``); rank 0
fsyncs them again with their directory before it writes the marker, writes the marker to a temporary file,
fsyncs it, renames it into place and fsyncs the checkpoint directory, ``checkpoints/`` and the run directory.
So after a crash a marker is either absent or whole, and a whole marker vouches only for data on disk.

Only directories named ``step<digits>`` are checkpoints; anything else under ``checkpoints/`` (notes, a
stray file, a DeepSpeed helper script) is left alone by every function here.

``train.keep_best``: ``checkpoints/best.json`` names the checkpoint with the best validation metric so far
(``record_best``, written by rank 0 after that checkpoint is complete); ``prune`` never removes it, and the end of
the run tests and exports it (``best_checkpoint``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
MARKER = "COMPLETE"
TAG_RE = re.compile(r"^step(\d+)$")


class CheckpointMarkerError(ValueError):
    """A checkpoint's COMPLETE marker is missing, empty or not the JSON this module writes."""


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step{step:09d}"


def step_of(tag: str) -> int | None:
    """The step a checkpoint directory's name stands for; None for a name that is not a checkpoint's."""
    m = TAG_RE.match(tag)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------------
# fsync


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (files created, renamed or removed in it) survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(path: Path) -> None:
    """fsync every regular file under ``path``, then every directory, deepest first. Symbolic links are
    not followed (a checkpoint holds none; one that does is not ours to flush)."""
    for dirpath, _, filenames in os.walk(path, topdown=False):
        for name in filenames:
            file = os.path.join(dirpath, name)
            if os.path.islink(file) or not os.path.isfile(file):
                continue
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def mark_complete(run_dir: Path, tag: str, info: dict[str, Any]) -> None:
    """Write ``tag``'s COMPLETE marker, durably and atomically, after its data is on disk."""
    directory = checkpoint_root(run_dir) / tag
    sync_tree(directory)  # the data first: a marker must never reach the disk before what it vouches for
    path = directory / MARKER
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps({**info, "tag": tag, "completed_at": time.time()}, indent=1))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)  # atomic: the marker is either absent or whole
    fsync_dir(directory)  # the rename
    fsync_dir(checkpoint_root(run_dir))  # the checkpoint directory's own entry
    fsync_dir(Path(run_dir))  # checkpoints/ itself, on the first save


# ---------------------------------------------------------------------------------------------------
# Reading markers


def _check_marker(directory: Path) -> dict[str, Any]:
    """The marker of a checkpoint directory, or ``CheckpointMarkerError`` saying what is wrong with it."""
    path = directory / MARKER
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CheckpointMarkerError(f"{path}: no marker (the job stopped while saving)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointMarkerError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if not text.strip():
        raise CheckpointMarkerError(f"{path}: empty (the node stopped before the marker reached the disk)")
    try:
        info = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise CheckpointMarkerError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None
    step = info.get("step") if isinstance(info, dict) else None
    if not isinstance(step, int) or isinstance(step, bool):
        raise CheckpointMarkerError(f"{path}: no integer 'step' in it")
    if step != step_of(directory.name):
        raise CheckpointMarkerError(f"{path}: says step {step}, but its directory is {directory.name}")
    return info


def _scan(run_dir: Path) -> tuple[list[tuple[int, str]], list[tuple[int, str, str | None]]]:
    """(complete, incomplete): (step, tag) of each checkpoint with a valid marker, oldest first, and
    (step, tag, what is wrong with its marker, or None when it has none) of the others. Foreign entries are
    in neither."""
    root = checkpoint_root(run_dir)
    complete, incomplete = [], []
    if not root.is_dir():
        return complete, incomplete
    for d in root.iterdir():
        step = step_of(d.name)
        if step is None or d.is_symlink() or not d.is_dir():
            continue  # not a checkpoint: notes, a stray file, DeepSpeed's zero_to_fp32.py
        if not (d / MARKER).exists():
            incomplete.append((step, d.name, None))
            continue
        try:
            _check_marker(d)
        except CheckpointMarkerError as e:
            incomplete.append((step, d.name, str(e)))
            continue
        complete.append((step, d.name))
    return sorted(complete), sorted(incomplete)


def complete_checkpoints(run_dir: Path) -> list[tuple[int, str]]:
    """(step, tag) of every complete checkpoint, oldest first. A marker that exists but is empty or
    invalid makes its checkpoint incomplete, with a warning."""
    complete, incomplete = _scan(run_dir)
    broken = [why for _, _, why in incomplete if why is not None]
    if broken:
        log.warning("treating %d checkpoint(s) as incomplete: %s", len(broken), "; ".join(broken))
    return complete


def latest_complete(run_dir: Path) -> tuple[int, str] | None:
    done = complete_checkpoints(run_dir)
    if not done:
        _, incomplete = _scan(run_dir)
        if incomplete:  # (an invalid marker was already named above)
            log.warning("ignoring incomplete checkpoint(s) %s in %s (no valid %s marker: the job stopped while "
                        "saving)", [tag for _, tag, _ in incomplete], checkpoint_root(run_dir), MARKER)
        return None
    return done[-1]


def read_marker(run_dir: Path, tag: str) -> dict[str, Any]:
    """The marker of ``tag``; ``CheckpointMarkerError`` (naming the file) when it is missing or invalid."""
    return _check_marker(checkpoint_root(run_dir) / tag)


def prune(run_dir: Path, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` complete checkpoints, and incomplete ones older than the newest; the
    best checkpoint (``best_checkpoint``, with ``train.keep_best``) is kept besides them. Entries that are not
    checkpoint directories are never touched."""
    done, incomplete = _scan(run_dir)
    removed = []
    best = best_checkpoint(run_dir)
    if keep > 0 and len(done) > keep:
        for _, tag in done[:-keep]:
            if best is not None and tag == best["tag"]:
                continue
            shutil.rmtree(checkpoint_root(run_dir) / tag, ignore_errors=True)
            removed.append(tag)
    if done:
        newest = done[-1][0]
        for step, tag, _ in incomplete:
            if step < newest:
                shutil.rmtree(checkpoint_root(run_dir) / tag, ignore_errors=True)
                removed.append(tag)
    if removed:
        fsync_dir(checkpoint_root(run_dir))
    return removed


# ---------------------------------------------------------------------------------------------------
# The best checkpoint (train.keep_best)

BEST_FILE = "best.json"  # under checkpoints/: not a step<N> directory, so no other function here reads it


def record_best(run_dir: Path, step: int, metric: str, value: float) -> None:
    """Name checkpoint ``step`` the best so far (``metric`` = ``value``), durably and atomically; its checkpoint
    must be complete already."""
    root = checkpoint_root(run_dir)
    path = root / BEST_FILE
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps({"step": step, "tag": tag_for(step), "metric": metric, "value": value,
                            "recorded_at": time.time()}, indent=1))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    fsync_dir(root)


def best_checkpoint(run_dir: Path, up_to: int | None = None) -> dict[str, Any] | None:
    """The recorded best checkpoint ``{"step", "tag", "metric", "value"}``, or None: none recorded, a record
    that cannot be read, or one whose checkpoint is not complete (removed by hand, or newer than the checkpoint a
    run resumed from: ``up_to``, the resumed step)."""
    path = checkpoint_root(run_dir) / BEST_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as e:
        log.warning("%s: unreadable (%s): no best checkpoint recorded", path, e)
        return None
    ok = (isinstance(record, dict) and isinstance(record.get("step"), int) and isinstance(record.get("metric"), str)
          and isinstance(record.get("value"), (int, float)) and record.get("tag") == tag_for(record["step"]))
    if not ok:
        log.warning("%s: not a best-checkpoint record: ignored", path)
        return None
    if up_to is not None and record["step"] > up_to:
        return None
    try:
        _check_marker(checkpoint_root(run_dir) / record["tag"])
    except CheckpointMarkerError:
        return None
    return record

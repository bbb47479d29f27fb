"""Checkpoints in the run directory: ``checkpoints/step000000100/`` written by every rank through the
engine, then a ``COMPLETE`` marker written last by rank 0. A checkpoint without the marker (a job killed
while saving) is never resumed from; on start, a run resumes from the newest complete one."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
MARKER = "COMPLETE"


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step{step:09d}"


def mark_complete(run_dir: Path, tag: str, info: dict[str, Any]) -> None:
    path = checkpoint_root(run_dir) / tag / MARKER
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**info, "tag": tag, "completed_at": time.time()}, indent=1))
    tmp.replace(path)  # atomic: the marker is either absent or whole


def complete_checkpoints(run_dir: Path) -> list[tuple[int, str]]:
    """(step, tag) of every complete checkpoint, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith("step") and (d / MARKER).is_file():
            out.append((json.loads((d / MARKER).read_text())["step"], d.name))
    return sorted(out)


def latest_complete(run_dir: Path) -> tuple[int, str] | None:
    done = complete_checkpoints(run_dir)
    if not done:
        incomplete = [d.name for d in checkpoint_root(run_dir).glob("step*") if not (d / MARKER).exists()]
        if incomplete:
            log.warning("ignoring incomplete checkpoint(s) %s in %s (no %s marker: the job stopped while "
                        "saving)", incomplete, checkpoint_root(run_dir), MARKER)
        return None
    return done[-1]


def read_marker(run_dir: Path, tag: str) -> dict[str, Any]:
    return json.loads((checkpoint_root(run_dir) / tag / MARKER).read_text())


def prune(run_dir: Path, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` complete checkpoints, and incomplete ones older than the newest."""
    done = complete_checkpoints(run_dir)
    removed = []
    if keep > 0 and len(done) > keep:
        for _, tag in done[:-keep]:
            shutil.rmtree(checkpoint_root(run_dir) / tag, ignore_errors=True)
            removed.append(tag)
    if done:
        newest = done[-1][0]
        for d in checkpoint_root(run_dir).glob("step*"):
            if not (d / MARKER).exists() and int(d.name[4:]) < newest:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d.name)
    return removed

"""The code a run executes: a copy of the ``pipeline`` package in its run directory, made once at launch.

A run lasts days and is requeued or resumed; importing ``pipeline`` from the live checkout would let a
``git pull`` (or an edit) change the code in the middle of it, and ranks of one run could even run different
code. So launch copies the package's source into ``<run_dir>/code/pipeline`` (:func:`snapshot_code`) and the
job's environment makes every rank import it from there (:func:`rank_environment` for local processes,
:func:`shell_exports` for the sbatch script): ``PYTHONPATH=<run_dir>/code`` first, and ``PYTHONSAFEPATH=1``,
because ``python -m submitit.core._submit`` otherwise puts its working directory (the checkout, when launch
runs from there) in front of ``PYTHONPATH``. The editable install's finder comes after every ``sys.path``
entry, so it no longer decides. A resumed or requeued run reuses its snapshot; it is never copied again.

A run directory made before snapshots (no ``code/``) runs the live checkout, as it always did, and says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

CODE_DIR = "code"  # <run_dir>/code holds the package: <run_dir>/code/pipeline
PACKAGE = "pipeline"
# files of the package that the ranks need besides its modules (globs, relative to the package); none today.
# A data file read at run time (a template, a table) must be listed here, or the snapshot lacks it.
PACKAGE_DATA: tuple[str, ...] = ()
_SKIP_DIRS = {"__pycache__"}


class SnapshotError(RuntimeError):
    """A run directory's code snapshot cannot be made or used."""


def package_dir() -> Path:
    """The directory of the ``pipeline`` package this process imported (what a new snapshot copies)."""
    import pipeline

    return Path(pipeline.__file__).resolve().parent


def _package_files(package: Path) -> list[Path]:
    """The package's modules and declared data, relative to ``package``, sorted: no caches, no hidden files."""
    found: set[Path] = set()
    for root, dirs, files in os.walk(package):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        for name in files:
            if name.endswith(".py") and not name.startswith("."):
                found.add((Path(root) / name).relative_to(package))
    for pattern in PACKAGE_DATA:
        found.update(p.relative_to(package) for p in package.glob(pattern) if p.is_file())
    return sorted(found, key=lambda p: p.as_posix())


def _digest(files: list[tuple[str, bytes]]) -> str:
    """sha256 over (relative path, length, content) of each file, in path order: a rename, a move or an edit
    changes it; the time or place of the copy does not."""
    h = hashlib.sha256()
    for rel, data in files:
        h.update(f"{rel}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def code_hash(code: str | Path) -> tuple[str, int, int]:
    """The content hash, file count and size in bytes of the snapshot under ``code`` (``<run_dir>/code``), as
    :func:`snapshot_code` computed it (the ``__pycache__`` the ranks write there does not count)."""
    package = Path(code) / PACKAGE
    files = [(rel.as_posix(), (package / rel).read_bytes()) for rel in _package_files(package)]
    return _digest(files), len(files), sum(len(d) for _, d in files)


def code_path(run_dir: str | Path) -> Path | None:
    """``<run_dir>/code``, the directory the ranks put first on ``sys.path``; None for a run directory made
    before snapshots (it runs the live checkout). A ``code/`` without the package is refused: the ranks
    would silently fall back to the checkout."""
    code = Path(run_dir) / CODE_DIR
    if not code.exists():
        return None
    if not (code / PACKAGE / "__init__.py").is_file():
        raise SnapshotError(f"{code} holds no {PACKAGE} package ({PACKAGE}/__init__.py is missing): the code "
                            f"snapshot of this run is damaged; restore it (e.g. from a copy of the run) or launch "
                            f"a new run")
    return code


def snapshot_code(run_dir: str | Path, source: str | Path | None = None) -> dict[str, Any]:
    """Copy the package (``source``, default: the one this process imported) into ``<run_dir>/code`` and
    return what launch.json records: the path, the content hash, file count, bytes, where it came from and
    how long it took. The copy is made next to its place and renamed into it, so a ``code/`` is always
    complete; an existing one is never replaced (a run keeps the code it was launched with). The files are
    made read-only, to say that the snapshot is not the place to edit (a deliberate fix can still chmod)."""
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    source = Path(source).resolve() if source is not None else package_dir()
    code = run_dir / CODE_DIR
    if code.exists():
        raise SnapshotError(f"{code} exists: a run's code is copied once, at its launch, and never replaced")
    if not (source / "__init__.py").is_file():
        raise SnapshotError(f"{source} is not a package directory (no __init__.py)")
    partial = run_dir / f".{CODE_DIR}.partial-{os.getpid()}"
    copied: list[tuple[str, bytes]] = []
    try:
        for rel in _package_files(source):
            data = (source / rel).read_bytes()
            target = partial / PACKAGE / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            target.chmod(0o444)
            copied.append((rel.as_posix(), data))
        partial.rename(code)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return {"path": str(code.resolve()), "sha256": _digest(copied), "files": len(copied),
            "bytes": sum(len(d) for _, d in copied), "source": str(source),
            "seconds": round(time.perf_counter() - t0, 4)}


def rank_environment(code: Path, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables that make a Python started in this environment import ``pipeline`` from ``code``,
    whatever its working directory: ``PYTHONPATH`` with ``code`` first (what was there stays, after it) and
    ``PYTHONSAFEPATH=1`` (no working directory, script directory or '' in front of it)."""
    environ = os.environ if environ is None else environ
    before = environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": str(code) + (os.pathsep + before if before else ""), "PYTHONSAFEPATH": "1"}


def shell_exports(code: Path) -> list[str]:
    """:func:`rank_environment` as lines of a shell script (the sbatch script's setup, run again on every
    requeue): the node's own ``PYTHONPATH``, if any, stays after the snapshot."""
    quoted = shlex.quote(str(code))
    return [f'export PYTHONPATH={quoted}"${{PYTHONPATH:+:$PYTHONPATH}}"', "export PYTHONSAFEPATH=1"]


def _recorded(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """launch.json's ``code`` and ``git`` records ({} where absent or unreadable)."""
    try:
        record = json.loads((run_dir / "launch.json").read_text())
    except (OSError, ValueError):
        return {}, {}
    if not isinstance(record, dict):
        return {}, {}
    code, git = record.get("code"), record.get("git")
    return (code if isinstance(code, dict) else {}), (git if isinstance(git, dict) else {})


def describe_running_code(run_dir: str | Path) -> tuple[int, str]:
    """Which code this process runs, as ``(logging level, message)`` for ``log.log(*...)`` on rank 0:
    INFO for the run's snapshot (path and hash, checked against launch.json) or for the live checkout of a
    run directory made before snapshots; WARNING when the snapshot was edited since launch or when this
    process imported ``pipeline`` from somewhere else than the run's snapshot (started by hand, not by
    launch.py's executor)."""
    run_dir = Path(run_dir)
    running = package_dir()
    try:
        code = code_path(run_dir)
    except SnapshotError as e:
        return logging.WARNING, f"code: {running} (live checkout); {e}"
    if code is None:
        return logging.INFO, (f"code: the live checkout {running}: this run directory has no code snapshot (it "
                              f"was made before launch.py copied the code), so a change to the checkout changes "
                              f"the run")
    snapshot = (code / PACKAGE).resolve()
    strays = sorted(name for name, module in list(sys.modules.items())
                    if (name == PACKAGE or name.startswith(PACKAGE + ".")) and getattr(module, "__file__", None)
                    and not Path(module.__file__).resolve().is_relative_to(snapshot))
    if running != snapshot or strays:
        return logging.WARNING, (f"code: {running}, NOT this run's snapshot {snapshot}"
                                 + (f" (modules from elsewhere: {', '.join(strays[:5])})" if strays else "")
                                 + f": this process was not started by launch.py's executor; start it with "
                                   f"PYTHONPATH={code} PYTHONSAFEPATH=1 to run the code the run was launched with")
    digest, files, size = code_hash(code)
    recorded, git = _recorded(run_dir)
    origin = f"copied from {recorded['source']}" if recorded.get("source") else "copied at launch"
    if git.get("sha"):
        origin += f" at git {str(git['sha'])[:12]}{' with uncommitted changes' if git.get('dirty') else ''}"
    if recorded.get("sha256") and recorded["sha256"] != digest:
        return logging.WARNING, (f"code: snapshot {code} sha256 {digest[:16]} ({files} files), EDITED since "
                                 f"launch (launch.json records {str(recorded['sha256'])[:16]})")
    return logging.INFO, f"code: snapshot {code} sha256 {digest[:16]} ({files} files, {size // 1024} KiB, {origin})"

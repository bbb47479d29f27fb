"""The schedules of infra/schedule/ fire real ingests: the cron entry, verbatim, run as cron runs it.

What is real: the installed crontab text (infra/schedule/ingest.cron, read as it is), its command run through
``/bin/sh -c`` with cron's minimal environment (HOME, LOGNAME, SHELL=/bin/sh, PATH=/usr/bin:/bin, plus the
crontab's own NAME=value lines) in $HOME, the wrapper infra/schedule/ingest.sh with its env file, and the ingest
itself (jobs/ingest.py with its own local Ray, real H.264 clips, a local dataset root) with its exit codes and
log. What is simulated: cron's clock. The test walks minutes of a made-up calendar and starts whatever the
crontab's time fields select at each (a cron daemon does the same against the wall clock); ``cron`` is not
installed here and a systemd timer cannot run in this container. Slurm's ``scrontab`` command is not in
Debian 12's slurm-client (slurmctld has the feature, behind ScronParameters=enable, but nothing here can
submit a crontab to it), so the scrontab entry is checked to run the same command as the cron line.

The story: clips appear, the 02:30 run commits version 1; the minutes around it start nothing; a new clip, the
next night's run is caught holding the lease (stopped with SIGSTOP) when the following night's run starts: that
one logs "skipped: another ingest run holds the dataset lease since ..." and exits 3, changing nothing; the
first, resumed, commits version 2; a night with nothing new commits nothing and exits 0."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.data.storage import open_storage
from pipeline.data.video import encode_video
from pipeline.ingest.run import LEASE_KEY

from ..unit.test_video import numbered_frames

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
SCHEDULE = REPO / "infra" / "schedule"


class CronTable:
    """A user crontab read as cron reads it: blank lines and ``#`` comments skipped, ``NAME=value`` lines
    set the jobs' environment, every other line is five time fields (minute hour day-of-month month
    day-of-week: ``*``, numbers, ``a-b``, lists, ``/step``; day of month and day of week restricted both:
    either matches) and a command, in which an unescaped ``%`` ends the command and starts its stdin."""

    RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]

    def __init__(self, text: str) -> None:
        self.env: dict[str, str] = {}
        self.entries: list[tuple[list[str], str]] = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$", line)  # a time field is never a name
            if m:
                self.env[m.group(1)] = m.group(2).strip().strip("'\"")
                continue
            fields = line.split(None, 5)
            assert len(fields) == 6, f"not a crontab entry: {line!r}"
            self.entries.append((fields[:5], fields[5]))

    @staticmethod
    def _values(field: str, lo: int, hi: int) -> set[int]:
        out: set[int] = set()
        for part in field.split(","):
            rng, _, step = part.partition("/")
            a, b = (lo, hi) if rng == "*" else (int(rng.partition("-")[0]), int(rng.partition("-")[2] or rng))
            out.update(range(a, b + 1, int(step or 1)))
        return out

    def due(self, when: dt.datetime) -> list[str]:
        now = [when.minute, when.hour, when.day, when.month, when.isoweekday() % 7]
        due = []
        for fields, command in self.entries:
            ok = [now[i] in self._values(f, *self.RANGES[i]) or (i == 4 and now[4] == 0 and 7 in self._values(
                f, *self.RANGES[4])) for i, f in enumerate(fields)]
            day_ok = (ok[2] or ok[4]) if fields[2] != "*" and fields[4] != "*" else (ok[2] and ok[4])
            if ok[0] and ok[1] and ok[3] and day_ok:
                due.append(command)
        return due

    def start(self, command: str, home: Path) -> subprocess.Popen:
        """The job as cron starts it: ``/bin/sh -c`` in $HOME with cron's environment and the crontab's."""
        parts = re.split(r"(?<!\\)%", command)
        cmd, stdin = parts[0].replace("\\%", "%"), "\n".join(parts[1:])
        user = os.environ.get("USER") or os.environ.get("LOGNAME") or "root"
        env = {"HOME": str(home), "LOGNAME": user, "USER": user, "SHELL": "/bin/sh", "PATH": "/usr/bin:/bin",
               **self.env}
        p = subprocess.Popen(["/bin/sh", "-c", cmd], cwd=env["HOME"], env=env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        p.stdin.write(stdin)
        p.stdin.close()
        return p


def clip(root: Path, name: str) -> None:
    path = root / "videos" / "walk" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_video(numbered_frames(6, 32, 48), fps=10))
    os.utime(path, (time.time() - 60, time.time() - 60))


@pytest.fixture
def installed(tmp_path):
    """A user's setup as the schedule files describe it: the checkout at ~/pipeline, the settings in
    ~/.config/pipeline/ingest.env, the crontab installed from infra/schedule/ingest.cron as it is."""
    home = tmp_path / "home"
    (home / ".config" / "pipeline").mkdir(parents=True)
    (home / "pipeline").symlink_to(REPO)
    config = tmp_path / "ingest.yaml"
    config.write_text("\n".join([
        "dataset: scheduled", "format: folder", f"source: {tmp_path / 'videos'}", f"output: {tmp_path / 'out'}",
        "samples_per_shard: 4", "max_in_flight: 2",
        "transcode: {short_side: 32, fps: 10, keyframe_interval: 4, min_frames: 1}", ""]))
    log = tmp_path / "logs" / "ingest.log"
    (home / ".config" / "pipeline" / "ingest.env").write_text(
        f"INGEST_CONFIG={config}\nPIPELINE_PYTHON={sys.executable}\nPIPELINE_INGEST_LOG={log}\n")
    return home, CronTable((SCHEDULE / "ingest.cron").read_text()), log


def versions(root: Path) -> list[str]:
    return sorted(o.key for o in open_storage(root / "out").list("indexes/"))


def night(day: int) -> dt.datetime:
    return dt.datetime(2025, 3, day, 2, 30)


def test_the_cron_entry_fires_ingests_skips_an_overlapping_run_and_commits_only_what_is_new(tmp_path, installed):
    home, table, log = installed
    assert len(table.entries) == 1
    clip(tmp_path, "a.mp4")
    clip(tmp_path, "b.mp4")

    def tick(when: dt.datetime) -> list[subprocess.Popen]:
        return [table.start(cmd, home) for cmd in table.due(when)]

    def log_since(offset: int) -> str:
        return log.read_text()[offset:] if log.exists() else ""

    # night 1: of the minutes 02:28..02:32 only 02:30 starts a run; it commits version 1
    started = [p for m in range(28, 33) for p in tick(night(1).replace(minute=m))]
    assert len(started) == 1
    assert started[0].wait(300) == 0, log_since(0) + started[0].stdout.read()
    assert versions(tmp_path) == ["indexes/v000001.json"]
    text = log_since(0)
    assert "ingest: scheduled run at" in text and "committed" in text and "2 videos" in text

    # night 2: a new clip; the run holds the lease and is stopped (a long run) when night 3's run starts
    clip(tmp_path, "c.mp4")
    offset = len(log.read_text())
    (long_run,) = tick(night(2))
    storage = open_storage(tmp_path / "out")
    deadline = time.time() + 120
    while not storage.exists(LEASE_KEY):
        assert long_run.poll() is None and time.time() < deadline, log_since(offset)
        time.sleep(0.05)
    holder = json.loads(storage.get_bytes(LEASE_KEY))
    pid = int(holder["owner"].split(":")[1])
    os.kill(pid, signal.SIGSTOP)
    try:
        offset3 = len(log.read_text())
        (overlapping,) = tick(night(3))
        assert overlapping.wait(120) == 3, log_since(offset3)
        skipped = log_since(offset3)
        assert re.search(r"ingest: skipped: another ingest run holds the dataset lease \S+lease\.json since "
                         r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d .*\(" + re.escape(holder["owner"]), skipped), skipped
        assert "Traceback" not in skipped and versions(tmp_path) == ["indexes/v000001.json"]
    finally:
        os.kill(pid, signal.SIGCONT)
    assert long_run.wait(300) == 0, log_since(offset)
    assert versions(tmp_path) == ["indexes/v000001.json", "indexes/v000002.json"]
    assert "3 videos" in log_since(offset) and not storage.exists(LEASE_KEY)

    # night 4: nothing new: exit 0, nothing committed (the sources' checksums from the cache: none read)
    assert storage.exists("sources-cache.json.gz")
    offset = len(log.read_text())
    (quiet,) = tick(night(4))
    assert quiet.wait(300) == 0, log_since(offset)
    assert "nothing to do: version 2 is up to date (3 videos)" in log_since(offset)
    assert versions(tmp_path) == ["indexes/v000001.json", "indexes/v000002.json"]


def test_every_schedule_runs_the_same_wrapper_and_the_wrapper_explains_a_missing_config(tmp_path):
    cron = CronTable((SCHEDULE / "ingest.cron").read_text())
    scron = CronTable((SCHEDULE / "ingest.scrontab").read_text())
    assert [c for _, c in scron.entries] == [c for _, c in cron.entries]
    assert "ExecStart=%h/pipeline/infra/schedule/ingest.sh" in (SCHEDULE / "pipeline-ingest.service").read_text()
    assert "SuccessExitStatus=3" in (SCHEDULE / "pipeline-ingest.service").read_text()
    home = tmp_path / "home"
    home.mkdir()
    (home / "pipeline").symlink_to(REPO)
    p = cron.start(cron.entries[0][1], home)  # no env file: told what to set, exit 2 (bad configuration)
    assert p.wait(60) == 2
    out = p.stdout.read()
    assert p.returncode == 2 and "INGEST_CONFIG is not set" in out

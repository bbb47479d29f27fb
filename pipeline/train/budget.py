"""GPU-hour accounting: allocated accelerators x wall time, accumulated across requeues and restarts,
persisted in the run directory (``gpu_hours.json``). On CPU the same account counts processes (ranks)
and says so in its ``unit``."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

FILE = "gpu_hours.json"


def clock() -> float:
    """The account's clock: wall time in seconds since the epoch. A seam for tests, which replace it (with
    ``monkeypatch.setattr(budget, "clock", ...)``) by a virtual clock that advances a fixed cost per step, so that
    what a budget decides does not depend on how loaded the machine is. Nothing in production replaces it."""
    return time.time()


FAKE_CLOCK_ENV = "PIPELINE_FAKE_CLOCK"


def fake_step_seconds() -> float | None:
    """A test seam for runs in other processes (sweep members): ``PIPELINE_FAKE_CLOCK=S`` makes a sweep member's
    account count ``S`` seconds per optimizer step of this attempt and nothing else (start-up, data, validation and
    the machine's load cost nothing), so halving decisions in a test do not depend on timing. Unset (always, in
    production) it is None and accounts count wall time."""
    text = os.environ.get(FAKE_CLOCK_ENV, "").strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{FAKE_CLOCK_ENV}={text!r}: expected seconds per optimizer step above 0 (a test seam: "
                         f"unset it outside tests)")
    return seconds


class GpuHours:
    def __init__(self, run_dir: Path, devices: int, unit: str, budget: float = 0.0,
                 start: float | None = None) -> None:
        self.path = Path(run_dir) / FILE
        self.devices, self.unit, self.budget = devices, unit, budget
        prior = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.prior_hours = float(prior.get("hours", 0.0))
        self.attempts = list(prior.get("attempts", []))
        self.start = start if start is not None else clock()
        self.attempts.append({"started": self.start, "devices": devices, "seconds": 0.0})

    @property
    def this_attempt_hours(self) -> float:
        return (clock() - self.start) * self.devices / 3600

    @property
    def hours(self) -> float:
        return self.prior_hours + self.this_attempt_hours

    @property
    def exhausted(self) -> bool:
        return self.budget > 0 and self.hours >= self.budget

    def state(self) -> dict[str, Any]:
        self.attempts[-1]["seconds"] = clock() - self.start
        return {"hours": self.hours, "unit": self.unit, "budget": self.budget, "attempts": self.attempts}

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state(), indent=1))
        tmp.replace(self.path)

"""GPU-hour accounting: allocated accelerators x wall time, accumulated across requeues and restarts,
persisted in the run directory (``gpu_hours.json``). On CPU the same account counts processes (ranks)
and says so in its ``unit``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

FILE = "gpu_hours.json"


class GpuHours:
    def __init__(self, run_dir: Path, devices: int, unit: str, budget: float = 0.0,
                 start: float | None = None) -> None:
        self.path = Path(run_dir) / FILE
        self.devices, self.unit, self.budget = devices, unit, budget
        prior = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.prior_hours = float(prior.get("hours", 0.0))
        self.attempts = list(prior.get("attempts", []))
        self.start = start or time.time()
        self.attempts.append({"started": self.start, "devices": devices, "seconds": 0.0})

    @property
    def this_attempt_hours(self) -> float:
        return (time.time() - self.start) * self.devices / 3600

    @property
    def hours(self) -> float:
        return self.prior_hours + self.this_attempt_hours

    @property
    def exhausted(self) -> bool:
        return self.budget > 0 and self.hours >= self.budget

    def state(self) -> dict[str, Any]:
        self.attempts[-1]["seconds"] = time.time() - self.start
        return {"hours": self.hours, "unit": self.unit, "budget": self.budget, "attempts": self.attempts}

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state(), indent=1))
        tmp.replace(self.path)

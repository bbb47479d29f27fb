"""Progress a person can follow where no progress bar shows (a batch job's log, cron's mail): durations as
people write them, and periodic progress lines."""

from __future__ import annotations

import logging
import time


def format_duration(seconds: float) -> str:
    """``1d02h``, ``1h05m``, ``4m07s``, ``12s``."""
    s = int(round(seconds))
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class ProgressLines:
    """Logs ``<what>: done/total <unit> (p%), <elapsed> elapsed, eta <t>`` at most every ``every_s`` seconds and
    at every tenth of the total, and once at the end: for runs whose output is a log, not a terminal."""

    def __init__(self, logger: logging.Logger, what: str, total: int, unit: str, every_s: float = 60.0,
                 clock=time.monotonic) -> None:
        self.log, self.what, self.total, self.unit, self.every_s, self.clock = logger, what, total, unit, every_s, clock
        self.t0 = self.last = clock()
        self.done = 0
        self.tenth = 0

    def update(self, n: int = 1, extra: str = "") -> None:
        self.done += n
        now = self.clock()
        tenth = 10 * self.done // max(self.total, 1)
        if self.done >= self.total or tenth > self.tenth or now - self.last >= self.every_s:
            self.tenth, self.last = tenth, now
            elapsed = now - self.t0
            eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
            self.log.info("%s: %d/%d %s (%.0f%%), %s elapsed, eta %s%s", self.what, self.done, self.total, self.unit,
                          100 * self.done / max(self.total, 1), format_duration(elapsed), format_duration(eta),
                          f"; {extra}" if extra else "")

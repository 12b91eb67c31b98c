"""Progress events: log records that carry a :class:`Tick`, which a display may turn into bars.

    ticker = Ticker(log, "infer")
    ticker.add(done=32)                                        # a DEBUG record at most every half second
    ticker.flush(logging.INFO, "inferred %d queries", total)   # the rest, on a record people read

Steps log these records anyway: on a distributed runner they land in the workers' logs; in-process,
the CLI's progress display (``runners/progress.py``) reads the ``progress`` attribute of each
record. No worker ever needs the driver, and no driver object travels into a DoFn. Beam-free.
"""

from __future__ import annotations

import logging
import time
from typing import NamedTuple


class Tick(NamedTuple):
    """Units of a stage finished since this emitter's last tick (a delta: emitters run in parallel)."""

    stage: str  # read (done: bytes, items: lines) | infer (done: queries) | write (done: shards, items: rows)
    done: int = 0
    total: int | None = None  # the stage's whole total, from the one step that knows it
    items: int = 0  # a second count of the stage: lines read, rows written
    skipped: int = 0  # units of the total that will not be done here: results reused instead of inferred


def tick(stage: str, **counts: int) -> dict:
    """``log.info("head: %d", n, extra=tick("infer", total=n))``: the ``extra`` of a progress record."""
    return {"progress": Tick(stage, **counts)}


class Ticker:
    """Accumulate a stage's counts; log them as a DEBUG Tick at most every ``interval`` seconds."""

    def __init__(self, logger: logging.Logger, stage: str, interval: float = 0.5):
        self.logger, self.stage, self.interval = logger, stage, interval
        self.done = self.items = self.skipped = 0
        self.last = time.monotonic()

    def add(self, done: int = 0, items: int = 0, skipped: int = 0) -> None:
        self.done, self.items, self.skipped = self.done + done, self.items + items, self.skipped + skipped
        if time.monotonic() - self.last >= self.interval:
            self.flush()

    def flush(self, level: int = logging.DEBUG, message: str = "progress", *args) -> None:
        """Log what is pending; at a level above DEBUG with a ``message`` that stands on its own."""
        pending = self.done or self.items or self.skipped
        if (pending or level > logging.DEBUG) and self.logger.isEnabledFor(level):
            counts = {"done": self.done, "items": self.items, "skipped": self.skipped}
            self.logger.log(level, message, *args, extra=tick(self.stage, **counts))
        self.done = self.items = self.skipped = 0
        self.last = time.monotonic()

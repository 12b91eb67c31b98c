"""The progress display of long commands: bars on stderr when it is a terminal, nothing otherwise.

    with progress_display(quiet=False) as progress:    # also fed by the Ticks that steps log
        copy = progress.stage("copy", total=n_bytes, unit="bytes")
        copy.advance(4096)                               # and for a training loop:
        train = progress.stage("train", total=steps, unit="steps")
        train.advance(1); train.note(f"loss {loss:.3f}")

While the display runs, log records that carry a :class:`transforms.progress.Tick` move the bars
(reading: bytes and lines; inference: queries of the head, rate and ETA; writing: shards and rows)
and every other record of level INFO or above prints above the bars. Where the workers run in
other processes (``live=False``) their Ticks cannot reach the driver: the display stays off and the
driver's log lines (stage transitions, the job's Beam metrics) are the progress.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Iterator
from typing import NamedTuple

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.progress import Task as RichTask
from rich.text import Text

from querycache.runners import human
from querycache.transforms.progress import Tick

FORMAT = "%(asctime)s %(levelname)s %(message)s"  # as runners.common.setup_logging
LOGGERS = ("querycache",)  # whose DEBUG Ticks the display asks for (every room logs under it)


class StageKind(NamedTuple):
    """How a stage is shown: its label, the unit of ``done``, and the words of its other counts."""

    label: str
    unit: str
    items: str = ""
    skipped: str = ""


STAGES = {
    "read": StageKind("reading", "bytes", items="lines"),
    "infer": StageKind("inference", "queries", skipped="reused"),
    "write": StageKind("writing", "shards", items="rows"),
}


class _Detail(ProgressColumn):
    """``5,000 of 18,000 queries · 2,134 queries/s · 2,000 reused``."""

    def render(self, task: RichTask) -> Text:
        f = task.fields
        unit = f["unit"]
        amount = human.size if unit == "bytes" else human.count
        text = amount(f["done"]) + (f" of {amount(f['total_left'])}" if f["total_left"] is not None else "")
        parts = [text if unit == "bytes" else f"{text} {unit}"]
        if f["items"]:
            parts.append(f"{human.count(f['item_count'])} {f['items']}")
        if task.speed and not task.finished:
            parts.append(f"{human.size(int(task.speed))}/s" if unit == "bytes" else human.rate(task.speed, unit))
        if f["skipped_count"]:
            parts.append(f"{human.count(f['skipped_count'])} {f['skipped']}")
        if f["note"]:
            parts.append(f["note"])
        return Text(" \N{MIDDLE DOT} ".join(parts), no_wrap=True, overflow="ellipsis")


class Stage:
    """One bar: ``stage.advance(n, items=lines)``, ``stage.update(total=n)``. Counts even when nothing is drawn."""

    def __init__(self, progress: Progress | None, task: TaskID | None, total: int | None = None):
        self._progress, self._task, self._lock = progress, task, threading.Lock()
        self.done, self.total, self.items, self.skipped = 0, total, 0, 0

    def advance(self, done: int = 0, items: int = 0, skipped: int = 0) -> None:
        with self._lock:
            self.done, self.items, self.skipped = self.done + done, self.items + items, self.skipped + skipped
        self._show()

    def update(self, total: int | None) -> None:
        with self._lock:
            self.total = total
        self._show()

    def note(self, text: str) -> None:
        """A short figure after the counts, such as ``loss 2.31``."""
        if self._progress is not None:
            self._progress.update(self._task, note=text)

    def _show(self) -> None:
        if self._progress is None:
            return
        total = None if self.total is None else max(self.total - self.skipped, 0)
        bar = (1, 1) if total == 0 and self.skipped else (self.done, total)  # all reused: a full bar
        self._progress.update(
            self._task, completed=bar[0], total=bar[1], done=self.done, total_left=total,
            item_count=self.items, skipped_count=self.skipped,
        )  # fmt: skip


class Display:
    """The bars of one command; ``enabled`` is False where nothing may be drawn."""

    def __init__(self, console: Console | None = None):
        self.console = console
        self.enabled = console is not None
        self._progress = (
            Progress(
                TextColumn("{task.description:<10}"),
                BarColumn(bar_width=20),
                TaskProgressColumn(),
                _Detail(),
                TimeRemainingColumn(compact=True, elapsed_when_finished=True),
                console=console,
                redirect_stdout=False,  # stdout may carry --json
                refresh_per_second=4,
            )
            if console is not None
            else None
        )
        self.stages: dict[str, Stage] = {}
        self._lock = threading.Lock()

    def stage(self, name: str, total: int | None = None, unit: str | None = None) -> Stage:
        """The bar of stage ``name`` (made on first use; known stages carry their own unit and words)."""
        with self._lock:
            if name not in self.stages:
                kind = STAGES.get(name) or StageKind(name, unit or "steps")
                task = None
                if self._progress is not None:
                    task = self._progress.add_task(
                        kind.label, total=total, unit=kind.unit, items=kind.items, item_count=0,
                        skipped=kind.skipped, skipped_count=0, done=0, total_left=total, note="",
                    )  # fmt: skip
                self.stages[name] = Stage(self._progress, task, total)
                return self.stages[name]
        if total is not None:
            self.stages[name].update(total)
        return self.stages[name]

    def tick(self, event: Tick) -> None:
        """Apply one Tick that a step logged."""
        stage = self.stage(event.stage, total=event.total)
        if event.done or event.items or event.skipped:
            stage.advance(event.done, event.items, event.skipped)


class _TickHandler(logging.Handler):
    """Ticks move the bars; any other record at INFO or above prints above them."""

    def __init__(self, display: Display, formatter: logging.Formatter | None, filters: list):
        super().__init__(logging.DEBUG)
        self.display = display
        self.setFormatter(formatter)
        for f in filters:
            self.addFilter(f)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event = getattr(record, "progress", None)
            if isinstance(event, Tick):
                self.display.tick(event)
            elif record.levelno >= logging.INFO:
                self.display.console.print(self.format(record), markup=False, highlight=False, soft_wrap=True)
        except Exception:  # noqa: BLE001 - a display must never fail the command
            self.handleError(record)


def terminal() -> Console | None:
    """A console on stderr when stderr is an interactive terminal (not a pipe, file or dumb terminal)."""
    if not getattr(sys.stderr, "isatty", lambda: False)():  # not rich's check alone: FORCE_COLOR forces it
        return None
    console = Console(stderr=True)
    return console if console.is_terminal and not console.is_dumb_terminal else None


@contextlib.contextmanager
def progress_display(quiet: bool = False, live: bool = True, console: Console | None = None) -> Iterator[Display]:
    """Bars on stderr for the duration of the block; off with ``quiet``, without a terminal, or when not ``live``.

    ``live`` says whether the steps run in this process (their Ticks reach this display).
    """
    console = console or (None if quiet else terminal())
    display = Display(console if live else None)
    if not display.enabled:
        yield display
        return
    root = logging.getLogger()
    replaced = [h for h in root.handlers if _on_stderr(h)]  # other handlers (files, pytest's) keep working
    formatter = replaced[0].formatter if replaced else logging.Formatter(FORMAT, "%H:%M:%S")
    handler = _TickHandler(display, formatter, [f for h in replaced for f in h.filters])
    levels = {name: logging.getLogger(name).level for name in LOGGERS}
    for h in replaced:
        root.removeHandler(h)
    root.addHandler(handler)
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        with display._progress:
            yield display
    finally:
        root.removeHandler(handler)
        for h in replaced:
            root.addHandler(h)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _on_stderr(handler: logging.Handler) -> bool:
    return type(handler) is logging.StreamHandler and getattr(handler, "stream", None) in (sys.stderr, sys.__stderr__)

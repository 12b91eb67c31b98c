"""One dynamic batcher for the misses of every request: a queue, the engine on its own thread.

Requests put their missing keys on the queue and wait. The engine thread takes what is queued,
everything that piled up while its previous round ran (no wait timer: an idle server answers a
lone miss at once), up to ``max_round`` queries, answers the distinct keys in one
:meth:`Engine.run` (sorted by length, cut into batches by the token budget) and hands each request
its answers. Under load, rounds grow and the model runs full batches.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from querycache.inference import Engine

log = logging.getLogger(__name__)
_STOP = None


@dataclass
class Took:
    """Seconds a request's misses waited in the queue and their engine rounds ran (tokenizing included)."""

    queue: float = 0.0
    inference: float = 0.0


@dataclass
class RoundStats:
    """Counters over every round so far."""

    rounds: int = 0
    queries: int = 0
    tokens: int = 0
    largest: int = 0


class Batcher:
    """``batcher(keys) -> answers``: a read-through cache's fallback that batches across requests."""

    def __init__(self, engine: Engine, max_round: int = 1024):
        self.engine, self.max_round = engine, max_round
        self.fingerprint = engine.fingerprint  # the cache serves the snapshot only when this is its model version
        self.stats = RoundStats()
        # called on the engine thread after each round: (queries, tokens, seconds, each request's wait,
        # requests queued for the next round)
        self.on_round: Callable[[int, int, float, list[float], int], None] | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._local = threading.local()  # the Took of a thread's :meth:`timed` block
        self._thread = threading.Thread(target=self._loop, name="querycache-batcher", daemon=True)
        self._thread.start()

    def __call__(self, keys: list[str]) -> list[Any]:
        """Answers for ``keys`` in order; blocks the calling thread until its round has run."""
        future: Future = Future()
        self._queue.put((keys, future, time.perf_counter()))
        answers, queued, ran = future.result()
        took = getattr(self._local, "took", None)
        if took is not None:
            took.queue += queued
            took.inference += ran
        return answers

    @contextlib.contextmanager
    def timed(self) -> Iterator[Took]:
        """What the calling thread's calls in the block waited for and ran for."""
        self._local.took = took = Took()
        try:
            yield took
        finally:
            self._local.took = None

    def queued(self) -> int:
        """Requests waiting for a round."""
        return self._queue.qsize()

    def close(self) -> None:
        """Answer what is queued, then stop the engine thread."""
        self._queue.put(_STOP)
        self._thread.join()

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            waiting = [self._queue.get()]
            size = 0 if waiting[0] is _STOP else len(waiting[0][0])
            while size < self.max_round:
                try:
                    waiting.append(self._queue.get_nowait())
                except queue.Empty:
                    break
                size += 0 if waiting[-1] is _STOP else len(waiting[-1][0])
            stopping = _STOP in waiting
            self._answer([item for item in waiting if item is not _STOP])

    def _answer(self, waiting: list[tuple[list[str], Future, float]]) -> None:
        if not waiting:
            return
        started = time.perf_counter()
        keys = list(dict.fromkeys(key for wanted, _, _ in waiting for key in wanted))  # each key computed once
        try:
            results, stats = self.engine.run(keys)
        except Exception as err:  # noqa: BLE001 - each waiting request gets the engine's error
            log.exception("the engine failed on a round of %d keys", len(keys))
            for _, future, _ in waiting:
                future.set_exception(err)
            return
        self.stats.rounds += 1
        self.stats.queries += len(keys)
        self.stats.tokens += stats.tokens
        self.stats.largest = max(self.stats.largest, len(keys))
        if self.on_round is not None:
            waits = [started - queued for _, _, queued in waiting]
            self.on_round(len(keys), stats.tokens, stats.seconds, waits, self.queued())
        answers = dict(zip(keys, results))
        for wanted, future, queued in waiting:
            future.set_result(([answers[key] for key in wanted], started - queued, stats.seconds))

"""A read-through cache for services: snapshot hits, model fallback on misses, hot reload.

    cache = ReadThroughCache("/data/qc", fallback=engine)   # engine: callable(list[str]) -> list
    cache.get("cheap flights to paris")                     # snapshot hit, LRU hit, or fallback
    cache.metrics()                                         # {"hits": ..., "misses": ..., ...}

The fallback receives normalised keys, the same text the snapshot's answers were computed from.
If it has a ``fingerprint`` attribute that differs from the snapshot's model fingerprint, the
snapshot is not used for answers. ``CURRENT`` is checked every ``check_every`` lookups or
``check_seconds`` seconds; a new snapshot is opened (and verified) before the old one is dropped,
and one that fails to open is reported and skipped while the old one keeps serving.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from store.format import SnapshotError
from store.keys import normalize
from store.publish import CURRENT, current_id
from store.snapshot import Snapshot

log = logging.getLogger(__name__)
Fallback = Callable[[list[str]], Sequence[Any]]


class ReadThroughCache:
    """Serve lookups from the current snapshot of ``root``; send misses to ``fallback``."""

    def __init__(
        self,
        root: str | os.PathLike,
        fallback: Fallback | None = None,
        *,
        lru_size: int = 100_000,
        check_every: int = 1024,
        check_seconds: float = 1.0,
        verify: bool = True,
    ):
        self.root = Path(root)
        self.fallback = fallback
        self.lru_size = lru_size
        self.check_every, self.check_seconds, self.verify = check_every, check_seconds, verify
        self._lru: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._retired: Snapshot | None = None  # closed at the next reload, after in-flight lookups
        self._usable = False
        self._pointer: tuple[int, int] | None = None
        self._failed_id: str | None = None
        self._until_check = 0
        self._next_check = 0.0
        self._counts = dict.fromkeys(
            (
                "hits",
                "lru_hits",
                "misses",
                "fallback_calls",
                "fallback_queries",
                "fallback_errors",
                "reloads",
                "reload_failures",
            ),
            0,
        )
        self._seconds = {"lookup_seconds": 0.0, "fallback_seconds": 0.0}
        self._last_error: str | None = None
        self._maybe_reload(force=True)

    # -- lookups -------------------------------------------------------------------------------
    def get(self, query: str) -> Any:
        """Result for one query: from the snapshot, the LRU, or the fallback (None without one)."""
        return self.get_many([query])[0]

    def get_many(self, queries: Sequence[str]) -> list[Any]:
        """Results for several queries; all misses go to the fallback in one call."""
        start = time.perf_counter()
        self._maybe_reload()
        keys = [normalize(q) for q in queries]
        results: list[Any] = [None] * len(keys)
        missing: dict[str, list[int]] = {}
        snap = self._snapshot if self._usable else None
        with self._lock:
            for i, key in enumerate(keys):
                value = snap.get_key(key) if snap is not None else None
                if value is not None:
                    self._counts["hits"] += 1
                elif key in self._lru:
                    self._lru.move_to_end(key)
                    value = self._lru[key]
                    self._counts["lru_hits"] += 1
                else:
                    self._counts["misses"] += 1
                    missing.setdefault(key, []).append(i)
                results[i] = value
        if missing and self.fallback is not None:
            for key, value in zip(missing, self._call_fallback(list(missing))):
                for i in missing[key]:
                    results[i] = value
        self._seconds["lookup_seconds"] += time.perf_counter() - start
        return results

    def _call_fallback(self, keys: list[str]) -> Sequence[Any]:
        start = time.perf_counter()
        self._counts["fallback_calls"] += 1
        self._counts["fallback_queries"] += len(keys)
        try:
            values = self.fallback(keys)
        except Exception:
            self._counts["fallback_errors"] += 1
            raise
        finally:
            self._seconds["fallback_seconds"] += time.perf_counter() - start
        with self._lock:
            for key, value in zip(keys, values):
                self._lru[key] = value
                self._lru.move_to_end(key)
            while len(self._lru) > self.lru_size:
                self._lru.popitem(last=False)
        return values

    # -- reload --------------------------------------------------------------------------------
    def _maybe_reload(self, force: bool = False) -> None:
        self._until_check -= 1
        if not force and self._until_check > 0 and time.monotonic() < self._next_check:
            return
        self._until_check, self._next_check = self.check_every, time.monotonic() + self.check_seconds
        if not self._reload_lock.acquire(blocking=False):
            return  # another thread is checking; keep serving what we have
        try:
            self._reload(force)
        finally:
            self._reload_lock.release()

    def _reload(self, force: bool) -> None:
        try:
            st = os.stat(self.root / CURRENT)
            pointer = (st.st_ino, st.st_mtime_ns)
        except FileNotFoundError:
            pointer = None
        if pointer == self._pointer and not force:
            return
        self._pointer = pointer
        snapshot_id = current_id(self.root)
        if snapshot_id is None or (self._snapshot is not None and snapshot_id == self._snapshot.id):
            return
        if snapshot_id == self._failed_id:
            return
        try:
            fresh = Snapshot.open(self.root, verify=self.verify)
        except SnapshotError as err:
            self._counts["reload_failures"] += 1
            self._failed_id, self._last_error = snapshot_id, str(err)
            log.error("keeping snapshot %s: %s", self._snapshot.id if self._snapshot else None, err)
            return
        if self._retired is not None:
            self._retired.close()
        self._retired, self._snapshot = self._snapshot, fresh
        self._usable = self._fingerprint_matches(fresh)
        if self._retired is not None:
            self._counts["reloads"] += 1
        log.info(
            "serving snapshot %s (%d rows)%s",
            fresh.id,
            len(fresh),
            "" if self._usable else "; model fingerprint differs from the fallback's, answering through it",
        )

    def _fingerprint_matches(self, snap: Snapshot) -> bool:
        fingerprint = getattr(self.fallback, "fingerprint", None)
        return fingerprint is None or fingerprint == snap.manifest["model"]["fingerprint"]

    # -- introspection -------------------------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        """Counters and state as a flat dict, ready for a metrics library."""
        snap = self._snapshot
        lookups = self._counts["hits"] + self._counts["lru_hits"] + self._counts["misses"]
        return {
            **self._counts,
            **self._seconds,
            "lookups": lookups,
            "hit_rate": self._counts["hits"] / lookups if lookups else 0.0,
            "lru_size": len(self._lru),
            "snapshot_id": snap.id if snap else None,
            "snapshot_in_use": self._usable,
            "fingerprint_mismatch": snap is not None and not self._usable,
            "last_error": self._last_error,
        }

    def close(self) -> None:
        for snap in (self._snapshot, self._retired):
            if snap is not None:
                snap.close()
        self._snapshot = self._retired = None

    def __enter__(self) -> ReadThroughCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

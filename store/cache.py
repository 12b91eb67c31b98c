"""A read-through cache for services: snapshot hits, model fallback on misses, hot reload.

    cache = ReadThroughCache("/data/qc", fallback=engine)   # engine: callable(list[str]) -> list
    cache.get("cheap flights to paris")                     # snapshot hit, LRU hit, or fallback
    cache.metrics()                                         # {"hits": ..., "misses": ..., ...}

The fallback receives normalised keys, the same text the snapshot's answers were computed from.
If it has a ``fingerprint`` attribute that differs from the snapshot's model fingerprint, the
snapshot is not used for answers. ``CURRENT`` is checked (one ``stat``) every ``check_every``
lookups or ``check_seconds`` seconds; a new snapshot is opened and verified on a background thread
while lookups go on from the old one, which is closed once no lookup holds it. A snapshot that
fails to open is reported and skipped while the old one keeps serving. ``refresh()`` switches now.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from querycache.store.format import SnapshotError
from querycache.store.keys import normalize_all, not_text
from querycache.store.publish import CURRENT, current_id
from querycache.store.snapshot import Snapshot

log = logging.getLogger(__name__)
Fallback = Callable[[list[str]], Sequence[Any]]
_caches: weakref.WeakSet = weakref.WeakSet()
COUNTS = (  # the counters of ReadThroughCache.metrics()
    "hits",
    "lru_hits",
    "misses",
    "invalid",
    "fallback_calls",
    "fallback_queries",
    "fallback_errors",
    "reloads",
    "reload_failures",
)


class Lookup(NamedTuple):
    """Results of :meth:`ReadThroughCache.lookup`: in query order, how many of them came from the
    snapshot, its id (None when no snapshot answered: none published, or another model version), and
    the normalised keys the results belong to."""

    results: list[Any]
    hits: int
    snapshot_id: str | None
    keys: list[str]


class Partial(NamedTuple):
    """What :meth:`ReadThroughCache.known` found, and which keys (at which positions) still need the fallback."""

    found: Lookup
    missing: dict[str, list[int]]
    started: float


class ReadThroughCache:
    """Serve lookups from the current snapshot of ``root``; send misses to ``fallback``.

    Only snapshots of model version ``fingerprint`` answer (default: the fallback's ``fingerprint``
    attribute; None: any snapshot). The counters of :meth:`metrics` are kept in ``counts`` where
    given (a mapping other processes can read), else in a dict.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        fallback: Fallback | None = None,
        *,
        lru_size: int = 100_000,
        check_every: int = 1024,
        check_seconds: float = 1.0,
        verify: bool = True,
        fingerprint: str | None = None,
        counts: MutableMapping[str, float] | None = None,
    ):
        self.root = Path(root)
        self.fallback = fallback
        self.fingerprint = fingerprint or getattr(fallback, "fingerprint", None)
        self.lru_size = lru_size
        self.check_every, self.check_seconds, self.verify = check_every, check_seconds, verify
        self._lru: OrderedDict[str, Any] = OrderedDict()
        self._new_locks()
        self._snapshot: Snapshot | None = None
        self._leases: Counter = Counter()  # snapshot -> lookups holding it; a retired one closes at 0
        self._usable = False
        self._pointer: tuple[int, int] | None = None
        self._failed_id: str | None = None
        self._until_check = 0
        self._next_check = 0.0
        self._counts = counts if counts is not None else {}
        for name in COUNTS:
            self._counts[name] = 0
        self._seconds = {"lookup_seconds": 0.0, "fallback_seconds": 0.0}
        self._last_error: str | None = None
        _caches.add(self)
        self.refresh(force=True)

    def _new_locks(self) -> None:
        self._lock = threading.Lock()  # the LRU and the counters
        self._state_lock = threading.Lock()  # which snapshot serves, and its leases
        self._reload_lock = threading.Lock()  # one reload at a time

    # -- lookups -------------------------------------------------------------------------------
    def get(self, query: str) -> Any:
        """Result for one query: from the snapshot, the LRU, or the fallback (None without one)."""
        if not isinstance(query, str):
            raise not_text(query)
        return self.get_many([query])[0]

    def get_many(self, queries: Sequence[str]) -> list[Any]:
        """Results for several queries; all misses go to the fallback in one call.

        A query whose key is empty (``""``, whitespace) is None, counted as ``invalid``, never sent to
        the fallback. Anything but a list of ``str`` is a ``TypeError``.
        """
        return self.lookup(queries).results

    def lookup(self, queries: Sequence[str]) -> Lookup:
        """:meth:`get_many`, with how many results came from the snapshot and which snapshot that was."""
        return self.complete(self.known(queries))

    def known(self, queries: Sequence[str]) -> Partial:
        """The answers the snapshot and the LRU hold, without calling the fallback (so without blocking).

        :meth:`complete` fills in the rest; ``known`` then ``complete`` is :meth:`lookup`. An event
        loop answers hits itself and sends only a partial with ``missing`` keys to a worker thread.
        """
        start = time.perf_counter()
        self._maybe_reload()
        keys = normalize_all(queries)
        snap, usable = self._lease()
        try:
            found = [snap.get_key(k) for k in keys] if usable else [None] * len(keys)
        finally:
            self._release(snap)
        hits = sum(value is not None for value in found)  # not found.count(None): == on an array is elementwise
        results: list[Any] = [None] * len(keys)
        missing: dict[str, list[int]] = {}
        with self._lock:
            for i, (key, value) in enumerate(zip(keys, found)):
                if value is not None:
                    self._counts["hits"] += 1
                elif not key:  # not a query (store.keys.is_query): no answer exists, none is computed
                    self._counts["invalid"] += 1
                elif key in self._lru:
                    self._lru.move_to_end(key)
                    value = self._lru[key]
                    self._counts["lru_hits"] += 1
                else:
                    self._counts["misses"] += 1
                    missing.setdefault(key, []).append(i)
                results[i] = value
        missing = missing if self.fallback is not None else {}
        return Partial(Lookup(results, hits, snap.id if usable else None, keys), missing, start)

    def complete(self, partial: Partial) -> Lookup:
        """The lookup of :meth:`known`, its missing keys answered by the fallback in one call."""
        results = partial.found.results
        if partial.missing:
            for key, value in zip(partial.missing, self._call_fallback(list(partial.missing))):
                for i in partial.missing[key]:
                    results[i] = value
        with self._lock:
            self._seconds["lookup_seconds"] += time.perf_counter() - partial.started
        return partial.found

    def reuse(self, snapshot_id: str, hits: int) -> bool:
        """Whether answers of snapshot ``snapshot_id`` may be given again now (it is the one answering);
        if so they count as ``hits`` hits. ``CURRENT`` is checked as on a lookup."""
        self._maybe_reload()
        snap = self._snapshot
        if snap is None or snap.id != snapshot_id or not self._usable:
            return False
        with self._lock:
            self._counts["hits"] += hits
        return True

    def _lease(self) -> tuple[Snapshot | None, bool]:
        """The serving snapshot, held open until :meth:`_release`."""
        with self._state_lock:
            snap = self._snapshot
            if snap is not None:
                self._leases[snap] += 1
            return snap, self._usable and snap is not None

    def _release(self, snap: Snapshot | None) -> None:
        if snap is None:
            return
        with self._state_lock:
            self._leases[snap] -= 1
            retired = self._leases[snap] <= 0 and snap is not self._snapshot
            if retired:
                del self._leases[snap]
        if retired:
            snap.close()

    def _call_fallback(self, keys: list[str]) -> Sequence[Any]:
        start = time.perf_counter()
        try:
            values = self.fallback(keys)
        except Exception:
            with self._lock:
                self._counts["fallback_errors"] += 1
            raise
        finally:
            with self._lock:
                self._counts["fallback_calls"] += 1
                self._counts["fallback_queries"] += len(keys)
                self._seconds["fallback_seconds"] += time.perf_counter() - start
        with self._lock:
            for key, value in zip(keys, values):
                self._lru[key] = value
                self._lru.move_to_end(key)
            while len(self._lru) > self.lru_size:
                self._lru.popitem(last=False)
        return values

    # -- reload --------------------------------------------------------------------------------
    def refresh(self, force: bool = False) -> None:
        """Check ``CURRENT`` now and switch to a new snapshot before returning (lookups go on meanwhile)."""
        with self._reload_lock:
            self._reload(force)

    def _maybe_reload(self) -> None:
        """On the request path: a counter, a clock and at most one ``stat``; the reload runs elsewhere."""
        self._until_check -= 1
        if self._until_check > 0 and time.monotonic() < self._next_check:
            return
        self._until_check, self._next_check = self.check_every, time.monotonic() + self.check_seconds
        if self._pointer_now() != self._pointer and self._reload_lock.acquire(blocking=False):
            threading.Thread(target=self._reload_in_background, name="querycache-reload", daemon=True).start()

    def _reload_in_background(self) -> None:
        try:
            self._reload(False)
        except Exception:  # noqa: BLE001 - a failed reload must not end the service: log it, keep serving
            log.exception("reloading %s failed; keeping snapshot %s", self.root, self.metrics()["snapshot_id"])
        finally:
            self._reload_lock.release()

    def _pointer_now(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.root / CURRENT)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    def _reload(self, force: bool) -> None:
        pointer = self._pointer_now()
        if pointer == self._pointer and not force:
            return
        self._pointer = pointer
        try:
            snapshot_id = current_id(self.root)
            if snapshot_id is None or snapshot_id == self._failed_id:
                return
            if self._snapshot is not None and snapshot_id == self._snapshot.id:
                return
            fresh = Snapshot.open(self.root, verify=self.verify)
        except SnapshotError as err:
            with self._lock:
                self._counts["reload_failures"] += 1
            self._failed_id, self._last_error = current_id_or_none(self.root), str(err)
            log.error("keeping snapshot %s: %s", self._snapshot.id if self._snapshot else None, err)
            return
        usable = self._fingerprint_matches(fresh)
        with self._state_lock:
            old, self._snapshot, self._usable = self._snapshot, fresh, usable
            idle = old is not None and self._leases[old] <= 0
            if idle:
                del self._leases[old]
        if idle:
            old.close()
        if old is not None:
            with self._lock:
                self._counts["reloads"] += 1
        log.info(
            "serving snapshot %s (%d rows)%s",
            fresh.id,
            len(fresh),
            "" if usable else "; its model version is not the one served: not answering from it",
        )

    def _fingerprint_matches(self, snap: Snapshot) -> bool:
        return self.fingerprint is None or self.fingerprint == snap.manifest["model"]["fingerprint"]

    # -- introspection -------------------------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        """Counters and state as a flat dict, ready for a metrics library.

        ``lookups`` (and ``hit_rate``) count queries: ``hits + lru_hits + misses``; ``invalid`` counts
        the lookups of text whose key is empty, apart.
        """
        snap = self._snapshot
        lookups = self._counts["hits"] + self._counts["lru_hits"] + self._counts["misses"]
        return {
            **self._counts,
            **self._seconds,
            "lookups": lookups,
            "hit_rate": self._counts["hits"] / lookups if lookups else 0.0,
            "lru_size": len(self._lru),
            "snapshot_id": snap.id if snap else None,
            "snapshot_created": snap.manifest.get("created") if snap else None,
            "snapshot_in_use": self._usable,
            "fingerprint_mismatch": snap is not None and not self._usable,
            "last_error": self._last_error,
        }

    def close(self) -> None:
        with self._state_lock:
            snap, self._snapshot = self._snapshot, None
        if snap is not None:
            snap.close()
        _caches.discard(self)

    def __enter__(self) -> ReadThroughCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def current_id_or_none(root: Path) -> str | None:
    try:
        return current_id(root)
    except SnapshotError:
        return None


def _after_fork_in_child() -> None:
    # A lock held by another thread at fork time stays held forever in the child: make new ones.
    for cache in list(_caches):
        cache._new_locks()


os.register_at_fork(after_in_child=_after_fork_in_child)

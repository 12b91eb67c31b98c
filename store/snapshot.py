"""Read a published snapshot: memory-mapped LMDB lookups by normalised key.

    snap = Snapshot.open("/data/qc")          # a root (follows CURRENT) or one snapshot directory
    snap.get("Cheap Flights  to Paris")       # the result, or None
    snap.manifest["model"]["fingerprint"]

Needs lmdb, pyarrow and numpy only. Environments are opened read-only without locks and shared
by every ``Snapshot`` over the same files in a process (py-lmdb refuses a second open); each thread
keeps one long-lived read transaction, so a lookup does no setup. After ``os.fork`` the child reopens.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import pyarrow.parquet as pq

from querycache.store.format import (
    EMBED_DTYPES,
    SnapshotError,
    check_files,
    decode_value,
    lmdb_shard_path,
    read_manifest,
    shard_of,
)
from querycache.store.keys import key_bytes, normalize, query_key, query_keys, query_list
from querycache.store.publish import resolve

_envs: dict[str, list] = {}  # real path -> [environment, users]
_envs_lock = threading.Lock()
_verified: set[tuple[str, str]] = set()  # (real path, snapshot id) whose checksums held in this process
_open_snapshots: weakref.WeakSet = weakref.WeakSet()


def _acquire(path: str) -> lmdb.Environment:
    with _envs_lock:
        entry = _envs.get(path)
        if entry is None:
            env = lmdb.open(path, readonly=True, lock=False, subdir=True, max_readers=1024)
            entry = _envs[path] = [env, 0]
        entry[1] += 1
        return entry[0]


def _release(path: str) -> None:
    with _envs_lock:
        entry = _envs.get(path)
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                del _envs[path]
                entry[0].close()


def _after_fork_in_child() -> None:
    # LMDB handles must not cross a fork: close the inherited ones (read-only, lock-free: this only
    # unmaps the child's copy) and let every open Snapshot reopen its shards. The registry lock may
    # have been held by another thread at fork time, and would stay held forever: make a new one.
    global _envs_lock
    _envs_lock = threading.Lock()
    for env, _ in _envs.values():
        env.close()
    _envs.clear()
    for snap in list(_open_snapshots):
        snap._attach()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Snapshot:
    """One immutable snapshot, opened for lookups. Use :meth:`open`."""

    def __init__(self, directory: Path, manifest: dict):
        self.directory = directory
        self.manifest = manifest
        self.id: str = manifest["snapshot_id"]
        self._schema = manifest["result"]
        embed_dtype = EMBED_DTYPES.get(self._schema["encoding"])  # hot path: skip decode_value's dispatch
        self._dtype = np.dtype(embed_dtype) if embed_dtype else None
        # decode(value, how), both positional: np.frombuffer(value, dtype) or decode_value(value, schema)
        self._decode, self._how = (np.frombuffer, self._dtype) if embed_dtype else (decode_value, self._schema)
        self._shards = manifest["lmdb"]["shards"]
        self._paths = [os.path.realpath(directory / lmdb_shard_path(i, self._shards)) for i in range(self._shards)]
        self._closed = False
        self._attach()
        _open_snapshots.add(self)

    @classmethod
    def open(cls, path: str | os.PathLike, *, verify: bool = True) -> Snapshot:
        """Open ``path``: a root holding ``CURRENT``, or one snapshot directory.

        The manifest is validated and every data file's size checked; with ``verify`` (the default)
        every sha256 too, once per snapshot and process. Raises :class:`SnapshotError` if anything fails.
        """
        directory = resolve(path)
        manifest = read_manifest(directory)
        seen = (os.path.realpath(directory), manifest["snapshot_id"])
        problems = check_files(directory, manifest, checksums=verify and seen not in _verified)
        if problems:
            raise SnapshotError(f"snapshot {directory} is corrupt: " + "; ".join(problems))
        if verify:
            _verified.add(seen)
        return cls(directory, manifest)

    def _attach(self) -> None:
        self._envs = [_acquire(p) for p in self._paths]
        self._local = threading.local()

    def _txns(self) -> list[lmdb.Transaction]:
        """This thread's read transactions, one per shard, begun on first use."""
        if self._closed:
            raise SnapshotError(f"snapshot {self.id} is closed")
        if not hasattr(self._local, "txns"):
            self._local.txns = [env.begin(buffers=False) for env in self._envs]
        return self._local.txns

    def get_raw(self, key: str) -> bytes | None:
        """Encoded value stored for a normalised ``key``, or None (always for the empty key)."""
        raw = key_bytes(key)
        if not raw:  # not a query (store.keys.is_query), and LMDB refuses empty keys
            return None
        try:
            txns = self._local.txns
        except AttributeError:
            txns = self._txns()
        return txns[shard_of(raw, self._shards) if self._shards > 1 else 0].get(raw)

    def get_key(self, key: str) -> Any:
        """Result for an already normalised ``key``, or None (embeddings: read-only numpy arrays)."""
        raw = self.get_raw(key)
        return None if raw is None else self._decode(raw, self._how)

    def get(self, query: str) -> Any:
        """Result for ``query`` (normalised here with the snapshot's key function), or None."""
        raw = query_key(query)  # one frame per step on the hot path: key, transaction, get, decode
        if not raw:  # not a query (store.keys.is_query), and LMDB refuses empty keys
            return None
        try:
            txns = self._local.txns
        except AttributeError:
            txns = self._txns()
        value = txns[0 if self._shards == 1 else shard_of(raw, self._shards)].get(raw)
        return None if value is None else self._decode(value, self._how)

    def get_many(self, queries: Iterable[str]) -> list[Any]:
        """Results for several queries in order, None where absent; faster than a loop of :meth:`get`.

        Keys are folded in one pass, looked up without a copy each, and embeddings decoded as one
        block: the arrays returned are read-only rows of one buffer.
        """
        raws = query_keys(query_list(queries))
        if self._dtype is None:  # JSON results: decode one by one
            return [None if v is None else decode_value(v, self._schema) for v in self._lookup(raws, self._txns())]
        try:
            views = self._local.views
        except AttributeError:  # buffers=True: values are views into the map, copied once by the join
            views = self._local.views = [env.begin(buffers=True) for env in self._txns_envs()]
        values = self._lookup(raws, views)
        found = [v for v in values if v is not None]  # not values.count(None): == on a memoryview is slow
        if not found:
            return [None] * len(values)
        block = list(np.frombuffer(b"".join(found), self._dtype).reshape(len(found), -1))
        if len(found) == len(values):
            return block
        rows = iter(block)
        return [None if v is None else next(rows) for v in values]

    def _txns_envs(self) -> list[lmdb.Environment]:
        self._txns()  # raises when closed
        return self._envs

    def _lookup(self, raws: list[bytes], txns: list[lmdb.Transaction]) -> list:
        if self._shards == 1 and b"" not in raws:
            return list(map(txns[0].get, raws))
        # empty keys are not queries (store.keys.is_query), and LMDB refuses them
        return [txns[shard_of(raw, self._shards)].get(raw) if raw else None for raw in raws]

    def __contains__(self, query: str) -> bool:
        return self.get_raw(normalize(query)) is not None

    def __len__(self) -> int:
        return int(self.manifest["rows"])

    def __iter__(self) -> Iterator[str]:
        """Every key, shard by shard (read from the Parquet files)."""
        for rel in self.manifest["parquet"]:
            yield from pq.read_table(self.directory / rel, columns=["key"]).column("key").to_pylist()

    def close(self) -> None:
        """Release the environments (shared ones stay open while another Snapshot uses them)."""
        if not self._closed:
            self._closed = True
            self._local = threading.local()
            _open_snapshots.discard(self)
            for path in self._paths:
                _release(path)

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Snapshot({str(self.directory)!r}, rows={len(self)}, task={self.manifest['task']!r})"

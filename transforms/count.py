"""CountQueries: key tables -> tables of (key, count, users): weighted counts and distinct users."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

COUNTS = ("key", "count", "users")  # the columns of what CountQueries gives
PARTITIONS = 256  # of the key space: what crosses the shuffle, and how far the merge spreads over workers
FNV_OFFSET, FNV_PRIME = 0xCBF29CE484222325, 0x100000001B3
USER_BYTES = np.dtype("<u8")  # a user hash as it crosses the shuffle
_WIDE = 1024  # bytes: longer strings (rare) are hashed by the plain loop, ~100x slower a byte


def fnv1a(text: str) -> int:
    """64-bit FNV-1a of ``text``'s UTF-8: the same in every process and on every machine."""
    value = FNV_OFFSET
    for byte in text.encode("utf-8", "surrogatepass"):
        value = ((value ^ byte) * FNV_PRIME) & 0xFFFF_FFFF_FFFF_FFFF
    return value


def fnv1a_column(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """:func:`fnv1a` of each string of ``column`` (null stays null), byte position by byte position over
    all strings at once; strings over 1,024 bytes go through :func:`fnv1a` itself."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    column = column.cast(pa.large_string())
    n = len(column)
    offsets = np.frombuffer(column.buffers()[1], np.int64, n + 1, column.offset * 8)
    data = np.frombuffer(column.buffers()[2] or b"", np.uint8)
    lengths = np.diff(offsets)
    order = np.argsort(-lengths, kind="stable")  # the strings still going at a position are a prefix
    starts, ordered = offsets[:-1][order], lengths[order]
    hashes = np.full(n, FNV_OFFSET, np.uint64)
    prime = np.uint64(FNV_PRIME)
    for position in range(min(int(ordered[0]) if n else 0, _WIDE)):
        going = int(np.searchsorted(-ordered, -position, side="left"))  # lengths > position
        hashes[:going] ^= data[starts[:going] + position]
        hashes[:going] *= prime
    result = np.empty(n, np.uint64)
    result[order] = hashes
    for i in np.flatnonzero(lengths > _WIDE):
        result[i] = fnv1a(column[int(i)].as_py())
    return pa.array(result, pa.uint64(), mask=column.is_null().to_numpy(zero_copy_only=False))


def partition_of(key: str, partitions: int = PARTITIONS) -> int:
    """The partition a key is counted in: :func:`fnv1a` of it, modulo ``partitions``."""
    return fnv1a(key) % partitions


def to_ipc(table: pa.Table) -> bytes:
    """A table as one Arrow IPC stream: what crosses the shuffle, Arrow's own buffers rather than a pickle."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(data).read_all()


def _sums(index: np.ndarray, weight: pa.ChunkedArray, size: int) -> np.ndarray:
    """The weights summed per index, exactly (int64), for indices ``0 .. size - 1`` that all occur."""
    sums = (
        pa.table({"index": index, "weight": weight}).group_by("index", use_threads=False).aggregate([("weight", "sum")])
    )
    out = np.empty(size, np.int64)
    out[sums.column("index").to_numpy()] = sums.column("weight_sum").to_numpy()
    return out


class _Run(NamedTuple):
    """Partial counts of some rows: each distinct key once, in partition order, with its summed weight
    and its distinct users (64-bit hashes, key after key; none without users)."""

    keys: pa.Array
    partition: np.ndarray  # uint64, each key's, ascending
    weights: np.ndarray  # int64
    users: np.ndarray  # each key's number of hashes
    hashes: np.ndarray  # USER_BYTES

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + sum(a.nbytes for a in (self.partition, self.weights, self.users, self.hashes))


def _numbered(
    keys: pa.Array, partitions: int, known: np.ndarray | None = None
) -> tuple[np.ndarray, pa.Array, np.ndarray]:
    """Each row's index into the distinct keys, those keys ordered by partition, and their partitions:
    the keys are hashed once each (or their partitions are ``known``, row by row), and a partition's
    keys are one slice."""
    encoded = pc.dictionary_encode(keys)
    index = encoded.indices.to_numpy(zero_copy_only=False)
    if known is None:
        partition = fnv1a_column(encoded.dictionary).to_numpy() % np.uint64(partitions)
    else:
        partition = np.empty(len(encoded.dictionary), np.uint64)
        partition[index] = known
    order = np.argsort(partition, kind="stable")
    rank = np.empty(len(order), np.int32)
    rank[order] = np.arange(len(order), dtype=np.int32)
    return rank[index], encoded.dictionary.take(order), partition[order]


def _pairs(index: np.ndarray, users: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (key index, user hash) pairs of the rows, by key index; a row without a user is
    no pair. Users are hashed once each, and a pair is one integer while they are made distinct and
    sorted."""
    if users.null_count:
        valid = pc.is_valid(users).to_numpy(zero_copy_only=False)
        index, users = index[valid], users.filter(valid)
    encoded = pc.dictionary_encode(users)
    count = max(len(encoded.dictionary), 1)
    pairs = np.sort(pc.unique(index.astype(np.int64) * count + encoded.indices.to_numpy()).to_numpy())
    hashes = fnv1a_column(encoded.dictionary).to_numpy().astype(USER_BYTES, copy=False)
    return pairs // count, hashes[pairs % count]


def _reduce(rows: pa.Table, users: bool, partitions: int) -> _Run:
    """Rows of ``key, weight[, user]`` as one :class:`_Run`."""
    index, keys, partition = _numbered(rows.column("key").combine_chunks(), partitions)
    weights = _sums(index, rows.column("weight"), len(keys))
    if not users:
        return _Run(keys, partition, weights, np.zeros(len(keys), np.int64), np.empty(0, USER_BYTES))
    owner, hashes = _pairs(index, rows.column("user").combine_chunks())
    return _Run(keys, partition, weights, np.bincount(owner, minlength=len(keys)), hashes)


def _combine(runs: list[_Run], partitions: int) -> _Run:
    """Runs as one: a key's weights summed, its users made distinct."""
    if len(runs) == 1:
        return runs[0]
    known = np.concatenate([run.partition for run in runs])
    index, keys, partition = _numbered(pa.concat_arrays([run.keys for run in runs]), partitions, known)
    weights = _sums(index, np.concatenate([run.weights for run in runs]), len(keys))
    users = np.concatenate([run.users for run in runs])
    if not users.any():
        return _Run(keys, partition, weights, np.zeros(len(keys), np.int64), np.empty(0, USER_BYTES))
    owner = np.repeat(index, users)  # each hash's key
    pairs = pa.table({"id": owner, "user": np.concatenate([run.hashes for run in runs])})
    pairs = pairs.group_by(["id", "user"], use_threads=False).aggregate([])
    owner = pairs.column("id").to_numpy()
    order = np.argsort(owner, kind="stable")  # key after key
    hashes = pairs.column("user").to_numpy()[order].astype(USER_BYTES, copy=False)
    return _Run(keys, partition, weights, np.bincount(owner, minlength=len(keys)), hashes)


class _PartialCounts(beam.DoFn):
    """Per bundle, the sums of its keys as ``(partition, (weights, users))``: one pair per partition,
    when the bundle ends or when what it holds outgrows ``HOLD``.

    The tables of ``key, weight, user`` are held until they have ``FLUSH`` rows, then reduced to a
    run: the weight of each distinct key, and each distinct (key, user) pair, users as 64-bit FNV-1a
    hashes. Runs are combined into one when they hold ``HOLD`` bytes, so what a bundle sends grows
    with its distinct keys and pairs, not with its lines; a combined run still over half of ``HOLD``
    (keys and pairs that seldom repeat) is sent at once, so memory stays bounded. ``weights`` is an
    Arrow IPC table of ``key, weight`` and, with users, ``users``: how many distinct users the key
    has in this run; ``users`` is those users' hashes, key after key in the table's order, as
    little-endian uint64 bytes (8 bytes a pair: no key, index or weight; empty without users). A
    retried bundle starts from nothing, so nothing is counted twice.
    """

    FLUSH = 1 << 19
    HOLD = 128 << 20

    def __init__(self, users: bool, partitions: int):
        self.users, self.partitions = users, partitions

    def start_bundle(self):
        self._parts: list[pa.Table] = []
        self._rows = 0
        self._runs: list[_Run] = []

    def process(self, keys: pa.Table):
        table = keys.select(["key", "weight", "user"] if self.users else ["key", "weight"])
        self._parts.append(table)
        self._rows += table.num_rows
        if self._rows >= self.FLUSH:
            self._flush()
            if sum(run.nbytes for run in self._runs) > self.HOLD:
                self._runs = [_combine(self._runs, self.partitions)]
                if self._runs[0].nbytes > self.HOLD // 2:
                    yield from self._send()

    def finish_bundle(self):
        self._flush()
        for item in self._send():
            yield WindowedValue(item, MIN_TIMESTAMP, [GlobalWindow()])

    def _flush(self) -> None:
        if self._parts:
            self._runs.append(_reduce(pa.concat_tables(self._parts), self.users, self.partitions))
            self._parts, self._rows = [], 0

    def _send(self):
        """The runs held, combined, as one ``(weights, users)`` pair of tables per partition."""
        if not self._runs:
            return
        run, self._runs = _combine(self._runs, self.partitions), []
        part = pa.table({"key": run.keys, "weight": run.weights})
        if self.users:
            part = part.append_column("users", pa.array(run.users, pa.int32()))
        at = np.r_[0, np.cumsum(run.users)]  # where each key's users start, and the end
        starts = np.flatnonzero(np.r_[True, np.diff(run.partition) != 0])  # each partition's first key
        for first, last in zip(starts, np.r_[starts[1:], len(run.keys)]):
            users = run.hashes[at[first] : at[last]].tobytes()
            yield int(run.partition[first]), (to_ipc(part.slice(first, last - first)), users)


def _merge(partition: int, parts, users: bool = False) -> Iterator[pa.Table]:
    """One partition's partial sums -> one table of ``key, count, users`` (distinct users, or null).

    The keys of all parts are numbered once (a dictionary over them); sums and distinct pairs are
    then grouped by those integers, never by the key text.
    """
    parts = list(parts)
    table = pa.concat_tables([from_ipc(weights) for weights, _ in parts])
    encoded = pc.dictionary_encode(table.column("key").combine_chunks())
    ids = encoded.indices.to_numpy(zero_copy_only=False)
    keys = encoded.dictionary
    counts = _sums(ids, table.column("weight"), len(keys))
    distinct_users = None
    if users:
        owner = np.repeat(ids, table.column("users").to_numpy())  # each pair's key, in the parts' order
        user = np.frombuffer(b"".join(hashes for _, hashes in parts), USER_BYTES)
        seen = pa.table({"id": owner, "user": user}).group_by(["id", "user"], use_threads=False).aggregate([])
        distinct_users = np.bincount(seen.column("id").to_numpy(), minlength=len(keys))
    yield pa.table(
        [keys, pa.array(counts), pa.array(distinct_users, pa.int64()) if users else pa.nulls(len(keys), pa.int64())],
        names=COUNTS,
    )


def count_rows(counts: pa.Table) -> Iterator[tuple[str, int, int | None]]:
    """The ``(key, count, users)`` rows of a table of :class:`CountQueries`."""
    return zip(*(counts.column(name).to_pylist() for name in COUNTS))


class CountQueries(beam.PTransform):
    """Sum weights per key and, with ``users=True``, count distinct users per key.

    Input: tables of ``key, weight, user``. Each worker sums its tables per key, makes their (key, user)
    pairs distinct, and sends both to the partition that owns each key (a stable hash of the key): the
    shuffle carries a few tables per bundle, and each partition is merged on one worker, so no worker
    sees all keys or all (key, user) pairs. Users are hashed (64-bit FNV-1a) before they leave the
    worker; a record without a user adds to its key's count, not to its users. Output: one table of
    ``key, count, users`` per partition that has keys (``users`` null without users; :func:`count_rows`
    reads it as rows).
    """

    def __init__(self, users: bool = False, partitions: int = PARTITIONS):
        super().__init__()
        self.users, self.partitions = users, partitions

    def expand(self, keys):
        return (
            keys
            | "SumPerBundle" >> beam.ParDo(_PartialCounts(self.users, self.partitions))
            | "ByPartition" >> beam.GroupByKey()
            | "MergePartition" >> beam.FlatMapTuple(_merge, users=self.users)
        )

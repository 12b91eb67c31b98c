"""CountQueries: key tables -> (key, count, users) with weighted counts and distinct users."""

from __future__ import annotations

import hashlib
import zlib

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

_MEMO = 1 << 18  # distinct users whose hashes a worker remembers: logs repeat their users
PARTITIONS = 256  # of the key space: what crosses the shuffle, and how far the merge spreads over workers


def _hashed(user: str) -> int:
    return int.from_bytes(hashlib.blake2b(user.encode("utf-8"), digest_size=8).digest(), "little")


def partition_of(key: str, partitions: int = PARTITIONS) -> int:
    """The partition a key is counted in: CRC-32 of its UTF-8, the same in every process and on every machine."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % partitions


def _per_distinct(
    column: pa.Array | pa.ChunkedArray, function, kind: pa.DataType, memo: dict | None = None
) -> pa.Array:
    """``function`` of each value of ``column``, called once per distinct value (and value of ``memo``)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    encoded = pc.dictionary_encode(column)
    values = encoded.dictionary.to_pylist()
    if memo is None:
        results = list(map(function, values))
    else:
        if len(memo) > _MEMO:
            memo.clear()
        results = [memo[v] if v in memo else memo.setdefault(v, function(v)) for v in values]
    return pc.take(pa.array(results, kind), encoded.indices)


def to_ipc(table: pa.Table) -> bytes:
    """A table as one Arrow IPC stream: what crosses the shuffle, Arrow's own buffers rather than a pickle."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(data).read_all()


def _sums(table: pa.Table, users: bool) -> pa.Table:
    """``key, weight`` (or ``key, user, weight`` with users) summed per key (or per key and user)."""
    by = ["key", "user"] if users else ["key"]
    return table.group_by(by, use_threads=False).aggregate([("weight", "sum")]).rename_columns([*by, "weight"])


class _PartialCounts(beam.DoFn):
    """Per bundle, the sums of its keys as ``(partition, Arrow IPC bytes)``: at most ``partitions`` per flush.

    Each table of ``key, weight, user`` is summed per key (and per 64-bit BLAKE2b hash of the user),
    so the shuffle carries one row per distinct key (or key and user) of the bundle, in a few tables.
    The sums are flushed whenever they hold ``FLUSH`` rows, so memory stays bounded. A retried bundle
    starts from nothing, so nothing is counted twice.
    """

    FLUSH = 1 << 18

    def __init__(self, users: bool, partitions: int):
        self.users, self.partitions = users, partitions

    def setup(self):
        self._hashes: dict[str, int] = {}

    def start_bundle(self):
        self._parts: list[pa.Table] = []
        self._rows = 0

    def process(self, keys: pa.Table):
        table = keys.select(["key", "weight"])
        if self.users:
            table = table.append_column("user", _per_distinct(keys.column("user"), _hashed, pa.uint64(), self._hashes))
        part = _sums(table, self.users)
        self._parts.append(part)
        self._rows += part.num_rows
        if self._rows >= self.FLUSH:
            yield from self._drain()

    def finish_bundle(self):
        for item in self._drain():
            yield WindowedValue(item, MIN_TIMESTAMP, [GlobalWindow()])

    def _drain(self):
        if not self._parts:
            return
        sums = _sums(pa.concat_tables(self._parts), self.users)
        self._parts, self._rows = [], 0
        partition = _per_distinct(sums.column("key"), lambda key: partition_of(key, self.partitions), pa.int32())
        order = pc.sort_indices(partition)
        sums, partition = sums.take(order), partition.take(order).to_numpy()
        cuts = np.flatnonzero(np.diff(partition)) + 1
        for start, end in zip([0, *cuts], [*cuts, len(partition)]):
            part = sums.slice(start, end - start)  # a key's text once, not in each of its (key, user) rows:
            part = part.set_column(0, "key", pc.dictionary_encode(part.column("key")))
            yield int(partition[start]), to_ipc(part)


def _merge(partition: int, parts, users: bool = False):
    """One partition's partial sums -> ``(key, count, distinct users or None)`` for each of its keys."""
    tables = [from_ipc(part) for part in parts]
    tables = [table.set_column(0, "key", table.column("key").cast(pa.string())) for table in tables]
    sums = _sums(pa.concat_tables(tables), users)
    if users:  # one row per key and user: their number is the key's distinct users
        sums = sums.group_by("key", use_threads=False).aggregate([("weight", "sum"), ("user", "count")])
        yield from zip(*(sums.column(name).to_pylist() for name in ("key", "weight_sum", "user_count")))
    else:
        yield from ((key, count, None) for key, count in zip(*(c.to_pylist() for c in sums.columns)))


class CountQueries(beam.PTransform):
    """Sum weights per key and, with ``users=True``, count distinct users per key.

    Input: tables of ``key, weight, user``. Each worker sums its tables per key and sends the sums to
    the partition that owns each key (a stable hash of the key): the shuffle carries a few tables per
    bundle, and each partition is merged on one worker, so no worker sees all keys or all (key, user)
    pairs. Users are hashed (64-bit BLAKE2b) first. Without users, the third field of the output is None.
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

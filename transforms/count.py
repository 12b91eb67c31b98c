"""CountQueries: key tables -> tables of (key, count, users): weighted counts and distinct users."""

from __future__ import annotations

from collections.abc import Iterator

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
_WIDE = 64  # bytes: longer strings (rare) are hashed by the plain loop


def fnv1a(text: str) -> int:
    """64-bit FNV-1a of ``text``'s UTF-8: the same in every process and on every machine."""
    value = FNV_OFFSET
    for byte in text.encode("utf-8", "surrogatepass"):
        value = ((value ^ byte) * FNV_PRIME) & 0xFFFF_FFFF_FFFF_FFFF
    return value


def fnv1a_column(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """:func:`fnv1a` of each string of ``column`` (null stays null), byte position by byte position over
    all strings at once; strings over 64 bytes go through :func:`fnv1a` itself."""
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


def _sums(table: pa.Table, users: bool) -> pa.Table:
    """``key, weight`` (or ``key, user, weight`` with users) summed per key (or per key and user)."""
    by = ["key", "user"] if users else ["key"]
    return table.group_by(by, use_threads=False).aggregate([("weight", "sum")]).rename_columns([*by, "weight"])


class _PartialCounts(beam.DoFn):
    """Per bundle, the sums of its keys as ``(partition, Arrow IPC bytes)``: at most ``partitions`` per flush.

    The tables of ``key, weight, user`` are held until they have ``FLUSH`` rows (so memory stays
    bounded), then summed at once per key (and per 64-bit FNV-1a hash of the user): the shuffle carries
    one row per distinct key (or key and user) of each flush, in a few tables. A retried bundle starts
    from nothing, so nothing is counted twice.
    """

    FLUSH = 1 << 19

    def __init__(self, users: bool, partitions: int):
        self.users, self.partitions = users, partitions

    def start_bundle(self):
        self._parts: list[pa.Table] = []
        self._rows = 0

    def process(self, keys: pa.Table):
        table = keys.select(["key", "weight"])
        if self.users:
            table = table.append_column("user", fnv1a_column(keys.column("user")))
        self._parts.append(table)
        self._rows += table.num_rows
        if self._rows >= self.FLUSH:
            yield from self._drain()

    def finish_bundle(self):
        for item in self._drain():
            yield WindowedValue(item, MIN_TIMESTAMP, [GlobalWindow()])

    def _drain(self):
        """The held rows summed, as one dictionary-encoded table per partition.

        The distinct keys are hashed once each and ordered by partition, so a row's key is an index
        into them: the sums group integers, and a partition's keys are one slice of the distinct ones.
        """
        if not self._parts:
            return
        table = pa.concat_tables(self._parts)
        self._parts, self._rows = [], 0
        encoded = pc.dictionary_encode(table.column("key").combine_chunks())
        partition = fnv1a_column(encoded.dictionary).to_numpy() % np.uint64(self.partitions)
        order = np.argsort(partition, kind="stable")
        rank = np.empty(len(order), np.int32)
        rank[order] = np.arange(len(order), dtype=np.int32)
        distinct, partition = encoded.dictionary.take(order), partition[order]
        index = rank[encoded.indices.to_numpy(zero_copy_only=False)]
        by = ["index", "user"] if self.users else ["index"]
        columns = {"index": index, "weight": table.column("weight")} | {name: table.column(name) for name in by[1:]}
        sums = pa.table(columns).group_by(by, use_threads=False).aggregate([("weight", "sum")])
        sums = sums.take(pc.sort_indices(sums.column("index")))
        rows = sums.column("index").to_numpy()
        values = sums.select([*by[1:], "weight_sum"]).rename_columns([*by[1:], "weight"])
        starts = np.flatnonzero(np.r_[True, np.diff(partition) != 0])  # each partition's first distinct key
        for first, last in zip(starts, [*starts[1:], len(partition)]):
            a, b = np.searchsorted(rows, [first, last])
            keys = pa.DictionaryArray.from_arrays(pa.array(rows[a:b] - first, pa.int32()), distinct[first:last])
            yield int(partition[first]), to_ipc(values.slice(a, b - a).add_column(0, "key", keys))


def _merge(partition: int, parts, users: bool = False) -> Iterator[pa.Table]:
    """One partition's partial sums -> one table of ``key, count, users`` (distinct users, or null)."""
    tables = [from_ipc(part) for part in parts]
    tables = [table.set_column(0, "key", table.column("key").cast(pa.string())) for table in tables]
    sums = _sums(pa.concat_tables(tables), users)
    if users:  # one row per key and user: their number is the key's distinct users
        sums = sums.group_by("key", use_threads=False).aggregate([("weight", "sum"), ("user", "count")])
        yield pa.table([sums["key"], sums["weight_sum"], sums["user_count"]], names=COUNTS)
    else:
        yield pa.table([sums["key"], sums["weight"], pa.nulls(sums.num_rows, pa.int64())], names=COUNTS)


def count_rows(counts: pa.Table) -> Iterator[tuple[str, int, int | None]]:
    """The ``(key, count, users)`` rows of a table of :class:`CountQueries`."""
    return zip(*(counts.column(name).to_pylist() for name in COUNTS))


class CountQueries(beam.PTransform):
    """Sum weights per key and, with ``users=True``, count distinct users per key.

    Input: tables of ``key, weight, user``. Each worker sums its tables per key and sends the sums to
    the partition that owns each key (a stable hash of the key): the shuffle carries a few tables per
    bundle, and each partition is merged on one worker, so no worker sees all keys or all (key, user)
    pairs. Users are hashed (64-bit FNV-1a) first. Output: one table of ``key, count, users`` per
    partition that has keys (``users`` null without users; :func:`count_rows` reads it as rows).
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

"""CountQueries: batches of (key, weight, user) -> (key, count, users) with weighted counts and distinct users."""

from __future__ import annotations

import hashlib
import zlib

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

PARTITIONS = 256  # of the key space: what crosses the shuffle, and how far the merge spreads over workers


def _hashed(user: str) -> bytes:
    return hashlib.blake2b(user.encode("utf-8"), digest_size=8).digest()


def partition_of(key: str, partitions: int = PARTITIONS) -> int:
    """The partition a key is counted in: CRC-32 of its UTF-8, the same in every process and on every machine."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % partitions


class _PartialCounts(beam.DoFn):
    """Per bundle, the sums of its keys as ``(partition, [(key, count[, user hashes]), ...])``.

    Summing on the worker turns a million log lines into one entry per distinct key, and the shuffle
    carries at most ``partitions`` lists per flush, not one element per key. The table is flushed
    whenever it holds ``FLUSH`` keys, so memory stays bounded. A retried bundle starts from an empty
    table, so nothing is counted twice.
    """

    FLUSH = 1 << 17

    def __init__(self, users: bool, partitions: int):
        self.users, self.partitions = users, partitions

    def setup(self):
        self._hashes: dict[str, bytes] = {}  # user -> hash: logs repeat their users

    def start_bundle(self):
        self._table: dict = {}

    def process(self, keys: list):
        table, hashes = self._table, self._hashes
        if self.users:
            if len(hashes) >= self.FLUSH:
                hashes.clear()
            for record in keys:
                acc = table.get(record[0])
                if acc is None:
                    acc = table[record[0]] = [0, set()]
                acc[0] += record[1]
                user = hashes.get(record[2])
                if user is None:
                    user = hashes[record[2]] = _hashed(record[2])
                acc[1].add(user)
        else:
            for record in keys:
                table[record[0]] = table.get(record[0], 0) + record[1]
        if len(table) >= self.FLUSH:
            yield from self._drain()

    def finish_bundle(self):
        for item in self._drain():
            yield WindowedValue(item, MIN_TIMESTAMP, [GlobalWindow()])

    def _drain(self):
        table, self._table = self._table, {}
        parts: dict[int, list] = {}
        for key, acc in table.items():
            entry = (key, acc[0], tuple(acc[1])) if self.users else (key, acc)
            parts.setdefault(partition_of(key, self.partitions), []).append(entry)
        return iter(parts.items())


def _merge(partition: int, parts, users: bool = False):
    """One partition's partial sums -> ``(key, count, distinct users or None)`` for each of its keys."""
    if users:
        table: dict = {}
        for part in parts:
            for key, count, hashes in part:
                acc = table.get(key)
                if acc is None:
                    table[key] = [count, set(hashes)]
                else:
                    acc[0] += count
                    acc[1].update(hashes)
        for key, (count, hashes) in table.items():
            yield key, count, len(hashes)
    else:
        sums: dict[str, int] = {}
        for part in parts:
            for key, count in part:
                sums[key] = sums.get(key, 0) + count
        for key, count in sums.items():
            yield key, count, None


class CountQueries(beam.PTransform):
    """Sum weights per key and, with ``users=True``, count distinct users per key.

    Input: batches (lists) of ``(key, weight, user, ...)``. Each worker sums its batches per key and
    sends the sums to the partition that owns each key (a stable hash of the key): the shuffle carries
    a few lists per bundle, and each partition is merged on one worker, so no worker sees all keys or
    all (key, user) pairs. Users are hashed (64-bit BLAKE2b) first. Without users, the third field of
    the output is None.
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

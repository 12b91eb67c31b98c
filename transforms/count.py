"""CountQueries: batches of (key, weight, user) -> (key, count, users) with weighted counts and distinct users."""

from __future__ import annotations

import hashlib

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue


def _hashed(user: str) -> bytes:
    return hashlib.blake2b(user.encode("utf-8"), digest_size=8).digest()


class _PartialCounts(beam.DoFn):
    """Per bundle, one ``(key, count)`` or ``(key, (count, user hashes))`` per key seen in it.

    Summing on the worker before the shuffle turns a million log lines into one element per distinct
    key; the table is flushed whenever it holds ``FLUSH`` keys, so memory stays bounded. A retried
    bundle starts from an empty table, so nothing is counted twice.
    """

    FLUSH = 1 << 17

    def __init__(self, users: bool):
        self.users = users

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
        return ((key, tuple(acc)) for key, acc in table.items()) if self.users else iter(table.items())


class _CountAndUsers(beam.CombineFn):
    """Partial ``(count, user hashes)`` of one key merged: the sum and the number of distinct users."""

    def create_accumulator(self):
        return [0, set()]

    def add_input(self, acc, value):
        acc[0] += value[0]
        acc[1] |= value[1]
        return acc

    def merge_accumulators(self, accs):
        accs = iter(accs)
        total = next(accs)
        for acc in accs:
            total[0] += acc[0]
            total[1] |= acc[1]
        return total

    def extract_output(self, acc):
        return acc[0], len(acc[1])


class CountQueries(beam.PTransform):
    """Sum weights per key and, with ``users=True``, count distinct users per key.

    Input: batches (lists) of ``(key, weight, user, ...)``. Each worker sums its batches per key,
    then each key's partial counts and user sets meet on the worker that owns the key, so no worker
    sees all (key, user) pairs. Users are hashed (64-bit BLAKE2b) first. Without users, the third
    field of the output is None.
    """

    def __init__(self, users: bool = False):
        super().__init__()
        self.users = users

    def expand(self, keys):
        partial = keys | "SumPerBundle" >> beam.ParDo(_PartialCounts(self.users))
        if not self.users:
            return (
                partial
                | "Sum" >> beam.CombinePerKey(sum)
                | "NoUsers" >> beam.MapTuple(lambda key, count: (key, count, None))
            )
        return (
            partial
            | "CountAndUsers" >> beam.CombinePerKey(_CountAndUsers())
            | "Flatten" >> beam.MapTuple(lambda key, cu: (key, *cu))
        )

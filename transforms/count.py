"""CountQueries: (key, weight, user) -> (key, count, users) with weighted counts and distinct users."""

from __future__ import annotations

import hashlib

import apache_beam as beam


class _CountAndUsers(beam.CombineFn):
    """Sum of weights and the set of (hashed) users of one key; lifted, so partial sums merge."""

    def create_accumulator(self):
        return [0, set()]

    def add_input(self, acc, value):
        acc[0] += value[0]
        if value[1] is not None:
            acc[1].add(value[1])
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


def _weight_and_user(record):
    key, weight, user = record
    return key, (weight, user and hashlib.blake2b(user.encode("utf-8"), digest_size=8).digest())


class CountQueries(beam.PTransform):
    """Sum weights per key and, with ``users=True``, count distinct users per key.

    One keyed combine: workers pre-aggregate, then each key's partial counts and user sets meet on
    the worker that owns the key, so no worker sees all (key, user) pairs. Users are hashed
    (64-bit BLAKE2b) first. Without users, the third field is None.
    """

    def __init__(self, users: bool = False):
        super().__init__()
        self.users = users

    def expand(self, keys):
        if not self.users:
            return (
                keys
                | "Weights" >> beam.Map(lambda r: (r[0], r[1]))
                | "Sum" >> beam.CombinePerKey(sum)
                | "NoUsers" >> beam.MapTuple(lambda key, count: (key, count, None))
            )
        return (
            keys
            | "WeightsAndUsers" >> beam.Map(_weight_and_user)
            | "CountAndUsers" >> beam.CombinePerKey(_CountAndUsers())
            | "Flatten" >> beam.MapTuple(lambda key, cu: (key, *cu))
        )

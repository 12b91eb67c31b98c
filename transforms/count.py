"""CountQueries: (key, weight, user) -> (key, count, users) with weighted counts and distinct users."""

from __future__ import annotations

import hashlib

import apache_beam as beam


def _user_pair(record):
    key, _, user = record
    return key, hashlib.blake2b(user.encode("utf-8"), digest_size=8).digest()


def _join(item):
    key, grouped = item
    users = grouped["users"]
    return key, sum(grouped["count"]), users[0] if users else 0


class CountQueries(beam.PTransform):
    """Sum weights per key and, with ``users=True``, count distinct users per key.

    Distinct users come from a shuffle of (key, hashed user) pairs, which spreads over workers
    by key; no worker sees all pairs. Without users, the third field is None.
    """

    def __init__(self, users: bool = False):
        super().__init__()
        self.users = users

    def expand(self, keys):
        counts = keys | "Weights" >> beam.Map(lambda r: (r[0], r[1])) | "Sum" >> beam.CombinePerKey(sum)
        if not self.users:
            return counts | "NoUsers" >> beam.MapTuple(lambda key, count: (key, count, None))
        users = (
            keys
            | "UserPairs" >> beam.Map(_user_pair)
            | "DistinctPairs" >> beam.Distinct()
            | "Keys" >> beam.Keys()
            | "UsersPerKey" >> beam.combiners.Count.PerElement()
        )
        return {"count": counts, "users": users} | "Join" >> beam.CoGroupByKey() | "Merge" >> beam.Map(_join)

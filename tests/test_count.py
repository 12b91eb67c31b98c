"""CountQueries on a real Beam pipeline: exact sums and distinct users whatever the partitioning."""

from __future__ import annotations

import random
from collections import Counter, defaultdict

import apache_beam as beam
import pyarrow as pa
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from querycache.transforms.count import CountQueries, partition_of

KEYS = ["hotels in rome", "café", "東京 天気", "a", "x" * 600, "emoji 🙂"]


def test_partitions_are_the_same_on_every_machine():
    assert partition_of("hotels in rome") == 953_627_349 % 256  # CRC-32, not Python's salted hash
    assert {partition_of(key, 1) for key in KEYS} == {0}


@pytest.mark.parametrize(("users", "partitions"), [(True, 1), (True, 7), (False, 256)])
def test_counts_and_users_are_exact_across_tables_and_partitions(users, partitions):
    rng = random.Random(partitions)
    records = [(rng.choice(KEYS), rng.randint(1, 5), f"u{rng.randint(1, 40)}") for _ in range(3_000)]
    counts, seen = Counter(), defaultdict(set)
    for key, weight, user in records:
        counts[key] += weight
        seen[key].add(user)
    expected = [(key, counts[key], len(seen[key]) if users else None) for key in counts]
    tables = [
        pa.table(list(zip(*records[i : i + 250])), names=["key", "weight", "user"]) for i in range(0, len(records), 250)
    ]
    with TestPipeline() as p:
        got = p | beam.Create(tables, reshuffle=False) | CountQueries(users=users, partitions=partitions)
        assert_that(got, equal_to(expected))

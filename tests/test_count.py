"""CountQueries on a real Beam pipeline: exact sums and distinct users whatever the partitioning."""

from __future__ import annotations

import random
from collections import Counter, defaultdict

import apache_beam as beam
import pyarrow as pa
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from hypothesis import given, settings
from hypothesis import strategies as st

from querycache.transforms.count import (
    CountQueries,
    _PartialCounts,
    count_rows,
    fnv1a,
    fnv1a_column,
    from_ipc,
    partition_of,
)

KEYS = ["hotels in rome", "café", "東京 天気", "a", "x" * 600, "emoji 🙂"]


def test_partitions_are_the_same_on_every_machine():
    assert fnv1a("") == 0xCBF29CE484222325 and fnv1a("a") == 0xAF63DC4C8601EC8C  # FNV-1a's published values
    assert fnv1a("foobar") == 0x85944171F73967E8
    assert partition_of("hotels in rome") == fnv1a("hotels in rome") % 256  # not Python's salted hash
    assert {partition_of(key, 1) for key in KEYS} == {0}


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.none() | st.text(max_size=80) | st.sampled_from([*KEYS, "x" * 1100, "é" * 600]), max_size=60),
    st.integers(0, 5),
    st.integers(1, 3),
)
def test_the_column_hash_is_the_plain_hash_of_each_string(texts, skip, chunks):
    texts = [t.encode("utf-8", "replace").decode("utf-8") if t is not None else None for t in texts]
    column = pa.array(["skipped"] * skip + texts, pa.string())[skip:]  # an array with an offset
    cut = [len(texts) * i // chunks for i in range(chunks + 1)]
    chunked = pa.chunked_array([column[a:b] for a, b in zip(cut, cut[1:])], pa.string())
    expected = [None if t is None else fnv1a(t) for t in texts]
    assert fnv1a_column(column).to_pylist() == expected
    assert fnv1a_column(chunked).to_pylist() == expected


@pytest.mark.parametrize(
    ("users", "partitions", "flush", "hold"),
    [
        (True, 1, None, None),
        (True, 7, 500, None),
        (True, 3, 200, 12_000),
        (False, 256, None, None),
        (False, 5, 300, 900),
    ],
)
def test_counts_and_users_are_exact_across_tables_and_partitions(monkeypatch, users, partitions, flush, hold):
    """With ``flush``, each bundle is reduced every few tables into runs, combined when it ends; with
    ``hold`` too, runs are combined and sent while it goes: a partition merges many partial sums."""
    if flush:
        monkeypatch.setattr(_PartialCounts, "FLUSH", flush)
    if hold:
        monkeypatch.setattr(_PartialCounts, "HOLD", hold)
    rng = random.Random(partitions)
    keys = KEYS + [f"query {i}" for i in range(60)]  # partitions of several keys
    records = [
        (rng.choice(keys), rng.randint(1, 5), rng.choice([None, *(f"u{i}" for i in range(40))])) for _ in range(3_000)
    ]
    counts, seen = Counter(), defaultdict(set)
    for key, weight, user in records:
        counts[key] += weight
        seen[key].update([user] if user is not None else [])  # a record without a user is nobody's
    expected = [(key, counts[key], len(seen[key]) if users else None) for key in counts]
    tables = [
        pa.table(list(zip(*records[i : i + 250])), names=["key", "weight", "user"]) for i in range(0, len(records), 250)
    ]
    with TestPipeline() as p:
        got = p | beam.Create(tables, reshuffle=False) | CountQueries(users, partitions) | beam.FlatMap(count_rows)
        assert_that(got, equal_to(expected))


def test_a_bundle_sends_each_distinct_key_and_pair_once_however_often_they_repeat(monkeypatch):
    """Runs are combined before they leave the bundle: what it sends grows with its distinct keys
    and (key, user) pairs, not with its lines."""
    monkeypatch.setattr(_PartialCounts, "FLUSH", 100)
    rows = 100
    table = pa.table(
        {"key": [f"q{i % 30}" for i in range(rows)], "weight": [2] * rows, "user": [f"u{i % 7}" for i in range(rows)]}
    )
    counts = _PartialCounts(users=True, partitions=4)
    counts.start_bundle()
    sent = [item for _ in range(5) for item in counts.process(table)] + [v.value for v in counts.finish_bundle()]
    partitions = [partition for partition, _ in sent]
    assert sorted(partitions) == sorted(set(partitions))  # one piece per partition
    weights = pa.concat_tables([from_ipc(piece) for _, (piece, _) in sent])
    assert sorted(zip(weights.column("key").to_pylist(), weights.column("weight").to_pylist())) == sorted(
        (f"q{k}", 5 * 2 * sum(1 for i in range(rows) if i % 30 == k)) for k in range(30)
    )
    pairs = {(i % 30, i % 7) for i in range(rows)}
    assert sum(len(users) for _, (_, users) in sent) == 8 * len(pairs) == 8 * sum(weights.column("users").to_pylist())

"""Replay on partition tables: the join, the totals and the rows the tops need, against plain Python."""

from __future__ import annotations

import random

import apache_beam as beam
import pyarrow as pa
from apache_beam.testing.util import assert_that, equal_to
from hypothesis import given, settings
from hypothesis import strategies as st

from querycache.store.keys import key_bytes
from querycache.transforms.count import COUNTS, partition_of
from querycache.transforms.replay import HeldOut, JoinSnapshot, Stored, candidate_rows, table_totals, top_plans


def _tables(counts: dict[str, int], partitions: int) -> list[pa.Table]:
    """CountQueries' shape: one table of key, count, users per partition that has keys."""
    by: dict[int, list] = {}
    for key, count in counts.items():
        by.setdefault(partition_of(key, partitions), []).append((key, count, None))
    return [pa.table(list(map(list, zip(*rows))), names=list(COUNTS)) for rows in by.values()]


def test_the_join_meets_counts_and_snapshot_rows_per_partition():
    rng = random.Random(5)
    counts = {f"q{i}": rng.randint(1, 50) for i in range(300)}
    stored = [(f"q{i}", i + 1) for i in range(0, 400, 3)]  # some absent from the logs
    with beam.Pipeline(runner="FnApiRunner") as p:
        heldout, rows = (
            p | "Counts" >> beam.Create(_tables(counts, 8)),
            p | "Stored" >> beam.Create(stored),
        ) | JoinSnapshot(partitions=8)
        flat = heldout | beam.FlatMap(lambda t: zip(*(t.column(n).to_pylist() for n in ("key", "count", "hit"))))
        keys = {key for key, _ in stored}
        assert_that(flat, equal_to([(k, c, k in keys) for k, c in counts.items()]), label="heldout")
        expected = [Stored(key, rank, counts.get(key, 0)) for key, rank in stored]
        assert_that(rows, equal_to(expected), label="stored")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 8), st.booleans()), max_size=60), st.integers(0, 6))
def test_candidates_hold_every_row_a_top_or_a_top_miss_needs(rows, misses):
    table = pa.table(
        {
            "key": [f"k{i}" for i in range(len(rows))],
            "count": pa.array([c for c, _ in rows], pa.int64()),
            "users": pa.nulls(len(rows), pa.int64()),
            "hit": [h for _, h in rows],
        }
    )
    histogram: dict[int, int] = {}
    for count, _ in rows:
        histogram[count] = histogram.get(count, 0) + 1
    plans = top_plans(histogram)
    got = list(candidate_rows(table, plans, misses))
    every = [HeldOut(f"k{i}", c, None, h) for i, (c, h) in enumerate(rows)]
    for plan in plans.values():  # every row at or above a top's threshold
        if plan["threshold"] is not None:
            assert {r for r in every if r.count >= plan["threshold"]} <= set(got)
    top = sorted((r for r in every if not r.hit), key=lambda r: (-r.count, key_bytes(r.key)))[:misses]
    assert set(top) <= set(got)  # the most frequent misses, whatever the ties
    only_misses = list(candidate_rows(table, {}, misses))  # small logs: the tops above hold every row
    assert set(top) <= set(only_misses) and all(not r.hit for r in only_misses)


def test_totals_of_a_table():
    table = pa.table({"key": ["a", "b", "c"], "count": [5, 2, 7], "users": [None] * 3, "hit": [True, False, True]})
    assert table_totals(table) == {"traffic": 14, "distinct_queries": 3, "hit_traffic": 12, "distinct_hits": 2}

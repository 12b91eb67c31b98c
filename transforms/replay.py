"""The composite transforms of a replay: a snapshot's keys joined with held-out counts, placed by rank.

    stored = p | ReadSnapshotKeys(["s3://b/qc/snapshots/<id>/parquet/part-00000-of-00001.parquet"])
    heldout, stored = (counts, stored) | JoinSnapshot()
    buckets = stored | PlaceByRank(boundaries=[1, 2, 3, 5, 10, 20000])

Held-out counts stay CountQueries' tables (with a ``hit`` column); :func:`candidate_rows` turns
only the rows the tops and the top misses need into HeldOut rows. Rows that cross modules are the
NamedTuples below. A snapshot's rows are ordered as the build
ordered its head: by rank (competition ranks: equal counts share one), ties by smallest UTF-8 key
bytes. Only the rank groups that straddle a boundary are sorted; every other row's bucket follows
from its rank and the size of its rank group.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.io.parquetio import ReadAllFromParquet
from apache_beam.pvalue import AsSingleton

from querycache.store.keys import key_bytes
from querycache.transforms.count import PARTITIONS, partition_of
from querycache.transforms.select_head import SmallestKeys
from querycache.transforms.selection import Selection, plan_head

STORED, CUT, TIED = "stored", "cut", "tied"


class HeldOut(NamedTuple):
    """One distinct held-out query: its key, weighted count, distinct users (or None) and whether it hits."""

    key: str
    count: int
    users: int | None
    hit: bool


class Stored(NamedTuple):
    """One snapshot row with the traffic its key got in the held-out logs (0 when absent)."""

    key: str
    rank: int
    count: int


class ReadSnapshotKeys(beam.PTransform):
    """``p | ReadSnapshotKeys(parquet_paths)`` -> ``(key, rank)`` of every snapshot row, on any Beam filesystem."""

    def __init__(self, paths: list[str]):
        super().__init__()
        self.paths = paths

    def expand(self, pbegin):
        return (
            pbegin
            | "Files" >> beam.Create(self.paths)
            | "Read" >> ReadAllFromParquet(columns=["key", "rank"])
            | "KeyRank" >> beam.Map(lambda row: (row["key"], row["rank"]))
        )


def _join(partition: int, grouped: dict):
    """One partition's held-out counts (a table) and snapshot rows -> the counts with ``hit``, and Stored rows."""
    tables, stored = list(grouped["heldout"]), list(grouped["stored"])
    keys = pa.array([key for key, _ in stored], pa.string())
    traffic = [0] * len(stored)
    if tables:
        counts = pa.concat_tables(tables)
        yield counts.append_column("hit", pc.is_in(counts.column("key"), value_set=keys))
        found = pc.index_in(keys, value_set=counts.column("key"))
        traffic = pc.fill_null(pc.take(counts.column("count"), found), 0).to_pylist()
    for (key, rank), count in zip(stored, traffic):
        yield beam.pvalue.TaggedOutput(STORED, Stored(key, rank, count))


def _partition(counts: pa.Table, partitions: int) -> int:
    """The partition of a table of CountQueries: every key of it is in its first key's."""
    return partition_of(counts.column("key")[0].as_py(), partitions)


class JoinSnapshot(beam.PTransform):
    """``(counts, stored) | JoinSnapshot()`` -> ``(heldout, stored)``: tables and Stored rows.

    ``counts`` holds the tables of :class:`~querycache.transforms.count.CountQueries` (one per
    partition of the key space); ``stored`` holds ``(key, rank)``. They meet per partition, so no
    worker sees all keys: ``heldout`` holds the counts tables with a ``hit`` column (the key is in
    the snapshot), ``stored`` a Stored row per snapshot row (count 0 where the logs lack its key).
    """

    def __init__(self, partitions: int = PARTITIONS):
        super().__init__()
        self.partitions = partitions

    def expand(self, pcolls):
        counts, stored = pcolls
        partitions = self.partitions
        joined = (
            {
                "heldout": counts | "ByPartition" >> beam.Map(lambda table: (_partition(table, partitions), table)),
                "stored": stored | "StoredByPartition" >> beam.Map(lambda row: (partition_of(row[0], partitions), row)),
            }
            | "CoGroup" >> beam.CoGroupByKey()
            | "Join" >> beam.FlatMapTuple(_join).with_outputs(STORED, main="heldout")
        )
        return joined.heldout, joined[STORED]


def table_totals(heldout: pa.Table) -> dict[str, int]:
    """Traffic, queries, hit traffic and hits of a table of held-out counts with ``hit``."""
    count, hit = heldout.column("count"), heldout.column("hit")
    return {
        "traffic": pc.sum(count).as_py() or 0,
        "distinct_queries": heldout.num_rows,
        "hit_traffic": pc.sum(pc.if_else(hit, count, 0)).as_py() or 0,
        "distinct_hits": pc.sum(hit.cast(pa.int64())).as_py() or 0,
    }


def candidate_rows(eligible: pa.Table, plans: dict, misses: int) -> Iterator[HeldOut]:
    """The rows of a table of eligible held-out counts (with ``hit``) that may count in a held-out top
    (a count at least a top's threshold, see :func:`top_plans`) or be among the ``misses`` most frequent
    misses (ties at the last kept): what :class:`MissedInTops` and :class:`TopMisses` need, as rows."""
    counts = eligible.column("count").to_numpy()
    hit = eligible.column("hit").to_numpy(zero_copy_only=False)
    thresholds = [plan["threshold"] for plan in plans.values() if plan["threshold"] is not None]
    keep = counts >= min(thresholds) if thresholds else np.zeros(len(counts), bool)
    missed = np.flatnonzero(~hit)
    if misses > 0 and missed.size:
        last = np.sort(counts[missed])[::-1][min(misses, missed.size) - 1]
        keep[missed[counts[missed] >= last]] = True
    rows = eligible.filter(pa.array(keep))
    for key, count, users, hit in zip(*(rows.column(name).to_pylist() for name in ("key", "count", "users", "hit"))):
        yield HeldOut(key, count, users, hit)


class Histogram(beam.PTransform):
    """``rows | Histogram(lambda row: row.count)`` -> one dict ``{value: rows with that value}``."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def expand(self, rows):
        return (
            rows
            | "Values" >> beam.Map(self.value)
            | "PerValue" >> beam.combiners.Count.PerElement()
            | "ToDict" >> beam.combiners.ToDict()
        )


def _bucket(boundaries: list[int], position: int) -> int:
    """The smallest boundary at or after ``position`` (the last one past the end)."""
    return boundaries[min(bisect.bisect_left(boundaries, position), len(boundaries) - 1)]


def _place(row: Stored, groups: dict, boundaries: list[int]):
    end = row.rank + groups[row.rank] - 1  # the group's positions are rank .. end
    inside = bisect.bisect_left(boundaries, row.rank)
    if inside < len(boundaries) and boundaries[inside] < end:  # a boundary cuts the group: sort it
        yield beam.pvalue.TaggedOutput(CUT, (row.rank, (key_bytes(row.key), row.count)))
    else:
        yield _bucket(boundaries, end), row.count


def _place_sorted(group: tuple[int, Iterable[tuple[bytes, int]]], boundaries: list[int]):  # GroupByKey's output
    rank, rows = group
    for i, (_, count) in enumerate(sorted(rows)):
        yield _bucket(boundaries, rank + i), count


class PlaceByRank(beam.PTransform):
    """``stored | PlaceByRank(boundaries)`` -> ``(boundary, held-out count)`` for every snapshot row.

    A row's boundary is the smallest one at or after its position in the build's order, so the
    held-out traffic of the snapshot's first N rows is the sum over boundaries up to N (N a boundary).
    """

    def __init__(self, boundaries: list[int]):
        super().__init__()
        self.boundaries = sorted(boundaries)

    def expand(self, stored):
        groups = stored | "GroupSizes" >> Histogram(lambda row: row.rank)
        placed = stored | "Place" >> beam.FlatMap(
            _place, groups=AsSingleton(groups), boundaries=self.boundaries
        ).with_outputs(CUT, main="placed")
        in_cut_groups = (
            placed[CUT]
            | "CutGroups" >> beam.GroupByKey()
            | "SortByKey" >> beam.FlatMap(_place_sorted, boundaries=self.boundaries)
        )
        return (placed.placed, in_cut_groups) | "Placed" >> beam.Flatten()


TOPS = {"heldout_top_1pct": lambda n: math.ceil(n / 100), "heldout_top_1000": lambda n: min(n, 1000)}
"""The held-out tops whose misses measure drift: a size for each, from the number of eligible queries."""


def top_plans(histogram: dict[int, int]) -> dict[str, dict]:
    """For each of TOPS, the head plan of the held-out logs' own top N (threshold and tie quota)."""
    eligible = sum(histogram.values())
    return {name: plan_head(histogram, 0, Selection("top_k", size(eligible))) for name, size in TOPS.items()}


def _in_tops(row: HeldOut, plans: dict):
    for name, plan in plans.items():
        threshold, quota = plan["threshold"], plan["take_at_threshold"]
        if threshold is None or row.count < threshold:
            continue
        if row.count > threshold or quota is None:
            if not row.hit:
                yield name
        else:
            yield beam.pvalue.TaggedOutput(TIED, (name, (quota, row)))


class MissedInTops(beam.PTransform):
    """``(rows, histogram) | MissedInTops()`` -> one name of TOPS per top held-out query the snapshot misses.

    Ties at a top's threshold go to the smallest key bytes, as in a build's ``--top-k``.
    """

    def expand(self, pcolls):
        eligible, histogram = pcolls
        plans = histogram | "Plans" >> beam.Map(top_plans)
        split = eligible | "Tops" >> beam.FlatMap(_in_tops, plans=AsSingleton(plans)).with_outputs(TIED, main="above")
        tied = (
            split[TIED]
            | "SmallestKeys" >> beam.CombinePerKey(SmallestKeys())
            | "TiedMisses" >> beam.FlatMapTuple(lambda name, rows: [name for row in rows if not row.hit])
        )
        return (split.above, tied) | "Missed" >> beam.Flatten()


class TopMisses(beam.PTransform):
    """``rows | TopMisses(20)`` -> one list of the most frequent misses, ``{"key", "count"}``, ties by key."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def expand(self, eligible):
        return (
            eligible
            | "Misses" >> beam.Filter(lambda row: not row.hit)
            | "Top" >> beam.combiners.Top.Of(self.n, key=lambda row: (-row.count, key_bytes(row.key)), reverse=True)
            | "AsDicts" >> beam.Map(lambda rows: [{"key": row.key, "count": row.count} for row in rows])
        )

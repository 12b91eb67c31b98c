"""SelectHead: tables of (key, count, users) -> the head, ranked, after the privacy filters.

Each partition's table is screened and reduced column-wise: the PII scrub runs in Python only on keys
that could be personal (:func:`maybe_personal`: what one of its patterns needs at least), the
histogram of counts is summed per table. Thresholds come from that global histogram (one small dict);
the tables are then filtered in parallel. No step gathers all distinct queries on one worker: only
the head becomes rows, and the queries tied at the threshold (each table's smallest keys first) pass
through a bounded combiner that keeps the ones with the smallest keys.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.metrics import Metrics
from apache_beam.pvalue import AsSingleton

from querycache.store.keys import key_bytes
from querycache.transforms.count import count_rows
from querycache.transforms.privacy import pii_reason
from querycache.transforms.progress import tick
from querycache.transforms.selection import Selection, plan_head
from querycache.transforms.stats import sum_dicts

DROPPED, TIED = "dropped", "tied"
log = logging.getLogger(__name__)


DIGIT = r"\p{Nd}"  # a decimal digit of any script: RE2's class holds every character Python's \d matches


def maybe_personal(keys: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Whether :func:`pii_reason` may find each key personal: what one of its patterns needs at least
    is there ("@"; two colons; 7 decimal digits; 4 digits and 3 dots). Only those keys go to Python."""
    digits = pc.count_substring_regex(keys, DIGIT)
    dots, colons = pc.count_substring(keys, "."), pc.count_substring(keys, ":")
    ip4 = pc.and_(pc.greater_equal(digits, 4), pc.greater_equal(dots, 3))
    some = [pc.match_substring(keys, "@"), pc.greater_equal(colons, 2), pc.greater_equal(digits, 7), ip4]
    return functools.reduce(pc.or_, some)


def privacy_reasons(counts: pa.Table, min_users: int | None, scrub_pii: bool) -> list[str | None]:
    """Why each row of a table of ``key, count, users`` is kept out of the head: its key looks
    personal (``pii_reason``), or fewer than ``min_users`` issued it; None when neither."""
    keys = counts.column("key")
    reasons: list[str | None] = [None] * counts.num_rows
    if scrub_pii:
        maybe = maybe_personal(keys)
        for i in np.flatnonzero(maybe.to_numpy(zero_copy_only=False)):
            reasons[i] = pii_reason(keys[int(i)].as_py())
    if min_users:
        few = pc.less(pc.fill_null(counts.column("users"), 0), min_users).to_numpy(zero_copy_only=False)
        for i in np.flatnonzero(few):
            reasons[i] = reasons[i] or "min_users"
    return reasons


class _ScreenTables(beam.DoFn):
    """A table of counts -> its eligible rows (a table) and ``{reason: queries}`` of the rest."""

    def __init__(self, min_users: int | None, scrub_pii: bool):
        self.min_users, self.scrub_pii = min_users, scrub_pii

    def process(self, counts: pa.Table):
        reasons = privacy_reasons(counts, self.min_users, self.scrub_pii)
        dropped = Counter(reason for reason in reasons if reason)
        if dropped:
            yield beam.pvalue.TaggedOutput(DROPPED, dict(dropped))
            counts = counts.filter(pa.array([reason is None for reason in reasons]))
        if counts.num_rows:
            yield counts


class ScreenPrivacy(beam.PTransform):
    """``counts | ScreenPrivacy(min_users=5)`` -> ``(eligible, dropped)``: the privacy filters of a build.

    ``counts`` holds tables of ``key, count, users`` (and any other columns); a row is dropped when its
    key looks personal (PII scrub) or, with ``min_users``, fewer distinct users issued it.
    ``eligible`` holds the tables of the rest; ``dropped`` holds ``{reason: queries}`` dicts.
    """

    def __init__(self, min_users: int | None = None, scrub_pii: bool = True):
        super().__init__()
        self.min_users, self.scrub_pii = min_users, scrub_pii

    def expand(self, counts):
        screened = counts | beam.ParDo(_ScreenTables(self.min_users, self.scrub_pii)).with_outputs(
            DROPPED, main="eligible"
        )
        return screened.eligible, screened[DROPPED]


class SmallestKeys(beam.CombineFn):
    """Keep the ``quota`` rows with the smallest key bytes; elements are ``(quota, row)``."""

    def create_accumulator(self):
        return 0, []

    def add_input(self, acc, element):
        quota, rows = acc[0] or element[0], acc[1]
        rows.append(element[1])
        return self._trim(quota, rows) if len(rows) > 2 * quota else (quota, rows)

    def merge_accumulators(self, accs):
        accs = list(accs)
        quota = max(a[0] for a in accs)
        return self._trim(quota, [row for a in accs for row in a[1]])

    def extract_output(self, acc):
        return self._trim(*acc)[1]

    @staticmethod
    def _trim(quota, rows):
        rows.sort(key=lambda row: key_bytes(row[0]))
        return quota, rows[:quota]


def _split(counts: pa.Table, plan: dict):
    """Rows above the threshold go to the head; of the rows at it, the ``take_at_threshold`` with the
    smallest keys compete for the tie quota."""
    threshold, quota = plan["threshold"], plan["take_at_threshold"]
    if threshold is None:
        return
    count = counts.column("count")
    above = counts.filter(pc.greater(count, threshold) if quota is not None else pc.greater_equal(count, threshold))
    yield from count_rows(above)
    if quota is not None:
        tied = counts.filter(pc.equal(count, threshold))  # Arrow orders strings by their UTF-8 bytes: key_bytes
        tied = tied.take(pc.sort_indices(tied, [("key", "ascending")])[:quota])
        yield from (beam.pvalue.TaggedOutput(TIED, (quota, row)) for row in count_rows(tied))


def histogram_of(counts: pa.Table) -> dict[int, int]:
    """``{count: queries with it}`` of a table."""
    pairs = pc.value_counts(counts.column("count"))
    return dict(zip(pairs.field("values").to_pylist(), pairs.field("counts").to_pylist()))


def _plan_and_report(histogram: dict, total_traffic: int, selection: Selection) -> dict:
    plan = plan_head(histogram, total_traffic, selection)
    log.info(
        "head: %d of %d eligible queries (threshold count %s), %.1f%% of traffic",
        plan["head_size"],
        sum(histogram.values()),
        plan["threshold"],
        100 * plan["head_traffic"] / total_traffic if total_traffic else 0.0,
        extra=tick("infer", total=plan["head_size"]),
    )
    Metrics.gauge("querycache", "head_size").set(plan["head_size"])
    return plan


class SelectHead(beam.PTransform):
    """``counts | SelectHead(Selection("top_k", 1000), min_users=5)`` -> ``(head, plan, dropped)``.

    ``counts`` are the tables of :class:`~querycache.transforms.count.CountQueries`. ``head`` rows are
    ``(key, count, users, rank)``; ``plan`` is the singleton of :func:`transforms.selection.plan_head`;
    ``dropped`` holds ``{reason: queries}`` dicts of the queries the privacy filters kept out.
    """

    def __init__(self, selection: Selection, min_users: int | None = None, scrub_pii: bool = True):
        super().__init__()
        self.selection, self.min_users, self.scrub_pii = selection, min_users, scrub_pii

    def expand(self, counts):
        eligible, dropped = counts | "Privacy" >> ScreenPrivacy(self.min_users, self.scrub_pii)
        total = (
            counts
            | "Traffic" >> beam.Map(lambda table: pc.sum(table.column("count")).as_py() or 0)
            | "SumTraffic" >> beam.CombineGlobally(sum)
        )
        plan = (
            eligible
            | "Counts" >> beam.Map(histogram_of)
            | "Histogram" >> beam.CombineGlobally(sum_dicts)
            | "Plan" >> beam.Map(_plan_and_report, total_traffic=AsSingleton(total), selection=self.selection)
        )
        split = eligible | "Threshold" >> beam.FlatMap(_split, plan=AsSingleton(plan)).with_outputs(TIED, main="above")
        tied = (
            split[TIED]
            | "SmallestKeys" >> beam.CombineGlobally(SmallestKeys())
            | "Unpack" >> beam.FlatMap(lambda rows: rows)
        )
        head = (
            (split.above, tied)
            | "Head" >> beam.Flatten()
            | "Rank" >> beam.Map(lambda row, plan: (*row, plan["ranks"][row[1]]), plan=AsSingleton(plan))
        )
        return head, plan, dropped

"""SelectHead: (key, count, users) -> the head, ranked, after the privacy filters.

Thresholds come from a global histogram of counts (one small dict); the rows are then filtered
in parallel. No step gathers all distinct queries on one worker: only the queries tied at the
threshold pass through a bounded combiner that keeps the ones with the smallest keys.
"""

from __future__ import annotations

import logging

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.pvalue import AsSingleton

from querycache.store.keys import key_bytes
from querycache.transforms.privacy import pii_reason
from querycache.transforms.progress import tick
from querycache.transforms.selection import Selection, plan_head

DROPPED, TIED = "dropped", "tied"
log = logging.getLogger(__name__)


class _Screen(beam.DoFn):
    def __init__(self, min_users: int | None, scrub_pii: bool):
        self.min_users, self.scrub_pii = min_users, scrub_pii

    def process(self, row):
        reason = pii_reason(row[0]) if self.scrub_pii else None
        if reason is None and self.min_users and (row[2] or 0) < self.min_users:
            reason = "min_users"
        if reason:
            yield beam.pvalue.TaggedOutput(DROPPED, reason)
        else:
            yield row


class ScreenPrivacy(beam.PTransform):
    """``counts | ScreenPrivacy(min_users=5)`` -> ``(eligible, dropped)``: the privacy filters of a build.

    A ``(key, count, users, ...)`` row is dropped when its key looks personal (PII scrub) or, with
    ``min_users``, fewer distinct users issued it; ``dropped`` holds one reason per dropped row.
    """

    def __init__(self, min_users: int | None = None, scrub_pii: bool = True):
        super().__init__()
        self.min_users, self.scrub_pii = min_users, scrub_pii

    def expand(self, counts):
        screened = counts | beam.ParDo(_Screen(self.min_users, self.scrub_pii)).with_outputs(DROPPED, main="eligible")
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


def _split(row, plan):
    """Rows above the threshold go to the head; rows at it compete for the tie quota."""
    threshold, quota = plan["threshold"], plan["take_at_threshold"]
    if threshold is None or row[1] < threshold:
        return
    if row[1] > threshold or quota is None:
        yield row
    else:
        yield beam.pvalue.TaggedOutput(TIED, (quota, row))


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

    ``head`` rows are ``(key, count, users, rank)``; ``plan`` is the singleton of
    :func:`transforms.selection.plan_head`; ``dropped`` holds one privacy reason per dropped query.
    """

    def __init__(self, selection: Selection, min_users: int | None = None, scrub_pii: bool = True):
        super().__init__()
        self.selection, self.min_users, self.scrub_pii = selection, min_users, scrub_pii

    def expand(self, counts):
        eligible, dropped = counts | "Privacy" >> ScreenPrivacy(self.min_users, self.scrub_pii)
        total = counts | "Traffic" >> beam.Map(lambda row: row[1]) | "SumTraffic" >> beam.CombineGlobally(sum)
        plan = (
            eligible
            | "Counts" >> beam.Map(lambda row: row[1])
            | "Histogram" >> beam.combiners.Count.PerElement()
            | "ToDict" >> beam.combiners.ToDict()
            | "Plan" >> beam.Map(_plan_and_report, total_traffic=AsSingleton(total), selection=self.selection)
        )
        split = eligible | "Threshold" >> beam.FlatMap(_split, plan=AsSingleton(plan)).with_outputs(TIED, main="above")
        tied = (
            split[TIED]
            | "SmallestKeys" >> beam.CombineGlobally(SmallestKeys())
            | "Unpack" >> beam.FlatMap(lambda rows: rows)
        )
        above = split.above
        head = (
            (above, tied)
            | "Head" >> beam.Flatten()
            | "Rank" >> beam.Map(lambda row, plan: (*row, plan["ranks"][row[1]]), plan=AsSingleton(plan))
        )
        return head, plan, dropped

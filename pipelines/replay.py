"""The replay pipeline: held-out query logs against a snapshot -> hit rates, curves, misses, drift.

    figures = replay(ReplayOptions(snapshot="/data/qc", logs=("logs/2026-11-03.jsonl",)), ["--runner=FnApiRunner"])
    figures["traffic_hit_rate"], figures["curve"], figures["top_misses"]

The logs are read exactly as ``build`` reads them (same transforms, dead letters, key function,
weights, query checks of the snapshot's build) and joined with the snapshot's keys, read from its
Parquet files on any Beam filesystem. :func:`figures` turns the pipeline's small statistics into
the report's figures; it is plain Python, so it runs wherever the last step of the pipeline runs.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions
from apache_beam.pvalue import AsSingleton

from querycache.pipelines.checks import BuildError, check_accepted, check_logs
from querycache.pipelines.snapshot_files import SnapshotFiles, locate_snapshot
from querycache.transforms.count import CountQueries
from querycache.transforms.normalize import NormalizeQueries
from querycache.transforms.read_logs import ReadQueryLogs, Truncations, lines_read
from querycache.transforms.records import LogFields
from querycache.transforms.replay import (
    TOPS,
    JoinSnapshot,
    MissedInTops,
    PlaceByRank,
    ReadSnapshotKeys,
    TopMisses,
    candidate_rows,
    table_totals,
    top_plans,
)
from querycache.transforms.select_head import ScreenPrivacy, histogram_of
from querycache.transforms.selection import Selection, plan_head
from querycache.transforms.stats import BY_VALUE, ITEMS, MERGE, SUM, GatherStats, sum_dicts

STATISTICS = {
    "lines_read": SUM, "accepted": ITEMS, "rejected_by_reason": BY_VALUE, "totals": MERGE,
    "dropped_for_privacy": MERGE, "histogram": MERGE, "bucket_traffic": MERGE, "bucket_absent": MERGE,
    "missed_in_tops": BY_VALUE, "truncated_files": MERGE,
}  # fmt: skip
SNAPSHOT_TOP = 1000


@dataclass(frozen=True)
class ReplayOptions:
    """A replay: the snapshot, the held-out logs and how to read them, and the privacy filters of the misses.

    ``min_users`` and ``scrub_pii`` default (None) to the snapshot's build; ``min_users=0`` turns the
    distinct-user check off.
    """

    snapshot: str
    logs: tuple[str, ...]
    fields: LogFields = field(default_factory=LogFields)
    min_users: int | None = None
    scrub_pii: bool | None = None
    top_misses: int = 20


@dataclass(frozen=True)
class Plan:
    """What the pipeline needs from the driver: the snapshot's files and facts, and the resolved filters."""

    snapshot: SnapshotFiles
    min_users: int | None
    scrub_pii: bool
    head_sizes: list[int]


def head_sizes(rows: int) -> list[int]:
    """Head sizes of the curves: 1, 2, 3, 5, 7, 10, 20, ... below ``rows`` (a log scale), then ``rows``."""
    sizes, scale = [], 1
    while scale < rows:
        sizes += [m * scale for m in (1, 2, 3, 5, 7) if m * scale < rows]
        scale *= 10
    return [*sizes, rows]


def replay_pipeline(p: beam.Pipeline, options: ReplayOptions, plan: Plan, out: str) -> None:
    """Read, normalise and count held-out logs as a build does; join them with the snapshot; write figures."""
    build = plan.snapshot.manifest.get("build", {})
    model = plan.snapshot.manifest["model"]
    template = model.get("template") if plan.snapshot.manifest["task"] == "fill-mask" else None
    records, unreadable, parts = p | "ReadQueryLogs" >> ReadQueryLogs(list(options.logs), options.fields)
    lines = lines_read(parts)
    keys, invalid = records | "NormalizeQueries" >> NormalizeQueries(build.get("max_query_chars", 512), template)
    counts = keys | "CountQueries" >> CountQueries(users=options.fields.user is not None)
    stored = p | "ReadSnapshotKeys" >> ReadSnapshotKeys(plan.snapshot.parquet)
    heldout, stored = (counts, stored) | "JoinSnapshot" >> JoinSnapshot()
    placed = stored | "PlaceByRank" >> PlaceByRank(sorted({*plan.head_sizes, SNAPSHOT_TOP}))
    eligible, dropped = heldout | "ScreenPrivacy" >> ScreenPrivacy(plan.min_users, plan.scrub_pii)
    histogram = eligible | "Counts" >> beam.Map(histogram_of) | "Histogram" >> beam.CombineGlobally(sum_dicts)
    plans = histogram | "Plans" >> beam.Map(top_plans)
    rows = eligible | "Candidates" >> beam.FlatMap(candidate_rows, AsSingleton(plans), options.top_misses)
    missed = (rows, histogram) | "MissedInTops" >> MissedInTops()
    misses = rows | "TopMisses" >> TopMisses(options.top_misses)
    stats = {
        "lines_read": lines, "accepted": keys, "dropped_for_privacy": dropped, "histogram": histogram,
        "rejected_by_reason": (unreadable, invalid) | "Rejected" >> beam.Flatten() | beam.Map(lambda r: r["reason"]),
        "totals": heldout | "Totals" >> beam.Map(table_totals),
        "bucket_traffic": placed | "Traffic" >> beam.MapTuple(lambda bucket, count: {bucket: count}),
        "bucket_absent": placed | "Absent" >> beam.MapTuple(lambda bucket, count: {bucket: int(count == 0)}),
        "missed_in_tops": missed, "truncated_files": unreadable | "Truncations" >> Truncations(),
    } | "GatherStats" >> GatherStats(STATISTICS)  # fmt: skip
    _ = p | "Start" >> beam.Create([out]) | "WriteFigures" >> beam.Map(
        _write_figures, plan, stats=AsSingleton(stats), misses=AsSingleton(misses))  # fmt: skip


def _write_figures(out: str, plan: Plan, stats: dict, misses: list) -> None:
    with FileSystems.create(out) as fh:
        fh.write(json.dumps(figures(stats, misses, plan)).encode("utf-8"))


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def figures(stats: dict, misses: list, plan: Plan) -> dict:
    """The replay's figures (the ``--json`` output of ``querycache replay``) from the pipeline's statistics."""
    manifest = plan.snapshot.manifest
    totals, histogram = stats["totals"], stats["histogram"]
    traffic, hits = totals.get("traffic", 0), totals.get("hit_traffic", 0)

    def up_to(buckets: dict, n: int) -> int:
        return sum(v for bucket, v in buckets.items() if bucket <= n)

    def point(n: int, covered: int) -> dict:
        return {"head_size": n, "traffic_hit_rate": _share(covered, traffic)}

    cost = seconds_per_query(manifest)
    return {
        "snapshot_id": manifest["snapshot_id"],
        "lines_read": stats["lines_read"],
        "accepted": stats["accepted"],
        "rejected": sum(stats["rejected_by_reason"].values()),
        "rejected_by_reason": stats["rejected_by_reason"],
        "truncated_files": stats["truncated_files"],
        "traffic": traffic,
        "hit_traffic": hits,
        "traffic_hit_rate": _share(hits, traffic),
        "distinct_queries": totals.get("distinct_queries", 0),
        "distinct_hits": totals.get("distinct_hits", 0),
        "unique_hit_rate": _share(totals.get("distinct_hits", 0), totals.get("distinct_queries", 0)),
        "curve": [point(n, up_to(stats["bucket_traffic"], n)) for n in plan.head_sizes],
        "hindsight_curve": [
            point(n, plan_head(histogram, traffic, Selection("top_k", n))["head_traffic"]) for n in plan.head_sizes
        ],
        "top_misses": misses,
        "drift": _drift(stats, manifest["rows"], up_to(stats["bucket_absent"], SNAPSHOT_TOP)),
        "compute_saved": {
            "seconds_per_query": cost,
            "seconds": None if cost is None else hits * cost,
            "share": _share(hits, traffic),
        },
        "privacy": {"min_users": plan.min_users, "scrub_pii": plan.scrub_pii, "dropped": stats["dropped_for_privacy"]},
        "snapshot": snapshot_facts(manifest),
    }


def _drift(stats: dict, rows: int, absent: int) -> dict:
    """Misses among the held-out tops (eligible queries, ties by key) and the snapshot's top rows gone quiet."""
    tops = top_plans(stats["histogram"])
    drift = {
        name: {"queries": tops[name]["head_size"], "missed": stats["missed_in_tops"].get(name, 0)} for name in TOPS
    }
    for part in drift.values():
        part["share"] = _share(part["missed"], part["queries"])
    top = min(SNAPSHOT_TOP, rows)
    return drift | {"snapshot_top_1000": {"queries": top, "absent": absent, "share": _share(absent, top)}}


def seconds_per_query(manifest: dict) -> float | None:
    """Inference cost per query measured by the snapshot's build (or the one it reused), None if unknown."""
    recorded = (manifest.get("inference_cost") or {}).get("seconds_per_query")
    if recorded:
        return recorded
    inference = (manifest.get("stats") or {}).get("inference") or {}
    return inference["seconds"] / inference["queries"] if inference.get("queries") else None


def snapshot_facts(manifest: dict) -> dict:
    """The manifest's key facts for a report: id, created, task, rows, model and selection."""
    model = manifest["model"]
    return {
        "id": manifest["snapshot_id"],
        "created": manifest["created"],
        "task": manifest["task"],
        "rows": manifest["rows"],
        "model": {k: model.get(k) for k in ("fingerprint", "architecture", "model_dir", "dtype")},
        "selection": {k: v for k, v in (manifest.get("selection") or {}).items() if k in ("mode", "value")},
    }


def _plan(options: ReplayOptions) -> Plan:
    snapshot = locate_snapshot(options.snapshot)
    build = snapshot.manifest.get("build") or {}
    min_users = build.get("min_users") if options.min_users is None else (options.min_users or None)
    scrub_pii = build.get("scrub_pii", True) if options.scrub_pii is None else options.scrub_pii
    if min_users and options.fields.user is None:
        raise BuildError(
            f"snapshot {snapshot.manifest['snapshot_id']} was built with --min-users {min_users}: pass --user-field "
            "so the misses shown pass the same check (or --min-users 0 to skip it)"
        )
    return Plan(snapshot, min_users, scrub_pii, head_sizes(snapshot.manifest["rows"]))


@contextmanager
def _scratch(pipeline_options: PipelineOptions) -> Iterator[str]:
    """A path for the figures that the pipeline's last step and the driver both reach."""
    temp = pipeline_options.view_as(GoogleCloudOptions).temp_location
    if temp:
        path = FileSystems.join(temp, f"querycache-replay-{secrets.token_hex(8)}.json")
        try:
            yield path
        finally:
            if FileSystems.exists(path):
                FileSystems.delete([path])
        return
    directory = tempfile.mkdtemp(prefix="querycache-replay-")
    try:
        yield os.path.join(directory, "figures.json")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def replay(options: ReplayOptions, beam_args: list[str]) -> dict:
    """Run a replay; return its figures. Raises BuildError or SnapshotError for user mistakes."""
    started = time.perf_counter()
    pipeline_options = PipelineOptions(beam_args)
    FileSystems.set_options(pipeline_options)  # endpoints and credentials of remote logs and snapshots
    check_logs(options.logs, options.fields)
    plan = _plan(options)
    with _scratch(pipeline_options) as out:
        with beam.Pipeline(options=pipeline_options) as p:
            replay_pipeline(p, options, plan, out)
        with FileSystems.open(out) as fh:
            result = json.loads(fh.read())
    check_accepted(options.logs, result["accepted"], result["rejected_by_reason"])
    return result | {"seconds": round(time.perf_counter() - started, 2)}

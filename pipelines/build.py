"""The build pipeline: query logs -> head -> results -> a published snapshot.

    summary = build(BuildOptions(logs=["logs/*.jsonl"], out="/data/qc"), beam_args=["--runner=FnApiRunner"])

``build_pipeline`` is the data path of the design, one named composite transform per arrow;
``build`` is the driver around it: checks, staging directory, fidelity gate, publish, summary.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pvalue import AsList, AsSingleton

from querycache.inference.engine import Engine, EngineConfig
from querycache.pipelines.checks import BuildError, check_logs, fidelity_gate, previous_snapshot
from querycache.pipelines.watch import run_and_watch
from querycache.store import fs, remote
from querycache.store.format import SnapshotError, new_manifest, read_manifest, stats_problems
from querycache.store.publish import current_id, discard_staging, new_snapshot_id, new_staging, publish
from querycache.store.remote import SnapshotRef
from querycache.store.writer import save_manifest
from querycache.transforms.count import CountQueries
from querycache.transforms.infer import ReuseOrInfer, share_engine
from querycache.transforms.model_stage import ShippedModel, ship_model
from querycache.transforms.normalize import NormalizeQueries
from querycache.transforms.read_logs import UNMATCHED, FileLineNumbers, ReadQueryLogs, Truncations, lines_read
from querycache.transforms.records import LogFields
from querycache.transforms.select_head import SelectHead
from querycache.transforms.selection import Selection
from querycache.transforms.stats import BY_VALUE, COUNT, ITEMS, MERGE, SUM, GatherStats
from querycache.transforms.write_snapshot import WriteDeadLetters, WriteSnapshot, commit, shards_for

log = logging.getLogger(__name__)
STATISTICS = {
    "lines_read": SUM, "accepted": ITEMS, "distinct_queries": ITEMS, "reused": COUNT,
    "rejected_by_reason": BY_VALUE, "dropped_for_privacy": MERGE, "unanswered": BY_VALUE, "inference": MERGE,
    "truncated_files": MERGE,
}  # fmt: skip


@dataclass(frozen=True)
class BuildOptions:
    """Everything a build needs besides the Beam runner options."""

    logs: tuple[str, ...]
    out: str
    engine: EngineConfig = field(default_factory=EngineConfig)
    fields: LogFields = field(default_factory=LogFields)
    selection: Selection = field(default_factory=Selection)
    min_users: int | None = None
    scrub_pii: bool = True
    max_query_chars: int = 512
    shards: int | None = None  # None: sized by the head (transforms.write_snapshot.shards_for)
    reuse: bool = True
    store_dtype: str = "float32"
    fidelity_sample: int = 256
    min_cosine: float = 0.999
    min_agreement: float = 0.99
    max_prob_diff: float = 0.01


def build_pipeline(
    p: beam.Pipeline,
    options: BuildOptions,
    model: ShippedModel,
    schema: dict,
    staging: str,
    manifest: dict,
    previous: SnapshotRef | None,
) -> None:
    """The data path of ../shared/DESIGN.md, one composite transform per arrow."""
    template = model.config.template if model.config.task == "fill-mask" else None
    records, unreadable, parts = p | "ReadQueryLogs" >> ReadQueryLogs(list(options.logs), options.fields)
    lines = lines_read(parts)
    keys, invalid = records | "NormalizeQueries" >> NormalizeQueries(options.max_query_chars, template)
    counts = keys | "CountQueries" >> CountQueries(users=options.fields.user is not None)
    head, plan, dropped = counts | "SelectHead" >> SelectHead(options.selection, options.min_users, options.scrub_pii)
    computed, reused, inference, unanswered = head | "ReuseOrInfer" >> ReuseOrInfer(model, schema, previous)
    shard_count = plan | "ShardCount" >> beam.Map(lambda plan: options.shards or shards_for(plan["head_size"], schema))
    shards = (computed, reused) | "WriteSnapshot" >> WriteSnapshot(staging, shard_count, schema, previous)
    rejected = (unreadable, invalid) | "DeadLetters" >> beam.Flatten() | "FileLineNumbers" >> FileLineNumbers(parts)
    dead_files = rejected | "WriteDeadLetters" >> WriteDeadLetters(staging)
    stats = {
        "lines_read": lines, "accepted": keys, "distinct_queries": counts, "reused": reused,
        "rejected_by_reason": rejected | "Reasons" >> beam.Map(lambda r: r["reason"]),
        "dropped_for_privacy": dropped, "unanswered": unanswered, "inference": inference,
        "truncated_files": unreadable | "Truncations" >> Truncations(),
    } | "GatherStats" >> GatherStats(STATISTICS)  # fmt: skip
    _ = p | "Start" >> beam.Create([staging]) | "CommitSnapshot" >> beam.Map(
        _finalize, manifest, shards=AsList(shards), dead_files=AsList(dead_files), stats=AsSingleton(stats),
        plan=AsSingleton(plan))  # fmt: skip


def _finalize(staging: str, manifest: dict, shards: list, dead_files: list, stats: dict, plan: dict) -> None:
    rejected_files = {rel: meta for info in dead_files for rel, meta in info.items()}
    stats = dict(stats)  # a side input is read-only: a runner may hand the same dict to a retried bundle
    inference = stats.pop("inference") or {}
    rows = sum({w.index: w.rows for w in shards}.values())  # one write per shard counts, as in commit
    stats |= {
        "rejected": sum(stats["rejected_by_reason"].values()),
        "accepted_traffic": plan["total_traffic"],
        "head_size": plan["head_size"],
        "head_traffic": plan["head_traffic"],
        "traffic_covered": plan["head_traffic"] / plan["total_traffic"] if plan["total_traffic"] else 0.0,
        "computed": rows - stats["reused"],
        "inference": inference
        | {"queries_per_second": inference["queries"] / inference["seconds"] if inference.get("seconds") else 0.0},
    }
    selection = {
        **plan["selection"],
        "threshold": plan["threshold"],
        "take_at_threshold": plan["take_at_threshold"],
        "ties": "smallest UTF-8 key bytes first",
        "rank": "1 + head queries with a greater count",
    }
    head = {**manifest, "stats": stats, "selection": selection, "rejected": sorted(rejected_files)}
    commit(staging, head | {"inference_cost": _inference_cost(manifest, inference)}, shards, rejected_files)


def _inference_cost(manifest: dict, inference: dict) -> dict | None:
    """Engine seconds per query measured here, or those of the snapshot whose results were all reused."""
    if not inference.get("queries"):
        return manifest.get("inference_cost")
    return {
        "seconds_per_query": inference["seconds"] / inference["queries"],
        "queries": inference["queries"],
        "measured_in": manifest["snapshot_id"],
        "dtype": manifest["model"].get("dtype"),
        "device": manifest["model"].get("device"),
    }


def build(options: BuildOptions, beam_args: list[str]) -> dict:
    """Run a build and publish its snapshot; return the summary. Raises BuildError for user mistakes."""
    started = time.perf_counter()
    fs.configure(beam_args)
    FileSystems.set_options(PipelineOptions(beam_args))
    options = absolute_paths(options)
    check_logs(options.logs, options.fields)
    model, engine = ship_model(options.engine)
    settings = ", ".join(f"{name.replace('_', ' ')} {value}" for name, value in engine.settings.items())
    log.info("model %s: %s; fingerprint %s", model.source, settings, engine.fingerprint[:16])
    schema = engine.schema | ({"encoding": options.store_dtype} if engine.config.task == "embed" else {})
    expected = _current(options.out)
    previous = previous_snapshot(options.out, engine.fingerprint, schema) if options.reuse else None
    snapshot_id = new_snapshot_id()
    staging = _staging(options.out, snapshot_id)
    describe = engine.describe() | {"model_dir": model.source}
    manifest = new_manifest(
        snapshot_id, engine.config.task, schema, describe,
        reused_from=previous and previous.manifest["snapshot_id"], build=_recorded_options(options),
        inference_cost=previous and previous.manifest.get("inference_cost"),
    )  # fmt: skip
    try:
        with share_engine(engine):
            _run(options, beam_args, model, schema, staging, manifest, previous)
        manifest = _gate_and_publish(options, engine, staging, previous, expected)
    except BaseException as err:
        _discard(staging)
        why = _storage_full(err)
        if why:
            raise OSError(
                errno.ENOSPC,
                f"{options.out}: no room to write the snapshot ({why}); free space there (or raise the file-size "
                "limit) and rebuild; nothing was published and the current snapshot stays",
            ) from None
        raise
    return summary(manifest, time.perf_counter() - started)


_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def _storage_full(err: BaseException | None) -> str | None:
    """The reason when ``err`` (or what caused it, maybe inside a worker) is a full disk or a file-size limit."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _FULL:
            return err.strerror
        text = str(err)
        if "mdb_txn_commit" in text and os.strerror(errno.EIO) in text:  # LMDB reports a failed write as EIO
            return "LMDB could not write its pages: disk full, a file-size limit or an I/O error"
        why = next((os.strerror(e) for e in _FULL if os.strerror(e) in text), None)
        if why:
            return why
        err = err.__cause__ or err.__context__
    return None


def _run(options, beam_args, model, schema, staging, manifest, previous) -> None:
    try:
        p = beam.Pipeline(options=PipelineOptions(beam_args))
        build_pipeline(p, options, model, schema, staging, manifest, previous)
        run_and_watch(p)
    except Exception as err:  # a worker that sees no log file: name the pattern, not the runner's traceback
        found = re.search(re.escape(UNMATCHED) + r" (.*?) on this worker", str(err))
        if found is None:
            raise
        raise BuildError(
            f"--logs {found.group(1)} matched files on the driver but none on the workers; pass a path "
            "every worker can read (object storage, or a disk they share)"
        ) from None


def absolute_paths(options: BuildOptions) -> BuildOptions:
    """Local paths made absolute on the driver, so they mean the same in every worker's directory."""

    def absolute(path: str | None) -> str | None:
        return path if path is None or fs.is_remote(path) or "://" in path else os.path.abspath(path)

    engine = dataclasses.replace(options.engine, model_dir=absolute(options.engine.model_dir))
    logs = tuple(map(absolute, options.logs))
    return dataclasses.replace(options, logs=logs, out=absolute(options.out), engine=engine)


def _current(root: str):
    return remote.current(root) if fs.is_remote(root) else current_id(root)


def _staging(root: str, snapshot_id: str) -> str:
    """Where the build writes: a hidden staging directory locally, ``snapshots/<id>/`` on object stores."""
    if fs.is_remote(root):
        return fs.join(root, remote.SNAPSHOTS, snapshot_id)
    return str(new_staging(root, snapshot_id))


def _discard(staging: str) -> None:
    if fs.is_remote(staging):
        fs.delete_dir(staging)
    else:
        discard_staging(staging)


def _gate_and_publish(options, engine: Engine, staging: str, previous: SnapshotRef | None, expected) -> dict:
    """Check the written snapshot (fidelity gate on a verified local copy when remote), then publish it."""
    remote_root = fs.is_remote(staging)
    manifest = remote.read_manifest(staging) if remote_root else read_manifest(staging)
    problems = stats_problems(manifest)
    if problems:  # a runner that loses statistics must not publish a manifest that says otherwise
        raise BuildError(f"not published: the build's statistics do not add up ({'; '.join(problems)})")
    if manifest["stats"]["accepted"] == 0:
        reasons = manifest["stats"]["rejected_by_reason"]
        top = max(reasons, key=reasons.get) if reasons else "none"
        raise BuildError(
            f"no query in {', '.join(options.logs)} was accepted (most rejections: {top}); "
            "check --format and --query-field"
        )
    computed = manifest["stats"]["computed"]
    try:
        if remote_root:
            with tempfile.TemporaryDirectory(prefix="querycache-verify-") as local:
                for rel, meta in manifest["files"].items():  # every sha256 checked while it downloads
                    fs.copy_verified(fs.join(staging, rel), os.path.join(local, rel), meta["sha256"], meta["bytes"])
                fs.write_bytes(os.path.join(local, "manifest.json"), fs.read_bytes(fs.join(staging, "manifest.json")))
                manifest["fidelity"] = fidelity_gate(local, engine, options, None, computed)
            fs.write_bytes(fs.join(staging, "manifest.json"), _manifest_bytes(manifest))
            log.info("publishing snapshot %s", manifest["snapshot_id"])
            remote.publish(options.out, manifest["snapshot_id"], expected)
        else:
            local_previous = previous and previous.directory
            manifest["fidelity"] = fidelity_gate(staging, engine, options, local_previous, computed)
            save_manifest(staging, manifest)
            log.info("publishing snapshot %s", manifest["snapshot_id"])
            publish(options.out, staging, expected)
    except (SnapshotError, ValueError) as err:
        raise BuildError(str(err)) from None
    return manifest


def _manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _recorded_options(options: BuildOptions) -> dict:
    out = dataclasses.asdict(options)
    for name in ("since", "until"):
        if out["fields"][name] is not None:
            out["fields"][name] = out["fields"][name].isoformat()
    return out


def summary(manifest: dict, seconds: float) -> dict:
    """The build summary of the design (the ``--json`` output of ``querycache build``)."""
    stats = manifest["stats"]
    keys = (
        "lines_read",
        "accepted",
        "rejected",
        "rejected_by_reason",
        "truncated_files",
        "distinct_queries",
        "head_size",
        "traffic_covered",
        "dropped_for_privacy",
        "reused",
        "computed",
    )
    return {
        "snapshot_id": manifest["snapshot_id"],
        **{k: stats[k] for k in keys},
        "inference_queries_per_second": round(stats["inference"]["queries_per_second"], 1),
        "fidelity": manifest.get("fidelity"),
        "model_fingerprint": manifest["model"]["fingerprint"],
        "seconds": round(seconds, 2),
        "peak_rss_mib": peak_rss_mib(),
    }


def peak_rss_mib() -> dict:
    """Peak resident memory of this process: the driver, and the workers of in-process runners.

    ``VmHWM`` counts this program only; ``ru_maxrss`` would include what a parent process held when
    it started this one.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):  # not Linux
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == "darwin" else 1)
    return {"driver": round(kib / 1024)}

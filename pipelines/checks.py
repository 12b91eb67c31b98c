"""Driver-side checks around a build: inputs before it, reuse source, and the fidelity gate after it."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import os
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from querycache.store import fs, remote
from querycache.store.format import SnapshotError, read_manifest
from querycache.store.publish import resolve
from querycache.store.remote import SnapshotRef
from querycache.store.snapshot import Snapshot
from querycache.transforms.progress import tick
from querycache.transforms.records import LogFields, columns_of, decompressed, format_of

if TYPE_CHECKING:  # the engine (torch) loads only where a build checks fidelity
    from querycache.inference.engine import Engine, EngineConfig

log = logging.getLogger(__name__)


class BuildError(Exception):
    """A build cannot go on; the message says which input is wrong and what to do."""


def check_logs(patterns: tuple[str, ...], fields: LogFields) -> list[str]:
    """Every pattern matches at least one non-empty file; tabular files have the named columns."""
    paths: list[str] = []
    sizes: dict[str, int] = {}  # a file matched by two patterns is read once
    for pattern in patterns:
        if os.path.isdir(pattern):
            raise BuildError(f"--logs {pattern} is a directory; pass a glob such as '{pattern.rstrip('/')}/*'")
        try:
            matched = [m for m in FileSystems.match([pattern])[0].metadata_list if m.size_in_bytes > 0]
        except Exception as err:  # Beam raises several types for a bad path or scheme
            raise BuildError(f"--logs {pattern}: {err}") from None
        if not matched:
            raise BuildError(f"--logs {pattern} matches no non-empty file; check the path or glob")
        paths.extend(m.path for m in matched)
        sizes |= {m.path: m.size_in_bytes for m in matched}
    formats = ", ".join(f"{n} {fmt}" for fmt, n in sorted(Counter(format_of(p, fields.format) for p in paths).items()))
    size = sum(sizes.values())
    log.info("reading %d log files (%d bytes): %s", len(sizes), size, formats, extra=tick("read", total=size))
    wanted = [f for f in (fields.query, fields.count, fields.user, fields.time, fields.label) if f]
    for path in {format_of(p, fields.format): p for p in paths}.values():
        with (
            FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as raw,
            decompressed(path, raw) as stream,
        ):
            columns = columns_of(path, stream, fields)
        missing = [f for f in wanted if columns is not None and f not in columns]
        if missing:
            raise BuildError(
                f"{path} has no column {missing[0]!r} (columns: {', '.join(columns)}); "
                "pass --query-field/--count-field/--user-field/--time-field/--label-field"
            )
    return paths


def check_accepted(patterns: tuple[str, ...], accepted: int, rejected_by_reason: dict) -> None:
    """Raise BuildError when no record of the logs was accepted, naming the most common rejection."""
    if accepted == 0:
        top = max(rejected_by_reason, key=rejected_by_reason.get) if rejected_by_reason else "none"
        raise BuildError(
            f"no query in {', '.join(patterns)} was accepted (most rejections: {top}); check --format and --query-field"
        )


def previous_snapshot(root: str, fingerprint: str, schema: dict) -> SnapshotRef | None:
    """The current snapshot under ``root`` (any filesystem) when it holds results of this model version and schema."""
    try:
        if fs.is_remote(root):
            directory = remote.resolve(root)
            manifest = remote.read_manifest(directory)
        else:
            directory = str(resolve(root))
            manifest = read_manifest(directory)
    except SnapshotError:
        return None
    if manifest["model"]["fingerprint"] != fingerprint or manifest["result"] != schema:
        log.info("model version changed since snapshot %s: computing every result", manifest["snapshot_id"])
        return None
    log.info("reusing results of snapshot %s (same model version)", manifest["snapshot_id"])
    return SnapshotRef(directory, manifest)


def _sample(snapshot: Snapshot, size: int, previous: Snapshot | None) -> list[str]:
    """A stable sample of the computed keys (reused ones passed the gate of their own build)."""
    ordered = sorted(snapshot, key=lambda k: hashlib.sha256(k.encode("utf-8")).digest())
    computed = (k for k in ordered if previous is None or previous.get_raw(k) is None)
    return list(itertools.islice(computed, size))


def fidelity_gate(staging: os.PathLike, engine: Engine, options, previous: os.PathLike | None, computed: int) -> dict:
    """Compare a sample of the computed answers with an fp32 forward pass; raise BuildError below threshold.

    Reused answers passed the gate of their own build; with nothing computed there is nothing to check.
    """
    from querycache.inference.engine import Engine

    if not options.fidelity_sample or not computed:
        return {"sample": 0, "passed": True}
    with Snapshot.open(staging, verify=False) as snapshot:
        before = Snapshot.open(previous, verify=False) if previous else None
        keys = _sample(snapshot, options.fidelity_sample, before)
        stored = [snapshot.get_key(k) for k in keys]
        if before is not None:
            before.close()
    if not keys:
        return {"sample": 0, "passed": True}
    log.info("checking fidelity: %d stored answers against an fp32 forward pass", len(keys))
    reference = engine if engine.dtype == "fp32" else Engine(_fp32(engine))
    expected = reference(keys)
    pairs = [(s, e) for s, e in zip(stored, expected) if e is not None]
    task = engine.config.task
    if task == "embed":
        a = np.stack([np.asarray(s, np.float64) for s, _ in pairs])
        b = np.stack([np.asarray(e, np.float64) for _, e in pairs])
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        result = {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}
        ok = result["min_cosine"] >= options.min_cosine
        limit = f"min cosine {result['min_cosine']:.5f} < {options.min_cosine}"
    elif task == "fill-mask":
        tops = [(sp[0]["token"], ep[0]["token"]) for s, e in pairs for sp, ep in zip(s, e)]
        result = {"top1_agreement": sum(a == b for a, b in tops) / max(len(tops), 1)}
        ok = result["top1_agreement"] >= options.min_agreement
        limit = f"top-1 agreement {result['top1_agreement']:.4f} < {options.min_agreement}"
    else:
        diff = max(abs(s["scores"][lab] - p) for s, e in pairs for lab, p in e["scores"].items())
        result = {"max_abs_prob_diff": diff}
        ok = diff <= options.max_prob_diff
        limit = f"max probability difference {diff:.5f} > {options.max_prob_diff}"
    result |= {"sample": len(pairs), "reference": "fp32", "dtype": engine.dtype, "passed": ok}
    figures = ", ".join(f"{k.replace('_', ' ')} {v:.5f}" for k, v in result.items() if isinstance(v, float))
    log.info("fidelity of %s against fp32 on %d queries: %s, %s", engine.dtype, len(pairs), figures,
             "passed" if ok else "failed")  # fmt: skip
    if not ok:
        raise BuildError(
            f"fidelity gate failed for --dtype {engine.dtype}: {limit}; "
            "use --dtype fp32 (or bf16) or relax the threshold; nothing was published"
        )
    return result


def _fp32(engine: Engine) -> EngineConfig:
    return dataclasses.replace(engine.config, dtype="fp32", device=str(engine.device), streams=engine.streams)

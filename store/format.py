"""The snapshot format (docs/snapshot-format.md is the contract; this module is its code).

Values are raw little-endian arrays (embeddings) or UTF-8 JSON (fill-mask, classify); never pickle.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from querycache.store.keys import KEY_FUNCTION, SUPPORTED_KEY_VERSIONS

FORMAT_NAME = "querycache-snapshot"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TASKS = ("embed", "fill-mask", "classify")
EMBED_DTYPES = {"float32": "<f4", "float16": "<f2"}
_SNAPSHOT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class SnapshotError(Exception):
    """A snapshot cannot be used: missing, corrupt, or of a format this reader does not know."""


def shard_of(key: bytes, shards: int) -> int:
    """LMDB shard that holds ``key``: CRC-32 of the stored key bytes modulo the shard count."""
    return zlib.crc32(key) % shards if shards > 1 else 0


def lmdb_shard_path(index: int, shards: int) -> str:
    return f"lmdb/shard-{index:05d}-of-{shards:05d}"


def parquet_shard_path(index: int, shards: int) -> str:
    return f"parquet/part-{index:05d}-of-{shards:05d}.parquet"


def encode_value(result: Any, schema: dict) -> bytes:
    """Encode one result for LMDB according to the manifest's ``result`` schema."""
    if schema["encoding"] in EMBED_DTYPES:
        return np.asarray(result, dtype=EMBED_DTYPES[schema["encoding"]]).tobytes()
    return json.dumps(result, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def decode_value(raw: bytes, schema: dict) -> Any:
    """Decode one LMDB value; embeddings come back as read-only numpy arrays."""
    dtype = EMBED_DTYPES.get(schema["encoding"])
    if dtype is not None:
        return np.frombuffer(raw, dtype=dtype)
    return json.loads(raw)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def new_manifest(snapshot_id: str, task: str, schema: dict, model: dict, **fields: Any) -> dict:
    """The fixed head of a manifest; the writer adds rows, shards and files."""
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "snapshot_id": snapshot_id,
        "created": dt.datetime.now(dt.UTC).isoformat(), "key_function": KEY_FUNCTION, "task": task,
        "result": schema, "model": model, **fields,
    }  # fmt: skip


def read_manifest(directory: str | os.PathLike) -> dict:
    """Read and validate ``manifest.json`` of a snapshot directory."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise SnapshotError(f"{directory} is not a snapshot: {MANIFEST} is missing") from None
    except (OSError, ValueError) as err:
        raise SnapshotError(f"{path} is unreadable: {err}") from None
    check_manifest(manifest, str(directory))
    return manifest


def check_snapshot_id(snapshot_id: object, where: str) -> str:
    """``snapshot_id`` if it can name a directory under ``snapshots/`` (no separators, no ``..``)."""
    if not isinstance(snapshot_id, str) or not _SNAPSHOT_ID.fullmatch(snapshot_id) or ".." in snapshot_id:
        raise SnapshotError(f"{where}: {str(snapshot_id)[:80]!r} is not a snapshot id")
    return snapshot_id


def _check_relpath(rel: object, where: str) -> None:
    parts = rel.split("/") if isinstance(rel, str) else []
    if not parts or rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
        raise SnapshotError(f"{where}: manifest names {str(rel)[:80]!r}, which is not a path inside the snapshot")


def check_manifest(manifest: dict, where: str) -> None:
    """Refuse a manifest of an unknown format, key-function version or task, or one naming paths outside it."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise SnapshotError(f"{where}: not a {FORMAT_NAME} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise SnapshotError(
            f"{where}: snapshot format version {manifest.get('format_version')!r} is not supported "
            f"by this reader (knows {FORMAT_VERSION}); upgrade querycache or rebuild the snapshot"
        )
    version = (manifest.get("key_function") or {}).get("version")
    if version not in SUPPORTED_KEY_VERSIONS:
        raise SnapshotError(
            f"{where}: key-function version {version!r} is unknown to this reader "
            f"(knows {sorted(SUPPORTED_KEY_VERSIONS)}); upgrade querycache or rebuild the snapshot"
        )
    if manifest.get("task") not in TASKS or "result" not in manifest or not isinstance(manifest.get("files"), dict):
        raise SnapshotError(f"{where}: manifest lacks a known task, result schema or file list")
    check_snapshot_id(manifest.get("snapshot_id"), where)
    files = manifest["files"]
    for rel, meta in files.items():
        _check_relpath(rel, where)
        if not isinstance(meta, dict) or not isinstance(meta.get("bytes"), int) or "sha256" not in meta:
            raise SnapshotError(f"{where}: manifest entry of {rel!r} lacks bytes or sha256")
    shards = (manifest.get("lmdb") or {}).get("shards")
    if "lmdb" in manifest and (isinstance(shards, bool) or not isinstance(shards, int) or not 0 < shards < 1 << 16):
        raise SnapshotError(f"{where}: manifest has no valid LMDB shard count")
    parquet = manifest.get("parquet", [])
    for rel in parquet if isinstance(parquet, list) else [parquet]:
        _check_relpath(rel, where)
    data = [f"{lmdb_shard_path(i, shards)}/data.mdb" for i in range(shards or 0)] + parquet
    unlisted = [rel for rel in data if rel not in files]
    if unlisted:
        raise SnapshotError(f"{where}: {unlisted[0]} is not in the manifest's file list, so it cannot be verified")


def stats_problems(manifest: dict) -> list[str]:
    """What is wrong with a manifest's build statistics: a negative count, or lines that do not add up.

    Every line read is accepted or rejected (``lines_read == accepted + rejected``) and ``rejected``
    is the sum of ``rejected_by_reason``. A manifest without them (written by ``write_snapshot``, not a
    build) has none.
    """
    stats = manifest.get("stats")
    if not stats:
        return []
    counts = {name: stats.get(name) for name in ("lines_read", "accepted", "rejected")}
    reasons = stats.get("rejected_by_reason")
    if not isinstance(reasons, dict):
        return ["stats: rejected_by_reason is not an object"]
    counts |= {f"rejected_by_reason.{reason}": n for reason, n in reasons.items()}
    bad = [name for name, n in counts.items() if isinstance(n, bool) or not isinstance(n, int) or n < 0]
    if bad:
        return [f"stats: {name} is {counts[name]!r}, not a count" for name in bad]
    lines, accepted, rejected = counts["lines_read"], counts["accepted"], counts["rejected"]
    problems = (
        []
        if lines == accepted + rejected
        else [f"stats: lines_read {lines} != accepted {accepted} + rejected {rejected}"]
    )
    if rejected != sum(reasons.values()):
        problems.append(f"stats: rejected {rejected} != {sum(reasons.values())}, the sum of rejected_by_reason")
    return problems


def check_files(directory: str | os.PathLike, manifest: dict, *, checksums: bool) -> list[str]:
    """Problems with the data files listed in the manifest: missing, outside the snapshot, wrong size or sha256."""
    problems = []
    inside = os.path.realpath(directory) + os.sep
    for rel, meta in sorted(manifest["files"].items()):
        path = Path(directory) / rel
        if not os.path.realpath(path).startswith(inside):
            problems.append(f"{rel}: leads outside the snapshot directory (a symlink?)")
            continue
        try:
            size = path.stat().st_size
        except OSError:
            problems.append(f"{rel}: missing")
            continue
        if size != meta["bytes"]:
            problems.append(f"{rel}: {size} bytes, manifest says {meta['bytes']}")
        elif checksums and sha256_file(path) != meta["sha256"]:
            problems.append(f"{rel}: sha256 mismatch")
    return problems


def verify_snapshot(directory: str | os.PathLike, *, checksums: bool = True) -> dict:
    """``manifest = verify_snapshot(path)``: the manifest of a snapshot directory whose files all check out.

    Validates the manifest (format, key function, ids and paths that stay inside the directory),
    then every listed file (present, inside, size, and with ``checksums`` its sha256). Raises
    :class:`SnapshotError` with one line naming every problem. Call it on any copy before trusting it.
    """
    manifest = read_manifest(directory)
    problems = stats_problems(manifest) + check_files(directory, manifest, checksums=checksums)
    if problems:
        raise SnapshotError(f"snapshot {directory} is corrupt: " + "; ".join(problems))
    return manifest

"""The snapshot format (docs/snapshot-format.md is the contract; this module is its code).

Values are raw little-endian arrays (embeddings) or UTF-8 JSON (fill-mask, classify); never pickle.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from store.keys import KEY_FUNCTION, SUPPORTED_KEY_VERSIONS

FORMAT_NAME = "querycache-snapshot"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TASKS = ("embed", "fill-mask", "classify")
EMBED_DTYPES = {"float32": "<f4", "float16": "<f2"}


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


def check_manifest(manifest: dict, where: str) -> None:
    """Refuse a manifest of an unknown format, key-function version or task."""
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
    if manifest.get("task") not in TASKS or "result" not in manifest or "files" not in manifest:
        raise SnapshotError(f"{where}: manifest lacks a known task, result schema or file list")


def check_files(directory: str | os.PathLike, manifest: dict, *, checksums: bool) -> list[str]:
    """Problems with the data files listed in the manifest (missing, wrong size, wrong sha256)."""
    problems = []
    for rel, meta in sorted(manifest["files"].items()):
        path = Path(directory) / rel
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

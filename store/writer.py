"""Write one shard of a snapshot: an LMDB environment and a Parquet file of the same rows.

    info = write_shard(staging_dir, index=0, shards=1, rows=rows, schema={"encoding": "float32", "dim": 384})

A row is ``(key, count, users, rank, value)`` with ``value`` already encoded (see ``store.format``).
Shards are independent, so a distributed build writes them in parallel; the manifest lists them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from querycache.store.format import (
    EMBED_DTYPES,
    MANIFEST,
    decode_value,
    encode_value,
    lmdb_shard_path,
    new_manifest,
    parquet_shard_path,
    sha256_file,
    shard_of,
)
from querycache.store.keys import key_bytes

Row = tuple[str, int, "int | None", int, bytes]


def write_shard(
    directory: str | os.PathLike, index: int, shards: int, rows: list[Row], schema: dict, *, checksums: bool = True
) -> dict:
    """Write shard ``index`` of ``shards`` under ``directory``; return its file list and row count.

    ``rows`` (a list) is sorted in place and never copied whole. Without ``checksums`` the files are
    listed with their sizes only (a caller that hashes while uploading fills in the sha256).
    """
    rows.sort(key=lambda row: key_bytes(row[0]))
    lmdb_rel, parquet_rel = lmdb_shard_path(index, shards), parquet_shard_path(index, shards)
    _write_lmdb(Path(directory) / lmdb_rel, rows)
    _write_parquet(Path(directory) / parquet_rel, rows, schema)
    files = {}
    for rel in (f"{lmdb_rel}/data.mdb", parquet_rel):
        path = Path(directory) / rel
        files[rel] = {"sha256": sha256_file(path) if checksums else None, "bytes": path.stat().st_size}
    return {"rows": len(rows), "files": files}


def _map_size(rows: list[Row]) -> int:
    # Leaf entries plus page overhead; values over ~2 KB live on whole overflow pages.
    need = sum(
        len(r[0]) * 4 + len(r[4]) + 16 if len(r[4]) < 2000 else len(r[0]) * 4 + 4096 * (len(r[4]) // 4096 + 1)
        for r in rows
    )
    return max(1 << 20, int(need * 1.6) + (1 << 20))


CHUNK = 16384  # rows per LMDB write transaction and per Parquet row group: memory stays bounded


def _write_lmdb(path: Path, rows: list[Row]) -> None:
    """Sorted keys appended in transactions of ``CHUNK`` rows; the map grows on demand."""
    path.mkdir(parents=True, exist_ok=True)
    map_size = _map_size(rows)
    while True:
        env = lmdb.open(
            str(path), map_size=map_size, subdir=True, lock=False, sync=False, metasync=False, readahead=False
        )
        try:
            added = 0
            for start in range(0, len(rows), CHUNK):
                with env.begin(write=True) as txn:
                    pairs = ((key_bytes(r[0]), r[4]) for r in rows[start : start + CHUNK])
                    added += txn.cursor().putmulti(pairs, dupdata=False, overwrite=True, append=True)[0]
            if added != len(rows):
                raise ValueError(f"{path}: duplicate keys in shard ({len(rows) - added} not added)")
            env.sync(True)
            return
        except lmdb.MapFullError:
            map_size *= 2
        finally:
            env.close()
        for name in ("data.mdb", "lock.mdb"):
            (path / name).unlink(missing_ok=True)


def _write_parquet(path: Path, rows: list[Row], schema: dict) -> None:
    """Row groups of ``CHUNK`` rows, each converted and written before the next is built."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = _parquet_table(rows[:CHUNK], schema)
    with pq.ParquetWriter(path, table.schema, compression="zstd") as out:
        out.write_table(table)
        for start in range(CHUNK, len(rows), CHUNK):
            out.write_table(_parquet_table(rows[start : start + CHUNK], schema))


def _parquet_table(rows: list[Row], schema: dict) -> pa.Table:
    columns = {
        "key": pa.array([r[0] for r in rows], pa.string()),
        "count": pa.array([r[1] for r in rows], pa.int64()),
        "users": pa.array([r[2] for r in rows], pa.int64()),
        "rank": pa.array([r[3] for r in rows], pa.int64()),
    }
    if schema["encoding"] in EMBED_DTYPES:  # values are raw arrays: one join, no per-row decode
        flat = np.frombuffer(b"".join(r[4] for r in rows), EMBED_DTYPES[schema["encoding"]])
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(flat), schema["dim"])
    elif schema.get("labels") is not None:
        values = [decode_value(r[4], schema) for r in rows]
        columns["label"] = pa.array([v["label"] for v in values], pa.string())
        columns["scores"] = pa.array(
            [[v["scores"][lab] for lab in schema["labels"]] for v in values], pa.list_(pa.float32())
        )
    else:
        prediction = pa.struct([("token", pa.string()), ("score", pa.float32())])
        columns["predictions"] = pa.array([decode_value(r[4], schema) for r in rows], pa.list_(pa.list_(prediction)))
    return pa.table(columns)


def complete_manifest(manifest: dict, shards: list[dict], extra_files: dict | None = None) -> dict:
    """``manifest`` with the shards' files, row count and Parquet list added (shards: index, rows, files)."""
    shards = sorted(shards, key=lambda s: s["index"])
    files = {rel: meta for s in shards for rel, meta in s["files"].items()} | (extra_files or {})
    return {
        **manifest,
        "rows": sum(s["rows"] for s in shards),
        "lmdb": {"shards": len(shards), "shard_of": "crc32(key bytes) % shards"},
        "parquet": [parquet_shard_path(s["index"], len(shards)) for s in shards],
        "files": dict(sorted(files.items())),
    }


def write_manifest(
    directory: str | os.PathLike, manifest: dict, shards: list[dict], extra_files: dict | None = None
) -> dict:
    """Complete ``manifest`` with the shards' files and row count and write ``manifest.json``."""
    manifest = complete_manifest(manifest, shards, extra_files)
    save_manifest(directory, manifest)
    return manifest


def save_manifest(directory: str | os.PathLike, manifest: dict) -> None:
    """Write ``manifest.json`` atomically (staging directories only: published ones are immutable)."""
    tmp = Path(directory) / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", "utf-8")
    os.replace(tmp, Path(directory) / MANIFEST)


def write_snapshot(
    root: str | os.PathLike,
    results: Mapping[str, Any],
    schema: dict,
    *,
    task: str = "embed",
    model: dict | None = None,
    shards: int = 1,
    publish: bool = True,
    **manifest: Any,
) -> Path:
    """Write ``{key: result}`` (keys already normalised) as a snapshot under ``root``, without Beam.

    Returns the published directory, or the staging directory when ``publish`` is False.
    Useful for tests, benchmarks and snapshots built from an existing table.
    """
    from querycache.store.publish import new_snapshot_id, new_staging
    from querycache.store.publish import publish as publish_staging

    snapshot_id = new_snapshot_id()
    staging = new_staging(root, snapshot_id)
    by_shard: list[list[Row]] = [[] for _ in range(shards)]
    for rank, (key, result) in enumerate(results.items(), 1):
        by_shard[shard_of(key_bytes(key), shards)].append((key, 1, None, rank, encode_value(result, schema)))
    infos = [{"index": i, **write_shard(staging, i, shards, rows, schema)} for i, rows in enumerate(by_shard)]
    head = new_manifest(snapshot_id, task, schema, model or {"fingerprint": "unknown"}, stats={}, **manifest)
    write_manifest(staging, head, infos)
    return Path(root) / "snapshots" / publish_staging(root, staging) if publish else staging

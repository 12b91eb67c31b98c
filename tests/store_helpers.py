"""Build snapshots directly with the store writer (no Beam), for store tests and benchmarks."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from store.format import FORMAT_NAME, FORMAT_VERSION, encode_value, shard_of
from store.keys import KEY_FUNCTION, key_bytes
from store.publish import new_snapshot_id, new_staging, publish
from store.writer import write_manifest, write_shard


def make_snapshot(
    root: Path,
    results: dict,
    schema: dict,
    *,
    fingerprint: str = "f" * 64,
    task: str = "embed",
    shards: int = 1,
    do_publish: bool = True,
) -> Path:
    """Write ``{key: result}`` as a snapshot under ``root``; publish it unless told not to."""
    snapshot_id = new_snapshot_id()
    staging = new_staging(root, snapshot_id)
    by_shard: list[list] = [[] for _ in range(shards)]
    for rank, (key, result) in enumerate(results.items(), 1):
        by_shard[shard_of(key_bytes(key), shards)].append((key, 1, None, rank, encode_value(result, schema)))
    infos = [{"index": i, **write_shard(staging, i, shards, rows, schema)} for i, rows in enumerate(by_shard)]
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "snapshot_id": snapshot_id,
        "created": dt.datetime.now(dt.UTC).isoformat(),
        "key_function": KEY_FUNCTION,
        "task": task,
        "result": schema,
        "model": {"fingerprint": fingerprint},
        "stats": {},
    }
    write_manifest(staging, manifest, infos)
    return root / "snapshots" / publish(root, staging) if do_publish else staging

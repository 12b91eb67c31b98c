"""Build snapshots directly with the store writer (no Beam), for store tests."""

from __future__ import annotations

from pathlib import Path

from querycache.store.writer import write_snapshot


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
    return write_snapshot(
        root, results, schema, task=task, model={"fingerprint": fingerprint}, shards=shards, publish=do_publish
    )

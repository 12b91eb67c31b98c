"""A snapshot's manifest and Parquet files on any Beam filesystem (local, ``s3://``, ``gs://``, ``hdfs://``).

    files = locate_snapshot("s3://bucket/qc")      # a root (follows CURRENT) or one snapshot directory
    files.manifest["snapshot_id"], files.parquet   # Parquet paths for a pipeline to read

Pipelines read a snapshot through Beam's ``FileSystems`` (services memory-map a pulled local copy
with ``store.Snapshot`` instead). The manifest is validated like ``store`` does; each Parquet file
must have the size the manifest gives. Ids and paths from the store never lead outside the root.
"""

from __future__ import annotations

import json
from typing import NamedTuple

from apache_beam.io.filesystems import FileSystems

from querycache.store.format import MANIFEST, SnapshotError, check_manifest, check_snapshot_id, parquet_shard_path
from querycache.store.publish import CURRENT, SNAPSHOTS


class SnapshotFiles(NamedTuple):
    """Where a snapshot lies and what its manifest says."""

    directory: str
    manifest: dict
    parquet: list[str]


def _read_text(path: str) -> str:
    with FileSystems.open(path) as fh:
        return fh.read().decode("utf-8")


def _exists(path: str) -> bool:
    try:
        return FileSystems.exists(path)
    except Exception as err:  # an unknown scheme or missing credentials: Beam raises several types
        raise SnapshotError(f"{path}: {err}") from None


def locate_snapshot(path: str) -> SnapshotFiles:
    """The snapshot at ``path`` (a root holding CURRENT, or a snapshot directory). Raises SnapshotError."""
    directory = path
    if not _exists(FileSystems.join(path, MANIFEST)):
        current = FileSystems.join(path, CURRENT)
        if not _exists(current):
            raise SnapshotError(f"{path} is neither a snapshot directory nor a root with a {CURRENT} file")
        directory = FileSystems.join(path, SNAPSHOTS, check_snapshot_id(_read_text(current).strip(), current))
    try:
        manifest = json.loads(_read_text(FileSystems.join(directory, MANIFEST)))
    except Exception as err:
        raise SnapshotError(f"{directory}/{MANIFEST} is unreadable: {err}") from None
    check_manifest(manifest, directory)
    shards = manifest["lmdb"]["shards"]
    rels = [parquet_shard_path(i, shards) for i in range(shards)]
    if manifest["parquet"] != rels:
        raise SnapshotError(f"{directory}: manifest lists Parquet files {manifest['parquet']}, expected {rels}")
    paths = [FileSystems.join(directory, rel) for rel in rels]
    for rel, result in zip(rels, FileSystems.match(paths)):
        sizes = [m.size_in_bytes for m in result.metadata_list]
        if sizes != [manifest["files"].get(rel, {}).get("bytes")]:
            raise SnapshotError(f"snapshot {directory} is corrupt: {rel} missing or not of the size the manifest says")
    return SnapshotFiles(directory, manifest, paths)

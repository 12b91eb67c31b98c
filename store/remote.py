"""Snapshot roots on object storage (``s3://``, ``gs://``, ``hdfs://``), reached through ``store.fs``.

    remote.list_snapshots("s3://bucket/qc")
    remote.publish("s3://bucket/qc", snapshot_id, expected=remote.current("s3://bucket/qc"))

The layout is the one of docs/snapshot-format.md. Object stores have no rename, so a build writes
straight into ``snapshots/<id>/``, its ``manifest.json`` written last as the commit marker, and
``CURRENT`` moves only after the snapshot's files check out, by compare-and-swap where the store
has conditional writes. A directory without a manifest is a build in progress or abandoned.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import NamedTuple

from querycache.store import fs
from querycache.store.format import MANIFEST, SnapshotError, check_manifest, check_snapshot_id

CURRENT, SNAPSHOTS = "CURRENT", "snapshots"
STALE_SECONDS = 24 * 3600


class SnapshotRef(NamedTuple):
    """A snapshot on any filesystem, passed to pipeline steps as data: its directory and manifest."""

    directory: str
    manifest: dict


def current(root: str) -> fs.Versioned:
    """``CURRENT`` with its version token, for a later compare-and-swap."""
    return fs.read_versioned(fs.join(root, CURRENT))


def current_id(root: str) -> str | None:
    data = current(root).data
    text = data.decode("utf-8").strip() if data else ""
    return check_snapshot_id(text, f"{root}/{CURRENT}") if text else None


def resolve(path: str) -> str:
    """Snapshot directory for a root (through CURRENT) or for a snapshot directory itself."""
    if fs.size(fs.join(path, MANIFEST)) is not None:
        return path
    snapshot_id = current_id(path)
    if snapshot_id is None:
        raise SnapshotError(f"{path} is neither a snapshot directory nor a root with a {CURRENT} file; build one first")
    return fs.join(path, SNAPSHOTS, snapshot_id)


def read_manifest(directory: str) -> dict:
    try:
        manifest = json.loads(fs.read_bytes(fs.join(directory, MANIFEST)))
    except FileNotFoundError:
        raise SnapshotError(f"{directory} is not a snapshot: {MANIFEST} is missing") from None
    except (OSError, ValueError) as err:
        raise SnapshotError(f"{directory}/{MANIFEST} is unreadable: {err}") from None
    check_manifest(manifest, directory)
    return manifest


def check_files(directory: str, manifest: dict, *, checksums: bool) -> list[str]:
    """Problems with the listed data files: missing, wrong size, or (with ``checksums``) wrong sha256."""
    problems = []
    for rel, meta in sorted(manifest["files"].items()):
        size = fs.size(fs.join(directory, rel))
        if size is None:
            problems.append(f"{rel}: missing")
        elif size != meta["bytes"]:
            problems.append(f"{rel}: {size} bytes, manifest says {meta['bytes']}")
        elif checksums and _sha256(fs.join(directory, rel)) != meta["sha256"]:
            problems.append(f"{rel}: sha256 mismatch")
    return problems


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with fs.open_input(path) as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def publish(root: str, snapshot_id: str, expected: fs.Versioned) -> None:
    """Move CURRENT to a complete snapshot, if CURRENT is still what ``expected`` read; SnapshotError if not."""
    directory = fs.join(root, SNAPSHOTS, snapshot_id)
    problems = check_files(directory, read_manifest(directory), checksums=False)
    if problems:
        raise SnapshotError(f"snapshot {directory} is incomplete: " + "; ".join(problems))
    try:
        fs.swap(fs.join(root, CURRENT), (snapshot_id + "\n").encode("utf-8"), expected)
    except fs.ConflictError:
        now = current_id(root)
        raise SnapshotError(
            f"another build published {now} to {root} while this one ran; CURRENT still names {now}, and "
            f"snapshot {snapshot_id} is left unpublished (`querycache rollback {root} {snapshot_id}` publishes it)"
        ) from None


def list_snapshots(root: str) -> list[dict]:
    """Snapshots under ``root``, oldest first, as ``store.publish.list_snapshots`` gives them."""
    now = current_id(root)
    out = []
    for name in fs.list_dir(fs.join(root, SNAPSHOTS)):
        try:
            manifest = read_manifest(fs.join(root, SNAPSHOTS, name))
            row = {"id": name, "created": manifest["created"], "rows": manifest["rows"], "task": manifest["task"],
                   "fingerprint": manifest["model"]["fingerprint"], "ok": True}  # fmt: skip
        except SnapshotError as err:
            row = {"id": name, "ok": False, "error": str(err)}
        out.append({**row, "current": name == now})
    return out


def rollback(root: str, snapshot_id: str | None) -> str:
    now = current(root)
    now_id = current_id(root)
    if snapshot_id is None:
        older = [s["id"] for s in list_snapshots(root) if s["ok"] and now_id is not None and s["id"] < now_id]
        if not older:
            raise SnapshotError(f"{root}: no snapshot older than {now_id} to roll back to")
        snapshot_id = older[-1]
    check_snapshot_id(snapshot_id, "rollback")
    if fs.size(fs.join(root, SNAPSHOTS, snapshot_id, MANIFEST)) is None:
        raise SnapshotError(f"{root}: no snapshot {snapshot_id!r}; `querycache list {root}` shows the ids")
    publish(root, snapshot_id, now)
    return snapshot_id


def gc(root: str, keep: int) -> list[str]:
    """Delete all but the current snapshot and the newest ``keep - 1`` complete others.

    Directories without a manifest (builds in progress or abandoned) go once a day old by their id's time.
    """
    if keep < 1:
        raise ValueError("keep must be at least 1: the current snapshot is never removed")
    snapshots = list_snapshots(root)
    others = [s["id"] for s in snapshots if s["ok"] and not s["current"]]
    doomed = others[: max(0, len(others) - (keep - 1))]
    doomed += [s["id"] for s in snapshots if not s["ok"] and not s["current"] and _stale(s["id"])]
    for snapshot_id in doomed:
        fs.delete_dir(fs.join(root, SNAPSHOTS, snapshot_id))
    return doomed


def _stale(snapshot_id: str) -> bool:
    try:
        created = dt.datetime.strptime(snapshot_id[:23], "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=dt.UTC)
    except ValueError:
        return False
    return (dt.datetime.now(dt.UTC) - created).total_seconds() > STALE_SECONDS

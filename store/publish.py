"""Snapshot roots: atomic publish through ``ROOT/CURRENT``, listing, rollback and garbage collection.

    staging = new_staging(root)            # ROOT/snapshots/.staging-<id>/, invisible to readers
    ...write the snapshot into it...
    publish(root, staging)                 # rename into snapshots/<id>/, then os.replace CURRENT

``CURRENT`` holds one snapshot id and a newline. It is replaced, never edited, so a reader sees
either the old or the new id; a published directory is never modified.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import shutil
import time
from pathlib import Path

from store import fs, remote
from store.format import MANIFEST, SnapshotError, read_manifest

CURRENT = "CURRENT"
SNAPSHOTS = "snapshots"
STAGING_PREFIX = ".staging-"
STALE_STAGING_SECONDS = 24 * 3600


def new_snapshot_id() -> str:
    """A new id that sorts by creation time: ``20261128T142233.123456Z-1a2b3c``."""
    now = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    return f"{now}-{secrets.token_hex(3)}"


def new_staging(root: str | os.PathLike, snapshot_id: str) -> Path:
    staging = Path(root) / SNAPSHOTS / f"{STAGING_PREFIX}{snapshot_id}"
    staging.mkdir(parents=True)
    return staging


def current_id(root: str | os.PathLike) -> str | None:
    """Id named by ``ROOT/CURRENT``, or None before the first publish."""
    if fs.is_remote(root):
        return remote.current_id(str(root))
    try:
        return (Path(root) / CURRENT).read_text("utf-8").strip() or None
    except FileNotFoundError:
        return None


def resolve(path: str | os.PathLike) -> Path:
    """Snapshot directory for a root (through CURRENT) or for a snapshot directory itself."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    snapshot_id = current_id(path)
    if snapshot_id is None:
        raise SnapshotError(f"{path} is neither a snapshot directory nor a root with a {CURRENT} file; build one first")
    return path / SNAPSHOTS / snapshot_id


def _fsync_tree(directory: Path) -> None:
    for dirpath, _, names in os.walk(directory):
        for name in names:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def point_current(root: str | os.PathLike, snapshot_id: str) -> None:
    """Atomically make ``snapshot_id`` the current snapshot of ``root``."""
    root = Path(root)
    read_manifest(root / SNAPSHOTS / snapshot_id)
    tmp = root / f".{CURRENT}.{os.getpid()}.{secrets.token_hex(4)}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(snapshot_id + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, root / CURRENT)
    _fsync_dir(root)


def publish(root: str | os.PathLike, staging: str | os.PathLike, expected: str | None | bool = True) -> str:
    """Make a complete staging directory the current snapshot; return its id.

    With ``expected`` (an id, or None for a root without CURRENT) the publish is refused when CURRENT
    moved since the caller read it: a build that lost a race never moves CURRENT backwards.
    """
    root, staging = Path(root), Path(staging)
    snapshot_id = read_manifest(staging)["snapshot_id"]
    if expected is not True and current_id(root) != expected:
        now = current_id(root)
        raise SnapshotError(
            f"another build published {now} to {root} while this one ran; CURRENT still names {now}, and "
            "this build published nothing"
        )
    _fsync_tree(staging)
    final = root / SNAPSHOTS / snapshot_id
    os.rename(staging, final)
    _fsync_dir(final.parent)
    point_current(root, snapshot_id)
    return snapshot_id


def list_snapshots(root: str | os.PathLike) -> list[dict]:
    """Published snapshots, oldest first: id, created, rows, task, fingerprint, current, ok."""
    if fs.is_remote(root):
        return remote.list_snapshots(str(root))
    root = Path(root)
    current = current_id(root)
    out = []
    for directory in sorted((root / SNAPSHOTS).glob("[!.]*")):
        try:
            manifest = read_manifest(directory)
            row = {
                "id": directory.name,
                "created": manifest["created"],
                "rows": manifest["rows"],
                "task": manifest["task"],
                "fingerprint": manifest["model"]["fingerprint"],
                "ok": True,
            }
        except SnapshotError as err:
            row = {"id": directory.name, "ok": False, "error": str(err)}
        out.append({**row, "current": directory.name == current})
    return out


def rollback(root: str | os.PathLike, snapshot_id: str | None = None) -> str:
    """Point CURRENT at ``snapshot_id``, or at the newest snapshot older than the current one."""
    if fs.is_remote(root):
        return remote.rollback(str(root), snapshot_id)
    if snapshot_id is None:
        current = current_id(root)
        older = [s["id"] for s in list_snapshots(root) if s["ok"] and current is not None and s["id"] < current]
        if not older:
            raise SnapshotError(f"{root}: no snapshot older than {current} to roll back to")
        snapshot_id = older[-1]
    if not (Path(root) / SNAPSHOTS / snapshot_id).is_dir():
        raise SnapshotError(f"{root}: no snapshot {snapshot_id!r}; `querycache list {root}` shows the ids")
    point_current(root, snapshot_id)
    return snapshot_id


def gc(root: str | os.PathLike, keep: int) -> list[str]:
    """Delete all but the current snapshot and the newest ``keep - 1`` others; return deleted ids.

    Staging directories of builds abandoned more than a day ago are removed too.
    """
    if fs.is_remote(root):
        return remote.gc(str(root), keep)
    if keep < 1:
        raise ValueError("keep must be at least 1: the current snapshot is never removed")
    root = Path(root)
    current = current_id(root)
    others = [s["id"] for s in list_snapshots(root) if s["id"] != current]
    doomed = others[: max(0, len(others) - (keep - 1))]
    for snapshot_id in doomed:
        shutil.rmtree(root / SNAPSHOTS / snapshot_id)
    for staging in (root / SNAPSHOTS).glob(f"{STAGING_PREFIX}*"):
        if time.time() - staging.stat().st_mtime > STALE_STAGING_SECONDS:
            shutil.rmtree(staging, ignore_errors=True)
    return doomed

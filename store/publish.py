"""Snapshot roots: atomic publish through ``ROOT/CURRENT``, listing, rollback and garbage collection.

    staging = new_staging(root)            # ROOT/snapshots/.staging-<id>/, invisible to readers
    ...write the snapshot into it...
    publish(root, staging)                 # rename into snapshots/<id>/, then os.replace CURRENT

``CURRENT`` holds one snapshot id and a newline. It is replaced, never edited, so a reader sees
either the old or the new id; a published directory is never modified.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
import secrets
import shutil
import time
from pathlib import Path

from querycache.store import fs, remote
from querycache.store.format import MANIFEST, SnapshotError, check_snapshot_id, read_manifest

log = logging.getLogger(__name__)

CURRENT = "CURRENT"
SNAPSHOTS = "snapshots"
STAGING_PREFIX = ".staging-"
STALE_STAGING_SECONDS = 24 * 3600
LOCK = ".lock"  # in a staging directory: flock-ed by the build that writes it, gone before publish
_held_locks: dict[str, int] = {}  # staging path -> descriptor holding its lock in this process


def new_snapshot_id() -> str:
    """A new id that sorts by creation time: ``20261128T142233.123456Z-1a2b3c``."""
    now = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    return f"{now}-{secrets.token_hex(3)}"


def new_staging(root: str | os.PathLike, snapshot_id: str) -> Path:
    """Create ``ROOT/snapshots/.staging-<id>/``, locked while this process lives (so gc spares it)."""
    staging = Path(root) / SNAPSHOTS / f"{STAGING_PREFIX}{snapshot_id}"
    staging.mkdir(parents=True)
    fd = os.open(staging / LOCK, os.O_CREAT | os.O_RDWR, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    _held_locks[str(staging)] = fd
    return staging


def _unlock(staging: Path, directory: Path | None = None) -> None:
    """Drop the build's lock on ``staging`` (whose files now live in ``directory`` after a rename)."""
    ((directory or staging) / LOCK).unlink(missing_ok=True)
    fd = _held_locks.pop(str(staging), None)
    if fd is not None:
        os.close(fd)


def discard_staging(staging: str | os.PathLike) -> None:
    """Remove a staging directory that will not be published (a failed or cancelled build)."""
    _unlock(Path(staging))
    shutil.rmtree(staging, ignore_errors=True)


def _abandoned(staging: Path) -> bool:
    """True for a staging directory whose build died: its lock is free, or it is a day old without one."""
    try:
        fd = os.open(staging / LOCK, os.O_RDWR)
    except FileNotFoundError:
        try:
            return time.time() - staging.stat().st_mtime > STALE_STAGING_SECONDS
        except FileNotFoundError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _abandoned_current_tmp(tmp: Path) -> bool:
    """True for a ``.CURRENT.<pid>.<hex>`` temp file whose writer is gone (killed mid-publish)."""
    try:
        os.kill(int(tmp.name.split(".")[2]), 0)
    except (ProcessLookupError, ValueError, IndexError):
        return True
    except PermissionError:
        pass
    try:
        return time.time() - tmp.stat().st_mtime > STALE_STAGING_SECONDS
    except FileNotFoundError:
        return False


def current_id(root: str | os.PathLike) -> str | None:
    """Id named by ``ROOT/CURRENT``, or None before the first publish; SnapshotError if it is not an id."""
    if fs.is_remote(root):
        return remote.current_id(str(root))
    try:
        text = (Path(root) / CURRENT).read_text("utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise SnapshotError(f"{Path(root) / CURRENT} is unreadable: {err}") from None
    return check_snapshot_id(text, str(Path(root) / CURRENT)) if text else None


def snapshot_dir(root: str | os.PathLike, snapshot_id: str) -> Path:
    """``ROOT/snapshots/<id>``, refusing an id or a symlink that leads outside ``ROOT/snapshots``."""
    check_snapshot_id(snapshot_id, str(root))
    directory = Path(root) / SNAPSHOTS / snapshot_id
    parent = os.path.realpath(Path(root) / SNAPSHOTS)
    if os.path.dirname(os.path.realpath(directory)) != parent:
        raise SnapshotError(f"{directory} leads outside {parent} (a symlink?); refusing to use it")
    return directory


def resolve(path: str | os.PathLike) -> Path:
    """Snapshot directory for a root (through CURRENT) or for a snapshot directory itself."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    snapshot_id = current_id(path)
    if snapshot_id is None:
        raise SnapshotError(f"{path} is neither a snapshot directory nor a root with a {CURRENT} file; build one first")
    return snapshot_dir(path, snapshot_id)


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
    read_manifest(snapshot_dir(root, snapshot_id))
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
    os.rename(staging, final)  # the lock moves with it: a build killed before here leaves a locked-then-free staging
    _unlock(staging, final)
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
            manifest = read_manifest(snapshot_dir(root, directory.name))
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
    if not snapshot_dir(root, snapshot_id).is_dir():
        raise SnapshotError(f"{root}: no snapshot {snapshot_id!r}; `querycache list {root}` shows the ids")
    point_current(root, snapshot_id)
    return snapshot_id


def gc(root: str | os.PathLike, keep: int) -> list[str]:
    """Delete all but the current snapshot and the newest ``keep - 1`` others; return deleted ids.

    Leftovers of builds that died are removed too: staging directories whose builder no longer
    holds their lock (or, without a lock, abandoned more than a day ago) and stray CURRENT temp files.
    Refuses (SnapshotError) while CURRENT names no snapshot, so a damaged root loses nothing.
    """
    if fs.is_remote(root):
        return remote.gc(str(root), keep)
    if keep < 1:
        raise ValueError("keep must be at least 1: the current snapshot is never removed")
    root = Path(root)
    current = current_id(root)
    if current is not None:
        read_manifest(snapshot_dir(root, current))
    others = [s["id"] for s in list_snapshots(root) if s["id"] != current]
    doomed = others[: max(0, len(others) - (keep - 1))]
    for snapshot_id in doomed:
        path = root / SNAPSHOTS / snapshot_id
        if path.is_symlink():  # never follow a link out of ROOT: remove the link itself
            path.unlink()
        else:
            shutil.rmtree(path)
    for staging in (root / SNAPSHOTS).glob(f"{STAGING_PREFIX}*"):
        if _abandoned(staging):
            shutil.rmtree(staging, ignore_errors=True)
            log.info("removed %s, left by a build that died", staging.name)
    for tmp in root.glob(f".{CURRENT}.*"):
        if _abandoned_current_tmp(tmp):
            tmp.unlink(missing_ok=True)
    return doomed

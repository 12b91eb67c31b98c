"""Copy the current snapshot of a root on any filesystem to local disk, for a service to memory-map.

    result = pull("s3://bucket/qc", "/srv/qc")      # PullResult(snapshot_id, pulled, bytes, seconds)
    Snapshot.open("/srv/qc")                        # or a ReadThroughCache that hot-reloads it

Every file's sha256 is checked while it streams into a local staging directory; only then is the
copy published with the local atomic swap, so a reader never sees a partial or corrupt copy, and a
failed pull leaves the local ``CURRENT`` as it was. Needs pyarrow (boto3 is used for S3 when
installed), never Beam or torch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import NamedTuple

from querycache.store import fs, remote
from querycache.store.format import MANIFEST, SnapshotError, check_manifest
from querycache.store.publish import SNAPSHOTS, current_id, gc, new_staging, point_current, publish

log = logging.getLogger(__name__)


class PullResult(NamedTuple):
    """What one pull did: the snapshot now current locally, whether it was copied, bytes, seconds."""

    snapshot_id: str
    pulled: bool
    bytes: int
    seconds: float


def pull(source: str, local_root: str | os.PathLike, keep: int | None = None) -> PullResult:
    """Make ``local_root`` hold and point at the snapshot that ``source``'s CURRENT names."""
    started = time.perf_counter()
    snapshot_id = remote.current_id(str(source))
    if snapshot_id is None:
        raise SnapshotError(f"{source} has no {remote.CURRENT} file: nothing is published there yet")
    local_root = Path(local_root)
    if current_id(local_root) == snapshot_id and (local_root / SNAPSHOTS / snapshot_id / MANIFEST).is_file():
        return PullResult(snapshot_id, False, 0, time.perf_counter() - started)
    directory = fs.join(str(source), remote.SNAPSHOTS, snapshot_id)
    raw = fs.read_bytes(fs.join(directory, MANIFEST))
    manifest = json.loads(raw)
    check_manifest(manifest, directory)
    if manifest.get("snapshot_id") != snapshot_id:
        raise SnapshotError(f"{directory}/{MANIFEST} names snapshot {manifest.get('snapshot_id')!r}, not {snapshot_id}")
    local_root.mkdir(parents=True, exist_ok=True)
    staging = new_staging(local_root, f"{snapshot_id}-pull-{os.getpid()}")
    try:
        total = _copy_files(directory, staging, manifest)
        (staging / MANIFEST).write_bytes(raw)
        if not (local_root / SNAPSHOTS / snapshot_id).exists():
            publish(local_root, staging)
        else:  # pulled before, then rolled back locally: point at the verified copy already there
            shutil.rmtree(staging)
            point_current(local_root, snapshot_id)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if keep:
        gc(local_root, keep)
    seconds = time.perf_counter() - started
    log.info("pulled snapshot %s: %d bytes in %.1fs", snapshot_id, total, seconds)
    return PullResult(snapshot_id, True, total, seconds)


def _copy_files(directory: str, staging: Path, manifest: dict) -> int:
    total = 0
    for rel, meta in sorted(manifest["files"].items()):
        try:
            fs.copy_verified(fs.join(directory, rel), str(staging / rel), meta["sha256"], meta["bytes"])
        except FileNotFoundError:
            raise SnapshotError(f"{directory}/{rel} is missing; the remote snapshot is incomplete") from None
        except ValueError as err:
            raise SnapshotError(f"pull refused {err}; the local copy was not published") from None
        total += meta["bytes"]
    return total


def watch(source: str, local_root: str | os.PathLike, seconds: float, keep: int | None = None, on_pull=None) -> None:
    """Pull now and then every ``seconds`` until interrupted; ``on_pull(result)`` after each new snapshot.

    A failed pull (network, a corrupt copy) is logged and retried at the next poll; the local copy keeps serving.
    """
    while True:
        try:
            result = pull(source, local_root, keep)
            if result.pulled and on_pull is not None:
                on_pull(result)
        except (SnapshotError, OSError) as err:
            log.warning("pull from %s failed, retrying in %.0fs: %s", source, seconds, err)
        time.sleep(seconds)

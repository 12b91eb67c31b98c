"""querycache's snapshot store: format, writer, reader and read-through cache.

Importable with lmdb, pyarrow and numpy alone (no Beam, no torch)::

    from store import Snapshot, ReadThroughCache
    Snapshot.open("/data/qc").get("cheap flights to paris")
"""

from store.cache import ReadThroughCache
from store.format import FORMAT_VERSION, SnapshotError
from store.keys import KEY_FUNCTION, normalize
from store.publish import current_id, gc, list_snapshots, publish, rollback
from store.pull import PullResult, pull
from store.snapshot import Snapshot

__all__ = [
    "FORMAT_VERSION",
    "KEY_FUNCTION",
    "PullResult",
    "ReadThroughCache",
    "Snapshot",
    "SnapshotError",
    "current_id",
    "gc",
    "list_snapshots",
    "normalize",
    "publish",
    "pull",
    "rollback",
]

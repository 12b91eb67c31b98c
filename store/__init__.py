"""querycache's snapshot store: format, writer, reader and read-through cache.

Importable with lmdb, pyarrow and numpy alone (no Beam, no torch)::

    from querycache.store import Snapshot, ReadThroughCache
    Snapshot.open("/data/qc").get("cheap flights to paris")
"""

from querycache.store.cache import ReadThroughCache
from querycache.store.format import FORMAT_VERSION, SnapshotError
from querycache.store.keys import KEY_FUNCTION, normalize
from querycache.store.publish import current_id, gc, list_snapshots, publish, rollback
from querycache.store.pull import PullResult, pull
from querycache.store.snapshot import Snapshot

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

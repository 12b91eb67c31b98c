"""querycache: BERT answers for the head of query logs, precomputed with Beam, served from snapshots.

    from querycache import Snapshot, ReadThroughCache  # the same objects as querycache.store's

The repository's top-level folders are this package's rooms: ``store/`` is ``querycache.store``,
``inference/`` is ``querycache.inference``, and so on (``[tool.setuptools.package-dir]`` in
pyproject.toml maps them). Names here load on first use, so ``import querycache.store`` costs no
more than the store, and ``import querycache`` nothing at all.
"""

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("querycache")
except PackageNotFoundError:  # pragma: no cover - a checkout that was never installed
    __version__ = "0+unknown"

_LAZY = ("ReadThroughCache", "Snapshot", "SnapshotError", "normalize")
__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module("querycache.store"), name)
    raise AttributeError(f"module 'querycache' has no attribute {name!r}")

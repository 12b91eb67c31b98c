"""Model loading and inference, without Beam: shared by the pipeline's DoFn and online fallbacks.

    from querycache.inference import Engine, EngineConfig

Names load on first use, so ``inference.template`` (no torch) imports without torch.
"""

import importlib

_LAZY = {
    "Engine": "querycache.inference.engine",
    "EngineConfig": "querycache.inference.engine",
    "ModelError": "querycache.inference.model",
}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'querycache.inference' has no attribute {name!r}")

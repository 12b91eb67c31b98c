"""What the routes answer from: the snapshot root's read-through cache and the batcher its misses go to.

The engine is configured from the current snapshot's manifest (task, dtype, pooling, normalisation,
maximum length, template, top-k), so that its fingerprint, the model version, can equal the
snapshot's. When it does not, the service refuses to start, or (``allow_model_mismatch``) answers
everything from the model and says so: answers of two model versions are never mixed. Without a
fallback (``no_fallback``) no model is loaded: the service answers what the snapshot holds, only from
snapshots of the model version it started with, and a miss has no answer.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from querycache.store import ReadThroughCache, SnapshotError
from querycache.store.format import read_manifest
from querycache.store.publish import current_id, resolve

if TYPE_CHECKING:
    from querycache.inference import Engine, EngineConfig
    from querycache.serve.batcher import Batcher

log = logging.getLogger(__name__)
SETTINGS = ("task", "dtype", "max_length", "pooling", "normalize", "template", "top_k")  # of a manifest's model


class ModelMismatchError(Exception):
    """The fallback model is not the model version the snapshot was built with."""


@dataclass
class Service:
    """A root's read-through cache, whose misses go to the batcher of the snapshot's model version.

    ``model`` describes the model version answers come from (task, dtype, max_length, normalize,
    top_k, fingerprint): the engine's, or without a fallback (``batcher`` None) the snapshot's.
    """

    cache: ReadThroughCache
    model: dict[str, Any]
    batcher: Batcher | None = None
    model_matches: bool = True

    @property
    def engine(self) -> Engine | None:
        return self.batcher.engine if self.batcher else None

    @property
    def task(self) -> str:
        return self.model["task"]

    def ready(self) -> bool:
        """Whether a snapshot is being served (or, with a model mismatch allowed, the model answers)."""
        metrics = self.cache.metrics()
        return metrics["snapshot_id"] is not None and (metrics["snapshot_in_use"] or not self.model_matches)

    def info(self) -> dict[str, Any]:
        metrics = self.cache.metrics()
        return {
            "model_id": self.model.get("model_dir"),
            "model_fingerprint": self.model["fingerprint"],
            "model_dtype": self.model.get("dtype"),
            "task": self.task,
            "snapshot_id": metrics["snapshot_id"],
            "snapshot_in_use": metrics["snapshot_in_use"],
            "fallback": self.batcher is not None,
            "max_input_length": self.model.get("max_length"),
            "max_batch_tokens": self.engine.token_budget if self.engine else None,
            "miss_rounds": dataclasses.asdict(self.batcher.stats) if self.batcher else None,
        }

    def close(self) -> None:
        self.cache.close()
        if self.batcher:
            self.batcher.close()


def engine_config(model: dict, model_dir: str | None, device: str) -> EngineConfig:
    """The engine a manifest's ``model`` block describes, loaded from ``model_dir`` on ``device``."""
    from querycache.inference import EngineConfig

    given = {name: model[name] for name in SETTINGS if model.get(name) is not None}
    return EngineConfig(model_dir=model_dir, device=device, **given)


def load_service(
    root: str | os.PathLike,
    model_dir: str | None = None,
    *,
    device: str = "auto",
    allow_model_mismatch: bool = False,
    no_fallback: bool = False,
    counts: MutableMapping[str, float] | None = None,
) -> Service:
    """Open ``root`` (a snapshot root: hot reload follows its ``CURRENT``) and load the fallback model.

    ``model_dir`` defaults to the directory the snapshot's manifest names, where it exists here,
    else the shipped default model. Raises :class:`ModelMismatchError` (one line) when that model's
    fingerprint is not the snapshot's, unless ``allow_model_mismatch``. With ``no_fallback`` no model
    is loaded (nor torch imported): misses have no answer. ``counts`` keeps the cache's counters
    (see :class:`~querycache.store.ReadThroughCache`).
    """
    if current_id(root) is None:
        raise SnapshotError(
            f"{root} has no CURRENT: serve takes the root that build publishes into (its --out), "
            "not one snapshot directory, and needs a snapshot published there"
        )
    try:
        manifest = read_manifest(resolve(root))
    except SnapshotError as err:
        raise SnapshotError(f"{err}; serve needs a root with a published snapshot") from None
    model = manifest["model"]
    if no_fallback:
        described = {"task": manifest["task"], "top_k": manifest["result"].get("top_k"), **model}
        return Service(ReadThroughCache(root, fingerprint=model["fingerprint"], counts=counts), described)
    from querycache.inference import Engine
    from querycache.serve.batcher import Batcher

    if model_dir is None and model.get("model_dir") and os.path.isdir(model["model_dir"]):
        model_dir = model["model_dir"]
    engine = Engine(engine_config(model, model_dir, device))
    matches = engine.fingerprint == model["fingerprint"]
    if not matches:
        words = (
            f"the model in {engine.model_dir} ({engine.fingerprint[:12]}) is not the model version of snapshot "
            f"{manifest['snapshot_id']} ({model['fingerprint'][:12]}, built from {model.get('model_dir')})"
        )
        if not allow_model_mismatch:
            raise ModelMismatchError(
                f"{words}: pass --model with the snapshot's model, or --allow-model-mismatch to answer "
                "every request from the model"
            )
        log.warning("%s: answering every request from the model, none from the snapshot", words)
    batcher = Batcher(engine)
    return Service(ReadThroughCache(root, fallback=batcher, counts=counts), engine.describe(), batcher, matches)

"""Models for workers that share no disk with the driver: resolved once, shipped as data, staged locally.

    model, engine = ship_model(EngineConfig(model_dir="s3://bucket/models/minilm"))   # on the driver
    local_dir = stage(model)                                                        # on a worker

The driver loads the model once, resolves every ``auto`` (dtype, device kind, pooling, normalisation,
max length, token budget) and records the sha256 of each fingerprinted file. A worker copies those
files (through Beam's ``FileSystems``, so any filesystem) into a local cache keyed by the fingerprint,
once per process and machine, checks every digest while copying, and loads from there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import tempfile
import uuid
from typing import NamedTuple

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from querycache.inference.engine import Engine, EngineConfig
from querycache.inference.fingerprint import model_files
from querycache.inference.model import ModelError, default_model_dir
from querycache.store import fs

CACHE = os.path.join(tempfile.gettempdir(), "querycache-models")


class ShippedModel(NamedTuple):
    """What a worker needs to load the driver's model version: where, which files, which settings."""

    source: str
    files: dict[str, str]
    fingerprint: str
    config: EngineConfig


def ship_model(config: EngineConfig) -> tuple[ShippedModel, Engine]:
    """Load the model on the driver and describe it for workers, every setting resolved."""
    source = config.model_dir or str(default_model_dir())
    local = _download(source) if fs.is_remote(source) else source
    engine = Engine(dataclasses.replace(config, model_dir=local))
    settings = engine.settings
    resolved = dataclasses.replace(
        config, model_dir=source, dtype=engine.dtype, device=engine.device.type,
        pooling=settings.get("pooling"), normalize=settings.get("normalize"), max_length=settings["max_length"],
        token_budget=engine.token_budget,
    )  # fmt: skip
    return ShippedModel(source, model_files(engine.model_dir), engine.fingerprint, resolved), engine


def _download(source: str) -> str:
    """The driver's copy of a remote model directory (a temp cache keyed by the source path)."""
    target = os.path.join(CACHE, "download-" + hashlib.sha256(source.encode("utf-8")).hexdigest()[:16])
    shutil.rmtree(target, ignore_errors=True)
    files = list(fs.walk_files(source))
    if not files:
        raise ModelError(f"--model {source} holds no files; pass a model directory")
    for rel, _ in files:
        os.makedirs(os.path.dirname(os.path.join(target, rel)), exist_ok=True)
        with fs.open_input(fs.join(source, rel)) as src, open(os.path.join(target, rel), "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    return target


def stage(model: ShippedModel) -> str:
    """A local directory holding exactly the driver's model files; ModelError names a file that differs."""
    if not fs.is_remote(model.source):
        _check(model, model_files(model.source))
        return model.source
    target = os.path.join(CACHE, model.fingerprint)
    if os.path.isdir(target):  # a complete copy: directories appear by rename only
        return target
    tmp = f"{target}.tmp-{uuid.uuid4().hex}"
    try:
        got = {rel: _copy(fs.join(model.source, rel), os.path.join(tmp, rel)) for rel in model.files}
        _check(model, got)
        with contextlib.suppress(OSError):  # another process of this machine may have finished first
            os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _copy(source: str, target: str) -> str:
    digest = hashlib.sha256()
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with FileSystems.open(source, compression_type=CompressionTypes.UNCOMPRESSED) as src, open(target, "wb") as dst:
        while block := src.read(1 << 22):
            digest.update(block)
            dst.write(block)
    return digest.hexdigest()


def _check(model: ShippedModel, got: dict[str, str]) -> None:
    for rel in sorted(set(model.files) | set(got)):
        if model.files.get(rel) != got.get(rel):
            raise ModelError(
                f"model file {rel} in {model.source} differs from the one the driver fingerprinted "
                f"(model version {model.fingerprint[:16]}); every worker must see the same model files"
            )

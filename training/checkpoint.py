"""Training checkpoints: model, optimizer and schedule state after a step, for ``--resume``.

    ckpt = Checkpoint(out / ".checkpoint", signature(config, data_fp, model_dir))
    ckpt.save(model, optimizer, scheduler, step); step = ckpt.restore(model, optimizer, scheduler)

A checkpoint holds tensors, numbers and strings only and is read with ``torch.load(weights_only=True)``
(no arbitrary pickle). It is replaced atomically, and refused on resume when it was written for
other data, another base model or another configuration.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from querycache.inference.fingerprint import model_files

_IRRELEVANT = ("checkpoint_every", "device", "threads")


class CheckpointError(Exception):
    """A checkpoint cannot be resumed; the message says why."""


def signature(config, data_fp: str, model_dir: str | os.PathLike) -> str:
    """What a resumed run must share with the run that wrote the checkpoint."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in _IRRELEVANT}
    payload = {"config": settings, "data": data_fp, "model": model_files(model_dir)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


class Checkpoint:
    """The checkpoint file of one output directory."""

    def __init__(self, directory: Path, sig: str):
        self.directory, self.signature = directory, sig
        self.path = directory / "state.pt"

    def save(self, model, optimizer, scheduler, step: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        state = {
            "signature": self.signature,
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        }
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)

    def restore(self, model, optimizer, scheduler) -> int:
        """Load the saved state into the given objects; the step to continue after (0 without a checkpoint)."""
        if not self.path.is_file():
            return 0
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state.get("signature") != self.signature:
            raise CheckpointError(
                f"the checkpoint in {self.directory} was written for other logs, model or settings; "
                "rerun with the same flags, or remove it to start over"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        return int(state["step"])

    def exists(self) -> bool:
        return self.path.is_file()

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

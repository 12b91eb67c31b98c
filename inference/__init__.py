"""Model loading and inference, without Beam: shared by the pipeline's DoFn and online fallbacks."""

from inference.engine import Engine, EngineConfig
from inference.model import ModelError

__all__ = ["Engine", "EngineConfig", "ModelError"]

"""Fine-tuning on query keys, without Beam: masked-LM adaptation and sequence classifiers.

from querycache.training import Example, TrainConfig, train
report = train("models/base", [Example("cheap flights to paris", 12)], TrainConfig(steps=200), "models/ours")
"""

from querycache.training.data import Example
from querycache.training.loop import Step, TrainConfig, TrainingError, train

__all__ = ["Example", "Step", "TrainConfig", "TrainingError", "train"]

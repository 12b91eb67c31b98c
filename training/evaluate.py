"""Held-out evaluation: masked-token accuracy and pseudo-perplexity; accuracy and macro-F1 for classify.

    figures = evaluate_mlm(model, tokenizer, ["cheap flights to paris"], device)

Fill-mask masks every non-special token of each held-out query once, one at a time (the
pseudo-log-likelihood of Salazar et al., 2020), so before and after are scored on exactly the
same masked positions, with no randomness.
"""

from __future__ import annotations

import math

import torch

from querycache.inference.batching import token_budget_batches


def masked_logits(model, inputs: dict, positions: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits at ``positions`` only (a boolean mask over the batch's tokens).

    The vocabulary projection costs as much as the encoder on small models with large
    vocabularies (MiniLM: 384 x 30,522), so it runs on the masked positions alone.
    """
    head = getattr(model, "cls", None) or getattr(model, "lm_head", None)
    if head is None:
        return model(**inputs).logits[positions]
    return head(model.base_model(**inputs).last_hidden_state[positions])


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type, enabled=False)


def masked_variants(ids: list[list[int]], special_ids: set[int], mask_id: int) -> list[tuple[list[int], int, int]]:
    """``(masked ids, position, true id)`` for every maskable position of every input."""
    return [
        ([*row[:j], mask_id, *row[j + 1 :]], j, token)
        for row in ids
        for j, token in enumerate(row)
        if token not in special_ids
    ]


@torch.no_grad()
def evaluate_mlm(model, tokenizer, keys: list[str], device: torch.device, dtype=None, budget: int = 4096) -> dict:
    """``{"masked_accuracy", "pseudo_perplexity", "positions", "queries"}`` over ``keys``."""
    was_training = model.training
    model.eval()
    ids = tokenizer(keys, truncation=True)["input_ids"]
    variants = masked_variants(ids, set(tokenizer.all_special_ids), tokenizer.mask_token_id)
    correct, nll = 0, 0.0
    for batch in token_budget_batches([len(v[0]) for v in variants], budget):
        padded = tokenizer.pad({"input_ids": [variants[i][0] for i in batch]}, return_tensors="pt").to(device)
        positions = padded["input_ids"] == tokenizer.mask_token_id
        with _autocast(device, dtype):
            at = masked_logits(model, dict(padded), positions).float()
        truth = torch.tensor([variants[i][2] for i in batch], device=device)
        correct += int((at.argmax(dim=-1) == truth).sum())
        nll += float(torch.nn.functional.cross_entropy(at, truth, reduction="sum"))
    model.train(was_training)
    n = len(variants)
    return {
        "masked_accuracy": correct / n if n else 0.0,
        "pseudo_perplexity": math.exp(nll / n) if n else float("nan"),
        "positions": n,
        "queries": len(keys),
    }


@torch.no_grad()
def evaluate_classifier(
    model, tokenizer, keys: list[str], labels: list[int], device: torch.device, dtype=None, budget: int = 4096
) -> dict:
    """``{"accuracy", "macro_f1", "queries"}``: macro-F1 averages F1 over the labels of the model."""
    was_training = model.training
    model.eval()
    ids = tokenizer(keys, truncation=True)["input_ids"]
    predicted = [0] * len(ids)
    for batch in token_budget_batches([len(x) for x in ids], budget):
        padded = tokenizer.pad({"input_ids": [ids[i] for i in batch]}, return_tensors="pt").to(device)
        with _autocast(device, dtype):
            out = model(**padded).logits.argmax(dim=-1).tolist()
        for i, p in zip(batch, out):
            predicted[i] = p
    model.train(was_training)
    return {
        "accuracy": sum(p == t for p, t in zip(predicted, labels)) / len(labels) if labels else 0.0,
        "macro_f1": macro_f1(predicted, labels, model.config.num_labels),
        "queries": len(keys),
    }


def macro_f1(predicted: list[int], truth: list[int], num_labels: int) -> float:
    """Mean over labels of 2PR/(P+R); a label absent from both lists is left out of the mean."""
    scores = []
    for label in range(num_labels):
        tp = sum(p == t == label for p, t in zip(predicted, truth))
        fp = sum(p == label != t for p, t in zip(predicted, truth))
        fn = sum(t == label != p for p, t in zip(predicted, truth))
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0

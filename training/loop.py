"""Fine-tune a model on query keys: masked-LM adaptation or a sequence classifier. No Beam here.

    report = train("models/minilm", examples, TrainConfig(steps=500), "models/minilm-ours")

Batches are drawn with replacement, weighted by count (see :func:`training.data.sampling_weights`),
and cut at a padded-token budget. Every step reseeds from (seed, step), so a run resumed from a
checkpoint draws the same batches, masks and dropout as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import get_linear_schedule_with_warmup

from querycache.inference.device import resolve_device, resolve_dtype
from querycache.training.checkpoint import Checkpoint, signature
from querycache.training.data import Example, data_fingerprint, labels_of, sampling_weights, split
from querycache.training.evaluate import evaluate_classifier, evaluate_mlm, masked_logits
from querycache.training.heads import load_for_training
from querycache.training.masking import IGNORE, mask_batch
from querycache.training.output import save_model

log = logging.getLogger(__name__)


class TrainingError(Exception):
    """Training cannot go on; the message says what to change."""


@dataclass(frozen=True)
class TrainConfig:
    """How to train. ``steps`` wins over ``epochs``; with neither, 3 epochs."""

    task: str = "fill-mask"
    steps: int | None = None
    epochs: float | None = None  # one epoch draws as many queries as there are distinct training queries
    lr: float = 5e-5
    warmup: float = 0.06  # a fraction of the steps (< 1) or a number of steps
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    mask_prob: float = 0.15
    whole_word: bool = False
    batch_tokens: int = 4096  # padded tokens per batch
    max_length: int = 64
    eval_fraction: float = 0.05
    eval_max: int = 2000  # held-out queries scored, at most
    sampling: str = "sqrt"
    seed: int = 0
    dtype: str = "auto"  # autocast: auto (bf16 where supported) | bf16 | fp32
    device: str = "auto"
    checkpoint_every: int = 100
    threads: int | None = None  # torch CPU threads (default: torch's own)


class Step(NamedTuple):
    """What a progress callback receives after each step."""

    step: int
    total: int
    loss: float
    queries: int
    seconds: float  # since this process started training


class _Data(NamedTuple):
    ids: list[list[int]]
    words: list[list[int]]
    labels: list[int]
    weights: torch.Tensor


def train(
    model_dir: str | Path,
    examples: list[Example],
    config: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    progress: Callable[[Step], None] | None = None,
    extra: dict | None = None,
) -> dict:
    """Train, evaluate before and after on the held-out split, save to ``out``; return the report.

    The report (also written to ``out/finetune.json`` with ``extra`` merged in) holds the
    configuration, the data fingerprint, ``before`` and ``after`` figures, and timings.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads or threads)
    try:
        return _train(model_dir, examples, config, out, resume, progress, extra or {})
    finally:
        torch.set_num_threads(threads)


def _train(model_dir, examples, config, out, resume, progress, extra) -> dict:
    started = time.perf_counter()
    train_set, held_out = split(examples, config.eval_fraction)
    if not train_set:
        raise TrainingError("no training queries left after the held-out split; lower --eval-fraction or add logs")
    labels = labels_of(examples) if config.task == "classify" else None
    model, tokenizer, notes = load_for_training(model_dir, config.task, labels)
    device = resolve_device(config.device)
    amp = _autocast_dtype(config.dtype, device)
    model.to(device)
    data = _encode(tokenizer, train_set, config, labels)
    total = _total_steps(config, data)
    evaluate = _evaluator(model, tokenizer, held_out[: config.eval_max], labels, device, amp)
    before, before_seconds = _timed(evaluate)
    log.info("before: %s", before)
    ckpt = Checkpoint(Path(out) / ".checkpoint", signature(config, data_fingerprint(examples), model_dir))
    optimizer, scheduler = _optimizer(model, config, total)
    start = ckpt.restore(model, optimizer, scheduler) if resume else 0
    (loss, drawn), train_seconds = _timed(
        _loop, model, tokenizer, data, config, (optimizer, scheduler), (start, total), ckpt, device, amp, progress
    )
    after, after_seconds = _timed(evaluate)
    log.info("after: %s", after)
    report = {
        "task": config.task,
        "config": dataclasses.asdict(config) | {"steps": total, "dtype": _dtype_name(amp), "device": str(device)},
        "data": {
            "fingerprint": data_fingerprint(examples),
            "train_queries": len(train_set),
            "held_out_queries": len(held_out),
            "evaluated_queries": min(len(held_out), config.eval_max),
            **({"labels": labels} if labels else {}),
        },
        "notes": notes,
        "before": before,
        "after": after,
        "final_loss": loss,
        "resumed_from_step": start,
        "seconds": round(time.perf_counter() - started, 2),
        "timing": {
            "train_seconds": round(train_seconds, 2),
            "eval_seconds": round(before_seconds + after_seconds, 2),
            "queries_drawn": drawn,
            "queries_per_second": round(drawn / train_seconds, 1) if train_seconds else 0.0,
        },
        **extra,
    }
    save_model(model, tokenizer, model_dir, out, report)
    ckpt.remove()
    return report


def _timed(fn, *args):
    began = time.perf_counter()
    return fn(*args), time.perf_counter() - began


def _autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the hardware runs it (the engine's choice); fp16 GPUs train in fp32."""
    if dtype not in ("auto", "fp32", "bf16"):
        raise TrainingError(f"--dtype {dtype}: training runs in auto, fp32 or bf16")
    resolved = resolve_dtype(dtype, device)
    return torch.bfloat16 if resolved == "bf16" else None


def _dtype_name(amp: torch.dtype | None) -> str:
    return "bf16" if amp is torch.bfloat16 else "fp32"


def _encode(tokenizer, train_set: list[Example], config: TrainConfig, labels: list[str] | None) -> _Data:
    enc = tokenizer([e.key for e in train_set], truncation=True, max_length=config.max_length)
    words = [[-1 if w is None else w for w in enc.word_ids(i)] for i in range(len(train_set))]
    index = {label: i for i, label in enumerate(labels or [])}
    return _Data(
        ids=enc["input_ids"],
        words=words,
        labels=[index.get(e.label, 0) for e in train_set],
        weights=torch.tensor(sampling_weights([e.count for e in train_set], config.sampling), dtype=torch.float64),
    )


def _total_steps(config: TrainConfig, data: _Data) -> int:
    if config.steps:
        return config.steps
    lengths = sorted(len(x) for x in data.ids)
    rows = max(1, config.batch_tokens // lengths[int(0.95 * (len(lengths) - 1))])
    return max(1, math.ceil((config.epochs or 3) * len(data.ids) / rows))


def _optimizer(model, config: TrainConfig, total: int):
    """AdamW without decay on biases and norms; linear warmup, then linear decay to zero."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=config.lr)
    warmup = int(config.warmup * total) if config.warmup < 1 else int(config.warmup)
    return optimizer, get_linear_schedule_with_warmup(optimizer, min(warmup, total), total)


def _evaluator(model, tokenizer, held_out: list[Example], labels, device, amp) -> Callable[[], dict]:
    keys = [e.key for e in held_out]
    if labels is None:
        return lambda: evaluate_mlm(model, tokenizer, keys, device, amp)
    truth = [labels.index(e.label) for e in held_out]
    return lambda: evaluate_classifier(model, tokenizer, keys, truth, device, amp)


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % 2**63


def _batch(tokenizer, data: _Data, config: TrainConfig, generator: torch.Generator) -> dict:
    """Draw queries by weight until the padded batch would exceed the token budget."""
    shortest = min(len(x) for x in data.ids)
    drawn = torch.multinomial(data.weights, max(1, config.batch_tokens // shortest), True, generator=generator)
    rows, longest = [], 0
    for i in drawn.tolist():
        longest_next = max(longest, len(data.ids[i]))
        if rows and (len(rows) + 1) * longest_next > config.batch_tokens:
            break
        rows.append(i)
        longest = longest_next
    batch = tokenizer.pad({"input_ids": [data.ids[i] for i in rows]}, return_tensors="pt")
    if config.task == "classify":
        return dict(batch) | {"labels": torch.tensor([data.labels[i] for i in rows])}
    words = torch.tensor([data.words[i] + [-1] * (longest - len(data.words[i])) for i in rows])
    special = words < 0
    inputs, labels = mask_batch(
        batch["input_ids"], special, tokenizer.mask_token_id, len(tokenizer), config.mask_prob, generator,
        words if config.whole_word else None,
    )  # fmt: skip
    return {"input_ids": inputs, "attention_mask": batch["attention_mask"], "labels": labels}


def _loop(model, tokenizer, data, config, opt, span, ckpt, device, amp, progress) -> tuple[float | None, int]:
    """Steps ``span[0]+1 .. span[1]``; a checkpoint every ``checkpoint_every`` steps. (last loss, queries drawn)"""
    optimizer, scheduler = opt
    start, total = span
    report = progress or _log_progress(total)
    began, loss, drawn = time.perf_counter(), None, 0
    model.train()
    for step in range(start + 1, total + 1):
        generator = torch.Generator().manual_seed(_step_seed(config.seed, step))
        torch.manual_seed(_step_seed(config.seed, step))  # dropout
        batch = {k: v.to(device) for k, v in _batch(tokenizer, data, config, generator).items()}
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss_tensor = _loss(model, batch, config.task)
        loss_tensor.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_tensor.item()
        drawn += len(batch["input_ids"])
        if step % config.checkpoint_every == 0 and step < total:
            ckpt.save(model, optimizer, scheduler, step)
        report(Step(step, total, loss, len(batch["input_ids"]), time.perf_counter() - began))
    return loss, drawn


def _loss(model, batch: dict, task: str) -> torch.Tensor:
    """Classifier loss, or masked-LM cross-entropy over the chosen positions only."""
    if task == "classify":
        return model(**batch).loss
    labels = batch["labels"]
    chosen = labels != IGNORE
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return torch.nn.functional.cross_entropy(masked_logits(model, inputs, chosen).float(), labels[chosen])


def _log_progress(total: int) -> Callable[[Step], None]:
    """The default progress: a log line about every 5% of the steps with loss, rate and ETA."""
    every = max(1, total // 20)
    first: list[Step] = []

    def report(s: Step) -> None:
        first[:] = first or [s]
        if s.step % every and s.step != s.total:
            return
        done = s.step - first[0].step + 1
        rate = done / s.seconds if s.seconds else 0.0
        eta = (s.total - s.step) / rate if rate else 0.0
        log.info("step %d/%d  loss %.4f  %.2f steps/s  ETA %.0fs", s.step, s.total, s.loss, rate, eta)

    return report

"""The inference engine: load once, fingerprint, tokenize, batch by token budget, run, post-process.

    engine = Engine(EngineConfig(model_dir="models/minilm", task="embed"))
    vectors = engine(["cheap flights to paris"])        # list of float32 arrays
    engine.fingerprint                                   # the model version of the design

No Beam here: the pipeline's DoFn and a service's cache fallback call the same code.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from querycache.inference.batching import token_budget_batches
from querycache.inference.device import DTYPES, attention_for, default_token_budget, resolve_device, resolve_dtype
from querycache.inference.fingerprint import fingerprint
from querycache.inference.model import (
    ModelError,
    check_model_dir,
    default_model_dir,
    load_model,
    load_tokenizer,
    sentence_transformers_pooling,
)
from querycache.inference.template import DEFAULT_TEMPLATE, MASK, apply

log = logging.getLogger(__name__)
_PROCESS_THREADS = torch.get_num_threads()  # the process's own setting, before any engine divided it


@dataclass(frozen=True)
class EngineConfig:
    """What to load and how to answer. ``None`` means: the model's own setting, or the default."""

    model_dir: str | None = None
    task: str = "embed"
    dtype: str = "auto"
    device: str = "auto"
    pooling: str | None = None  # mean | cls | max; default: the sentence-transformers config, else mean
    normalize: bool | None = None  # L2-normalise embeddings; default: the sentence-transformers config, else False
    max_length: int | None = None
    template: str = DEFAULT_TEMPLATE
    top_k: int = 5
    token_budget: int | None = None
    streams: int = 1  # batches in flight on CPU threads (one torch thread each); 0 = one per core


@dataclass
class BatchStats:
    """Counters of one :meth:`Engine.run` call."""

    queries: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    batches: int = 0
    truncated: int = 0
    seconds: float = 0.0
    rejected: dict = field(default_factory=dict)


class Engine:
    """A loaded model for one task, with its fingerprint and result schema."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.model_dir = check_model_dir(config.model_dir or default_model_dir())
        try:
            self.device = resolve_device(config.device)
            self.dtype = resolve_dtype(config.dtype, self.device)
        except ValueError as err:
            raise ModelError(str(err)) from None
        self.tokenizer = load_tokenizer(self.model_dir)
        model = load_model(self.model_dir, config.task)
        self.settings = self._resolve_settings(model)
        self.max_length = self.settings["max_length"]
        self._encoder = self._fixed_encoder()
        self.token_budget = config.token_budget or default_token_budget(self.device)
        self.streams = 1 if self.device.type != "cpu" else config.streams or os.cpu_count() or 1
        self.attention = attention_for(self.device)
        self._pool = None
        if self.streams > 1:  # FACTS: two batches on two 1-thread streams beat one batch on two threads
            # From the process's setting, not the current one: a second engine must not halve it again.
            torch.set_num_threads(max(1, _PROCESS_THREADS // self.streams))
            self._pool = ThreadPoolExecutor(self.streams, thread_name_prefix="querycache-batch")
        self.model = self._place(model)
        self.fingerprint = fingerprint(self.model_dir, self.settings)
        self.schema = self._schema(model)

    # -- setup ---------------------------------------------------------------------------------
    def _resolve_settings(self, model: torch.nn.Module) -> dict:
        cfg = self.config
        limit = min(self.tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", 512))
        settings = {"task": cfg.task, "dtype": self.dtype, "max_length": min(cfg.max_length or limit, limit)}
        if cfg.task == "embed":
            own = sentence_transformers_pooling(self.model_dir) or {}
            settings["pooling"] = cfg.pooling or own.get("pooling", "mean")
            settings["normalize"] = own.get("normalize", False) if cfg.normalize is None else cfg.normalize
            if cfg.max_length is None and own.get("max_length"):
                settings["max_length"] = min(own["max_length"], limit)
        elif cfg.task == "fill-mask":
            if "{query}" not in cfg.template:
                raise ModelError(f"--template {cfg.template!r} has no {{query}}; for example '{{query}} {MASK}'")
            settings |= {"template": cfg.template, "top_k": cfg.top_k}
        return settings

    def _fixed_encoder(self):
        """A private copy of the fast tokenizer, truncating at max length, whose settings never change.

        Calling a transformers tokenizer with other truncation arguments reconfigures the shared Rust
        tokenizer, which fails ("Already borrowed") while another thread encodes; this copy is only read.
        """
        from tokenizers import Tokenizer

        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ModelError(f"{self.model_dir}: querycache needs a fast (tokenizer.json) tokenizer")
        encoder = Tokenizer.from_str(backend.to_str())
        encoder.no_padding()
        encoder.enable_truncation(self.max_length)
        return encoder

    def _place(self, model: torch.nn.Module) -> torch.nn.Module:
        model.set_attn_implementation(self.attention)
        return model.to(device=self.device, dtype=DTYPES[self.dtype])

    def _schema(self, model: torch.nn.Module) -> dict:
        if self.config.task == "embed":
            return {"encoding": "float32", "dim": int(model.config.hidden_size)}
        if self.config.task == "classify":
            labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
            return {"encoding": "json", "labels": labels}
        return {"encoding": "json", "top_k": self.config.top_k}

    def describe(self) -> dict:
        """What the fingerprint stands for, for the manifest and ``model-info``."""
        return {
            "fingerprint": self.fingerprint,
            "model_dir": str(self.model_dir),
            "architecture": (self.model.config.architectures or [type(self.model).__name__])[0],
            "device": str(self.device),
            "token_budget": self.token_budget,
            **self.settings,
        }

    # -- running -------------------------------------------------------------------------------
    def __call__(self, queries: list[str]) -> list[Any]:
        """Results for ``queries`` in order (None for a fill-mask input whose mask was cut off)."""
        return self.run(queries)[0]

    def count_tokens(self, queries: list[str]) -> list[int]:
        """Tokens the model reads for each query (template applied, truncated at the maximum length)."""
        return [len(encoding.ids) for encoding in self._encoder.encode_batch(self._texts(queries))]

    def overlong(self, queries: list[str]) -> list[int]:
        """Positions of the queries longer than the maximum length (the ones the model reads truncated)."""
        return [
            i for i, encoding in enumerate(self._encoder.encode_batch(self._texts(queries))) if encoding.overflowing
        ]

    def _texts(self, queries: list[str]) -> list[str]:
        if self.config.task != "fill-mask":
            return queries
        return [apply(self.config.template, q, self.tokenizer.mask_token) for q in queries]

    def run(self, queries: list[str], progress: Callable[[int], None] | None = None) -> tuple[list[Any], BatchStats]:
        """Results in input order and the counters of this call; ``progress(n)`` after each batch of n queries."""
        start = time.perf_counter()
        stats = BatchStats(queries=len(queries))
        encodings = self._encoder.encode_batch(self._texts(queries))
        ids = [e.ids for e in encodings]
        stats.truncated = sum(1 for e in encodings if e.overflowing)
        results: list[Any] = [None] * len(ids)
        batches = [[(i, ids[i]) for i in b] for b in token_budget_batches([len(x) for x in ids], self.token_budget)]
        run_all = self._pool.map if self._pool is not None and len(batches) > 1 else map
        for batch, (outputs, real, padded) in zip(batches, run_all(self._run_batch, batches)):
            stats.batches += 1
            stats.tokens += real
            stats.padded_tokens += padded
            for (i, _), result in zip(batch, outputs):
                results[i] = result
            if progress is not None:
                progress(len(batch))
        stats.rejected = {"mask_truncated": results.count(None)} if self.config.task == "fill-mask" else {}
        stats.seconds = time.perf_counter() - start
        return results, stats

    @torch.inference_mode()
    def _run_batch(self, batch: list[tuple[int, list[int]]]) -> tuple[list[Any], int, int]:
        """Pad one batch to its longest input and run it: (results, real tokens, padded tokens)."""
        padded = self.tokenizer.pad({"input_ids": [x for _, x in batch]}, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in padded.items()}
        return self._forward(inputs), int(padded["attention_mask"].sum()), padded["input_ids"].numel()

    def _forward(self, inputs: dict[str, torch.Tensor]) -> list[Any]:
        task = self.config.task
        if task == "embed":
            return list(self._embed(inputs))
        if task == "classify":
            probs = torch.softmax(self.model(**inputs).logits.float(), dim=-1).cpu().numpy()
            labels = self.schema["labels"]
            return [_ranked_labels(labels, row) for row in probs]
        return self._fill_mask(inputs)

    def _embed(self, inputs: dict[str, torch.Tensor]) -> np.ndarray:
        hidden = self.model(**inputs).last_hidden_state.float()
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooling = self.settings["pooling"]
        if pooling == "cls":
            pooled = hidden[:, 0]
        elif pooling == "max":
            pooled = hidden.masked_fill(mask == 0, float("-inf")).amax(dim=1)
        else:
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        if self.settings["normalize"]:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.cpu().numpy().astype(np.float32, copy=False)

    def _fill_mask(self, inputs: dict[str, torch.Tensor]) -> list[Any]:
        positions = inputs["input_ids"] == self.tokenizer.mask_token_id
        base = self.model.base_model(**inputs).last_hidden_state
        head = getattr(self.model, "cls", None) or getattr(self.model, "lm_head", None)
        # Project to the vocabulary at mask positions only, where the head is known.
        logits = head(base[positions]) if head is not None else self.model(**inputs).logits[positions]
        top = torch.softmax(logits.float(), dim=-1).topk(self.config.top_k, dim=-1)
        tokens = [self.tokenizer.convert_ids_to_tokens(row) for row in top.indices.cpu().tolist()]
        scores = top.values.cpu().tolist()
        out: list[Any] = []
        cursor = 0
        for count in positions.sum(dim=1).tolist():
            out.append(
                [
                    [{"token": t, "score": s} for t, s in zip(tokens[j], scores[j])]
                    for j in range(cursor, cursor + count)
                ]
                or None
            )
            cursor += count
        return out


def _ranked_labels(labels: list[str], probs: np.ndarray) -> dict:
    order = np.argsort(-probs, kind="stable")
    return {"label": labels[order[0]], "scores": {labels[i]: float(probs[i]) for i in order}}


def describe_model(model_dir: str | None) -> dict:
    """Task support of a model directory: for each task, whether it loads, its settings and fingerprint."""
    directory = check_model_dir(model_dir or default_model_dir())
    tasks = {}
    for task in ("embed", "fill-mask", "classify"):
        try:
            engine = Engine(EngineConfig(model_dir=str(directory), task=task, device="cpu"))
            tasks[task] = {
                "ok": True,
                "fingerprint": engine.fingerprint,
                "settings": engine.settings,
                "result": engine.schema,
            }
        except ModelError as err:
            tasks[task] = {"ok": False, "error": str(err)}
    return {"model_dir": str(directory), "tasks": tasks}

"""Training examples: the held-out split, sampling weights by count, a data fingerprint. No torch here.

train, held_out = split(examples, eval_fraction=0.05)
weights = sampling_weights([e.count for e in train], "sqrt")
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

SAMPLING = ("sqrt", "log", "uniform", "count")


class Example(NamedTuple):
    """One distinct query of the logs: its key, weighted count, and (for classify) its label."""

    key: str
    count: int
    label: str | None = None


def held_out_score(key: str) -> float:
    """A stable number in [0, 1) for ``key``: the first 8 bytes of its SHA-256."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split(examples: Iterable[Example], eval_fraction: float) -> tuple[list[Example], list[Example]]:
    """``(train, held_out)``: a key is held out when its score is below ``eval_fraction``.

    The split depends on the key alone, so reruns (and runs over more logs) hold out the same
    queries, and no held-out query is ever trained on. Both lists are sorted by key.
    """
    train, held_out = [], []
    for example in sorted(examples):
        (held_out if held_out_score(example.key) < eval_fraction else train).append(example)
    return train, held_out


def sampling_weights(counts: Sequence[int], scheme: str = "sqrt") -> list[float]:
    """Relative probability of drawing each query for a training batch.

    ``sqrt`` (default): proportional to the square root of the count, so the head is seen more
    often than the tail but does not drown it (a query 100x as frequent is drawn 10x as often);
    ``log``: 1 + ln(count); ``uniform``: every distinct query alike; ``count``: as in the traffic.
    """
    if scheme == "sqrt":
        return [math.sqrt(c) for c in counts]
    if scheme == "log":
        return [1.0 + math.log(c) for c in counts]
    if scheme == "uniform":
        return [1.0] * len(counts)
    if scheme == "count":
        return [float(c) for c in counts]
    raise ValueError(f"unknown sampling {scheme!r}; choose one of {', '.join(SAMPLING)}")


def data_fingerprint(examples: Iterable[Example]) -> str:
    """SHA-256 over the sorted examples (key, count, label): equal data, equal fingerprint."""
    digest = hashlib.sha256()
    for example in sorted(examples):
        digest.update(json.dumps(list(example), ensure_ascii=False).encode("utf-8") + b"\n")
    return digest.hexdigest()


def labels_of(examples: Iterable[Example]) -> list[str]:
    """The sorted label names found in the data (classify); their order is the ``id2label`` order."""
    return sorted({e.label for e in examples if e.label is not None})

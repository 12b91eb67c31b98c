"""Concurrency: the engine from many threads, threads per process, side inputs, forked readers."""

from __future__ import annotations

import threading

import numpy as np
import torch

from inference import Engine, EngineConfig
from tests.tiny_bert import WORDS


def _engine(model, **kw) -> Engine:
    return Engine(EngineConfig(model_dir=str(model), dtype="fp32", device="cpu", **kw))


def _queries(seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    # Lengths from one word to far past the tiny BERT's 64 positions, so some are truncated.
    return [" ".join(rng.choice(WORDS, size=int(n))) for n in rng.integers(1, 120, size=4)]


def test_one_engine_answers_many_threads_as_it_answers_one(tiny_bert):
    engine = _engine(tiny_bert, streams=1)
    batches = [_queries(seed) for seed in range(8)]
    expected = [np.stack(engine(b)) for b in batches]
    assert sum(engine.run(b)[1].truncated for b in batches) > 0
    mismatches, errors = [], []

    def work(i: int) -> None:
        try:
            for _ in range(40):
                if not np.allclose(np.stack(engine(batches[i])), expected[i], rtol=1e-4, atol=1e-5):
                    mismatches.append(i)
        except Exception as err:  # noqa: BLE001 - any error is a failure of the engine here
            errors.append(repr(err))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and mismatches == []


def test_engines_never_divide_the_process_threads_again(tiny_bert):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(8)
        _engine(tiny_bert, streams=2)
        first = torch.get_num_threads()
        _engine(tiny_bert, streams=2)
        _engine(tiny_bert, streams=2)
        assert torch.get_num_threads() == first
    finally:
        torch.set_num_threads(before)

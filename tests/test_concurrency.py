"""Concurrency: the engine from many threads, threads per process, side inputs, forked readers."""

from __future__ import annotations

import os
import threading

import numpy as np
import torch

from querycache.inference import Engine, EngineConfig
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


def test_finalize_leaves_its_side_inputs_as_it_found_them(tmp_path):
    import copy

    from querycache.pipelines.build import _finalize

    stats = {"lines_read": 3, "accepted": 3, "distinct_queries": 2, "rows": 2, "reused": 0,
             "rejected_by_reason": {}, "dropped_for_privacy": {}, "unanswered": {},
             "inference": {"queries": 2, "seconds": 0.5}}  # fmt: skip
    plan = {"total_traffic": 3, "head_size": 2, "head_traffic": 3, "selection": {"mode": "min_count", "value": 1},
            "threshold": 1, "take_at_threshold": None}  # fmt: skip
    manifest = {"snapshot_id": "x", "files": {}, "model": {"dtype": "fp32", "device": "cpu"}}
    seen = copy.deepcopy((stats, plan, manifest))
    for _ in range(2):  # a runner that caches side inputs hands the same objects to a retried bundle
        _finalize(str(tmp_path), manifest, [], [], stats, plan)
    assert (stats, plan, manifest) == seen


def _in_child(work) -> int:
    """Run ``work`` in a forked child; its exit status, or -1 when it hangs."""
    import time

    pid = os.fork()
    if pid == 0:
        try:
            os._exit(0 if work() else 1)
        finally:
            os._exit(2)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return -1


def test_a_fork_while_another_thread_holds_the_store_locks_does_not_hang_the_child(tmp_path):
    from querycache.store import ReadThroughCache, Snapshot
    from querycache.store import snapshot as snapshot_module
    from tests.store_helpers import make_snapshot

    schema = {"encoding": "float32", "dim": 2}
    make_snapshot(tmp_path / "a", {"q": [1, 2]}, schema)
    make_snapshot(tmp_path / "b", {"q": [3, 4]}, schema)
    cache = ReadThroughCache(tmp_path / "a")
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with snapshot_module._envs_lock, cache._state_lock, cache._lock:
            held.set()
            release.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait()
    try:
        status = _in_child(lambda: Snapshot.open(tmp_path / "b").get("q") is not None and cache.get("q") is not None)
    finally:
        release.set()
        holder.join()
    cache.close()
    assert status == 0


def test_a_retired_snapshot_stays_open_until_the_last_lookup_lets_go(tmp_path):
    from querycache.store import ReadThroughCache
    from tests.store_helpers import make_snapshot

    schema = {"encoding": "float32", "dim": 2}
    make_snapshot(tmp_path, {"q": [1, 2]}, schema)
    cache = ReadThroughCache(tmp_path)
    held, _ = cache._lease()  # what a get_many holds while it reads
    for value in ([3, 4], [5, 6]):  # two swaps: the old code closed the retired one at the second
        make_snapshot(tmp_path, {"q": value}, schema)
        cache.refresh()
    assert list(held.get("q")) == [1, 2]
    cache._release(held)
    assert held._closed and list(cache.get("q")) == [5, 6]
    cache.close()

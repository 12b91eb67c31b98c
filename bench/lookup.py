"""Snapshot lookups against raw LMDB, in one run: throughput, latency, two processes, hot swaps, size.

    python bench/lookup.py [--keys 200000] [--dim 384]

Targets (issue 3, 11): Snapshot.get >= 0.8x raw lmdb get + np.frombuffer, get_many of 1,000 >= 1.2x
a loop of those; p99 < 10 us;
0 failed lookups across 10 swaps; snapshot size <= 1.35x the raw key + value bytes.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from querycache.store import ReadThroughCache, Snapshot
from querycache.store.publish import gc
from querycache.store.writer import write_snapshot


def make_results(n: int, dim: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    return {f"query number {i} about thing {i * 7919 % 1000}": vectors[i] for i in range(n)}


def raw_get(snap: Snapshot):
    """Plain py-lmdb on the same environment (py-lmdb allows one open per process): get + frombuffer."""
    txn = snap._envs[0].begin(buffers=False)
    return lambda k: np.frombuffer(txn.get(k), dtype="<f4")


def throughput(fn, keys, rounds: int = 3) -> float:
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for k in keys:
            fn(k)
        best = max(best, len(keys) / (time.perf_counter() - start))
    return best


class Ratio(NamedTuple):
    ratio: float
    figure: str


def _interleaved(fns: dict, rounds: int) -> dict:
    """Best seconds of each ``fns`` value over ``rounds``, taken in turn so load hits them alike."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def lookup_ratios(n: int, dim: int = 384) -> tuple[Ratio, Ratio]:
    """``Snapshot.get`` against raw get+decode, and ``get_many`` of 1,000 against a loop of raw gets."""
    with tempfile.TemporaryDirectory() as tmp:
        results = make_results(n, dim)
        write_snapshot(Path(tmp), results, {"encoding": "float32", "dim": dim})
        keys = list(results)
        del results
        random.Random(1).shuffle(keys)
        probe = keys[:50_000]
        with Snapshot.open(tmp) as snap:
            raw = raw_get(snap)
            byte_keys = [k.encode() for k in probe]
            t = _interleaved(
                {"raw": lambda: [raw(k) for k in byte_keys], "get": lambda: [snap.get(q) for q in probe]}, 5
            )
            batches = [(probe[i : i + 1000], byte_keys[i : i + 1000]) for i in range(0, len(probe), 1000)]
            m = _interleaved(
                {
                    "raw": lambda: [[raw(k) for k in b] for _, b in batches],
                    "many": lambda: [snap.get_many(q) for q, _ in batches],
                },
                5,
            )
    per = 1e6 / len(probe)
    return (
        Ratio(t["raw"] / t["get"], f"get {t['get'] * per:.2f} us vs raw {t['raw'] * per:.2f} us per lookup"),
        Ratio(m["raw"] / m["many"], f"get_many {m['many'] * per:.2f} us vs raw {m['raw'] * per:.2f} us per key"),
    )


def latencies(fn, keys) -> tuple[float, float]:
    clock = time.perf_counter_ns
    out = np.empty(len(keys))
    for i, k in enumerate(keys):
        t = clock()
        fn(k)
        out[i] = clock() - t
    return float(np.percentile(out, 50)) / 1000, float(np.percentile(out, 99)) / 1000


def _worker(kind: str, root: str, keys: list, queue) -> None:
    snap = Snapshot.open(root, verify=False)
    fn = raw_get(snap) if kind == "raw" else snap.get
    keys = [k.encode() for k in keys] if kind == "raw" else keys
    queue.put(throughput(fn, keys, rounds=2))


def two_processes(kind: str, root: str, keys: list) -> float:
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(kind, root, keys, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    total = sum(queue.get() for _ in procs)
    for p in procs:
        p.join()
    return total


def _swap_reader(root: str, keys: list, seconds: float, queue) -> None:
    cache = ReadThroughCache(root, check_every=64, check_seconds=0.01, verify=False)
    failed = lookups = 0
    ids = set()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for k in keys[:1000]:
            lookups += 1
            failed += cache.get(k) is None
        ids.add(cache.metrics()["snapshot_id"])
    queue.put((lookups, failed, len(ids), cache.metrics()["reloads"]))


def hot_swaps(root: Path, results: dict, swaps: int) -> tuple:
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    small = dict(list(results.items())[:5000])
    reader = ctx.Process(target=_swap_reader, args=(str(root), list(small), 4.0 + swaps * 0.3, queue))
    reader.start()
    time.sleep(1.0)
    for _ in range(swaps):
        write_snapshot(root, small, {"encoding": "float32", "dim": len(next(iter(small.values())))})
        gc(root, keep=2)  # the reader's old directory goes away under it
        time.sleep(0.2)
    out = queue.get()
    reader.join()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--swaps", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        results = make_results(args.keys, args.dim)
        start = time.perf_counter()
        directory = write_snapshot(root, results, {"encoding": "float32", "dim": args.dim})
        build_s = time.perf_counter() - start
        data = directory / "lmdb/shard-00000-of-00001/data.mdb"
        raw_bytes = sum(len(k.encode()) + v.nbytes for k, v in results.items())
        print(
            f"built {args.keys} keys x {args.dim} float32 in {build_s:.2f}s; "
            f"data.mdb {data.stat().st_size / 2**20:.1f} MiB = {data.stat().st_size / raw_bytes:.3f}x "
            "raw key+value bytes (target <= 1.35)"
        )

        keys = list(results)
        random.Random(1).shuffle(keys)
        probe = keys[:100_000]
        snap = Snapshot.open(root)
        raw = raw_get(snap)
        byte_keys = [k.encode() for k in probe]
        figures = {
            "raw lmdb get + np.frombuffer": (throughput(raw, byte_keys), *latencies(raw, byte_keys)),
            "Snapshot.get_key (normalised key)": (throughput(snap.get_key, probe), *latencies(snap.get_key, probe)),
            "Snapshot.get (normalises query)": (throughput(snap.get, probe), *latencies(snap.get, probe)),
        }
        base = figures["raw lmdb get + np.frombuffer"][0]
        for name, (rate, p50, p99) in figures.items():
            print(f"{name:<36} {rate:>10,.0f} gets/s  p50 {p50:5.2f} us  p99 {p99:5.2f} us  {rate / base:.2f}x raw")
        get, many = lookup_ratios(args.keys, args.dim)
        print(f"Snapshot.get {get.ratio:.2f}x raw ({get.figure}); get_many {many.ratio:.2f}x raw ({many.figure})")
        misses = [f"absent query {i}" for i in range(50_000)]
        print(f"{'Snapshot.get of a miss':<36} {throughput(snap.get, misses):>10,.0f} gets/s")
        raw2, snap2 = two_processes("raw", str(root), probe[:50_000]), two_processes("snap", str(root), probe[:50_000])
        print(f"two processes: raw {raw2:,.0f} gets/s, Snapshot.get {snap2:,.0f} gets/s ({snap2 / raw2:.2f}x raw)")
        lookups, failed, seen, reloads = hot_swaps(root, results, args.swaps)
        print(
            f"hot swap: {args.swaps} snapshots published during {lookups:,} lookups in another process: "
            f"{failed} failed, {reloads} reloads, {seen} snapshot ids served"
        )
        snap.close()
    print(f"(pid {os.getpid()}, {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()

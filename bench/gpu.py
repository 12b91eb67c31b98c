"""The GPU path in one short run: device, fp16/bf16 against fp32, token budgets, and what feeds the GPU.

    python bench/gpu.py [--queries 50000]        # bench/gpu.sh runs this with a time limit

Prints queries/s of the engine and of the Beam inference stage (RunBert) per dtype, cosine against
fp32, a token-budget sweep, and the rates of tokenization alone and of Beam alone (a pass-through
pipeline of the same shape): if either is below the engine's, the GPU waits on it. Without CUDA it
runs a dry pass on the CPU with small sizes, so the script itself stays tested; those figures are not
GPU figures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path[0] = str(Path(__file__).resolve().parents[1])  # as a script, bench/ would shadow the inference package
from bench.inference import beam_overhead, bench_beam_stage, zipf_lengths  # noqa: E402
from bench.loggen import distinct_queries  # noqa: E402
from querycache.inference import Engine, EngineConfig  # noqa: E402


def rate(fn, n: int) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def min_cosine(a: list, b: list) -> float:
    x, y = np.stack(a).astype(np.float64), np.stack(b).astype(np.float64)
    return float(((x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)).min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=50_000)
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    if gpu:
        device, n, dtypes, budgets = "cuda", args.queries, ["fp32", "fp16", "bf16"], [4096, 16384, 65536]
        memory = torch.cuda.get_device_properties(0).total_memory / 2**30
        print(f"device: {torch.cuda.get_device_name(0)}, {memory:.0f} GiB, {torch.cuda.device_count()} visible")
    else:
        device, n, dtypes, budgets = "cpu", min(args.queries, 200), ["fp32"], [1024]
        print("device: no CUDA device visible; DRY RUN on the CPU with small sizes (not GPU figures)")
    queries = zipf_lengths(distinct_queries(n))
    ref = None
    for dtype in dtypes:
        engine = Engine(EngineConfig(dtype=dtype, device=device))
        engine.run(queries[:1000])  # warm: kernels per shape, CUDA context
        if ref is None:
            ref = engine(queries[:2000])
            tokenizer = engine.tokenizer
        alone = rate(lambda e=engine: e.run(queries), n)
        stage = bench_beam_stage(queries, engine)
        cos = min_cosine(engine(queries[:2000]), ref)
        print(f"{dtype}: engine {alone:10,.0f} q/s   Beam stage {stage:10,.0f} q/s   min cosine vs fp32 {cos:.5f}")
        del engine
        if gpu:
            torch.cuda.empty_cache()
    best = dtypes[-1]
    for budget in budgets:
        engine = Engine(EngineConfig(dtype=best, device=device, token_budget=budget))
        engine.run(queries[:1000])
        print(f"{best} token budget {budget:>6}: engine {rate(lambda e=engine: e.run(queries), n):10,.0f} q/s")
        del engine
    tokens = rate(lambda: tokenizer(queries, truncation=True, max_length=256), n)
    beam = n / beam_overhead(queries)
    print(f"feeding the GPU: tokenization alone {tokens:10,.0f} q/s (one process), Beam pass-through {beam:10,.0f} q/s")


if __name__ == "__main__":
    main()

"""The engine against the hardware: the matmul-peak limit (e), the best hand-written loop, attention kinds.

    python bench/hardware.py [--queries 20000] [--stage-queries 100000]

(e) is real tokens x FLOPs per token at the bf16 (else fp32) matmul peak measured in this run.
The hand loop is what a careful user writes in plain PyTorch on the same model and dtype as the
engine (bf16 where the CPU has it, else fp32): length-sorted batches cut at 1,024 padded tokens,
every core on one batch, with SDPA and with eager attention.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

sys.path[0] = str(Path(__file__).resolve().parents[1])  # as a script, bench/ would shadow the inference package
from bench.inference import bench_beam_stage, flops_per_query, matmul_peak, zipf_lengths  # noqa: E402
from bench.loggen import distinct_queries  # noqa: E402
from querycache.inference import Engine, EngineConfig  # noqa: E402
from querycache.inference.batching import token_budget_batches  # noqa: E402


class EngineFigures(NamedTuple):
    engine: float  # queries/s
    limit: float
    hand: float
    engine_big: float
    stage: float
    limit_figure: str
    hand_figure: str
    stage_figure: str


@torch.inference_mode()
def hand_loop(model, tokenizer, queries: list[str], budget: int = 1024) -> list:
    ids = tokenizer(queries, truncation=True, max_length=256)["input_ids"]
    out = [None] * len(ids)
    for batch in token_budget_batches([len(x) for x in ids], budget):
        enc = tokenizer.pad({"input_ids": [ids[i] for i in batch]}, return_tensors="pt")
        hidden = model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1).numpy()
        for i, row in zip(batch, pooled):
            out[i] = row
    return out


def rate(fn, n: int, rounds: int = 2) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n / best


def engine_figures(n: int, stage_n: int) -> EngineFigures:
    queries = zipf_lengths(distinct_queries(n))
    engine = Engine(EngineConfig(task="embed", streams=0))
    dtype = engine.model.dtype
    threads = torch.get_num_threads()
    torch.set_num_threads(threads * engine.streams)  # the peak and the hand loop use every core
    peak = matmul_peak(dtype)
    limit = peak / flops_per_query(engine, queries)
    hand = {}
    for impl in ("sdpa", "eager"):
        engine.model.set_attn_implementation(impl)
        hand_loop(engine.model, engine.tokenizer, queries[:500])
        hand[impl] = rate(lambda: hand_loop(engine.model, engine.tokenizer, queries), n)
    torch.set_num_threads(threads)
    engine.model.set_attn_implementation(engine.attention)
    engine.run(queries[:2000])  # warm: oneDNN builds a kernel per batch shape once
    mine = rate(lambda: engine.run(queries), n)
    big = zipf_lengths(distinct_queries(stage_n, seed=7))
    engine_big = rate(lambda: engine.run(big), stage_n, rounds=1)
    stage = bench_beam_stage(big, engine)
    best = max(hand, key=hand.get)
    return EngineFigures(
        mine, limit, hand[best], engine_big, stage,
        f"engine {mine:,.0f} q/s ({engine.dtype}, {engine.attention}, {engine.streams} streams) vs limit {limit:,.0f} "
        f"q/s = {peak / 1e9:.0f} GFLOP/s {dtype} peak / {flops_per_query(engine, queries) / 1e6:.1f} MFLOP per query",
        f"engine {mine:,.0f} q/s vs hand loop {hand[best]:,.0f} q/s ({best}; "
        + ", ".join(f"{k} {v:,.0f}" for k, v in hand.items()) + ")",
        f"Beam stage {stage:,.0f} q/s vs engine {engine_big:,.0f} q/s",
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--stage-queries", type=int, default=100_000)
    args = parser.parse_args()
    f = engine_figures(args.queries, args.stage_queries)
    for line in (f.limit_figure, f.hand_figure, f.stage_figure):
        print(line)
    print(f"engine/limit {f.engine / f.limit:.2f} (>= 0.7), engine/hand {f.engine / f.hand:.2f} (>= 1.0), "
          f"stage/engine {f.stage / f.engine_big:.2f} (>= 0.9)")  # fmt: skip


if __name__ == "__main__":
    main()

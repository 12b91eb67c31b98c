"""Inference throughput on the shipped MiniLM: querycache against stock paths and the hardware limit.

    python bench/inference.py [--queries 20000] [--pipeline-queries 300] [--runinference-queries 5000]

Prints queries/s of (a) the transformers pipeline, one query at a time; (b) Beam RunInference with
PytorchModelHandlerKeyedTensor, default batching, padding inside each batch; (c) querycache's Beam
stage (RunBert); (d) the engine alone; (e) the limit: real tokens x FLOPs per token at the matmul
peak measured in this run. Then c/b, c/d, c/e, and a build with 90% of the head unchanged against
a full rebuild. Targets (issue 5): c/b >= 4, c/d >= 0.9, c/e >= 0.3, reuse build <= 20% of full.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import apache_beam as beam
import numpy as np
import torch
from apache_beam.options.pipeline_options import PipelineOptions

sys.path[0] = str(Path(__file__).resolve().parents[1])  # as a script, bench/ would shadow the inference package
from bench.loggen import distinct_queries  # noqa: E402
from querycache.inference import Engine, EngineConfig  # noqa: E402
from querycache.inference.model import default_model_dir  # noqa: E402
from querycache.transforms.infer import RunBert, share_engine  # noqa: E402

logging.getLogger("apache_beam").setLevel(logging.ERROR)
BEAM_ARGS = ["--runner=FnApiRunner"]


def zipf_lengths(queries: list[str], seed: int = 0) -> list[str]:
    """Stretch some queries so lengths follow a long tail, as real logs do."""
    rng = random.Random(seed)
    out = []
    for q in queries:
        extra = min(int(rng.paretovariate(1.5)) - 1, 20)
        out.append(" ".join([q, *rng.sample(q.split() * 8, min(extra, len(q.split()) * 8))]))
    return out


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_pipeline(queries: list[str], model_dir: Path) -> float:
    from transformers import pipeline

    pipe = pipeline("feature-extraction", model=str(model_dir), framework="pt", device="cpu")
    pipe(queries[0])
    return len(queries) / timed(lambda: [np.mean(pipe(q)[0], axis=0) for q in queries])


def bench_runinference(queries: list[str], model_dir: Path, tmp: Path) -> float:
    from apache_beam.ml.inference.base import RunInference
    from transformers import AutoTokenizer

    from bench.stock_runinference import handler

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model_handler = handler(model_dir, tmp)

    def tokenize(q):
        enc = tokenizer(q, truncation=True, max_length=256, return_tensors="pt")
        return {"input_ids": enc["input_ids"][0], "attention_mask": enc["attention_mask"][0]}

    def run():
        with beam.Pipeline(options=PipelineOptions(BEAM_ARGS)) as p:
            _ = (
                p
                | beam.Create(queries)
                | beam.Map(tokenize)
                | RunInference(model_handler)
                | beam.combiners.Count.Globally()
            )

    return len(queries) / timed(run)


def beam_overhead(queries: list[str]) -> float:
    """Seconds of the same pipeline shape with a pass-through step instead of RunBert."""

    def run():
        with beam.Pipeline(options=PipelineOptions(BEAM_ARGS)) as p:
            rows = p | beam.Create([(q, 1, None, 1) for q in queries]) | beam.Map(lambda row: row)
            _ = rows | beam.combiners.Count.Globally()

    return timed(run)


def bench_beam_stage(queries: list[str], engine: Engine) -> float:
    from querycache.inference.fingerprint import model_files
    from querycache.transforms.model_stage import ShippedModel

    schema = engine.schema
    model = ShippedModel(str(engine.model_dir), model_files(engine.model_dir), engine.fingerprint, engine.config)

    def run():
        with share_engine(engine), beam.Pipeline(options=PipelineOptions(BEAM_ARGS)) as p:
            rows = p | beam.Create([(q, 1, None, 1) for q in queries]) | beam.Reshuffle()
            out = rows | beam.ParDo(RunBert(model, schema)).with_outputs("stats", "unanswered", main="rows")
            _ = out.rows | beam.combiners.Count.Globally()

    return len(queries) / timed(run)


def matmul_peak(dtype: torch.dtype, shapes=((2048, 2048, 2048), (4096, 384, 1536), (4096, 1536, 384))) -> float:
    """Best matmul FLOP/s on every core: one matmul on all threads, or one single-threaded matmul per core
    (as the engine's streams run), at a square shape and at the encoder's FFN shapes; best of 3 runs each.
    """
    from concurrent.futures import ThreadPoolExecutor

    def run(pool, lanes: int, a: torch.Tensor, b: torch.Tensor, runs: int = 5) -> None:
        list(pool.map(lambda _: [a @ b for _ in range(runs)], range(lanes)))

    threads = torch.get_num_threads()
    best = 0.0
    try:
        for m, k, n in shapes:
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            for width in (threads, 1):  # all threads on one matmul; one thread per matmul, `threads` at once
                torch.set_num_threads(width)
                lanes = threads // width
                with ThreadPoolExecutor(lanes) as pool:
                    run(pool, lanes, a, b, 1)
                    for _ in range(3):
                        best = max(best, 5 * lanes * 2 * m * k * n / timed(lambda: run(pool, lanes, a, b)))  # noqa: B023
    finally:
        torch.set_num_threads(threads)
    return best


def flops_per_query(engine: Engine, queries: list[str]) -> float:
    """2 x non-embedding parameters per token, plus attention scores and mixing, averaged over real tokens."""
    cfg = engine.model.config
    params = sum(p.numel() for n, p in engine.model.named_parameters() if "embeddings" not in n)
    lengths = [len(x) for x in engine.tokenizer(queries, truncation=True, max_length=engine.max_length)["input_ids"]]
    attention = sum(4 * cfg.num_hidden_layers * n * n * cfg.hidden_size for n in lengths)
    return (2 * params * sum(lengths) + attention) / len(lengths)


def build_times(model_dir: Path, queries: list[str], tmp: Path) -> tuple[float, float]:
    rng = random.Random(3)
    old = tmp / "old.txt"
    old.write_text("\n".join(queries) + "\n")
    new = tmp / "new.txt"
    changed = [f"{q} updated" if rng.random() < 0.1 else q for q in queries]
    new.write_text("\n".join(changed) + "\n")

    def build(log, out, *extra):
        cmd = [
            sys.executable,
            "-m",
            "querycache",
            "build",
            "--logs",
            str(log),
            "--out",
            str(out),
            "--json",
            "--quiet",
            "--model",
            str(model_dir),
            *extra,
        ]
        start = time.perf_counter()
        summary = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        return time.perf_counter() - start, summary

    build(old, tmp / "root")
    reuse_s, summary = build(new, tmp / "root")
    full_s, _ = build(new, tmp / "fresh")
    print(
        f"build with 90% of the head unchanged: {reuse_s:.1f}s ({summary['reused']} reused, "
        f"{summary['computed']} computed) vs full rebuild {full_s:.1f}s: {reuse_s / full_s:.2f}x (target <= 0.20)"
    )
    return reuse_s, full_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--pipeline-queries", type=int, default=300)
    parser.add_argument("--runinference-queries", type=int, default=5000)
    parser.add_argument("--build-queries", type=int, default=100_000, help="distinct queries of the reuse builds")
    parser.add_argument("--skip-builds", action="store_true")
    args = parser.parse_args()
    model_dir = default_model_dir()
    queries = zipf_lengths(distinct_queries(args.queries))
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        a = bench_pipeline(queries[: args.pipeline_queries], model_dir)
        print(f"(a) transformers pipeline, one query at a time: {a:8.0f} queries/s")
        b = bench_runinference(queries[: args.runinference_queries], model_dir, tmp)
        print(f"(b) Beam RunInference, keyed tensors, padded per batch: {b:8.0f} queries/s")
        engine = Engine(EngineConfig(task="embed"))
        peak = matmul_peak(engine.model.dtype)  # all cores, before the engine below pins one thread per stream
        engine = Engine(EngineConfig(task="embed", streams=0))  # the CLI default: one stream per core
        print(
            f"{len(queries)} distinct queries; engine {engine.dtype} on {engine.device}, "
            f"token budget {engine.token_budget}, {engine.streams} streams"
        )
        engine.run(queries)  # warm-up: oneDNN builds a kernel per batch shape once; (c) and (d) both run warm
        c = bench_beam_stage(queries, engine)
        overhead = beam_overhead(queries)
        print(
            f"(c) querycache RunBert in Beam: {c:8.0f} queries/s (of its {len(queries) / c:.1f} s, "
            f"{overhead:.1f} s is Beam itself: the same pipeline with a pass-through step)"
        )
        d = len(queries) / timed(lambda: engine.run(queries))
        print(f"(d) engine alone: {d:8.0f} queries/s")
        e = peak / flops_per_query(engine, queries)
        print(
            f"(e) limit: matmul peak {peak / 1e9:.0f} GFLOP/s ({engine.model.dtype}, all cores) / "
            f"{flops_per_query(engine, queries) / 1e6:.1f} MFLOP per query = {e:8.0f} queries/s"
        )
        print(
            f"c/b = {c / b:.2f} (target >= 4)   c/d = {c / d:.2f} (>= 0.9)   c/e = {c / e:.2f} (>= 0.3)   "
            f"c/a = {c / a:.1f}"
        )
        ref = Engine(EngineConfig(task="embed", dtype="fp32"))
        sample = queries[:2000]
        got, want = np.stack(engine(sample)), np.stack(ref(sample))
        cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        print(
            f"{engine.dtype} against fp32 on {len(sample)} queries: min cosine {cos.min():.5f}, mean {cos.mean():.6f}"
        )
        if not args.skip_builds:
            build_times(model_dir, zipf_lengths(distinct_queries(args.build_queries, seed=5)), tmp)
    print(f"({os.cpu_count()} cores)")


if __name__ == "__main__":
    main()

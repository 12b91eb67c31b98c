"""Fine-tune the shipped MiniLM on generated logs; print before/after figures, step rate and the full-run estimate.

python bench/finetune.py --lines 100000 --steps 30

A bounded number of steps is timed; the time of the default run (3 epochs over the distinct
training queries) is extrapolated from the measured step rate, and said to be an estimate.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # import the repo's packages when run as a script
from bench.loggen import generate  # noqa: E402
from querycache.pipelines.finetune import FinetuneOptions, finetune  # noqa: E402
from querycache.runners.presets import beam_args  # noqa: E402
from querycache.training import TrainConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--distinct", type=int, default=20_000)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("apache_beam").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp) / "logs.jsonl"
        with open(logs, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in generate(args.lines, args.distinct))
        config = TrainConfig(
            steps=args.steps, batch_tokens=args.batch_tokens, checkpoint_every=10**9, threads=args.threads
        )
        started = time.perf_counter()
        report = finetune(
            FinetuneOptions(logs=(str(logs),), out=str(Path(tmp) / "out"), train=config), beam_args("direct", [])
        )
        total = time.perf_counter() - started
    train_seconds = report["timing"]["train_seconds"]
    per_step = train_seconds / args.steps
    rows = report["timing"]["queries_drawn"] / args.steps
    full_steps = math.ceil(3 * report["data"]["train_queries"] / rows)
    print(
        f"logs: {args.lines} lines, {report['data']['train_queries']} training queries, "
        f"{report['data']['evaluated_queries']} held-out queries scored; notes: {report['notes']}"
    )
    print(f"before: {report['before']}\nafter:  {report['after']}  ({args.steps} steps, {report['config']['dtype']})")
    print(
        f"prepare {report['prepare_seconds']:.0f}s, evaluation x2 {report['timing']['eval_seconds']:.0f}s, "
        f"training {train_seconds:.0f}s ({per_step:.2f}s/step, {rows:.0f} queries/step); whole run {total:.0f}s"
    )
    print(f"estimate for the default 3 epochs ({full_steps} steps): {full_steps * per_step / 60:.0f} min of training")


if __name__ == "__main__":
    main()

"""Lines per second of ``querycache replay``: held-out logs against a snapshot of the previous day's head.

    python bench/replay.py [--lines 1000000] [--distinct 200000] [--top-k 20000] [--runner direct] [--model DIR]

Two "days" are drawn from one generated log (the first and second halves of 2 x --lines); day 1 is
built into a --top-k snapshot (shipped MiniLM unless --model), day 2 is replayed against it. The
baseline is a plain single-process Python replay of the same file (parse, normalise, count, look up)
measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

sys.path[0] = str(Path(__file__).resolve().parents[1])  # import the repo's packages when run as a script
from bench.loggen import generate  # noqa: E402
from querycache.pipelines.build import BuildOptions, build  # noqa: E402
from querycache.pipelines.replay import ReplayOptions, replay  # noqa: E402
from querycache.runners.presets import beam_args  # noqa: E402
from querycache.store import Snapshot, normalize  # noqa: E402

logging.getLogger("apache_beam").setLevel(logging.ERROR)


def write_days(directory: Path, lines: int, distinct: int) -> tuple[Path, Path]:
    records = [json.dumps(record) + "\n" for record in generate(2 * lines, distinct, users=50_000)]
    day1, day2 = directory / "day1.jsonl", directory / "day2.jsonl"
    day1.write_text("".join(records[:lines]), "utf-8")
    day2.write_text("".join(records[lines:]), "utf-8")
    return day1, day2


def plain_replay(log: Path, root: Path) -> float:
    """The traffic hit rate by a plain Python loop: the baseline."""
    snap = Snapshot.open(root)
    keys = {
        k
        for rel in snap.manifest["parquet"]
        for k in pq.read_table(snap.directory / rel, columns=["key"])[0].to_pylist()
    }
    counts: Counter = Counter()
    with log.open(encoding="utf-8") as fh:
        for line in fh:
            counts[normalize(json.loads(line)["query"])] += 1
    return sum(c for k, c in counts.items() if k in keys) / sum(counts.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--distinct", type=int, default=200_000)
    parser.add_argument("--top-k", type=int, default=20_000)
    parser.add_argument("--runner", default="direct")
    parser.add_argument("--model", help="model directory for the day-1 build (default: the shipped MiniLM)")
    args = parser.parse_args()
    from querycache.inference.engine import EngineConfig
    from querycache.transforms.selection import Selection

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        day1, day2 = write_days(Path(tmp), args.lines, args.distinct)
        print(
            f"generated 2 days of {args.lines:,} lines ({args.distinct:,} distinct) "
            f"in {time.perf_counter() - start:.0f}s"
        )
        start = time.perf_counter()
        built = build(
            BuildOptions(logs=(str(day1),), out=f"{tmp}/root", engine=EngineConfig(model_dir=args.model),
                         selection=Selection("top_k", args.top_k)),
            beam_args(args.runner, []),
        )  # fmt: skip
        print(f"built day 1: {built['head_size']:,} rows in {time.perf_counter() - start:.1f}s")
        start = time.perf_counter()
        figures = replay(ReplayOptions(snapshot=f"{tmp}/root", logs=(str(day2),)), beam_args(args.runner, []))
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        plain_rate = plain_replay(day2, Path(tmp) / "root")
        plain = time.perf_counter() - start
    assert abs(plain_rate - figures["traffic_hit_rate"]) < 1e-12, (plain_rate, figures["traffic_hit_rate"])
    print(
        f"replay on {args.runner}: {figures['lines_read']:,} lines against {built['head_size']:,} rows in "
        f"{seconds:.1f}s = {figures['lines_read'] / seconds:,.0f} lines/s; traffic hit rate "
        f"{figures['traffic_hit_rate']:.3f}, hindsight {figures['hindsight_curve'][-1]['traffic_hit_rate']:.3f}\n"
        f"plain Python loop (hit rate only, one process): {plain:.1f}s = {args.lines / plain:,.0f} lines/s; "
        f"replay / plain = {plain / seconds:.2f}x the speed"
    )


if __name__ == "__main__":
    main()

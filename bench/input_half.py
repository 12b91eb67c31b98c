"""Rows per second of the input half of the pipeline (read -> normalise -> count -> head) on a generated log.

    python bench/input_half.py [--lines 1000000] [--distinct 200000] [--runner direct|multiprocess]

No model is loaded: the pipeline stops at SelectHead and counts the head.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

sys.path[0] = str(Path(__file__).resolve().parents[1])  # import the repo's packages when run as a script
from bench.loggen import generate  # noqa: E402
from querycache.runners.presets import beam_args  # noqa: E402
from querycache.transforms.count import CountQueries  # noqa: E402
from querycache.transforms.normalize import NormalizeQueries  # noqa: E402
from querycache.transforms.read_logs import ReadQueryLogs  # noqa: E402
from querycache.transforms.records import LogFields  # noqa: E402
from querycache.transforms.select_head import SelectHead  # noqa: E402
from querycache.transforms.selection import Selection  # noqa: E402

logging.getLogger("apache_beam").setLevel(logging.ERROR)


def write_logs(directory: Path, lines: int, distinct: int, files: int) -> list[str]:
    records = [json.dumps(record) + "\n" for record in generate(lines, distinct, users=50_000)]
    for i in range(files):
        (directory / f"log-{i}.jsonl").write_text("".join(records[i::files]), "utf-8")
    return [str(directory / "*.jsonl")]


def run(patterns: list[str], runner: str, min_users: int, out: Path) -> dict:
    def keep(name):  # a file, not a closure: worker processes do not share memory with this one
        return lambda value: (out / name).write_text(str(value))

    with beam.Pipeline(options=PipelineOptions(beam_args(runner, []))) as p:
        records, rejected, lines = p | "Read" >> ReadQueryLogs(patterns, LogFields(user="user"))
        keys, invalid = records | "Normalize" >> NormalizeQueries()
        table = keys | "Count" >> CountQueries(users=True)
        head, plan, dropped = table | "Head" >> SelectHead(Selection("coverage", 0.8), min_users=min_users)
        _ = head | "HeadSize" >> beam.combiners.Count.Globally() | "KeepHead" >> beam.Map(keep("head"))
        _ = lines | "Lines" >> beam.CombineGlobally(sum) | "KeepLines" >> beam.Map(keep("lines"))
    return {name: int((out / name).read_text()) for name in ("head", "lines")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--distinct", type=int, default=200_000)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--runner", default="direct")
    parser.add_argument("--min-users", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        patterns = write_logs(Path(tmp), args.lines, args.distinct, args.files)
        print(
            f"generated {args.lines:,} lines ({args.distinct:,} distinct queries) in {time.perf_counter() - start:.1f}s"
        )
        start = time.perf_counter()
        counts = run(patterns, args.runner, args.min_users, Path(tmp))
        seconds = time.perf_counter() - start
    print(
        f"input half on {args.runner}: {args.lines:,} lines -> head of {counts['head']:,} queries "
        f"(coverage 0.8, min users {args.min_users}) in {seconds:.1f}s = {args.lines / seconds:,.0f} rows/s"
    )


if __name__ == "__main__":
    main()

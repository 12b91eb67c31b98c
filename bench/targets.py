"""Every target of issue 11 in one run, each next to its baseline measured in the same run.

    python bench/targets.py [--scale 1.0] [--only lookup,engine,build,rebuild,input,memory]

Whole builds run as separate processes (``querycache build``, and the stock RunInference job of
bench/stock_runinference.py) and are timed from start to exit; a build's peak RSS is its own
``VmHWM`` from its ``--json`` summary (a child's ``ru_maxrss`` starts at what this process holds). Engine, Beam
stage and lookups run in this process. ``--scale 0.2`` shrinks every size (20k -> 4k queries,
100k -> 20k, 1M lines -> 200k) for a busy machine; the table says which sizes ran.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

sys.path[0] = str(Path(__file__).resolve().parents[1])  # import the repo's packages when run as a script
from bench.loggen import distinct_queries, generate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Target(NamedTuple):
    name: str
    figure: str  # what was measured, with its baseline
    ratio: float
    goal: str  # ">= 5" or "<= 0.2"

    @property
    def met(self) -> bool:
        op, value = self.goal.split()
        return self.ratio >= float(value) if op == ">=" else self.ratio <= float(value)


class Run(NamedTuple):
    seconds: float
    stdout: str


def run_process(cmd: list[str]) -> Run:
    """Run ``cmd`` to the end: its wall time and standard output."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=ROOT)
        _, status, _ = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd[:5])}... exited {proc.returncode}:\n{err.read()[-2000:]}")
        return Run(seconds, out.read())


def build(logs: Path, out: Path, *extra: str) -> tuple[Run, dict]:
    cmd = [sys.executable, "-m", "querycache", "build", "--logs", str(logs), "--out", str(out), "--json", "--quiet"]
    run = run_process([*cmd, *extra])
    return run, json.loads(run.stdout)


def write_queries(path: Path, queries: list[str]) -> Path:
    path.write_text("\n".join(queries) + "\n", "utf-8")
    return path


def lookup_targets(keys: int) -> list[Target]:
    from bench.lookup import lookup_ratios

    get, many = lookup_ratios(keys)
    return [
        Target(f"Snapshot.get vs raw get+decode ({keys:,} x 384 f32, random order)", get.figure, get.ratio, ">= 0.8"),
        Target("get_many(1,000) vs a loop of raw get+decode", many.figure, many.ratio, ">= 1.2"),
    ]


def engine_targets(queries: int, stage_queries: int) -> list[Target]:
    from bench.hardware import engine_figures

    f = engine_figures(queries, stage_queries)
    return [
        Target(f"engine vs the limit (e) ({queries:,} queries)", f.limit_figure, f.engine / f.limit, ">= 0.7"),
        Target("engine vs the best hand-written loop", f.hand_figure, f.engine / f.hand, ">= 1.0"),
        Target(
            f"Beam stage vs engine alone ({stage_queries:,} queries)", f.stage_figure, f.stage / f.engine_big, ">= 0.9"
        ),  # noqa: E501
    ]


def build_targets(tmp: Path, small: int, big: int, lines: int, parts: set[str]) -> list[Target]:
    out: list[Target] = []
    queries = distinct_queries(small)
    log = write_queries(tmp / "small.txt", queries)
    if "build" in parts or "memory" in parts:
        mine, summary = build(log, tmp / "small-root")
    if "build" in parts:
        stock_job = [sys.executable, "bench/stock_runinference.py", "--logs", str(log), "--out", str(tmp / "stock")]
        stock = run_process(stock_job)
        out.append(Target(
            f"whole build vs stock RunInference ({small:,} distinct queries)",
            f"querycache build {mine.seconds:.1f}s vs RunInference job {stock.seconds:.1f}s",
            stock.seconds / mine.seconds, ">= 5",
        ))  # fmt: skip
    if "rebuild" in parts or "memory" in parts:
        rng = random.Random(3)
        big_queries = distinct_queries(big, seed=5)
        old = write_queries(tmp / "old.txt", big_queries)
        new = write_queries(tmp / "new.txt", [f"{q} updated" if rng.random() < 0.1 else q for q in big_queries])
        full, summary_full = build(new, tmp / "fresh")
    if "rebuild" in parts:
        build(old, tmp / "root")
        reuse, summary_reuse = build(new, tmp / "root")
        out.append(Target(
            f"rebuild, 90% of {big:,} rows unchanged, vs full rebuild",
            f"{reuse.seconds:.1f}s ({summary_reuse['reused']:,} reused) vs {full.seconds:.1f}s",
            reuse.seconds / full.seconds, "<= 0.2",
        ))  # fmt: skip
    if "memory" in parts:  # the build's own VmHWM: a child's ru_maxrss starts at what this process holds
        stored = 384 * 4  # bytes of one stored value
        low, high = (s["peak_rss_mib"]["driver"] * 2**20 for s in (summary, summary_full))
        growth = (high - low) / (big - small)
        fixed = low - small * growth
        out.append(Target(
            f"peak RSS growth per head row, {small:,} -> {big:,} queries",
            f"{low / 2**20:.0f} MiB -> {high / 2**20:.0f} MiB: {growth / 1024:.1f} KiB/row "
            f"vs {stored / 1024:.1f} KiB stored; fixed part {fixed / 2**20:.0f} MiB (driver = worker on direct)",
            growth / stored, "<= 3",
        ))  # fmt: skip
    if "input" in parts:
        path = tmp / "input.jsonl"
        with path.open("w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in generate(lines, 200_000, users=50_000))
        run, summary = build(path, tmp / "input-root", "--top-k", "1000")
        rate = summary["lines_read"] / run.seconds
        out.append(Target(
            f"input half: {lines:,} JSONL lines -> published 1k-query head",
            f"{rate:,.0f} lines/s whole process ({run.seconds:.1f}s) vs 100,000 lines/s",
            rate / 100_000, ">= 1.0",
        ))  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--only", default="lookup,engine,build,rebuild,input,memory")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    s = args.scale
    targets: list[Target] = []
    if "lookup" in parts:
        targets += lookup_targets(max(20_000, int(200_000 * s)))
    if "engine" in parts:
        targets += engine_targets(int(20_000 * s), int(100_000 * s))
    with tempfile.TemporaryDirectory() as tmp:
        targets += build_targets(Path(tmp), int(20_000 * s), int(100_000 * s), int(1_000_000 * s), parts)
    print(f"\n{'target':<66} {'ratio':>7} {'goal':>7}  met  figures")
    for t in targets:
        print(f"{t.name:<66} {t.ratio:>7.2f} {t.goal:>7}  {'yes' if t.met else 'NO ':<3}  {t.figure}")
    print(f"(scale {s}; {os.cpu_count()} cores; {os.getloadavg()[0]:.1f} load average at the end)")


if __name__ == "__main__":
    main()

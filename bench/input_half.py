"""The input half against columnar engines: whole processes on one generated JSONL log, in one run.

    python bench/input_half.py [--lines 1000000] [--distinct 200000] [--baseline /path/to/python] [--keep DIR]

Writes a log of ``--lines`` records (query, user, count, ts; Zipf popularity, 10% upper case, 10%
extra spaces, 5% full-width letters, 0.1% bad lines of five kinds), then runs, each as its own
process: ``querycache build`` (weighted counts, distinct users, top 1,000 by count, then the model
on that head) on the in-process runner and with ``--runner multiprocess`` (a worker per core),
``querycache replay`` of the same log against that snapshot, DuckDB and Polars doing the same query
(read with a schema, lower case, spaces collapsed and trimmed, weighted sum, distinct users, top
1,000), and with ``--baseline`` the same build by another querycache install (its interpreter: an
older commit's wheel). Prints seconds, lines/s, MB/s, the ratio to DuckDB and the peak RSS of the
largest process of each run, its descendants included (this process is their subreaper, so the
workers of ``multiprocess``, children of a fork server that outlives the driver by a moment, count
too); ``--keep DIR`` keeps the generated logs there for the next run. DuckDB and Polars are for this
benchmark only (``pip install duckdb polars``).
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

sys.path[0] = str(Path(__file__).resolve().parents[1])  # import the repo's packages when run as a script
from bench.loggen import generate  # noqa: E402

BAD = [
    "{broken",
    '{"query": 42, "user": "u1", "count": 1}',
    '{"query": "ok", "user": "u1", "count": -3}',
    '{"user": "u1", "count": 1}',
    '{"query": "ok", "user": "", "count": 1}',
]
DUCKDB = """
import duckdb, sys
top = duckdb.sql('''
  SELECT trim(regexp_replace(lower(query), '\\s+', ' ', 'g')) AS key, sum("count") AS n,
         count(DISTINCT "user") AS users
  FROM read_json(?, format='newline_delimited', ignore_errors=true,
                 columns={'query': 'VARCHAR', 'user': 'VARCHAR', 'count': 'BIGINT'})
  WHERE query IS NOT NULL AND "user" <> '' AND "count" > 0
  GROUP BY key ORDER BY n DESC, key LIMIT 1000''', params=[sys.argv[1]]).fetchall()
print(len(top))
"""
POLARS = """
import polars as pl, sys
schema = {"query": pl.String, "user": pl.String, "count": pl.Int64}
top = (pl.scan_ndjson(sys.argv[1], schema=schema, ignore_errors=True)
  .filter(pl.col("query").is_not_null() & (pl.col("user") != "") & (pl.col("count") > 0))
  .with_columns(key=pl.col("query").str.to_lowercase().str.replace_all(r"\\s+", " ").str.strip_chars())
  .group_by("key").agg(n=pl.col("count").sum(), users=pl.col("user").n_unique())
  .sort(["n", "key"], descending=[True, False]).head(1000).collect())
print(top.height)
"""


def write_log(path: Path, parsable: Path, lines: int, distinct: int) -> None:
    """The log, and a copy without its malformed lines for Polars (whose reader stops at the first one)."""
    rng = random.Random(1)
    with path.open("w", encoding="utf-8") as out, parsable.open("w", encoding="utf-8") as clean:
        for i, record in enumerate(generate(lines, distinct, users=50_000)):
            if i % 1000 == 999:
                line = BAD[(i // 1000) % len(BAD)] + "\n"
            else:
                record["count"] = rng.randint(1, 5)
                line = json.dumps(record, ensure_ascii=False) + "\n"
            out.write(line)
            if not line.startswith("{broken"):
                clean.write(line)


def generated_logs(folder: Path, lines: int, distinct: int) -> tuple[Path, Path]:
    """The log and its parsable copy for these settings in ``folder``, written unless already there."""
    folder.mkdir(parents=True, exist_ok=True)
    log, parsable = folder / f"log-{lines}-{distinct}.jsonl", folder / f"parsable-{lines}-{distinct}.jsonl"
    if not (log.exists() and parsable.exists()):
        partial = [path.with_suffix(".partial") for path in (log, parsable)]
        write_log(*partial, lines, distinct)
        partial[1].replace(parsable), partial[0].replace(log)
    return log, parsable


def timed(command: list[str], cwd: Path) -> tuple[float, float, str]:
    """Seconds, peak RSS (MiB, the largest process of the run) and stdout of one process, run in ``cwd``
    (not the checkout: ``-m`` would find its ``querycache`` folder before the installed package)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, cwd=cwd)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        peak = max(usage.ru_maxrss, _orphans_peak())
        out.seek(0), err.seek(0)
        text, errors = out.read().decode(), err.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(command)} failed ({os.waitstatus_to_exitcode(status)}): {errors[-2000:]}")
    return seconds, peak / 1024, text


def _orphans_peak(seconds: float = 30.0) -> int:
    """The peak RSS (KiB) of the run's descendants that outlived it, once they end (this process
    is their subreaper); 0 when there are none."""
    peak, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            pid, _, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:  # none left
            break
        if pid:
            peak = max(peak, usage.ru_maxrss)
        else:
            time.sleep(0.01)
    return peak


def _reap_descendants() -> None:
    """Become the subreaper of the runs' processes (Linux), so their orphans' usage reaches us."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--distinct", type=int, default=200_000)
    parser.add_argument("--baseline", help="A Python interpreter with another querycache installed.")
    parser.add_argument("--keep", type=Path, help="Keep the generated logs in this folder and use them again.")
    args = parser.parse_args()
    _reap_descendants()
    with tempfile.TemporaryDirectory(prefix="qc-input-half-") as name:
        tmp = Path(name)
        log, parsable = generated_logs(args.keep or tmp, args.lines, args.distinct)
        megabytes = log.stat().st_size / 1e6
        fields = ["--count-field", "count", "--user-field", "user", "--quiet", "--json"]

        def build(root: str) -> list[str]:
            return ["build", "--logs", str(log), "--out", str(tmp / root), "--top-k", "1000", *fields]

        qc = [sys.executable, "-m", "querycache"]
        runs = {
            "querycache build": [*qc, *build("root")],
            "build multiprocess": [*qc, *build("mp-root"), "--runner", "multiprocess"],
            "querycache replay": [*qc, "replay", str(tmp / "root"), "--logs", str(log), *fields],
            "DuckDB": [sys.executable, "-c", DUCKDB, str(log)],
            "Polars (parsable)": [sys.executable, "-c", POLARS, str(parsable)],
        }
        if args.baseline:
            runs["baseline build"] = [args.baseline, "-m", "querycache", *build("baseline-root")]
        figures = {label: timed(command, tmp) for label, command in runs.items()}
    duckdb = figures["DuckDB"][0]
    print(f"{args.lines:,} lines, {megabytes:,.0f} MB, {os.cpu_count()} cores")
    print(f"{'run':20s} {'seconds':>8s} {'lines/s':>10s} {'MB/s':>7s} {'/ DuckDB':>9s} {'peak RSS MiB':>13s}")
    for label, (seconds, rss, _) in figures.items():
        rate, mbs = args.lines / seconds, megabytes / seconds
        print(f"{label:20s} {seconds:8.1f} {rate:10,.0f} {mbs:7.1f} {seconds / duckdb:9.1f} {rss:13,.0f}")
    stats = json.loads(figures["querycache build"][2].strip().splitlines()[-1])
    print(f"build: head {stats['head_size']:,} of {stats['distinct_queries']:,} keys, rejected {stats['rejected']:,}")


if __name__ == "__main__":
    main()

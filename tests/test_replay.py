"""``querycache replay`` end to end: a snapshot of day 1, day 2 replayed, every figure against plain Python."""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import subprocess
from collections import Counter, defaultdict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from click.testing import CliRunner

from querycache.store import Snapshot, normalize
from tests.conftest import build_args, write_jsonl
from tests.test_build import BAD_JSONL, BAD_REASONS, PII
from tests.test_distributed import remote_snapshot, vectors
from tests.tiny_bert import WORDS

SIZES = [1, 2, 3, 5, 7, 10, 20, 25]  # the log scale of the curves for a 25-row snapshot
SOLO = "weather in tokyo today"  # frequent on day 2, but one user: --min-users keeps it out of the misses


def make_day(seed: int, shift: int, n: int = 700) -> list[dict]:
    """Weighted records from one query universe; ``shift`` moves popularity so the head drifts."""
    universe = sorted({" ".join(random.Random(i).sample(WORDS, 1 + i % 3)) for i in range(90)})
    order = universe[shift:] + universe[:shift]
    rng = random.Random(seed)
    records = []
    for i, query in enumerate(rng.choices(order, [1 / (r + 1) for r in range(len(order))], k=n)):
        query = query.upper() if i % 9 == 0 else f"  {query}  " if i % 13 == 0 else query
        records.append({"query": query, "count": rng.randint(1, 3), "user": f"u{rng.randrange(15)}"})
    if seed == 2:
        records += [{"query": p, "count": 9, "user": f"p{i}"} for p in PII for i in range(3)]
        records += [{"query": SOLO, "count": 40, "user": "solo"}]
    return records


def write_day(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "".join(b + "\n" for b in BAD_JSONL), "utf-8")
    return path


def counts_and_users(records: list[dict]) -> tuple[Counter, dict]:
    counts, users = Counter(), defaultdict(set)
    for r in records:
        counts[normalize(r["query"])] += r["count"]
        users[normalize(r["query"])].add(r["user"])
    return counts, {k: len(v) for k, v in users.items()}


def ranked_eligible(records: list[dict]) -> tuple[list[str], Counter]:
    """Keys a build may store (no PII, two users or more), most frequent first, ties by key bytes."""
    counts, users = counts_and_users(records)
    pii = {normalize(p) for p in PII}
    eligible = [k for k in counts if k not in pii and users[k] >= 2]
    return sorted(eligible, key=lambda k: (-counts[k], k.encode())), counts


class Replayed(NamedTuple):
    day1: list[dict]
    day2: list[dict]
    root: Path
    figures: dict
    report: Path


@pytest.fixture(scope="module")
def replayed(tiny_bert, tmp_path_factory) -> Replayed:
    from querycache.runners.cli import main

    tmp = tmp_path_factory.mktemp("replay")
    day1, day2 = make_day(1, 0), make_day(2, 6)
    log1, log2 = write_day(tmp / "day1.jsonl", day1), write_day(tmp / "day2.jsonl", day2)
    runner, fields = CliRunner(), ["--count-field", "count", "--user-field", "user"]
    args = build_args(log1, tmp / "root", tiny_bert, "--top-k", "25", "--min-users", "2", *fields)
    build = runner.invoke(main, [str(a) for a in args])
    assert build.exit_code == 0, build.output
    args = ["replay", tmp / "root", "--logs", log2, *fields, "--report", tmp / "report.html", "--json", "--quiet"]
    result = runner.invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return Replayed(day1, day2, tmp / "root", json.loads(result.stdout), tmp / "report.html")


def test_every_figure_equals_a_plain_python_replay(replayed):
    day1, day2, root, f, _ = replayed
    order = ranked_eligible(day1)[0][:25]  # the build's head, in the build's order
    counts1, _ = counts_and_users(day1)
    assert any(counts1[order[n - 1]] == counts1[order[n]] for n in SIZES[:-1])  # a tie straddles a curve point
    with Snapshot.open(root) as snap:
        assert sorted(snap) == sorted(order) and snap.manifest["rows"] == 25
    ranked2, counts2 = ranked_eligible(day2)
    _, users2 = counts_and_users(day2)
    traffic, hit = sum(counts2.values()), sum(counts2[k] for k in order)
    assert (f["snapshot_id"], f["lines_read"]) == (snap.id, len(day2) + len(BAD_JSONL))
    assert (f["accepted"], f["rejected"], f["rejected_by_reason"]) == (len(day2), len(BAD_JSONL), BAD_REASONS)
    assert (f["traffic"], f["hit_traffic"], f["traffic_hit_rate"]) == (traffic, hit, hit / traffic)
    hits = [k for k in counts2 if k in order]
    assert (f["distinct_queries"], f["distinct_hits"]) == (len(counts2), len(hits))
    assert f["unique_hit_rate"] == len(hits) / len(counts2)
    assert f["curve"] == [
        {"head_size": n, "traffic_hit_rate": sum(counts2[k] for k in order[:n]) / traffic} for n in SIZES
    ]
    best = sorted((counts2[k] for k in ranked2), reverse=True)
    assert f["hindsight_curve"] == [{"head_size": n, "traffic_hit_rate": sum(best[:n]) / traffic} for n in SIZES]
    assert f["curve"][-1]["traffic_hit_rate"] == f["traffic_hit_rate"]
    misses = [k for k in ranked2 if k not in order][:20]
    assert f["top_misses"] == [{"key": k, "count": counts2[k]} for k in misses]
    assert SOLO not in {m["key"] for m in f["top_misses"]} and counts2[SOLO] > counts2[misses[0]]

    def missed(top: list[str]) -> dict:
        gone = sum(k not in order for k in top)
        return {"queries": len(top), "missed": gone, "share": gone / len(top)}

    absent = sum(counts2[k] == 0 for k in order)
    assert f["drift"] == {
        "heldout_top_1pct": missed(ranked2[: math.ceil(len(ranked2) / 100)]),
        "heldout_top_1000": missed(ranked2[:1000]),
        "snapshot_top_1000": {"queries": 25, "absent": absent, "share": absent / 25},
    }
    assert 0 < f["drift"]["heldout_top_1000"]["share"] < 1 and absent > 0
    cost = snap.manifest["inference_cost"]["seconds_per_query"]
    inference = snap.manifest["stats"]["inference"]
    assert cost == inference["seconds"] / inference["queries"] > 0
    assert f["compute_saved"] == {"seconds_per_query": cost, "seconds": hit * cost, "share": hit / traffic}
    pii = {normalize(p) for p in PII}
    few = sum(users2[k] < 2 for k in counts2 if k not in pii)
    assert f["privacy"]["dropped"] == {"email": 1, "card": 1, "ip": 1, "phone": 1, "min_users": few}


def test_summary_reads_as_sentences(replayed):
    from querycache.runners.replay import summary

    text = summary(replayed.figures, "report.html")
    assert f"traffic hit rate  {100 * replayed.figures['traffic_hit_rate']:.1f}%" in text
    assert "drift" in text and "compute saved" in text and text.endswith("report            report.html")


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("Chromium is not installed (.ci/run installs it: apt-get install -y chromium)")
    return found


def test_report_renders_in_headless_chromium_with_title_and_plot(replayed, tmp_path):
    from PIL import Image

    html = replayed.report.read_text("utf-8")
    assert not re.search(r"https?:|src=|url\((?!#)|href=\"(?!#)|@import|<link|<script", html, re.I)  # nothing to fetch
    base = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    url = replayed.report.as_uri()
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout
    assert f"<title>querycache replay: snapshot {replayed.figures['snapshot_id']}</title>" in dom
    assert "How much does snapshot" in dom and "<svg" in dom and "Most frequent misses" in dom
    shot = tmp_path / "report.png"
    subprocess.run(
        [*base, "--hide-scrollbars", "--window-size=1280,1600", f"--screenshot={shot}", url],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=int)

    def near(rgb) -> int:
        return int((np.abs(pixels - rgb).max(axis=2) < 30).sum())

    ink = int((pixels.sum(axis=2) < 300).sum())  # text and axes
    assert ink > 5000 and near((31, 95, 191)) > 2000 and near((194, 65, 12)) > 200  # blue curve, orange size mark


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--logs": "/nowhere/*.jsonl"}, "/nowhere/*.jsonl matches no non-empty file"),
        ({"SNAPSHOT": "/nowhere"}, "/nowhere is neither a snapshot directory nor a root"),
        ({"--user-field": None}, "was built with --min-users 2: pass --user-field"),
        ({"--format": "csv"}, "no column 'query'"),
        ({"--query-field": "q"}, "no query in"),
        ({"--since": "2026-11-01"}, "--since/--until need --time-field"),
        ({"--min-users": "3", "--user-field": None}, "--min-users needs --user-field"),
        ({"SNAPSHOT": "CORRUPT"}, "is corrupt: parquet/part-00000-of-00001.parquet"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(replayed, tmp_path, change, message):
    from querycache.runners.cli import main

    if change.get("SNAPSHOT") == "CORRUPT":
        with Snapshot.open(replayed.root) as snap:
            shutil.copytree(snap.directory, tmp_path / "snap")
        with (tmp_path / "snap/parquet/part-00000-of-00001.parquet").open("ab") as fh:
            fh.write(b"x")
        change = {"SNAPSHOT": tmp_path / "snap"}
    log = write_day(tmp_path / "day.jsonl", make_day(3, 0, n=30))
    options = {"--logs": log, "--count-field": "count", "--user-field": "user"} | change
    args = ["replay", options.pop("SNAPSHOT", replayed.root)]
    args += [x for k, v in options.items() if v is not None for x in (k, v)]
    result = CliRunner().invoke(main, [str(a) for a in [*args, "--quiet"]], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) <= 3


def test_a_build_that_reuses_every_result_keeps_the_measured_cost(replayed, tiny_bert):
    from querycache.runners.cli import main

    with Snapshot.open(replayed.root) as snap:  # an open snapshot would keep its LMDB from the next build
        first = snap.manifest
    log = write_day(replayed.root.parent / "day1-again.jsonl", replayed.day1)
    fields = ["--count-field", "count", "--user-field", "user", "--min-users", "2"]
    result = CliRunner().invoke(
        main, [str(a) for a in build_args(log, replayed.root, tiny_bert, "--top-k", "25", *fields)]
    )
    assert result.exit_code == 0, result.output
    assert (json.loads(result.stdout)["computed"], json.loads(result.stdout)["reused"]) == (0, 25)
    with Snapshot.open(replayed.root) as snap:
        again = snap.manifest
    assert again["snapshot_id"] != first["snapshot_id"]
    assert (
        again["inference_cost"] == first["inference_cost"]
        and first["inference_cost"]["measured_in"] == first["snapshot_id"]
    )


def test_worker_processes_replay_to_the_same_figures(replayed, tmp_path):
    from querycache.runners.cli import main

    log = write_day(tmp_path / "day2.jsonl", replayed.day2)
    args = ["replay", replayed.root, "--logs", log, "--count-field", "count", "--user-field", "user", "--json"]

    def figures(*runner: str) -> dict:
        result = CliRunner().invoke(main, [str(a) for a in [*args, *runner]], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return {k: v for k, v in json.loads(result.stdout).items() if k != "seconds"}

    assert figures("--runner", "multiprocess", "--", "--direct_num_workers=2") == figures()


def test_a_snapshot_on_s3_replays_like_a_local_one(s3, tmp_path):  # noqa: F811 (the fixture)
    from querycache.runners.cli import main

    root = f"{s3['bucket']}/replay-{tmp_path.name}"
    remote_snapshot(tmp_path, root, vectors(30, 1), s3)  # keys "query 0".."query 29", ranked in that order
    queries = [f"Query  {i % 45}" for i in range(200)]  # 30..44 are misses
    log = write_jsonl(tmp_path / "day.jsonl", [{"query": q} for q in queries])
    args = ["replay", root, "--logs", log, "--json", "--quiet", "--", *s3["options"]]
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    f, counts = json.loads(result.stdout), Counter(normalize(q) for q in queries)
    order = [f"query {i}" for i in range(30)]
    hits = sum(counts[k] for k in order)
    assert (f["traffic"], f["hit_traffic"], f["distinct_queries"], f["distinct_hits"]) == (200, hits, 45, 30)
    assert f["curve"] == [
        {"head_size": n, "traffic_hit_rate": sum(counts[k] for k in order[:n]) / 200}
        for n in [1, 2, 3, 5, 7, 10, 20, 30]
    ]
    assert [m["key"] for m in f["top_misses"]][:3] == ["query 30", "query 31", "query 32"]

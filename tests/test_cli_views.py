"""The CLI as people read it: summaries in words, lookup lines, tables, progress, --version, completion.

``--json`` outputs are pinned here too: their keys (in order) and values do not depend on the human views.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from rich.console import Console

from querycache.runners import human, views
from querycache.runners.cli import main
from querycache.store import Snapshot, normalize
from tests.conftest import build_args
from tests.test_build import PII, make_records, write_log

BUILD_KEYS = [
    "snapshot_id", "lines_read", "accepted", "rejected", "rejected_by_reason", "truncated_files", "distinct_queries",
    "head_size",
    "traffic_covered", "dropped_for_privacy", "reused", "computed", "inference_queries_per_second", "fidelity",
    "model_fingerprint", "seconds", "peak_rss_mib",
]  # fmt: skip
REPO = Path(__file__).resolve().parents[1]


def invoke(*args, env: dict | None = None):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, env=env)


@pytest.fixture(scope="module")
def builds(tiny_bert, tmp_path_factory):
    """Build A (--json, in-process) then build B of the same logs plus new queries (a subprocess, no terminal)."""
    tmp = tmp_path_factory.mktemp("views")
    records = make_records(80)
    (tmp / "a").mkdir()
    (tmp / "b").mkdir()
    log_a = write_log(tmp / "a", "jsonl", records)
    log_b = write_log(tmp / "b", "jsonl", records + [{"query": "tea near me", "count": 3, "user": "n1"}])
    root = tmp / "root"
    a = invoke(*build_args(log_a, root, tiny_bert))
    assert a.exit_code == 0, a.output
    args = [a for a in build_args(log_b, root, tiny_bert) if a not in ("--json", "--quiet")]
    b = subprocess.run(
        [sys.executable, "-m", "querycache", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"FORCE_COLOR": "1"},  # rich would draw on a pipe with this; the display must not
    )
    assert b.returncode == 0, b.stderr
    return {"root": root, "a_stdout": a.stdout, "b": b, "records": records}


def test_build_json_keeps_its_keys_and_values(builds):
    summary = json.loads(builds["a_stdout"])
    assert builds["a_stdout"].count("\n") == 1 and list(summary) == BUILD_KEYS
    manifest = json.loads(invoke("inspect", builds["root"] / "snapshots" / summary["snapshot_id"], "--json").stdout)
    stats = manifest["stats"]
    assert {k: summary[k] for k in BUILD_KEYS[1:12]} == {k: stats[k] for k in BUILD_KEYS[1:12]}
    assert summary["lines_read"] == summary["accepted"] + summary["rejected"]
    assert summary["peak_rss_mib"]["driver"] > 50  # Python, torch and Beam at least
    assert (
        summary["fidelity"] == manifest["fidelity"] and summary["model_fingerprint"] == manifest["model"]["fingerprint"]
    )


def test_build_summary_reads_in_words_and_matches_the_manifest(builds):
    out = builds["b"].stdout
    manifest = Snapshot.open(builds["root"]).manifest
    s = manifest["stats"]
    assert out.startswith(f"Published snapshot {manifest['snapshot_id']} in ")
    assert f"lines read        {s['lines_read']:,}: {s['accepted']:,} accepted (" in out
    assert f"{s['rejected']} rejected (" in out and "malformed_json 1" in out
    assert f"covering {human.percent(s['traffic_covered'])} of traffic: queries seen at least once" in out
    assert f"privacy drops     {len(PII)} (" in out
    assert f"results           {s['computed']} computed at " in out
    assert f", {s['reused']} reused from {manifest['reused_from']}" in out and s["computed"] == 1
    assert "fidelity          fp32 vs fp32 on 1 query: min cosine 1.00000, mean 1.00000 \N{EM DASH} passed" in out
    assert "{" not in out and "INFO" not in out  # no dicts, no log lines on stdout


def test_build_without_a_terminal_prints_no_progress_control_characters(builds):
    err = builds["b"].stderr
    assert "\x1b" not in err and "\r" not in err
    lines = Snapshot.open(builds["root"]).manifest["stats"]["lines_read"]
    assert "pipeline done in" in err and f"read {lines} lines" in err  # the plain log lines are the progress


def test_inspect_and_list_in_words(builds):
    root = builds["root"]
    manifest = Snapshot.open(root).manifest
    out = invoke("inspect", root).stdout
    assert f"snapshot          {manifest['snapshot_id']} (current)" in out
    assert f"fingerprint       {manifest['model']['fingerprint']}" in out
    assert "task              embed: 32-d vectors stored as float32" in out
    assert f"rows              {manifest['rows']} in 1 shard" in out
    assert "{" not in out
    table = invoke("list", root).stdout.splitlines()
    assert table[0].split() == ["snapshot", "created", "rows", "task", "model"]
    snapshots = json.loads(invoke("list", root, "--json").stdout)
    assert [list(s) for s in snapshots] == [["id", "created", "rows", "task", "fingerprint", "ok", "current"]] * 2
    assert table[-1].split()[:2] == ["*", snapshots[1]["id"]] and not table[-2].startswith("*")
    assert table[-1].split()[-2:] == ["embed", manifest["model"]["fingerprint"][:12]]


def test_lookup_prints_a_line_per_query_and_full_json_on_request(builds):
    root = builds["root"]
    query = builds["records"][0]["query"].upper()
    vector = Snapshot.open(root).get(query)
    lines = invoke("lookup", root, query, "no such query", "--text").stdout.splitlines()
    assert lines[0].startswith(f'hit   "{query}" -> {normalize(query)}  32-d, norm {np.linalg.norm(vector):.3f}, [')
    assert f"{vector[0]:.4f}" in lines[0] and len(lines[0]) < 200
    assert lines[1] == 'miss  "no such query" -> no such query'
    rows = [json.loads(line) for line in invoke("lookup", root, query, "no such query", "--json").stdout.splitlines()]
    assert [list(r) for r in rows] == [["query", "key", "hit", "result"]] * 2
    assert np.allclose(rows[0]["result"], vector) and rows[1]["result"] is None and not rows[1]["hit"]
    piped = invoke("lookup", root, query).stdout  # not a terminal: the JSON lines scripts read, as in DESIGN.md
    assert json.loads(piped.splitlines()[0])["key"] == normalize(query)


def test_verify_rollback_and_gc_json_keep_their_keys(builds, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(builds["root"], root)
    assert list(json.loads(invoke("verify", root, "--json").stdout)) == ["snapshot", "ok", "problems"]
    assert list(json.loads(invoke("rollback", root, "--json").stdout)) == ["current"]
    assert list(json.loads(invoke("gc", root, "--keep", "1", "--json").stdout)) == ["deleted"]
    assert invoke("gc", root, "--keep", "1").stdout == "no snapshot to delete: 1 or fewer\n"


def test_progress_display_counts_what_the_build_did(tiny_bert, tmp_path, caplog):
    from querycache.inference.engine import EngineConfig
    from querycache.pipelines.build import BuildOptions, build
    from querycache.runners.progress import progress_display

    log = write_log(tmp_path, "jsonl", make_records(60, seed=3))
    screen = io.StringIO()
    options = BuildOptions(
        logs=(str(log),), out=str(tmp_path / "out"), engine=EngineConfig(str(tiny_bert), dtype="fp32")
    )
    caplog.set_level(logging.INFO)
    with progress_display(console=Console(file=screen, force_terminal=True, width=150)) as display:
        summary = build(options, ["--runner=FnApiRunner"])
    read, infer, write = (display.stages[name] for name in ("read", "infer", "write"))
    assert (read.done, read.total, read.items) == (log.stat().st_size, log.stat().st_size, summary["lines_read"])
    assert (infer.done, infer.total, infer.skipped) == (summary["computed"], summary["head_size"], 0)
    assert (write.done, write.total, write.items) == (1, 1, summary["head_size"])
    text = screen.getvalue()
    assert f"{summary['computed']} of {summary['head_size']} queries" in text and "\x1b[" in text
    assert "INFO running the pipeline on FnApiRunner" in text  # other log lines print above the bars
    assert f"read {summary['lines_read']} lines" in caplog.text  # the job's Beam metrics, logged at the end
    assert f"wrote {summary['head_size']} rows" in caplog.text


def test_human_formats():
    assert human.count(1234567) == "1,234,567" and human.size(4_500_000) == "4.5 MB"
    assert [human.percent(x) for x in (0, 1, 0.632, 0.9995002498750625, 0.00004)] == [
        "0.0%", "100.0%", "63.2%", "99.95%", "0.004%"
    ]  # fmt: skip
    assert [human.seconds(x) for x in (0.042, 3.44, 42.4, 754.2, 7500)] == [
        "0.042 s", "3.4 s", "42 s", "12 min 34 s", "2 h 05 min"
    ]  # fmt: skip
    top = {"mode": "top_k", "value": 10000, "threshold": 37, "take_at_threshold": 12}
    assert human.selection(top) == "top 10,000 (ties at count 37 by key order)"
    coverage = {"mode": "coverage", "value": 0.8, "threshold": 5, "take_at_threshold": None}
    assert human.selection(coverage) == "fewest queries covering 80.0% of traffic (lowest count 5)"
    f = {"min_cosine": 0.999934, "mean_cosine": 0.999961, "sample": 256, "reference": "fp32", "dtype": "bf16"}
    assert human.fidelity(f | {"passed": True}) == (
        "bf16 vs fp32 on 256 queries: min cosine 0.99993, mean 0.99996 \N{EM DASH} passed"
    )
    assert human.fidelity({"sample": 0, "passed": True}, computed=0) == "not checked: every result was reused"
    assert human.table([["a", 1], ["bb", 1000]], ["name", "rows"], align="lr").splitlines() == [
        "name  rows", "a        1", "bb    1000"
    ]  # fmt: skip


def test_compact_results_of_each_task():
    fill = [[{"token": "paris", "score": 0.81}, {"token": "rome", "score": 0.1}, {"token": "x", "score": 0.01}] * 2]
    assert views.compact(fill) == "paris 0.810, rome 0.100, x 0.010"
    label = {"label": "travel", "scores": {"other": 0.03, "travel": 0.92, "shopping": 0.05}}
    assert views.compact(label) == "travel 0.920, shopping 0.050, other 0.030"
    assert views.compact(np.array([3.0, 4.0], np.float32)) == "2-d, norm 5.000, [3.0000, 4.0000]"


def test_model_info_in_words(tiny_bert):
    out = invoke("model-info", tiny_bert).stdout
    info = json.loads(invoke("model-info", tiny_bert, "--json").stdout)
    assert f"fill-mask  ok  fingerprint {info['tasks']['fill-mask']['fingerprint'][:12]}" in out and "{'" not in out


def test_version_names_the_engines_without_importing_them():
    code = (
        "import sys; from click.testing import CliRunner; from querycache.runners.cli import main;"
        "print(CliRunner().invoke(main, ['--version']).output);"
        "print([m for m in ('torch', 'apache_beam', 'transformers') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120).stdout
    assert out.startswith(f"querycache {version('querycache')}\n") and out.rstrip().endswith("[]")
    for name in ("apache-beam", "torch", "transformers", "key function  nfkc-casefold-collapse v1"):
        assert name in out


def test_shell_completion_completes_commands_and_snapshot_ids(builds):
    env = {"_QUERYCACHE_COMPLETE": "bash_complete", "COMP_WORDS": "querycache bu", "COMP_CWORD": "1"}
    result = CliRunner().invoke(main, [], env=env, prog_name="querycache")
    assert result.stdout.splitlines() == ["plain,build"]
    ids = [s["id"] for s in json.loads(invoke("list", builds["root"], "--json").stdout)]
    env |= {"COMP_WORDS": f"querycache rollback {builds['root']} {ids[0][:6]}", "COMP_CWORD": "3"}
    assert CliRunner().invoke(main, [], env=env, prog_name="querycache").stdout.splitlines() == [
        f"plain,{i}" for i in ids
    ]
    script = CliRunner().invoke(main, [], env={"_QUERYCACHE_COMPLETE": "bash_source"}, prog_name="querycache")
    assert "complete -o nosort -F _querycache_completion querycache" in script.stdout


def test_every_help_has_an_example_that_parses():
    for name in ["", *main.list_commands(None)]:
        text = invoke(*([name] if name else []), "--help").stdout
        examples = [line.split("&&")[0] for line in text.splitlines() if line.strip().startswith("querycache ")]
        assert examples, f"querycache {name} --help shows no example"
        for example in examples:
            args = shlex.split(example, comments=True)[1:]  # as a shell reads it
            with main.make_context("querycache", list(args)) as ctx:
                sub, command_, rest = main.resolve_command(ctx, ctx._protected_args + ctx.args)
                command_.make_context(sub, rest, parent=ctx).close()
    assert os.environ.get("_QUERYCACHE_COMPLETE") is None

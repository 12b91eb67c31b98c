"""Hostile logs through the real pipeline: no record, however malformed, stops a build or slips in.

The property test runs a handful of examples by default; ``pytest -m reliability`` runs many more.
"""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from querycache.store import Snapshot, normalize
from tests.conftest import build_args
from tests.tiny_bert import WORDS

DEEP = "[" * 5000 + "]" * 5000


def run(cli, logs, out, model, *extra) -> dict:
    result = cli(*build_args(logs, out, model, "--count-field", "count", "--user-field", "user", *extra))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["lines_read"] == summary["accepted"] + summary["rejected"]
    return summary


def test_surrogates_deep_nesting_huge_lines_and_odd_file_names_are_dead_letters(cli, tiny_bert, tmp_path):
    good = [
        json.dumps({"query": "cheap flights", "count": 2, "user": "u1"}),
        '{"query": "pizza", "count": 1, "user": 7}',
    ]
    bad = {
        "invalid_unicode": [
            '{"query": "\\ud800", "user": "u1", "count": 1}',
            '{"query": "ok", "user": "\\udfff", "count": 1}',
        ],
        "malformed_json": [DEEP, '{"query": ' + DEEP + "}", "\ufeff" + good[0]],
        "too_long": [json.dumps({"query": "x" * 10_000_000, "count": 1, "user": "u"})],
        "bad_count": ['{"query": "big", "count": 100000000000000000000000, "user": "u"}'],
        "query_not_string": ['{"query": 12345, "count": 1, "user": "u"}'],
    }
    (tmp_path / "logs").mkdir()
    plain = tmp_path / "logs" / "a.jsonl"
    plain.write_text("\n".join(good + [x for xs in bad.values() for x in xs]) + "\n", "utf-8")
    odd = os.path.join(os.fsencode(tmp_path / "logs"), b"b-\xff\xfe.jsonl")  # not valid UTF-8
    with open(odd, "wb") as fh:
        fh.write(b'{"query": "pizza", "count": 3, "user": "u2"}\r\n{"query": "\\ud83d", "count": 1, "user": "u"}\r\n')
    summary = run(cli, str(tmp_path / "logs" / "*.jsonl"), tmp_path / "out", tiny_bert)
    expected = {reason: len(lines) for reason, lines in bad.items()}
    expected["invalid_unicode"] += 1
    assert summary["rejected_by_reason"] == expected
    assert summary["accepted"] == 3 and summary["lines_read"] == 3 + sum(expected.values())
    snap = Snapshot.open(tmp_path / "out")
    assert snap.get("pizza") is not None and snap.get("cheap flights") is not None
    letters = [
        json.loads(line)
        for rel in snap.manifest["rejected"]
        for line in (snap.directory / rel).read_text("utf-8").splitlines()
    ]
    assert {r["source"].rsplit("/", 1)[-1] for r in letters} >= {"a.jsonl", "b-\\xff\\xfe.jsonl"}
    snap.close()


# -- property-based logs -----------------------------------------------------------------------
_phrase = st.lists(st.sampled_from(WORDS), min_size=1, max_size=4).map(" ".join)
_good = st.builds(
    lambda q, n, u, crlf: (json.dumps({"query": q, "count": n, "user": f"u{u}"}) + ("\r" if crlf else ""), q, n),
    _phrase,
    st.integers(1, 5),
    st.integers(0, 9),
    st.booleans(),
)
_wrong_query = st.sampled_from([None, 12, 1.5, True, [], {}, ["a"], {"q": "a"}])
_wrong_count = st.sampled_from([None, 0, -3, 1.5, "x", "", [], {}, True, 10**30, "1e3"])
_wrong_user = st.sampled_from([None, "", "   "])
_bad = st.one_of(
    st.binary(max_size=60).filter(lambda b: b"\n" not in b and not b.strip().startswith(b"{")),
    st.builds(lambda q: json.dumps({"query": q, "count": 1, "user": "u"}), _wrong_query),
    st.builds(lambda q, c: json.dumps({"query": q, "count": c, "user": "u"}), _phrase, _wrong_count),
    st.builds(lambda q, u: json.dumps({"query": q, "count": 1, "user": u}), _phrase, _wrong_user),
    st.builds(lambda q: json.dumps({"query": q + "\u0000x", "count": 1, "user": "u"}), _phrase),
    st.builds(lambda q: json.dumps({"query": q + "\ud800", "count": 1, "user": "u"}), _phrase),
    st.builds(lambda d: "[" * d + "]" * d, st.integers(1, 20_000)),
    st.sampled_from(["", "\ufeff{}", "null", "[]", '"query"', "{", '{"query": "a"', "\x00\x00"]),
)


def _encode(line) -> bytes:
    return line if isinstance(line, bytes) else line.encode("utf-8", "surrogatepass")


@st.composite
def hostile_logs(draw):
    lines = draw(st.lists(st.one_of(_good.map(lambda g: ("good", g)), _bad.map(lambda b: ("bad", b))), max_size=40))
    good = [g for kind, g in lines if kind == "good"]
    if not good:
        good = [draw(_good)]
        lines.append(("good", good[0]))
    bom = draw(st.booleans())
    data = b"".join(_encode(item[0] if kind == "good" else item) + b"\n" for kind, item in lines)
    return (b"\xef\xbb\xbf" if bom else b"") + data, good, len(lines)


def check_hostile_log(cli, model, tmp_path, case) -> None:
    data, good, total = case
    directory = tmp_path / os.urandom(4).hex()
    directory.mkdir()
    (directory / "log.jsonl").write_bytes(data)
    summary = run(cli, directory / "log.jsonl", directory / "out", model, "--fidelity-sample", "0")
    assert summary["lines_read"] == total
    assert summary["accepted"] == len(good), summary["rejected_by_reason"]  # nothing bad slipped in
    counts: dict[str, int] = {}
    for _, query, n in good:
        counts[normalize(query)] = counts.get(normalize(query), 0) + n
    with Snapshot.open(directory / "out") as snap:
        assert {k: snap.get_key(k) is not None for k in counts} == dict.fromkeys(counts, True)
        assert len(snap) == len(counts)


_FEW = settings(max_examples=3, suppress_health_check=list(HealthCheck))
_MANY = settings(max_examples=40, suppress_health_check=list(HealthCheck))


@_FEW
@given(case=hostile_logs())
def test_hostile_logs_are_accounted_for_line_by_line(cli, tiny_bert, tmp_path, case):
    check_hostile_log(cli, tiny_bert, tmp_path, case)


@pytest.mark.reliability
@_MANY
@given(case=hostile_logs())
def test_many_hostile_logs_are_accounted_for_line_by_line(cli, tiny_bert, tmp_path, case):
    check_hostile_log(cli, tiny_bert, tmp_path, case)

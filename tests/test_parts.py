"""A large log read in parts (byte ranges at line breaks, spread over workers) is read as it is whole."""

from __future__ import annotations

import io
import json
import random

import pytest
from apache_beam.pvalue import TaggedOutput
from hypothesis import example, given, settings
from hypothesis import strategies as st

from querycache.transforms import read_logs
from querycache.transforms.read_logs import LINES, _offsets, _ParseFile, _Part, _parts, _renumbered
from querycache.transforms.records import LogFields, parse_stream, part_of, record_tuples
from tests.conftest import build_args, use_s3
from tests.test_build import _dead_letters
from tests.test_records import (
    CSV_FIELDS,
    CSV_GOOD,
    CSV_HEADER,
    FIELDS,
    GOOD,
    HOSTILE_CSV,
    HOSTILE_JSONL,
    _tsv,
)
from tests.tiny_bert import WORDS


def read_in_parts(path, fields: LogFields, part_bytes: int) -> tuple[list, int]:
    """What ``_ParseFile`` gives for each part of ``path``, numbered in the file as FileLineNumbers
    numbers dead letters (records too, to compare them line for line), and the number of parts."""
    parts = list(_parts((str(path).encode(), path.stat().st_size), fields, part_bytes))
    tables, letters, counts = [], [], []
    for part in parts:
        for out in _ParseFile(fields).process(part):
            if not isinstance(out, TaggedOutput):
                tables.append(out)
            elif out.tag == LINES:
                counts.append(out.value)
            else:
                letters.append(out.value)
    offsets = _offsets(counts)
    items = [_renumbered(letter, offsets) for letter in letters]
    for table in tables:
        offset = offsets[str(path), part_of(table)]
        items.extend((*row[:4], row[4] + offset, *row[5:]) for row in record_tuples(table))
    return sorted(items, key=lambda item: item["line"] if type(item) is dict else item[4]), len(parts)


def whole(path, fields: LogFields) -> list:
    with open(path, "rb") as stream:
        return list(parse_stream(str(path), stream, fields))


def test_parts_hold_every_byte_once_and_start_at_a_line():
    rng = random.Random(7)
    for _ in range(500):
        lines = [b"x" * rng.choice([0, 1, 2, 5, 30]) for _ in range(rng.randint(1, 40))]
        data = b"\n".join(lines) + rng.choice([b"", b"\n"])
        size, part_bytes = len(data), rng.randint(1, 40)
        pieces = []
        for _, start, end in _parts((b"f.jsonl", size), LogFields(), part_bytes):
            piece = io.BufferedReader(_Part(io.BytesIO(data), start, end), 7).read()
            pieces.append(piece)
        assert b"".join(pieces) == data, (data, part_bytes)
        for i, piece in enumerate(pieces):  # each part but the first starts right after a line break
            before = b"".join(pieces[:i])
            assert not piece or not before or before.endswith(b"\n")


def test_compressed_parquet_and_small_files_are_one_part():
    assert list(_parts((b"a.jsonl.gz", 10_000), LogFields(), 100)) == [(b"a.jsonl.gz", 0, None)]
    assert list(_parts((b"a.parquet", 10_000), LogFields(), 100)) == [(b"a.parquet", 0, None)]
    assert list(_parts((b"a.log", 10_000), LogFields(format="parquet"), 100)) == [(b"a.log", 0, None)]
    assert list(_parts((b"a.jsonl", 100), LogFields(), 100)) == [(b"a.jsonl", 0, None)]
    assert [p[1:] for p in _parts((b"a.csv", 250), LogFields(), 100)] == [(0, 83), (83, 166), (166, None)]


@pytest.mark.parametrize("part_bytes", [40, 150, 700])
def test_each_hostile_jsonl_line_in_a_later_part_is_what_it_is_whole(tmp_path, part_bytes):
    path = tmp_path / "f.jsonl"
    for hostile in HOSTILE_JSONL:
        path.write_bytes(b"\n".join([GOOD] * 6 + [hostile] + [GOOD] * 6) + b"\n")
        for fields in FIELDS:
            got, count = read_in_parts(path, fields, part_bytes)
            assert count > 1 and got == whole(path, fields), hostile


@pytest.mark.parametrize("part_bytes", [30, 120])
@pytest.mark.parametrize("name", ["f.csv", "f.tsv"])
def test_each_hostile_csv_line_in_a_later_part_is_what_it_is_whole(tmp_path, part_bytes, name):
    swap = _tsv if name.endswith(".tsv") else (lambda line: line)
    path = tmp_path / name
    for hostile in HOSTILE_CSV:
        path.write_bytes(b"\n".join(map(swap, [CSV_HEADER] + [CSV_GOOD] * 6 + [hostile] + [CSV_GOOD] * 6)) + b"\n")
        for fields in CSV_FIELDS:
            got, count = read_in_parts(path, fields, part_bytes)
            assert count > 1 and got == whole(path, fields), hostile


_LINE = st.one_of(st.sampled_from(HOSTILE_JSONL), st.just(GOOD), st.binary(max_size=12))


@settings(max_examples=150, deadline=None)
@example([b'{"query":', b'"x","user":"u","count":1}'], "f.jsonl", 4, True, False)  # a first part of the mark alone
@given(
    st.lists(_LINE, min_size=1, max_size=30),
    st.sampled_from(["f.jsonl", "f.txt", "f.csv"]),
    st.integers(1, 200),
    st.booleans(),
    st.booleans(),
)
def test_a_file_read_in_parts_gives_what_it_gives_whole(tmp_path_factory, lines, name, part_bytes, bom, final):
    """Any bytes, any part size, a byte-order mark at the start (skipped) or at a part's start (kept)."""
    path = tmp_path_factory.mktemp("parts") / name
    data = (b"\xef\xbb\xbf" if bom else b"") + b"\n".join(lines) + (b"\n" if final else b"")
    if not data:
        return
    path.write_bytes(data)
    fields = (FIELDS[0] if name.endswith(".jsonl") else LogFields()) if name != "f.csv" else CSV_FIELDS[0]
    assert read_in_parts(path, fields, part_bytes)[0] == whole(path, fields)


def _log_with_dead_letters() -> bytes:
    rng = random.Random(3)
    lines = []
    for i in range(600):
        roll = rng.random()
        if roll < 0.03:
            lines.append(b"{broken")
        elif roll < 0.06:
            lines.append(json.dumps({"query": "x" * 600, "count": 1, "user": "u"}).encode())  # too long: normalize
        elif roll < 0.08:
            lines.append(json.dumps({"query": "a\u0007b", "count": 1, "user": "u"}).encode())  # a control character
        else:
            lines.append(json.dumps({"query": rng.choice(WORDS), "count": 1 + i % 3, "user": f"u{i % 7}"}).encode())
    return b"\n".join(lines) + b"\n"


def _build(cli, logs, out, model, part_bytes, monkeypatch, *extra) -> dict:
    monkeypatch.setattr(read_logs, "PART_BYTES", part_bytes)
    args = ("--count-field", "count", "--user-field", "user", "--top-k", "20", "--fidelity-sample", "0")
    result = cli(*build_args(logs, out, model, *args), *extra)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    dead = [json.loads(line) for line in _dead_letters(out)]
    return summary | {"dead": sorted((d["line"], d["reason"], d["excerpt"]) for d in dead)}


SAME = ("lines_read", "accepted", "rejected_by_reason", "distinct_queries", "head_size", "dead")


def test_a_build_of_a_log_in_parts_numbers_its_dead_letters_in_the_file(cli, tiny_bert, tmp_path, monkeypatch):
    """Dead letters of the reader and of the query checks, in every part, keep their line in the file."""
    (tmp_path / "log.jsonl").write_bytes(_log_with_dead_letters())
    whole = _build(cli, tmp_path / "log.jsonl", tmp_path / "whole", tiny_bert, read_logs.PART_BYTES, monkeypatch)
    in_parts = _build(cli, tmp_path / "log.jsonl", tmp_path / "parts", tiny_bert, 2_000, monkeypatch)
    assert in_parts["lines_read"] == 600
    assert {name: in_parts[name] for name in SAME} == {name: whole[name] for name in SAME}
    reasons = {reason for _, reason, _ in in_parts["dead"]}
    assert {"malformed_json", "too_long", "control_characters"} <= reasons, reasons


def test_a_log_on_s3_is_read_in_parts(cli, tiny_bert, tmp_path, monkeypatch, s3):
    """Parts seek into an object on S3 as into a local file (a real S3 server on loopback)."""
    from querycache.store import fs

    data = _log_with_dead_letters()
    (tmp_path / "log.jsonl").write_bytes(data)
    use_s3(s3["options"])  # an earlier command may have pointed the store seam elsewhere
    fs._s3_client().put_object(Bucket="qc-test", Key=f"parts-{tmp_path.name}/log.jsonl", Body=data)
    remote = f"{s3['bucket']}/parts-{tmp_path.name}/log.jsonl"
    whole = _build(cli, tmp_path / "log.jsonl", tmp_path / "whole", tiny_bert, read_logs.PART_BYTES, monkeypatch)
    in_parts = _build(cli, remote, tmp_path / "parts", tiny_bert, 2_000, monkeypatch, "--", *s3["options"])
    assert {name: in_parts[name] for name in SAME} == {name: whole[name] for name in SAME}

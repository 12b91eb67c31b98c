"""Log parsing, query checks, PII scrub and head planning, against plain-Python references."""

from __future__ import annotations

import bz2
import datetime as dt
import gzip
import io
from collections import Counter

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from querycache.transforms import records
from querycache.transforms.normalize import check_column, check_query
from querycache.transforms.privacy import luhn_valid, pii_reason
from querycache.transforms.records import MAX_WEIGHT, LogFields, decompressed, format_of, parse_stream
from querycache.transforms.selection import Selection, plan_head


def parse(name: str, data: bytes, **fields):
    return list(parse_stream(name, io.BytesIO(data), LogFields(**fields)))


def test_formats_are_picked_by_extension_through_compression():
    assert [format_of(p) for p in ["a.jsonl.gz", "b.csv.bz2", "c.tsv", "d.parquet", "e.log", "f"]] == [
        "jsonl",
        "csv",
        "tsv",
        "parquet",
        "text",
        "text",
    ]
    assert format_of("a.txt", "jsonl") == "jsonl"


def test_every_line_yields_one_record_or_one_rejection_with_its_reason():
    lines = [
        b'{"q": "ok", "n": 2, "u": "a", "t": "2026-11-02T00:00:00Z"}',
        b"not json",
        b"[1, 2]",
        b'{"n": 1}',
        b'{"q": 5}',
        b'{"q": "x", "n": -1, "u": "a"}',
        b'{"q": "x", "n": "many", "u": "a"}',
        b'{"q": "x", "n": true, "u": "a"}',
        b'{"q": "x", "n": 1, "u": ""}',
        b'{"q": "x", "n": 1, "u": "a", "t": "yesterday"}',
        b'{"q": "x", "n": 1, "u": "a", "t": "2025-01-01T00:00:00Z"}',
        b'{"q": "caf\xe9"}',
    ]
    since = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    out = parse("log.jsonl", b"\n".join(lines) + b"\n", query="q", count="n", user="u", time="t", since=since)
    assert out[0] == ("ok", 2, "a", "log.jsonl", 1)
    assert [r["reason"] for r in out[1:]] == [
        "malformed_json",
        "malformed_json",
        "missing_query",
        "query_not_string",
        "bad_count",
        "bad_count",
        "bad_count",
        "missing_user",
        "bad_timestamp",
        "outside_time_window",
        "invalid_utf8",
    ]
    assert [r["line"] for r in out[1:]] == list(range(2, 13))


def test_csv_and_tsv_keep_row_numbers():
    csv_data = b'query,count\n"hello, world",3\nbroken,1,extra\nplain,x\n'
    out = parse("q.csv.gz", csv_data, count="count")  # Beam decompresses; the name still says csv
    assert out[0] == ("hello, world", 3, None, "q.csv.gz", 1)
    assert [(r["line"], r["reason"]) for r in out[1:]] == [(2, "malformed_row"), (3, "bad_count")]
    tsv = parse("q.tsv.bz2", b"query\tuser\na b\tu1\n", user="user")
    assert tsv == [("a b", 1, "u1", "q.tsv.bz2", 1)]


def test_byte_order_marks_and_blank_lines():
    assert parse("q.csv", b"\xef\xbb\xbfquery\nhello\n")[0] == ("hello", 1, None, "q.csv", 1)
    out = parse("q.jsonl", b'\xef\xbb\xbf{"query": "a"}\n\n  \n')
    assert out[0] == ("a", 1, None, "q.jsonl", 1) and [r["reason"] for r in out[1:]] == ["blank_line"] * 2


def test_parquet_rows_are_records():
    buf = io.BytesIO()
    pq.write_table(pa.table({"query": ["a", None, "b"], "w": [1, 2, 0]}), buf)
    out = parse("x.parquet", buf.getvalue(), count="w")
    assert out[0] == ("a", 1, None, "x.parquet", 1)
    assert [r["reason"] for r in out[1:]] == ["missing_query", "bad_count"]


@settings(max_examples=300)
@given(st.binary(max_size=300), st.sampled_from(["x.jsonl", "x.csv", "x.txt", "x.tsv"]))
def test_parsers_never_raise_and_account_for_every_line(data, name):
    out = parse(name, data, count="count" if "csv" in name else None)
    lines = data.split(b"\n")
    expected = len(lines) - (lines[-1] == b"") - (1 if name.endswith((".csv", ".tsv")) and data else 0)
    assert len(out) == max(expected, 0)


def test_query_checks():
    assert check_query("Hello  World", 512) == ("hello world", None)
    assert check_query("a\x00b", 512) == (None, "control_characters")
    assert check_query("x" * 513, 512) == (None, "too_long")
    assert check_query(" \u200b ", 512) == (None, "empty_query")
    assert check_query("paris", 512, template="{query}") == (None, "no_mask")
    assert check_query("paris [MASK]", 512, template="{query}") == ("paris [mask]", None)


def test_pii_is_recognised_and_ordinary_queries_pass():
    assert pii_reason("write to jane.doe@example.com") == "email"
    assert pii_reason("card 4111 1111 1111 1111 expired") == "card"
    assert pii_reason("4111 1111 1111 1112 lottery") != "card"
    assert pii_reason("ping 10.0.0.254") == "ip" and pii_reason("fe80::1ff:fe23:4567:890a") == "ip"
    assert pii_reason("call +44 20 7946 0958") == "phone"
    assert pii_reason("tracking 123456789012") is not None
    assert pii_reason("555-123-4567") == "phone" and pii_reason("ring 020 7946 0958") == "phone"
    for ok in [
        "iphone 15 pro 256 gb",
        "flights 2024 to 2025",
        "weather 10:30",
        "covid 19",
        "zip 90210",
        "iphone 12 13 14 15 compare",
        "top 10 2023 songs",
    ]:
        assert pii_reason(ok) is None
    assert luhn_valid("79927398713") and not luhn_valid("79927398710")


def reference_head(counts: dict[str, int], selection: Selection) -> list[str]:
    """Sort everything by (-count, key bytes) and cut: what plan_head + tie-breaking must reproduce."""
    ranked = sorted(counts, key=lambda k: (-counts[k], k.encode()))
    if selection.mode == "top_k":
        return ranked[: int(selection.value)]
    if selection.mode == "min_count":
        return [k for k in ranked if counts[k] >= selection.value]
    total, head, covered = sum(counts.values()), [], 0
    for key in ranked:
        if covered >= selection.value * total:
            break
        head.append(key)
        covered += counts[key]
    return head


@settings(max_examples=300)
@given(
    st.dictionaries(st.text("abc", min_size=1, max_size=4), st.integers(1, 6), min_size=1),
    st.sampled_from(["top_k", "min_count", "coverage"]),
    st.integers(1, 10),
    st.floats(0.01, 1.0),
)
def test_plan_matches_a_full_sort(counts, mode, k, fraction):
    selection = Selection(mode, fraction if mode == "coverage" else k)
    plan = plan_head(dict(Counter(counts.values())), sum(counts.values()), selection)
    expected = reference_head(counts, selection)
    assert plan["head_size"] == len(expected)
    assert plan["head_traffic"] == sum(counts[k] for k in expected)
    tied = sorted((k for k in counts if counts[k] == plan["threshold"]), key=str.encode)
    above = [k for k in counts if plan["threshold"] is not None and counts[k] > plan["threshold"]]
    chosen = above + tied[: plan["take_at_threshold"]] if plan["take_at_threshold"] else above + tied
    assert sorted(chosen) == sorted(expected)
    for key in expected:
        assert plan["ranks"][counts[key]] == 1 + sum(1 for k in expected if counts[k] > counts[key])


def test_compressed_streams_cut_short_end_with_a_truncated_file_dead_letter():
    data = b"".join(b'{"query": "q %d"}\n' % i for i in range(20_000))
    for name, packed in [("a.jsonl.gz", gzip.compress(data)), ("b.jsonl.bz2", bz2.compress(data, compresslevel=1))]:
        out = list(parse_stream(name, decompressed(name, io.BytesIO(packed[: len(packed) // 2])), LogFields()))
        *records, last = out
        assert all(isinstance(r, tuple) for r in records) and len(records) < 20_000
        assert (last["reason"], last["line"]) == ("truncated_file", len(records) + 1)
        assert f"after {len(records)} lines" in last["excerpt"]
        whole = list(parse_stream(name, decompressed(name, io.BytesIO(packed)), LogFields()))
        assert len(whole) == 20_000 and all(isinstance(r, tuple) for r in whole)


def test_concatenated_gzip_members_are_one_log_and_a_plain_name_is_not_decompressed():
    members = gzip.compress(b"a\nb\n") + gzip.compress(b"c\n")  # cat a.gz b.gz > log.gz, as rotation does
    assert [r[0] for r in parse_stream("log.txt.gz", decompressed("log.txt.gz", io.BytesIO(members)), LogFields())] == [
        "a",
        "b",
        "c",
    ]
    raw = io.BytesIO(b"x\n")
    assert decompressed("log.txt", raw) is raw


GOOD = b'{"query":"Good one","user":"u1","count":2,"lab":" sports ","ts":"2026-11-01T10:00:00Z"}'
HOSTILE_JSONL = [
    b'{"query":\n"x","user":"u","count":1}',
    b'{"query":"a","user":"u","count":1}{"query":"b","user":"u","count":1}',
    b'{"query":"a","user":"u","count":1} {"query":"b","user":"u","count":1}',
    b"null",
    b'"string"',
    b"123",
    b"[]",
    b"{}",
    b"true",
    b'{"qu\\u0065ry":"x","user":"u","count":1}',
    b'{"query":"a","user":"u","count":1,}',
    b'{"query":"a","user":"u","count":1} // c',
    b'/* c */ {"query":"a","user":"u","count":1}',
    b"{'query':'a','user':'u','count':1}",
    b'\xef\xbb\xbf{"query":"a","user":"u","count":1}',
    b'{"query":"a","user":"u","count":1e2}',
    b'{"query":"a","user":"u","count":100000000000000000000}',
    b'{"query":"a","user":"u","count":-0}',
    b'{"query":"a","user":"u","count":0}',
    b'{"query":"a","user":"u","count":1099511627777}',
    b'{"query":"a","user":"","count":1}',
    b'{"query":"a","user":"\\u3000","count":1}',
    b'{"query":"a","user":" ","count":1}',
    b'{"query":"a","user":"\\u001c\\u00a0","count":1}',
    b'{"query":"a","user":"\\u200b","count":1}',
    b'{"query":"a","user":"-","count":1}',
    b'{"query":"a","user":"\xc3\xa9","count":1}',
    b'{"query":"a","user":"u","count":1}  ',
    b'{"query":"a","user":"u","count":1}\t\r',
    b'{"query":"a","count":1}',
    b'{"query":null,"user":"u","count":1}',
    b'{"user":"u","count":1}',
    b'{"query":"a","user":"u"}',
    b'{"query":"a","user":"u","count":null}',
    b'{"query":"a","user":7,"count":1}',
    b'{"query":"a","user":"u","count":"5"}',
    b'{"query":"a","user":"u","count":true}',
    b'{"query":"\\ud83d\\ude00","user":"u","count":1}',
    b'{"query":"\\ud800","user":"u","count":1}',
    b'{"query":"a\\u0000b","user":"u","count":1}',
    b'{"query":"a","user":"u","count":1,"x":NaN}',
    b'{"query":"a","user":"u","count":1,"x":1e400}',
    b'{"query":"a","user":"u","count":1,"x":"\xff"}',
    b'{"query":"\xc3\xa9t\xc3\xa9","user":"u","count":1}',
    b"  ",
    b"",
    b"\t",
    b"\x0c",
    b"\r",
    b'{"query":"a","user":"u","count":1}\r',
    b'{"query":"a","query":"b","user":"u","count":1}',
    b'{"query":"a","user":"u","count":1,"count":2}',
    b'{"query":"a","user":"u","count":1,"x":1,"x":2}',
    b'{"query":"a","user":"u","count":1,"nested":{"query":"zzz"}}',
    b'{"query":"a","user":"u","count":01}',
    b'{"query":"a","user":"u","count":+1}',
    b'{"query":"a","user":"u","count":1.0}',
    b'{"query":"a","user":"u","count":1,"x":[' + b"[" * 5000 + b"]" * 5000 + b"]}",
    b'{"query":"a\\/b","user":"u","count":1}',
    b'{"query":"tab\there","user":"u","count":1}',
    b'{"query":"a","user":"u","count":1} \x00',
    b"\x00",
    b'{"query":"a","user":"u","count":1}}',
    b'{"query":"a","user":"u","count":1',
    b'{"query":"a","user":["u"],"count":1}',
    b'{"query":["a"],"user":"u","count":1}',
    b'{"query":{"a":1},"user":"u","count":1}',
    b'{"query":"a","user":"u","count":[1]}',
    b'{"query":"a","user":"u","count":9223372036854775807}',
    b'{"query":"a","user":"u","count":-9223372036854775809}',
    b'{"query":"a","user":"u","count":1,"ts":"x"}',
    b'{"Query":"a","user":"u","count":1}',
    b'{"query":"a","user":"u","count":1,"lab":""}',
    b'{"query":"a","user":"u","count":1,"lab":"\\u3000\\u001c"}',
    b'{"query":"a","user":"u","count":1,"lab":null}',
    b'{"query":"a","user":"u","count":1,"lab":5}',
    b'{"query":"a","user":"u","count":1,"lab":2.50}',
    b'{"query":"a","user":"u","count":1,"lab":true}',
    b'{"query":"a","user":"u","count":1,"lab":["x"]}',
    b'{"query":"a","user":"u","count":1,"lab":{"x":1}}',
    b'{"query":"a","user":"u","count":1,"lab":"\xc3\xa9 "}',
    b'{"query":"a","user":"u","count":0,"lab":""}',
    b'{"query":"a","user":"u","count":1,"ts":1793527200}',
    b'{"query":"a","user":"u","count":1,"ts":1e300}',
    b'{"query":"a","user":"u","count":1,"ts":null}',
    b'{"query":"a","user":"u","count":1,"ts":true}',
    b'{"query":"a","user":"u","count":1,"ts":" 2026-11-02 08:00 "}',
    b'{"query":"a","user":"u","count":1,"ts":"2026-10-01T00:00:00+02:00"}',
    b'{"query":"a","user":"u","count":1,"ts":"2026-12-01T00:00:00Z"}',
    b'{"query":"a","user":"u","count":1,"ts":"2026-11-30T23:59:59-01:00"}',
    b'{"query":"a","user":"u","count":1,"ts":"2026-11-01T00:00:00+25:00"}',
    b'{"query":"a","user":"","count":1,"ts":"nope"}',
    b'{"query":"a","user":"u","count":1,"ts":"nope","lab":""}',
]


WINDOW = LogFields(
    count="count",
    user="user",
    time="ts",
    label="lab",
    since=dt.datetime(2026, 10, 15, tzinfo=dt.UTC),
    until=dt.datetime(2026, 12, 1, tzinfo=dt.UTC),
)


def _line_by_line(data: bytes, fields: LogFields) -> list:
    """The reference: each line read and classified on its own, as before blocks."""
    return [
        records._parse_line("f.jsonl", i, raw, "jsonl", fields, None) for i, raw in records._lines(io.BytesIO(data), 1)
    ]


FIELDS = (LogFields(count="count", user="user"), LogFields(), LogFields(count="count", label="lab"), WINDOW)


# Logs whose user ids, labels and epoch times are numbers, or whose counts are text: the contract takes
# them (str of the number, the digits of the text), and Arrow is to read them column-wise too.
NUMBERS = b'{"query":"Good one","user":17,"count":2,"lab":3,"ts":1793527200}'
TEXT_COUNTS = b'{"query":"Good one","user":"u1","count":" 2","lab":" sports ","ts":"2026-11-01T10:00:00Z"}'


@pytest.mark.parametrize("good", [GOOD, NUMBERS, TEXT_COUNTS])
@pytest.mark.parametrize("block", [64, 1 << 20])
def test_each_hostile_line_among_good_ones_is_classified_as_the_line_reader_does(block, good):
    default, records.BLOCK = records.BLOCK, block
    try:
        for hostile in HOSTILE_JSONL:
            data = b"\n".join([good] * 5 + [hostile] + [good] * 5) + b"\n"
            for fields in FIELDS:
                assert list(parse_stream("f.jsonl", io.BytesIO(data), fields)) == _line_by_line(data, fields), hostile
    finally:
        records.BLOCK = default


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 40), st.sampled_from(HOSTILE_JSONL)), max_size=6),
    st.sampled_from([64, 300, 1 << 20]),
    st.booleans(),
    st.lists(st.sampled_from([GOOD, NUMBERS, TEXT_COUNTS]), min_size=1, max_size=3),
)
def test_jsonl_blocks_classify_every_line_as_the_line_reader_does(hostile, block, final_newline, goods):
    """Arrow reads blocks of lines; each line still ends as the record or the dead letter it was."""
    lines = [goods[i * len(goods) // 40] for i in range(40)]  # runs of each kind of good line
    for position, line in hostile:
        lines.insert(position, line)
    data = b"\n".join(lines) + (b"\n" if final_newline else b"")
    default, records.BLOCK = records.BLOCK, block
    try:
        for fields in FIELDS:
            assert list(parse_stream("f.jsonl", io.BytesIO(data), fields)) == _line_by_line(data, fields)
    finally:
        records.BLOCK = default


QUERY_TEXT = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12),
    st.text(alphabet=" aZ09[]MASK\t\x00\x85\u200b\u3000İß", max_size=12),
)


@settings(max_examples=300)
@given(st.lists(QUERY_TEXT, max_size=30), st.sampled_from([None, "{query} [MASK]", "{query}"]))
def test_the_column_checks_are_the_query_checks(queries, template):
    keys, reasons = check_column(pa.array(queries, pa.string()), 8, template)
    assert list(zip(keys.to_pylist(), reasons.to_pylist())) == [check_query(q, 8, template) for q in queries]


PARQUET_ROWS = st.lists(
    st.fixed_dictionaries(
        {
            "q": st.one_of(st.none(), st.sampled_from(["", " ", "Rome", "a b", "東京", "x" * 40])),
            "n": st.one_of(st.none(), st.integers(-3, 3), st.just(MAX_WEIGHT), st.just(MAX_WEIGHT + 1)),
            "u": st.one_of(st.none(), st.sampled_from(["", "  ", "\u3000", "u1", "ü"])),
            "other": st.integers(0, 9),
        }
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(PARQUET_ROWS, st.sampled_from([pa.int64(), pa.int32(), pa.uint64(), pa.string()]))
def test_parquet_columns_are_checked_as_rows_are(rows, count_type):
    """Column-wise where the types allow it (a string count goes row by row): the same records and reasons."""
    if count_type == pa.string():
        rows = [{**row, "n": None if row["n"] is None else str(row["n"])} for row in rows]
    elif count_type != pa.int64():
        rows = [{**row, "n": row["n"] if row["n"] is None or 0 <= row["n"] < 1 << 31 else None} for row in rows]
    schema = pa.schema([("q", pa.string()), ("n", count_type), ("u", pa.string()), ("other", pa.int64())])
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema), buf)
    fields = LogFields(query="q", count="n", user="u")
    got = parse("x.parquet", buf.getvalue(), query="q", count="n", user="u")
    want = []
    for line, row in enumerate(rows, 1):
        try:
            values = records._record(row, fields, utf8=True)
        except records._Reject as rej:
            want.append((line, rej.reason))
            continue
        want.append((*values, "x.parquet", line))
    assert [(r["line"], r["reason"]) if type(r) is dict else r for r in got] == want


TEXT_LOGS = st.one_of(
    st.binary(max_size=400),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.text(alphabet="ab c\u00e9\ufeff", max_size=200).map(lambda t: ("\ufeff" + t).encode()),
).map(lambda b: b.replace(b"a", b"\r").replace(b"b", b"\n"))


@settings(max_examples=300, deadline=None)
@given(TEXT_LOGS, st.sampled_from([16, 1 << 20]))
def test_text_blocks_are_read_as_lines(data, block):
    """Plain text in blocks: the same queries (line breaks and trailing CRs cut, a leading BOM skipped) and
    the same invalid_utf8 lines as a line-by-line read."""
    fields = LogFields()
    default, records.BLOCK = records.BLOCK, block
    try:
        got = parse("x.txt", data)
    finally:
        records.BLOCK = default
    lines = records._lines(io.BytesIO(data), 1)
    assert got == [records._parse_line("x.txt", i, raw, "text", fields, None) for i, raw in lines]


CSV_HEADER = b"query,count,user,ts,lab"
CSV_GOOD = b"Good one,2,u1,2026-11-01T10:00:00Z, sports "
T = b",2026-11-01T10:00:00Z,x"
HOSTILE_CSV = [
    b'"a, b",1,u' + T,
    b'"say ""hi""",1,u' + T,
    b'"Good one","2","u1","2026-11-01T10:00:00Z"," sports "',
    b'"",1,u' + T,
    b'"""a""",1,u' + T,
    b'"a""",1,u' + T,
    b'"a"b,1,u' + T,
    b'"a" ,1,u' + T,
    b' "a",1,u' + T,
    b'a,"1",u' + T,
    b'a,1,"u"' + T + b"\r",
    b'"a\rb",1,u' + T,
    b'"a,1,u' + T + b'"',
    b'"a",1,"u' + T,
    b'a""b,1,u' + T,
    b'"a\tb",1,"u\t"' + T,
    b'a"b,1,u' + T,
    b'"open,1,u' + T,
    b"a,1,u",
    b"a,1,u" + T + b",extra",
    b",,,,",
    b"a,,u" + T,
    b"a, 3 ,u" + T,
    b"a,03,u" + T,
    b"a,0,u" + T,
    b"a,-1,u" + T,
    b"a,+1,u" + T,
    b"a,\xef\xbc\x93,u" + T,
    b"a,1099511627777,u" + T,
    b"a,99999999999999999999,u" + T,
    b"a,1.0,u" + T,
    b"a,1, " + T,
    b"a,1,\xe3\x80\x80" + T,
    b"a,1,\x1c" + T,
    b"a,1,u,nope,x",
    b"a,1,u,2026-10-01,x",
    b"a,1,u, 2026-11-02 08:00 ,x",
    b"a,1,u,1793527200,x",
    b"a,1,u,2026-11-01T10:00:00Z,",
    b"a,1,u,2026-11-01T10:00:00Z,\xe3\x80\x80",
    b"a\rb,1,u" + T,
    b"a,1,u" + T + b"\r",
    b"a,1,u" + T + b"\r\r",
    b"a\x00,1,u" + T,
    b"\xff,1,u" + T,
    b"",
    b"   ",
    b"\t",
    b"\xef\xbb\xbfa,1,u" + T,
    b"a\tb,1,u" + T,
    b"  a  ,1,u" + T,
    b"\xc3\xa9t\xc3\xa9,1,u" + T,
]
CSV_FIELDS = (
    LogFields(count="count", user="user"),
    LogFields(),
    LogFields(count="count", user="user", time="ts", label="lab", since=WINDOW.since, until=WINDOW.until),
    LogFields(query="nowhere"),
)


def _csv_line_by_line(name: str, data: bytes, fields: LogFields) -> list:
    """The reference: the header, then each line read and classified on its own, as before blocks."""
    stream, fmt, out = io.BytesIO(data), format_of(name), []
    header = stream.readline().rstrip(b"\r\n").removeprefix(records.BOM).decode("utf-8", "replace")
    header = records._cells(header, "\t" if fmt == "tsv" else ",") or []
    for number, raw in enumerate(iter(stream.readline, b""), 1):
        out.append(records._parse_line(name, number, raw.rstrip(b"\r\n"), fmt, fields, header))
    return out


def _tsv(line: bytes) -> bytes:
    return line.replace(b",", b"\0comma").replace(b"\t", b",").replace(b"\0comma", b"\t")


@pytest.mark.parametrize("block", [64, 1 << 20])
@pytest.mark.parametrize("name", ["f.csv", "f.tsv"])
def test_each_hostile_csv_line_among_good_ones_is_classified_as_the_line_reader_does(block, name):
    swap = _tsv if name.endswith(".tsv") else (lambda line: line)
    default, records.BLOCK = records.BLOCK, block
    try:
        for hostile in HOSTILE_CSV:
            data = b"\n".join(map(swap, [CSV_HEADER] + [CSV_GOOD] * 5 + [hostile] + [CSV_GOOD] * 5)) + b"\n"
            for fields in CSV_FIELDS:
                assert list(parse_stream(name, io.BytesIO(data), fields)) == _csv_line_by_line(name, data, fields), (
                    hostile
                )
    finally:
        records.BLOCK = default


# Lines of quotes, delimiters and spaces in every arrangement: where Python's csv and Arrow's quoting meet.
QUOTED_CELL = st.lists(st.sampled_from([b'"', b",", b"\t", b" ", b"a", b"1", b'""', b"\r"]), max_size=6).map(b"".join)
QUOTING = st.lists(QUOTED_CELL | st.sampled_from([b"1", b'"1"', b'"a ""b"", c"']), min_size=5, max_size=5).map(
    b",".join
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([CSV_HEADER, b"query,query", b"query", b"\xef\xbb\xbfquery,count,user,ts,lab\r", b""]),
    st.lists(st.sampled_from([CSV_GOOD, *HOSTILE_CSV]) | st.binary(max_size=20) | QUOTING, max_size=30),
    st.sampled_from([48, 300, 1 << 20]),
    st.booleans(),
    st.sampled_from(["f.csv", "f.tsv"]),
)
def test_csv_blocks_classify_every_line_as_the_line_reader_does(header, lines, block, final_newline, name):
    swap = _tsv if name.endswith(".tsv") else (lambda line: line)
    data = b"\n".join(map(swap, [header, *lines])) + (b"\n" if final_newline else b"")
    default, records.BLOCK = records.BLOCK, block
    try:
        for fields in CSV_FIELDS:
            assert list(parse_stream(name, io.BytesIO(data), fields)) == _csv_line_by_line(name, data, fields)
    finally:
        records.BLOCK = default


STAMP = dt.datetime(2026, 11, 2, 8, 0)
TIMES = {
    pa.string(): st.sampled_from(["2026-11-02T08:00:00Z", " 2026-10-01 ", "nope", "2026-12-01T00:00:00+00:00"]),
    pa.timestamp("us"): st.sampled_from([STAMP, dt.datetime(2026, 10, 1), dt.datetime(2026, 12, 1)]),
    pa.timestamp("ms", tz="UTC"): st.sampled_from(
        [STAMP.replace(tzinfo=dt.UTC), dt.datetime(2030, 1, 1, tzinfo=dt.UTC)]
    ),
    pa.int64(): st.sampled_from([1793527200, 1759276800, 10**12, -(10**15)]),
    pa.float64(): st.sampled_from([1793527200.5, float("nan"), float("inf"), 1e300]),
}
LABELS = {
    pa.string(): st.sampled_from(["sports", " news ", "", "  ", "\u3000"]),
    pa.int64(): st.integers(-2, 2),
    pa.bool_(): st.booleans(),
}


@settings(max_examples=150, deadline=None)
@given(st.data(), st.sampled_from(list(TIMES)), st.sampled_from(list(LABELS)))
def test_parquet_time_and_label_columns_are_checked_as_rows_are(data, time_type, label_type):
    row = st.fixed_dictionaries(
        {
            "q": st.sampled_from(["Rome", "a b", None]),
            "t": st.none() | TIMES[time_type],
            "l": st.none() | LABELS[label_type],
        }
    )
    rows = data.draw(st.lists(row, max_size=30))
    schema = pa.schema([("q", pa.string()), ("t", time_type), ("l", label_type)])
    since, until = data.draw(st.sampled_from([(WINDOW.since, WINDOW.until), (WINDOW.since, None), (None, None)]))
    _parquet_against_rows(rows, schema, LogFields(query="q", time="t", label="l", since=since, until=until))


def _parquet_against_rows(rows: list[dict], schema: pa.Schema, fields: LogFields) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema), buf)
    got = list(parse_stream("x.parquet", io.BytesIO(buf.getvalue()), fields))
    want = []
    for line, row in enumerate(pq.read_table(io.BytesIO(buf.getvalue())).to_pylist(), 1):
        try:
            values = records._record(row, fields, utf8=True)
        except records._Reject as rej:
            want.append((line, rej.reason))
            continue
        want.append((*values[:3], "x.parquet", line, *values[3:]))
    assert [(r["line"], r["reason"]) if type(r) is dict else r for r in got] == want


@pytest.mark.parametrize("time_type", [pa.timestamp("s"), pa.timestamp("us"), pa.timestamp("ms", tz="UTC")])
def test_parquet_timestamps_at_the_window_bounds_are_judged_as_rows_are(time_type):
    second = dt.timedelta(seconds=1)
    naive = [WINDOW.since - second, WINDOW.since, WINDOW.until - second, WINDOW.until, None]
    times = [t if t is None or time_type.tz else t.replace(tzinfo=None) for t in naive]
    schema = pa.schema([("q", pa.string()), ("t", time_type)])
    _parquet_against_rows(
        [{"q": "a", "t": t} for t in times],
        schema,
        LogFields(query="q", time="t", since=WINDOW.since, until=WINDOW.until),
    )


@pytest.mark.parametrize("good", [NUMBERS, TEXT_COUNTS])
def test_numeric_ids_labels_times_and_text_counts_stay_column_wise(good, monkeypatch):
    """A log whose fields hold numbers (or text counts) throughout is read by Arrow, not line by line
    (the first block starts with the other type once: the reader keeps the type that fits)."""
    by_line = []
    line_reader = records._parse_line
    monkeypatch.setattr(records, "_parse_line", lambda *args: by_line.append(args) or line_reader(*args))
    monkeypatch.setattr(records, "BLOCK", 2000)  # blocks of ~25 lines
    data = b"\n".join([good] * 200) + b"\n"
    items = list(parse_stream("f.jsonl", io.BytesIO(data), WINDOW))
    assert len(items) == 200 and all(type(item) is tuple for item in items)
    assert len(by_line) <= records._PER_LINE  # the last few lines, a range too short for Arrow


def test_queries_of_other_types_cost_one_failed_read(monkeypatch):
    """After a read fails on a query that is not a string, blocks are searched for such queries first:
    a log with one every 50 lines fails a single read, and each line ends as the line reader says."""
    failed = []
    reader = records._JsonReader.__call__

    def read(self, chunk):
        try:
            return reader(self, chunk)
        except pa.ArrowInvalid:
            failed.append(chunk)
            raise

    monkeypatch.setattr(records._JsonReader, "__call__", read)
    monkeypatch.setattr(records, "BLOCK", 8000)  # blocks of ~85 lines: each holds one
    bad = [b'{"query":42,"user":"u","count":1}', b'{"query" : ["a"],"user":"u","count":1}', b'{"query":true}']
    lines = [bad[i // 50 % 3] if i % 50 == 7 else GOOD for i in range(600)]
    data = b"\n".join(lines) + b"\n"
    fields = LogFields(count="count", user="user")
    assert list(parse_stream("f.jsonl", io.BytesIO(data), fields)) == _line_by_line(data, fields)
    assert len(failed) == 1


def test_a_block_with_odd_lines_is_one_read(monkeypatch):
    """Lines Arrow is not given (malformed, blank, not an object, a query of another type) are read as
    ``{}`` in their block's one read and left to the line reader: a UTF-8 block is one read."""
    reads = []
    reader = records._JsonReader.__call__
    monkeypatch.setattr(records._JsonReader, "__call__", lambda self, chunk: reads.append(chunk) or reader(self, chunk))
    monkeypatch.setattr(records, "BLOCK", 8000)  # blocks of ~85 lines
    odd = [b"{broken", b"", b"  ", b"[1]", b'{"query":42,"user":"u","count":1}\r', b'{"query":"a"} x']
    lines = [odd[i // 10 % len(odd)] if i % 10 == 3 else GOOD for i in range(600)]
    data = b"\n".join(lines) + b"\n"
    fields = LogFields(count="count", user="user")
    assert list(parse_stream("f.jsonl", io.BytesIO(data), fields)) == _line_by_line(data, fields)
    blocks = len(list(records._line_blocks(io.BytesIO(data), 8000)))
    assert len(reads) <= blocks + 2  # a block read once; the first non-string query fails one read


@pytest.mark.parametrize("name", ["f.csv", "f.tsv"])
def test_quoted_csv_stays_column_wise(name, monkeypatch):
    """Cells in quotes (all of them, as many exporters write them; a quote inside doubled) are read by
    Arrow, not line by line, with the cells Python's csv reads."""
    by_line = []
    line_reader = records._parse_line
    monkeypatch.setattr(records, "_parse_line", lambda *args: by_line.append(args) or line_reader(*args))
    swap = _tsv if name.endswith(".tsv") else (lambda line: line)
    row = b'"say ""hi"", all","2","u1","2026-11-01T10:00:00Z"," sports "'
    data = b"\n".join(map(swap, [CSV_HEADER, *[row] * 100])) + b"\n"
    fields = CSV_FIELDS[2]
    items = list(parse_stream(name, io.BytesIO(data), fields))
    assert not by_line and len(items) == 100 and items[0][0] == swap(b'say "hi", all').decode()
    assert items == _csv_line_by_line(name, data, fields)


# a surrogate, an overlong "/", past U+10FFFF, a cut-short sequence, fine text, a byte UTF-8 never uses
EDGES = [b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80", b"\xe2\x82", "é東🙂".encode(), b"\xff"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=8) | st.sampled_from(EDGES) | st.text(max_size=8).map(str.encode), max_size=12))
def test_a_block_is_utf8_for_arrow_exactly_when_python_decodes_it(pieces):
    data = b"".join(pieces)
    try:
        data.decode("utf-8")
        decodes = True
    except UnicodeDecodeError:
        decodes = False
    assert records._valid_utf8(data) is decodes


@pytest.mark.parametrize("name", ["query", "q.u(e)ry\\x", "Anfrage-ä", "a+b*c?[d]{e}^f$|g", "東京 q"])
def test_the_search_for_queries_that_are_not_strings_takes_the_field_name_literally(name):
    values = [5, "text", None, [1], {"a": 1}, True, "5"]
    lines = [orjson.dumps({"other": "\xff", name: value}) for value in values] + [b'{"x": "\xff"}']
    block = b"\n".join(lines) + b"\n"
    starts = np.r_[0, np.flatnonzero(np.frombuffer(block, np.uint8) == 10)[:-1] + 1]
    found = records._JsonReader(LogFields(query=name)).mistyped(block, starts)
    assert found.tolist() == [True, False, False, True, True, True, False, False]

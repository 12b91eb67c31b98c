"""Parse query-log records from files: plain text, JSONL, CSV, TSV and Parquet. No Beam here.

A parsed line is either a record ``(query, weight, user, source, line)`` (with ``label`` appended
when ``LogFields.label`` names a field) or a rejection ``{"source", "line", "reason", "excerpt"}``;
every line read yields exactly one of them. :func:`parse_tables`, which the pipeline reads, gives the
records as Arrow tables of ``query, weight, user, line[, label]`` (the source in the schema's
metadata, :func:`source_of`); :func:`parse_stream` gives them one by one.
"""

from __future__ import annotations

import bz2
import csv
import datetime as dt
import gzip
import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

FORMATS = ("text", "jsonl", "csv", "tsv", "parquet")
_EXTENSIONS = {
    ".txt": "text",
    ".log": "text",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_COMPRESSED: dict[str, Callable[[IO[bytes]], IO[bytes]]] = {
    ".gz": lambda raw: gzip.GzipFile(fileobj=raw, mode="rb"),
    ".bz2": bz2.BZ2File,
}
TRUNCATED = "truncated_file"
EXCERPT_CHARS = 200
MAX_WEIGHT = 1 << 40  # one record's count; larger ones are rejected (Parquet counts are int64)

Record = tuple[str, int, "str | None", str, int]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LogFields:
    """How to read records: format and the names of the fields that matter."""

    format: str = "auto"
    query: str = "query"
    count: str | None = None
    user: str | None = None
    time: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    label: str | None = None  # finetune --task classify: the field holding each record's class


def format_of(path: str, requested: str = "auto") -> str:
    """The format of ``path``: ``requested``, or by extension (after .gz/.bz2) for ``auto``; text otherwise."""
    if requested != "auto":
        return requested
    name = path.lower()
    for suffix in _COMPRESSED:
        name = name.removesuffix(suffix)
    return next((fmt for ext, fmt in _EXTENSIONS.items() if name.endswith(ext)), "text")


def decompressed(path: str, raw: IO[bytes]) -> IO[bytes]:
    """The bytes of the log file ``path`` as read from ``raw``, decompressed by its extension (.gz, .bz2).

    Python's decompressors, not Beam's: they raise ``EOFError`` where a stream ends without its
    end-of-stream marker (a file cut mid-upload), which :func:`parse_tables` reports as
    ``truncated_file``; Beam's stop there without a word. Closing the result leaves ``raw`` open.
    """
    name = path.lower()
    return next((opener(raw) for suffix, opener in _COMPRESSED.items() if name.endswith(suffix)), raw)


def parse_time(value: Any) -> dt.datetime:
    """ISO 8601 text (naive means UTC) or epoch seconds; raises ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int | float):
        return dt.datetime.fromtimestamp(value, dt.UTC)
    stamp = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value).strip())
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.UTC)


def _weight(value: Any) -> int:
    """A positive integer count; text is accepted when it is all digits (CSV, TSV)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_WEIGHT:
        raise ValueError(value)
    return value


class _Reject(Exception):
    def __init__(self, reason: str):
        self.reason = reason


def _record(row: dict, fields: LogFields, utf8: bool = False) -> tuple:
    """Pull (query, weight, user[, label]) out of a mapping, or raise _Reject.

    ``utf8``: the strings of ``row`` are known to be valid UTF-8 (orjson, Arrow and bytes decoded
    as UTF-8 guarantee it; Python's ``json`` does not), so the lone-surrogate checks are skipped.
    """
    query = row.get(fields.query)
    if query is None:
        raise _Reject("missing_query")
    if type(query) is not str:
        raise _Reject("query_not_string")
    if not utf8 and not _encodable(query):
        raise _Reject("invalid_unicode")
    weight = 1
    if fields.count:
        try:
            weight = _weight(row.get(fields.count))
        except (ValueError, TypeError):
            raise _Reject("bad_count") from None
    user = None
    if fields.user:
        user = row.get(fields.user)
        if type(user) is not str:
            user = None if user is None else str(user)
        if user is None or not user or user.isspace():
            raise _Reject("missing_user")
        if not utf8 and not _encodable(user):
            raise _Reject("invalid_unicode")
    if fields.time:
        code = _window(row.get(fields.time), fields)
        if code:
            raise _Reject(_REASONS[code])
    if fields.label:
        label = _clean_label(row.get(fields.label))
        if label is None:
            raise _Reject("missing_label")
        return query, weight, user, label
    return query, weight, user


def _clean_label(label: Any) -> str | None:
    """A record's class as text, stripped; None for a missing, empty or structured one."""
    if label is None or isinstance(label, bool | dict | list):
        return None
    return str(label).strip() or None


def _encodable(text: str) -> bool:
    """False for text holding lone surrogates (valid in JSON, not in UTF-8: Beam's coders refuse it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable_path(path: str) -> str:
    """``path`` as valid UTF-8 text: undecodable file-name bytes become ``\\xNN`` escapes."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def rejection(source: str, line: int, reason: str, excerpt: Any) -> dict:
    """A dead letter; every string in it is valid UTF-8, so any coder or JSON writer takes it."""
    text = excerpt if isinstance(excerpt, bytes) else str(excerpt)[: EXCERPT_CHARS * 2].encode("utf-8", "replace")
    excerpt = text[: EXCERPT_CHARS * 4].decode("utf-8", "replace")[:EXCERPT_CHARS]
    return {"source": printable_path(source), "line": line, "reason": reason, "excerpt": excerpt}


def parse_tables(
    source: str, stream: IO[bytes], fields: LogFields, batch: int = 4096, header: bytes | None = None
) -> Iterator[pa.Table | dict]:
    """Tables of records (up to ``batch`` rows from a line-by-line read; a block's or a batch's from the
    column-wise readers of JSONL, text and Parquet) and rejections of one file, block by block: the
    lines of each table carry their numbers (``line``), and a block's rejections come before its table.

    ``header`` says that ``stream`` is a later part of its file (whole lines from further on, see
    :func:`splittable`): it is the file's first line (a CSV/TSV header; ``b""`` for other formats), and
    the lines are numbered from 1 at the part's start.

    Nothing in a file stops the parse: a record that cannot be processed is a dead letter, and a
    file that cannot be read on ends with one dead letter: ``truncated_file`` for a compressed
    stream cut short (the lines before the cut count as read), ``unreadable_file`` otherwise.
    """
    source = printable_path(source)
    number = 0
    pending: list = []
    try:
        for item in _parse(source, stream, fields, header):
            if type(item) is tuple:
                number += 1
                pending.append(item)
                if len(pending) < batch:
                    continue
                item, pending = record_table(pending, source, fields), []
            elif type(item) is dict:
                number += 1
                if pending:  # the records before it first: line order
                    yield record_table(pending, source, fields)
                    pending = []
            else:
                number += item.num_rows
            yield item
        if pending:
            yield record_table(pending, source, fields)
    except EOFError:  # raised by the decompressors of ``decompressed`` only
        if pending:
            yield record_table(pending, source, fields)
        log.warning("%s is cut short: its compressed stream ends after %d lines without an end marker", source, number)
        yield rejection(
            source, number + 1, TRUNCATED, f"compressed stream ends without its end marker after {number} lines"
        )
    except Exception as err:  # noqa: BLE001 - the file's remaining bytes are one dead letter
        if pending:
            yield record_table(pending, source, fields)
        yield rejection(source, number + 1, "unreadable_file", f"{type(err).__name__}: {err}")


def parse_stream(source: str, stream: IO[bytes], fields: LogFields) -> list[Record | dict]:
    """:func:`parse_tables` line by line, each record a tuple, in line order (read whole: small files, tests)."""
    items: list = []
    for item in parse_tables(source, stream, fields):
        items.extend([item] if type(item) is dict else record_tuples(item))
    return sorted(items, key=lambda item: item["line"] if type(item) is dict else item[4])


_COLUMNS = {"query": pa.string(), "weight": pa.int64(), "user": pa.string(), "line": pa.int64()}


def record_table(records: list[tuple], source: str, fields: LogFields) -> pa.Table:
    """Record tuples of one file as a table (``label`` last when ``fields.label``)."""
    names = [*_COLUMNS, "label"] if fields.label else list(_COLUMNS)
    columns = list(zip(*records))
    del columns[3]  # the source: in the metadata
    types = [*_COLUMNS.values(), pa.string()]
    arrays = [pa.array(column, kind) for column, kind in zip(columns, types)]
    return pa.table(arrays, names=names, metadata={"source": source})


def record_tuples(table: pa.Table) -> Iterator[tuple]:
    """The records of a table as ``(query, weight, user, source, line[, label])`` tuples."""
    columns = [table.column(name).to_pylist() for name in table.column_names]
    source = source_of(table)
    for row in zip(*columns):
        yield *row[:3], source, *row[3:]


def source_of(table: pa.Table) -> str:
    """The file a table of records was read from."""
    return table.schema.metadata[b"source"].decode()


def part_of(table: pa.Table) -> int:
    """Where in its file the part a table of records was read from starts (0: the file's start); its
    ``line`` column counts from that part's start, and so do the line numbers of its dead letters."""
    return int(table.schema.metadata.get(b"part", 0))


def splittable(path: str, requested: str = "auto") -> bool:
    """Whether parts of the file ``path`` can be read apart: its records are lines (not Parquet) and its
    bytes are not compressed. A part holds the lines that start in its byte range."""
    name = path.lower()
    return format_of(path, requested) != "parquet" and not any(name.endswith(suffix) for suffix in _COMPRESSED)


def _parse(source: str, stream: IO[bytes], fields: LogFields, header: bytes | None) -> Iterator[Record | dict]:
    fmt, start = format_of(source, fields.format), header is None  # start: the stream starts the file
    if fmt == "parquet":
        yield from _parse_parquet(source, stream, fields)
        return
    if fmt == "jsonl":
        yield from _parse_jsonl_blocks(source, stream, fields, start)
        return
    if fmt == "text" and not fields.label:
        yield from _parse_text_blocks(source, stream, fields, start)
        return
    if fmt in ("csv", "tsv"):
        yield from _parse_csv_blocks(source, stream, fields, "\t" if fmt == "tsv" else ",", header)
        return
    yield from (_parse_line(source, i, raw, fmt, fields, None) for i, raw in _lines(stream, 1, start))  # labelled text


BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark, skipped at the start of a file


def _parse_line(
    source: str, number: int, raw: bytes, fmt: str, fields: LogFields, header: list[str] | None
) -> Record | dict:
    """The record or the rejection of line ``number`` (``raw``, without its line break)."""
    row = _fast_json(raw) if fmt == "jsonl" else None
    if row is None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return rejection(source, number, "invalid_utf8", raw)
    try:
        if row is not None:
            values = _record(row, fields, utf8=True)
        elif fmt == "text":
            if fields.label:
                raise _Reject("missing_label")
            values = text, 1, None
        elif not text.strip():
            raise _Reject("blank_line")
        elif fmt == "jsonl":
            values = _record(_json_object(text), fields)
        else:
            values = _record(_csv_row(text, header, "\t" if fmt == "tsv" else ","), fields, utf8=True)
    except _Reject as rej:
        return rejection(source, number, rej.reason, raw)
    except Exception as err:  # noqa: BLE001 - whatever else a line does, it is one dead letter
        return rejection(source, number, "unprocessable", f"{type(err).__name__}: {raw[:EXCERPT_CHARS]!r}")
    return *values[:3], source, number, *values[3:]


BLOCK = 1 << 20  # bytes of whole lines read at once (JSONL, text)
_PER_LINE = 8  # a range of this many lines or fewer that Arrow refuses is classified line by line
_DEEP = 512  # brackets on a line that may nest beyond what orjson reads: the line reader decides
_ARROW_ROW = re.compile(r" in row (\d+)")


def _named(fields: LogFields) -> list[str]:
    """The fields a read takes from each record, in the contract's order."""
    return [name for name in (fields.query, fields.count, fields.user, fields.time, fields.label) if name]


def _parse_jsonl_blocks(
    source: str, stream: IO[bytes], fields: LogFields, start: bool = True
) -> Iterator[Record | dict | pa.Table]:
    """JSONL read in blocks of whole lines by ``pyarrow.json`` with a schema of the named fields only.

    Arrow is given only lines that each start with ``{``, end with ``}``, hold valid UTF-8 and fewer
    than ``_DEEP`` brackets (it skips blank lines without a row, reads any nesting where the line reader
    stops at 1,024 levels, and pyarrow 25 crashes on a block that starts with ``null``): in a UTF-8
    block the others are read as ``{}`` and left to the line reader, so a block is one read. What it
    refuses (a field of another type, a line that is not one object) is narrowed down to its lines, which
    :func:`_parse_line` classifies exactly as a line-by-line read does; what Arrow reads but the
    contract refuses (a null query, a bad count, a blank user) is found column-wise. Every line gives
    one record (in a table) or one rejection. A block that keeps failing is read on line by line.
    """
    names = _named(fields)
    if len(set(names)) < len(names):  # one field in two roles: the line-by-line read decides
        yield from (_parse_line(source, i, raw, "jsonl", fields, None) for i, raw in _lines(stream, 1, start))
        return
    read = _JsonReader(fields)
    yield from _one_ahead(
        _line_blocks(stream, BLOCK, start), lambda block, first: _jsonl_block(source, block, first, fields, read)
    )


class _JsonReader:
    """``pyarrow.json`` with a schema of the named fields only, whose types follow the log.

    The query is read as a string and the count as an integer; the user, label and time as strings.
    Logs differ: user ids, labels and epoch times are often numbers, counts sometimes strings. A block
    that Arrow refuses because such a field "changed from string to number" (or back) in its first row
    is read again with that field as the other type, and the next blocks start from it: a log of
    numeric user ids stays column-wise. The contract takes them as the line reader does (``str`` of an
    integer, counts from text by ``_weight``); what neither type holds (a float id, a mix within a
    block) is refused and narrowed down to its lines as before. A query must be a string: once a read
    fails on one that is not, each block is searched for such queries before Arrow reads it (their
    lines go to the line reader), for as long as blocks have them.
    """

    _OTHER = {"string": ("number", pa.int64()), "number": ("string", pa.string())}

    def __init__(self, fields: LogFields):
        import pyarrow.json as pj

        self._pj = pj
        self.types = dict.fromkeys((fields.time, fields.label, fields.user), pa.string())
        self.types |= {fields.query: pa.string(), fields.count: pa.int64()}
        self.types.pop(None, None)
        self.names = _named(fields)
        switchable = [name for name in (fields.user, fields.label, fields.time, fields.count) if name]
        self._changes = {_changed(name): name for name in switchable}
        self._query_changed = _changed(fields.query)
        self._mistyped = _re2_literal(json.dumps(fields.query, ensure_ascii=False)) + r'\s*:\s*[^"n\s]'
        self.search = False
        self._options = self._parse_options()

    def _parse_options(self):
        schema = pa.schema([(name, self.types[name]) for name in self.names])
        return self._pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")

    def refused_query(self, error: str) -> bool:
        """Whether a read failed on a query that is not a string."""
        return self._query_changed in error

    def mistyped(self, block: bytes, starts: np.ndarray) -> np.ndarray:
        """Whether each line of ``block`` (they start at ``starts``) has a query whose value is not a
        string (or null). Arrow's RE2 searches the lines in place and lets go of the GIL, which the
        pipeline's other thread needs meanwhile; Python's ``re`` held it ~2 ms a block."""
        offsets = np.append(starts, len(block)).astype(np.int64)
        buffers = [None, pa.py_buffer(offsets), pa.py_buffer(block)]
        lines = pa.Array.from_buffers(pa.large_binary(), len(starts), buffers)
        return pc.match_substring_regex(lines, self._mistyped).to_numpy(zero_copy_only=False)

    def __call__(self, chunk: bytes) -> pa.Table:
        block = self._pj.ReadOptions(use_threads=False, block_size=len(chunk) + 1)
        for _ in range(len(self._changes) + 1):
            try:
                return self._pj.read_json(io.BytesIO(chunk), read_options=block, parse_options=self._options)
            except pa.ArrowInvalid as err:
                if not self._switched(str(err)):
                    raise
        raise pa.ArrowInvalid("JSON field types keep changing within one block")

    def _switched(self, error: str) -> bool:
        """Whether ``error`` says that a switchable field holds the other type from the chunk's first row
        on; if so, take that type. A change further down is the odd line out: the caller splits there."""
        row = _ARROW_ROW.search(error)
        if row is None or row.group(1) != "0":
            return False
        for prefix, name in self._changes.items():
            if prefix in error:
                kind = "string" if self.types[name] == pa.string() else "number"
                other, to = self._OTHER[kind]
                if f"{prefix}{kind} to {other}" in error:
                    self.types[name] = to
                    self._options = self._parse_options()
                    return True
        return False


def _changed(name: str) -> str:
    """How Arrow's error begins when the JSON field ``name`` holds another type than its column's."""
    return f"Column(/{name.replace('~', '~0').replace('/', '~1')}) changed from "


def _one_ahead(blocks: Iterator[bytes], work: Callable[[bytes, int], tuple[list, int]]) -> Iterator:
    """The items of ``work(block, its first line number)`` for each block, in order, each block worked
    on by a helper thread while the caller takes the items of the one before: Arrow's parse (which lets
    go of the GIL) overlaps what the pipeline does downstream. A stream that fails still gives the
    items of every block read before it fails."""
    with ThreadPoolExecutor(1, thread_name_prefix="querycache-parse") as helper:
        pending, number = None, 0
        try:
            for block in blocks:
                ahead = helper.submit(work, block, number + 1)
                number += block.count(b"\n") + (not block.endswith(b"\n"))
                if pending is not None:
                    yield from pending.result()[0]
                pending = ahead
        except Exception:
            if pending is not None:
                yield from pending.result()[0]
            raise
        if pending is not None:
            yield from pending.result()[0]


def _parse_text_blocks(
    source: str, stream: IO[bytes], fields: LogFields, start: bool = True
) -> Iterator[Record | dict | pa.Table]:
    """Plain text in blocks of whole lines, each line a query of weight 1, one table per block; a block
    that is not all UTF-8 is read line by line (its bad lines are ``invalid_utf8``)."""
    number = 0
    for block in _line_blocks(stream, BLOCK, start):
        lines = block.split(b"\n")
        if block.endswith(b"\n"):
            lines.pop()
        try:
            text = block.decode("utf-8")
        except UnicodeDecodeError:
            for i, raw in enumerate(lines, number + 1):
                yield _parse_line(source, i, raw.rstrip(b"\r"), "text", fields, None)
        else:
            queries = [line.rstrip("\r") for line in text.split("\n")[: len(lines)]]
            n = len(queries)
            columns = [queries, np.ones(n, np.int64), pa.nulls(n, pa.string()), np.arange(number + 1, number + 1 + n)]
            yield pa.table(columns, schema=pa.schema(_COLUMNS, metadata={"source": source}))
        number += len(lines)


def _parse_csv_blocks(
    source: str, stream: IO[bytes], fields: LogFields, delimiter: str, header_line: bytes | None = None
) -> Iterator:
    """CSV or TSV: the header line, then blocks of lines. The plain lines of a block (as many
    delimiters outside quotes as the header, quotes only around whole cells with ``""`` for a quote
    inside, no other carriage return, no NUL) are read by ``pyarrow.csv``, which splits them as
    Python's ``csv`` does, and checked column-wise; every other line (and every
    line of a file whose header lacks a named field, names one twice or has one column) by
    :func:`_parse_line`. Each line gives one record (in a table) or one rejection. A later part of a
    file comes with its file's ``header_line``."""
    fmt = "tsv" if delimiter == "\t" else "csv"
    first = stream.readline() if header_line is None else header_line
    if not first:
        return
    header = _cells(first.rstrip(b"\r\n").removeprefix(BOM).decode("utf-8", "replace"), delimiter) or []
    names = _named(fields)
    if len(header) < 2 or len(set(header)) < len(header) or not set(names) <= set(header):
        yield from (_parse_line(source, i, raw, fmt, fields, header) for i, raw in _lines(stream, 1, bom=False))
        return
    import pyarrow.csv as pcsv

    options = (
        pcsv.ReadOptions(column_names=header, use_threads=False),
        pcsv.ParseOptions(delimiter=delimiter, double_quote=True, escape_char=False, ignore_empty_lines=False),
        pcsv.ConvertOptions(column_types=dict.fromkeys(header, pa.string()), include_columns=names),
    )

    def work(block: bytes, first: int) -> tuple[list, int]:
        return _csv_block(source, block, first, fields, header, delimiter, options)

    yield from _one_ahead(_line_blocks(stream, BLOCK, start=False), work)


def _csv_block(source, block, first, fields, header, delimiter, options) -> tuple[list, int]:
    """The items of the lines of a CSV/TSV ``block`` (line ``first`` onwards) and their number."""
    import pyarrow.csv as pcsv

    data, starts, ends = _line_bounds(block)

    def per_line(mask: np.ndarray) -> np.ndarray:
        return np.add.reduceat(mask.astype(np.int64), starts)

    trail = ((ends > starts) & (data[np.maximum(ends - 1, 0)] == 13)).astype(np.int64)  # a CR before the break
    delimiters, quoting = data == ord(delimiter), np.ones(len(ends), bool)
    if b'"' in block:  # delimiters inside quotes are text; quotes must wrap whole fields
        delimiters, quoting = _quoted(data, starts, ends, delimiters, ord(delimiter))
    plain = (
        (per_line(delimiters) == len(header) - 1)
        & quoting
        & (per_line(data == 0) == 0)  # no NUL
        & (per_line(data == 13) == trail)  # no other CR
        & (per_line((data > 32) & (data < 127)) > 0)  # a visible ASCII character: not a blank line
    )
    for i in np.flatnonzero(data[starts] == 0xEF):  # pyarrow.csv would drop a byte-order mark, csv keeps it
        plain[i] &= not block.startswith(BOM, int(starts[i]))
    if not _valid_utf8(block):
        plain[:] = False
    fmt = "tsv" if delimiter == "\t" else "csv"
    items: list = [None] * len(ends)
    for i in np.flatnonzero(~plain).tolist():
        items[i] = _parse_line(source, first + i, block[starts[i] : ends[i]].rstrip(b"\r"), fmt, fields, header)
    rows = np.flatnonzero(plain)
    if rows.size:
        keep = np.repeat(plain, ends - starts + 1)[: len(block)]  # each plain line with its line break
        table = _typed_counts(pcsv.read_csv(io.BytesIO(data[keep].tobytes()), *options), fields)
        _checked(source, block, starts, ends, rows, first, table, fields, items)
    return [item for item in items if item is not None], len(ends)


def _quoted(data, starts, ends, delimiters, delimiter: int) -> tuple[np.ndarray, np.ndarray]:
    """The delimiters of a block outside quotes, and per line whether its quotes only wrap whole fields
    (``"..."``, a quote inside written ``""``): the quoting in which Python's ``csv`` (strict) and
    ``pyarrow.csv`` read the same cells."""
    line = np.repeat(np.arange(len(ends), dtype=np.int32), ends - starts + 1)[: len(data)]
    quote = data == 34
    counted = np.cumsum(quote, dtype=np.int32)
    inside = (counted - quote - (counted[starts] - quote[starts])[line]) & 1  # within quotes, before each byte
    at = np.flatnonzero(quote)
    before, after, edge = np.maximum(at - 1, 0), np.minimum(at + 1, len(data) - 1), ends[line[at]]
    first = at == starts[line[at]]
    escaped = quote[before] & ~first  # the second quote of a "" (the one before it was inside quotes)
    opens = (inside[at] == 0) & (first | (data[before] == delimiter) | escaped)
    closing = (
        (at + 1 >= edge) | (data[after] == delimiter) | (data[after] == 34) | ((data[after] == 13) & (at + 2 >= edge))
    )
    good = np.ones(len(ends), bool)
    np.logical_and.at(good, line[at], opens | ((inside[at] == 1) & closing))
    good &= np.bincount(line[at], minlength=len(ends)) % 2 == 0  # every quoted field closed
    return delimiters & (inside == 0), good


def _typed_counts(table: pa.Table, fields: LogFields) -> pa.Table:
    """The count column of CSV text as integers, null where the line reader's ``_weight`` refuses it:
    plain digits by Arrow, the rest (spaces, other digits, signs) by ``_weight`` per distinct value."""
    if not fields.count:
        return table
    text = table.column(fields.count).combine_chunks()
    plain = pc.match_substring_regex(text, "^[0-9]{1,18}$")
    counts = pc.if_else(plain, text, pa.scalar(None, pa.string())).cast(pa.int64())
    others = pc.invert(plain)
    if pc.any(others).as_py():
        encoded = pc.dictionary_encode(pc.filter(text, others))
        weights = pa.array([_weight_or_none(value) for value in encoded.dictionary.to_pylist()], pa.int64())
        counts = pc.replace_with_mask(counts, others, pc.take(weights, encoded.indices))
    return table.set_column(table.schema.get_field_index(fields.count), fields.count, counts)


def _weight_or_none(value: str) -> int | None:
    try:
        return _weight(value)
    except (ValueError, TypeError):
        return None


def _place(source, block, starts, ends, rows, first, records, reason, items) -> None:
    """Rejections of the refused rows at their lines; the kept rows as one table at the first of theirs."""
    for row in np.flatnonzero(reason).tolist():
        i = int(rows[row])
        items[i] = rejection(source, first + i, _REASONS[reason[row]], block[starts[i] : ends[i]].rstrip(b"\r"))
    kept = reason == 0
    if kept.any():
        items[int(rows[np.argmax(kept)])] = records.filter(pa.array(kept))


def _lines(stream: IO[bytes], first: int, bom: bool = True) -> Iterator[tuple[int, bytes]]:
    for number, raw in enumerate(iter(stream.readline, b""), first):
        yield number, (raw.removeprefix(BOM) if number == 1 and bom else raw).rstrip(b"\r\n")


def _line_blocks(stream: IO[bytes], size: int, start: bool = True) -> Iterator[bytes]:
    """The stream in blocks of about ``size`` bytes that end at a line break (or the end of the file);
    ``start``: the stream starts the file, so a byte-order mark there is skipped.

    A decompressor's ``EOFError`` (a stream cut short) comes after the block of the whole lines read
    before it, as a line-by-line read would have yielded them.
    """
    read = getattr(stream, "read1", stream.read)  # read1: one decompressor call, nothing lost if it raises
    chunks: list[bytes] = []
    held = 0
    first, lone_bom = start, False
    while True:
        try:
            chunk = read(size)
            while first and chunk and len(chunk) < len(BOM) and BOM.startswith(chunk):  # a short read: whole mark
                more = read(size)
                chunk, first = chunk + more, bool(more)
        except EOFError:
            pending = b"".join(chunks)
            if b"\n" in pending:
                yield pending[: pending.rindex(b"\n") + 1]
            raise
        if first and chunk.startswith(BOM):
            chunk = chunk[len(BOM) :]
            if not chunk:  # the mark alone so far (a read may end there): read on; a file of it alone is one empty line
                first, lone_bom = False, True
                continue
        first = False
        if not chunk:
            if chunks or lone_bom:
                yield b"".join(chunks) or b"\n"
            return
        chunks.append(chunk)
        lone_bom = False
        held += len(chunk)
        if held >= size and b"\n" in chunk:
            pending = b"".join(chunks)
            cut = pending.rindex(b"\n") + 1
            yield pending[:cut]
            chunks, held = ([pending[cut:]] if cut < len(pending) else []), len(pending) - cut


def _line_bounds(block: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A block's bytes, and where each of its lines starts and ends (its line break, or the block's end)."""
    data = np.frombuffer(block, np.uint8)
    ends = np.flatnonzero(data == 10)
    if not block.endswith(b"\n"):
        ends = np.append(ends, len(block))
    return data, np.concatenate(([0], ends[:-1] + 1)), ends


def _jsonl_block(source: str, block: bytes, first: int, fields: LogFields, read: _JsonReader) -> tuple[list, int]:
    """The items of the lines of ``block`` (line ``first`` onwards), and their number of lines.

    Items are records and rejections of the lines read one by one, then one table of the records
    Arrow read (its rows in line order, each with its line number).
    """
    data, starts, ends = _line_bounds(block)
    last = np.maximum(ends - 1, 0)
    last = np.maximum(last - (data[last] == 13), 0)  # before a "\r"
    # lines Arrow is not given: not "{...}" (a malformed line costs Arrow a failed read), or deep
    suspect = (data[starts] != 123) | (data[last] != 125)
    for i in np.flatnonzero(ends - starts >= _DEEP).tolist():  # only a line this long can be this deep
        line = block[starts[i] : ends[i]]
        suspect[i] |= line.count(b"[") + line.count(b"{") >= _DEEP
    utf8 = _valid_utf8(block)  # then no range of it needs checking
    searched = read.search
    if searched:
        read.search = _mark(suspect, read.mistyped(block, starts))
    items: list = [None] * len(ends)
    budget = 8 * len(block)  # bytes Arrow may be given (it reads ~8x faster) before the rest goes line by line
    todo = [(0, len(ends))]

    def by_line(lines) -> None:
        for i in lines:
            items[i] = _parse_line(source, first + i, block[starts[i] : ends[i]].rstrip(b"\r"), "jsonl", fields, None)

    while todo:
        a, b = todo.pop()
        if a >= b:
            continue
        chunk = block[starts[a] : ends[b - 1] + 1]
        if b - a <= _PER_LINE or budget <= 0:
            by_line(range(a, b))
            continue
        budget -= len(chunk)
        unfit = a + np.flatnonzero(suspect[a:b])
        if utf8:  # a suspect line is read as {} (a row of nulls) and left to the line reader: one read
            culprit, chunk = None, _blanked(block, starts, ends, a, b, unfit) if unfit.size else chunk
        else:
            culprit = int(unfit[0]) if unfit.size else _first_bad_line(chunk, starts[a], ends)
        table = None
        if culprit is None:
            try:
                table = read(chunk)
            except pa.ArrowInvalid as err:  # the row it names is the line at fault, or just after it
                if not searched and read.refused_query(str(err)):  # find this block's other ones first
                    searched = read.search = _mark(suspect, read.mistyped(block, starts))
                    todo.append((a, b))
                    continue
                row = _ARROW_ROW.search(str(err))
                culprit = a + int(row.group(1)) if row and int(row.group(1)) < b - a else None
        if table is not None and table.num_rows == b - a:
            odd = suspect[a:b]  # lines read as {}: the line reader's
            if odd.any():
                by_line((a + np.flatnonzero(odd)).tolist())
                table = table.filter(pa.array(~odd))
            _checked(source, block, starts, ends, a + np.flatnonzero(~odd), first, table, fields, items)
        elif culprit is not None:  # the lines before it, it alone, the lines after it
            todo += [(culprit + 1, b), (culprit, culprit + 1), (a, culprit)]
        else:
            middle = (a + b) // 2
            todo += [(middle, b), (a, middle)]
    items = [item for item in items if item is not None]
    tables = [item for item in items if type(item) is pa.Table]
    if len(tables) > 1:  # one table a block: every table costs each step downstream its own calls
        items = [item for item in items if type(item) is not pa.Table] + [pa.concat_tables(tables)]
    return items, len(ends)


def _mark(suspect: np.ndarray, lines: np.ndarray) -> bool:
    """Mark these lines (a mask) as suspect; whether there were any."""
    suspect |= lines
    return bool(lines.any())


def _re2_literal(text: str) -> str:
    """``text`` as an RE2 pattern that matches it literally."""
    return "".join("\\" + c if c in r"\.+*?()|[]{}^$" else c for c in text)


def _valid_utf8(data: bytes) -> bool:
    """Whether ``data`` is UTF-8, checked by Arrow in place (Python's decode makes a string of it)."""
    if data.isascii():
        return True
    offsets = np.array([0, len(data)], np.int64)
    text = pa.Array.from_buffers(pa.large_string(), 1, [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    try:
        text.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _first_bad_line(chunk: bytes, offset: int, ends) -> int | None:
    """The line (index into ``ends``) holding the first byte of ``chunk`` that is not UTF-8, if any."""
    if chunk.isascii():
        return None
    try:
        chunk.decode("utf-8")
    except UnicodeDecodeError as err:
        return int(np.searchsorted(ends, offset + err.start))
    return None


_REASONS = ("", "missing_query", "bad_count", "missing_user", "missing_label", "bad_timestamp", "outside_time_window")


def _checked(source, block, starts, ends, rows, first, table, fields, items) -> None:
    """Items of the block's lines ``rows`` from the rows Arrow read for them (one each, in order): the
    contract's checks, column-wise."""
    records, reason = _contract(table, fields, rows + first, source)
    _place(source, block, starts, ends, rows, first, records, reason, items)


def _blanked(block: bytes, starts, ends, a: int, b: int, lines: np.ndarray) -> bytes:
    """Lines ``a`` to ``b`` of ``block``, each of ``lines`` (sorted, among them) replaced by ``{}``."""
    pieces, position = [], starts[a]
    for i in lines.tolist():
        pieces += [block[position : starts[i]], b"{}"]
        position = ends[i]
    pieces.append(block[position : ends[b - 1] + 1])
    return b"".join(pieces)


def _window(value: Any, fields: LogFields) -> int:
    """0 for a time inside the window, else the code of ``bad_timestamp`` or ``outside_time_window``."""
    try:
        stamp = parse_time(value)
    except (ValueError, TypeError, OverflowError, OSError):
        return 5
    return 6 if (fields.since and stamp < fields.since) or (fields.until and stamp >= fields.until) else 0


_DATETIMES = (dt.datetime(1, 1, 2, tzinfo=dt.UTC), dt.datetime(9999, 12, 30, tzinfo=dt.UTC))  # Python's range


def _windows(times: pa.ChunkedArray, fields: LogFields) -> np.ndarray:
    """:func:`_window` of each time: timestamps (naive ones are UTC) compared by Arrow, other values
    (text, numbers) each distinct one by the line reader's ``parse_time``."""
    if pa.types.is_timestamp(times.type):
        stamps = times.cast(pa.timestamp("us", "UTC"))  # lossless from s or ms; naive wall time taken as UTC
        low, high = pc.min_max(stamps).values()
        if low.is_valid and _DATETIMES[0] <= low.as_py() and high.as_py() <= _DATETIMES[1]:
            outside = np.zeros(len(stamps), bool)
            for bound, compare in ((fields.since, pc.less), (fields.until, pc.greater_equal)):
                if bound:
                    beyond = compare(stamps, pa.scalar(bound, pa.timestamp("us", "UTC")))
                    outside |= pc.fill_null(beyond, False).to_numpy(zero_copy_only=False)
            return np.where(stamps.is_null().to_numpy(zero_copy_only=False), 5, np.where(outside, 6, 0)).astype(np.int8)
    encoded = pc.dictionary_encode(times).combine_chunks()
    codes = np.array([_window(value, fields) for value in [None, *encoded.dictionary.to_pylist()]], np.int8)
    return codes[pc.fill_null(pc.add(encoded.indices, 1), 0).to_numpy(zero_copy_only=False)]  # null: None


def _contract(table: pa.Table, fields: LogFields, lines: np.ndarray, source: str):
    """The rows of ``table`` (a column per named field, of the types the contract takes whole) as a
    table of records at these line numbers, and each row's reason code (0: a record; ``_REASONS``)."""
    n = table.num_rows
    query = table.column(fields.query).cast(pa.string())
    reason = query.is_null().to_numpy(zero_copy_only=False).astype(np.int8)  # 1: missing_query
    weight = pa.array(np.ones(n, np.int64))
    if fields.count:
        if table.schema.field(fields.count).type == pa.string():  # counts given as text (see _JsonReader)
            table = _typed_counts(table, fields)
        count = table.column(fields.count)
        fine = pc.fill_null(pc.and_(pc.greater(count, 0), pc.less_equal(count, MAX_WEIGHT)), False)
        reason[(reason == 0) & ~fine.to_numpy(zero_copy_only=False)] = 2
        weight = pc.if_else(fine, count, 1).cast(pa.int64())
    user = pa.nulls(n, pa.string())
    if fields.user:
        user = table.column(fields.user).cast(pa.string())
        missing = pc.invert(pc.fill_null(pc.match_substring_regex(user, "[0-9A-Za-z]"), False))
        missing = missing.to_numpy(zero_copy_only=False)  # null, or no ASCII letter or digit: str decides
        for row in np.flatnonzero(missing).tolist():
            u = user[row].as_py()
            missing[row] = u is None or not u or u.isspace()
        reason[(reason == 0) & missing] = 3
    columns = [query, weight, user, pa.array(lines, pa.int64())]
    if fields.time:
        window = _windows(table.column(fields.time), fields)
        reason[reason == 0] = window[reason == 0]
    if fields.label:  # each distinct label by _clean_label
        encoded = pc.dictionary_encode(table.column(fields.label)).combine_chunks()
        label = pc.take(pa.array(map(_clean_label, encoded.dictionary.to_pylist()), pa.string()), encoded.indices)
        reason[(reason == 0) & label.is_null().to_numpy(zero_copy_only=False)] = 4
        columns.append(label)
    names = [*_COLUMNS, "label"] if fields.label else list(_COLUMNS)
    return pa.table(columns, names=names, metadata={"source": source}), reason


def _fast_json(raw: bytes) -> dict | None:
    """The object on a JSONL line as orjson (5x faster) parses it; None leaves the line to ``json``.

    orjson refuses some lines ``json`` reads (NaN, integers beyond 64 bits, lone surrogates) and all
    malformed ones: those take the ``json`` path, which classifies them exactly as before.
    """
    try:
        row = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return row if type(row) is dict else None


def _json_object(text: str) -> dict:
    try:
        row = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: arrays or objects nested thousands deep
        raise _Reject("malformed_json") from None
    if not isinstance(row, dict):
        raise _Reject("malformed_json")
    return row


def _cells(text: str, delimiter: str) -> list[str] | None:
    """The cells of one CSV/TSV line, or None when it does not parse."""
    try:
        return next(csv.reader([text], delimiter=delimiter, strict=True), [])
    except csv.Error:
        return None


def _csv_row(text: str, header: list[str], delimiter: str) -> dict:
    cells = _cells(text, delimiter)
    if cells is None or len(cells) != len(header):
        raise _Reject("malformed_row")
    return dict(zip(header, cells))


def _parse_parquet(source: str, stream: IO[bytes], fields: LogFields) -> Iterator[Record | dict | pa.Table]:
    """Batches of the named columns checked column-wise where their types allow it (a string query, an
    integer count, a string user, a time as text, number or timestamp of at most microseconds, a label
    as text, integer or boolean), else row by row. A rejected row's
    excerpt is the row as a dict: of the named columns only when they are read alone."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(stream)
    number = 0
    columns = _columnar(parquet.schema_arrow, fields)
    if columns is not None:
        for batch in parquet.iter_batches(batch_size=65_536, columns=columns):
            table = pa.Table.from_batches([batch])
            records, reason = _contract(table, fields, np.arange(number + 1, number + 1 + table.num_rows), source)
            for row in np.flatnonzero(reason).tolist():
                excerpt = repr(table.slice(row, 1).to_pylist()[0])
                yield rejection(source, number + 1 + row, _REASONS[reason[row]], excerpt)
            if (reason == 0).any():
                yield records.filter(pa.array(reason == 0))
            number += table.num_rows
        return
    for batch in parquet.iter_batches(batch_size=8192):
        for row in batch.to_pylist():
            number += 1
            try:
                values = _record(row, fields, utf8=True)
            except _Reject as rej:
                yield rejection(source, number, rej.reason, repr(row))
                continue
            yield *values[:3], source, number, *values[3:]


def _columnar(schema: pa.Schema, fields: LogFields) -> list[str] | None:
    """The columns to read when every named field is one column of a type checked column-wise, else None."""
    names = _named(fields)
    if len(set(names)) < len(names):
        return None
    if any(len(schema.get_all_field_indices(name)) != 1 for name in names):
        return None
    text = (pa.types.is_string, pa.types.is_large_string)
    stamps = (
        *text,
        pa.types.is_integer,
        pa.types.is_floating,
        lambda kind: pa.types.is_timestamp(kind) and kind.unit != "ns",
    )
    kinds = {fields.query: text, fields.count: (pa.types.is_integer,), fields.user: text}
    kinds |= {fields.time: stamps, fields.label: (*text, pa.types.is_integer, pa.types.is_boolean)}
    if all(any(test(schema.field(name).type) for test in kinds[name]) for name in names):
        return names
    return None


def columns_of(source: str, stream: IO[bytes], fields: LogFields) -> list[str] | None:
    """Column names of a CSV, TSV or Parquet file (None for text and JSONL), for up-front checks."""
    fmt = format_of(source, fields.format)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(stream).schema_arrow.names
    if fmt in ("csv", "tsv"):
        first = stream.readline().rstrip(b"\r\n").removeprefix(b"\xef\xbb\xbf").decode("utf-8", "replace")
        return _cells(first, "\t" if fmt == "tsv" else ",") or []
    return None

"""Parse query-log records from files: plain text, JSONL, CSV, TSV and Parquet. No Beam here.

A parsed line is either a record ``(query, weight, user, source, line)`` (with ``label`` appended
when ``LogFields.label`` names a field) or a rejection ``{"source", "line", "reason", "excerpt"}``;
every line read yields exactly one of them.
"""

from __future__ import annotations

import bz2
import csv
import datetime as dt
import gzip
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import orjson

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
    end-of-stream marker (a file cut mid-upload), which :func:`parse_stream` reports as
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
        try:
            stamp = parse_time(row.get(fields.time))
        except (ValueError, TypeError, OverflowError, OSError):
            raise _Reject("bad_timestamp") from None
        if (fields.since and stamp < fields.since) or (fields.until and stamp >= fields.until):
            raise _Reject("outside_time_window")
    if fields.label:
        label = row.get(fields.label)
        if label is None or isinstance(label, bool | dict | list) or str(label).strip() == "":
            raise _Reject("missing_label")
        return query, weight, user, str(label).strip()
    return query, weight, user


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


def parse_stream(source: str, stream: IO[bytes], fields: LogFields) -> Iterator[Record | dict]:
    """Records and rejections of one file, in order; ``line`` counts from 1 (data rows for CSV/TSV).

    Nothing in a file stops the parse: a record that cannot be processed is a dead letter, and a
    file that cannot be read on ends with one dead letter: ``truncated_file`` for a compressed
    stream cut short (the lines before the cut count as read), ``unreadable_file`` otherwise.
    """
    source = printable_path(source)
    number = 0
    try:
        for item in _parse(source, stream, fields):
            number += 1
            yield item
    except EOFError:  # raised by the decompressors of ``decompressed`` only
        log.warning("%s is cut short: its compressed stream ends after %d lines without an end marker", source, number)
        yield rejection(
            source, number + 1, TRUNCATED, f"compressed stream ends without its end marker after {number} lines"
        )
    except Exception as err:  # noqa: BLE001 - the file's remaining bytes are one dead letter
        yield rejection(source, number + 1, "unreadable_file", f"{type(err).__name__}: {err}")


def _parse(source: str, stream: IO[bytes], fields: LogFields) -> Iterator[Record | dict]:
    fmt = format_of(source, fields.format)
    if fmt == "parquet":
        yield from _parse_parquet(source, stream, fields)
        return
    header: list[str] | None = None
    number = 0
    for raw in iter(stream.readline, b""):
        raw = raw.rstrip(b"\r\n")
        if number == 0 and header is None:
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
        if fmt in ("csv", "tsv") and header is None:
            header = _cells(raw.decode("utf-8", "replace"), "\t" if fmt == "tsv" else ",") or []
            continue
        number += 1
        row = _fast_json(raw) if fmt == "jsonl" else None
        if row is None:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield rejection(source, number, "invalid_utf8", raw)
                continue
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
            yield rejection(source, number, rej.reason, raw)
            continue
        except Exception as err:  # noqa: BLE001 - whatever else a line does, it is one dead letter
            yield rejection(source, number, "unprocessable", f"{type(err).__name__}: {raw[:EXCERPT_CHARS]!r}")
            continue
        yield *values[:3], source, number, *values[3:]


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


def _parse_parquet(source: str, stream: IO[bytes], fields: LogFields) -> Iterator[Record | dict]:
    import pyarrow.parquet as pq

    number = 0
    for batch in pq.ParquetFile(stream).iter_batches(batch_size=8192):
        for row in batch.to_pylist():
            number += 1
            try:
                values = _record(row, fields, utf8=True)
            except _Reject as rej:
                yield rejection(source, number, rej.reason, repr(row))
                continue
            yield *values[:3], source, number, *values[3:]


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

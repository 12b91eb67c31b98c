"""ReadQueryLogs: files matching the patterns -> records, dead letters and line counts per part of a file."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from typing import IO

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.pvalue import AsSingleton

from querycache.transforms.progress import Ticker
from querycache.transforms.records import (
    BLOCK,
    TRUNCATED,
    LogFields,
    decompressed,
    format_of,
    parse_tables,
    printable_path,
    rejection,
    splittable,
)

log = logging.getLogger(__name__)
REJECTED, LINES = "rejected", "lines"
BATCH = 4096  # records per table read line by line (a JSONL block's table holds ~1 MB of lines)
PART_BYTES = 32 << 20  # an uncompressed file larger than this is read in parts of about this size


class _ParseFile(beam.DoFn):
    def __init__(self, fields: LogFields):
        self.fields = fields
        self.lines_read = Metrics.counter("querycache", "lines_read")
        self.bytes_read = Metrics.counter("querycache", "bytes_read")

    def process(self, part: tuple[bytes, int, int | None]):
        """``part``: a path, and the byte range of the file whose lines to read (``None``: to its end). The
        path is bytes: a local file name need not be valid UTF-8, and bytes cross every coder."""
        path, start, end = part
        source = path.decode("utf-8", "surrogateescape")
        lines = counted = 0
        position = start
        ticker = Ticker(log, "read")
        try:
            raw = FileSystems.open(source, compression_type=CompressionTypes.UNCOMPRESSED)
        except Exception as err:  # noqa: BLE001 - gone or unreadable since it matched: one dead letter
            raw, lines = None, 1
            yield beam.pvalue.TaggedOutput(
                REJECTED, _in_part(rejection(source, 1, "unreadable_file", repr(err)), start)
            )
        if raw is not None:
            with raw, _opened(source, raw, start, end, self.fields) as (stream, header):
                for item in parse_tables(source, stream, self.fields, BATCH, header):
                    if type(item) is dict:
                        lines += 1
                        yield beam.pvalue.TaggedOutput(REJECTED, _in_part(item, start))
                        continue
                    lines += item.num_rows
                    now = raw.tell() if end is None else min(raw.tell(), end)  # of the file, compressed or not
                    ticker.add(done=now - position, items=lines - counted)
                    position, counted = now, lines
                    if start:
                        item = item.replace_schema_metadata(item.schema.metadata | {b"part": str(start).encode()})
                    yield item
        size = _size(source)
        end = size if end is None else end
        ticker.add(done=max(end - position, 0), items=lines - counted)
        where = f" (bytes {start:,} to {end:,})" if start or end < size else ""
        ticker.flush(logging.INFO, "read %d lines from %s%s", lines, printable_path(source), where)
        self.lines_read.inc(lines)
        self.bytes_read.inc(end - start)
        yield beam.pvalue.TaggedOutput(LINES, (printable_path(source), start, lines))


def _in_part(letter: dict, start: int) -> dict:
    """A dead letter of the part at ``start``: marked so :class:`FileLineNumbers` can number it in its file."""
    return letter | {"part": start} if start else letter


@contextlib.contextmanager
def _opened(source: str, raw: IO[bytes], start: int, end: int | None, fields: LogFields):
    """The bytes of ``raw`` to parse (decompressed, or the lines of the part ``start``-``end``) and, for a
    later part, the file's first line that it is parsed with (see :func:`records.parse_tables`)."""
    if not start and end is None:
        with decompressed(source, raw) as stream:
            yield stream, None
        return
    header = raw.readline() if start and format_of(source, fields.format) in ("csv", "tsv") else b""
    with io.BufferedReader(_Part(raw, start, end), BLOCK) as stream:
        yield stream, header if start else None


class _Part(io.RawIOBase):
    """The lines of the seekable file ``raw`` that start in its bytes ``[start, end)``.

    Each part of a file begins after the first line break at or after ``start - 1`` and goes on to the
    line break of the line under way at ``end``: every line belongs to exactly one part.
    """

    def __init__(self, raw: IO[bytes], start: int, end: int | None):
        super().__init__()
        self.raw, self.start, self.end = raw, start, end
        self.position: int | None = None  # not sought yet: a stream that cannot seek fails in the parse

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.position is None:
            self.raw.seek(max(self.start - 1, 0))
            if self.start:
                self.raw.readline()  # the line under way at ``start`` belongs to the part before
            self.position, self.last = self.raw.tell(), 10  # the last byte given: a break before the first
        view = memoryview(buffer).cast("B")
        if self.end is None or self.position < self.end:
            n = self.raw.readinto(view if self.end is None else view[: self.end - self.position])
        elif self.last != 10:  # the line under way at the end goes on to its break
            line = self.raw.readline(len(view))
            n = len(line)
            view[:n] = line
        else:
            return 0
        if n:
            self.position, self.last = self.position + n, view[n - 1]
        else:
            self.last = 10  # the end of the file ends the line under way
        return n


def _size(path: str) -> int:
    try:
        return FileSystems.match([path])[0].metadata_list[0].size_in_bytes
    except Exception:  # noqa: BLE001 - progress only: a file that cannot be stat'ed again counts 0 bytes
        return 0


UNMATCHED = "querycache: no readable file matches --logs"


def _match(pattern: str):
    """Files of ``pattern`` as this worker sees them; none is an error, never an empty build."""
    matched = [m for m in FileSystems.match([pattern])[0].metadata_list if m.size_in_bytes > 0]
    if not matched:
        raise FileNotFoundError(f"{UNMATCHED} {pattern} on this worker")
    return matched


def _parts(file: tuple[bytes, int], fields: LogFields, part_bytes: int) -> Iterator[tuple[bytes, int, int | None]]:
    """A file as ``(path, start, end)`` parts of about ``part_bytes``, to be read apart (the last to the
    file's end, ``None``); a file that is small, compressed or Parquet is one part."""
    path, size = file
    if size <= part_bytes or not splittable(path.decode("utf-8", "surrogateescape"), fields.format):
        yield path, 0, None
        return
    count = -(-size // part_bytes)
    bounds = [size * i // count for i in range(count)]
    yield from ((path, start, end) for start, end in zip(bounds, [*bounds[1:], None]))


def lines_read(parts):
    """The lines of each part (the ``lines`` output of :class:`ReadQueryLogs`), for a sum."""
    return parts | "LinesRead" >> beam.MapTuple(lambda source, start, lines: lines)


class FileLineNumbers(beam.PTransform):
    """``rejected | FileLineNumbers(lines)``: dead letters numbered by their line in the file.

    A dead letter of a later part of a split file is numbered from that part's start and marked with
    it (``"part"``); this adds the lines of the parts before it, as ``lines`` of :class:`ReadQueryLogs`
    counts them, and drops the mark. Other dead letters pass as they are.
    """

    def __init__(self, lines):
        super().__init__()
        self.lines = lines

    def expand(self, rejected):
        offsets = self.lines | "AllParts" >> beam.combiners.ToList() | "Offsets" >> beam.Map(_offsets)
        return rejected | "Renumber" >> beam.Map(_renumbered, AsSingleton(offsets))


def _offsets(parts: list[tuple[str, int, int]]) -> dict[tuple[str, int], int]:
    """``{(source, start): lines of the parts before it}`` for each part of each file."""
    before: dict[str, int] = {}
    offsets = {}
    for source, start, lines in sorted(parts):
        offsets[source, start] = before.get(source, 0)
        before[source] = offsets[source, start] + lines
    return offsets


def _renumbered(letter: dict, offsets: dict[tuple[str, int], int]) -> dict:
    if "part" not in letter:
        return letter
    letter = dict(letter)
    part = letter.pop("part")
    return letter | {"line": letter["line"] + offsets[letter["source"], part]}


class Truncations(beam.PTransform):
    """Dead letters -> ``{source: lines read before the cut}`` for each compressed file cut short."""

    def expand(self, rejected):
        return (
            rejected
            | "Truncated" >> beam.Filter(lambda r: r["reason"] == TRUNCATED)
            | "LinesBeforeCut" >> beam.Map(lambda r: {r["source"]: r["line"] - 1})
        )


class ReadQueryLogs(beam.PTransform):
    """Read every file matching ``patterns``; returns ``(records, rejected, lines)``.

        records, rejected, lines = p | ReadQueryLogs(["logs/*.jsonl.gz"], LogFields(query="q"))

    ``records`` holds Arrow tables of ``query, weight, user, line[, label]`` (``records.source_of``
    names their file); ``rejected`` holds dead-letter dicts; ``lines`` holds ``(source, start, lines)``
    for each part read. Compression is detected from the file extension.

    An uncompressed line-based file larger than ``PART_BYTES`` (32 MiB) is read in parts, spread over
    the workers; a part's lines are numbered from its start: :class:`FileLineNumbers` numbers their dead
    letters in the file.
    """

    def __init__(self, patterns: list[str], fields: LogFields):
        super().__init__()
        self.patterns, self.fields, self.part_bytes = patterns, fields, PART_BYTES

    def expand(self, pbegin):
        parsed = (
            pbegin
            | "Patterns" >> beam.Create(self.patterns)
            | "Match" >> beam.FlatMap(_match)
            | "Files" >> beam.Map(lambda m: (m.path.encode("utf-8", "surrogateescape"), m.size_in_bytes))
            | "Dedup" >> beam.Distinct()
            | "Parts" >> beam.FlatMap(_parts, self.fields, self.part_bytes)
            | "Spread" >> beam.Reshuffle()
            | "Parse" >> beam.ParDo(_ParseFile(self.fields)).with_outputs(REJECTED, LINES, main="records")
        )
        return parsed.records, parsed[REJECTED], parsed[LINES]

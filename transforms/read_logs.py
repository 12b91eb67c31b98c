"""ReadQueryLogs: files matching the patterns -> records, dead letters and per-file line counts."""

from __future__ import annotations

import logging

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from querycache.transforms.progress import Ticker
from querycache.transforms.records import TRUNCATED, LogFields, decompressed, parse_tables, printable_path, rejection

log = logging.getLogger(__name__)
REJECTED, LINES = "rejected", "lines"
BATCH = 4096  # records per table read line by line (a JSONL block's table holds ~1 MB of lines)


class _ParseFile(beam.DoFn):
    def __init__(self, fields: LogFields):
        self.fields = fields
        self.lines_read = Metrics.counter("querycache", "lines_read")
        self.bytes_read = Metrics.counter("querycache", "bytes_read")

    def process(self, path: bytes):
        """``path`` is bytes: a local file name need not be valid UTF-8, and bytes cross every coder."""
        source = path.decode("utf-8", "surrogateescape")
        lines = position = counted = 0
        ticker = Ticker(log, "read")
        try:
            raw = FileSystems.open(source, compression_type=CompressionTypes.UNCOMPRESSED)
        except Exception as err:  # noqa: BLE001 - gone or unreadable since it matched: one dead letter
            raw, lines = None, 1
            yield beam.pvalue.TaggedOutput(REJECTED, rejection(source, 1, "unreadable_file", repr(err)))
        if raw is not None:
            with raw, decompressed(source, raw) as stream:
                for item in parse_tables(source, stream, self.fields, BATCH):
                    if type(item) is dict:
                        lines += 1
                        yield beam.pvalue.TaggedOutput(REJECTED, item)
                        continue
                    lines += item.num_rows
                    now = raw.tell()  # bytes of the file, compressed or not
                    ticker.add(done=now - position, items=lines - counted)
                    position, counted = now, lines
                    yield item
        size = _size(source)
        ticker.add(done=size - position, items=lines - counted)
        ticker.flush(logging.INFO, "read %d lines from %s", lines, printable_path(source))
        self.lines_read.inc(lines)
        self.bytes_read.inc(size)
        yield beam.pvalue.TaggedOutput(LINES, lines)


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
    names their file); ``rejected`` holds dead-letter dicts; ``lines`` holds one line count per file. Compression is
    detected from the file extension.
    """

    def __init__(self, patterns: list[str], fields: LogFields):
        super().__init__()
        self.patterns, self.fields = patterns, fields

    def expand(self, pbegin):
        parsed = (
            pbegin
            | "Patterns" >> beam.Create(self.patterns)
            | "Match" >> beam.FlatMap(_match)
            | "Paths" >> beam.Map(lambda metadata: metadata.path.encode("utf-8", "surrogateescape"))
            | "Dedup" >> beam.Distinct()
            | "Parse" >> beam.ParDo(_ParseFile(self.fields)).with_outputs(REJECTED, LINES, main="records")
        )
        return parsed.records, parsed[REJECTED], parsed[LINES]

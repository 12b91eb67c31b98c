"""ReadQueryLogs: files matching the patterns -> records, dead letters and per-file line counts."""

from __future__ import annotations

import logging

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems

from transforms.records import LogFields, parse_stream

log = logging.getLogger(__name__)
REJECTED, LINES = "rejected", "lines"


class _ParseFile(beam.DoFn):
    def __init__(self, fields: LogFields):
        self.fields = fields

    def process(self, readable: fileio.ReadableFile):
        source = readable.metadata.path
        lines = 0
        with readable.open() as stream:
            for item in parse_stream(source, stream, self.fields):
                lines += 1
                if isinstance(item, dict):
                    yield beam.pvalue.TaggedOutput(REJECTED, item)
                else:
                    yield item
        log.info("read %d lines from %s", lines, source)
        yield beam.pvalue.TaggedOutput(LINES, lines)


UNMATCHED = "querycache: no readable file matches --logs"


def _match(pattern: str):
    """Files of ``pattern`` as this worker sees them; none is an error, never an empty build."""
    matched = [m for m in FileSystems.match([pattern])[0].metadata_list if m.size_in_bytes > 0]
    if not matched:
        raise FileNotFoundError(f"{UNMATCHED} {pattern} on this worker")
    return matched


class ReadQueryLogs(beam.PTransform):
    """Read every file matching ``patterns``; returns ``(records, rejected, lines)``.

        records, rejected, lines = p | ReadQueryLogs(["logs/*.jsonl.gz"], LogFields(query="q"))

    ``records`` holds ``(query, weight, user, source, line)``; ``rejected`` holds dead-letter dicts;
    ``lines`` holds one line count per file. Compression is detected from the file extension.
    """

    def __init__(self, patterns: list[str], fields: LogFields):
        super().__init__()
        self.patterns, self.fields = patterns, fields

    def expand(self, pbegin):
        parsed = (
            pbegin
            | "Patterns" >> beam.Create(self.patterns)
            | "Match" >> beam.FlatMap(_match)
            | "Paths" >> beam.Map(lambda metadata: metadata.path)
            | "Dedup" >> beam.Distinct()
            | "Open" >> fileio.ReadMatches()
            | "Parse" >> beam.ParDo(_ParseFile(self.fields)).with_outputs(REJECTED, LINES, main="records")
        )
        return parsed.records, parsed[REJECTED], parsed[LINES]

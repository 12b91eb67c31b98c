"""WriteSnapshot and WriteDeadLetters: parallel shard writers that report their files for the manifest."""

from __future__ import annotations

import hashlib
import json
import logging
import zlib
from pathlib import Path

import apache_beam as beam
from apache_beam.metrics import Metrics

from store.format import shard_of
from store.keys import key_bytes
from store.snapshot import Snapshot
from store.writer import write_shard
from transforms.progress import tick

log = logging.getLogger(__name__)


class WriteSnapshot(beam.PTransform):
    """``rows | WriteSnapshot(staging, shards=4, schema=...)`` -> one info dict per shard.

    Rows go to LMDB shards by a stable hash of the key (see ``store.format.shard_of``); every
    shard is written, even an empty one, so a reader can address all of them. A row whose value
    is None was reused: its value is copied here from ``previous``, so it never crosses a shuffle.
    """

    def __init__(self, directory: str, shards: int, schema: dict, previous: str | None = None):
        super().__init__()
        self.directory, self.shards, self.schema, self.previous = directory, shards, schema, previous

    def expand(self, rows):
        shards = self.shards
        every = rows.pipeline | "EveryShard" >> beam.Create([(i, None) for i in range(shards)])
        keyed = rows | "ByShard" >> beam.Map(lambda row: (shard_of(key_bytes(row[0]), shards), row))
        return (
            (keyed, every)
            | "AllShards" >> beam.Flatten()
            | "GroupShards" >> beam.GroupByKey()
            | "WriteShards" >> beam.MapTuple(self._write)
        )

    def _write(self, index: int, rows) -> dict:
        rows = [r for r in rows if r is not None]
        if self.previous and any(r[4] is None for r in rows):  # reused rows: copy the stored value
            with Snapshot.open(self.previous, verify=False) as previous:
                rows = [r if r[4] is not None else (*r[:4], previous.get_raw(r[0])) for r in rows]
        info = write_shard(self.directory, index, self.shards, rows, self.schema)
        Metrics.counter("querycache", "rows_written").inc(info["rows"])
        progress = tick("write", done=1, total=self.shards, items=info["rows"])
        log.info("wrote shard %d of %d: %d rows", index + 1, self.shards, info["rows"], extra=progress)
        return {"index": index, **info}


def _write_jsonl(directory: str, index: int, shards: int, records) -> dict:
    rel = f"rejected/rejected-{index:05d}-of-{shards:05d}.jsonl"
    path = Path(directory) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = sorted(records, key=lambda r: (r["source"], r["line"]))
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines).encode("utf-8")
    path.write_bytes(data)
    return {rel: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "rows": len(lines)}}


class WriteDeadLetters(beam.PTransform):
    """``rejected | WriteDeadLetters(staging)`` -> file info dicts of ``rejected/*.jsonl``."""

    def __init__(self, directory: str, shards: int = 4):
        super().__init__()
        self.directory, self.shards = directory, shards

    def expand(self, rejected):
        shards = self.shards
        return (
            rejected
            | "BySource" >> beam.Map(lambda r: (zlib.crc32(r["source"].encode("utf-8")) % shards, r))
            | "GroupFiles" >> beam.GroupByKey()
            | "WriteFiles" >> beam.MapTuple(lambda i, recs: _write_jsonl(self.directory, i, shards, recs))
        )

"""WriteSnapshot, WriteDeadLetters and CommitSnapshot: shard writes that survive retries, manifest last.

Every write goes through Beam's ``FileSystems``, so the snapshot directory may be local or on any
object store. Rows never cross the shuffle: each bundle streams its rows, as compact records, into
one spill file per shard (``spill/<shard>-<uuid>.rows``) and only the file names are grouped by
shard. A shard is then built from its spill files in a path unique to the attempt
(``attempts/<shard>-<uuid>/``: written there and hashed on a local disk, built in a temp directory
and hashed while it uploads on an object store) and reported as a :class:`ShardWrite`.
CommitSnapshot keeps one attempt per shard, moves its files into place, deletes every other attempt
and the spill files, and writes ``manifest.json`` last: a bundle that runs twice, or a worker that
dies half-way, leaves no mark.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import struct
import tempfile
import uuid
import zlib
from typing import NamedTuple

import apache_beam as beam
import lmdb
from apache_beam.io.filesystem import BeamIOError, CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from querycache.store import fs
from querycache.store.format import EMBED_DTYPES, MANIFEST, lmdb_shard_path, shard_of
from querycache.store.keys import key_bytes
from querycache.store.remote import SnapshotRef
from querycache.store.writer import complete_manifest, write_shard
from querycache.transforms.progress import tick

log = logging.getLogger(__name__)
ATTEMPTS, SPILL = "attempts", "spill"
SHARD_TARGET_BYTES = 128 << 20  # --shards auto: LMDB values of about 128 MiB per shard
RAW = CompressionTypes.UNCOMPRESSED


class ShardWrite(NamedTuple):
    """One attempt's shard: where its files were uploaded and their sizes and sha256."""

    index: int
    attempt: str
    rows: int
    files: dict


def shards_for(head_size: int, schema: dict, target: int = SHARD_TARGET_BYTES) -> int:
    """Shard count that keeps each shard's values near ``target`` bytes (``--shards auto``); at least 1."""
    if schema["encoding"] in EMBED_DTYPES:
        row = schema["dim"] * int(EMBED_DTYPES[schema["encoding"]][-1]) + 64
    else:
        row = 64 + 48 * (len(schema.get("labels") or []) or schema.get("top_k", 5))
    return max(1, math.ceil(head_size * row / target))


def upload(local: str, target: str) -> dict:
    """Copy a local file to any Beam filesystem, hashing while it streams: ``{"sha256", "bytes"}``."""
    digest, size = hashlib.sha256(), 0
    with open(local, "rb") as src, FileSystems.create(target, "application/octet-stream", RAW) as dst:
        while block := src.read(1 << 22):
            digest.update(block)
            dst.write(block)
            size += len(block)
    return {"sha256": digest.hexdigest(), "bytes": size}


def _download(source: str, target: str, meta: dict) -> None:
    digest = hashlib.sha256()
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with FileSystems.open(source, compression_type=RAW) as src, open(target, "wb") as dst:
        while block := src.read(1 << 22):
            digest.update(block)
            dst.write(block)
    if digest.hexdigest() != meta["sha256"]:
        raise OSError(f"{source}: sha256 mismatch against its manifest")


def _fill_reused(rows: list, previous: SnapshotRef, tmp: str) -> None:
    """Give reused rows (value None) their stored bytes, read from local copies of the previous LMDB shards."""
    shards = previous.manifest["lmdb"]["shards"]
    wanted: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        if row[4] is None:
            wanted.setdefault(shard_of(key_bytes(row[0]), shards), []).append(i)
    for shard, positions in sorted(wanted.items()):
        rel = f"{lmdb_shard_path(shard, shards)}/data.mdb"
        source = fs.join(previous.directory, rel)
        local = os.path.dirname(source) if not fs.is_remote(source) else os.path.join(tmp, "previous", str(shard))
        if fs.is_remote(source):
            _download(source, os.path.join(local, "data.mdb"), previous.manifest["files"][rel])
        env = lmdb.open(local, readonly=True, lock=False, subdir=True)
        try:
            with env.begin() as txn:
                for i in positions:
                    value = txn.get(key_bytes(rows[i][0]))
                    if value is None:
                        raise KeyError(f"{rows[i][0]!r} is not in {source}")
                    rows[i] = (*rows[i][:4], value)
        finally:
            env.close()


_HEAD = struct.Struct("<IqqqI")  # key bytes, count, users (-1: None), rank, value bytes (NO_VALUE: reused)
NO_VALUE = 0xFFFFFFFF


def spill_record(row: tuple) -> bytes:
    """One row ``(key, count, users, rank, value)`` as a compact record (value None: reused)."""
    key, count, users, rank, value = row
    key = key.encode("utf-8")
    size = NO_VALUE if value is None else len(value)
    return _HEAD.pack(len(key), count, -1 if users is None else users, rank, size) + key + (value or b"")


def read_spill(stream) -> list[tuple]:
    """The rows of one spill file, in the order they were written."""
    rows = []
    while head := stream.read(_HEAD.size):
        if len(head) < _HEAD.size:
            raise OSError("spill file ends inside a record")
        key_size, count, users, rank, size = _HEAD.unpack(head)
        key = stream.read(key_size).decode("utf-8")
        value = None if size == NO_VALUE else stream.read(size)
        rows.append((key, count, None if users < 0 else users, rank, value))
    return rows


class _SpillRows(beam.DoFn):
    """Stream each row to its shard's spill file for this bundle; emit ``(shard, spill path)`` at the end."""

    def __init__(self, directory: str):
        self.directory = directory

    def start_bundle(self):
        self._files: dict[int, tuple[str, object]] = {}

    def process(self, row, shards: int):
        shard = shard_of(key_bytes(row[0]), shards)
        entry = self._files.get(shard)
        if entry is None:
            path = fs.join(self.directory, SPILL, f"{shard:05d}-{uuid.uuid4().hex}.rows")
            entry = self._files[shard] = (path, FileSystems.create(path, "application/octet-stream", RAW))
        entry[1].write(spill_record(row))

    def finish_bundle(self):
        files, self._files = self._files, {}
        for shard, (path, stream) in sorted(files.items()):
            stream.close()
            yield WindowedValue((shard, path), MIN_TIMESTAMP, [GlobalWindow()])


class WriteSnapshot(beam.PTransform):
    """``(rows, more) | WriteSnapshot(directory, shard_count, schema, previous)`` -> a :class:`ShardWrite` per shard.

    Takes one PCollection of rows or several (spilled where each is made: no union is buffered).

    ``shard_count`` is a singleton PCollection (the count depends on the head). Rows go to shards by a
    stable hash of the key (``store.format.shard_of``); every shard is written, even an empty one. A
    row whose value is None was reused: its value is read here from ``previous``'s LMDB shard. Rows
    travel as spill files, so the shuffle carries file names only and a worker holds one copy of the
    rows of the shard it writes.
    """

    def __init__(self, directory: str, shard_count, schema: dict, previous: SnapshotRef | None = None):
        super().__init__()
        self.directory, self.shard_count, self.schema, self.previous = directory, shard_count, schema, previous

    def expand(self, rows):
        count = beam.pvalue.AsSingleton(self.shard_count)
        parts = rows if isinstance(rows, tuple | list) else [rows]
        spilled = [
            part | f"SpillRows{i}" >> beam.ParDo(_SpillRows(self.directory), count) for i, part in enumerate(parts)
        ]
        every = self.shard_count | "EveryShard" >> beam.FlatMap(lambda n: [(i, None) for i in range(n)])
        return (
            (*spilled, every)
            | "AllShards" >> beam.Flatten()
            | "GroupShards" >> beam.GroupByKey()
            | "WriteShards" >> beam.Map(lambda grouped, n: self._write(*grouped, n), count)
        )

    def _write(self, index: int, spills, shards: int) -> ShardWrite:
        rows = []
        for path in sorted(p for p in spills if p is not None):  # sorted: every attempt writes the same bytes
            with FileSystems.open(path, compression_type=RAW) as stream:
                rows += read_spill(stream)
        attempt = fs.join(self.directory, ATTEMPTS, f"{index:05d}-{uuid.uuid4().hex}")
        remote = fs.is_remote(attempt)
        with tempfile.TemporaryDirectory(prefix="querycache-shard-") as tmp:
            if self.previous is not None:
                _fill_reused(rows, self.previous, tmp)
            out = os.path.join(tmp, "out") if remote else attempt  # a local attempt is written in place
            info = write_shard(out, index, shards, rows, self.schema, checksums=not remote)
            del rows
            files = info["files"]
            if remote:
                files = {rel: upload(os.path.join(out, rel), fs.join(attempt, rel)) for rel in files}
        Metrics.counter("querycache", "rows_written").inc(info["rows"])
        progress = tick("write", done=1, total=shards, items=info["rows"])
        log.info("wrote shard %d of %d: %d rows", index + 1, shards, info["rows"], extra=progress)
        return ShardWrite(index, attempt, info["rows"], files)


def _write_jsonl(directory: str, index: int, shards: int, records) -> dict:
    # Records sorted by (source, line): every attempt writes the same bytes, in one object PUT.
    rel = f"rejected/rejected-{index:05d}-of-{shards:05d}.jsonl"
    lines = sorted(records, key=lambda r: (r["source"], r["line"]))
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines).encode("utf-8")
    with FileSystems.create(fs.join(directory, rel), "application/jsonl", RAW) as out:
        out.write(data)
    return {rel: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "rows": len(lines)}}


class WriteDeadLetters(beam.PTransform):
    """``rejected | WriteDeadLetters(directory)`` -> file info dicts of ``rejected/*.jsonl``."""

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


def commit(directory: str, manifest: dict, writes: list[ShardWrite], extra_files: dict) -> dict:
    """Keep one attempt per shard, move its files into place, drop the other attempts, write the manifest.

    Safe to run again after a failure part-way: files already in place are left as they are.
    """
    chosen: dict[int, ShardWrite] = {}
    for write in sorted(writes):
        chosen.setdefault(write.index, write)
    moves = [
        (fs.join(w.attempt, rel), fs.join(directory, rel))
        for w in chosen.values()
        for rel in w.files
        if FileSystems.exists(fs.join(w.attempt, rel))
    ]
    for target in {os.path.dirname(t) for _, t in moves if not fs.is_remote(t)}:
        os.makedirs(target, exist_ok=True)
    if moves:
        FileSystems.rename([s for s, _ in moves], [t for _, t in moves])
    for scratch in (fs.join(directory, ATTEMPTS), fs.join(directory, SPILL)):
        with contextlib.suppress(BeamIOError):  # nothing left to delete
            FileSystems.delete([scratch + ("/" if fs.is_remote(scratch) else "")])
    shards = [{"index": w.index, "rows": w.rows, "files": w.files} for w in chosen.values()]
    manifest = complete_manifest(manifest, shards, extra_files)
    with FileSystems.create(fs.join(directory, MANIFEST), "application/json", RAW) as out:
        out.write((json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    return manifest

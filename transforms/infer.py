"""ReuseOrInfer and RunBert: head rows -> rows with encoded results.

RunBert owns the lifecycle only: the engine (model, batching, post-processing) is loaded once per
worker process in ``setup`` through ``shared.Shared``, never pickled with the DoFn; rows are
buffered into large batches that the engine sorts by length and cuts by token budget.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils import shared
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from querycache.inference.engine import Engine
from querycache.store import fs
from querycache.store.format import encode_value
from querycache.store.remote import SnapshotRef
from querycache.transforms.model_stage import ShippedModel, stage
from querycache.transforms.progress import Ticker
from querycache.transforms.stats import sum_dicts

log = logging.getLogger(__name__)
REUSED, STATS, UNANSWERED = "reused", "stats", "unanswered"
_engines = shared.Shared()


class _SplitReused(beam.DoFn):
    """Head rows of a key: reused when the previous snapshot holds it, else on to inference."""

    def __init__(self):
        self.reused = Metrics.counter("querycache", "reused")

    def setup(self):
        self.ticker = Ticker(log, "infer")

    def process(self, element):
        _, joined = element
        for row in joined["head"]:
            if any(True for _ in joined["stored"]):  # no value in flight: WriteSnapshot copies it
                self.reused.inc()
                self.ticker.add(skipped=1)
                yield beam.pvalue.TaggedOutput(REUSED, (*row, None))
            else:
                yield row

    def finish_bundle(self):
        self.ticker.flush()


class _Reuse(beam.PTransform):
    """``head | _Reuse(previous)`` -> (to infer, reused): a join of head keys with the previous Parquet keys.

    Workers read the previous snapshot through its own filesystem (any Beam path), never a driver path.
    """

    def __init__(self, previous: SnapshotRef):
        super().__init__()
        self.previous = previous

    def expand(self, head):
        parts = [fs.join(self.previous.directory, rel) for rel in self.previous.manifest["parquet"]]
        stored = (
            head.pipeline
            | "PreviousParts" >> beam.Create(parts)
            | "PreviousKeys" >> beam.io.ReadAllFromParquet(columns=["key"])
            | "KeyOfStored" >> beam.Map(lambda record: (record["key"], True))
        )
        keyed = head | "KeyOfHead" >> beam.Map(lambda row: (row[0], row))
        split = (
            {"head": keyed, "stored": stored}
            | "JoinStored" >> beam.CoGroupByKey()
            | "Split" >> beam.ParDo(_SplitReused()).with_outputs(REUSED, main="infer")
        )
        return split.infer, split[REUSED]


class _EngineHolder:
    """Weak-referenceable box for ``shared.Shared``."""

    def __init__(self, engine: Engine):
        self.engine = engine


@contextlib.contextmanager
def share_engine(engine: Engine):
    """Offer the driver's loaded engine to RunBert in this process (in-process runners skip a reload)."""
    holder = _engines.acquire(lambda: _EngineHolder(engine), tag=engine.fingerprint)
    try:
        yield holder
    finally:
        del holder


class RunBert(beam.DoFn):
    """Run the engine over buffered rows; emit ``(key, count, users, rank, value)`` and stats dicts."""

    def __init__(self, model: ShippedModel, schema: dict, max_batch: int = 16384):
        self.model, self.fingerprint, self.schema, self.max_batch = model, model.fingerprint, schema, max_batch
        self.queries = Metrics.counter("querycache", "queries")
        self.tokens = Metrics.counter("querycache", "real_tokens")
        self.padded = Metrics.counter("querycache", "padded_tokens")
        self.batches = Metrics.counter("querycache", "batches")
        self.truncated = Metrics.counter("querycache", "truncated")
        self.latency = Metrics.distribution("querycache", "batch_latency_ms")

    def setup(self):
        start = time.perf_counter()
        self.engine = _engines.acquire(self._load, tag=self.fingerprint).engine
        if self.engine.fingerprint != self.fingerprint:
            raise RuntimeError(
                f"worker loaded model version {self.engine.fingerprint}, the build expects "
                f"{self.fingerprint}: the model files differ between driver and worker"
            )
        log.info("model ready in %.1fs (%s on %s)", time.perf_counter() - start, self.engine.dtype, self.engine.device)
        self.done, self.started, self.last_log = 0, time.perf_counter(), 0.0
        self.ticker = Ticker(log, "infer")

    def _load(self) -> _EngineHolder:
        return _EngineHolder(Engine(dataclasses.replace(self.model.config, model_dir=stage(self.model))))

    def start_bundle(self):
        self.buffer = []

    def process(self, row):
        self.buffer.append(row)
        if len(self.buffer) >= self.max_batch:
            yield from self._flush()

    def finish_bundle(self):
        for out in self._flush():
            if isinstance(out, beam.pvalue.TaggedOutput):
                yield beam.pvalue.TaggedOutput(out.tag, WindowedValue(out.value, MIN_TIMESTAMP, [GlobalWindow()]))
            else:
                yield WindowedValue(out, MIN_TIMESTAMP, [GlobalWindow()])

    def _flush(self):
        rows, self.buffer = self.buffer, []
        if not rows:
            return
        results, stats = self.engine.run([row[0] for row in rows], progress=lambda n: self.ticker.add(done=n))
        for row, result in zip(rows, results):
            if result is None:
                yield beam.pvalue.TaggedOutput(UNANSWERED, "mask_truncated")
            else:
                yield (*row, encode_value(result, self.schema))
        self._count(stats)
        yield beam.pvalue.TaggedOutput(
            STATS,
            {
                "queries": stats.queries,
                "tokens": stats.tokens,
                "padded_tokens": stats.padded_tokens,
                "batches": stats.batches,
                "truncated": stats.truncated,
                "seconds": stats.seconds,
            },
        )

    def _count(self, stats) -> None:
        self.queries.inc(stats.queries)
        self.tokens.inc(stats.tokens)
        self.padded.inc(stats.padded_tokens)
        self.batches.inc(stats.batches)
        self.truncated.inc(stats.truncated)
        self.latency.update(int(stats.seconds * 1000 / max(stats.batches, 1)))
        self.done += stats.queries
        now = time.perf_counter()
        if now - self.last_log > 10:
            self.last_log = now
            rate = self.done / (now - self.started)
            self.ticker.flush(logging.INFO, "inferred %d queries in this worker (%.0f queries/s)", self.done, rate)
        else:
            self.ticker.flush()


class ReuseOrInfer(beam.PTransform):
    """``head | ReuseOrInfer(model, schema, previous)`` -> ``(computed, reused, stats, unanswered)``.

    ``computed`` and ``reused`` are rows ``(key, count, users, rank, value)``, kept apart so that each
    reaches the writer in the stage that made it (a runner would otherwise buffer their union whole).

    With ``previous`` (a snapshot of the same model version) a stored key becomes a row with value None,
    which WriteSnapshot fills from ``previous``; the rest go through :class:`RunBert`.
    """

    def __init__(self, model: ShippedModel, schema: dict, previous: SnapshotRef | None = None):
        super().__init__()
        self.model, self.schema, self.previous = model, schema, previous

    def expand(self, head):
        to_infer, reused = head, head.pipeline | "NothingReused" >> beam.Create([])
        if self.previous:
            to_infer, reused = head | "Reuse" >> _Reuse(self.previous)
        inferred = (
            to_infer
            | "Spread" >> beam.Reshuffle()
            | "RunBert" >> beam.ParDo(RunBert(self.model, self.schema)).with_outputs(STATS, UNANSWERED, main="rows")
        )
        stats = inferred[STATS] | "InferenceStats" >> beam.CombineGlobally(sum_dicts)
        return inferred.rows, reused, stats, inferred[UNANSWERED]

"""Run a pipeline and say how it goes in log lines: submission, state changes, the job's own metrics.

    result = run_and_watch(pipeline)   # returns when the job is done; raises when it failed

The driver of a distributed runner cannot see its workers, only what the runner reports: the job's
state and the Beam metrics that the steps count (``querycache:lines_read``, ``bytes_read``,
``head_size``, ``queries``, ``reused``, ``rows_written``). Those are logged every ``every`` seconds
where the runner reports metrics of a running job (Dataflow), and once at the end on every runner.
"""

from __future__ import annotations

import logging
import threading
import time

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.runners.runner import PipelineResult, PipelineState

log = logging.getLogger(__name__)
LIVE_METRICS = {"DataflowPipelineResult"}  # results whose metrics() queries a running job


def run_and_watch(pipeline: beam.Pipeline, every: float = 30.0) -> PipelineResult:
    """``pipeline.run()``, then wait; log the state and metrics of a job that runs elsewhere."""
    runner = pipeline.options.view_as(StandardOptions).runner or "DirectRunner"
    started = time.perf_counter()
    log.info("running the pipeline on %s", runner)
    result = pipeline.run()
    if not PipelineState.is_terminal(result.state):
        log.info("job submitted to %s: %s", runner, result.state)
        stop = threading.Event()
        watcher = threading.Thread(target=_watch, args=(result, stop, every, started), daemon=True)
        watcher.start()
        try:
            result.wait_until_finish()
        finally:
            stop.set()
    log.info("pipeline done in %.1fs: %s", time.perf_counter() - started, describe(job_metrics(result)))
    return result


def _watch(result: PipelineResult, stop: threading.Event, every: float, started: float) -> None:
    state = None
    live = type(result).__name__ in LIVE_METRICS
    while not stop.wait(every):
        try:
            now = result.state
            if now != state:
                log.info("job state: %s", now)
                state = now
            if live:
                log.info("job progress after %.0fs: %s", time.perf_counter() - started, describe(job_metrics(result)))
        except Exception as err:  # noqa: BLE001 - a failed poll is reported, the job goes on
            log.info("job state unavailable: %s", err)


def job_metrics(result: PipelineResult) -> dict[str, int]:
    """The ``querycache`` counters and gauges of a job, by name (committed where the runner has them)."""
    try:
        found = result.metrics().query(MetricsFilter().with_namespace("querycache"))
    except Exception:  # noqa: BLE001 - some runners report no metrics
        return {}
    out: dict[str, int] = {}
    for kind in ("counters", "gauges"):
        for r in found.get(kind, []):
            value = r.committed if r.committed is not None else r.attempted
            value = getattr(value, "value", value)  # gauges report a GaugeResult
            if isinstance(value, int | float):
                out[r.key.metric.name] = out.get(r.key.metric.name, 0) + int(value)
    return out


def describe(m: dict[str, int]) -> str:
    """``read 1,234 lines (4,567,890 bytes); head 100; inferred 80 of 100 queries, 20 reused; wrote 100 rows``."""
    parts = []
    if "lines_read" in m:
        parts.append(f"read {m['lines_read']:,} lines ({m.get('bytes_read', 0):,} bytes)")
    if "head_size" in m:
        parts.append(f"head {m['head_size']:,}")
    if "queries" in m or "reused" in m:
        todo = f" of {m['head_size'] - m.get('reused', 0):,}" if "head_size" in m else ""
        parts.append(f"inferred {m.get('queries', 0):,}{todo} queries, {m.get('reused', 0):,} reused")
    if "rows_written" in m:
        parts.append(f"wrote {m['rows_written']:,} rows")
    return "; ".join(parts) or "no metrics reported yet"

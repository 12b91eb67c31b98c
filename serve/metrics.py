"""``GET /metrics`` of ``querycache serve``, in the Prometheus text format.

text-embeddings-inference's names where the meaning is the same, so dashboards made for it work:
``te_request_count``, ``te_request_success``, ``te_request_failure``, ``te_request_duration``,
``te_queue_duration``, ``te_inference_duration``, ``te_batch_next_size``, ``te_batch_next_tokens``,
``te_queue_size`` (as TEI writes them: counters without a ``_total`` suffix). querycache's own:
``querycache_lookups`` by task and result (hit, lru_hit, miss, invalid), the snapshot being served
and its age, reloads. Each histogram or counter has one writer thread (the event loop, or the
batcher's engine thread); a scrape reads them as they stand.
"""

from __future__ import annotations

import bisect
import datetime as dt
import time
from collections import Counter

SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKENS = (16, 64, 256, 1024, 4096, 16384, 65536)


class Histogram:
    """Cumulative buckets, sum and count of observed values."""

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for bound, count in zip([*map(str, self.buckets), "+Inf"], self.counts):
            total += count
            out.append(f'{self.name}_bucket{{le="{bound}"}} {total}')
        return [*out, f"{self.name}_sum {self.sum}", f"{self.name}_count {total}"]


def _family(name: str, kind: str, help_text: str, samples: dict[str, float]) -> list[str]:
    """One metric family: ``samples`` maps a label set (``'method="embed"'``, or ``""``) to a value."""
    rows = [f"{name}{{{labels}}} {value}" if labels else f"{name} {value}" for labels, value in samples.items()]
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *rows]


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """The server's counters and histograms; ``render(state)`` adds what the cache and batcher hold now."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.successes: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.request_duration = Histogram("te_request_duration", "Request duration in seconds", SECONDS)
        self.queue_duration = Histogram("te_queue_duration", "Seconds misses waited for a round", SECONDS)
        self.inference_duration = Histogram("te_inference_duration", "Seconds of one engine round", SECONDS)
        self.batch_size = Histogram("te_batch_next_size", "Distinct queries of one engine round", SIZES)
        self.batch_tokens = Histogram("te_batch_next_tokens", "Tokens of one engine round", TOKENS)

    def request(self, method: str, started: float, error_type: str | None) -> None:
        """Count a finished request of route ``method``; ``error_type`` None for a success."""
        self.requests[method] += 1
        if error_type is None:
            self.successes[method] += 1
        else:
            self.failures[error_type.lower()] += 1
        self.request_duration.observe(time.perf_counter() - started)

    def round(self, queries: int, tokens: int, seconds: float, waits: list[float]) -> None:
        """Count an engine round (on the batcher's thread)."""
        self.batch_size.observe(queries)
        self.batch_tokens.observe(tokens)
        self.inference_duration.observe(seconds)
        for wait in waits:
            self.queue_duration.observe(wait)

    def render(self, cache: dict, task: str, queue_size: int) -> str:
        """The exposition text; ``cache`` is ``ReadThroughCache.metrics()``."""
        method = {f'method="{m}"': n for m, n in self.requests.items()}
        success = {f'method="{m}"': n for m, n in self.successes.items()}
        failure = {f'err="{e}"': n for e, n in self.failures.items()}
        lookups = {
            f'task="{task}",result="{result}"': cache[name]
            for result, name in (("hit", "hits"), ("lru_hit", "lru_hits"), ("miss", "misses"), ("invalid", "invalid"))
        }
        snapshot = cache["snapshot_id"]
        lines = [
            *_family("te_request_count", "counter", "Requests received", method),
            *_family("te_request_success", "counter", "Requests answered", success),
            *_family("te_request_failure", "counter", "Requests refused, by error type", failure),
            *self.request_duration.lines(),
            *self.queue_duration.lines(),
            *self.inference_duration.lines(),
            *self.batch_size.lines(),
            *self.batch_tokens.lines(),
            *_family("te_queue_size", "gauge", "Requests waiting for an engine round", {"": queue_size}),
            *_family("querycache_lookups", "counter", "Lookups by task and result", lookups),
            *_family(
                "querycache_fallback_queries", "counter", "Keys sent to the model", {"": cache["fallback_queries"]}
            ),
            *_family("querycache_reloads", "counter", "Snapshots switched to", {"": cache["reloads"]}),
            *_family(
                "querycache_snapshot_info",
                "gauge",
                "The snapshot being served (1), and whether its answers are used",
                {f'snapshot_id="{_label(snapshot)}",in_use="{str(cache["snapshot_in_use"]).lower()}"': 1}
                if snapshot
                else {},
            ),
        ]
        stamp = cache["snapshot_created"]
        if stamp:
            age = time.time() - dt.datetime.fromisoformat(stamp).timestamp()
            lines += _family("querycache_snapshot_age_seconds", "gauge", "Age of the snapshot served", {"": age})
        return "\n".join(lines) + "\n"

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
from collections.abc import Mapping
from pathlib import Path

from querycache.serve.slots import Slots, read_all

SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
GAUGES = ("te_queue_size",)  # summed over running workers only
TOKENS = (16, 64, 256, 1024, 4096, 16384, 65536)


class Histogram:
    """Buckets, sum and count of observed values, kept in ``slots`` under the exposition's names."""

    def __init__(self, slots: Slots, name: str, help_text: str, buckets: tuple[float, ...]):
        self.slots, self.name, self.help, self.buckets = slots, name, help_text, buckets
        self._names = [f'{name}_bucket{{le="{bound}"}}' for bound in [*map(str, buckets), "+Inf"]]
        self._sum = f"{name}_sum"

    def observe(self, value: float) -> None:
        self.slots.add(self._names[bisect.bisect_left(self.buckets, value)])
        self.slots.add(self._sum, value)

    def lines(self, values: Mapping[str, float]) -> list[str]:
        """Its exposition from ``values`` (its slots, or every worker's summed); buckets cumulative."""
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for name in self._names:
            total += int(values.get(name, 0))
            out.append(f"{name} {total}")
        return [*out, f"{self._sum} {values.get(self._sum, 0.0)}", f"{self.name}_count {total}"]


def _family(name: str, kind: str, help_text: str, value: float) -> list[str]:
    """A metric family of one sample without labels."""
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {_number(value)}"]


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """The server's counters and histograms; ``render(state)`` adds what the cache and batcher hold now.

    They live in ``slots``; with ``directory`` (``--workers``: each worker's slots file, the read-through
    cache's counters in it too) a scrape answers the sum of every worker's.
    """

    def __init__(self, slots: Slots | None = None, directory: str | Path | None = None) -> None:
        self.slots = slots if slots is not None else Slots()
        self.directory = directory
        self.request_duration = Histogram(self.slots, "te_request_duration", "Request duration in seconds", SECONDS)
        self.queue_duration = Histogram(self.slots, "te_queue_duration", "Seconds misses waited for a round", SECONDS)
        self.inference_duration = Histogram(self.slots, "te_inference_duration", "Seconds of one engine round", SECONDS)
        self.batch_size = Histogram(self.slots, "te_batch_next_size", "Distinct queries of one engine round", SIZES)
        self.batch_tokens = Histogram(self.slots, "te_batch_next_tokens", "Tokens of one engine round", TOKENS)

    def request(self, method: str, started: float, error_type: str | None) -> None:
        """Count a finished request of route ``method``; ``error_type`` None for a success."""
        add = self.slots.add
        add(f'te_request_count{{method="{method}"}}')
        if error_type is None:
            add(f'te_request_success{{method="{method}"}}')
        else:
            add(f'te_request_failure{{err="{error_type.lower()}"}}')
        self.request_duration.observe(time.perf_counter() - started)

    def round(self, queries: int, tokens: int, seconds: float, waits: list[float], queued: int = 0) -> None:
        """Count an engine round (on the batcher's thread); ``queued`` requests wait for the next."""
        self.batch_size.observe(queries)
        self.batch_tokens.observe(tokens)
        self.inference_duration.observe(seconds)
        for wait in waits:
            self.queue_duration.observe(wait)
        self.slots["te_queue_size"] = queued

    def render(self, cache: dict, task: str, queue_size: int) -> str:
        """The exposition text; ``cache`` is ``ReadThroughCache.metrics()``, ``queue_size`` this process's."""
        self.slots["te_queue_size"] = queue_size
        values = read_all(self.directory, GAUGES) if self.directory else Counter({**cache, **self.slots})

        def labelled(name: str, help_text: str) -> list[str]:
            rows = [f"{n} {_number(v)}" for n, v in sorted(values.items()) if n.startswith(f"{name}{{")]
            return [f"# HELP {name} {help_text}", f"# TYPE {name} counter", *rows]

        lookups = [
            f'querycache_lookups{{task="{task}",result="{result}"}} {_number(values[name])}'
            for result, name in (("hit", "hits"), ("lru_hit", "lru_hits"), ("miss", "misses"), ("invalid", "invalid"))
        ]
        snapshot = cache["snapshot_id"]
        in_use = str(cache["snapshot_in_use"]).lower()
        lines = [
            *labelled("te_request_count", "Requests received"),
            *labelled("te_request_success", "Requests answered"),
            *labelled("te_request_failure", "Requests refused, by error type"),
            *self.request_duration.lines(values),
            *self.queue_duration.lines(values),
            *self.inference_duration.lines(values),
            *self.batch_size.lines(values),
            *self.batch_tokens.lines(values),
            *_family("te_queue_size", "gauge", "Requests waiting for an engine round", values["te_queue_size"]),
            "# HELP querycache_lookups Lookups by task and result",
            "# TYPE querycache_lookups counter",
            *lookups,
            *_family("querycache_fallback_queries", "counter", "Keys sent to the model", values["fallback_queries"]),
            *_family("querycache_reloads", "counter", "Snapshots switched to", values["reloads"]),
            "# HELP querycache_snapshot_info The snapshot being served (1), and whether its answers are used",
            "# TYPE querycache_snapshot_info gauge",
            *(
                [f'querycache_snapshot_info{{snapshot_id="{_label(snapshot)}",in_use="{in_use}"}} 1']
                if snapshot
                else []
            ),
        ]
        stamp = cache["snapshot_created"]
        if stamp:
            age = time.time() - dt.datetime.fromisoformat(stamp).timestamp()
            lines += _family("querycache_snapshot_age_seconds", "gauge", "Age of the snapshot served", age)
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))

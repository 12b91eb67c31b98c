"""Numbers and facts in words people scan: counts, shares, durations, sizes, the fidelity sentence, tables.

    from querycache.runners import human
    human.count(12345)                  # '12,345'
    human.percent(0.99950025)           # '99.95%'
    human.seconds(754.2)                # '12 min 34 s'
    human.table([["a", 1]], ["name", "rows"], align="lr")

Every function returns plain text (no colour, no control characters), so a view renders the same
in a terminal, a pipe and a test. Commands print these; ``--json`` never goes through here.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.filesize import decimal
from rich.table import Table

DASH = "\N{EM DASH}"


def count(n: float | None) -> str:
    """``12,345``; None as ``-``."""
    return "-" if n is None else f"{n:,.0f}"


def percent(share: float | None) -> str:
    """A share as a percent with one decimal, more where one would round a non-zero share to 0% or 100%."""
    if share is None:
        return "-"
    for digits in range(1, 5):
        text = f"{100 * share:.{digits}f}%"
        if share in (0, 1) or text not in (f"{0:.{digits}f}%", f"{100:.{digits}f}%"):
            return text
    return "<0.0001%" if share < 0.5 else ">99.9999%"


def seconds(s: float | None) -> str:
    """A duration with sensible precision: ``0.042 s``, ``3.4 s``, ``42 s``, ``12 min 34 s``, ``2 h 05 min``."""
    if s is None or math.isnan(s):
        return "-"
    if s < 1:
        return f"{s:.3f} s" if s < 0.1 else f"{s:.2f} s"
    if s < 10:
        return f"{s:.1f} s"
    if s < 60:
        return f"{s:.0f} s"
    minutes, secs = divmod(round(s), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def size(n: int | None) -> str:
    """Bytes in decimal units: ``4.5 MB``."""
    return "-" if n is None else decimal(n)


def rate(per_second: float | None, unit: str) -> str:
    """``2,134 queries/s``; slow rates keep a decimal: ``0.4 queries/s``."""
    if not per_second:
        return f"- {unit}/s"
    return f"{per_second:,.0f} {unit}/s" if per_second >= 10 else f"{per_second:.1f} {unit}/s"


def by_count(counts: Mapping[str, int], none: str = "none") -> str:
    """``malformed_json 30, too_long 4``: largest first, then by name."""
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{k} {count(v)}" for k, v in items) or none


def truncated(files: Mapping[str, int]) -> str:
    """``logs/a.jsonl.gz after 49,945 lines``: compressed files cut short and the lines read before each cut."""
    return ", ".join(f"{path} after {count(lines)} lines" for path, lines in sorted(files.items()))


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 shard``, ``4 shards``, ``2 queries`` (with ``many="queries"``)."""
    return f"{count(n)} {word if n == 1 else many or word + 's'}"


def selection(sel: Mapping[str, Any] | None) -> str:
    """The head selection of a manifest in words: ``top 10,000 (ties at count 37 by key order)``."""
    if not sel:
        return "-"
    mode, value, threshold = sel.get("mode"), sel.get("value"), sel.get("threshold")
    if mode == "top_k":
        text = f"top {count(value)}"
    elif mode == "coverage":
        text = f"fewest queries covering {percent(value)} of traffic"
    else:
        text = "queries seen at least " + ("once" if value == 1 else f"{count(value)} times")
    if threshold is None:
        return text + " (empty head)"
    if sel.get("take_at_threshold") is not None:
        return text + f" (ties at count {count(threshold)} by key order)"
    return text if mode == "min_count" else text + f" (lowest count {count(threshold)})"


def fidelity(f: Mapping[str, Any] | None, computed: int | None = None) -> str:
    """The fidelity gate as a sentence: ``bf16 vs fp32 on 256 queries: min cosine 0.99993, mean 0.99996 — passed``."""
    if not f:
        return "not recorded"
    if not f.get("sample"):
        return "not checked: every result was reused" if computed == 0 else "not checked (--fidelity-sample 0)"
    if "min_cosine" in f:
        figures = f"min cosine {f['min_cosine']:.5f}, mean {f['mean_cosine']:.5f}"
    elif "top1_agreement" in f:
        figures = f"top-1 agreement {percent(f['top1_agreement'])}"
    else:
        figures = f"max probability difference {f.get('max_abs_prob_diff', 0):.5f}"
    verdict = "passed" if f.get("passed") else "FAILED"
    sample = plural(f["sample"], "query", "queries")
    return f"{f.get('dtype', '?')} vs {f.get('reference', 'fp32')} on {sample}: {figures} {DASH} {verdict}"


def table(rows: Iterable[Sequence[Any]], columns: Sequence[str], align: str = "") -> str:
    """Rows under a header, columns padded (``align``: one of l/r per column, default left); no borders."""
    grid = Table(box=None, pad_edge=False, header_style="", expand=False)
    for i, name in enumerate(columns):
        grid.add_column(name, justify="right" if align[i : i + 1] == "r" else "left", no_wrap=True)
    for row in rows:
        grid.add_row(*("" if cell is None else str(cell) for cell in row))
    out = io.StringIO()
    Console(file=out, width=10_000, color_system=None, force_terminal=False, highlight=False).print(grid)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines() if line.strip())


def fields(pairs: Iterable[tuple[str, Any]]) -> str:
    """``name   value`` lines with the names padded to one column; None values are left out."""
    kept = [(name, value) for name, value in pairs if value is not None]
    width = max((len(name) for name, _ in kept), default=0)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in kept)

"""What the commands print for a person: the build summary, ``inspect``, ``list``, ``lookup``, ``model-info``.

    click.echo(views.build_summary(summary, manifest))

Each view takes the same dicts that ``--json`` prints and returns text built with :mod:`runners.human`.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from typing import Any

import numpy as np

from querycache.runners import human


def _created(iso: str) -> str:
    try:
        return dt.datetime.fromisoformat(iso).astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (TypeError, ValueError):
        return str(iso)


def _share(part: int, whole: int) -> str:
    return human.percent(part / whole) if whole else "-"


def _figures(s: dict, selection: dict | None, reused_from: str | None) -> list[tuple[str, str]]:
    """The log and head figures that a build summary and ``inspect`` share (keys of the build summary)."""
    rejected = f"{human.count(s['rejected'])} rejected"
    if s["rejected"]:
        rejected += f" ({human.by_count(s['rejected_by_reason'])})"
    dropped = sum(s["dropped_for_privacy"].values())
    drops = human.count(dropped) + (f" ({human.by_count(s['dropped_for_privacy'])})" if dropped else "")
    head = human.plural(s["head_size"], "query", "queries")
    head += f" covering {human.percent(s['traffic_covered'])} of traffic"
    results = f"{human.count(s['computed'])} computed"
    if s["computed"]:
        results += f" at {human.rate(s['inference_queries_per_second'], 'queries')}"
    results += f", {human.count(s['reused'])} reused" + (f" from {reused_from}" if reused_from and s["reused"] else "")
    truncated = s.get("truncated_files")  # absent from manifests written before it was recorded
    return [
        ("lines read", f"{human.count(s['lines_read'])}: {human.count(s['accepted'])} accepted "
         f"({_share(s['accepted'], s['lines_read'])}), {rejected}"),
        *([("cut short", human.truncated(truncated) + ": compressed files without their end marker")]
          if truncated else []),
        ("distinct queries", human.count(s["distinct_queries"])),
        ("head", head + (f": {human.selection(selection)}" if selection else "")),
        ("privacy drops", drops),
        ("results", results),
    ]  # fmt: skip


def build_summary(summary: dict, manifest: dict | None = None) -> str:
    """The end of ``querycache build``: what was read, kept, computed and checked, in words and percents."""
    manifest = manifest or {}
    model = manifest.get("model", {})
    facts = _figures(summary, manifest.get("selection"), manifest.get("reused_from"))
    facts += [
        ("fidelity", human.fidelity(summary.get("fidelity"), summary["computed"])),
        ("model", " ".join(x for x in (summary["model_fingerprint"][:12], _model_words(model)) if x)),
    ]
    if summary.get("peak_rss_mib"):
        facts.append(("peak memory", f"{summary['peak_rss_mib']['driver']:,} MiB in this process"))
    head = f"Published snapshot {summary['snapshot_id']} in {human.seconds(summary['seconds'])}"
    return head + "\n" + _indent(human.fields(facts))


def _model_words(model: dict) -> str:
    words = [model.get(k) for k in ("task", "dtype", "device") if model.get(k)]
    return f"({', '.join(words)})" if words else ""


def _result_words(task: str, result: dict) -> str:
    if task == "embed":
        return f"{result.get('dim')}-d vectors stored as {result.get('encoding')}"
    if task == "classify":
        return f"labels {', '.join(result.get('labels', []))}"
    return f"top {result.get('top_k')} tokens per mask"


def inspect(manifest: dict, current: bool | None = None) -> str:
    """``querycache inspect``: the manifest in words."""
    model, stats = manifest["model"], manifest.get("stats")
    facts: list[tuple[str, Any]] = [
        ("snapshot", manifest["snapshot_id"] + (" (current)" if current else "")),
        ("created", _created(manifest["created"])),
        ("task", f"{manifest['task']}: {_result_words(manifest['task'], manifest['result'])}"),
        ("model", " ".join(x for x in (model.get("architecture"), _model_words(model)) if x)),
        ("fingerprint", model["fingerprint"]),
        ("model dir", model.get("model_dir")),
        ("key function", f"{manifest['key_function']['name']} v{manifest['key_function']['version']}"),
        ("rows", f"{human.count(manifest['rows'])} in {human.plural(manifest['lmdb']['shards'], 'shard')}"),
    ]
    if stats:
        inference = stats.get("inference") or {}
        figures = stats | {"inference_queries_per_second": inference.get("queries_per_second", 0.0)}
        facts += _figures(figures, manifest.get("selection"), manifest.get("reused_from"))
    if "fidelity" in manifest:
        facts.append(("fidelity", human.fidelity(manifest["fidelity"], stats and stats.get("computed"))))
    return human.fields(facts)


def snapshot_table(snapshots: Iterable[dict]) -> str:
    """``querycache list``: one row per snapshot, oldest first, ``*`` on the current one."""
    rows = []
    for s in snapshots:
        mark = "*" if s["current"] else ""
        if s["ok"]:
            created, rows_ = _created(s["created"]), human.count(s["rows"])
            rows.append([mark, s["id"], created, rows_, s["task"], s["fingerprint"][:12]])
        else:
            rows.append([mark, s["id"], "", "", "unreadable", s["error"]])
    if not rows:
        return "no snapshots"
    return human.table(rows, ["", "snapshot", "created", "rows", "task", "model"], align="lllrll")


def lookup_line(query: str, key: str, result: Any) -> str:
    """``querycache lookup``: ``hit  "Hotels in ROME" -> hotels in rome  384-d, norm 1.000, [0.0123, …]``."""
    quoted = json.dumps(query, ensure_ascii=False)
    if not key:
        return f"miss  {quoted} -> empty key, not a query"
    if result is None:
        return f"miss  {quoted} -> {key}"
    return f"hit   {quoted} -> {key}  {compact(result)}"


def compact(result: Any, shown: int = 4) -> str:
    """A result in one short line: an embedding's size, norm and first values; top tokens; top labels."""
    if isinstance(result, np.ndarray):
        head = ", ".join(f"{x:.4f}" for x in result[:shown].tolist())
        more = ", \N{HORIZONTAL ELLIPSIS}" if result.size > shown else ""
        return f"{result.size}-d, norm {float(np.linalg.norm(result.astype(np.float64))):.3f}, [{head}{more}]"
    if isinstance(result, dict) and "scores" in result:
        ranked = sorted(result["scores"].items(), key=lambda kv: -kv[1])[:3]
        return ", ".join(f"{label} {p:.3f}" for label, p in ranked)
    if isinstance(result, list):  # fill-mask: predictions per mask position
        masks = [", ".join(f"{p['token']} {p['score']:.3f}" for p in position[:3]) for position in result]
        return " | ".join(masks) if len(masks) > 1 else (masks[0] if masks else "no predictions")
    return json.dumps(result, ensure_ascii=False, default=str)


def model_info(info: dict) -> str:
    """``querycache model-info``: one line per task, with what it would run and its fingerprint."""
    lines = [f"model  {info['model_dir']}"]
    for task, t in info["tasks"].items():
        if t["ok"]:
            settings = ", ".join(f"{k} {v}" for k, v in t["settings"].items() if k != "task")
            lines.append(f"  {task:<10} ok  fingerprint {t['fingerprint'][:12]}  {settings}")
        else:
            lines.append(f"  {task:<10} no  {t['error']}")
    return "\n".join(lines)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())

"""The replay report: one self-contained HTML page from a replay's figures.

    html = render_report(figures)      # figures: what pipelines.replay.replay returns
    Path("replay.html").write_text(html, "utf-8")

No network: the style is inline and the plot is an inline SVG drawn by matplotlib (text as paths,
no fonts, no metadata links). Every string from the logs or the manifest is HTML-escaped.
"""

from __future__ import annotations

import html
import io
import re

_STYLE = """
body { margin: 0; background: #f6f7f9; color: #1d2330; font: 16px/1.5 system-ui, -apple-system, "Segoe UI",
       Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 980px; margin: 0 auto; padding: 24px 20px 48px; }
h1 { font-size: 1.7rem; margin: 0 0 4px; } h2 { font-size: 1.2rem; margin: 32px 0 8px; }
.lede { color: #4a5263; margin: 0 0 20px; }
code { font-size: 0.9em; background: #e8ebf0; padding: 1px 5px; border-radius: 4px; overflow-wrap: anywhere; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(200px, 1fr)); gap: 12px; }
.card { background: #fff; border: 1px solid #dde1e8; border-radius: 8px; padding: 14px 16px; }
.big { font-size: 2rem; font-weight: 700; color: #1f5fbf; } .card p { margin: 2px 0 0; color: #4a5263; }
figure { margin: 0; background: #fff; border: 1px solid #dde1e8; border-radius: 8px; padding: 8px; }
figure svg { width: 100%; height: auto; display: block; } figcaption { color: #4a5263; padding: 4px 8px; }
table { border-collapse: collapse; width: 100%; background: #fff; border: 1px solid #dde1e8; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid #eceff3; overflow-wrap: anywhere; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 4px 16px; background: #fff;
     border: 1px solid #dde1e8; border-radius: 8px; padding: 12px 16px; margin: 0; }
dt { color: #4a5263; } dd { margin: 0; overflow-wrap: anywhere; }
"""


def _e(value) -> str:
    return html.escape(str(value))


def _pct(part: float) -> str:
    return f"{100 * part:.1f}%"


def _n(value: int) -> str:
    return f"{value:,}"


def plot_svg(figures: dict) -> str:
    """Both hit-rate curves against head size (log scale), the snapshot's size marked, as inline SVG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, PercentFormatter

    fig = Figure(figsize=(9, 4.2))
    ax = fig.add_subplot()
    for name, label, style in [
        ("hindsight_curve", "best possible head (held-out top N)", {"color": "#9aa3b2", "linestyle": "--"}),
        ("curve", "this snapshot's first N rows", {"color": "#1f5fbf", "linewidth": 2.2}),
    ]:
        points = [p for p in figures[name] if p["head_size"] > 0]
        ax.plot([p["head_size"] for p in points], [p["traffic_hit_rate"] for p in points], marker="o", ms=3.5,
                label=label, **style)  # fmt: skip
    rows = figures["snapshot"]["rows"]
    if rows > 0:
        ax.axvline(rows, color="#c2410c", linewidth=1.2)
        ax.annotate(f"snapshot: {rows:,} rows", (rows, 0.03), xytext=(-6, 0), textcoords="offset points",
                    ha="right", color="#c2410c")  # fmt: skip
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
    ax.set_ylim(0, 1)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("head size (queries, log scale)")
    ax.set_ylabel("held-out traffic answered")
    ax.grid(True, which="major", color="#e3e6eb")
    ax.legend(loc="upper left", frameon=False)
    fig.tight_layout()
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg") :]
    return re.sub(r'\s+xmlns(:xlink)?="[^"]*"', "", svg)  # namespaces are implied inside HTML


def _cards(f: dict) -> str:
    saved = f["compute_saved"]
    seconds = "unknown cost" if saved["seconds"] is None else f"{saved['seconds']:,.1f} s"
    drift = f["drift"]["heldout_top_1pct"]
    cards = [
        (_pct(f["traffic_hit_rate"]), f"of held-out traffic answered ({_n(f['hit_traffic'])} of {_n(f['traffic'])})"),
        (_pct(f["unique_hit_rate"]), f"of distinct queries hit ({_n(f['distinct_hits'])} of "
                                     f"{_n(f['distinct_queries'])})"),
        (seconds, f"of inference saved, {_pct(saved['share'])} of answering all traffic with the model"),
        (_pct(drift["share"]), f"of the held-out top 1% missed ({drift['missed']} of {drift['queries']})"),
    ]  # fmt: skip
    return "".join(f'<div class="card"><div class="big">{_e(a)}</div><p>{_e(b)}</p></div>' for a, b in cards)


def _misses(f: dict) -> str:
    if not f["top_misses"]:
        return "<p>No held-out query outside the snapshot passed the privacy filters.</p>"
    rows = "".join(
        f'<tr><td class="n">{i}</td><td>{_e(m["key"])}</td><td class="n">{_n(m["count"])}</td>'
        f'<td class="n">{_pct(m["count"] / f["traffic"])}</td></tr>'
        for i, m in enumerate(f["top_misses"], 1)
    )
    head = '<tr><th class="n">#</th><th>query key</th><th class="n">count</th><th class="n">of traffic</th></tr>'
    return f"<table><thead>{head}</thead><tbody>{rows}</tbody></table>"


def _drift(f: dict) -> str:
    d = f["drift"]
    rows = [
        ("held-out top 1% of queries missed by the snapshot", d["heldout_top_1pct"], "missed"),
        ("held-out top 1,000 queries missed by the snapshot", d["heldout_top_1000"], "missed"),
        ("snapshot's top 1,000 rows absent from the held-out logs", d["snapshot_top_1000"], "absent"),
    ]
    body = "".join(
        f'<tr><td>{_e(what)}</td><td class="n">{_n(part[key])} of {_n(part["queries"])}</td>'
        f'<td class="n">{_pct(part["share"])}</td></tr>'
        for what, part, key in rows
    )
    head = '<tr><th>measure</th><th class="n">queries</th><th class="n">share</th></tr>'
    return f"<table><thead>{head}</thead><tbody>{body}</tbody></table>"


def _facts(f: dict) -> str:
    s, model = f["snapshot"], f["snapshot"]["model"]
    selection = " ".join(f"{k}={v}" for k, v in s["selection"].items()) or "unknown"
    privacy = f["privacy"]
    items = {
        "snapshot": s["id"], "created": s["created"], "task": s["task"], "rows": _n(s["rows"]),
        "model": f"{model.get('architecture') or ''} {model.get('dtype') or ''} {model.get('model_dir') or ''}".strip(),
        "fingerprint": model.get("fingerprint"), "selection": selection,
        "cost per query": "unknown" if f["compute_saved"]["seconds_per_query"] is None
        else f"{1000 * f['compute_saved']['seconds_per_query']:.2f} ms (measured by the build)",
        "lines read": f"{_n(f['lines_read'])} = accepted {_n(f['accepted'])} + rejected {_n(f['rejected'])}",
        "rejected by reason": ", ".join(f"{k} {v}" for k, v in sorted(f["rejected_by_reason"].items())) or "none",
        "misses screened": f"PII scrub {'on' if privacy['scrub_pii'] else 'off'}, "
        f"min users {privacy['min_users'] or 'off'}",
    }  # fmt: skip
    return "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items.items()) + "</dl>"


def render_report(figures: dict) -> str:
    """One HTML page: headline rates, both curves, misses, drift, compute saved and the snapshot's facts."""
    f = figures
    title = f"querycache replay: snapshot {f['snapshot_id']}"
    last = f["hindsight_curve"][-1]["traffic_hit_rate"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title><style>{_STYLE}</style></head>
<body><main>
<h1>How much does snapshot <code>{_e(f["snapshot_id"])}</code> save?</h1>
<p class="lede">{_n(f["lines_read"])} held-out log lines replayed against its {_n(f["snapshot"]["rows"])} rows
in {f.get("seconds", 0):.1f} s.</p>
<section class="cards">{_cards(f)}</section>
<h2>Hit rate by head size</h2>
<figure>{plot_svg(f)}<figcaption>Share of held-out traffic answered by the snapshot's first N rows (blue) and
by the best possible head of N queries, the held-out logs' own top N (grey, dashed). At the snapshot's size the
gap is {_pct(last - f["traffic_hit_rate"])}: what better prediction of tomorrow could still win.</figcaption></figure>
<h2>Most frequent misses</h2>{_misses(f)}
<h2>Drift</h2>{_drift(f)}
<h2>Snapshot and input</h2>{_facts(f)}
</main></body></html>
"""

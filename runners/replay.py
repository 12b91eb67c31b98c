"""``querycache replay``: held-out hit rates of a snapshot, a readable summary, ``--json`` and an HTML report."""

from __future__ import annotations

from typing import Any

import click

from querycache.runners import human
from querycache.runners.common import (
    GLOB_HINT,
    UserError,
    echo_json,
    environment_error,
    passed_on,
    require_pipelines,
    setup_logging,
)
from querycache.runners.inputs import log_fields, log_input_options
from querycache.store import SnapshotError


@click.command(context_settings={"ignore_unknown_options": False})
@click.argument("snapshot")
@log_input_options
@click.option(
    "--min-users",
    type=click.IntRange(0),
    help="Misses shown need this many distinct users (default: the snapshot's build; 0: no check).",
)
@click.option(
    "--scrub-pii/--no-scrub-pii", default=None, help="Hide misses that look personal (default: the snapshot's build)."
)
@click.option("--top-misses", default=20, show_default=True, type=click.IntRange(0), help="Misses to list.")
@click.option("--report", "report_path", help="Write a self-contained HTML report here (any Beam filesystem).")
@click.option("--runner", default="direct", show_default=True, help="direct, multiprocess, portable, ... as build.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object on stdout.")
@click.option("--quiet", is_flag=True, help="Only warnings and errors on stderr.")
@passed_on("beam_options", to="Beam", hint=GLOB_HINT)
def replay(**kw: Any) -> None:
    """Measure how much of held-out traffic a snapshot answers without the model.

    SNAPSHOT is a root (its CURRENT snapshot) or one snapshot directory, on any Beam filesystem.
    The logs are read as build reads them; pass the same input flags.

    \b
    Example:
      querycache replay /data/qc --logs 'logs/2026-11-03.jsonl.gz' --report replay.html
      querycache replay /data/qc --logs day3.csv --query-field q --count-field n --json
    """
    require_pipelines("replay")
    setup_logging(kw["quiet"])
    if kw["min_users"] and not kw["user_field"]:
        raise UserError("--min-users needs --user-field, the field that identifies users")
    from querycache.pipelines.checks import BuildError
    from querycache.pipelines.replay import ReplayOptions
    from querycache.pipelines.replay import replay as run_replay
    from querycache.runners.presets import beam_args, in_process, prestart_workers
    from querycache.runners.progress import progress_display

    options = ReplayOptions(
        snapshot=kw["snapshot"],
        logs=tuple(kw["logs"]),
        fields=log_fields(kw),
        min_users=kw["min_users"],
        scrub_pii=kw["scrub_pii"],
        top_misses=kw["top_misses"],
    )
    try:
        args = beam_args(kw["runner"], list(kw["beam_options"]), kw["quiet"])
        prestart_workers(args, "querycache.pipelines.replay")
        with progress_display(kw["quiet"], live=in_process(args)):
            figures = run_replay(options, args)
    except (BuildError, SnapshotError) as err:
        raise UserError(str(err)) from None
    except OSError as err:
        raise environment_error(err) from None
    if kw["report_path"]:
        _write_report(kw["report_path"], figures)
    if kw["as_json"]:
        echo_json(figures)
    else:
        click.echo(summary(figures, kw["report_path"]))


def _write_report(path: str, figures: dict) -> None:
    from apache_beam.io.filesystems import FileSystems

    from querycache.runners.report import render_report

    html = render_report(figures).encode("utf-8")
    try:
        with FileSystems.create(path, mime_type="text/html") as fh:
            fh.write(html)
    except Exception as err:  # Beam wraps a bad directory or scheme in several exception types
        raise UserError(f"--report {path}: {err}") from None


def _pct(part: float) -> str:
    return f"{100 * part:.1f}%"


def summary(f: dict, report: str | None = None) -> str:
    """The replay's figures as a few readable lines."""
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(f["rejected_by_reason"].items())) or "none"
    curve = " | ".join(f"{p['head_size']}: {_pct(p['traffic_hit_rate'])}" for p in f["curve"][-4:])
    drift = f["drift"]
    saved = f["compute_saved"]
    seconds = "unknown inference cost" if saved["seconds"] is None else f"{saved['seconds']:.1f}s of inference"
    misses = ", ".join(f"{m['key']} ({m['count']})" for m in f["top_misses"][:5]) or "none"
    lines = [
        f"replay of snapshot {f['snapshot_id']} ({f['snapshot']['rows']} rows) in {f['seconds']:.1f}s",
        f"  lines read        {f['lines_read']} = accepted {f['accepted']} + rejected {f['rejected']} ({reasons})",
        f"  traffic hit rate  {_pct(f['traffic_hit_rate'])} ({f['hit_traffic']} of {f['traffic']} requests)",
        f"  unique hit rate   {_pct(f['unique_hit_rate'])} ({f['distinct_hits']} of {f['distinct_queries']} queries)",
        f"  curve             {curve} (hindsight at full size {_pct(f['hindsight_curve'][-1]['traffic_hit_rate'])})",
        f"  drift             held-out top 1% missed {_pct(drift['heldout_top_1pct']['share'])}, "
        f"top 1000 missed {_pct(drift['heldout_top_1000']['share'])}, "
        f"snapshot top 1000 absent {_pct(drift['snapshot_top_1000']['share'])}",
        f"  compute saved     {seconds} ({_pct(saved['share'])} of answering all traffic with the model)",
        f"  top misses        {misses}",
    ]
    if f["truncated_files"]:
        lines.insert(2, f"  cut short         {human.truncated(f['truncated_files'])}")
    if report:
        lines.append(f"  report            {report}")
    return "\n".join(lines)

"""The input flags that every command reading query logs shares (build, finetune, replay): one definition.

@main.command()
@input_options
def build(**kw): fields, selection = log_fields(kw), head_selection(kw)
"""

from __future__ import annotations

import click

from querycache.runners.common import UserError, require_pipelines


def _fraction(ctx, param, value):
    if value is not None and not 0 < value <= 1:
        raise click.BadParameter(f"{value} is outside (0, 1]; for example --coverage 0.8")
    return value


def _iso(ctx, param, value):
    if value is None:
        return None
    require_pipelines(ctx.info_name)  # parsed before the command runs, with the parsers of the pipelines
    from querycache.transforms.records import parse_time

    try:
        return parse_time(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not ISO 8601; for example 2026-11-01T00:00:00Z") from None


_OPTIONS = [
    click.option(
        "--logs",
        "logs",
        multiple=True,
        required=True,
        help="Log files: a path or glob on any Beam filesystem; repeatable.",
    ),
    click.option(
        "--format",
        "fmt",
        type=click.Choice(["auto", "text", "jsonl", "csv", "tsv", "parquet"]),
        default="auto",
        show_default=True,
    ),
    click.option("--query-field", default="query", show_default=True),
    click.option("--count-field", help="Field holding a positive integer weight per record."),
    click.option("--user-field", help="Field identifying the user (for --min-users)."),
    click.option("--time-field", help="Field holding an ISO 8601 time or epoch seconds (for --since/--until)."),
    click.option("--since", callback=_iso, help="Keep records at or after this ISO 8601 time."),
    click.option("--until", callback=_iso, help="Keep records before this ISO 8601 time."),
]
_HEAD_OPTIONS = [
    click.option("--top-k", type=click.IntRange(1), help="Keep the K most frequent queries."),
    click.option("--min-count", type=click.IntRange(1), help="Keep queries seen at least N times (default 1)."),
    click.option(
        "--coverage", type=float, callback=_fraction, help="Keep the fewest queries covering this fraction of traffic."
    ),
    click.option("--min-users", type=click.IntRange(1), help="Keep queries issued by at least K distinct users."),
    click.option(
        "--scrub-pii/--no-scrub-pii",
        default=True,
        show_default=True,
        help="Drop queries with e-mails, phones, cards, IPs, long digit runs.",
    ),
    click.option("--max-query-chars", default=512, show_default=True, type=click.IntRange(1)),
]


def log_input_options(command):
    """Add the log-reading flags of ``build`` (--logs, --format, fields, --since/--until) to ``command``."""
    for option in reversed(_OPTIONS):
        command = option(command)
    return command


def input_options(command):
    """Add the log-reading, head-selection and privacy flags of ``build`` to ``command``."""
    for option in reversed(_OPTIONS + _HEAD_OPTIONS):
        command = option(command)
    return command


def check_inputs(kw: dict) -> list[str]:
    """Refuse contradictory input flags (exit 2); return the head selectors given."""
    picked = [name for name in ("top_k", "min_count", "coverage") if kw[name] is not None]
    if len(picked) > 1:
        raise UserError(
            "choose one of --top-k, --min-count, --coverage (got "
            + ", ".join("--" + p.replace("_", "-") for p in picked)
            + ")"
        )
    if kw["min_users"] and not kw["user_field"]:
        raise UserError("--min-users needs --user-field, the field that identifies users")
    return picked


def log_fields(kw: dict, label: str | None = None):
    """The ``LogFields`` of the command line; UserError for --since/--until without --time-field."""
    from querycache.transforms.records import LogFields

    if (kw["since"] or kw["until"]) and not kw["time_field"]:
        raise UserError("--since/--until need --time-field, the field that holds the record time")
    return LogFields(
        format=kw["fmt"],
        query=kw["query_field"],
        count=kw["count_field"],
        user=kw["user_field"],
        time=kw["time_field"],
        since=kw["since"],
        until=kw["until"],
        label=label,
    )


def head_selection(kw: dict, picked: list[str]):
    """The ``Selection`` of the command line (``--min-count 1`` without a selector)."""
    from querycache.transforms.selection import Selection

    mode = picked[0] if picked else "min_count"
    return Selection(mode, kw[mode] if picked else 1)

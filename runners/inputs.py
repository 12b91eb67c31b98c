"""The log-input options that every command reading query logs shares (build, replay).

@click.command()
@log_input_options
def build(**kw): fields = log_fields(kw)
"""

from __future__ import annotations

import click

from runners.common import UserError


def _iso(ctx, param, value):
    if value is None:
        return None
    from transforms.records import parse_time

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


def log_input_options(command):
    """Add --logs, --format, --query-field, --count-field, --user-field, --time-field, --since, --until."""
    for option in reversed(_OPTIONS):
        command = option(command)
    return command


def log_fields(kw: dict):
    """The ``LogFields`` of the parsed options; UserError for --since/--until without --time-field."""
    from transforms.records import LogFields

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
    )

"""What every querycache command shares: the user-error type, logging setup and JSON output."""

from __future__ import annotations

import importlib.util
import json
import logging
import platform
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import click
import numpy as np


class UserError(click.ClickException):
    """A user mistake: one line on stderr, exit code 2."""

    exit_code = 2


def environment_error(err: OSError) -> click.ClickException:
    """A failure of the environment (a full disk, permissions, a lost worker process): one line, exit 1."""
    return click.ClickException(f"{err.strerror or err}: {err.filename or ''}".rstrip(": "))


GLOB_HINT = "an unquoted glob expands to many files: quote it (--logs 'logs/*.jsonl') or repeat --logs"


def passed_on(name: str, *, to: str, hint: str, then: Callable | None = None, **attrs: Any) -> Callable:
    """The trailing argument of options a command passes on (``-- --name=value ...``), refusing anything else.

    Click gathers every stray positional word into it too (the second file of an unquoted glob): such
    a word is refused with one line naming it, ``hint`` and where options go, exit 2.
    """

    def check(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
        stray = stray_argument(value)
        if stray is not None:
            raise UserError(f"unexpected argument {stray!r}: {hint}; options for {to} go after --, as --name=value")
        return then(ctx, param, value) if then else value

    return click.argument(name, nargs=-1, type=click.UNPROCESSED, callback=check, **attrs)


def stray_argument(args: Sequence[str]) -> str | None:
    """The first of ``args`` that is neither an option (``--name``, ``--name=value``) nor the value after ``--name``."""
    value_may_follow = False
    for arg in args:
        if arg.startswith("--") and len(arg) > 2:
            value_may_follow = "=" not in arg
        elif value_may_follow:
            value_may_follow = False
        else:
            return arg
    return None


PIPELINES_EXTRA = ("apache_beam", "torch", "transformers", "safetensors", "orjson", "matplotlib")
"""What ``pip install 'querycache[pipelines]'`` adds to the light install, by import name."""


def require_pipelines(command: str) -> None:
    """Exit 2 with one line where the light install lacks what ``command`` runs on."""
    require_extra(command, "pipelines", PIPELINES_EXTRA)


def require_extra(command: str, extra: str, modules: tuple[str, ...]) -> None:
    """Exit 2 with one line naming ``extra`` where any of ``modules`` is missing (found, not imported)."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(
            f"querycache {command} needs the {extra} extra (missing: {', '.join(missing)}): "
            f"pip install 'querycache[{extra}]'"
        )


LOG_FORMAT, LOG_TIME = "%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"  # the driver's and workers' lines


def setup_logging(quiet: bool) -> None:
    """Progress on stderr (INFO, or WARNING with --quiet); Beam's chatter kept out."""
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        stream=sys.stderr,
        format=LOG_FORMAT,
        datefmt=LOG_TIME,
    )
    for noisy in ("absl", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # A failing DoFn is logged by Beam with its traceback; the command reports the error in one line.
    logging.getLogger("apache_beam").setLevel(logging.CRITICAL)
    for handler in logging.getLogger().handlers:  # Beam warns about apitools from the root logger on import
        handler.addFilter(lambda record: not record.getMessage().startswith("apitools not found"))


def _jsonable(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else value


def echo_json(obj: Any) -> None:
    """One JSON document on stdout; numpy arrays become lists."""
    click.echo(json.dumps(obj, default=_jsonable, ensure_ascii=False))


def versions() -> dict[str, str]:
    """Versions of querycache, its engines and the key function, read from package metadata (no torch import)."""
    from querycache.store.keys import KEY_FUNCTION

    def of(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    return {
        "querycache": of("querycache"),
        "apache-beam": of("apache-beam"),
        "torch": of("torch"),
        "transformers": of("transformers"),
        "python": platform.python_version(),
        "key function": f"{KEY_FUNCTION['name']} v{KEY_FUNCTION['version']}",
    }


def print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """The eager ``--version`` option: ``querycache 0.1.0`` and the versions it runs with."""
    if not value or ctx.resilient_parsing:
        return
    info = versions()
    width = max(map(len, info))
    click.echo(f"querycache {info.pop('querycache')}")
    click.echo("\n".join(f"  {name:<{width}}  {value}" for name, value in info.items()))
    ctx.exit()

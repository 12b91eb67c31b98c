"""What every querycache command shares: the user-error type, logging setup and JSON output."""

from __future__ import annotations

import json
import logging
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import click
import numpy as np


class UserError(click.ClickException):
    """A user mistake: one line on stderr, exit code 2."""

    exit_code = 2


def setup_logging(quiet: bool) -> None:
    """Progress on stderr (INFO, or WARNING with --quiet); Beam's chatter kept out."""
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
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
    from store.keys import KEY_FUNCTION

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

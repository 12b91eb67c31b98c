"""What the fork server of ``--runner multiprocess`` sets up first, for itself and its workers.

Logging: Beam's import warns from the root logger, which gives a root without handlers one of its
own (and every later record of the harness a line on stderr). Set up before that, the workers log
as the driver does (its format on stderr): querycache's records at the level the preset gives the
workers, other libraries' errors only, and of Beam's only the critical ones (its errors repeat a
failure that the runner raises in the driver, as in the driver's own logging).

Exit: the fork server ends when the driver does; the teardown of torch, transformers and Beam
would keep it (and the driver's stdout and stderr, which it shares) another ~1 s, for nothing.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys

from querycache.runners.common import LOG_FORMAT, LOG_TIME


def _querycache_or_error(record: logging.LogRecord) -> bool:
    beam = record.name.startswith("apache_beam")
    return record.name.startswith("querycache") or record.levelno >= (logging.CRITICAL if beam else logging.ERROR)


def setup() -> None:
    """One stderr handler on the root logger, unless it has one; an exit without teardown."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_TIME))
        handler.addFilter(_querycache_or_error)
        root.addHandler(handler)
    atexit.register(os._exit, 0)  # registered before Beam and torch are imported: runs after their handlers


setup()

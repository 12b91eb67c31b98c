"""``python -m querycache``: the same command line as ``querycache``."""

from querycache.runners.cli import entry

entry()

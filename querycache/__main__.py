"""``python -m querycache``: the same command line as ``querycache``."""

from querycache.runners.cli import main

main(prog_name="querycache")

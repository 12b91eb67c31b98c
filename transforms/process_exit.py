"""Processes that end without the interpreter's teardown: the command line, and local worker processes.

A finished process leaves nothing for the teardown of torch, transformers and Beam to do but free
memory it is about to give back (~1.1 s). :func:`exit_now` ends it as a normal exit does for the
outside world (logs and output flushed) without that teardown.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys

LOCAL_WORKERS = "QUERYCACHE_LOCAL_WORKERS"  # set by the multiprocess preset; its worker processes inherit it
_WORKER = "apache_beam.runners.worker.sdk_worker_main"


def exit_now(code: int) -> None:
    """Flush logs and output, then end the process with ``code`` (120 when the output cannot be
    flushed, as Python's own exit says), skipping the interpreter's teardown."""
    logging.shutdown()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # a closed pipe
        code = code or 120
    os._exit(code)


def exit_workers_quickly() -> None:
    """In a worker process of ``--runner multiprocess`` (Beam's ``sdk_worker_main``, started by this
    machine's driver), skip the interpreter's teardown at exit: the pipeline waits for each worker's.
    A worker that ends with an uncaught exception exits as usual. Anywhere else (the driver, tests,
    workers of other runners) this does nothing."""
    main = getattr(sys.modules.get("__main__"), "__spec__", None)
    if os.environ.get(LOCAL_WORKERS) != "1" or getattr(main, "name", None) != _WORKER:
        return
    failed = []
    hook = sys.excepthook

    def excepthook(*args):
        failed.append(args)
        hook(*args)

    def leave() -> None:
        if not failed:
            exit_now(0)

    sys.excepthook = excepthook
    atexit.register(leave)

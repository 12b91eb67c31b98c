"""Local worker processes that end without the interpreter's teardown (see :func:`exit_quickly`)."""

from __future__ import annotations

import atexit
import logging
import os
import sys

LOCAL_WORKERS = "QUERYCACHE_LOCAL_WORKERS"  # set by the multiprocess preset; its worker processes inherit it
_WORKER = "apache_beam.runners.worker.sdk_worker_main"


def exit_quickly() -> None:
    """In a worker process of ``--runner multiprocess`` (Beam's ``sdk_worker_main``, started by this
    machine's driver), skip the interpreter's teardown at exit: once the harness has returned, it
    only frees torch's, transformers' and Beam's objects, ~1 s a worker that the pipeline waits for.
    A worker that ends with an uncaught exception exits as usual. Anywhere else (the driver, tests,
    workers of other runners) this does nothing."""
    main = getattr(sys.modules.get("__main__"), "__spec__", None)
    if os.environ.get(LOCAL_WORKERS) != "1" or getattr(main, "name", None) != _WORKER:
        return
    os.environ[LOCAL_WORKERS] = "armed"  # once a process
    failed = []
    hook = sys.excepthook

    def excepthook(*args):
        failed.append(args)
        hook(*args)

    def leave() -> None:
        if not failed:
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    sys.excepthook = excepthook
    atexit.register(leave)

"""``querycache serve``: the HTTP sidecar on uvicorn (httptools, uvloop)."""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import click

from querycache.runners.common import UserError, require_extra, setup_logging
from querycache.runners.manage import filesystem_options
from querycache.store import fs

WORKER_SETTINGS = "QUERYCACHE_SERVE_WORKER"  # --workers: the settings each worker starts from (JSON)


@click.command()
@click.argument("root")
@click.option("--model", "model_dir", help="Fallback model directory (default: the snapshot's, else the shipped one).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=3000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N for misses.")
@click.option(
    "--max-client-batch-size", default=32, show_default=True, type=click.IntRange(1), help="Inputs per request."
)
@click.option("--payload-limit", default=2_000_000, show_default=True, type=click.IntRange(1), help="Body bytes.")
@click.option(
    "--max-concurrent-requests", default=512, show_default=True, type=click.IntRange(1), help="More: 429 at once."
)
@click.option(
    "--truncate/--no-truncate",
    "auto_truncate",
    default=True,
    show_default=True,
    help="Inputs over the model's maximum length: truncated as the pipeline does, or refused (413) "
    'unless a request says "truncate": true (TEI\'s --auto-truncate).',
)
@click.option(
    "--no-fallback",
    is_flag=True,
    help="Load no model: answer only what the snapshot holds (a miss is null on TEI's routes, 404 on OpenAI's).",
)
@click.option("--served-model-name", help="The model name of the OpenAI routes (default: the model directory's).")
@click.option(
    "--allow-model-mismatch",
    is_flag=True,
    help="Start even when the model is not the snapshot's model version; every answer then comes from the model.",
)
@click.option(
    "--pull-from", help="A root on any filesystem (s3://...) to pull into ROOT, now and every --every seconds."
)
@click.option("--every", default=60.0, show_default=True, type=click.FloatRange(0.1), help="Seconds between pulls.")
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="Processes answering on the port, each mapping the snapshot (and loading its own model for misses); "
    "/metrics sums them all.",
)
@click.option("--quiet", is_flag=True, help="Only warnings and errors on stderr.")
@filesystem_options
def serve(
    root: str,
    model_dir: str | None,
    host: str,
    port: int,
    device: str,
    served_model_name: str | None,
    pull_from: str | None,
    every: float,
    quiet: bool,
    no_fallback: bool,
    workers: int,
    **kw,
) -> None:
    """Answer TEI-style HTTP requests from ROOT's current snapshot; misses go to the model.

    ROOT is a local snapshot root: a snapshot published into it is served without a restart. With
    --pull-from, serve pulls the source's current snapshot into ROOT before it starts and then polls it
    (filesystem flags such as --s3_endpoint_url go after --).
    Routes: POST /embed, GET /health, GET /info (TEI); POST /v1/embeddings, GET /v1/models (OpenAI).

    \b
    Example:
      querycache serve demo-root --port 3000
      curl -s localhost:3000/embed -H 'content-type: application/json' -d '{"inputs": ["hotels in rome"]}'
    """
    require_extra("serve", "serve", ("uvicorn", "orjson") + (() if no_fallback else ("torch", "transformers")))
    if fs.is_remote(root):
        raise UserError(f"serve memory-maps local files: pass a local ROOT and --pull-from {root}")
    if no_fallback and (model_dir or kw["allow_model_mismatch"]):
        raise UserError("--no-fallback loads no model: leave out --model and --allow-model-mismatch")
    setup_logging(quiet)
    import uvicorn

    from querycache.serve import Limits, ModelMismatchError, create_app, load_service
    from querycache.store import SnapshotError
    from querycache.store.pull import pull

    refused: tuple[type[Exception], ...] = (ModelMismatchError, SnapshotError, OSError)
    if not no_fallback:  # transformers is imported only to load a model
        from querycache.inference.model import ModelError

        refused += (ModelError,)
    allow = kw.pop("allow_model_mismatch")
    try:
        if pull_from:
            pull(pull_from, root, keep=2)  # the previous snapshot stays until no lookup holds it
        service = load_service(
            root,
            model_dir,
            device=device,
            allow_model_mismatch=allow,
            no_fallback=no_fallback,
        )
    except refused as err:
        raise UserError(str(err)) from None
    served = Path(service.model.get("model_dir") or "querycache")
    served_name = served_model_name or (served.parent.name if served.name == "model" else served.name)
    # uvicorn's httptools protocol, writing a response's head with its body (serve/http.py)
    uvicorn_settings = {"host": host, "port": port, "loop": "uvloop", "http": "querycache.serve.http:OneWriteProtocol"}
    uvicorn_settings["log_level"] = "warning" if quiet else "info"
    # quiet: no access log, and so no use for the client address behind a proxy; no header naming the server
    uvicorn_settings |= {"access_log": not quiet, "proxy_headers": not quiet, "server_header": False}
    if workers > 1:  # checked above; each worker opens the root and loads the model itself
        service.close()
        settings = {"root": str(root), "model_dir": model_dir, "device": device, "no_fallback": no_fallback}
        settings |= {"allow_model_mismatch": allow, "limits": kw, "served_name": served_name, "quiet": quiet}
        _start_pulling(pull_from, root, every, None)
        with tempfile.TemporaryDirectory(prefix="querycache-metrics-") as directory:
            os.environ[WORKER_SETTINGS] = json.dumps({**settings, "metrics": directory})
            uvicorn.run(f"{__name__}:worker_app", factory=True, workers=workers, **uvicorn_settings)
        return
    app = create_app(service, Limits(**kw), served_name)
    _start_pulling(pull_from, root, every, service.cache.refresh)
    # uvicorn drains on SIGTERM (stops accepting, finishes what is in flight), then raises the signal
    # again with the handler it found: this one, so that a drained shutdown exits 0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(app, **uvicorn_settings)


def _start_pulling(pull_from: str | None, root: str, every: float, refresh: Callable[[], None] | None) -> None:
    """Pull each new snapshot of ``pull_from`` into ``root`` on a thread; ``refresh`` switches to it at once
    (workers notice it themselves, a second at most after their next request)."""
    if pull_from:
        from querycache.store.pull import watch

        switch = (lambda _pulled: refresh()) if refresh else None
        threading.Thread(target=watch, args=(pull_from, root, every, 2, switch), daemon=True).start()


def worker_app():
    """The application of one ``--workers`` process (uvicorn spawns each and calls this), set up from
    the command line's settings in the environment; its figures go to ``PID.slots`` in the directory
    the workers share, so that a scrape in any of them sums all."""
    from querycache.serve import Limits, create_app, load_service
    from querycache.serve.metrics import Metrics
    from querycache.serve.slots import Slots

    settings = json.loads(os.environ[WORKER_SETTINGS])
    setup_logging(settings["quiet"])
    slots = Slots(Path(settings["metrics"]) / f"{os.getpid()}.slots")
    service = load_service(
        settings["root"],
        settings["model_dir"],
        device=settings["device"],
        allow_model_mismatch=settings["allow_model_mismatch"],
        no_fallback=settings["no_fallback"],
        counts=slots,
    )
    metrics = Metrics(slots, settings["metrics"])
    return create_app(service, Limits(**settings["limits"]), settings["served_name"], metrics)

"""The routes of ``querycache serve``, in the request and response shapes of text-embeddings-inference.

``POST /embed`` takes ``{"inputs": str | [str], "normalize": true, "truncate": false}`` and answers
``[[float]]``; ``GET /health`` is 200 while a snapshot (or, with a model mismatch allowed, the model)
answers and 503 otherwise; ``GET /info`` names the model version, snapshot and limits. Every answer
carries ``x-querycache-hits`` (inputs answered from the snapshot) and ``x-querycache-snapshot``;
every error is ``{"error", "error_type"}`` with TEI's status codes. Inputs longer than the model's
maximum are truncated to it (``truncate`` is accepted for compatibility).

Lookups and the model run on worker threads, so the event loop never waits for either.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from querycache.serve.service import Service


@dataclass(frozen=True)
class Limits:
    """What one request may ask: inputs per request (TEI's ``max_client_batch_size``) and body bytes."""

    max_client_batch_size: int = 32
    payload_limit: int = 2_000_000


class ApiError(Exception):
    """A request the server refuses: HTTP status, TEI's ``error_type`` and a one-line message."""

    def __init__(self, status: int, error_type: str, message: str):
        super().__init__(message)
        self.status, self.error_type = status, error_type


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    content = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(content, status, headers, media_type="application/json")


def _error(err: ApiError) -> Response:
    return _json({"error": str(err), "error_type": err.error_type}, err.status)


async def _body(request: Request, limits: Limits) -> dict:
    """The request's JSON object, within the payload limit."""
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limits.payload_limit:
            raise ApiError(413, "Validation", f"the request body is over the {limits.payload_limit:,}-byte limit")
    try:
        body = json.loads(raw)  # the standard parser: it takes what JSON allows, lone surrogates included
    except (ValueError, RecursionError) as err:
        raise ApiError(422, "Validation", f"the request body is not JSON: {str(err)[:200]}") from None
    if not isinstance(body, dict):
        raise ApiError(422, "Validation", "the request body must be a JSON object")
    return body


def _inputs(body: dict, limits: Limits) -> list[str]:
    """``inputs`` as a list of strings whose keys are queries, within the client batch limit."""
    inputs = body.get("inputs")
    inputs = [inputs] if isinstance(inputs, str) else inputs
    if not isinstance(inputs, list) or not all(isinstance(text, str) for text in inputs):
        raise ApiError(422, "Validation", "`inputs` must be a string or a list of strings")
    if not inputs:
        raise ApiError(400, "Empty", "`inputs` is an empty list")
    if len(inputs) > limits.max_client_batch_size:
        raise ApiError(
            422,
            "Validation",
            f"{len(inputs)} inputs are over the client batch limit of {limits.max_client_batch_size}",
        )
    return inputs


def _flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise ApiError(422, "Validation", f"`{name}` must be true or false")
    return value


def create_app(service: Service, limits: Limits = Limits()) -> Starlette:
    """The ASGI application serving ``service``; closing it closes the service."""

    async def embed(request: Request) -> Response:
        start = time.perf_counter()
        try:
            if service.task != "embed":
                raise ApiError(424, "Backend", f"this server answers {service.task}, not embeddings")
            body = await _body(request, limits)
            inputs = _inputs(body, limits)
            normalize_output = _flag(body, "normalize", True)
            _flag(body, "truncate", False)
        except ApiError as err:
            return _error(err)
        found = await run_in_threadpool(service.lookup, inputs)
        empty = next((i for i, result in enumerate(found.results) if result is None), None)
        if empty is not None:  # the cache answers None only where a key is empty: no query, no answer
            return _error(
                ApiError(400, "Empty", f"inputs[{empty}] is empty once normalised (spaces or invisible only)")
            )
        vectors = np.stack(found.results).astype(np.float32, copy=False)
        if normalize_output:
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        headers = {
            "x-querycache-hits": str(found.hits),
            "x-querycache-snapshot": found.snapshot_id or "",
            "x-total-time": str(round((time.perf_counter() - start) * 1000)),
        }
        return _json(vectors, headers=headers)

    async def health(request: Request) -> Response:
        if service.ready():
            return Response(status_code=200)
        return _error(ApiError(503, "Unhealthy", "no snapshot is being served"))

    async def info(request: Request) -> Response:
        return _json(
            {
                **service.info(),
                "max_client_batch_size": limits.max_client_batch_size,
                "payload_limit": limits.payload_limit,
            }
        )

    routes = [
        Route("/embed", embed, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/info", info, methods=["GET"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        service.close()

    return Starlette(routes=routes, lifespan=lifespan)

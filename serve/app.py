"""The routes of ``querycache serve``, in the request and response shapes of text-embeddings-inference.

- ``POST /embed`` takes ``{"inputs": str | [str], "normalize": true, "truncate": false}`` and answers
  ``[[float]]``; ``POST /predict`` (classify snapshots) and ``POST /fill_mask`` (fill-mask
  snapshots) answer the other tasks; a route of another task is a 424 naming the right one.
- OpenAI's ``POST /v1/embeddings`` (``encoding_format`` float or base64 of little-endian float32,
  ``usage`` in tokens) and ``GET /v1/models`` answer the same vectors, unit length.
- ``GET /health`` is 200 while a snapshot (or, with a model mismatch allowed, the model) answers and
  503 otherwise; ``GET /info`` names the model version, snapshot and limits; ``GET /metrics`` is
  Prometheus text (``metrics.py``).

Every answer carries ``x-querycache-hits`` (inputs answered from the snapshot) and
``x-querycache-snapshot``. Errors are ``{"error", "error_type"}`` with TEI's status codes, and
``{"error": {"message", "type", "param", "code"}}`` on OpenAI's routes; a request over the
concurrency limit is answered 429 at once. Inputs longer than the model's maximum are truncated to
it, as the pipeline does, unless the request says ``"truncate": false`` or the server's
``auto_truncate`` is off and the request says nothing: then such an input is a 413 (TEI's rule).

Without a fallback model a miss has no answer: ``null`` in its place on TEI's routes (the request
still answers its hits), a 404 ``not_in_snapshot`` on OpenAI's, whose ``usage`` then counts 0 tokens
(no tokenizer is loaded).

Hits are looked up on the event loop (microseconds: the snapshot is memory-mapped); a request with
misses waits for them on a worker thread while the batcher's engine thread (``batcher.py``) computes
them, so the event loop never waits for the model.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from querycache.serve.metrics import Metrics
from querycache.serve.service import Service
from querycache.store.cache import Lookup
from querycache.store.keys import is_query


@dataclass(frozen=True)
class Limits:
    """What requests may ask: inputs per request, body bytes, requests at once (TEI's names and defaults)."""

    max_client_batch_size: int = 32
    payload_limit: int = 2_000_000
    max_concurrent_requests: int = 512
    auto_truncate: bool = True  # inputs over the model's maximum: truncated, or (False) refused unless asked


class ApiError(Exception):
    """A request the server refuses: HTTP status, TEI's ``error_type``, a one-line message, the field at fault."""

    def __init__(self, status: int, error_type: str, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.error_type, self.param = status, error_type, param


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    content = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(content, status, headers, media_type="application/json")


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


def _inputs(inputs: Any, name: str, limits: Limits) -> list[str]:
    """The request's texts (field ``name``: a string or a list of them) within the client batch limit."""
    inputs = [inputs] if isinstance(inputs, str) else inputs
    if not isinstance(inputs, list) or not all(isinstance(text, str) for text in inputs):
        raise ApiError(422, "Validation", f"`{name}` must be a string or a list of strings", name)
    if not inputs:
        raise ApiError(400, "Empty", f"`{name}` is an empty list", name)
    if len(inputs) > limits.max_client_batch_size:
        raise ApiError(
            422,
            "Validation",
            f"{len(inputs)} inputs are over the client batch limit of {limits.max_client_batch_size}",
            name,
        )
    return inputs


def _flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise ApiError(422, "Validation", f"`{name}` must be true or false", name)
    return value


ROUTES = {"embed": "POST /embed or POST /v1/embeddings", "classify": "POST /predict", "fill-mask": "POST /fill_mask"}


def _tei_error(err: ApiError) -> Response:
    return _json({"error": str(err), "error_type": err.error_type}, err.status)


_OPENAI_TYPES = {"Overloaded": "rate_limit_error", "Unhealthy": "service_unavailable", "Backend": "server_error"}


def _openai_error(err: ApiError) -> Response:
    kind = _OPENAI_TYPES.get(err.error_type, "invalid_request_error")
    code = "not_in_snapshot" if err.error_type == "NotFound" else None
    return _json({"error": {"message": str(err), "type": kind, "param": err.param, "code": code}}, err.status)


def create_app(service: Service, limits: Limits = Limits(), served_name: str = "querycache") -> Starlette:
    """The ASGI application serving ``service``; closing it closes the service.

    ``served_name`` is the model name the OpenAI routes list and echo (any requested name is accepted).
    """
    in_flight = 0  # requests being answered; read and written on the event loop only
    metrics = Metrics()
    if service.batcher:
        service.batcher.on_round = metrics.round
    engine = service.engine  # None without a fallback

    def route(method: str, render: Callable[[ApiError], Response]):
        """A handler that answers an :class:`ApiError` in ``render``'s shape, and 429 when the server is full."""

        def wrap(handler):
            async def endpoint(request: Request) -> Response:
                nonlocal in_flight
                started = time.perf_counter()
                if in_flight >= limits.max_concurrent_requests:
                    error = ApiError(429, "Overloaded", "the server is at its concurrent request limit")
                    metrics.request(method, started, error.error_type)
                    return render(error)
                in_flight += 1
                try:
                    response = await handler(request)
                except ApiError as err:
                    metrics.request(method, started, err.error_type)
                    return render(err)
                finally:
                    in_flight -= 1
                metrics.request(method, started, None)
                return response

            return endpoint

        return wrap

    def serving(task: str) -> None:
        if service.task != task:
            raise ApiError(424, "Backend", f"this server answers {service.task}: use {ROUTES[service.task]}")

    async def answers(inputs: list[str], task: str, truncate: bool) -> Lookup:
        """The answers of ``inputs`` for a route of ``task``: hits from the snapshot, misses from the model
        (None without one, and for a fill-mask template whose mask was cut)."""
        serving(task)
        cache = service.cache
        partial = cache.known(inputs)  # hits: microseconds, on the loop itself
        found = await run_in_threadpool(cache.complete, partial) if partial.missing else cache.complete(partial)
        for i, key in enumerate(found.keys):
            if not is_query(key):
                raise ApiError(
                    400, "Empty", f"inputs[{i}] is empty once normalised (spaces or invisible only)", "input"
                )
        if not truncate and engine is not None:
            overlong = await run_in_threadpool(engine.overlong, found.keys)
            if overlong:
                raise ApiError(
                    413,
                    "Validation",
                    f"inputs[{overlong[0]}] is longer than the model's maximum of {engine.max_length} tokens: "
                    "shorten it or send truncate: true",
                    "input",
                )
        return found

    def missed(found: Lookup) -> list[int]:
        """Positions without an answer because no fallback model is loaded."""
        return [] if engine is not None else [i for i, r in enumerate(found.results) if r is None]

    stored_unit = bool(service.model.get("normalize"))  # the model version answers unit vectors

    def unit(vectors: np.ndarray) -> np.ndarray:
        if stored_unit:
            return vectors
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    async def embeddings(inputs: list[str], truncate: bool) -> tuple[np.ndarray, Lookup]:
        found = await answers(inputs, "embed", truncate)
        rows = [r for r in found.results if r is not None]
        return np.stack(rows).astype(np.float32, copy=False) if rows else np.zeros((0, 0), np.float32), found

    def with_nulls(rows: Any, found: Lookup) -> list[Any]:
        """``rows`` (one per answered input) in the places of their inputs, None where no answer exists."""
        rows = iter(rows)
        return [None if r is None else next(rows) for r in found.results]

    def headers(found: Lookup, start: float) -> dict[str, str]:
        return {
            "x-querycache-hits": str(found.hits),
            "x-querycache-snapshot": found.snapshot_id or "",
            "x-total-time": str(round((time.perf_counter() - start) * 1000)),
        }

    @route("embed", _tei_error)
    async def embed(request: Request) -> Response:
        start = time.perf_counter()
        body = await _body(request, limits)
        inputs = _inputs(body.get("inputs"), "inputs", limits)
        normalize_output = _flag(body, "normalize", True)
        vectors, found = await embeddings(inputs, _flag(body, "truncate", limits.auto_truncate))
        vectors = unit(vectors) if normalize_output else vectors
        return _json(with_nulls(vectors, found) if missed(found) else vectors, headers=headers(found, start))

    @route("openai_embeddings", _openai_error)
    async def openai_embeddings(request: Request) -> Response:
        start = time.perf_counter()
        body = await _body(request, limits)
        inputs = _inputs(body.get("input"), "input", limits)
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise ApiError(422, "Validation", "`encoding_format` must be float or base64", "encoding_format")
        vectors, found = await embeddings(inputs, limits.auto_truncate)
        if missed(found):
            i = missed(found)[0]
            raise ApiError(404, "NotFound", f"input[{i}] is not in the snapshot and no model answers misses", "input")
        vectors = unit(vectors)  # OpenAI's embeddings are unit vectors
        if body.get("dimensions") not in (None, vectors.shape[1]):
            raise ApiError(422, "Validation", f"this model answers {vectors.shape[1]} dimensions only", "dimensions")
        tokens = await run_in_threadpool(engine.count_tokens, found.keys) if engine else [0]
        if encoding == "base64":  # little-endian float32, as OpenAI's client decodes it
            rows = [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in vectors]
        else:
            rows = list(vectors)
        data = [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)]
        usage = {"prompt_tokens": sum(tokens), "total_tokens": sum(tokens)}
        answer = {"object": "list", "data": data, "model": body.get("model") or served_name, "usage": usage}
        return _json(answer, headers=headers(found, start))

    @route("predict", _tei_error)
    async def predict(request: Request) -> Response:
        start = time.perf_counter()
        body = await _body(request, limits)
        if _flag(body, "raw_scores", False):
            raise ApiError(422, "Validation", "snapshots hold probabilities, not raw scores", "raw_scores")
        inputs = _inputs(body.get("inputs"), "inputs", limits)
        found = await answers(inputs, "classify", _flag(body, "truncate", limits.auto_truncate))
        ranked = [
            None
            if r is None
            else [{"score": p, "label": label} for label, p in sorted(r["scores"].items(), key=lambda kv: -kv[1])]
            for r in found.results
        ]
        return _json(ranked[0] if isinstance(body["inputs"], str) else ranked, headers=headers(found, start))

    @route("fill_mask", _tei_error)
    async def fill_mask(request: Request) -> Response:
        start = time.perf_counter()
        body = await _body(request, limits)
        inputs = _inputs(body.get("inputs"), "inputs", limits)
        serving("fill-mask")
        stored = service.model["top_k"]
        top_k = body.get("top_k", stored)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 < top_k <= stored:
            raise ApiError(422, "Validation", f"`top_k` must be an integer from 1 to {stored}, what is stored", "top_k")
        found = await answers(inputs, "fill-mask", _flag(body, "truncate", limits.auto_truncate))
        predictions = [  # per input: the top_k of each mask position (none where the template's mask was cut)
            [{**p, "position": j} for j, position in enumerate(r or []) for p in position[:top_k]]
            for r in found.results
        ]
        for i in missed(found):
            predictions[i] = None
        return _json(predictions, headers=headers(found, start))

    async def models(request: Request) -> Response:
        model = {"id": served_name, "object": "model", "created": 0, "owned_by": "querycache"}
        return _json({"object": "list", "data": [model]})

    async def prometheus(request: Request) -> Response:
        text = metrics.render(service.cache.metrics(), service.task, service.batcher.queued() if service.batcher else 0)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def health(request: Request) -> Response:
        if service.ready():
            return Response(status_code=200)
        return _tei_error(ApiError(503, "Unhealthy", "no snapshot is being served"))

    async def info(request: Request) -> Response:
        return _json({**service.info(), "served_model_name": served_name, **dataclasses.asdict(limits)})

    routes = [
        Route("/embed", embed, methods=["POST"]),
        Route("/v1/embeddings", openai_embeddings, methods=["POST"]),
        Route("/predict", predict, methods=["POST"]),
        Route("/fill_mask", fill_mask, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
        Route("/info", info, methods=["GET"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        # a request waiting for its misses holds a worker thread: as many threads as requests may be in flight
        anyio.to_thread.current_default_thread_limiter().total_tokens = limits.max_concurrent_requests
        yield
        service.close()

    return Starlette(routes=routes, lifespan=lifespan)

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
``x-querycache-snapshot``, and the answers of inputs TEI's headers of what they cost:
``x-compute-characters``, ``x-queue-time`` and ``x-inference-time`` (ms the misses waited for and
ran in their engine rounds, tokenizing included; 0 when the snapshot answered), ``x-compute-time``
and ``x-total-time`` (ms, the same, as in TEI). Errors are ``{"error", "error_type"}`` with TEI's
status codes, and ``{"error": {"message", "type", "param", "code"}}`` on OpenAI's routes; a
request over the concurrency limit is answered 429 at once. Inputs longer than the model's maximum
are truncated to it, as the pipeline does, unless the request says ``"truncate": false`` or the
server's ``auto_truncate`` is off and the request says nothing: then such an input is a 413 (TEI's
rule).

Without a fallback model a miss has no answer: ``null`` in its place on TEI's routes (the request
still answers its hits), a 404 ``not_in_snapshot`` on OpenAI's, whose ``usage`` then counts 0 tokens
(no tokenizer is loaded).

Hits are looked up on the event loop (microseconds: the snapshot is memory-mapped); a request with
misses waits for them on a worker thread while the batcher's engine thread (``batcher.py``) computes
them, so the event loop never waits for the model.

The application is a plain ASGI callable (exact paths, a lifespan, no middleware). A hit's answer
is joined from the cached JSON of its rows, and a request body the serving snapshot answered whole
is answered with the same reply again, without parsing or a lookup, while that snapshot serves
(:class:`Memo`: the head's requests repeat byte for byte); :attr:`App.reused` lets the server's
protocol (``http.py``) give that reply before the application's task starts. One-input hits went
from 8.8k a second (Starlette, an encode per request) to 15.5k, then ~30k on one core
(``bench/README.md``).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import orjson

from querycache.serve.metrics import Metrics
from querycache.serve.service import Service
from querycache.store.cache import Lookup, Partial
from querycache.store.keys import is_query

log = logging.getLogger(__name__)


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


Headers = tuple[tuple[bytes, bytes], ...]


class Reply(NamedTuple):
    """An HTTP answer: status, body and every header (:func:`reply` adds the content type and length).

    ``reuse`` is ``(snapshot id, hits)`` where the snapshot answered the whole request: the same
    request to the same route is answered with this reply again, as that many hits, while that
    snapshot serves.
    """

    status: int
    body: bytes
    headers: Headers
    reuse: tuple[str, int] | None = None


def reply(
    status: int,
    body: bytes,
    content_type: bytes = b"application/json",
    headers: Headers = (),
    reuse: tuple[str, int] | None = None,
) -> Reply:
    """A :class:`Reply` of ``body`` with its content type and length, then ``headers``."""
    return Reply(
        status, body, ((b"content-type", content_type), (b"content-length", b"%d" % len(body)), *headers), reuse
    )


def _dumps(body: Any) -> bytes:
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def _json(body: Any, status: int = 200) -> Reply:
    return reply(status, _dumps(body))


def _parse(raw: bytes) -> dict:
    """The request's JSON object."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:  # the standard parser takes what JSON allows and orjson refuses: lone surrogates
            body = json.loads(raw)
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


def _tei_error(err: ApiError) -> Reply:
    return _json({"error": str(err), "error_type": err.error_type}, err.status)


_OPENAI_TYPES = {"Overloaded": "rate_limit_error", "Unhealthy": "service_unavailable", "Backend": "server_error"}


def _openai_error(err: ApiError) -> Reply:
    kind = _OPENAI_TYPES.get(err.error_type, "invalid_request_error")
    code = "not_in_snapshot" if err.error_type == "NotFound" else None
    return _json({"error": {"message": str(err), "type": kind, "param": err.param, "code": code}}, err.status)


MEMO_BODY = 1 << 16  # request bodies up to this size are keys of reused answers


class Memo:
    """Values by key up to ``max_bytes`` (each value's size as it is put), the least recently used
    dropped first. Event loop only."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.size = max_bytes, 0
        self._values: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()

    def get(self, key: Hashable) -> Any:
        entry = self._values.get(key)
        if entry is None:
            return None
        self._values.move_to_end(key)
        return entry[0]

    def put(self, key: Hashable, value: Any, size: int) -> None:
        if size > self.max_bytes:
            return
        old = self._values.pop(key, None)
        self.size += size - (old[1] if old else 0)
        self._values[key] = value, size
        while self.size > self.max_bytes:
            self.size -= self._values.popitem(last=False)[1][1]


Handler = Callable[[Callable], Awaitable[Reply]]


class _Disconnected(Exception):
    """The client went away before its request body arrived."""


async def read_body(receive: Callable, limit: int) -> bytes:
    """The request body, refused (413) past ``limit`` bytes without reading the rest."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "Validation", f"the request body is over the {limit:,}-byte limit")
        if not message.get("more_body", False):
            return b"".join([*chunks, chunk]) if chunks else chunk  # most bodies come in one message
        chunks.append(chunk)


class App:
    """A plain ASGI application: exact-path routes, a lifespan, no middleware.

    ``routes`` maps a path to ``{method: handler}``; a handler takes the ASGI ``receive`` (to read the
    body with :func:`read_body`) and returns a :class:`Reply`. ``on_shutdown`` runs when the server stops.
    ``reused`` maps a POST path to a function giving the reply of a body the serving snapshot answered
    whole before (timed and counted as the route does), or None: a server may answer such a request
    with it before the application runs (``serve/http.py``).
    """

    def __init__(
        self,
        routes: dict[str, dict[str, Handler]],
        on_shutdown: Callable[[], None],
        reused: dict[str, Callable[[bytes], Reply | None]] | None = None,
    ):
        self.routes, self.on_shutdown, self.reused = routes, on_shutdown, reused or {}

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        if scope["type"] != "http":
            return
        method, methods = scope["method"], self.routes.get(scope["path"])
        handler = methods and methods.get("GET" if method == "HEAD" else method)
        try:
            if handler is None:
                answer = self._unrouted(scope["path"], method, methods)
            else:
                answer = await handler(receive)
        except _Disconnected:
            return
        except Exception as err:  # noqa: BLE001 - a failure answers its request, the server goes on
            log.exception("%s %s failed", method, scope["path"])
            answer = _tei_error(ApiError(500, "Backend", f"the server failed on this request: {err}"[:300]))
        await send({"type": "http.response.start", "status": answer.status, "headers": answer.headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else answer.body})

    def _unrouted(self, path: str, method: str, methods: dict | None) -> Reply:
        if methods is None:
            return _tei_error(ApiError(404, "NotFound", f"no route {path}: see GET /info for what this server answers"))
        allowed = ", ".join(sorted(methods))
        refused = _tei_error(ApiError(405, "Validation", f"{path} answers {allowed}, not {method}"))
        return refused._replace(headers=(*refused.headers, (b"allow", allowed.encode())))

    async def _lifespan(self, receive: Callable, send: Callable) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.on_shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return


def create_app(
    service: Service, limits: Limits = Limits(), served_name: str = "querycache", metrics: Metrics | None = None
) -> App:
    """The ASGI application serving ``service``; its shutdown closes the service.

    ``served_name`` is the model name the OpenAI routes list and echo (any requested name is accepted);
    ``metrics`` what ``/metrics`` answers (one of its own unless given: ``--workers`` gives each worker's).
    """
    in_flight = 0  # requests being answered; read and written on the event loop only
    metrics = metrics or Metrics()
    if service.batcher:
        service.batcher.on_round = metrics.round
    engine = service.engine  # None without a fallback
    # a request waiting for its misses holds a thread: as many threads as requests may be in flight
    threads = ThreadPoolExecutor(limits.max_concurrent_requests, thread_name_prefix="querycache-request")

    async def in_thread(function: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(threads, function, *args)

    replies = Memo(32 << 20)  # whole answers of the snapshot, by route and request body

    reusers: dict[Handler, Callable[[bytes], Reply | None]] = {}

    def route(method: str, render: Callable[[ApiError], Reply]) -> Callable:
        """A handler of a POST body that answers an :class:`ApiError` in ``render``'s shape, and 429 when full.

        A request whose body was answered whole from the snapshot serving now is answered with that
        reply again, without parsing or looking up (one dictionary lookup for the head's requests),
        here or, through ``App.reused``, by the server before the handler runs.
        """

        def wrap(handler: Callable[[dict], Awaitable[Reply]]) -> Handler:
            def done(answer: Reply, started: float) -> Reply:
                metrics.request(method, started, None)
                took = b"%d" % round((time.perf_counter() - started) * 1000)  # TEI's compute time is its total
                timed = (*answer.headers, (b"x-compute-time", took), (b"x-total-time", took))
                return Reply(answer.status, answer.body, timed, answer.reuse)

            def again(raw: bytes, started: float) -> Reply | None:
                """The reply of ``raw`` again, counted, if the snapshot serving now answered it whole before."""
                answer = replies.get((method, raw)) if len(raw) <= MEMO_BODY else None
                if answer is None or not service.cache.reuse(*answer.reuse):
                    return None
                return done(answer, started)

            def reused(raw: bytes) -> Reply | None:  # App.reused: not when full, that answer is a 429
                return None if in_flight >= limits.max_concurrent_requests else again(raw, time.perf_counter())

            async def endpoint(receive: Callable) -> Reply:
                nonlocal in_flight
                started = time.perf_counter()
                if in_flight >= limits.max_concurrent_requests:
                    error = ApiError(429, "Overloaded", "the server is at its concurrent request limit")
                    metrics.request(method, started, error.error_type)
                    return render(error)
                in_flight += 1
                try:
                    raw = await read_body(receive, limits.payload_limit)
                    answer = again(raw, started)
                    if answer is not None:
                        return answer
                    answer = await handler(_parse(raw))
                    if answer.reuse and len(raw) <= MEMO_BODY:
                        replies.put((method, raw), answer, len(raw) + len(answer.body))
                except ApiError as err:
                    metrics.request(method, started, err.error_type)
                    return render(err)
                finally:
                    in_flight -= 1
                return done(answer, started)

            reusers[endpoint] = reused
            return endpoint

        return wrap

    def serving(task: str) -> None:
        if service.task != task:
            raise ApiError(424, "Backend", f"this server answers {service.task}: use {ROUTES[service.task]}")

    def complete(partial: Partial) -> tuple[Lookup, tuple[float, float]]:
        """``partial`` completed by the model (on a worker thread), and the seconds its misses waited
        in the batcher's queue and ran for in its engine rounds."""
        if service.batcher is None:
            return service.cache.complete(partial), (0.0, 0.0)
        with service.batcher.timed() as took:
            found = service.cache.complete(partial)
        return found, (took.queue, took.inference)

    async def answers(inputs: list[str], task: str, truncate: bool) -> tuple[Lookup, Headers]:
        """The answers of ``inputs`` for a route of ``task``: hits from the snapshot, misses from the model
        (None without one, and for a fill-mask template whose mask was cut); and TEI's headers of
        what they cost: characters, queue and inference milliseconds (0 where the snapshot answered)."""
        serving(task)
        partial = service.cache.known(inputs)  # hits: microseconds, on the loop itself
        if partial.missing:
            found, (queued, ran) = await in_thread(complete, partial)
        else:
            found, queued, ran = service.cache.complete(partial), 0.0, 0.0
        for i, key in enumerate(found.keys):
            if not is_query(key):
                raise ApiError(
                    400, "Empty", f"inputs[{i}] is empty once normalised (spaces or invisible only)", "input"
                )
        if not truncate and engine is not None:
            overlong = await in_thread(engine.overlong, found.keys)
            if overlong:
                raise ApiError(
                    413,
                    "Validation",
                    f"inputs[{overlong[0]}] is longer than the model's maximum of {engine.max_length} tokens: "
                    "shorten it or send truncate: true",
                    "input",
                )
        costs = (
            (b"x-compute-characters", b"%d" % sum(map(len, inputs))),
            (b"x-queue-time", b"%d" % round(queued * 1000)),
            (b"x-inference-time", b"%d" % round(ran * 1000)),
        )
        return found, costs

    def missed(found: Lookup) -> list[int]:
        """Positions without an answer because no fallback model is loaded."""
        return [] if engine is not None else [i for i, r in enumerate(found.results) if r is None]

    stored_unit = bool(service.model.get("normalize"))  # the model version answers unit vectors

    def unit(vectors: np.ndarray) -> np.ndarray:
        if stored_unit:
            return vectors
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    encoded = Memo(64 << 20)  # the JSON of the rows most asked for: encoding 384 floats costs more than a hit

    def snapshot_rows(found: Lookup, normalize_output: bool) -> bytes:
        """The JSON answer of a lookup answered wholly by the snapshot, from the rows' cached JSON."""
        raw = not normalize_output and not stored_unit

        def row_json(key: str, row: np.ndarray) -> bytes:
            memo = (found.snapshot_id, key, raw)  # the snapshot in the key: no row of another one is answered
            encoded_row = encoded.get(memo)
            if encoded_row is None:
                encoded_row = _dumps(row if raw else unit(row[None])[0])
                encoded.put(memo, encoded_row, len(encoded_row))
            return encoded_row

        rows = [row_json(key, row) for key, row in zip(found.keys, found.results)]
        return b"[" + b",".join(rows) + b"]"

    def stacked(found: Lookup) -> np.ndarray:
        rows = [r for r in found.results if r is not None]
        return np.stack(rows).astype(np.float32, copy=False) if rows else np.zeros((0, 0), np.float32)

    def with_nulls(rows: Any, found: Lookup) -> list[Any]:
        """``rows`` (one per answered input) in the places of their inputs, None where no answer exists."""
        rows = iter(rows)
        return [None if r is None else next(rows) for r in found.results]

    def answered(found: Lookup, body: bytes, costs: Headers) -> Reply:
        """The 200 of a lookup, with its headers; reusable where the snapshot answered every input."""
        headers = (
            (b"x-querycache-hits", b"%d" % found.hits),
            (b"x-querycache-snapshot", (found.snapshot_id or "").encode()),
            *costs,
        )
        whole = found.snapshot_id is not None and found.hits == len(found.keys)
        return reply(200, body, headers=headers, reuse=(found.snapshot_id, found.hits) if whole else None)

    @route("embed", _tei_error)
    async def embed(body: dict) -> Reply:
        inputs = _inputs(body.get("inputs"), "inputs", limits)
        normalize_output = _flag(body, "normalize", True)
        found, costs = await answers(inputs, "embed", _flag(body, "truncate", limits.auto_truncate))
        if found.hits == len(inputs):
            return answered(found, snapshot_rows(found, normalize_output), costs)
        vectors = stacked(found)
        vectors = unit(vectors) if normalize_output else vectors
        return answered(found, _dumps(with_nulls(vectors, found) if missed(found) else vectors), costs)

    @route("openai_embeddings", _openai_error)
    async def openai_embeddings(body: dict) -> Reply:
        inputs = _inputs(body.get("input"), "input", limits)
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise ApiError(422, "Validation", "`encoding_format` must be float or base64", "encoding_format")
        found, costs = await answers(inputs, "embed", limits.auto_truncate)
        vectors = stacked(found)
        if missed(found):
            i = missed(found)[0]
            raise ApiError(404, "NotFound", f"input[{i}] is not in the snapshot and no model answers misses", "input")
        vectors = unit(vectors)  # OpenAI's embeddings are unit vectors
        if body.get("dimensions") not in (None, vectors.shape[1]):
            raise ApiError(422, "Validation", f"this model answers {vectors.shape[1]} dimensions only", "dimensions")
        tokens = await in_thread(engine.count_tokens, found.keys) if engine else [0]
        if encoding == "base64":  # little-endian float32, as OpenAI's client decodes it
            rows = [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in vectors]
        else:
            rows = list(vectors)
        data = [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)]
        usage = {"prompt_tokens": sum(tokens), "total_tokens": sum(tokens)}
        answer = {"object": "list", "data": data, "model": body.get("model") or served_name, "usage": usage}
        return answered(found, _dumps(answer), costs)

    @route("predict", _tei_error)
    async def predict(body: dict) -> Reply:
        if _flag(body, "raw_scores", False):
            raise ApiError(422, "Validation", "snapshots hold probabilities, not raw scores", "raw_scores")
        inputs = _inputs(body.get("inputs"), "inputs", limits)
        found, costs = await answers(inputs, "classify", _flag(body, "truncate", limits.auto_truncate))
        ranked = [
            None
            if r is None
            else [{"score": p, "label": label} for label, p in sorted(r["scores"].items(), key=lambda kv: -kv[1])]
            for r in found.results
        ]
        return answered(found, _dumps(ranked[0] if isinstance(body["inputs"], str) else ranked), costs)

    @route("fill_mask", _tei_error)
    async def fill_mask(body: dict) -> Reply:
        inputs = _inputs(body.get("inputs"), "inputs", limits)
        serving("fill-mask")
        stored = service.model["top_k"]
        top_k = body.get("top_k", stored)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 < top_k <= stored:
            raise ApiError(422, "Validation", f"`top_k` must be an integer from 1 to {stored}, what is stored", "top_k")
        found, costs = await answers(inputs, "fill-mask", _flag(body, "truncate", limits.auto_truncate))
        predictions = [  # per input: the top_k of each mask position (none where the template's mask was cut)
            [{**p, "position": j} for j, position in enumerate(r or []) for p in position[:top_k]]
            for r in found.results
        ]
        for i in missed(found):
            predictions[i] = None
        return answered(found, _dumps(predictions), costs)

    async def models(receive: Callable) -> Reply:
        model = {"id": served_name, "object": "model", "created": 0, "owned_by": "querycache"}
        return _json({"object": "list", "data": [model]})

    async def prometheus(receive: Callable) -> Reply:
        text = metrics.render(service.cache.metrics(), service.task, service.batcher.queued() if service.batcher else 0)
        return reply(200, text.encode(), b"text/plain; version=0.0.4; charset=utf-8")

    async def health(receive: Callable) -> Reply:
        if service.ready():
            return reply(200, b"", b"text/plain")
        return _tei_error(ApiError(503, "Unhealthy", "no snapshot is being served"))

    async def info(receive: Callable) -> Reply:
        info = {**service.info(), "served_model_name": served_name, **dataclasses.asdict(limits)}
        return _json({**info, "pid": os.getpid()})

    def shutdown() -> None:
        service.close()
        threads.shutdown(wait=False, cancel_futures=True)

    routes = {
        "/embed": {"POST": embed},
        "/v1/embeddings": {"POST": openai_embeddings},
        "/predict": {"POST": predict},
        "/fill_mask": {"POST": fill_mask},
        "/v1/models": {"GET": models},
        "/health": {"GET": health},
        "/metrics": {"GET": prometheus},
        "/info": {"GET": info},
    }
    return App(routes, shutdown, {path: reusers[m["POST"]] for path, m in routes.items() if m.get("POST") in reusers})

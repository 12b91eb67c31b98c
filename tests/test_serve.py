"""``querycache serve`` for real: the uvicorn server in another process on loopback, spoken to over HTTP.

The snapshot is a real build of the tiny BERT; answers are checked against ``Snapshot.get`` (hits,
exact) and the engine (misses, within the fidelity gate).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn
from click.testing import CliRunner
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from querycache.inference import Engine, EngineConfig
from querycache.inference.model import default_model_dir
from querycache.runners.cli import main
from querycache.serve.app import App, Memo, Reply, read_body, reply
from querycache.serve.http import OneWriteProtocol
from querycache.store import Snapshot, normalize
from tests.conftest import build_args, free_port, use_s3, write_jsonl
from tests.store_helpers import make_snapshot

STORED = ["hotels in rome", "cheap flights to paris", "weather berlin today", "red shoes"]
MISSES = ["blue shirt near me", "pizza recipe"]
SCHEMA = {"encoding": "float32"}
MINILM = str(default_model_dir())  # the shipped model: not the tiny BERT the snapshot was built with


@pytest.fixture(scope="module")
def root(tiny_bert, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    log = write_jsonl(tmp / "q.jsonl", [{"query": q.upper() if i % 2 else q} for i, q in enumerate(STORED)])
    result = CliRunner().invoke(main, build_args(str(log), str(tmp / "root"), str(tiny_bert)))
    assert result.exit_code == 0, result.output
    return tmp / "root"


def _serve(root, *args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "querycache", "serve", str(root), "--port", str(port), "--quiet", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve exited with {process.returncode}: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise TimeoutError("serve did not become healthy in 90 s")


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(20)


@pytest.fixture(scope="module")
def server(root, tiny_bert):
    process, url = _serve(root, "--model", str(tiny_bert))
    with httpx.Client(base_url=url, timeout=60) as client:
        yield client
    _stop(process)


def _unit(vectors) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float64)
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def test_memo_keeps_the_most_recently_used_within_its_bytes():
    memo = Memo(100)
    memo.put("a", 1, 40)
    memo.put("b", 2, 40)
    assert memo.get("a") == 1  # "b" is now the least recently used
    memo.put("c", 3, 40)
    assert (memo.get("a"), memo.get("b"), memo.get("c"), memo.size) == (1, None, 3, 80)
    memo.put("c", 4, 10)  # put again: its old size is given back
    memo.put("big", 5, 101)  # over the whole budget: not kept, nothing dropped for it
    assert (memo.get("c"), memo.get("big"), memo.get("a"), memo.size) == (4, None, 1, 50)


def test_hits_are_the_snapshot_answers_and_say_so_in_headers(server, root):
    queries = ["Hotels in ROME", "  cheap FLIGHTS to paris", "red shoes"]
    response = server.post("/embed", json={"inputs": queries})
    assert response.status_code == 200, response.text
    with Snapshot.open(root) as snap:
        expected = [snap.get(q) for q in queries]
        assert response.headers["x-querycache-snapshot"] == snap.id
    assert response.headers["x-querycache-hits"] == "3"
    # TEI's headers of the cost: the characters asked for, no queue or model time for hits
    costs = {name: response.headers[f"x-{name}"] for name in ("compute-characters", "queue-time", "inference-time")}
    assert costs == {"compute-characters": str(sum(map(len, queries))), "queue-time": "0", "inference-time": "0"}
    assert response.headers["x-compute-time"] == response.headers["x-total-time"]
    np.testing.assert_allclose(response.json(), _unit(expected), rtol=1e-6, atol=1e-7)
    raw = server.post("/embed", json={"inputs": "red shoes", "normalize": False}).json()
    np.testing.assert_allclose(raw, [expected[2]], rtol=1e-6)


def test_the_batcher_tells_a_thread_what_its_misses_waited_and_ran_for(tiny_bert):
    from querycache.serve.batcher import Batcher

    batcher = Batcher(Engine(EngineConfig(model_dir=str(tiny_bert), device="cpu")))
    try:
        with batcher.timed() as took:
            assert len(batcher(["pizza recipe", "red shoes"])) == 2
            first = took.inference
            batcher(["blue shirt"])
        assert 0 < first < took.inference and took.queue >= 0  # both rounds, added up
        ran = took.inference
        batcher(["after the block"])  # counted nowhere
        with batcher.timed() as none:
            pass
        assert took.inference == ran and none.inference == none.queue == 0
    finally:
        batcher.close()


def test_a_body_that_arrives_in_parts_is_read_whole(server):
    """1.5 MB (under the 2 MB limit) crosses loopback in several reads: the server joins them."""
    padded = server.post("/embed", json={"inputs": ["red shoes"], "padding": "x" * 1_500_000})
    plain = server.post("/embed", json={"inputs": ["red shoes"]})
    assert padded.status_code == 200 and padded.json() == plain.json()


def test_misses_come_from_the_snapshots_model_version(server, root, tiny_bert):
    with Snapshot.open(root) as snap:
        model = snap.manifest["model"]
    engine = Engine(EngineConfig(model_dir=str(tiny_bert), dtype=model["dtype"], device="cpu"))
    assert engine.fingerprint == model["fingerprint"]
    response = server.post("/embed", json={"inputs": [MISSES[0], STORED[0], MISSES[1]]})
    assert response.status_code == 200 and response.headers["x-querycache-hits"] == "1"
    took = {name: int(response.headers[f"x-{name}-time"]) for name in ("queue", "inference", "total")}
    assert took["queue"] + took["inference"] <= took["total"] + 1  # parts of the whole, each rounded to ms
    got = _unit(response.json())
    want = _unit(engine([normalize(MISSES[0]), STORED[0], normalize(MISSES[1])]))
    assert (got * want).sum(axis=1).min() >= 0.999


def test_health_and_info(server, root, tiny_bert):
    assert server.get("/health").status_code == 200
    info = server.get("/info").json()
    with Snapshot.open(root) as snap:
        assert (info["snapshot_id"], info["model_fingerprint"]) == (snap.id, snap.manifest["model"]["fingerprint"])
    assert info["task"] == "embed" and info["snapshot_in_use"] and info["max_client_batch_size"] == 32


@pytest.mark.parametrize(
    ("body", "status", "error_type"),
    [
        (b"{broken", 422, "Validation"),
        (b"[1, 2]", 422, "Validation"),
        (b'{"inputs": 7}', 422, "Validation"),
        (b'{"inputs": ["ok", null]}', 422, "Validation"),
        (b'{"inputs": []}', 400, "Empty"),
        (b'{"inputs": ["fine", "   "]}', 400, "Empty"),
        (b'{"inputs": "\\u200b\\u200d"}', 400, "Empty"),
        (b'{"inputs": "rome", "normalize": "yes"}', 422, "Validation"),
        (json.dumps({"inputs": ["q"] * 33}).encode(), 422, "Validation"),
        (json.dumps({"inputs": "x" * 3_000_000}).encode(), 413, "Validation"),
        (b'{"inputs": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", 422, "Validation"),
    ],
    ids=["malformed", "not-object", "number", "null-item", "empty-list", "blank", "zero-width", "bad-flag",
         "over-batch", "over-payload", "deep-nesting"],
)  # fmt: skip
def test_bad_requests_are_a_json_4xx_and_the_server_lives_on(server, body, status, error_type):
    response = server.post("/embed", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert response.json()["error_type"] == error_type and response.json()["error"]
    assert server.get("/health").status_code == 200


def test_lone_surrogates_and_controls_are_normalised_not_refused(server, root):
    body = b'{"inputs": ["\\ud800Hotels\\u0000in\\tROME"]}'
    response = server.post("/embed", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200 and response.headers["x-querycache-hits"] == "1"


def test_a_model_that_is_not_the_snapshots_version_is_refused_in_one_line(root):
    done = subprocess.run(
        [sys.executable, "-m", "querycache", "serve", str(root), "--port", str(free_port()), "--model", MINILM],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "is not the model version of snapshot" in line and "--allow-model-mismatch" in line


def test_allowing_the_mismatch_answers_everything_from_the_model_and_says_so(root):
    process, url = _serve(root, "--allow-model-mismatch", "--model", MINILM)
    try:
        info = httpx.get(f"{url}/info").json()
        assert not info["snapshot_in_use"]
        response = httpx.post(f"{url}/embed", json={"inputs": STORED[:2]}, timeout=60)
        assert response.status_code == 200 and response.headers["x-querycache-hits"] == "0"
        assert len(response.json()[0]) == 384  # the shipped MiniLM answered, not the tiny BERT's snapshot
    finally:
        _stop(process)


def test_openai_embeddings_in_float_and_base64_with_usage(server, root, tiny_bert):
    queries = ["Hotels in ROME", MISSES[0]]
    floats = server.post("/v1/embeddings", json={"input": queries, "model": "anything-at-all"})
    assert floats.status_code == 200, floats.text
    body = floats.json()
    assert body["object"] == "list" and body["model"] == "anything-at-all"
    assert [(d["object"], d["index"]) for d in body["data"]] == [("embedding", 0), ("embedding", 1)]
    tei = server.post("/embed", json={"inputs": queries}).json()
    np.testing.assert_allclose([d["embedding"] for d in body["data"]], tei, rtol=1e-6, atol=1e-7)
    engine = Engine(EngineConfig(model_dir=str(tiny_bert), dtype="fp32", device="cpu"))
    tokens = engine.count_tokens([normalize(q) for q in queries])
    assert body["usage"] == {"prompt_tokens": sum(tokens), "total_tokens": sum(tokens)}
    packed = server.post("/v1/embeddings", json={"input": queries, "encoding_format": "base64"}).json()
    decoded = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in packed["data"]]
    np.testing.assert_array_equal(decoded, np.asarray(tei, dtype=np.float32))
    one = server.post("/v1/embeddings", json={"input": "red shoes"})
    assert one.headers["x-querycache-hits"] == "1" and len(one.json()["data"]) == 1
    (listed,) = server.get("/v1/models").json()["data"]
    assert listed["id"] == one.json()["model"] == tiny_bert.name


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"input": [1, 2, 3]}, 422, "input"),  # token ids: not supported
        ({"input": []}, 400, "input"),
        ({"input": "rome", "encoding_format": "int8"}, 422, "encoding_format"),
        ({"input": "rome", "dimensions": 7}, 422, "dimensions"),
        ({"input": " "}, 400, "input"),
    ],
)
def test_openai_errors_are_nested_objects(server, body, status, param):
    response = server.post("/v1/embeddings", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_requests_over_the_concurrency_limit_are_answered_429_at_once(root, tiny_bert):
    process, url = _serve(root, "--model", str(tiny_bert), "--max-concurrent-requests", "1")
    try:
        slow = {"inputs": [f"{w} {i}" for i, w in enumerate(MISSES * 16)]}  # 32 misses keep the model busy

        async def burst() -> list[int]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                replies = await asyncio.gather(*[client.post("/embed", json=slow) for _ in range(8)])
            return [reply.status_code for reply in replies]

        codes = asyncio.run(burst())
        assert 200 in codes and 429 in codes and set(codes) == {200, 429}
        assert httpx.post(f"{url}/v1/embeddings", json={"input": "rome"}).status_code == 200
        # a request the snapshot answered whole before is refused too while the slot is taken: here by
        # a request whose body the server waits for
        hit = {"inputs": [STORED[0]]}
        assert httpx.post(f"{url}/embed", json=hit).status_code == 200
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=30) as held:
            held.sendall(b"POST /embed HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\n")
            assert held.recv(64).startswith(b"HTTP/1.1 100 Continue")
            assert httpx.post(f"{url}/embed", json=hit).status_code == 429
            held.sendall(b"{}")
            assert held.recv(1 << 16).startswith(b"HTTP/1.1 422")
        assert httpx.post(f"{url}/embed", json=hit).status_code == 200
    finally:
        _stop(process)


def test_concurrent_misses_share_the_engines_rounds(server):
    before = server.get("/info").json()["miss_rounds"]
    requests = [{"inputs": [f"{w} {n}" for w in ("tea", "shop")]} for n in range(24)]  # 48 distinct misses

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=str(server.base_url), timeout=60) as client:
            return await asyncio.gather(*[client.post("/embed", json=body) for body in requests])

    replies = asyncio.run(burst())
    assert all(r.status_code == 200 and r.headers["x-querycache-hits"] == "0" for r in replies)
    after = server.get("/info").json()["miss_rounds"]
    assert after["queries"] - before["queries"] == 48
    assert after["rounds"] - before["rounds"] < len(requests) and after["largest"] > 2


def test_snapshots_published_under_load_are_served_without_a_failure_or_a_mixed_answer(root, tiny_bert, tmp_path):
    """Ten snapshots of the same model version published into a served root while clients keep asking."""
    served = tmp_path / "served"
    shutil.copytree(root, served, symlinks=True)
    with Snapshot.open(served) as snap:
        fingerprint, dim = snap.manifest["model"]["fingerprint"], len(snap.get(STORED[0]))
        answers = {snap.id: {k: _unit([snap.get(k)])[0] for k in STORED}}
    process, url = _serve(served, "--model", str(tiny_bert))
    replies: list[httpx.Response] = []

    async def ask(stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            while not stop.is_set():
                replies.append(await client.post("/embed", json={"inputs": STORED}))

    async def load() -> None:
        stop = asyncio.Event()
        clients = [asyncio.create_task(ask(stop)) for _ in range(4)]
        rng = np.random.default_rng(7)
        for _ in range(10):
            await asyncio.sleep(0.4)
            vectors = {k: rng.standard_normal(dim).astype(np.float32) for k in STORED}
            path = await asyncio.to_thread(
                make_snapshot, served, vectors, SCHEMA | {"dim": dim}, fingerprint=fingerprint
            )
            answers[path.name] = {k: _unit([v])[0] for k, v in vectors.items()}
        await asyncio.sleep(1.5)  # the cache looks at CURRENT at least once a second
        stop.set()
        await asyncio.gather(*clients)

    try:
        asyncio.run(load())
    finally:
        _stop(process)
    assert replies and all(r.status_code == 200 for r in replies)
    for r in replies:
        expected = answers[r.headers["x-querycache-snapshot"]]  # one snapshot answered all of a request
        np.testing.assert_allclose(r.json(), [expected[k] for k in STORED], rtol=1e-5, atol=1e-6)
    assert {r.headers["x-querycache-snapshot"] for r in replies[-8:]} == {max(answers)}
    assert len({r.headers["x-querycache-snapshot"] for r in replies}) >= 5


def test_sigterm_finishes_requests_in_flight_then_exits_0(root, tiny_bert):
    process, url = _serve(root, "--model", str(tiny_bert))
    body = {"inputs": [f"{w} {n}" for n in range(16) for w in ("fresh", "words")]}

    async def in_flight() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            asks = [asyncio.create_task(client.post("/embed", json=body)) for _ in range(4)]
            await asyncio.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            return await asyncio.gather(*asks)

    replies = asyncio.run(in_flight())
    assert [r.status_code for r in replies] == [200] * 4
    assert process.wait(30) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2)


def _samples(text: str) -> dict[str, float]:
    """``{'name{labels}': value}`` of a Prometheus exposition, comments left out."""
    rows = [line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")]
    return {name: float(value) for name, value in rows}


def _known_traffic(clients: list[httpx.Client]) -> None:
    """Requests of known outcome, dealt to the first and the last of ``clients``."""
    replies = [
        (clients[0], "/embed", {"json": {"inputs": STORED[:3]}}, 200),
        (clients[-1], "/embed", {"json": {"inputs": STORED[:3]}}, 200),
        (clients[0], "/v1/embeddings", {"json": {"input": ["brand new", "also new"]}}, 200),
        (clients[-1], "/embed", {"content": b"{nope"}, 422),
        (clients[0], "/embed", {"json": {"inputs": ["  "]}}, 400),
    ]
    for client, path, body, status in replies:
        assert client.post(path, **body).status_code == status


def _check_known_traffic(response: httpx.Response, root) -> None:
    assert response.headers["content-type"].startswith("text/plain")
    got = _samples(response.text)
    with Snapshot.open(root) as snap:
        snapshot_id = snap.id
    assert got['te_request_count{method="embed"}'] == 4 and got['te_request_count{method="openai_embeddings"}'] == 1
    assert got['te_request_success{method="embed"}'] == 2
    assert got['te_request_failure{err="validation"}'] == 1 and got['te_request_failure{err="empty"}'] == 1
    assert got["te_request_duration_count"] == 5
    assert got['querycache_lookups{task="embed",result="hit"}'] == 6
    assert got['querycache_lookups{task="embed",result="miss"}'] == 2
    assert got['querycache_lookups{task="embed",result="invalid"}'] == 1
    assert got["te_batch_next_size_count"] == 1 and got["te_batch_next_size_sum"] == 2
    assert got["te_queue_size"] == 0 and got["te_inference_duration_count"] == 1
    assert got[f'querycache_snapshot_info{{snapshot_id="{snapshot_id}",in_use="true"}}'] == 1
    assert 0 < got["querycache_snapshot_age_seconds"] < 3600


def test_metrics_count_known_traffic(root, tiny_bert):
    process, url = _serve(root, "--model", str(tiny_bert))
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            _known_traffic([client])
            response = client.get("/metrics")
    finally:
        _stop(process)
    _check_known_traffic(response, root)


def test_workers_share_the_port_and_any_scrape_sums_them_all(root, tiny_bert):
    process, url = _serve(root, "--model", str(tiny_bert), "--workers", "2")
    clients: dict[int, httpx.Client] = {}  # a kept-alive connection to each worker, by its pid
    try:
        for _ in range(200):
            client = httpx.Client(base_url=url, timeout=60)
            pid = client.get("/info").json()["pid"]
            if pid in clients:
                client.close()
            else:
                clients[pid] = client
            if len(clients) == 2:
                break
        assert len(clients) == 2, "200 connections all reached the same worker"
        _known_traffic(list(clients.values()))
        scrapes = [client.get("/metrics") for client in clients.values()]
    finally:
        for client in clients.values():
            client.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    for response in scrapes:
        _check_known_traffic(response, root)
    first, second = (_samples(r.text) for r in scrapes)
    first.pop("querycache_snapshot_age_seconds"), second.pop("querycache_snapshot_age_seconds")
    assert first == second


@pytest.fixture(scope="module", params=["classify", "fill-mask"])
def task_server(request, tiny_bert, tmp_path_factory):
    """A snapshot of another task and a server on it: ``(task, root, client)``."""
    tmp = tmp_path_factory.mktemp(request.param)
    log = write_jsonl(tmp / "q.jsonl", [{"query": q} for q in STORED])
    args = build_args(str(log), str(tmp / "root"), str(tiny_bert), "--task", request.param, "--fill-top-k", "3")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    process, url = _serve(tmp / "root", "--model", str(tiny_bert))
    with httpx.Client(base_url=url, timeout=60) as client:
        yield request.param, tmp / "root", client
    _stop(process)


def test_predict_and_fill_mask_answer_from_the_snapshot_and_the_model(task_server, tiny_bert):
    task, root, client = task_server
    route, other = ("/predict", "/fill_mask") if task == "classify" else ("/fill_mask", "/predict")
    response = client.post(route, json={"inputs": [STORED[0].upper(), MISSES[0]]})
    assert response.status_code == 200, response.text
    assert response.headers["x-querycache-hits"] == "1"
    with Snapshot.open(root) as snap:
        stored = snap.get(STORED[0])
    engine = Engine(EngineConfig(model_dir=str(tiny_bert), task=task, dtype="fp32", device="cpu", top_k=3))
    computed = engine([normalize(MISSES[0])])[0]
    hit, miss = response.json()
    if task == "classify":
        assert hit == [{"score": p, "label": label} for label, p in stored["scores"].items()]
        assert [row["label"] for row in miss] == list(computed["scores"])
        assert [row["score"] for row in hit] == sorted((row["score"] for row in hit), reverse=True)
        one = client.post(route, json={"inputs": STORED[1]}).json()
        assert isinstance(one, list) and set(one[0]) == {"score", "label"}
    else:
        assert hit == [{**p, "position": 0} for p in stored[0]]
        assert [p["token"] for p in miss] == [p["token"] for p in computed[0]]
        assert len(client.post(route, json={"inputs": STORED[1], "top_k": 2}).json()[0]) == 2
        assert client.post(route, json={"inputs": STORED[1], "top_k": 4}).status_code == 422
    wrong = client.post(other, json={"inputs": STORED[0]})
    assert wrong.status_code == 424 and route in wrong.json()["error"]
    assert client.post("/embed", json={"inputs": STORED[0]}).status_code == 424


def _upload(snapshot_dir, remote_root: str) -> str:
    """Put a local snapshot directory under ``remote_root`` and make it current there; its id."""
    from querycache.store import fs as store_fs
    from querycache.store import remote

    snapshot_id = json.loads((snapshot_dir / "manifest.json").read_text())["snapshot_id"]
    for path in sorted(snapshot_dir.rglob("*")):
        if path.is_file():
            rel = path.relative_to(snapshot_dir).as_posix()
            store_fs.write_bytes(store_fs.join(remote_root, "snapshots", snapshot_id, rel), path.read_bytes())
    remote.publish(remote_root, snapshot_id, remote.current(remote_root))
    return snapshot_id


def test_pull_from_object_storage_serves_each_new_snapshot(root, tiny_bert, tmp_path, s3):
    use_s3(s3["options"])
    remote_root = f"{s3['bucket']}/serve-pull"
    with Snapshot.open(root) as snap:
        first = _upload(snap.directory, remote_root)
        fingerprint, dim = snap.manifest["model"]["fingerprint"], len(snap.get(STORED[0]))
    served = tmp_path / "served"
    flags = ["--model", str(tiny_bert), "--pull-from", remote_root, "--every", "0.3", "--", *s3["options"]]
    process, url = _serve(served, *flags)
    try:
        assert httpx.get(f"{url}/info").json()["snapshot_id"] == first
        vectors = {k: np.random.default_rng(3).standard_normal(dim).astype(np.float32) for k in STORED}
        local = make_snapshot(tmp_path / "w", vectors, SCHEMA | {"dim": dim}, fingerprint=fingerprint, do_publish=False)
        second = _upload(local, remote_root)
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/info").json()["snapshot_id"] != second and time.monotonic() < deadline:
            time.sleep(0.2)
        response = httpx.post(f"{url}/embed", json={"inputs": [STORED[1]]})
        assert response.headers["x-querycache-snapshot"] == second
        np.testing.assert_allclose(response.json(), _unit([vectors[STORED[1]]]), rtol=1e-5, atol=1e-6)
    finally:
        _stop(process)


def test_serve_refuses_what_it_cannot_serve_in_one_line(cli, root, tmp_path):
    with Snapshot.open(root) as snap:
        directory = snap.directory
    cases = {
        str(directory): "has no CURRENT: serve takes the root that build publishes into",
        str(tmp_path): "has no CURRENT",
        "s3://bucket/qc": "pass a local ROOT and --pull-from s3://bucket/qc",
    }
    for target, words in cases.items():
        result = cli("serve", target)
        assert result.exit_code == 2 and words in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1


LONG = " ".join(f"word{i}" for i in range(2_000))  # far over any model's maximum length


def test_overlong_inputs_are_truncated_unless_the_request_says_not_to(server):
    assert server.post("/embed", json={"inputs": [LONG, STORED[0]]}).status_code == 200
    assert server.post("/embed", json={"inputs": LONG, "truncate": True}).status_code == 200
    refused = server.post("/embed", json={"inputs": [STORED[0], LONG], "truncate": False})
    assert refused.status_code == 413 and refused.json()["error_type"] == "Validation"
    assert "inputs[1] is longer than the model's maximum" in refused.json()["error"]
    assert server.post("/embed", json={"inputs": STORED[0], "truncate": False}).status_code == 200


def test_no_truncate_refuses_overlong_inputs_unless_a_request_asks(root, tiny_bert):
    process, url = _serve(root, "--model", str(tiny_bert), "--no-truncate")
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            assert client.get("/info").json()["auto_truncate"] is False
            assert client.post("/embed", json={"inputs": LONG}).status_code == 413
            assert client.post("/embed", json={"inputs": LONG, "truncate": True}).status_code == 200
            openai = client.post("/v1/embeddings", json={"input": [LONG]})
            assert openai.status_code == 413 and openai.json()["error"]["param"] == "input"
            assert client.post("/embed", json={"inputs": STORED}).status_code == 200
    finally:
        _stop(process)


def test_no_fallback_answers_only_the_snapshot_without_loading_a_model(root, tmp_path):
    served = tmp_path / "served"
    shutil.copytree(root, served, symlinks=True)
    process, url = _serve(served, "--no-fallback")
    try:
        with open(f"/proc/{process.pid}/maps") as maps:
            assert "libtorch" not in maps.read()  # no model, not even torch, is loaded
        with httpx.Client(base_url=url, timeout=60) as client, Snapshot.open(served) as snap:
            info = client.get("/info").json()
            assert info["fallback"] is False and info["model_fingerprint"] == snap.manifest["model"]["fingerprint"]
            response = client.post("/embed", json={"inputs": [MISSES[0], STORED[1]]})
            assert response.status_code == 200 and response.headers["x-querycache-hits"] == "1"
            miss, hit = response.json()
            assert miss is None
            np.testing.assert_allclose(hit, _unit([snap.get(STORED[1])])[0], rtol=1e-6, atol=1e-7)
            assert client.post("/embed", json={"inputs": MISSES}).json() == [None, None]
            missing = client.post("/v1/embeddings", json={"input": [STORED[0], MISSES[1]]})
            assert missing.status_code == 404
            assert (
                missing.json()["error"]["code"] == "not_in_snapshot"
                and "input[1]" in missing.json()["error"]["message"]
            )
            found = client.post("/v1/embeddings", json={"input": STORED[0]}).json()
            assert len(found["data"]) == 1 and found["usage"]["prompt_tokens"] == 0
            assert "te_queue_size 0" in client.get("/metrics").text
            # a snapshot of another model version is not served: nothing would vouch for its answers
            dim = len(snap.get(STORED[0]))
        make_snapshot(served, {STORED[0]: np.ones(dim, np.float32)}, SCHEMA | {"dim": dim}, fingerprint="e" * 64)
        httpx_client = httpx.Client(base_url=url, timeout=60)
        deadline = time.monotonic() + 30
        while httpx_client.get("/health").status_code == 200 and time.monotonic() < deadline:
            httpx_client.post("/embed", json={"inputs": STORED[0]})  # lookups check CURRENT
            time.sleep(0.2)
        assert httpx_client.get("/health").status_code == 503
        assert httpx_client.post("/embed", json={"inputs": STORED[0]}).json() == [None]
    finally:
        _stop(process)


def test_no_fallback_refuses_a_model_in_one_line(cli, root, tiny_bert):
    result = cli("serve", str(root), "--no-fallback", "--model", str(tiny_bert))
    assert result.exit_code == 2 and "--no-fallback loads no model" in result.output


class _Counted(OneWriteProtocol):
    """OneWriteProtocol whose socket transport notes what each write sends (and sends it)."""

    writes: list[bytes] = []

    def connection_made(self, transport) -> None:
        writes = self.writes

        class Noted:
            def write(self, data: bytes) -> None:
                writes.append(bytes(data))
                transport.write(data)

            def __getattr__(self, name: str):
                return getattr(transport, name)

        super().connection_made(Noted())


async def _answer(scope, receive, send) -> None:
    if scope["type"] == "http":
        while (await receive()).get("more_body"):
            pass
        body = b"x" * 5000
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5000")]})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})


@contextlib.contextmanager
def _uvicorn(app, protocol=OneWriteProtocol, **settings):
    """A real uvicorn server of ``app`` in this process (its port), quiet as ``serve --quiet`` is."""
    # log_config None: the test process's logging stays as it is
    quiet = {"access_log": False, "proxy_headers": False, "server_header": False, **settings}
    config = uvicorn.Config(
        app, port=free_port(), http=protocol, loop="uvloop", lifespan="off", log_config=None, **quiet
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield config.port
    finally:
        server.should_exit = True
        thread.join(10)


def test_an_answer_is_one_write_and_100_continue_and_head_go_at_once():
    """The status line and headers leave in one write with the body: one segment, not two."""
    post = b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n"
    with _uvicorn(_answer, _Counted) as port, socket.create_connection(("127.0.0.1", port), timeout=10) as sock:

        def ask(request: bytes, end: bytes) -> list[bytes]:
            """What the server wrote for ``request``, once what came back ends with ``end``."""
            _Counted.writes.clear()
            sock.sendall(request)
            got = b""
            while not got.endswith(end):
                chunk = sock.recv(1 << 16)
                assert chunk, f"the connection closed after {got!r}"
                got += chunk
            return list(_Counted.writes)

        (whole,) = ask(post + b"\r\n{}", b"x" * 5000)
        assert whole.startswith(b"HTTP/1.1 200") and whole.endswith(b"\r\n\r\n" + b"x" * 5000)
        (head,) = ask(b"HEAD / HTTP/1.1\r\nhost: t\r\n\r\n", b"\r\n\r\n")  # no body: the head goes alone
        assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")
        # a client that asks to continue hears so before it sends the body
        go_on = b"HTTP/1.1 100 Continue\r\n\r\n"
        assert ask(post + b"expect: 100-continue\r\n\r\n", go_on) == [go_on]
        (whole,) = ask(b"{}", b"x" * 5000)
        assert whole.startswith(b"HTTP/1.1 200")


def _read_answers(sock: socket.socket, count: int) -> list[tuple[bytes, bytes]]:
    """The next ``count`` answers on ``sock``: (head, body) each, the body by its content-length."""
    got, answers = b"", []
    while len(answers) < count:
        head, sep, rest = got.partition(b"\r\n\r\n")
        length = next((int(line[15:]) for line in head.split(b"\r\n") if line.startswith(b"content-length: ")), -1)
        if sep and (length == 0 or len(rest) >= length):  # an interim 100 has no content-length: length 0
            answers.append((head, rest[: max(length, 0)]))
            got = rest[max(length, 0) :]
            continue
        chunk = sock.recv(1 << 16)
        assert chunk, f"the connection closed after {got!r}"
        got += chunk
    assert not got, f"more than {count} answers: {got!r}"
    return answers


def test_the_protocol_answers_a_reused_body_itself_and_the_application_everything_else():
    """A body the application's ``reused`` answers is answered without the application, in order, on
    keep-alive and closing connections; a body that must reach the application does."""
    bodies: list[bytes] = []

    async def echo(receive):
        bodies.append(await read_body(receive, 8 << 20))
        return reply(200, b"app:%d" % len(bodies[-1]))

    def reused(raw: bytes) -> Reply | None:
        if raw == b"large":
            return reply(200, b"x" * (4 << 20))
        return reply(200, b"memo", headers=((b"x-querycache-hits", b"1"),)) if raw == b"known" else None

    app = App({"/r": {"POST": echo}}, lambda: None, {"/r": reused})
    post = b"POST /r HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n"
    with _uvicorn(app) as port, socket.create_connection(("127.0.0.1", port), timeout=10) as sock:

        def ask(*parts: bytes, count: int = 1) -> list[tuple[bytes, bytes]]:
            for part in parts:
                sock.sendall(part)
                time.sleep(0.05)  # parts arrive apart
            return _read_answers(sock, count)

        ((head, body),) = ask(post % 5 + b"\r\nknown")
        assert head.startswith(b"HTTP/1.1 200") and b"x-querycache-hits: 1" in head and body == b"memo"
        assert b"date: " in head and bodies == []
        assert ask(post % 5 + b"\r\nother")[0][1] == b"app:5" and bodies == [b"other"]
        # pipelined: in order; one that waited behind the application's answer goes to the application
        known, other = post % 5 + b"\r\nknown", post % 5 + b"\r\nother"
        answers = ask(known + other + known, count=3)
        assert [body for _, body in answers] == [b"memo", b"app:5", b"app:5"] and len(bodies) == 3
        assert ask(post % 5 + b"\r\nkn", b"own")[0][1] == b"memo"  # a body in parts: answered once it is in
        gc.collect()
        gc.disable()  # each answer frees its request at once, leaving nothing for the collector
        try:
            for _ in range(20):
                ask(known), ask(other)
            alive = sum(type(o) is RequestResponseCycle for o in gc.get_objects())
        finally:
            gc.enable()
        assert alive <= 2, f"{alive} request cycles alive after 40 answered"
        # a client that waits for 100 Continue hears it, from the application that then answers
        (interim,) = ask(post % 5 + b"expect: 100-continue\r\n\r\n")
        assert interim[0] == b"HTTP/1.1 100 Continue"
        assert ask(b"known")[0][1] == b"app:5" and len(bodies) == 24
        # a body too long to be a reused one goes to the application as it arrives
        big = 4 << 20  # past what one read takes in: uvicorn stops reading until the application does
        assert ask(post % big + b"\r\n" + b"k" * big)[0][1] == b"app:%d" % big
        # a request that ends its connection: answered, marked so, and the connection closed at once
        ((head, body),) = ask(post % 5 + b"connection: close\r\n\r\nknown")
        sock.settimeout(2)  # uvicorn would close it after 5 idle seconds anyway
        assert body == b"memo" and b"connection: close" in head and sock.recv(1) == b""
        # a client that stops reading: once the server's writes back up, the application answers (and
        # waits for the client), so that answers do not pile up in the server
        with socket.create_connection(("127.0.0.1", port), timeout=10) as deaf:
            before = len(bodies)
            for _ in range(20):  # each request on its own (not pipelined behind the one before)
                deaf.sendall(post % 5 + b"\r\nlarge")
                time.sleep(0.03)
            deadline = time.monotonic() + 10
            while len(bodies) == before and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(bodies) > before
            answers = _read_answers(deaf, 20)  # then every one is answered, in order, once the client reads
            assert {body for _, body in answers} == {b"x" * (4 << 20), b"app:5"}
    with _uvicorn(app, timeout_keep_alive=1) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(post % 5 + b"\r\nknown")
            assert _read_answers(sock, 1)[0][1] == b"memo"
            assert sock.recv(1) == b""  # the answer ended its cycle: the connection idles out after a second
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"POST /r HTTP/1.0\r\ncontent-length: 5\r\n\r\nknown")  # HTTP/1.0: no keep-alive
            ((head, body),) = _read_answers(sock, 1)
            assert head.startswith(b"HTTP/1.1 200") and body == b"memo" and sock.recv(1) == b""


def test_unknown_paths_and_methods_are_json_errors(server):
    missing = server.get("/nope")
    assert missing.status_code == 404 and missing.json()["error_type"] == "NotFound"
    wrong = server.get("/embed")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST" and "not GET" in wrong.json()["error"]
    head = server.head("/health")
    assert head.status_code == 200 and head.content == b""

"""``querycache serve`` under load from wrk on loopback, in one run against its own ``/health`` floor.

    python bench/serve.py [--queries 2000] [--seconds 10] [--model DIR] [--workers N] [--share-cores]

Builds a snapshot of ``--queries`` generated queries (the shipped MiniLM unless ``--model``), starts
the server as its own process, then drives it with wrk (Debian's ``wrk``): ``/health`` (the HTTP
floor), one-input ``/embed`` hits, misses (a new query each request) at 1 and 64 connections, and an
80/20 hit/miss mix at 64, each server warmed up by a second of wrk first. Prints requests/s, p50 and
p99 latency, non-2xx replies and the ratios of the targets of issue 20: hits / floor >= 0.7, hit p99
<= 10 ms, misses at 64 / misses at 1 >= 3.

The servers run on the first half of the machine's cores and wrk on the other half (``--share-cores``:
all of them share all), so that the load generator's own work is not taken from the server's.

The ceiling of a hit is measured in the same run: a ten-line ASGI callable on the same uvicorn, set
up as ``serve --quiet`` sets it up, answering every request of the hits script with the bytes of one
real hit, without reading them from anything: what HTTP alone costs for a request and an answer of
that size.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # import the repo's packages when run as a script
from bench.loggen import generate  # noqa: E402

LUA = """
local queries = {%s}
local n, id, asks = 0, 0, {}
local function ask(q)
  return wrk.format("POST", "/embed", {["Content-Type"] = "application/json"}, '{"inputs": ["' .. q .. '"]}')
end
function setup(thread) id = id + 1; thread:set("id", id) end
function init(args)
  math.randomseed(id)
  for i, q in ipairs(queries) do asks[i] = ask(q) end  -- the hits' requests are made once: wrk's own cost stays low
end
request = function()
  n = n + 1
  if %s then return ask("miss " .. id .. " " .. n .. " " .. math.random(1e9)) end
  return asks[(n %% #queries) + 1]
end
"""
MISS_WHEN = {"hits": "false", "misses": "true", "mix": "n %% 5 == 0"}
CEILING = """
BODY = %r


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%%d" %% len(BODY))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": BODY})
"""


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _build(queries: int, model: str | None, tmp: Path) -> tuple[Path, list[str]]:
    texts = {r["query"].lower() for r in generate(queries * 3, queries, users=1000)}
    heads = sorted(q for q in texts if '"' not in q and "\\" not in q)[:queries]  # spliced into JSON by Lua
    (tmp / "q.jsonl").write_text("".join(json.dumps({"query": q}) + "\n" for q in heads))
    args = ["build", "--logs", str(tmp / "q.jsonl"), "--out", str(tmp / "root"), "--json", "--quiet"]
    subprocess.run([sys.executable, "-m", "querycache", *args, *(["--model", model] if model else [])], check=True)
    return tmp / "root", heads


SERVER_CORES: set[int] | None = None  # where the servers run and, the rest, where wrk runs (None: anywhere)
WRK_CORES: set[int] | None = None


def _on(cores: set[int] | None):
    """A ``preexec_fn`` keeping a child process on ``cores``."""
    return (lambda: os.sched_setaffinity(0, cores)) if cores else None


def _wrk(url: str, connections: int, seconds: int, script: Path | None) -> dict:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", *(["-s", str(script)] if script else [])]
    out = subprocess.run([*command, url], capture_output=True, text=True, check=True, preexec_fn=_on(WRK_CORES)).stdout
    unit = {"us": 1e-3, "ms": 1.0, "s": 1e3}

    def latency(pct: str) -> float:
        value, suffix = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)$", out, re.M).groups()
        return float(value) * unit[suffix]

    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": latency("50"),
        "p99_ms": latency("99"),
        "non_2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": errors.group(1) if errors else "",
    }


def _start(command: list[str], url: str) -> subprocess.Popen:
    """A server process, once ``url``/health answers."""
    server = subprocess.Popen(command, preexec_fn=_on(SERVER_CORES))
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            return server
        except OSError:
            time.sleep(0.2)
    server.kill()
    sys.exit(f"{' '.join(command)} did not answer in 60 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--model")
    parser.add_argument("--workers", type=int, default=1, help="serve --workers (the ceiling app gets as many)")
    parser.add_argument("--share-cores", action="store_true", help="servers and wrk on all cores, not half each")
    args = parser.parse_args()
    global SERVER_CORES, WRK_CORES
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []  # Linux: else shared
    if len(cores) > 1 and not args.share_cores:
        SERVER_CORES, WRK_CORES = set(cores[: len(cores) // 2]), set(cores[len(cores) // 2 :])
    if shutil.which("wrk") is None:
        sys.exit("bench/serve.py needs wrk: apt-get install wrk")
    with tempfile.TemporaryDirectory(prefix="qc-serve-bench-") as name:
        tmp = Path(name)
        root, heads = _build(args.queries, args.model, tmp)
        url = f"http://127.0.0.1:{_port()}"
        command = [sys.executable, "-m", "querycache", "serve", str(root), "--port", url.rsplit(":", 1)[1], "--quiet"]
        command += ["--workers", str(args.workers)]
        server = _start([*command, *(["--model", args.model] if args.model else [])], url)
        try:
            hit = urllib.request.Request(f"{url}/embed", json.dumps({"inputs": [heads[0]]}).encode())
            (tmp / "ceiling.py").write_text(CEILING % urllib.request.urlopen(hit).read())
            quoted = ", ".join(json.dumps(q, ensure_ascii=False) for q in heads)  # LuaJIT reads no \u escapes
            scripts = {}
            for kind, when in MISS_WHEN.items():
                scripts[kind] = tmp / f"{kind}.lua"
                scripts[kind].write_text(LUA % (quoted, when.replace("%%", "%")))
            runs = {
                "health, 64 connections": (f"{url}/health", 64, None),
                "hits, 64 connections": (url, 64, scripts["hits"]),
                "hits, 1 connection": (url, 1, scripts["hits"]),
                "misses, 1 connection": (url, 1, scripts["misses"]),
                "misses, 64 connections": (url, 64, scripts["misses"]),
                "80/20 hit/miss, 64 connections": (url, 64, scripts["mix"]),
            }
            for target, script in ((f"{url}/health", None), (url, scripts["hits"])):  # warm up: not counted
                _wrk(target, 64, 1, script)
            figures = {label: _wrk(target, c, args.seconds, script) for label, (target, c, script) in runs.items()}
            info = json.loads(urllib.request.urlopen(f"{url}/info").read())
        finally:
            server.terminate()
            server.wait(30)
        ceiling_url = f"http://127.0.0.1:{_port()}"
        uvicorn = ["uvicorn", "ceiling:app", "--app-dir", str(tmp), "--loop", "uvloop"]
        uvicorn += ["--http", "querycache.serve.http:OneWriteProtocol", "--no-access-log", "--no-proxy-headers"]
        uvicorn += ["--no-server-header"]  # as serve --quiet runs uvicorn
        uvicorn += ["--workers", str(args.workers)]
        ceiling = _start(
            [sys.executable, "-m", *uvicorn, "--port", ceiling_url.rsplit(":", 1)[1], "--log-level", "warning"],
            ceiling_url,
        )
        try:
            _wrk(ceiling_url, 64, 1, scripts["hits"])
            figures["ceiling: constant hit, 64 conn."] = _wrk(ceiling_url, 64, args.seconds, scripts["hits"])
        finally:
            ceiling.terminate()
            ceiling.wait(30)
    head = f"model {info['model_id']} ({info['model_dtype']}), {len(heads)} stored queries, wrk -t1 {args.seconds} s"
    where = (
        f"servers on cores {sorted(SERVER_CORES)}, wrk on {sorted(WRK_CORES)}"
        if SERVER_CORES
        else "all share the cores"
    )
    print(f"{head}, {args.workers} server process(es), {where}")
    print(f"{'run':34s} {'requests/s':>11s} {'p50 ms':>8s} {'p99 ms':>8s} {'non-2xx':>8s}")
    for label, f in figures.items():
        row = f"{label:34s} {f['rps']:11,.0f} {f['p50_ms']:8.2f} {f['p99_ms']:8.2f} {f['non_2xx']:8d}"
        print(row, f["socket_errors"])
    floor, hits = figures["health, 64 connections"], figures["hits, 64 connections"]
    one, many = figures["misses, 1 connection"], figures["misses, 64 connections"]
    top = figures["ceiling: constant hit, 64 conn."]
    print(f"hits / floor at 64: {hits['rps'] / floor['rps']:.2f} (>= 0.7); hit p99 {hits['p99_ms']:.2f} ms (<= 10)")
    print(
        f"ceiling / floor: {top['rps'] / floor['rps']:.2f} (HTTP alone); hits / ceiling: {hits['rps'] / top['rps']:.2f}"
    )
    print(
        f"hits / misses at 64: {hits['rps'] / many['rps']:.1f}x; misses 64 / 1: {many['rps'] / one['rps']:.2f} (>= 3)"
    )
    print(f"engine rounds: {info['miss_rounds']}")
    if any(f["non_2xx"] or f["socket_errors"] for f in figures.values()):
        sys.exit("some requests failed: the figures above do not count")


if __name__ == "__main__":
    main()

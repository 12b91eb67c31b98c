"""The reliability suite: killed builds, a full disk, readers under load while snapshots are swapped.

The default run keeps a small subset (2 kills, one disk-full build, a short load run);
``pytest -m reliability -s`` runs all of it and prints the figures of the README's Reliability table.
"""

from __future__ import annotations

import json
import random
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from querycache.inference import Engine, EngineConfig
from querycache.store import Snapshot, current_id, gc
from querycache.store.publish import SNAPSHOTS
from querycache.store.writer import write_snapshot
from tests import load_reader
from tests.tiny_bert import WORDS

REPO = Path(__file__).resolve().parents[1]
# Progress lines a build prints, in order, and the phase each one opens.
PHASES = {"read": "reading ", "infer": "model ready", "write": "wrote shard", "publish": "fidelity of"}


def write_logs(path: Path, lines: int, seed: int) -> Path:
    rng = random.Random(seed)
    phrases = sorted({" ".join(rng.sample(WORDS, rng.randint(1, 5))) for _ in range(3000)})
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(lines):
            fh.write(json.dumps({"query": rng.choice(phrases), "user": f"u{rng.randrange(50)}"}) + "\n")
    return path


def build_command(logs: Path, out: Path, model: Path) -> list[str]:
    args = ["build", "--logs", str(logs), "--out", str(out), "--model", str(model), "--dtype", "fp32", "--json"]
    return [sys.executable, "-m", "querycache", *args, "--streams", "1"]


def run_build(logs, out, model, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(build_command(logs, out, model), cwd=REPO, capture_output=True, text=True, timeout=600, **kw)


def kill_during(phase: str, delay: float, logs: Path, out: Path, model: Path) -> str:
    """Start a build, SIGKILL it ``delay`` seconds after it enters ``phase``; return the phase it died in."""
    proc = subprocess.Popen(
        build_command(logs, out, model), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    entered, last = threading.Event(), ["start"]

    def watch() -> None:
        for line in proc.stderr:
            for name, marker in PHASES.items():
                if marker in line:
                    last[0] = name
                    entered.set() if name == phase else None

    threading.Thread(target=watch, daemon=True).start()
    entered.wait(timeout=300)
    time.sleep(delay)
    if proc.poll() is not None:
        return "finished"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return last[0]


def assert_current_verifies(cli, root: Path) -> None:
    result = cli("verify", root)
    assert result.exit_code == 0, result.output
    with Snapshot.open(root) as snap:
        assert len(snap) > 0


def killed_builds(cli, model: Path, tmp_path: Path, plan: list[tuple[str, float]]) -> dict:
    root = tmp_path / "root"
    first = write_logs(tmp_path / "first.jsonl", 4000, seed=1)
    assert run_build(first, root, model).returncode == 0
    killed: dict[str, int] = {}
    for i, (phase, delay) in enumerate(plan):
        logs = write_logs(tmp_path / f"log-{i}.jsonl", 6000, seed=10 + i)
        died_in = kill_during(phase, delay, logs, root, model)
        killed[died_in] = killed.get(died_in, 0) + 1
        assert_current_verifies(cli, root)  # CURRENT names a complete snapshot after every kill
    done = run_build(write_logs(tmp_path / "last.jsonl", 4000, seed=99), root, model)
    assert done.returncode == 0, done.stderr[-2000:]
    assert current_id(root) == json.loads(done.stdout.strip().splitlines()[-1])["snapshot_id"]
    assert_current_verifies(cli, root)
    assert cli("gc", root, "--keep", "1").exit_code == 0
    assert [p.name for p in (root / SNAPSHOTS).iterdir()] == [current_id(root)]  # no staging left behind
    assert not list(root.glob(".CURRENT.*"))
    return killed


def test_killed_builds_leave_a_verified_current_and_nothing_gc_cannot_remove(cli, tiny_bert, tmp_path):
    killed = killed_builds(cli, tiny_bert, tmp_path, [("infer", 0.0), ("publish", 0.0)])
    assert sum(n for phase, n in killed.items() if phase != "finished") >= 1


@pytest.mark.reliability
def test_twelve_random_kills_across_every_phase(cli, tiny_bert, tmp_path):
    rng = random.Random(9)
    plan = [(phase, rng.uniform(0, 0.6)) for phase in PHASES for _ in range(3)]
    killed = killed_builds(cli, tiny_bert, tmp_path, plan)
    print(f"\nRELIABILITY kills: {json.dumps(killed)}")
    assert sum(n for phase, n in killed.items() if phase != "finished") >= 10


def _no_bigger_files(limit: int):
    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead

    return limit_file_size


def test_a_full_disk_fails_the_build_with_one_line_and_publishes_nothing(tiny_bert, tmp_path):
    root = tmp_path / "root"
    assert run_build(write_logs(tmp_path / "small.jsonl", 200, seed=1), root, tiny_bert).returncode == 0
    before = current_id(root)
    big = write_logs(tmp_path / "big.jsonl", 6000, seed=2)
    done = run_build(big, root, tiny_bert, preexec_fn=_no_bigger_files(64 * 1024))
    assert done.returncode == 1, done.stderr[-3000:]
    message = done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr and str(root) in message and "space" in message, message
    assert current_id(root) == before
    assert [p.name for p in (root / SNAPSHOTS).iterdir()] == [before]  # the staging directory went too


# -- readers under load ------------------------------------------------------------------------
def readers_under_load(tiny_bert, tmp_path, processes: int, threads: int, swaps: int) -> list[dict]:
    engine = Engine(EngineConfig(model_dir=str(tiny_bert), dtype="fp32", device="cpu", streams=1))
    dim, root = engine.schema["dim"], tmp_path / "root"
    rng = random.Random(3)
    keys = sorted({" ".join(rng.sample(WORDS, rng.randint(1, 4))) for _ in range(400)})
    (tmp_path / "keys.json").write_text(json.dumps(keys))

    def publish(index: int) -> None:
        fingerprint = "0" * 64 if load_reader.foreign(index) else engine.fingerprint
        results = {k: load_reader.value(index, k, dim) for k in keys if load_reader.holds(index, k)}
        write_snapshot(root, results, {"encoding": "float32", "dim": dim}, model={"fingerprint": fingerprint})
        gc(root, keep=2)  # the directory a reader may still hold goes away under it

    publish(0)
    stop, outs = tmp_path / "stop", [tmp_path / f"reader-{i}.json" for i in range(processes)]
    command = [sys.executable, "-m", "tests.load_reader", str(root), str(tiny_bert), str(tmp_path / "keys.json")]
    procs = [subprocess.Popen([*command, str(stop), str(out), str(threads)], cwd=REPO) for out in outs]
    deadline = time.monotonic() + 300
    while not all(Path(f"{out}.ready").exists() for out in outs) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    for index in range(1, swaps + 1):
        publish(index)
        time.sleep(0.3)
    time.sleep(1.0)
    stop.write_text("stop")
    for proc in procs:
        assert proc.wait(timeout=300) == 0
    return [json.loads(out.read_text()) for out in outs]


def check_load(results: list[dict], swaps: int) -> dict:
    figures = {
        "lookups": sum(r["lookups"] for r in results),
        "failed": sum(r["failed"] for r in results),
        "p99_us": max(r["p99_us"] for r in results),
        "p50_us": max(r["p50_us"] for r in results),
        "reloads": min(r["reloads"] for r in results),
        "rss_growth_mb": max(r["rss_end_mb"] - r["rss_start_mb"] for r in results),
        "mapped_snapshot_files": max(r["mapped_snapshot_files"] for r in results),
    }
    assert figures["failed"] == 0, [r["failures"] for r in results]
    assert all(r["snapshot_answers"] > 0 and r["fallback_answers"] > 0 for r in results)
    assert figures["reloads"] >= max(1, swaps // 2)  # the readers followed the swaps
    assert figures["mapped_snapshot_files"] <= 2  # retired snapshots were released: memory stays bounded
    return figures


def test_readers_under_load_never_fail_while_snapshots_are_swapped(tiny_bert, tmp_path):
    check_load(readers_under_load(tiny_bert, tmp_path, processes=1, threads=4, swaps=5), swaps=5)


@pytest.mark.reliability
def test_two_processes_of_four_threads_through_twenty_swaps(tiny_bert, tmp_path):
    figures = check_load(readers_under_load(tiny_bert, tmp_path, processes=2, threads=4, swaps=20), swaps=20)
    print(f"\nRELIABILITY load: {json.dumps(figures)}")

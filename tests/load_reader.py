"""A service under load, for the reliability suite: threads of ReadThroughCache.get_many with an engine fallback.

    python -m tests.load_reader ROOT MODEL_DIR KEYS.json STOP_FILE OUT.json [THREADS]

Every answer is checked: one from a snapshot must carry that snapshot's marker and the key's hash,
come from a snapshot of the engine's model version, and be one that snapshot holds; any other answer
must equal the engine's own. Writes counts, failures, latencies and memory to OUT.json.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np

MARK = 1000.0


def key_hash(key: str) -> float:
    return float(zlib.crc32(key.encode()) % 100_000)


def holds(index: int, key: str) -> bool:
    """Whether snapshot ``index`` of the load test holds ``key`` (three keys in four)."""
    return zlib.crc32(f"{index}:{key}".encode()) % 4 != 0


def foreign(index: int) -> bool:
    """Every fifth snapshot of the load test claims another model version."""
    return index % 5 == 4


def value(index: int, key: str, dim: int) -> np.ndarray:
    out = np.zeros(dim, np.float32)
    out[0], out[1] = MARK + index, key_hash(key)
    return out


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024


def _mapped_snapshots() -> int:
    with open("/proc/self/maps") as fh:
        return len({line.split()[4] for line in fh if "data.mdb" in line})  # by inode: deleted ones too


def main(root: str, model_dir: str, keys_file: str, stop_file: str, out_file: str, threads: int = 4) -> None:
    from querycache.inference import Engine, EngineConfig
    from querycache.store import ReadThroughCache
    from querycache.store import snapshot as snapshot_module

    engine = Engine(EngineConfig(model_dir=model_dir, dtype="fp32", device="cpu", streams=1))
    keys = json.loads(Path(keys_file).read_text())
    cache = ReadThroughCache(root, fallback=engine, check_every=32, check_seconds=0.02)
    reference: dict[str, np.ndarray] = {}
    ref_lock = threading.Lock()
    stats = {"lookups": 0, "snapshot_answers": 0, "fallback_answers": 0, "failures": [], "latencies": []}
    stats_lock = threading.Lock()
    snapshots_seen: set = set()

    def expected(key: str) -> np.ndarray:
        with ref_lock:
            if key not in reference:
                reference[key] = np.asarray(engine([key])[0])
            return reference[key]

    def check(key: str, got) -> str | None:
        if got is None or np.shape(got) != (engine.schema["dim"],):
            return f"{key!r}: no answer"
        if got[0] >= MARK:
            index = int(got[0] - MARK)
            if got[1] != key_hash(key) or not holds(index, key):
                return f"{key!r}: answer of another key from snapshot {index}"
            return f"{key!r}: answer of snapshot {index}, another model version" if foreign(index) else None
        if not np.allclose(got, expected(key), atol=1e-4):
            return f"{key!r}: fallback answer differs from the engine's"
        return None

    def work(seed: int) -> None:
        rng = random.Random(seed)
        n = 0
        while not os.path.exists(stop_file):
            n += 1
            batch = rng.sample(keys, 8) + ([f"never stored {seed} {n}"] if n % 25 == 0 else [])
            start = time.perf_counter()
            try:
                answers = cache.get_many(batch)
                problems = [p for p in (check(k, a) for k, a in zip(batch, answers)) if p]
            except Exception as err:  # noqa: BLE001 - every error is a failed lookup here
                answers, problems = [], [f"{type(err).__name__}: {err}"]
            elapsed = time.perf_counter() - start
            with stats_lock:
                stats["lookups"] += len(batch)
                stats["latencies"].append(elapsed)
                stats["snapshot_answers"] += sum(1 for a in answers if a is not None and a[0] >= MARK)
                stats["fallback_answers"] += sum(1 for a in answers if a is not None and a[0] < MARK)
                stats["failures"].extend(problems)
                snapshots_seen.add(cache.metrics()["snapshot_id"])

    Path(out_file + ".ready").write_text("ready")
    rss_start = _rss_mb()
    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    cache.refresh()
    metrics = cache.metrics()
    lat = np.array(stats["latencies"]) * 1e6
    result = {
        "lookups": stats["lookups"],
        "calls": len(lat),
        "snapshot_answers": stats["snapshot_answers"],
        "fallback_answers": stats["fallback_answers"],
        "failed": len(stats["failures"]),
        "failures": stats["failures"][:5],
        "p50_us": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_us": float(np.percentile(lat, 99)) if len(lat) else None,
        "snapshots_seen": len(snapshots_seen),
        "reloads": metrics["reloads"],
        "reload_failures": metrics["reload_failures"],
        "rss_start_mb": rss_start,
        "rss_end_mb": _rss_mb(),
        "open_environments": len(snapshot_module._envs),
        "mapped_snapshot_files": _mapped_snapshots(),
    }
    cache.close()
    Path(out_file).write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:6], *(int(a) for a in sys.argv[6:7]))

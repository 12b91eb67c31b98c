"""The snapshot store: format round trips, verification, publish, rollback, gc and the read-through cache."""

from __future__ import annotations

import json
import multiprocessing
import os
import time

import numpy as np
import pytest

from querycache.store import ReadThroughCache, Snapshot, SnapshotError, current_id, gc, list_snapshots, rollback
from querycache.store.format import check_files, read_manifest
from tests.store_helpers import make_snapshot

EMBED = {"encoding": "float32", "dim": 4}


def vectors(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {f"query {i}": rng.standard_normal(4).astype(np.float32) for i in range(n)}


@pytest.mark.parametrize("shards", [1, 3])
def test_embeddings_round_trip_through_every_shard(tmp_path, shards):
    data = vectors(50)
    make_snapshot(tmp_path, data, EMBED, shards=shards)
    with Snapshot.open(tmp_path) as snap:
        assert len(snap) == 50 and sorted(snap) == sorted(data)
        for key, vec in data.items():
            np.testing.assert_array_equal(snap.get(key.upper()), vec)
        assert snap.get("absent") is None and "absent" not in snap and "QUERY 7" in snap


def test_float16_storage_round_trips(tmp_path):
    data = vectors(5)
    make_snapshot(tmp_path, data, {"encoding": "float16", "dim": 4})
    with Snapshot.open(tmp_path) as snap:
        got = snap.get("query 1")
        assert got.dtype == np.float16
        np.testing.assert_allclose(got, data["query 1"], rtol=1e-3, atol=1e-3)


def test_fill_mask_and_classify_values_round_trip_as_json(tmp_path):
    fill = {"weather": [[{"token": "today", "score": 0.5}, {"token": "now", "score": 0.25}]]}
    make_snapshot(tmp_path / "f", fill, {"encoding": "json", "top_k": 2}, task="fill-mask")
    cls = {"buy shoes": {"label": "shopping", "scores": {"shopping": 0.9, "travel": 0.1}}}
    make_snapshot(tmp_path / "c", cls, {"encoding": "json", "labels": ["travel", "shopping"]}, task="classify")
    assert Snapshot.open(tmp_path / "f").get("Weather") == fill["weather"]
    assert Snapshot.open(tmp_path / "c").get("buy shoes") == cls["buy shoes"]
    import pyarrow.parquet as pq

    table = pq.read_table(next((tmp_path / "c").rglob("*.parquet")))
    assert table.column("scores").to_pylist() == [pytest.approx([0.1, 0.9])]


def test_no_file_in_a_snapshot_holds_pickle(tmp_path):
    directory = make_snapshot(tmp_path, vectors(3), EMBED)
    for path in directory.rglob("*"):
        if path.is_file():
            assert b"\x80\x04\x95" not in path.read_bytes() and b"\x80\x05\x95" not in path.read_bytes()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("format_version", 99, "format version 99"),
        ("key_function", {"name": "x", "version": 7}, "key-function version 7"),
    ],
)
def test_unknown_versions_are_refused(tmp_path, field, value, message):
    directory = make_snapshot(tmp_path, vectors(2), EMBED)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest[field] = value
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SnapshotError, match=message):
        Snapshot.open(tmp_path)


def test_flipped_byte_and_missing_file_are_caught(tmp_path):
    directory = make_snapshot(tmp_path, vectors(20), EMBED)
    data = directory / "lmdb/shard-00000-of-00001/data.mdb"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert check_files(directory, read_manifest(directory), checksums=True) == [
        "lmdb/shard-00000-of-00001/data.mdb: sha256 mismatch"
    ]
    with pytest.raises(SnapshotError, match="sha256 mismatch"):
        Snapshot.open(directory)
    next(directory.rglob("*.parquet")).unlink()
    with pytest.raises(SnapshotError, match="missing"):
        Snapshot.open(directory, verify=False)


def test_an_unpublished_staging_directory_is_never_current(tmp_path):
    first = make_snapshot(tmp_path, vectors(2), EMBED)
    staging = make_snapshot(tmp_path, vectors(3), EMBED, do_publish=False)  # a build killed before publish
    assert current_id(tmp_path) == first.name
    assert [s["id"] for s in list_snapshots(tmp_path)] == [first.name]
    assert staging.name.startswith(".staging-")
    assert len(Snapshot.open(tmp_path)) == 2


def test_rollback_moves_to_the_previous_snapshot_and_gc_keeps_current(tmp_path):
    ids = [make_snapshot(tmp_path, vectors(i + 1), EMBED).name for i in range(4)]
    assert rollback(tmp_path) == ids[2] and current_id(tmp_path) == ids[2]
    assert rollback(tmp_path, ids[0]) == ids[0]
    with pytest.raises(SnapshotError, match="no snapshot older"):
        rollback(tmp_path)
    with pytest.raises(SnapshotError, match="no snapshot 'nope'"):
        rollback(tmp_path, "nope")
    assert sorted(gc(tmp_path, keep=2)) == sorted(ids[1:3])
    assert [s["id"] for s in list_snapshots(tmp_path)] == [ids[0], ids[3]]
    gc(tmp_path, keep=1)
    assert [s["id"] for s in list_snapshots(tmp_path)] == [ids[0]] == [current_id(tmp_path)]


def test_two_snapshots_over_the_same_files_share_one_environment(tmp_path):
    make_snapshot(tmp_path, vectors(3), EMBED)
    a, b = Snapshot.open(tmp_path), Snapshot.open(tmp_path)
    a.close()
    assert b.get("query 0") is not None
    c = ReadThroughCache(tmp_path)
    assert c.get("query 1") is not None
    b.close()
    c.close()


def _reader(root: str, stop, out) -> None:
    cache = ReadThroughCache(root, check_every=1, check_seconds=0)
    failures = lookups = 0
    seen = set()
    out.put("ready")
    while not stop.is_set() or lookups < 100:
        lookups += 1
        failures += cache.get("query 1") is None
        seen.add(cache.metrics()["snapshot_id"])
    out.put((lookups, failures, len(seen)))


def test_a_reader_in_another_process_survives_swaps_and_picks_them_up(tmp_path):
    make_snapshot(tmp_path, vectors(5), EMBED)
    ctx = multiprocessing.get_context("spawn")
    out, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_reader, args=(str(tmp_path), stop, out))
    proc.start()
    assert out.get(timeout=60) == "ready"
    for i in range(5):
        make_snapshot(tmp_path, vectors(5, seed=i + 1), EMBED)
        gc(tmp_path, keep=2)  # old directories disappear under the reader
        time.sleep(0.1)
    stop.set()
    lookups, failures, snapshots_seen = out.get(timeout=60)
    proc.join(10)
    assert lookups > 100 and failures == 0 and snapshots_seen >= 2


def test_fork_after_open_reopens_in_the_child(tmp_path):
    make_snapshot(tmp_path, vectors(5), EMBED)
    snap = Snapshot.open(tmp_path)
    assert snap.get("query 2") is not None
    parent_txns = snap._txns()
    pid = os.fork()
    if pid == 0:
        os._exit(0 if snap.get("query 2") is not None and snap._txns() is not parent_txns else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


class Model:
    """A fallback with a fingerprint, counting its calls."""

    def __init__(self, fingerprint="f" * 64):
        self.fingerprint, self.calls = fingerprint, []

    def __call__(self, keys):
        self.calls.append(list(keys))
        return [np.full(4, len(k), np.float32) for k in keys]


def test_cache_hits_misses_lru_and_metrics(tmp_path):
    make_snapshot(tmp_path, vectors(3), EMBED)
    model = Model()
    cache = ReadThroughCache(tmp_path, fallback=model, lru_size=2)
    assert cache.get("Query 0") is not None
    out = cache.get_many(["new a", "NEW A", "new b", "query 1"])
    assert model.calls == [["new a", "new b"]] and out[0] is out[1]
    cache.get("new c")  # evicts "new a" from the LRU of size 2
    cache.get("new a")
    assert model.calls[-1] == ["new a"]
    m = cache.metrics()
    assert (m["hits"], m["misses"], m["lru_hits"], m["fallback_calls"]) == (2, 5, 0, 3)
    assert m["lru_size"] == 2 and m["snapshot_in_use"] and m["snapshot_id"] == current_id(tmp_path)


def test_answers_of_the_serving_snapshot_alone_are_reused_and_counted(tmp_path):
    first = make_snapshot(tmp_path, vectors(3), EMBED, fingerprint="a" * 64).name
    cache = ReadThroughCache(tmp_path, check_every=1, check_seconds=0, fingerprint="a" * 64)
    assert cache.reuse(first, 2) and cache.metrics()["hits"] == 2
    second = make_snapshot(tmp_path, vectors(3, seed=1), EMBED, fingerprint="a" * 64).name
    cache.refresh()
    assert not cache.reuse(first, 2) and cache.reuse(second, 1) and cache.metrics()["hits"] == 3
    other = make_snapshot(tmp_path, vectors(3), EMBED, fingerprint="b" * 64).name
    cache.refresh()
    assert not cache.reuse(other, 1) and cache.metrics()["hits"] == 3  # another model version


def test_cache_never_answers_from_another_model_version(tmp_path):
    make_snapshot(tmp_path, vectors(3), EMBED, fingerprint="a" * 64)
    model = Model(fingerprint="b" * 64)
    cache = ReadThroughCache(tmp_path, fallback=model)
    np.testing.assert_array_equal(cache.get("query 0"), np.full(4, 7, np.float32))
    m = cache.metrics()
    assert m["hits"] == 0 and m["fingerprint_mismatch"] and not m["snapshot_in_use"]


def test_cache_keeps_serving_when_the_new_snapshot_is_corrupt(tmp_path):
    first = make_snapshot(tmp_path, vectors(3), EMBED)
    cache = ReadThroughCache(tmp_path, check_every=1, check_seconds=0)
    bad = make_snapshot(tmp_path, vectors(3, seed=9), EMBED)
    (bad / "lmdb/shard-00000-of-00001/data.mdb").write_bytes(b"garbage")
    assert cache.get("query 0") is not None
    cache.refresh()
    m = cache.metrics()
    assert m["snapshot_id"] == first.name and m["reload_failures"] == 1 and "corrupt" in m["last_error"]
    good = make_snapshot(tmp_path, vectors(3, seed=10), EMBED)
    cache.refresh()
    assert cache.metrics()["snapshot_id"] == good.name and cache.metrics()["reloads"] == 1


def test_cache_without_a_snapshot_uses_the_fallback(tmp_path):
    cache = ReadThroughCache(tmp_path, fallback=Model())
    assert cache.get("anything") is not None and cache.metrics()["snapshot_id"] is None


def test_threads_keep_getting_answers_while_snapshots_are_swapped(tmp_path):
    import threading

    data = vectors(50)
    make_snapshot(tmp_path, data, EMBED)
    cache = ReadThroughCache(tmp_path, check_every=1, check_seconds=0)
    stop, failures = threading.Event(), []

    def reader():
        while not stop.is_set():
            try:
                failures.extend([] if cache.get("query 5") is not None else ["miss"])
            except Exception as err:  # noqa: BLE001 - any error is a failed lookup here
                failures.append(repr(err))

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in range(15):
        make_snapshot(tmp_path, data, EMBED)
        gc(tmp_path, keep=2)
    stop.set()
    for t in threads:
        t.join()
    cache.refresh()
    assert failures == [] and cache.metrics()["reloads"] >= 1

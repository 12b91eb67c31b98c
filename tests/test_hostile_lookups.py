"""Every string is a valid lookup: no reader entry point raises on a ``str``, whatever it holds.

A query whose key is empty is not a query (``store.keys.is_query``): every reader answers it as a
miss without touching LMDB, and the read-through cache never sends it to the fallback.
``pytest -m reliability -s`` runs the property with many more examples and prints its figures.
"""

from __future__ import annotations

import subprocess
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from querycache.store import ReadThroughCache, Snapshot
from querycache.store.keys import is_query, normalize
from tests.store_helpers import make_snapshot

STORED = ["hotels in rome", "weather berlin", "ß straße", "日本 東京", "x" * 600]  # the last is hashed
EMPTY = ["", " ", "\t\n", "\u200b", "\u200d\ufeff", "\ud800", "\udcff", "\x00", "\x00 \x7f", "\u3000"]
HOSTILE = [*EMPTY, "a\x00b", "\ud800rome", "x" * 10_000_000, "é" * 300, "\U0010ffff", "%s%n", "\\"]

# arbitrary text (lone surrogates included), the stored queries in other spellings, the hostile set
any_text = st.text(st.characters(exclude_categories=()), max_size=40)
spelled = st.sampled_from(STORED).map(lambda k: f"  {k.upper()}\u3000")
queries = st.one_of(any_text, spelled, st.sampled_from(STORED), st.sampled_from(HOSTILE))
batches = st.lists(queries, max_size=12)


def _value(i: int) -> np.ndarray:
    return np.full(4, i, dtype=np.float32)


@pytest.fixture(scope="module", params=[1, 3], ids=["1-shard", "3-shards"])
def root(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"lookups-{request.param}")
    make_snapshot(
        root, {k: _value(i) for i, k in enumerate(STORED)}, {"encoding": "float32", "dim": 4}, shards=request.param
    )
    return root


def _expected(query: str):
    key = normalize(query)
    return _value(STORED.index(key)) if key in STORED else None


def _same(got, want) -> bool:
    return (got is None and want is None) or (got is not None and want is not None and np.array_equal(got, want))


class Recorder:
    """A fallback that answers every key with its length and remembers what it was asked."""

    def __init__(self):
        self.asked: list[str] = []

    def __call__(self, keys: list[str]) -> list[int]:
        self.asked += keys
        return [len(k) for k in keys]


def check_batch(snap: Snapshot, cache: ReadThroughCache, fallback: Recorder, batch: list[str]) -> None:
    for query in batch:
        assert _same(snap.get(query), _expected(query)), query
        assert (query in snap) == (_expected(query) is not None)
    many = snap.get_many(batch)
    assert all(_same(got, snap.get(q)) for got, q in zip(many, batch, strict=True))
    asked_before = len(fallback.asked)
    served = cache.get_many(batch)
    for query, got in zip(batch, served, strict=True):
        key = normalize(query)
        if not is_query(key):
            assert got is None
        elif key in STORED:
            assert _same(got, _expected(query))
        else:
            assert got == len(key)
    assert all(is_query(k) for k in fallback.asked[asked_before:])
    assert _same(cache.get(batch[0]), served[0]) if batch else True


def _run_property(root, examples: int) -> dict:
    snap, fallback = Snapshot.open(root), Recorder()
    cache = ReadThroughCache(root, fallback=fallback, lru_size=16)
    seen = {"batches": 0, "queries": 0}

    @settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(batches)
    def prop(batch):
        check_batch(snap, cache, fallback, batch)
        seen["batches"] += 1
        seen["queries"] += len(batch)

    try:
        prop()
        return {**seen, **cache.metrics()}
    finally:
        cache.close()
        snap.close()


def test_every_reader_entry_point_answers_every_string(root):
    figures = _run_property(root, 150)
    assert figures["invalid"] > 0 and figures["hits"] > 0 and figures["fallback_queries"] > 0


def test_empty_keys_are_misses_never_sent_to_the_fallback(root):
    fallback = Recorder()
    with Snapshot.open(root) as snap, ReadThroughCache(root, fallback=fallback) as cache:
        mixed = [*EMPTY, "Hotels in ROME", "new query"]
        assert snap.get_many(EMPTY) == [None] * len(EMPTY)
        assert [snap.get(q) for q in EMPTY] == [None] * len(EMPTY)
        got = cache.get_many(mixed)
        assert got[: len(EMPTY)] == [None] * len(EMPTY)
        assert np.array_equal(got[-2], _value(0)) and got[-1] == len("new query")
        assert fallback.asked == ["new query"]
        metrics = cache.metrics()
        assert (metrics["invalid"], metrics["hits"], metrics["misses"], metrics["lookups"]) == (len(EMPTY), 1, 1, 2)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s, c: s.get(None), "query must be str, not NoneType"),
        (lambda s, c: s.get(b"rome"), "query must be str, not bytes; decode it first"),
        (lambda s, c: s.get(3), "query must be str, not int"),
        (lambda s, c: s.get_many(["rome", None]), r"queries\[1\] must be str, not NoneType"),
        (lambda s, c: s.get_many("rome"), "not one str; for one query use get"),
        (lambda s, c: s.get_raw(None), "key must be str"),
        (lambda s, c: c.get(b"rome"), "query must be str, not bytes"),
        (lambda s, c: c.get_many(["a", "b", 1.5]), r"queries\[2\] must be str, not float"),
        (lambda s, c: c.get_many("rome"), "for one query use get"),
    ],
)
def test_wrong_types_are_a_type_error_naming_the_argument(root, call, message):
    with (
        Snapshot.open(root) as snap,
        ReadThroughCache(root, fallback=Recorder()) as cache,
        pytest.raises(TypeError, match=message),
    ):
        call(snap, cache)


def test_lookup_answers_hostile_arguments_one_line_each(root):
    # argv holds no NUL and no string over 128 KiB; bytes that are not UTF-8 arrive as surrogate escapes
    args = [q.encode() for q in EMPTY if q.isprintable() or q.isspace()] + [b"\xff\xfe", "é".encode() * 300, b"-x"]
    for mode in ([], ["--text"]):
        done = subprocess.run(["querycache", "lookup", str(root), *mode, "--", *args], capture_output=True)
        assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
        assert b"Traceback" not in done.stderr
        assert len(done.stdout.splitlines()) == len(args)


@pytest.mark.reliability
def test_hostile_lookups_at_scale(root):
    """The reliability table's row: many generated batches through every reader entry point."""
    start = time.perf_counter()
    figures = _run_property(root, 1000)
    print(
        f"\nhostile lookups: {figures['batches']:,} batches of {figures['queries']:,} queries through get, in, "
        f"get_many and the cache's get_many and get ({figures['invalid']:,} empty keys, {figures['hits']:,} hits, "
        f"{figures['fallback_queries']:,} sent to the fallback) in {time.perf_counter() - start:.1f} s, 0 exceptions"
    )

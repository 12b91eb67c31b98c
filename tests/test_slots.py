"""serve.slots: numbers one process writes in place and others read, summed across workers' files."""

from __future__ import annotations

import os

import pytest

from querycache.serve.slots import Slots, read, read_all


def test_values_written_in_place_are_read_back_from_the_file(tmp_path):
    slots = Slots(tmp_path / f"{os.getpid()}.slots")
    slots.add('te_request_count{method="embed"}')
    slots.add('te_request_count{method="embed"}', 2)
    slots["hits"] += 5
    slots["te_queue_size"] = 3
    slots.add("ünïcode name", 0.25)
    assert read(slots.path) == {
        'te_request_count{method="embed"}': 3,
        "hits": 5,
        "te_queue_size": 3,
        "ünïcode name": 0.25,
    }
    assert dict(slots) == read(slots.path) and slots["never written"] == 0
    with pytest.raises(TypeError):
        del slots["hits"]


def test_counters_sum_over_every_file_gauges_over_running_processes_only(tmp_path):
    mine, ended = Slots(tmp_path / f"{os.getpid()}.slots"), Slots(tmp_path / "4999999.slots")  # no such pid
    for slots in (mine, ended):
        slots.add("requests", 2)
        slots["te_queue_size"] = 4
    total = read_all(tmp_path, gauges=("te_queue_size",))
    assert total["requests"] == 4 and total["te_queue_size"] == 4


def test_a_file_of_too_many_names_is_refused_not_overwritten(tmp_path):
    slots = Slots(tmp_path / "1.slots")
    with pytest.raises(RuntimeError, match="no room"):
        for i in range(10_000):
            slots.add(f"name {i:05d}")
    assert len(read(slots.path)) == len(slots) and all(value == 1 for value in read(slots.path).values())

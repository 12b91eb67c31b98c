"""GatherStats: each named input reduced to one statistic, in a real pipeline."""

from __future__ import annotations

import apache_beam as beam
import pyarrow as pa
from apache_beam.testing.util import assert_that, equal_to

from querycache.transforms.stats import BY_VALUE, COUNT, ITEMS, MERGE, SUM, GatherStats


def test_every_kind_of_statistic_and_empty_inputs():
    tables = [pa.table({"k": list(range(n))}) for n in (3, 0, 5)]
    how = {"count": COUNT, "items": ITEMS, "sum": SUM, "by": BY_VALUE, "merge": MERGE, "none": COUNT, "no_dict": MERGE}
    with beam.Pipeline(runner="FnApiRunner") as p:
        named = {
            "count": p | "C" >> beam.Create(["a", "b", "c", "d"]),
            "items": p | "I" >> beam.Create(tables),
            "sum": p | "S" >> beam.Create([4, 5, -2]),
            "by": p | "B" >> beam.Create(["x", "y", "x"]),
            "merge": p | "M" >> beam.Create([{"a": 1}, {"a": 2, "b": 1}, {}]),
            "none": p | "N" >> beam.Create([]),
            "no_dict": p | "D" >> beam.Create([]),
        }
        stats = named | GatherStats(how)
        expected = {"count": 4, "items": 8, "sum": 7, "by": {"x": 2, "y": 1}, "merge": {"a": 3, "b": 1}, "none": 0}
        assert_that(stats, equal_to([expected | {"no_dict": {}}]))

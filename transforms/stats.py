"""GatherStats: many small reductions -> one dict of build statistics."""

from __future__ import annotations

import apache_beam as beam


def sum_dicts(dicts) -> dict:
    """Merge counter dicts by adding values key by key."""
    total: dict = {}
    for d in dicts:
        for k, v in d.items():
            total[k] = total.get(k, 0) + v
    return total


COUNT, ITEMS, SUM, BY_VALUE, MERGE = "count", "items", "sum", "by_value", "merge"
_REDUCERS = {
    COUNT: lambda: beam.combiners.Count.Globally(),
    ITEMS: lambda: beam.Map(len) | beam.CombineGlobally(sum),
    SUM: lambda: beam.CombineGlobally(sum),
    BY_VALUE: lambda: beam.combiners.Count.PerElement() | beam.combiners.ToDict(),
    MERGE: lambda: beam.CombineGlobally(sum_dicts),
}


class GatherStats(beam.PTransform):
    """``{"accepted": records, ...} | GatherStats({"accepted": COUNT, ...})`` -> ``{"accepted": 12, ...}``.

    Each named input is reduced to one value: a count of elements, a count of the items in
    batched elements, a sum, a {value: count} dict, or a merge of dicts by summing. Empty inputs give 0 or {}.
    """

    def __init__(self, how: dict[str, str]):
        super().__init__()
        self.how = how

    def expand(self, named):
        parts = [
            pcoll
            | f"Reduce {name}" >> _REDUCERS[self.how[name]]()
            | f"Name {name}" >> beam.Map(lambda v, n=name: {n: v})
            for name, pcoll in named.items()
        ]
        return (
            parts
            | "Parts" >> beam.Flatten()
            | "Merge" >> beam.CombineGlobally(lambda dicts: {k: v for d in dicts for k, v in d.items()})
        )

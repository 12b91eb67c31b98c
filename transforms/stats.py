"""GatherStats: many small reductions -> one dict of build statistics."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.pvalue import AsSingleton


def sum_dicts(dicts) -> dict:
    """Merge counter dicts by adding values key by key."""
    total: dict = {}
    for d in dicts:
        _add(total, d)
    return total


def _add(total: dict, d: dict) -> dict:
    for k, v in d.items():
        total[k] = total.get(k, 0) + v
    return total


COUNT, ITEMS, SUM, BY_VALUE, MERGE = "count", "items", "sum", "by_value", "merge"


class _Reduce(beam.CombineFn):
    """Elements -> one statistic, as ``how`` says: a count, a count of the items in batched elements,
    a sum, a ``{value: count}`` dict, or a merge of dicts by summing."""

    def __init__(self, how: str):
        self.how = how

    def create_accumulator(self) -> dict | int:
        return {} if self.how in (BY_VALUE, MERGE) else 0

    def add_input(self, acc, value):
        how = self.how
        if how == COUNT:
            return acc + 1
        if how == ITEMS:
            return acc + len(value)
        if how == SUM:
            return acc + value
        if how == BY_VALUE:
            acc[value] = acc.get(value, 0) + 1
            return acc
        return _add(acc, value)

    def merge_accumulators(self, accs):
        accs = iter(accs)
        total = next(accs)
        for acc in accs:
            total = _add(total, acc) if isinstance(total, dict) else total + acc
        return total

    def extract_output(self, acc):
        return acc


class GatherStats(beam.PTransform):
    """``{"accepted": records, ...} | GatherStats({"accepted": COUNT, ...})`` -> ``{"accepted": 12, ...}``.

    Each named input is reduced to one value: a count of elements, a count of the items in
    batched elements, a sum, a {value: count} dict, or a merge of dicts by summing. Empty inputs
    give 0 or {}. Each is its own combine, lifted onto the workers that produce its elements, and the
    statistics meet as side inputs: no element crosses a stage for a statistic (a Flatten of the
    inputs would carry every element, tables and all, through the runner, and Beam's multi-process
    runner loses part of such a Flatten).
    """

    def __init__(self, how: dict[str, str]):
        super().__init__()
        self.how = how

    def expand(self, named):
        names = list(named)
        reduced = [named[name] | f"Reduce {name}" >> beam.CombineGlobally(_Reduce(self.how[name])) for name in names]
        return (
            named[names[0]].pipeline
            | "Once" >> beam.Create([None])
            | "Gather" >> beam.Map(lambda _, *values: dict(zip(names, values)), *map(AsSingleton, reduced))
        )

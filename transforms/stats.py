"""GatherStats: many small reductions -> one dict of build statistics, in one combine."""

from __future__ import annotations

import apache_beam as beam


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
    """``(name, element)`` pairs -> ``{name: statistic}``, each name reduced as ``how[name]`` says."""

    def __init__(self, how: dict[str, str]):
        self.how = how

    def create_accumulator(self) -> dict:
        return {name: {} if how in (BY_VALUE, MERGE) else 0 for name, how in self.how.items()}

    def add_input(self, acc: dict, tagged) -> dict:
        name, value = tagged
        how = self.how[name]
        if how == COUNT:
            acc[name] += 1
        elif how == ITEMS:
            acc[name] += len(value)
        elif how == SUM:
            acc[name] += value
        elif how == BY_VALUE:
            acc[name][value] = acc[name].get(value, 0) + 1
        else:
            _add(acc[name], value)
        return acc

    def merge_accumulators(self, accs) -> dict:
        accs = iter(accs)
        total = next(accs)
        for acc in accs:
            for name, value in acc.items():
                if isinstance(value, dict):
                    _add(total[name], value)
                else:
                    total[name] += value
        return total

    def extract_output(self, acc: dict) -> dict:
        return acc


class GatherStats(beam.PTransform):
    """``{"accepted": records, ...} | GatherStats({"accepted": COUNT, ...})`` -> ``{"accepted": 12, ...}``.

    Each named input is reduced to one value: a count of elements, a count of the items in
    batched elements, a sum, a {value: count} dict, or a merge of dicts by summing. Empty inputs
    give 0 or {}. All of them go through one combine, lifted onto the workers.
    """

    def __init__(self, how: dict[str, str]):
        super().__init__()
        self.how = how

    def expand(self, named):
        tagged = [pcoll | f"Tag {name}" >> beam.Map(lambda v, n=name: (n, v)) for name, pcoll in named.items()]
        return tagged | "Parts" >> beam.Flatten() | "Reduce" >> beam.CombineGlobally(_Reduce(self.how))

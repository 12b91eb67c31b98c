"""Head selection from a histogram of counts: the threshold, how many ties to take, and ranks. No Beam.

Ties at the threshold are broken by key: among queries whose count equals the threshold, those
whose UTF-8 key bytes sort first are taken. Ranks are competition ranks: 1 + the number of head
queries with a strictly greater count, so equal counts share a rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction


@dataclass(frozen=True)
class Selection:
    """One of: ``top_k`` (int), ``min_count`` (int), ``coverage`` (fraction of accepted traffic in (0, 1])."""

    mode: str = "min_count"
    value: float = 1

    def describe(self) -> dict:
        return {"mode": self.mode, "value": self.value}


def plan_head(histogram: dict[int, int], total_traffic: int, selection: Selection) -> dict:
    """Threshold and tie quota for ``histogram`` ({count: distinct eligible queries with that count}).

    Returns ``threshold`` (lowest count in the head, None for an empty head), ``take_at_threshold``
    (how many of the queries at the threshold are taken, None for all), ``head_size``,
    ``head_traffic`` and ``ranks`` ({count: rank} for every count in the head).
    """
    goal = Fraction(str(selection.value)) * total_traffic if selection.mode == "coverage" else None
    size = traffic = 0
    threshold = take = None
    ranks: dict[int, int] = {}
    for count in sorted(histogram, reverse=True):
        n = histogram[count]
        if selection.mode == "min_count" and count < selection.value:
            break
        if selection.mode == "top_k":
            need = int(selection.value) - size
        else:
            need = math.ceil((goal - traffic) / count) if goal is not None else n
        if need <= 0:
            break
        taken = min(n, need)
        threshold, take = count, (taken if taken < n else None)
        ranks[count] = size + 1
        size, traffic = size + taken, traffic + taken * count
        if take is not None:
            break
    return {
        "threshold": threshold,
        "take_at_threshold": take,
        "head_size": size,
        "head_traffic": traffic,
        "ranks": ranks,
        "total_traffic": total_traffic,
        "selection": selection.describe(),
    }

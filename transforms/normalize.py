"""NormalizeQueries: records -> (key, weight, user) under the store's key function; bad queries to dead letters."""

from __future__ import annotations

import re

import apache_beam as beam

from querycache.inference.template import has_mask
from querycache.store.keys import is_query, normalize
from querycache.transforms.records import rejection

REJECTED = "rejected"
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\x80-\x9f]")  # C0/C1 controls except tab


def check_query(query: str, max_chars: int, template: str | None = None) -> tuple[str | None, str | None]:
    """``(key, None)`` for a usable query, ``(None, reason)`` otherwise."""
    if _CONTROL.search(query):
        return None, "control_characters"
    if len(query) > max_chars:
        return None, "too_long"
    key = normalize(query)
    if not is_query(key):
        return None, "empty_query"
    if template is not None and not has_mask(template, key):
        return None, "no_mask"
    return key, None


class _Normalize(beam.DoFn):
    CACHE = 1 << 17  # distinct queries remembered per worker: a log repeats its head queries endlessly

    def __init__(self, max_chars: int, template: str | None):
        self.max_chars, self.template = max_chars, template

    def setup(self):
        self._checked: dict[str, tuple[str | None, str | None]] = {}

    def process(self, records: list):
        keys = []
        for record in records:
            query = record[0]
            checked = self._checked.get(query)
            if checked is None:
                try:
                    checked = check_query(query, self.max_chars, self.template)
                except Exception as err:  # noqa: BLE001 - a query the checks cannot handle is a dead letter
                    excerpt = f"{type(err).__name__}: {query[:200]!r}"
                    yield beam.pvalue.TaggedOutput(REJECTED, rejection(*record[3:5], "unprocessable", excerpt))
                    continue
                if len(self._checked) >= self.CACHE:
                    self._checked.clear()
                self._checked[query] = checked
            key, reason = checked
            if reason:
                yield beam.pvalue.TaggedOutput(REJECTED, rejection(*record[3:5], reason, query))
            elif len(record) == 5:  # (query, weight, user, source, line) -> (key, weight, user)
                keys.append((key, record[1], record[2]))
            else:  # a label follows the line number
                keys.append((key, record[1], record[2], *record[5:]))
        if keys:
            yield keys


class NormalizeQueries(beam.PTransform):
    """``records | NormalizeQueries(512)`` -> ``(keys, rejected)``, batch for batch.

    ``keys`` holds lists of ``(key, weight, user[, label])``; ``rejected`` holds dead-letter dicts.

    Rejects queries with control characters, longer than ``max_chars`` (dropped, never truncated),
    empty once normalised, or (fill-mask, with ``template``) without a mask position.
    """

    def __init__(self, max_chars: int = 512, template: str | None = None):
        super().__init__()
        self.max_chars, self.template = max_chars, template

    def expand(self, records):
        out = records | beam.ParDo(_Normalize(self.max_chars, self.template)).with_outputs(REJECTED, main="keys")
        return out.keys, out[REJECTED]

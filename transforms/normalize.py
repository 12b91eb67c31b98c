"""NormalizeQueries: record tables -> key tables under the store's key function; bad queries to dead letters."""

from __future__ import annotations

import re

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc

from querycache.inference.template import has_mask
from querycache.store.keys import fold_printable, is_query, normalize
from querycache.transforms.records import part_of, rejection, source_of

REJECTED = "rejected"
_MEMO = 1 << 17  # distinct queries outside printable ASCII a worker remembers: logs repeat their head
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


def check_column(
    queries: pa.Array | pa.ChunkedArray, max_chars: int, template: str | None = None, memo: dict | None = None
) -> tuple[pa.Array, pa.Array]:
    """:func:`check_query` of each query of a column: ``(keys, reasons)``, a key null where a reason is not.

    Each distinct query is checked once: printable-ASCII ones (no control characters there) by Arrow
    compute, every other one by :func:`check_query` (remembered in ``memo`` across calls); a query
    the checks cannot handle is ``unprocessable``, with the error in its reason's place
    (``"unprocessable: ValueError"``).
    """
    if isinstance(queries, pa.ChunkedArray):
        queries = queries.combine_chunks()
    encoded = pc.dictionary_encode(queries)
    values = encoded.dictionary
    printable = pc.ascii_is_printable(values)
    keys = fold_printable(values)  # the others: check_query below, remembered
    long = pc.greater(pc.utf8_length(values), max_chars)
    reasons = pc.if_else(long, "too_long", pc.if_else(pc.equal(keys, ""), "empty_query", pa.scalar(None, pa.string())))
    others = pc.invert(printable)
    if pc.any(others).as_py():
        memo = {} if memo is None else memo
        if len(memo) > _MEMO:
            memo.clear()
        checked = [_remembered(text, max_chars, memo) for text in values.filter(others).to_pylist()]
        keys = pc.replace_with_mask(keys, others, pa.array([key for key, _ in checked], pa.string()))
        reasons = pc.replace_with_mask(reasons, others, pa.array([reason for _, reason in checked], pa.string()))
    if template is not None:
        keys, reasons = keys.to_pylist(), reasons.to_pylist()
        for i, key in enumerate(keys):
            if reasons[i] is None and not has_mask(template, key):
                reasons[i] = "no_mask"
        keys, reasons = pa.array(keys, pa.string()), pa.array(reasons, pa.string())
    if reasons.null_count == len(reasons):  # every query usable: no reason to spread over the rows
        return pc.take(keys, encoded.indices), pa.nulls(len(queries), pa.string())
    keys = pc.if_else(reasons.is_null(), keys, pa.scalar(None, pa.string()))
    return pc.take(keys, encoded.indices), pc.take(reasons, encoded.indices)


def _remembered(text: str, max_chars: int, memo: dict) -> tuple[str | None, str | None]:
    """:func:`check_query` of ``text`` through ``memo``; a query the checks cannot handle is a dead letter."""
    checked = memo.get(text)
    if checked is None:
        try:
            checked = check_query(text, max_chars)
        except Exception as err:  # noqa: BLE001 - a query the checks cannot handle is a dead letter
            checked = None, f"unprocessable: {type(err).__name__}"
        memo[text] = checked
    return checked


class _Normalize(beam.DoFn):
    def __init__(self, max_chars: int, template: str | None):
        self.max_chars, self.template = max_chars, template

    def setup(self):
        self._checked: dict = {}

    def process(self, records: pa.Table):
        keys, reasons = check_column(records.column("query"), self.max_chars, self.template, self._checked)
        refused = reasons.is_valid()
        if pc.any(refused).as_py():
            source, part = source_of(records), part_of(records)
            dropped = records.filter(refused)
            for line, reason, query in zip(
                dropped.column("line").to_pylist(),
                reasons.filter(refused).to_pylist(),
                dropped.column("query").to_pylist(),
            ):
                name, _, error = reason.partition(": ")
                excerpt = f"{error}: {query[:200]!r}" if error else query
                letter = rejection(source, line, name, excerpt)
                yield beam.pvalue.TaggedOutput(REJECTED, letter | {"part": part} if part else letter)
            kept = pc.invert(refused)
            records, keys = records.filter(kept), keys.filter(kept)
        if records.num_rows:
            yield records.drop_columns(["query", "line"]).add_column(0, "key", keys)


class NormalizeQueries(beam.PTransform):
    """``records | NormalizeQueries(512)`` -> ``(keys, rejected)``, table for table.

    ``keys`` holds tables of ``key, weight, user[, label]``; ``rejected`` holds dead-letter dicts.

    Rejects queries with control characters, longer than ``max_chars`` (dropped, never truncated),
    empty once normalised, or (fill-mask, with ``template``) without a mask position.
    """

    def __init__(self, max_chars: int = 512, template: str | None = None):
        super().__init__()
        self.max_chars, self.template = max_chars, template

    def expand(self, records):
        out = records | beam.ParDo(_Normalize(self.max_chars, self.template)).with_outputs(REJECTED, main="keys")
        return out.keys, out[REJECTED]

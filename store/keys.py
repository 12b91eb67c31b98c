"""The key function: one normalisation of query text, shared by the pipeline and every reader.

    >>> normalize("  Cheap\u3000FLIGHTS to  Paris ")
    'cheap flights to paris'

Rules, applied in order (version 1):

1. Lone surrogates are dropped (they cannot be encoded), Unicode NFKC is applied
   (full-width and compatibility forms fold to their plain forms).
2. Case folding (``str.casefold``), then NFKC again, since folding can leave text that NFKC changes.
3. Control characters (category Cc: tabs, newlines, NUL) become spaces; format characters
   (category Cf: zero-width spaces and joiners, bidi marks) are removed.
4. Runs of whitespace collapse to one ASCII space; leading and trailing whitespace is trimmed.

The function is total on ``str`` and idempotent; anything else is a ``TypeError``. A query whose key
is empty (``""``, spaces, controls, zero-width or format characters, lone surrogates) is not a query
(:func:`is_query`): the build rejects it as ``empty_query`` and readers answer it as a miss without a
lookup, never asking a model. Keys are stored as UTF-8 bytes; a key longer
than LMDB's 511-byte limit is stored as ``b"\\x00" + sha256(utf8)``, which no normalised key can
start with (NUL is a control character).
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa

KEY_FUNCTION = {"name": "nfkc-casefold-collapse", "version": 1}
"""Name and version of :func:`normalize`, recorded in every manifest."""

SUPPORTED_KEY_VERSIONS = frozenset({1})
MAX_KEY_BYTES = 511


_ASCII_CONTROLS = {c: " " for c in [*range(32), 127]}


def _one_pass(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    text = unicodedata.normalize("NFKC", text.casefold())
    if not text.isprintable():  # printable text has no Cc or Cf character (both are "Other"): skip the scan
        kept = (" " if unicodedata.category(ch) == "Cc" else ch for ch in text if unicodedata.category(ch) != "Cf")
        text = "".join(kept)
    return " ".join(text.split())


def is_query(key: str | bytes) -> bool:
    """Whether a normalised key (or its stored bytes) names a query: the empty key names none."""
    return len(key) > 0


def not_text(value: object, name: str = "query") -> TypeError:
    """The error for a lookup given something other than ``str``, naming the argument and the fix."""
    fix = "; decode it first" if isinstance(value, bytes | bytearray | memoryview) else ""
    return TypeError(f"{name} must be str, not {type(value).__name__}{fix}")


def normalize(query: str) -> str:
    """Return the cache key of ``query`` (see the module docstring for the rules)."""
    if not isinstance(query, str):
        raise not_text(query)
    if query.isascii():  # fast path, same result: NFKC is the identity on ASCII and has no Cf
        if not query.isprintable():
            query = query.translate(_ASCII_CONTROLS)
        return " ".join(query.lower().split())
    key = _one_pass(query.encode("utf-8", "ignore").decode("utf-8"))
    # Folding and NFKC interact for a handful of code points; iterate to the fixed point.
    for _ in range(3):
        again = _one_pass(key)
        if again == key:
            break
        key = again
    return key


def key_bytes(key: str) -> bytes:
    """Encode a normalised key as it is stored in LMDB."""
    try:
        raw = key.encode()
    except AttributeError:
        raise not_text(key, "key") from None
    return raw if len(raw) <= MAX_KEY_BYTES else b"\x00" + hashlib.sha256(raw).digest()


def query_key(query: str) -> bytes:
    """``key_bytes(normalize(query))``, with the ASCII fast path inlined for the lookup hot path."""
    try:
        printable = query.isascii() and query.isprintable()  # so " " is its only whitespace
    except AttributeError:  # not a str (bytes has isascii but no isprintable)
        raise not_text(query) from None
    if printable:
        raw = query.lower().encode()
        if b"  " in raw or raw.strip() is not raw:  # bytes.strip returns the object itself when nothing goes
            raw = b" ".join(raw.split())
        return raw if len(raw) <= MAX_KEY_BYTES else key_bytes(raw.decode())
    return key_bytes(normalize(query))


def normalize_column(queries: pa.Array | pa.ChunkedArray) -> pa.Array:
    """:func:`normalize` of each string of an Arrow column (nulls stay null), computed once per distinct value.

    Distinct printable-ASCII values, the bulk of real logs, are folded by Arrow compute (lower, runs
    of spaces collapsed, trimmed: ``" "`` is their only whitespace); every other value goes through
    :func:`normalize`. The keys are those of :func:`normalize`, exactly (a property test holds both
    to it); Arrow's own ``utf8_lower`` and RE2's ``\\s`` differ from it beyond ASCII.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(queries, pa.ChunkedArray):
        queries = queries.combine_chunks()
    encoded = pc.dictionary_encode(queries.cast(pa.string()))
    values = encoded.dictionary
    printable = pc.ascii_is_printable(values)
    folded = fold_printable(values)
    others = pc.filter(values, pc.invert(printable)).to_pylist()
    if others:
        folded = pc.replace_with_mask(folded, pc.invert(printable), pa.array(map(normalize, others), pa.string()))
    return pc.take(folded, encoded.indices)


def fold_printable(values: pa.Array) -> pa.Array:
    """:func:`normalize` of each printable-ASCII string of an Arrow array, by Arrow compute: lower case,
    runs of spaces collapsed, trimmed (``" "`` is their only whitespace). Other strings come out
    folded as if they were ASCII, which is not their key: replace them."""
    import pyarrow.compute as pc

    folded = pc.utf8_trim(pc.replace_substring(pc.ascii_lower(values), "  ", " "), " ")
    size = pc.sum(pc.binary_length(folded)).as_py()
    while True:  # a run of n spaces takes log2(n) rounds; a round that replaces nothing keeps every byte
        again = pc.replace_substring(folded, "  ", " ")
        size, before = pc.sum(pc.binary_length(again)).as_py(), size
        if size == before:
            return folded
        folded = again


def query_list(queries: Iterable[str]) -> list[str]:
    """``list(queries)`` for a batch lookup, refusing one ``str`` (which would be read as its characters)."""
    if isinstance(queries, str | bytes):
        raise TypeError(f"queries must be a list of str, not one {type(queries).__name__}; for one query use get")
    return list(queries)


def normalize_all(queries: Iterable[str]) -> list[str]:
    """``[normalize(q) for q in queries]``, naming the first item that is not a ``str``."""
    queries = query_list(queries)
    try:
        return list(map(normalize, queries))
    except TypeError:
        raise _first_not_text(queries) from None


def _first_not_text(queries: Sequence[object]) -> TypeError:
    i, bad = next((i, q) for i, q in enumerate(queries) if not isinstance(q, str))
    return not_text(bad, f"queries[{i}]")


def query_keys(queries: Sequence[str]) -> list[bytes]:
    """``[query_key(q) for q in queries]``; a batch of printable ASCII queries is folded in one pass."""
    if not queries:
        return []
    try:
        text = "\n".join(queries)
    except TypeError:
        raise _first_not_text(queries) from None
    # printable ASCII once the separators are blanked, and no separator inside a query: " " is all the space
    if text.isascii() and text.count("\n") == len(queries) - 1 and text.replace("\n", " ").isprintable():
        text = text.lower()
        if "  " in text or " \n" in text or "\n " in text or text[:1] == " " or text[-1:] == " ":
            raws = list(map(str.encode, map(" ".join, map(str.split, text.split("\n")))))
        else:  # nothing to collapse or trim: the common case of keys that are already normalised
            raws = text.encode().split(b"\n")
        if max(map(len, raws)) <= MAX_KEY_BYTES:
            return raws
    return list(map(query_key, queries))

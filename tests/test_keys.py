"""The key function: total, idempotent, and equal for spellings a user would call the same."""

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from querycache.store.keys import MAX_KEY_BYTES, key_bytes, normalize, normalize_column, query_key, query_keys


@settings(max_examples=3000)
@given(st.text())
def test_normalize_is_total_and_idempotent(text):
    key = normalize(text)
    assert normalize(key) == key
    assert key == key.strip()
    assert "  " not in key
    key_bytes(key)  # always encodable


@given(st.text(alphabet=st.characters(codec="ascii"), max_size=40))
def test_ascii_fast_path_matches_the_general_rules(text):
    from querycache.store.keys import _one_pass

    assert normalize(text) == _one_pass(text)


def _rules(text: str) -> str:
    """The module docstring's rules, written out with no shortcut (the reference for normalize)."""
    import unicodedata

    def one_pass(text: str) -> str:
        text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
        kept = (" " if unicodedata.category(ch) == "Cc" else ch for ch in text if unicodedata.category(ch) != "Cf")
        return " ".join("".join(kept).split())

    key = one_pass(text.encode("utf-8", "ignore").decode("utf-8"))
    while one_pass(key) != key:
        key = one_pass(key)
    return key


# Text that mixes letters of several scripts with controls, format characters and odd spaces.
MIXED = st.text(
    alphabet=st.one_of(
        st.characters(),
        st.sampled_from("\x00\t\n\x85\xad\u200b\u200d\u2060\ufeff\u3000\u00a0\u061c\U000e0041ﬁẞΣςＡ"),
    ),
    max_size=30,
)


@settings(max_examples=2000)
@given(MIXED)
def test_normalize_follows_the_rules(text):
    assert normalize(text) == _rules(text)


def test_spellings_of_one_query_share_a_key():
    same = [
        "Cheap Flights to Paris",
        "  cheap   flights to paris ",
        "CHEAP FLIGHTS TO PARIS",
        "ｃｈｅａｐ ｆｌｉｇｈｔｓ ｔｏ ｐａｒｉｓ",
        "cheap\tflights\u3000to paris",
        "cheap\u200b flights to paris",
    ]
    assert {normalize(s) for s in same} == {"cheap flights to paris"}


def test_case_folding_goes_beyond_lowercase():
    assert normalize("STRASSE") == normalize("straße")


def test_long_keys_are_hashed_below_the_lmdb_limit():
    raw = key_bytes("x" * 600)
    assert len(raw) <= MAX_KEY_BYTES and raw.startswith(b"\x00")
    assert key_bytes("short") == b"short"


@given(st.lists(st.one_of(st.text(), st.text(alphabet=" aB\t\n", max_size=8), st.just("x" * 600)), max_size=6))
def test_batched_key_bytes_match_the_key_function(queries):
    want = [key_bytes(normalize(q)) for q in queries]
    assert [query_key(q) for q in queries] == want
    assert query_keys(queries) == want


UTF8_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)))  # what an Arrow string can hold
SPACED_ASCII = st.text(alphabet=" \t\n\x0b\x0c\r\x1c\x1f\x7fAbZz09~-İıßΣς\u3000\u200b\u00a0", max_size=30)


PRINTABLE_SPACED = st.text(alphabet=" aZ~", max_size=30)  # runs of spaces inside: Arrow's path alone


@settings(max_examples=500)
@given(
    st.lists(
        st.one_of(UTF8_TEXT, SPACED_ASCII, PRINTABLE_SPACED, st.none(), st.just(" " * 37 + "X" + " " * 5 + "y")),
        max_size=40,
    )
)
def test_the_column_key_function_is_the_key_function(queries):
    column = pa.array(queries, pa.string())
    want = [None if q is None else normalize(q) for q in queries]
    assert normalize_column(column).to_pylist() == want
    halves = pa.chunked_array([column[: len(queries) // 2], column[len(queries) // 2 :]], pa.string())
    assert normalize_column(halves).to_pylist() == want

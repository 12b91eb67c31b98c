"""The column-wise privacy screen of builds and replays against the plain rule, row by row."""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.compute as pc
from hypothesis import given, settings
from hypothesis import strategies as st

from querycache.transforms.privacy import pii_reason
from querycache.transforms.select_head import DIGIT, privacy_reasons

PERSONAL = ["mail me at a.b@example.com", "card 4111 1111 1111 1111", "call +1 (555) 010-0199", "ip 10.0.0.1",
            "fe80::1 down", "order 1234567890", "room 101", "٣٤٥٦٧٨٩٠١٢ arabic digits", "１２３４５６７８９０ wide",
            "a:b", "@home", "no digits here", "ünïcödé", "東京 天気", "call 5550199", "at 1.2.3.4", "x ::1 y",
            "١.٢.٣.٤", "gym 17342"]  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(PERSONAL) | st.text(max_size=30), st.none() | st.integers(0, 9)), max_size=40),
    st.none() | st.integers(1, 6),
    st.booleans(),
)
def test_the_table_screen_gives_each_row_the_reason_the_row_screen_gives(rows, min_users, scrub_pii):
    rows = [(key.encode("utf-8", "replace").decode("utf-8"), users) for key, users in rows]
    keys, users = [k for k, _ in rows], [u for _, u in rows]
    table = pa.table(
        {"key": pa.array(keys, pa.string()), "count": [1] * len(rows), "users": pa.array(users, pa.int64())}
    )
    expected = []
    for key, users in rows:  # the rule: a personal-looking key, else fewer users than min_users
        reason = pii_reason(key) if scrub_pii else None
        expected.append(reason or ("min_users" if min_users and (users or 0) < min_users else None))
    assert privacy_reasons(table, min_users, scrub_pii) == expected


def test_the_column_prefilter_counts_every_digit_pii_reason_counts():
    """Arrow's ``\\p{Nd}`` holds every character Python's ``\\d`` matches (its Unicode may be newer)."""
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    passed = pc.match_substring_regex(pa.array(chars), DIGIT).to_pylist()
    needed = re.compile(r"\d")
    assert not [hex(ord(c)) for c, ok in zip(chars, passed) if not ok and needed.match(c)]

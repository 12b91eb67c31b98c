"""The PII scrub: its quick exits (digits a pattern needs at least) never change a reason."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from querycache.transforms import privacy
from querycache.transforms.privacy import pii_reason


def _reason_without_quick_exits(key: str) -> str | None:
    """Every pattern tried on every key, in pii_reason's order."""
    if "@" in key and privacy._EMAIL.search(key):
        return "email"
    for match in privacy._CARD.finditer(key):
        digits = re.sub(r"\D", "", match.group())
        if 13 <= len(digits) <= 19 and privacy.luhn_valid(digits):
            return "card"
    ips = [*privacy._IPV4.finditer(key), *privacy._IPV6.finditer(key)]
    if any(privacy._is_ip(m.group()) for m in ips):
        return "ip"
    if privacy._DIGIT_RUN.search(key):
        return "digit_run"
    if any(privacy._is_phone(m.group()) for m in privacy._PHONE.finditer(key)):
        return "phone"
    return None


PIECES = ["4111 1111 1111 1111", "4111-1111-1111-1112", "10.0.0.1", "256.1.1.1", "fe80::1", "a::b", "::", "1:2:3",
          "+1 (555) 010-0199", "555 0100", "1234567", "123456789", "٣٤٥٦٧٨٩٠١٢", "１２３４５６７", "a@b.co", "x.y.z",
          "1.2.3", " ", "-", "(", ")", ".", ":", "+", "deals 52", "room 101"]  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(PIECES) | st.text(alphabet="0123456789 .:-+()abf٣１", max_size=12), max_size=6))
def test_quick_exits_give_the_reason_every_pattern_gives(parts):
    key = " ".join(parts)
    assert pii_reason(key) == _reason_without_quick_exits(key)

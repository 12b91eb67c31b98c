"""PII scrub of normalised keys: e-mail, payment card (Luhn), IP address, phone number, long digit run."""

from __future__ import annotations

import ipaddress
import re

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_CARD = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
_IPV6 = re.compile(r"(?<![\w:])[0-9a-f]{0,4}(?::[0-9a-f]{0,4}){2,7}(?![\w:])")
_PHONE = re.compile(r"(?<!\w)\+?\(?\d(?:[ ().-]{0,2}\d){6,14}(?!\w)")
_DIGIT_RUN = re.compile(r"\d{9,}")
_DIGIT_OR_COLON = re.compile(r"[\d:]")
_DIGIT = re.compile(r"\d")


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _is_phone(text: str) -> bool:
    """7-15 digits written as a phone number: a leading +, one run of 7-8, or at least two groups of 3+."""
    groups = re.findall(r"\d+", text)
    digits = sum(map(len, groups))
    if not 7 <= digits <= 15:
        return False
    return text.startswith(("+", "(")) or len(groups) == 1 or sum(len(g) >= 3 for g in groups) >= 2


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def pii_reason(key: str) -> str | None:
    """Why ``key`` looks personal (``email``, ``card``, ``ip``, ``phone``, ``digit_run``), or None."""
    if "@" in key and _EMAIL.search(key):
        return "email"
    if not _DIGIT_OR_COLON.search(key):  # the rest all need a digit (or an IPv6 colon)
        return None
    # what each pattern needs at least: a card 13 digits, IPv4 4 and 3 dots, IPv6 2 colons, a run 9, a phone 7
    digits = len(_DIGIT.findall(key))
    if digits >= 13:
        for match in _CARD.finditer(key):
            number = re.sub(r"\D", "", match.group())
            if 13 <= len(number) <= 19 and luhn_valid(number):
                return "card"
    if digits >= 4 and key.count(".") >= 3 and any(_is_ip(m.group()) for m in _IPV4.finditer(key)):
        return "ip"
    if key.count(":") >= 2 and any(_is_ip(m.group()) for m in _IPV6.finditer(key)):
        return "ip"
    if digits >= 9 and _DIGIT_RUN.search(key):
        return "digit_run"
    if digits >= 7 and any(_is_phone(m.group()) for m in _PHONE.finditer(key)):
        return "phone"
    return None

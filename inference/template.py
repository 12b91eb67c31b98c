"""Fill-mask templates: where the query goes and where the mask stands (no torch needed)."""

from __future__ import annotations

import re

MASK = "[MASK]"
DEFAULT_TEMPLATE = "{query} " + MASK
_MASK_RE = re.compile(re.escape(MASK), re.IGNORECASE)


def apply(template: str, query: str, mask_token: str = MASK) -> str:
    """The model input for ``query``: ``{query}`` replaced, every ``[MASK]`` (any case) made ``mask_token``."""
    return _MASK_RE.sub(lambda _: mask_token, template.replace("{query}", query))


def has_mask(template: str, query: str) -> bool:
    """Whether the input built from ``template`` and ``query`` has a mask position."""
    return bool(_MASK_RE.search(template.replace("{query}", query)))

"""The last line of defence for secrets: every secret value the process has seen is scrubbed from what it writes."""

from __future__ import annotations

import threading

MASK = "***"
# Shorter values are too likely to occur by chance in ordinary text (and are refused as API keys anyway).
_MIN_LENGTH = 4
_values: set[str] = set()
# The longest first, so none leaves a fragment; sorted once per new secret, not once per line written.
_ordered: tuple[str, ...] = ()
_lock = threading.Lock()


def register(value: str) -> None:
    """Remember a secret so `scrub` removes it from any text, wherever that text came from."""
    global _ordered
    if len(value) >= _MIN_LENGTH:
        with _lock:
            _values.add(value)
            _ordered = tuple(sorted(_values, key=len, reverse=True))


def scrub(text: str) -> str:
    """`text` with every registered secret replaced by ***; the longest first, so none leaves a fragment."""
    for value in _ordered:
        if value in text:
            text = text.replace(value, MASK)
    return text

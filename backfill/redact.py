"""Secrets: a `Secret` never shows its value, and every one the process has seen is scrubbed from what it writes."""

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


class Secret:
    """A value that never shows itself in repr, str, logs or tracebacks; `reveal()` is the only way in."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value
        register(value)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)

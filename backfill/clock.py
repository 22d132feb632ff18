"""The one timestamp format every record, row and ledger entry uses: UTC, milliseconds, a trailing Z."""

from __future__ import annotations

import time

_NOW: tuple[int, str] = (-1, "")


def now_iso() -> str:
    """UTC now to the millisecond, e.g. 2026-11-23T10:34:09.309Z, formatted once per millisecond: a sent row
    asks three times (attempt, outcome, results.csv), and datetime's isoformat cost ~2 us a call."""
    global _NOW
    ms = time.time_ns() // 1_000_000
    last = _NOW  # one tuple, swapped whole: a thread never pairs one millisecond with another's text
    if last[0] == ms:
        return last[1]
    seconds, millis = divmod(ms, 1000)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"
    _NOW = (ms, text)
    return text

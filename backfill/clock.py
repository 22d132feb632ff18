"""The one timestamp format every record, row and ledger entry uses: UTC, milliseconds, a trailing Z."""

from __future__ import annotations

import time

_NOW: tuple[int, str] = (-1, "")
_SECOND: tuple[int, str] = (-1, "")


def now_iso() -> str:
    """UTC now to the millisecond, e.g. 2026-11-23T10:34:09.309Z. A sent row asks four times (attempt, body,
    outcome, results.csv), a few rows share each millisecond and many each second: the date and time are
    formatted once a second (strftime cost ~2 us a call), the milliseconds appended once a millisecond."""
    global _NOW, _SECOND
    ms = time.time_ns() // 1_000_000
    last = _NOW  # each a tuple, swapped whole: a thread never pairs one moment with another's text
    if last[0] == ms:
        return last[1]
    seconds, millis = divmod(ms, 1000)
    second = _SECOND
    if second[0] != seconds:
        second = (seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)))
        _SECOND = second
    text = f"{second[1]}.{millis:03d}Z"
    _NOW = (ms, text)
    return text

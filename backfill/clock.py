"""The one timestamp format every record, row and ledger entry uses: UTC, milliseconds, a trailing Z."""

from __future__ import annotations

from datetime import UTC, datetime


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")

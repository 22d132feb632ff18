"""What the engine hands its outputs: one record per row settled, rejected or sent, and the run's summary."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..ledger import Audit
from ..vocab import Reason, Status


@dataclass(frozen=True, slots=True, kw_only=True)
class ResultRow:
    user_id: str
    status: Status
    http_status: int | None = None
    result_code: str = ""
    result_text: str = ""
    smile_job_id: str = ""
    job_id: str = ""
    attempts: int = 0  # made in this run
    signature_ok: bool | None = None
    error: str = ""
    finished_at: str = ""
    latency_ms: int | None = None  # the last attempt's round trip
    normalized: str = ""  # --normalize: what was done to the photo sent ("converted from HEIC; rotated 90")
    # Not a column: a stop left the row's attempts unfinished (pending, or in doubt before its retry), so a
    # fleet hands its claim back for another process instead of counting it finished.
    unfinished: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class RejectRow:
    line: int  # as a spreadsheet numbers it: the header is line 1
    user_id: str
    reason: Reason
    message: str


# A row settled as skipped, as the sink takes many at once: (user_id, result_code, smile_job_id, job_id, message).
SkippedRow = tuple[str, str, str, str, str]


class Sink(Protocol):
    """Where every row ends: exactly one call per manifest row, `result` or `reject`."""

    def result(self, row: ResultRow) -> None: ...
    def reject(self, row: RejectRow) -> None: ...
    def skipped(self, rows: Sequence[SkippedRow], finished_at: str) -> None:
        """Many `result`s at once of rows settled as skipped."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Summary:
    run_id: str
    out_dir: str
    manifest: str
    manifest_sha256: str = ""  # of the manifest's bytes as this run read them
    ledger: str
    env: str
    base_url: str
    started_at: str
    finished_at: str
    duration_s: float
    total_rows: int
    counts: dict[str, int]
    rejected: int
    sent: int  # rows with at least one attempt in this run
    attempts: int
    new_rows: int  # rows whose first attempt ever was made in this run: in a nightly run, the day's new users
    retries: int  # attempts beyond each row's first in this run
    not_reached: int
    rows_per_s: float
    exit_code: int
    stop_reason: str = ""
    dry_run: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
    audit: Audit | None = None  # who ran it, from where, with what
    # requests/s: the lowest the adaptive rate went after 429s, and where it ended (both --rate without any)
    effective_rate_min: float = 0.0
    effective_rate_final: float = 0.0

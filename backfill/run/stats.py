"""A run's counters, the failure breaker, and the summary and exit code they add up to."""

from __future__ import annotations

import collections
import time
from collections import Counter
from dataclasses import dataclass, field

from ..vocab import FAILURE_STATUSES, FINE_STATUSES, ExitCode, Status

# The breaker looks at the last BREAKER_WINDOW rows sent, once at least BREAKER_MIN_ROWS are in it.
BREAKER_WINDOW = 100
BREAKER_MIN_ROWS = 20


@dataclass(slots=True, kw_only=True)
class Tally:
    counts: Counter[Status] = field(default_factory=Counter)
    sent: int = 0  # rows with an attempt in this run
    new: int = 0  # rows whose first attempt ever was in this run
    done: int = 0
    failures: int = 0
    t0: float = field(default_factory=time.monotonic)
    recent: collections.deque[Status] = field(
        default_factory=lambda: collections.deque(maxlen=BREAKER_WINDOW)
    )
    recent_failed: int = 0  # how many of `recent` are failures, kept as rows come and go

    def add_many(self, status: Status, n: int) -> None:
        self.counts[status] += n
        self.done += n
        if status in FAILURE_STATUSES or status is Status.ID_CONFLICT:
            self.failures += n

    def add(self, status: Status) -> None:
        self.counts[status] += 1
        self.done += 1
        # Rejects are the manifest's problem, told in rejects.csv, not failures of sending.
        if status in FAILURE_STATUSES or status is Status.ID_CONFLICT:
            self.failures += 1

    def breaker_tripped(self, status: Status, threshold: float) -> int | None:
        """After a row was sent: how many of the recent ones failed, when that reaches the threshold."""
        if len(self.recent) == BREAKER_WINDOW:
            self.recent_failed -= self.recent[0] in FAILURE_STATUSES  # about to leave the window
        self.recent.append(status)
        self.recent_failed += status in FAILURE_STATUSES
        if len(self.recent) < BREAKER_MIN_ROWS:
            return None
        failed = self.recent_failed
        return failed if failed / len(self.recent) >= threshold else None

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


def exit_code(counts: Counter[Status], *, not_reached: int, stop_code: int) -> int:
    """A systemic stop or a signal outranks the rows' statuses; a --limit or --max-duration stop does not."""
    if stop_code in (ExitCode.SYSTEMIC, ExitCode.SIGINT, ExitCode.SIGTERM):
        return stop_code
    settled = {status for status, n in counts.items() if n}
    ok = settled <= FINE_STATUSES and not not_reached
    return ExitCode.OK if ok else ExitCode.ROWS_LEFT

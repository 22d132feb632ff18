"""The retry policy: how many attempts, how long between them, and which answers are worth another try."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from tenacity import AsyncRetrying, RetryCallState, wait_random_exponential

from ..api.answers import Verdict
from ..vocab import Kind
from .rate import RETRY_AFTER_MAX_S


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Named defaults in one place; `from_settings` fills them from the run's settings."""

    max_attempts: int = 5
    backoff_initial: float = 0.5  # seconds: exponential backoff with full jitter starts here
    backoff_max: float = 30.0
    retry_after_max: float = RETRY_AFTER_MAX_S  # a server's Retry-After is honoured up to this
    # 429s don't spend max_attempts (the row was fine, only too fast), but a server that 429s for ever must
    # still let the row end: this many 429s for one row, and it is retry_exhausted.
    max_throttled: int = 50

    def should_retry(self, verdict: Verdict, *, attempt: int, stopping: bool, throttled: int = 0) -> bool:
        """Only transient answers are tried again: anything else would get the same answer, or is settled.

        `attempt`: the row's attempts so far that were not 429s; `throttled`: those that were.
        """
        if verdict.kind is not Kind.TRANSIENT or stopping:
            return False
        if is_throttled(verdict):
            return throttled < self.max_throttled
        return attempt < self.max_attempts

    def wait(self, verdict: Verdict | None, state: RetryCallState) -> float:
        if verdict is not None and verdict.retry_after is not None:
            return min(verdict.retry_after, self.retry_after_max)
        return float(wait_random_exponential(multiplier=self.backoff_initial, max=self.backoff_max)(state))

    def retrying(
        self,
        *,
        stopping: Callable[[], bool],
        sleep: Callable[[float], Awaitable[None]],
        before_sleep: Callable[[RetryCallState], None],
    ) -> AsyncRetrying:
        """A tenacity loop around one row's attempts, deciding exactly as `should_retry` does."""

        def verdict_of(state: RetryCallState) -> Verdict | None:
            result = (
                state.outcome.result() if state.outcome is not None and not state.outcome.failed else None
            )
            return result if isinstance(result, Verdict) else None

        throttled = 0  # this row's 429s: `retry` sees every attempt's outcome once, in order

        def retry(state: RetryCallState) -> bool:
            nonlocal throttled
            verdict = verdict_of(state)
            if verdict is None:
                return False
            throttled += is_throttled(verdict)
            return self.should_retry(
                verdict, attempt=state.attempt_number - throttled, throttled=throttled, stopping=stopping()
            )

        def last(state: RetryCallState) -> Any:
            return state.outcome.result() if state.outcome is not None else None

        return AsyncRetrying(
            stop=lambda state: False,  # `retry` decides, both budgets included
            wait=lambda state: self.wait(verdict_of(state), state),
            retry=retry,
            sleep=sleep,
            retry_error_callback=last,
            before_sleep=before_sleep,
            reraise=True,
        )


def is_throttled(verdict: Verdict) -> bool:
    """A 429: the server wants us slower; the row itself is fine."""
    return verdict.http_status == 429

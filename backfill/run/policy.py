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

    def should_retry(self, verdict: Verdict, *, attempt: int, stopping: bool) -> bool:
        """Only transient answers are tried again: anything else would get the same answer, or is settled."""
        return verdict.kind is Kind.TRANSIENT and attempt < self.max_attempts and not stopping

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

        def retry(state: RetryCallState) -> bool:
            verdict = verdict_of(state)
            return verdict is not None and self.should_retry(
                verdict, attempt=state.attempt_number, stopping=stopping()
            )

        def last(state: RetryCallState) -> Any:
            return state.outcome.result() if state.outcome is not None else None

        return AsyncRetrying(
            stop=lambda state: state.attempt_number >= self.max_attempts,
            wait=lambda state: self.wait(verdict_of(state), state),
            retry=retry,
            sleep=sleep,
            retry_error_callback=last,
            before_sleep=before_sleep,
            reraise=True,
        )

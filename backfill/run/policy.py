"""The retry policy: how many attempts, how long between them, and which answers are worth another try.

One decision, `RetryPolicy.decide`, taken once per answer: its result both chooses the state the ledger records
for the attempt (a retry planned: still unfinished) and tells the caller how long to wait before the next one.
The policy is data, built once by compose.py from the run's settings; nothing in it is made per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tenacity import RetryCallState, Retrying, wait_random_exponential

from ..api.answers import Verdict
from ..vocab import Kind
from .rate import RETRY_AFTER_MAX_S

# A RetryCallState must name the retry object it belongs to; tenacity's wait strategies read only the state's
# `attempt_number`, so this one is never run.
_NEVER_RUN = Retrying()

# A storage read that failed in a way worth another try: transient, not a 429 of the API, no Retry-After.
STORAGE_FAILURE = Verdict(kind=Kind.TRANSIENT, may_have_enrolled=False, proves_not_enrolled=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """The budgets and the backoff, as data; compose.py fills them from the run's settings.

    The three budgets the settings carry have no default here: their defaults live once, in config.py's fields.
    """

    max_attempts: int
    backoff_initial: float  # seconds: exponential backoff with full jitter starts here
    backoff_max: float
    retry_after_max: float = RETRY_AFTER_MAX_S  # a server's Retry-After is honoured up to this
    # 429s don't spend max_attempts (the row was fine, only too fast), but a server that 429s for ever must
    # still let the row end: this many 429s for one row, and it is retry_exhausted.
    max_throttled: int = 50
    # tenacity's full-jitter exponential wait, built once from the two fields above.
    backoff: wait_random_exponential = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "backoff", wait_random_exponential(multiplier=self.backoff_initial, max=self.backoff_max)
        )

    def decide(
        self, verdict: Verdict, *, attempts: int, throttled: int = 0, stopping: bool = False
    ) -> float | None:
        """Seconds to wait before the next attempt, or None: there is none.

        `attempts`: the row's attempts so far, this one included; `throttled`: how many of them were 429s.
        Only transient answers are tried again (anything else would get the same answer, or is settled), and
        never once a stop has come. A 429 spends its own budget (`max_throttled`), not `max_attempts`. The wait
        is the server's Retry-After when it gave one (capped at `retry_after_max`), else the backoff.
        """
        if stopping or verdict.kind is not Kind.TRANSIENT:
            return None
        if is_throttled(verdict):
            if throttled >= self.max_throttled:
                return None
        elif attempts - throttled >= self.max_attempts:
            return None
        if verdict.retry_after is not None:
            return min(max(0.0, verdict.retry_after), self.retry_after_max)
        state = RetryCallState(_NEVER_RUN, fn=None, args=(), kwargs={})
        state.attempt_number = attempts
        return float(self.backoff(state))

    def after_storage_failure(self, attempts: int) -> float | None:
        """A storage read failed transiently on its `attempts`-th try: the wait before the next, or None."""
        return self.decide(STORAGE_FAILURE, attempts=attempts)

    def during_outage(self, tries: int, *, lasted: float, bound: float) -> float | None:
        """The ledger can't be reached: its `tries`-th failed try, `lasted` seconds into an outage waited out for
        up to `bound` (the ledger_outage setting). The wait before the next try, or None: the bound is reached.

        The backoff, but never past the bound, and at most a tenth of it: an outage that ends just before its
        bound is still seen to end within a tenth of the bound, whatever the send backoff's ceiling.
        """
        if lasted >= bound:
            return None
        state = RetryCallState(_NEVER_RUN, fn=None, args=(), kwargs={})
        state.attempt_number = tries
        return min(float(self.backoff(state)), bound / 10, bound - lasted)


def is_throttled(verdict: Verdict) -> bool:
    """A 429: the server wants us slower; the row itself is fine."""
    return verdict.http_status == 429

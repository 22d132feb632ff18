"""The rate limit: every attempt takes a slot from one leaky bucket, and a 429 pauses everyone, not one row.

The bucket is aiolimiter's: capacity `burst` slots drain at `rate` per second. The capacity is kept small (5% of
a second's worth, at least one) because a 1-second bucket would let `rate` requests out at once, which a server
that measures over shorter windows reads as a burst over the limit. On top of it sits a shared pause: a 429
with Retry-After holds every worker until that moment (capped, since a server asking for an hour is broken and
the run would look hung); a worker that is already waiting simply waits for the later of the two.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aiolimiter import AsyncLimiter

from .stops import Stops

RETRY_AFTER_MAX_S = 300.0


class RateGate:
    def __init__(self, rate: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        burst = max(1.0, rate * 0.05)
        self._limiter = AsyncLimiter(burst, burst / rate)
        self._clock = clock
        self._resume_at = 0.0

    async def wait_turn(self, stops: Stops) -> None:
        """Wait out any shared pause, then take one slot; both waits end at once on a stop.

        A pause that began while this worker queued for its slot is waited out too (and a new slot taken after
        it): otherwise every worker already queued would send during the server's Retry-After.
        """
        waited = None  # the pause already waited out: with a fake sleep in tests, the clock hasn't moved
        while not stops.stopping:
            resume = self._resume_at
            if resume != waited and resume > self._clock():
                await stops.nap(resume - self._clock())
                waited = resume
                continue
            if not await stops.until_stopped(self._limiter.acquire()):
                return
            if self._resume_at in (resume, waited) or self._resume_at <= self._clock():
                return

    def pause(self, seconds: float) -> float | None:
        """Hold everyone for `seconds` (capped); the pause now in force if this lengthened it, else None."""
        seconds = min(max(0.0, seconds), RETRY_AFTER_MAX_S)
        until = self._clock() + seconds
        if until <= self._resume_at + 0.05:
            return None
        self._resume_at = until
        return seconds

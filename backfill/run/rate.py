"""The rate limit: one adaptive bucket all attempts take slots from; a 429 slows and pauses everyone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from .stops import Stops

RETRY_AFTER_MAX_S = 300.0
BURST_SHARE = 0.05  # the bucket holds this share of a second's worth of slots (at least one)
DECREASE = 0.5  # a 429 multiplies the rate by this
GROWTH = 0.05  # each second of good answers adds this share of --rate back
RATE_FLOOR = 0.1  # requests/s: the rate never drops below this (or --rate, if that is lower)


class RateGate:
    """An adaptive rate limit shared by every worker: AIMD, as in the AWS SDKs' adaptive retry mode.

    **The bucket** is a GCRA (the "virtual scheduling" form of a leaky bucket): `_tat` is the theoretical
    arrival time of the next slot. A slot may go at `now` when `now >= _tat - tolerance`, and then moves
    `_tat` to `max(_tat, now) + 1/rate`. `tolerance = (burst - 1) / rate` with `burst = max(1, rate * 5%)`,
    so in any window of W seconds at most `W * rate + burst` slots go: at `--rate 200`, at most 210 in a
    closed 1-s window (1.05 * rate) and 209 in a half-open one. The burst is small because a 1-second bucket
    would let `rate` requests out at once, which a server that measures over shorter windows reads as a
    burst over the limit. Waiters queue on one lock, first come first served, and the one at the head
    re-reads the rate each time it wakes, so a change of rate applies to the very next slot.

    **Adapting**: the rate starts at `--rate` (the ceiling) and
      - on a 429 drops multiplicatively, `rate = max(floor, rate * 0.5)`, floor 0.1/s. Only a 429 to a
        request whose slot was taken at the current rate lowers it (each decrease starts a new *generation*;
        `wait_turn` returns the generation its slot was taken in): the requests already in flight when the
        first 429 came back were sent too fast together and answer for one overload, not one each, as TCP
        halves its window once per round trip;
      - climbs back additively while answers are good: each good answer adds `5% of --rate * the seconds since
        the last growth (or decrease, or the end of the shared pause)`, at most one second's worth per answer,
        so about +5% of `--rate` per second of good answers, up to `--rate` and never beyond.
    Against a server that allows L/s the rate saws between about L/2 and a little over L (rclone's pacer
    behaves alike), averaging about 3/4 of L.

    **The shared pause**: a 429 with Retry-After also holds every worker until that moment (capped, since a
    server asking for an hour is broken and the run would look hung); a worker already waiting simply waits
    for the later of the two.

    Built here rather than on aiolimiter: its AsyncLimiter has a fixed rate (`_rate_per_sec` is computed
    once, from `max_rate / time_period`, in `__init__`), so adapting it would mean writing its private
    fields, and its capacity would have to follow the rate too. The GCRA is a dozen lines and takes an
    injected clock and sleep, so its bounds are tested with fake time.
    """

    def __init__(
        self,
        rate: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        floor: float = RATE_FLOOR,
    ) -> None:
        self.ceiling = rate
        self._rate = rate
        self.rate_min = rate  # the lowest the rate went in this run
        self._floor = min(floor, rate)
        self._clock, self._sleep = clock, sleep
        self._tat = 0.0
        self._lock: asyncio.Lock | None = None  # made lazily, in the run's event loop
        self._queued = 0  # callers inside take(): waiting for the lock or for their slot
        self._resume_at = 0.0
        self._grown_at = 0.0
        self.generation = 0

    @property
    def rate(self) -> float:
        """The rate in force now, requests per second."""
        return self._rate

    async def wait_turn(self, stops: Stops) -> int:
        """Wait out any shared pause, then take one slot; both waits end at once on a stop.

        Returns the generation the slot was taken in, for `throttled`. A pause that began while this worker
        queued for its slot is waited out too (and a new slot taken after it): otherwise every worker already
        queued would send during the server's Retry-After.
        """
        waited = None  # the pause already waited out: with a fake sleep in tests, the clock hasn't moved
        while not stops.stopping:
            resume = self._resume_at
            if resume != waited and resume > self._clock():
                await stops.nap(resume - self._clock())
                waited = resume
                continue
            if not (self._take_now() or await stops.until_stopped(self.take())):
                break
            if self._resume_at in (resume, waited) or self._resume_at <= self._clock():
                break
        return self.generation

    def _take_now(self) -> bool:
        """A slot at once when one is due and nobody queues for one: the common case, with no task to make
        (`until_stopped` makes two and waits on them, ~6% of a 20 KB row's CPU). Else False: queue in take()."""
        if self._queued:
            return False  # first come first served: behind whoever waits
        now = self._clock()
        interval = 1.0 / self._rate
        tolerance = (max(1.0, self._rate * BURST_SHARE) - 1.0) * interval
        if self._tat - tolerance - now > 0:
            return False
        self._tat = max(self._tat, now) + interval
        return True

    async def take(self) -> None:
        """One slot of the bucket, first come first served."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        self._queued += 1
        try:
            async with self._lock:
                while True:
                    now = self._clock()
                    interval = 1.0 / self._rate
                    tolerance = (max(1.0, self._rate * BURST_SHARE) - 1.0) * interval
                    early = self._tat - tolerance - now
                    if early <= 0:
                        self._tat = max(self._tat, now) + interval
                        return
                    await self._sleep(early)
        finally:
            self._queued -= 1

    def throttled(self, generation: int) -> float | None:
        """A 429 to a request whose slot was taken in `generation`: the lowered rate, or None if unchanged."""
        if generation != self.generation or self._rate <= self._floor:
            return None
        self._rate = max(self._floor, self._rate * DECREASE)
        self.rate_min = min(self.rate_min, self._rate)
        self.generation += 1
        self._grown_at = self._clock()
        return self._rate

    def answered(self) -> None:
        """A good answer (anything but a 429): the rate climbs back towards the ceiling."""
        if self._rate >= self.ceiling:
            return
        now = self._clock()
        elapsed = min(1.0, max(0.0, now - max(self._grown_at, self._resume_at)))
        self._grown_at = max(self._grown_at, now)
        self._rate = min(self.ceiling, self._rate + GROWTH * self.ceiling * elapsed)

    def pause(self, seconds: float) -> float | None:
        """Hold everyone for `seconds` (capped); the pause now in force if this lengthened it, else None."""
        seconds = min(max(0.0, seconds), RETRY_AFTER_MAX_S)
        until = self._clock() + seconds
        if until <= self._resume_at + 0.05:
            return None
        self._resume_at = until
        return seconds

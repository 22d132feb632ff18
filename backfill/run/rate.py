"""The rate limit: one adaptive bucket every attempt takes a slot from (a fleet's lives in its ledger)."""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from ..ledger import Fleet, RateState
from .stops import Stops

RETRY_AFTER_MAX_S = 300.0
BURST_SHARE = 0.05  # the bucket holds this share of a second's worth of slots (at least one)
DECREASE = 0.5  # a 429 multiplies the rate by this
GROWTH = 0.05  # each second of good answers adds this share of --rate back
RATE_FLOOR = 0.1  # requests/s: the rate never drops below this (or --rate, if that is lower)


class Gate(Protocol):
    """What the Sender asks of a rate limit: RateGate for one process, FleetGate for a fleet's."""

    ceiling: float
    rate_min: float
    generation: int
    shared: bool  # the rate is a fleet's, shared by every process: one process's unused share says little

    @property
    def rate(self) -> float: ...
    async def wait_turn(self, stops: Stops) -> int: ...
    def throttled(self, generation: int) -> float | None: ...
    def answered(self) -> None: ...
    def pause(self, seconds: float) -> float | None: ...


PAUSE_SLACK_S = 0.05  # a Retry-After within this of the pause in force doesn't lengthen it


def lowered(rate: float, floor: float) -> float:
    """A 429's decrease: multiplicative, never below the floor."""
    return max(floor, rate * DECREASE)


def grown(rate: float, ceiling: float, *, since: float, now: float) -> float:
    """Good answers' increase: GROWTH of the ceiling per second since `since`, at most one second's worth."""
    elapsed = min(1.0, max(0.0, now - since))
    return min(ceiling, rate + GROWTH * ceiling * elapsed)


def capped(seconds: float) -> float:
    """A Retry-After as obeyed: a server asking for an hour is broken, and the run would look hung."""
    return min(max(0.0, seconds), RETRY_AFTER_MAX_S)


class _Adaptive:
    """What RateGate and FleetGate share: the rate in force, its lowest, and the 429 generations."""

    def __init__(self, rate: float, floor: float, clock: Callable[[], float]) -> None:
        self.ceiling = rate
        self._rate = rate
        self.rate_min = rate  # the lowest the rate went in this run
        self._floor = min(floor, rate)
        self._clock = clock
        self._resume_at = 0.0  # the shared pause's end, on this process's clock
        self.generation = 0

    @property
    def rate(self) -> float:
        """The rate in force now, requests per second."""
        return self._rate

    def _lower(self, generation: int) -> float | None:
        """Halve the rate for a 429 to a slot of the current generation; the new rate, or None if unchanged."""
        if generation != self.generation or self._rate <= self._floor:
            return None
        self._rate = lowered(self._rate, self._floor)
        self.rate_min = min(self.rate_min, self._rate)
        self.generation += 1
        return self._rate

    def _lengthen_pause(self, seconds: float) -> float | None:
        """Hold everyone for `seconds` (capped): the pause now in force if this lengthened it, else None."""
        seconds = capped(seconds)
        until = self._clock() + seconds
        if until <= self._resume_at + PAUSE_SLACK_S:
            return None
        self._resume_at = until
        return seconds


class RateGate(_Adaptive):
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
        super().__init__(rate, floor, clock)
        self.shared = False
        self._sleep = sleep
        self._tat = 0.0
        self._lock: asyncio.Lock | None = None  # made lazily, in the run's event loop
        self._queued = 0  # callers inside take(): waiting for the lock or for their slot
        self._grown_at = 0.0

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
        lower = self._lower(generation)
        if lower is not None:
            self._grown_at = self._clock()
        return lower

    def answered(self) -> None:
        """A good answer (anything but a 429): the rate climbs back towards the ceiling."""
        if self._rate >= self.ceiling:
            return
        now = self._clock()
        self._rate = grown(self._rate, self.ceiling, since=max(self._grown_at, self._resume_at), now=now)
        self._grown_at = max(self._grown_at, now)

    def pause(self, seconds: float) -> float | None:
        """Hold everyone for `seconds` (capped); the pause now in force if this lengthened it, else None."""
        return self._lengthen_pause(seconds)


# --- the fleet's one rate: the same GCRA and AIMD, kept in the shared ledger ---

RESERVE_S = (
    0.1  # a process reserves this long's worth of slots at a time (at least one): the ledger isn't hit
)
RESERVE_MAX = 64  # per request, and a process that dies wastes at most this many slots
STALE_S = 0.02  # a reserved slot this far in the past (or one interval, if longer) is dropped, not used


@dataclass(frozen=True, slots=True, kw_only=True)
class Reservation:
    """Slots `first + i * interval` for i < count, on the database server's clock (`now` as it read it)."""

    first: float
    interval: float
    count: int
    now: float
    state: RateState


def reserve(
    state: RateState | None, now: float, *, count: int, ceiling: float, good: int, floor: float = RATE_FLOOR
) -> tuple[RateState, Reservation]:
    """Take `count` consecutive slots of the fleet's bucket; `good` answers since the last call grow the rate.

    Slots are spaced exactly 1/rate apart on one clock (the server's), whichever process takes them, so all
    processes together send at most `rate` a second plus the error of each one's clock offset (a fraction of a
    round trip). No burst allowance: a fleet's processes are the burst. A reservation starts no earlier than
    now, nor than the shared pause's end. `ceiling` is this process's --rate: the last process to reserve sets
    the fleet's (give every process the same --rate).

    The bucket is never booked more than RESERVE_S ahead: while it is, the answer has no slot (`count` 0) and
    says when to ask again (`first`). So no process holds slots far in the future, and a 429's pause or halving
    reaches every process within about RESERVE_S, at its next reservation.
    """
    if state is None:
        state = RateState(
            ceiling=ceiling, rate=ceiling, tat=now, paused_until=0.0, generation=0, grown_at=now
        )
    rate = min(state.rate, ceiling)
    grown_at = state.grown_at
    if good and rate < ceiling:
        rate = grown(rate, ceiling, since=max(grown_at, state.paused_until), now=now)
        grown_at = max(grown_at, now)
    rate = max(rate, min(floor, ceiling))
    interval = 1.0 / rate
    first = max(state.tat, now, state.paused_until)
    if first - now > RESERVE_S:
        return state, Reservation(first=first - RESERVE_S, interval=interval, count=0, now=now, state=state)
    new = replace(state, ceiling=ceiling, rate=rate, tat=first + count * interval, grown_at=grown_at)
    return new, Reservation(first=first, interval=interval, count=count, now=now, state=new)


def throttle(
    state: RateState | None,
    now: float,
    *,
    generation: int,
    retry_after: float | None,
    floor: float = RATE_FLOOR,
) -> tuple[RateState, RateState]:
    """A 429 seen by any process: the fleet's rate halves once per generation; Retry-After pauses everyone."""
    if state is None:
        raise ValueError("a 429 before any slot was reserved")
    rate, gen, grown_at = state.rate, state.generation, state.grown_at
    if generation == gen and rate > floor:
        rate, gen, grown_at = lowered(rate, floor), gen + 1, now
    paused = state.paused_until
    if retry_after is not None:
        paused = max(paused, now + capped(retry_after))
    new = replace(
        state, rate=rate, generation=gen, grown_at=grown_at, paused_until=paused, tat=max(state.tat, paused)
    )
    return new, new


class FleetGate(_Adaptive):
    """The rate limit of one process of a fleet: slots reserved in small blocks from the shared ledger's bucket.

    Same face as RateGate (the Sender can't tell them apart). Each reservation reads the fleet's rate, pause
    and generation, and maps the slots from the server's clock to this process's monotonic clock by the offset
    measured around that round trip. A slot more than one interval in the past is dropped, not used: a process
    that fell behind must not send its backlog at once. A 429 here drops this process's reserved slots, and is
    told to the ledger, so the whole fleet slows at its next reservation (within RESERVE_S).
    """

    def __init__(
        self,
        shared: Fleet,
        rate: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        floor: float = RATE_FLOOR,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        super().__init__(rate, floor, clock)
        self._shared, self._sleep = shared, sleep
        self.shared = True
        self._slots: collections.deque[float] = collections.deque()
        self._lock: asyncio.Lock | None = None
        self._good = 0
        self._offset = 0.0  # server clock minus ours, as last measured
        self._tasks: set[asyncio.Task[Any]] = set()
        self._on_error = on_error
        self._waiting = 0  # callers in take(): a reservation is sized by them, not only by the rate

    async def wait_turn(self, stops: Stops) -> int:
        if not stops.stopping:
            await stops.until_stopped(self.take())
        return self.generation

    async def take(self) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        self._waiting += 1
        try:
            await self._take(self._lock)
        finally:
            self._waiting -= 1

    async def _take(self, lock: asyncio.Lock) -> None:
        async with lock:
            while True:
                now = self._clock()
                if self._resume_at > now:
                    self._slots.clear()  # a pause this process heard of: no slot before its end
                    await self._sleep(self._resume_at - now)
                    continue
                if not self._slots:
                    await self._reserve()
                    continue
                at = self._slots.popleft()
                if at < now - max(1.0 / self._rate, STALE_S):
                    continue  # stale: a process that fell behind never sends its backlog in a bunch
                if at > now:
                    await self._sleep(at - now)
                if at >= self._resume_at:
                    return

    async def _reserve(self) -> None:
        # As many slots as callers wait for (a slot reserved and not used still spends the fleet's rate).
        count = max(1, min(RESERVE_MAX, round(self._rate * RESERVE_S), self._waiting))
        good, self._good = self._good, 0
        got = await self._shared.change_rate(
            functools.partial(reserve, count=count, ceiling=self.ceiling, good=good, floor=self._floor)
        )
        # The server read its clock after any wait for a connection or the bucket's lock, and just before
        # answering: so `after` is the closest local moment to it. Mapped so, a slot goes a little late, never
        # early (early would break the fleet's bound; late only spaces it out).
        after = self._clock()
        self._offset = got.now - after
        self._learn(got.state)
        first = got.first - self._offset
        if got.count == 0:
            # The bucket is booked ahead: come back when it isn't (the shared pause, too, is in `first`). The
            # good answers weren't counted (nothing changed): they go with the next reservation.
            self._good += good
            await self._sleep(max(0.0, first - self._clock()))
            return
        self._slots.extend(first + i * got.interval for i in range(got.count))

    def _learn(self, state: RateState) -> None:
        self._rate = state.rate
        self.rate_min = min(self.rate_min, state.rate)
        self.generation = state.generation
        self._resume_at = max(self._resume_at, state.paused_until - self._offset)

    def throttled(self, generation: int) -> float | None:
        lower = self._lower(generation)
        if lower is None:
            return None
        self._slots.clear()  # reserved at the rate the server just refused
        self._tell(functools.partial(throttle, generation=generation, retry_after=None, floor=self._floor))
        return self._rate

    def answered(self) -> None:
        self._good += 1

    def pause(self, seconds: float) -> float | None:
        paused = self._lengthen_pause(seconds)
        if paused is None:
            return None
        self._tell(functools.partial(throttle, generation=-1, retry_after=paused, floor=self._floor))
        return paused

    def _tell(self, change: Callable[[RateState | None, float], tuple[RateState, RateState]]) -> None:
        """Send a change to the fleet's bucket without holding up the worker that saw the 429."""
        task = asyncio.get_running_loop().create_task(self._shared.change_rate(change))
        self._tasks.add(task)
        task.add_done_callback(self._told)

    def _told(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None and self._on_error is not None:
            self._on_error(error)
        elif error is None:
            self._learn(task.result())

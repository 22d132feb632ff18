"""Why and how a run stops: the first reason wins, a failure outranks a planned stop, a second signal leaves."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..api.answers import Verdict
from ..vocab import ExitCode


@dataclass(frozen=True, slots=True, kw_only=True)
class Leaving:
    """What a second signal leaves behind, for whoever tells the operator before the process goes."""

    signum: int
    in_flight: int  # sent, not answered: recorded as sent, so in doubt until a re-run settles them
    out_dir: str  # the run folder: its CSVs stay under temporary .part names, and no summary.json is written


class Stops:
    def __init__(
        self,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        *,
        leaving: Callable[[int], None] | None = None,
    ) -> None:
        self.reason = ""
        self.code = 0
        self._signals = 0
        self._sleep = sleep
        self._leaving = leaving  # told the signal just before a second one ends the process
        self._event: asyncio.Event | None = None

    @property
    def event(self) -> asyncio.Event:
        if self._event is None:  # made lazily: the object may be built outside the run's event loop
            self._event = asyncio.Event()
        return self._event

    @property
    def stopping(self) -> bool:
        return bool(self.reason)

    def stop(self, reason: str, code: int) -> None:
        """Stop taking new rows and starting requests; those in flight get --stop-timeout (`Engine`) to answer.

        The first reason wins, except that a failure (a systemic answer, a full disk) outranks a planned stop
        (--max-duration, exit 0): the exit code must still tell cron something is wrong.
        """
        if not self.reason or (self.code == 0 and code != 0):
            self.reason, self.code = reason, code
        if self._event is not None:
            self._event.set()

    def interrupt(self, signum: int) -> None:
        code = 128 + signum
        self._signals += 1
        if self._signals > 1:
            # Second signal: leave now. Every attempt is already recorded; resume reconciles the rest.
            if self._leaving is not None:
                with contextlib.suppress(Exception):  # saying what was left must never keep the process here
                    self._leaving(signum)
            os._exit(code)
        # A signal outranks an earlier stop's reason: the operator asked, and the exit code should say so.
        self.reason, self.code = f"interrupted by {signal.Signals(signum).name}", code
        self.event.set()

    async def nap(self, seconds: float) -> None:
        """Sleep, but wake at once on a stop: a long backoff or Retry-After must not hold up a shutdown."""
        if self.stopping:
            return
        nap = asyncio.ensure_future(self._sleep(seconds))
        stop = asyncio.ensure_future(self.event.wait())
        try:
            await asyncio.wait({nap, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (nap, stop):
                task.cancel()

    async def until_stopped(self, awaitable: Awaitable[None]) -> bool:
        """Await `awaitable` unless a stop comes first (it is then cancelled); True when it completed."""
        if self.stopping:
            if asyncio.iscoroutine(awaitable):
                awaitable.close()
            return False
        work = asyncio.ensure_future(awaitable)
        stop = asyncio.ensure_future(self.event.wait())
        try:
            await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if work.done():
            if not work.cancelled():
                work.result()  # its failure is the caller's: never swallowed (a rate slot that failed is no slot)
            return True
        work.cancel()
        return False


def on_systemic(stops: Stops) -> Callable[[Verdict], None]:
    """What the sender calls on an answer that says every row would fail alike (a bad key, the API gone)."""

    def stop(verdict: Verdict) -> None:
        # No answer at all (the API unreachable from the start): the error says so itself.
        said = verdict.error if verdict.http_status is None else f"the API answered {verdict.error}"
        stops.stop(said, ExitCode.SYSTEMIC)

    return stop

"""Whether a run's workers, not its rate limit, hold it back: all of them busy while rate slots go unused.

A worker is busy from the moment its rate slot is granted until its attempt ends (photo read, ledger record,
POST, outcome): the time it holds a row and the rate is not what it waits for. When slow answers keep every
worker busy, requests go out slower than `--rate` allows, and only more workers (`--concurrency`) help.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

# "All workers busy": the window's average, allowing for the moments between two attempts of one worker.
BUSY_SHARE = 0.9
# "Spare slots": fewer requests went out than this share of what the rate allowed over the window.
SPARE_SHARE = 0.9
RAISE = "--concurrency"


@dataclass(frozen=True, slots=True, kw_only=True)
class Window:
    """How busy the workers were over a stretch of the run."""

    seconds: float
    busy: float  # workers busy, on average over the window
    slots: int  # rate slots granted (requests about to go out) in the window


def workers_are_the_limit(window: Window, *, concurrency: int, rate: float) -> bool:
    """All `concurrency` workers busy and the rate's slots left unused: more workers would send faster."""
    if window.seconds <= 0:
        return False
    saturated = window.busy >= BUSY_SHARE * concurrency
    spare = window.slots < SPARE_SHARE * rate * window.seconds
    return saturated and spare


def note(window: Window, *, concurrency: int, rate: float) -> str:
    """What the progress line, the log and `status` say when the workers are the limit."""
    sent = window.slots / window.seconds if window.seconds > 0 else 0.0
    return (
        f"workers are the limit ({_figure(window.busy)} of {concurrency} busy on average, {_figure(sent)} of "
        f"{_figure(rate)} "
        f"requests/s allowed): raise {RAISE}"
    )


def _figure(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 else f"{value:.2g}"


class Workers:
    """Busy workers over time, counted as they start and end attempts; `window()` closes one stretch."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.busy = 0
        self._since = clock()  # the last change of `busy`
        self._area = 0.0  # busy workers x seconds since the window began
        self._slots = 0
        self._opened = self._since

    def started(self) -> None:
        """A worker was granted a rate slot and begins its attempt."""
        self._advance()
        self.busy += 1
        self._slots += 1

    def ended(self) -> None:
        self._advance()
        self.busy -= 1

    def window(self) -> Window:
        """The stretch since the last call (or since this was made), and the start of the next."""
        self._advance()
        seconds = self._since - self._opened
        window = Window(seconds=seconds, busy=self._area / seconds if seconds > 0 else 0.0, slots=self._slots)
        self._opened, self._area, self._slots = self._since, 0.0, 0
        return window

    def _advance(self) -> None:
        now = self._clock()
        self._area += self.busy * (now - self._since)
        self._since = now

"""The crash suite's supported test mode: SIGKILL this process the Nth time a chosen boundary is reached."""

from __future__ import annotations

import asyncio
import os
import signal
from enum import StrEnum

from ..errors import ConfigError

CRASH_ENV = "BACKFILL_TEST_CRASH_AT"


class Boundary(StrEnum):
    WAITING = "waiting"  # a row holds its rate slot and photo, its attempt not yet recorded
    AFTER_ATTEMPT = "after_attempt"  # the attempt is recorded, the request not yet sent
    IN_FLIGHT = "in_flight"  # the request has left; its answer is on the way
    BEFORE_OUTCOME = "before_outcome"  # the answer is here, its outcome not yet recorded


CRASH_BOUNDARIES = tuple(b.value for b in Boundary)


class CrashPoints:
    """`BOUNDARY:N` from the environment; `reached` kills the process the Nth time that boundary is reached."""

    def __init__(self, spec: str | None) -> None:
        self._boundary: Boundary | None = None
        self._left = 0
        if spec:
            name, _, count = spec.partition(":")
            if name not in CRASH_BOUNDARIES or not count.isdigit():
                fix = f"use one of {', '.join(CRASH_BOUNDARIES)} and a count, e.g. in_flight:3, or unset it"
                raise ConfigError(CRASH_ENV, "environment", f"{spec!r} is not a crash point", fix)
            self._boundary, self._left = Boundary(name), int(count)

    def reached(self, boundary: Boundary) -> None:
        if boundary is not self._boundary:
            return
        self._left -= 1
        if self._left > 0:
            return
        if boundary is Boundary.IN_FLIGHT:
            # Soon after the request leaves, while the answer is still on its way (the server must be slower).
            asyncio.get_running_loop().call_later(0.02, os.kill, os.getpid(), signal.SIGKILL)
        else:
            os.kill(os.getpid(), signal.SIGKILL)

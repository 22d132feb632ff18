"""`status --watch`: the same report drawn again every few seconds, until Ctrl-C."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ..clock import now_iso

WATCH_EVERY = 5.0  # seconds between reports when --watch names none
CLEAR = "\033[H\033[2J"  # cursor home, then erase the screen: each report replaces the last on a terminal


@dataclass(frozen=True, slots=True, kw_only=True)
class Screen:
    """Where reports go. A terminal is cleared for each; a file or pipe keeps them all, a separator between."""

    write: Callable[[str], None]
    tty: bool
    plain: bool = False  # one line a report (JSON lines): neither cleared nor separated

    def show(self, text: str, *, first: bool, every: float) -> None:
        if self.plain:
            self.write(text)
        elif self.tty:
            self.write(f"{CLEAR}every {every:g}s (Ctrl-C to stop), {now_iso()}\n{text}")
        else:
            self.write(text if first else f"--- {now_iso()} ---\n{text}")


def every(
    draw: Callable[[], str],
    seconds: float,
    screen: Screen,
    *,
    sleep: Callable[[float], None] = time.sleep,
    rounds: int | None = None,
) -> None:
    """Show `draw()` every `seconds` until interrupted (KeyboardInterrupt, the caller's), or `rounds` times."""
    done = 0
    while True:
        screen.show(draw(), first=done == 0, every=seconds)
        done += 1
        if rounds is not None and done >= rounds:
            return
        sleep(seconds)

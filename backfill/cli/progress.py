"""The progress bar on stderr (tqdm): done/total, rate, ETA, failures and rows in doubt."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

from ..vocab import FAILURE_STATUSES, Status


class TqdmProgress:
    """A progress bar on stderr: done/total, rate, ETA and failures; silent when stderr isn't a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = self._enabled = enabled and sys.stderr.isatty()
        self._bar: tqdm[Any] | None = None
        self._failures = 0
        self._in_doubt = 0
        self._rejected = 0
        self._postfix: dict[str, object] = {}

    def start(self, total: int | None) -> None:
        self._bar = tqdm(
            total=total, unit="row", file=sys.stderr, disable=not self._enabled, dynamic_ncols=True
        )

    def advance(self, status: str, n: int = 1) -> None:
        assert self._bar is not None
        # A reject is the manifest's problem, counted apart: calling it a failure (of sending) misleads.
        if status == Status.REJECTED:
            self._rejected += n
            self._postfix["rejected"] = self._rejected
            self._bar.set_postfix(self._postfix, refresh=False)
        elif status == Status.UNKNOWN:
            # May be enrolled: a row in doubt is neither a failure nor done, and the bar says so apart.
            self._in_doubt += n
            self._postfix["in_doubt"] = self._in_doubt
            self._bar.set_postfix(self._postfix, refresh=False)
        elif status in FAILURE_STATUSES or status == Status.ID_CONFLICT:
            self._failures += n
            self._postfix["failed"] = self._failures
            self._bar.set_postfix(self._postfix, refresh=False)
        self._bar.update(n)

    def rate(self, current: float) -> None:
        """The adaptive rate limit changed (a 429 lowered it, or good answers raise it back)."""
        assert self._bar is not None
        self._postfix["limit"] = f"{current:.3g}/s"
        self._bar.set_postfix(self._postfix, refresh=False)

    def limited(self, note: str | None) -> None:
        """The workers became (a note naming the setting to raise) or stopped being (None) the limit."""
        assert self._bar is not None
        if note is None:
            self._postfix.pop("limited_by", None)
        else:
            self._postfix["limited_by"] = note
        self._bar.set_postfix(self._postfix, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

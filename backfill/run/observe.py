"""What the engine tells a watcher of the run (metrics): a protocol here, so the engine imports no exporter."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Observer(Protocol):
    """Told of every settled row, attempt, retry and 429; gauges it reads itself, through `watch`'s callbacks.

    Called on the event loop and must return at once: an exporter keeps counts, it never does I/O here.
    """

    def watch(
        self, *, remaining: Callable[[], int], in_flight: Callable[[], int], rate: Callable[[], float]
    ) -> None: ...
    def row_settled(self, status: str, n: int = 1) -> None: ...
    def attempt(self, kind: str, seconds: float) -> None: ...
    def retry(self, reason: str) -> None: ...
    def throttled(self) -> None: ...


class NoObserver:
    """The default: nobody watches."""

    def watch(
        self, *, remaining: Callable[[], int], in_flight: Callable[[], int], rate: Callable[[], float]
    ) -> None:
        pass

    def row_settled(self, status: str, n: int = 1) -> None:
        pass

    def attempt(self, kind: str, seconds: float) -> None:
        pass

    def retry(self, reason: str) -> None:
        pass

    def throttled(self) -> None:
        pass


NO_OBSERVER = NoObserver()

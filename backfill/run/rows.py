"""Where a run's rows come from: the manifest itself, or (a fleet's process) the rows it claims in the ledger."""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Iterator
from typing import Protocol

from ..errors import InternalError
from ..manifest import Batch, Manifest


class Rows(Protocol):
    """What the engine reads rows from, chosen by compose.py: `ManifestRows`, or a fleet's `Claims`."""

    @property
    def total(self) -> int | None:
        """The run's rows, to show progress against; None when not known ahead (a fleet's process)."""

    @property
    def responsible(self) -> int:
        """The rows this process must account for, in results or rejects (at the end of the run)."""

    async def next_batch(self) -> Batch | None:
        """The next rows, or None when there are no more (or a stop came)."""

    def handed_back(self, user_id: str) -> None:
        """Another process tells this row now: it is no longer this one's to account for."""

    def give_back_unsent(self, in_hand: Collection[str]) -> None:
        """A stop came: every row taken, unfinished and not `in_hand` (a worker's) won't be sent from here.

        A fleet's process gives their claims back at once, so that other processes take them now.
        """

    async def close(self) -> None:
        """Every row taken is told for: done with the source."""


class ManifestRows:
    """A single process's rows: every row of the manifest, read a chunk at a time."""

    def __init__(self, manifest: Manifest) -> None:
        self._manifest = manifest
        self._batches: Iterator[Batch] | None = None

    @property
    def total(self) -> int:
        return self._manifest.total_rows

    @property
    def responsible(self) -> int:
        return self._manifest.total_rows

    async def next_batch(self) -> Batch | None:
        if self._batches is None:
            self._batches = self._manifest.batches()
        # Reading a chunk parses thousands of rows: off the event loop, so sends keep flowing.
        return await asyncio.to_thread(next, self._batches, None)

    def handed_back(self, user_id: str) -> None:
        # Only a ledger shared by a fleet says another process sends a row; a row handed to nobody would be lost.
        raise InternalError(f"{user_id!r} was handed to another process, but this run is not part of a fleet")

    def give_back_unsent(self, in_hand: Collection[str]) -> None:
        pass  # rows read from the manifest are nobody else's: the next run reads them again

    async def close(self) -> None:
        pass

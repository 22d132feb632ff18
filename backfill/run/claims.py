"""The claim stage of a fleet: the manifest loaded into the shared ledger once, then rows claimed in batches.

    manifest ─▶ load (the first process only: text rules, rejects, COPY) ─▶ queue in the ledger
    queue ─▶ claim a batch (FOR UPDATE SKIP LOCKED, with a lease) ─▶ plan ─▶ send ─▶ sink ─▶ finished

A process asks for rows only as its workers need them (one batch ahead), so a fleet shares the work by how fast
each process sends, and a process that dies holds at most its batch and its in-flight rows until their lease
ends. When nothing is left to claim but other processes still hold rows, it waits: if one of them dies, its rows
come back when their lease ends, and some live process finishes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Sequence

from ..errors import BackfillError
from ..ledger import Fleet
from ..manifest import Batch, Manifest
from .records import RejectRow, ResultRow, Sink, SkippedRow

log = logging.getLogger("backfill")
FINISH_EVERY_S = 0.5  # finished rows are told to the ledger in groups, at most this long after they end


class Claims:
    """One process's share of a manifest in a fleet's ledger; `next_batch` is what the engine reads from."""

    def __init__(
        self,
        fleet: Fleet,
        manifest: Manifest,
        *,
        batch: int,
        stopping: Callable[[], bool],
        nap: Callable[[float], Awaitable[None]],
    ) -> None:
        self._fleet, self._manifest, self._batch = fleet, manifest, batch
        self._stopping, self._nap = stopping, nap
        self._loaded: bool | None = None
        self.responsible = 0  # rows this process must account for: the ones it claimed
        self._lines: dict[str, int] = {}  # claimed rows to send, not yet finished: user_id -> line
        self._finished: list[int] = []
        self._given_back: list[int] = []
        self._closing = False
        self._flusher: asyncio.Task[None] | None = None
        # Set once a stop gives rows back: from then on every flush goes at once, never FINISH_EVERY_S later.
        self._hurry: asyncio.Event | None = None

    @property
    def total(self) -> None:
        """Not known ahead: a process of a fleet handles the share of the manifest it claims."""
        return None

    @property
    def loaded_here(self) -> bool:
        return bool(self._loaded)

    def __contains__(self, user_id: str) -> bool:
        """Whether `user_id` is a claimed row still to be sent by this process."""
        return user_id in self._lines

    async def next_batch(self) -> Batch | None:
        """The next claimed rows, or None once every row of the manifest is finished (or on a stop)."""
        if self._loaded is None:
            self._loaded = await self._fleet.load(self._manifest.sha256, self._manifest.name, self._read())
            log.info(
                "manifest %s %s the fleet's ledger",
                self._manifest.sha256[:12],
                "loaded into" if self._loaded else "already in",
                extra={"event": "fleet_joined"},
            )
        wait = min(1.0, self._fleet.lease_s / 4)
        while not self._stopping():
            claimed = await self._fleet.claim(self._manifest.sha256, self._batch)
            if self._stopping():
                # Claimed as the stop came: never this process's to tell, so back to the fleet at once.
                self._given_back += [c.line for c in claimed.candidates] + [r.line for r in claimed.rejects]
                self._flush_now()
                return None
            if claimed.candidates or claimed.rejects:
                self.responsible += len(claimed.candidates) + len(claimed.rejects)
                self._lines.update((c.user_id, c.line) for c in claimed.candidates)
                return claimed
            await self._flush()
            if await self._fleet.unfinished(self._manifest.sha256) == 0:
                return None
            await self._nap(wait)  # others hold the rest: theirs come back if they die
        return None

    async def _read(self) -> AsyncIterator[Batch]:
        """The manifest's text checked once, by the process that loads it; every row queued, rejects too."""
        batches: Iterator[Batch] = self._manifest.batches()
        while (batch := await asyncio.to_thread(next, batches, None)) is not None:
            yield batch

    def handed_back(self, user_id: str) -> None:
        """A claimed row another process holds now (it tells the row): no longer this process's to account for.

        Its claim is given back too (with the next flush): a claim this process kept would be renewed for as long
        as it lives, and the manifest would never be finished.
        """
        line = self._lines.pop(user_id, None)
        if line is not None:
            self.responsible -= 1
            self._given_back.append(line)
            self._schedule()

    def give_back_unsent(self, in_hand: Collection[str]) -> None:
        """A stop: every claimed row not finished and not `in_hand` goes back to the fleet now, not at close.

        Still counted in `responsible`: this process took them and didn't reach them (its summary's not reached).
        """
        self._given_back += [line for uid, line in self._lines.items() if uid not in in_hand]
        self._lines = {uid: line for uid, line in self._lines.items() if uid in in_hand}
        self._flush_now()

    def _flush_now(self) -> None:
        if self._hurry is None:
            self._hurry = asyncio.Event()
        self._hurry.set()  # wakes a flush waiting out FINISH_EVERY_S
        self._schedule()

    def finished(self, user_ids: Sequence[str] = (), lines: Sequence[int] = ()) -> None:
        """These rows ended (in results or rejects): the ledger hears so within FINISH_EVERY_S.

        A sent row is named by its user_id (unique among a manifest's candidates); a reject by its line (its
        user_id may be empty, or another row's).
        """
        for uid in user_ids:
            line = self._lines.pop(uid, None)
            if line is not None:
                self._finished.append(line)
        self._finished.extend(lines)
        self._schedule()

    def _schedule(self) -> None:
        if (self._finished or self._given_back) and self._flusher is None and not self._closing:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        if self._hurry is None:
            self._hurry = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FINISH_EVERY_S):
                await self._hurry.wait()
        try:
            await self._flush()
        except BackfillError as exc:
            # Kept for the next flush; if none succeeds, the claims expire and another process skips the rows.
            log.warning(
                "can't tell the ledger which rows finished: %s", exc, extra={"event": "finish_failed"}
            )
        finally:
            self._flusher = None
            self._schedule()  # rows that ended while this flush ran

    async def _flush(self) -> None:
        back, self._given_back = self._given_back, []
        if back:
            try:
                await asyncio.shield(self._fleet.give_back(self._manifest.sha256, back))
            except BaseException:
                self._given_back = back + self._given_back
                raise
        lines, self._finished = self._finished, []
        if not lines:
            return
        try:
            await asyncio.shield(self._fleet.finish(self._manifest.sha256, lines))
        except BaseException:
            self._finished = lines + self._finished  # not told: tried again, never dropped
            raise

    async def close(self) -> None:
        """Tell the ledger every finished row, then give back the claims of rows this process won't finish."""
        self._closing = True
        if self._flusher is not None:
            # Woken, not left to wait out FINISH_EVERY_S: nothing more is coming for it to gather, and every
            # process of a fleet would end half a second late.
            if self._hurry is None:
                self._hurry = asyncio.Event()
            self._hurry.set()
            # Waited for, not cancelled: a finish cut off half-way would hand back rows already in results.csv.
            await asyncio.gather(self._flusher, return_exceptions=True)
        await self._flush()
        await self._fleet.release()


class FinishingSink:
    """The run's sink, telling the claim stage of every row that ended, so the fleet never claims it again."""

    def __init__(self, sink: Sink, claims: Claims) -> None:
        self._sink, self._claims = sink, claims

    def result(self, row: ResultRow) -> None:
        self._sink.result(row)
        if not row.unfinished:
            self._claims.finished((row.user_id,))
        # Unfinished: a stop came before its next attempt. The claim goes back with the others at close, so
        # another process tries it, as a re-run would on SQLite.

    def reject(self, row: RejectRow) -> None:
        self._sink.reject(row)
        # A claimed row rejected at send time (its photo changed) is known by its user_id; one the manifest's
        # text rules rejected, by its line.
        if row.user_id in self._claims:
            self._claims.finished(user_ids=(row.user_id,))
        else:
            self._claims.finished(lines=(row.line,))

    def skipped(self, rows: Sequence[SkippedRow], finished_at: str) -> None:
        self._sink.skipped(rows, finished_at)
        self._claims.finished([r[0] for r in rows])

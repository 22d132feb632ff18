"""The PostgreSQL Store: one ledger a fleet of runs shares, which is also their work queue and their rate limit.

One file per job, as River's drivers are laid out:

- connection.py: the pool, the one way to a transaction (`Database.run`), errors said in one line, and the
  outages waited out as the run's retry policy says;
- schema.py: the tables, and a `users` row as a LedgerRow;
- attempts.py: `begin_attempt` and `settle`, group-committed in pipeline mode;
- store.py: the rest of the Store contract (reads, runs, `status`, the flush);
- queue.py: the Fleet's queue (the manifest loaded once, claims and their leases, finishes);
- rate.py: the fleet's one shared rate.

`PostgresStore` is what compose.py opens: the two contracts, each method handed to the part that does it. Every
write applies the same pure functions as SQLite (`transitions.py`) to its row read `FOR UPDATE`, so the two
backends can't drift. Writes whose loss in a crash loses no promise (see `transitions.must_be_durable`) commit
with `synchronous_commit = off`: the fencing answer is still exact, only the fsync is skipped.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection, Sequence
from typing import TypeVar

from ...errors import LedgerError
from ...images import PhotoKey
from ...manifest import Batch
from ...vocab import State
from .. import (
    HOLDERS_PAGE,
    AttemptRequest,
    Binding,
    DoneRow,
    Fleet,
    Forgetting,
    Holder,
    LedgerRow,
    LedgerStatus,
    Outcome,
    RateChange,
    Refused,
    RunRecord,
    Settled,
    Store,
    Ticket,
    Tombstone,
)
from .attempts import Attempts
from .connection import Commit, Database, Retries, SteadyRetries, location_of
from .forgotten import Tombstones
from .queue import Queue
from .rate import SharedRate
from .schema import photo_key, tombstones_kept
from .store import Records

T = TypeVar("T")
OUTAGE_S = (
    60.0  # how long a lost database is waited for before the run stops (exit 2), every attempt recorded
)
LEASE_S = 30.0


class PostgresStore(Store, Fleet):
    """A ledger in PostgreSQL, shared by any number of runs (see `Fleet` for how they share it)."""

    def __init__(
        self,
        db: Database,
        *,
        binding: Binding,
        writable: bool,
        lease_s: float,
        key: PhotoKey,
        tombstones: bool = True,
    ) -> None:
        self.binding = binding
        self.photo_key = key
        self.location = db.location
        self.lease_s = lease_s
        self._db = db
        self._writable = writable
        self._queue = Queue(db, lease_s=lease_s)
        self._attempts = Attempts(db, self._queue, lease_s=lease_s, key=key)
        # Read from schema 4 on: a reader of a schema-3 ledger (no table of them) finds none.
        self._tombstones = Tombstones(db, key, lease_s=lease_s) if tombstones else None
        self._records = Records(db, binding=binding, lease_s=lease_s)
        self._rate = SharedRate(db)

    @classmethod
    async def open(
        cls,
        url: str,
        binding: Binding | None,
        *,
        writable: bool,
        pool_size: int = 8,
        lease_s: float = LEASE_S,
        outage_s: float = OUTAGE_S,
        retries: Retries | None = None,
    ) -> PostgresStore:
        """Connect, create (writable) or check the schema, and check the ledger belongs to `binding`.

        `retries`: how long to wait between tries in an outage (the run's retry policy); `outage_s`, for how long.
        """
        db, held = await Database.open(
            url,
            binding,
            writable=writable,
            pool_size=pool_size,
            outage_s=outage_s,
            retries=retries or SteadyRetries(),
        )
        try:
            key = await db.run(photo_key, commit=Commit.READ, what="read")
            kept = await db.run(tombstones_kept, commit=Commit.READ, what="read")
        except BaseException:
            await db.close()
            raise
        return cls(db, binding=held, writable=writable, lease_s=lease_s, key=key, tombstones=kept)

    @property
    def _heartbeat(self) -> asyncio.Task[None] | None:
        """The task renewing this process's claims: cancelled, it stands for a process whose renewals stopped."""
        return self._queue.heartbeat

    # --- the Store contract ---

    async def lookup(self, user_ids: Sequence[str]) -> dict[str, LedgerRow]:
        return await self._records.lookup(user_ids)

    async def done(self, user_ids: Sequence[str]) -> dict[str, DoneRow]:
        return await self._records.done(user_ids)

    async def holders(
        self, photos: Sequence[tuple[int, int]], after: Holder | None = None, limit: int = HOLDERS_PAGE
    ) -> list[Holder]:
        return await self._records.holders(photos, after, limit)

    async def keep_samples(self, samples: Sequence[tuple[str, str, int]]) -> None:
        await self._records.keep_samples(samples)

    async def begin_attempt(self, request: AttemptRequest) -> Ticket | Refused:
        return await self._attempts.begin_attempt(request)

    async def settle(self, outcome: Outcome) -> Settled:
        return await self._attempts.settle(outcome)

    async def flush(self) -> None:
        if self._writable:
            await self._attempts.drain()
            await self._records.flush()

    async def start_run(self, record: RunRecord) -> None:
        await self._records.start_run(record)
        self._queue.started(record.run_id)

    async def finish_run(self, run_id: str, *, finished_at: str, rows: int, exit_code: int) -> None:
        await self._records.finish_run(run_id, finished_at=finished_at, rows=rows, exit_code=exit_code)

    async def note_run(self, run_id: str, note: str | None) -> None:
        await self._records.note_run(run_id, note)

    async def status(self, *, last_runs: int = 10) -> LedgerStatus:
        return await self._records.status(last_runs=last_runs, tombstones=self._tombstones is not None)

    def rows(self, states: Collection[State] | None = None) -> AsyncIterator[LedgerRow]:
        return self._records.rows(states)

    async def close(self) -> None:
        if self._db.closed:
            return
        try:
            self._queue.stop()
            if self._writable:
                if self._queue.in_fleet and self._queue.run_id is not None:
                    await self._queue.release()
                await self.flush()
        finally:
            await self._db.close()

    async def forgotten(self, user_ids: Sequence[str]) -> dict[str, Tombstone]:
        if self._tombstones is None:
            return {}
        return await self._tombstones.forgotten(user_ids)

    async def forget(self, user_ids: Sequence[str], *, at: str, by: str, dry_run: bool = False) -> Forgetting:
        return await self._erase(list(dict.fromkeys(user_ids)), None, at=at, by=by, dry_run=dry_run)

    async def purge(self, before: str, *, at: str, by: str, dry_run: bool = False) -> Forgetting:
        return await self._erase(None, before, at=at, by=by, dry_run=dry_run)

    async def _erase(
        self, user_ids: list[str] | None, before: str | None, *, at: str, by: str, dry_run: bool
    ) -> Forgetting:
        if not self._writable or self._tombstones is None:
            raise LedgerError(
                f"the ledger {self.location} was opened to read: nothing can be forgotten in it"
            )
        await self.flush()
        return await self._tombstones.forget(user_ids, before, at=at, by=by, dry_run=dry_run)

    # --- the Fleet contract ---

    async def load(self, manifest_sha256: str, path: str, rows: AsyncIterator[Batch]) -> bool:
        return await self._queue.load(manifest_sha256, path, rows)

    async def claim(self, manifest_sha256: str, n: int) -> Batch:
        return await self._queue.claim(manifest_sha256, n)

    async def unfinished(self, manifest_sha256: str) -> int:
        return await self._queue.unfinished(manifest_sha256)

    async def finish(self, manifest_sha256: str, lines: Sequence[int]) -> None:
        await self._queue.finish(manifest_sha256, lines)

    async def outputs_written(self) -> None:
        await self._queue.outputs_written()

    async def give_back(self, manifest_sha256: str, lines: Sequence[int]) -> None:
        await self._queue.give_back(manifest_sha256, lines)

    async def release(self) -> None:
        await self._queue.release()

    async def change_rate(self, change: RateChange[T]) -> T:
        return await self._rate.change(change)


__all__ = ["LEASE_S", "OUTAGE_S", "PostgresStore", "location_of"]

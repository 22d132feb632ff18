"""An in-memory Store: the contract's reference backend, for tests that hand the engine a ledger of their own."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import replace

from ..images import PhotoKey
from ..vocab import TRANSIENT_STATES, State
from . import (
    HOLDERS_PAGE,
    AttemptRequest,
    Binding,
    Forgetting,
    Holder,
    LedgerRow,
    LedgerStatus,
    Outcome,
    Refused,
    RunRecord,
    Settled,
    Store,
    Ticket,
    Tombstone,
)
from . import transitions as tr


class MemoryStore(Store):
    """Holds everything in dicts; every write is "durable" the moment it returns. Not for real runs."""

    def __init__(self, binding: Binding, *, location: str = "memory") -> None:
        self.binding = binding
        self.location = location
        self.photo_key = PhotoKey.new()
        self.users: dict[str, LedgerRow] = {}
        self.runs: dict[str, RunRecord] = {}
        self.tombstones: dict[str, Tombstone] = {}  # by user_key
        self.closed = False

    async def lookup(self, user_ids: Sequence[str]) -> dict[str, LedgerRow]:
        return {uid: self.users[uid] for uid in user_ids if uid in self.users}

    async def holders(
        self, photos: Sequence[tuple[int, int]], after: Holder | None = None, limit: int = HOLDERS_PAGE
    ) -> list[Holder]:
        wanted = set(photos)
        order = tr.holders_order
        found = sorted(
            (
                h
                for h in map(tr.holder, self.users.values())
                if h is not None
                and (h.size, h.sample) in wanted
                and (after is None or order(h) > order(after))
            ),
            key=order,
        )
        return found[:limit]

    async def keep_samples(self, samples: Sequence[tuple[str, str, int]]) -> None:
        for uid, pin, sample in samples:
            row = self.users.get(uid)
            if row is not None and row.photo_sha256 == pin and row.photo_sample is None:
                self.users[uid] = replace(row, photo_sample=sample)

    async def begin_attempt(self, request: AttemptRequest) -> Ticket | Refused:
        tombstone = self.tombstones.get(self.photo_key.user(request.user_id))
        result = tr.begin(self.users.get(request.user_id), request, tombstone)
        if isinstance(result, Refused):
            return result
        self.users[request.user_id], ticket = result
        return ticket

    async def settle(self, outcome: Outcome) -> Settled:
        new = tr.settle(self.users.get(outcome.user_id), outcome)
        if new is None:
            return Settled.FENCED
        self.users[outcome.user_id] = new
        return Settled.APPLIED

    async def flush(self) -> None:
        return None

    async def start_run(self, record: RunRecord) -> None:
        self.runs[record.run_id] = record

    async def finish_run(self, run_id: str, *, finished_at: str, rows: int, exit_code: int) -> None:
        self.runs[run_id] = replace(
            self.runs[run_id], finished_at=finished_at, rows=rows, exit_code=exit_code
        )

    async def note_run(self, run_id: str, note: str | None) -> None:
        self.runs[run_id] = replace(self.runs[run_id], note=note)

    async def status(self, *, last_runs: int = 10) -> LedgerStatus:
        counts = Counter(row.state.value for row in self.users.values())
        unfinished = [r for r in self.users.values() if r.state in TRANSIENT_STATES]
        oldest = min(unfinished, key=lambda r: r.first_attempt_at or "", default=None)
        runs = sorted(self.runs.values(), key=lambda r: r.started_at, reverse=True)[:last_runs]
        return LedgerStatus(
            location=self.location,
            binding=self.binding,
            counts=dict(sorted(counts.items())),
            waiting_for_retry=len(unfinished),
            oldest_unfinished=oldest,
            runs=runs,
            writer_alive=not self.closed,  # in memory, the store lives exactly as long as its writer
            forgotten=len(self.tombstones),
        )

    async def rows(self, states: Collection[State] | None = None) -> AsyncIterator[LedgerRow]:
        for uid in sorted(self.users):
            row = self.users[uid]
            if states is None or row.state in states:
                yield row

    async def close(self) -> None:
        self.closed = True

    async def forgotten(self, user_ids: Sequence[str]) -> dict[str, Tombstone]:
        keyed = {uid: self.photo_key.user(uid) for uid in user_ids}
        return {uid: self.tombstones[key] for uid, key in keyed.items() if key in self.tombstones}

    async def forget(self, user_ids: Sequence[str], *, at: str, by: str, dry_run: bool = False) -> Forgetting:
        rows = [self.users[uid] for uid in dict.fromkeys(user_ids) if uid in self.users]
        absent = [uid for uid in dict.fromkeys(user_ids) if uid not in self.users]
        already = len(await self.forgotten(absent))
        return self._forget(
            rows, at=at, by=by, dry_run=dry_run, already=already, unknown=len(absent) - already
        )

    async def purge(self, before: str, *, at: str, by: str, dry_run: bool = False) -> Forgetting:
        rows = [r for r in self.users.values() if tr.purged(r, before)]
        return self._forget(rows, at=at, by=by, dry_run=dry_run)

    def _forget(
        self, rows: list[LedgerRow], *, at: str, by: str, dry_run: bool, already: int = 0, unknown: int = 0
    ) -> Forgetting:
        gone, done = tr.forget_all(rows, self.photo_key.user, at=at, by=by, already=already, unknown=unknown)
        if not dry_run:
            for user_id, tombstone in gone:
                del self.users[user_id]
                self.tombstones[tombstone.user_key] = tombstone
        return done

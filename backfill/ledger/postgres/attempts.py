"""Attempts and outcomes on PostgreSQL, group-committed: the two writes every row makes, many rows a transaction.

`begin_attempt`s and `settle`s that arrive within one turn of the event loop form a group, applied in one
transaction in pipeline mode; each caller's await resolves with its own answer once that commit is made. The
rules are the ones every backend applies: the same pure functions (`transitions.py`), run on each row in the
order its writes arrived, against the row as the database holds it under lock, so that fencing by attempt
number and the check of a fleet's claim are exact whatever other processes do meanwhile.

One round trip for most groups, the writes made on condition and the commit sent together: a first attempt of
an ID this process knows nothing of is inserted where the ledger has no row for it (in a fleet, where this
run's claim holds, locked); an outcome of an attempt this process began is written over the row that attempt
wrote, where it is still exactly that one (the attempt's number and token, still sending). A write whose
condition didn't hold wrote nothing: it is read and applied in the next group, as any other write is, in two
round trips: the rows read `FOR UPDATE` (in a fleet, with their claims, locked), then written, and the commit.

Durability: a group holding an attempt, or an outcome that lowers doubt (`transitions.must_be_durable`),
commits with `synchronous_commit = on`; a group of outcomes whose loss loses no promise commits without
waiting for the disk (its settles answer QUEUED). One row's trouble stays its own: a race lost to another
process (the row inserted meanwhile) sends that row to the next group, or runs a group that read it again; a
row the server refuses (a value it can't hold) makes the group apply its writes one by one, so only that
row's caller hears of it. An outage is waited out for the whole group (its callers wait), every row then read,
and each write recognises itself if a try's commit happened unseen: an attempt by the token it carries, an
outcome by what it wrote.
"""

from __future__ import annotations

import asyncio
import json
import operator
import secrets
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from psycopg import AsyncCursor

from ...images import PhotoKey
from ...vocab import State
from .. import AttemptRequest, LedgerRow, Outcome, Refusal, Refused, Settled, Ticket, Tombstone
from .. import transitions as tr
from . import forgotten, schema
from .connection import Commit, Database, RefusedByDatabase
from .queue import Queue
from .schema import Conn

GROUPS_IN_FLIGHT = 2  # a group fills while the one before it waits for its commit
_BEGUN_MAX = (
    65_536  # rows begun and never settled (a stop) are forgotten past this many: they are read instead
)
_N = len(schema.COLUMNS)
_COLUMNS = ", ".join(schema.COLUMNS)
_KEYS = (*schema.COLUMNS, "attempt_token")
_READ = (
    f"SELECT {', '.join('u.' + c for c in schema.COLUMNS)}, u.attempt_token, "
    # Whether the row's attempt belongs to a run alive now: not finished, its heartbeat within a lease.
    "u.state = 'sending' AND EXISTS (SELECT 1 FROM backfill.runs r WHERE r.run_id = u.run_id "
    " AND r.finished_at IS NULL AND r.heartbeat_at > now() - make_interval(secs => %s)) "
    "FROM backfill.users u WHERE u.user_id = ANY(%s) ORDER BY u.user_id FOR UPDATE OF u"
)
# A group's rows travel as one JSON array of objects named as the table's columns: json.dumps is C, where
# psycopg adapts a list element by element in Python (an array per column cost 5x the JSON's client time).
_ROWS = "json_populate_recordset(NULL::backfill.users, %s::json)"
_SET = (
    f"SET ({', '.join(schema.COLUMNS[1:])}, attempt_token) = "
    f"({', '.join('v.' + c for c in schema.COLUMNS[1:])}, coalesce(v.attempt_token, u.attempt_token))"
)
# A new row whose ID another process inserted since the read fails the statement (a unique violation): the
# group is then run again, and reads that row.
_INSERT = (
    f"INSERT INTO backfill.users ({_COLUMNS}, attempt_token) SELECT {_COLUMNS}, attempt_token FROM {_ROWS}"
)
_UPDATE = f"UPDATE backfill.users u {_SET} FROM {_ROWS} AS v WHERE u.user_id = v.user_id"
# What an outcome changes in its row (`transitions.settle`, held to these by a test of this module).
OUTCOME_COLUMNS = (
    "state",
    "doubt",
    "photo_sha256",
    "photo_sample",
    "http_status",
    "result_code",
    "result_text",
    "smile_job_id",
    "job_id",
    "finished_at",
)
_OUTCOME_KEYS = ("user_id", "attempts", *OUTCOME_COLUMNS, "attempt_token")
_OUTCOME_OF = operator.attrgetter(*_OUTCOME_KEYS[:-1])
# Outcomes of attempts this process began, each written only where the row is still the one its attempt
# wrote (a settle leaves `sending`; only another attempt, with its own token, comes back to it). Only what the
# outcome changed travels: the rest of the row is the attempt's, as the condition checks. The rows are read
# through the primary key (`ARRAY(...)`, as schema.LINES), and `IS NOT DISTINCT FROM` (the same as `=` on a
# column that holds no NULL) keeps the planner off `users_state`: there it read every row ever sent, each first
# inserted `sending` (the index keeps those entries until a vacuum), and hashed them for each group.
_SETTLE_BEGUN = (
    f"WITH v AS (SELECT * FROM {_ROWS}) "
    f"UPDATE backfill.users u SET ({', '.join(OUTCOME_COLUMNS)}) = "
    f"({', '.join('v.' + c for c in OUTCOME_COLUMNS)}) FROM v "
    "WHERE u.user_id = ANY(ARRAY(SELECT user_id FROM v)) AND u.user_id = v.user_id "
    "AND u.state IS NOT DISTINCT FROM 'sending' AND u.attempts = v.attempts "
    "AND u.attempt_token = v.attempt_token "
    "RETURNING u.user_id"
)
# What a first attempt sets in its new row (`transitions.begin`, held to these by a test of this module): the
# table's defaults are the rest of a LedgerRow's, so these alone travel.
FIRST_COLUMNS = (
    "user_id",
    "state",
    "attempts",
    "doubt",
    "photo_sha256",
    "image_ref",
    "image_size",
    "image_version",
    "user_created_at",
    "first_attempt_at",
    "last_attempt_at",
    "run_id",
    "sent_sha256",
    "transform",
    "photo_sample",
)
_FIRST_KEYS = (*FIRST_COLUMNS, "attempt_token")
_FIRST_OF = operator.attrgetter(*FIRST_COLUMNS)
_INSERT_FIRST = (
    f"INSERT INTO backfill.users ({', '.join(_FIRST_KEYS)}) SELECT {', '.join(_FIRST_KEYS)} FROM {_ROWS}"
)
# None of the group's first attempts is of a forgotten ID (its keyed hash, the second parameter): where one is,
# none is written, and each is read in the next group, where the forgotten one is refused.
_NONE_FORGOTTEN = "NOT EXISTS (SELECT 1 FROM backfill.forgotten WHERE user_key = ANY(%s))"
# First attempts of IDs this process knows nothing of, each written only where the ledger has no row for it yet
# (else it is read, in the next group).
_INSERT_NEW = f"{_INSERT_FIRST} WHERE {_NONE_FORGOTTEN} ON CONFLICT (user_id) DO NOTHING RETURNING user_id"
# The same in a fleet, and only where this run still holds the row's claim, locked until the commit: the check
# `begin_attempt` makes in the same transaction as its write (queue.py's _CLAIMED, and why IS NOT DISTINCT).
_INSERT_CLAIMED = (
    f"WITH held AS (SELECT user_id FROM backfill.queue WHERE manifest_sha256 = %s AND line = {schema.LINES} "
    " AND claimed_by IS NOT DISTINCT FROM %s AND NOT done AND lease_until > now() ORDER BY line FOR UPDATE) "
    f"{_INSERT_FIRST} WHERE user_id IN (SELECT user_id FROM held) AND {_NONE_FORGOTTEN} "
    "ON CONFLICT (user_id) DO NOTHING "
    "RETURNING user_id"
)


Answer = Ticket | Refused | Settled


@dataclass(slots=True)
class _Begin:
    request: AttemptRequest
    user_id: str  # the request's, read a dozen times a write
    done: asyncio.Future[Ticket | Refused]
    # Recognises this attempt after an outage.
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    read: bool = False  # its row is read first: a write on condition found it wasn't as this process thought


@dataclass(slots=True)
class _Settle:
    outcome: Outcome
    user_id: str  # the outcome's
    done: asyncio.Future[Settled]
    read: bool = False


_Write = _Begin | _Settle


@dataclass(slots=True)
class _Applied:
    """A group's answers, by each write's place in it, and what its commit changes in this process's view."""

    answers: dict[int, Answer] = field(default_factory=dict)
    begun: dict[str, tuple[LedgerRow, str]] = field(default_factory=dict)  # rows as attempts wrote them
    lost: set[str] = field(default_factory=set)  # claims this process no longer holds
    handed_back: set[str] = field(default_factory=set)  # claims given back: another live process sends the ID
    # Writes made on condition (see _SETTLE_BEGUN and _INSERT_NEW), by place; the rows the condition held for
    # are read from `held` once the commit is made (in pipeline mode, reading them before costs a round trip).
    conditional: dict[int, str] = field(default_factory=dict)
    held: list[AsyncCursor[tuple[Any, ...]]] = field(default_factory=list)

    async def missed(self) -> set[int]:
        """The places of writes made on condition whose condition did not hold: nothing was written for them."""
        held = {uid for cur in self.held for (uid,) in await cur.fetchall()}
        return {at for at, uid in self.conditional.items() if uid not in held}


class Attempts:
    """The group commit of `begin_attempt` and `settle`; `drain` waits for every write handed to it."""

    def __init__(self, db: Database, queue: Queue, *, lease_s: float, key: PhotoKey) -> None:
        self._db = db
        self._key = key  # names a forgotten ID's tombstone
        self._queue = queue
        self._lease_s = lease_s
        self._waiting: list[_Write] = []
        self._starting = False
        self._groups: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        # Rows this process's attempts wrote, with their tokens, until their outcome: see _SETTLE_BEGUN.
        self._begun: dict[str, tuple[LedgerRow, str]] = {}

    async def begin_attempt(self, request: AttemptRequest) -> Ticket | Refused:
        done: asyncio.Future[Ticket | Refused] = asyncio.get_running_loop().create_future()
        self._hand(_Begin(request=request, user_id=request.user_id, done=done))
        return await done

    async def settle(self, outcome: Outcome) -> Settled:
        done: asyncio.Future[Settled] = asyncio.get_running_loop().create_future()
        self._hand(_Settle(outcome=outcome, user_id=outcome.user_id, done=done))
        return await done

    async def drain(self) -> None:
        """Wait until every write handed in so far is committed (or has failed)."""
        await self._idle.wait()

    # --- grouping ---

    def _hand(self, *writes: _Write) -> None:
        self._waiting.extend(writes)
        self._idle.clear()
        self._start_soon()

    def _start_soon(self) -> None:
        # Once the writes of this loop turn are all in: call_soon runs after every callback already ready.
        if self._waiting and not self._starting and len(self._groups) < GROUPS_IN_FLIGHT:
            self._starting = True
            asyncio.get_running_loop().call_soon(self._start)

    def _start(self) -> None:
        self._starting = False
        # A write whose caller went away before its group began is never made: an attempt nobody sends.
        group = [w for w in self._waiting if not w.done.cancelled()]
        self._waiting.clear()
        if group:
            task = asyncio.get_running_loop().create_task(self._commit(group), name="ledger-group")
            self._groups.add(task)
            task.add_done_callback(self._ended)
        elif not self._groups:
            self._idle.set()

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._groups.discard(task)
        self._start_soon()
        if not self._groups and not self._waiting and not self._starting:
            self._idle.set()

    async def _commit(self, group: list[_Write]) -> None:
        """Apply `group` in one transaction and answer each write; one by one if the server refuses it."""
        durable = any(isinstance(w, _Begin) or tr.must_be_durable(w.outcome) for w in group)

        async def work(conn: Conn, retried: bool) -> _Applied:
            return await self._apply(conn, group, retried=retried)

        try:
            applied = await self._db.run(
                work, commit=Commit.DURABLE if durable else Commit.LAZY, pipeline=True
            )
            missed = await applied.missed()
        except RefusedByDatabase as exc:
            if len(group) == 1:
                _fail(group, exc)
            else:
                for write in group:  # in order: two writes to one row stay in the order they came
                    await self._commit([write])
            return
        except asyncio.CancelledError:
            for write in group:
                write.done.cancel()
            raise
        except BaseException as exc:
            _fail(group, exc)
            return
        for uid in applied.lost | applied.handed_back:
            self._queue.forget(uid)
        again: list[_Write] = []
        for at, write in enumerate(group):
            self._begun.pop(write.user_id, None)
            if at in missed:
                write.read = True  # its row isn't as this process thought: read, in the next group
                again.append(write)
                continue
            if (begun := applied.begun.get(write.user_id)) is not None:
                if len(self._begun) >= _BEGUN_MAX:
                    self._begun.clear()
                self._begun[write.user_id] = begun
            answer = applied.answers[at]
            if answer is Settled.APPLIED and not durable:
                answer = Settled.QUEUED  # on disk within the WAL writer's delay, or at the next flush
            if not write.done.done():
                write.done.set_result(answer)  # type: ignore[arg-type]
        if again:
            self._hand(*again)

    # --- one group's transaction ---

    async def _apply(self, conn: Conn, group: Sequence[_Write], *, retried: bool) -> _Applied:
        """Send the group's statements; its answers, as they stand once the commit that follows is made."""
        applied = _Applied()
        # After an outage every row is read: a try's commit may have happened unseen, and only a read tells.
        if not retried:
            await self._write_on_condition(conn, group, applied)
        if len(applied.answers) < len(group):
            await self._read_and_apply(conn, group, applied, retried=retried)
        return applied

    async def _write_on_condition(self, conn: Conn, group: Sequence[_Write], applied: _Applied) -> None:
        """The writes whose row this process can tell without reading it, each on condition that it is so.

        An outcome of an attempt this process began applies to the row that attempt wrote; a first attempt of
        an ID this process knows nothing of, to no row. Whichever isn't so is read, in the next group.
        """
        writes = Counter(w.user_id for w in group)
        in_fleet = self._queue.in_fleet
        settled: dict[int, LedgerRow] = {}
        first: dict[int, tuple[_Begin, LedgerRow, Ticket]] = {}
        claims: dict[str, tuple[list[LedgerRow], list[int]]] = {}  # a fleet's first attempts, by manifest
        for at, write in enumerate(group):
            if write.read or writes[write.user_id] > 1:
                continue  # two writes to one row are read, and applied in order
            begun = self._begun.get(write.user_id)
            if isinstance(write, _Settle):
                new = None if begun is None else tr.settle(begun[0], write.outcome)
                if new is not None:
                    settled[at] = new
            elif begun is None:
                claim = self._queue.claim_of(write.user_id) if in_fleet else None
                if in_fleet and claim is None:
                    continue  # read: its refusal says the claim is lost
                made = tr.begin(None, write.request)
                assert not isinstance(made, Refused)  # nothing refuses a first attempt
                first[at] = (write, *made)
                if claim is not None:
                    rows, lines = claims.setdefault(claim[0], ([], []))
                    rows.append(made[0])
                    lines.append(claim[1])
        if settled:
            outcomes = [
                dict(zip(_OUTCOME_KEYS, (*_OUTCOME_OF(row), self._begun[row.user_id][1]), strict=True))
                for row in settled.values()
            ]
            applied.held.append(await conn.execute(_SETTLE_BEGUN, (_json(outcomes),)))
            applied.answers.update(dict.fromkeys(settled, Settled.APPLIED))
            applied.conditional.update({at: row.user_id for at, row in settled.items()})
        if first:
            tokens = {write.user_id: write.token for write, _, _ in first.values()}
            if not in_fleet:
                rows = [row for _, row, _ in first.values()]
                keys = [self._key.user(r.user_id) for r in rows]
                applied.held.append(await conn.execute(_INSERT_NEW, (_firsts(rows, tokens), keys)))
            for manifest, (rows, lines) in sorted(claims.items()):
                keys = [self._key.user(r.user_id) for r in rows]
                params = (manifest, schema.integers(lines), self._queue.run_id, _firsts(rows, tokens), keys)
                applied.held.append(await conn.execute(_INSERT_CLAIMED, params))
            for at, (write, row, ticket) in first.items():
                applied.answers[at] = ticket
                applied.conditional[at] = write.user_id
                applied.begun[write.user_id] = (row, write.token)

    async def _read_and_apply(
        self, conn: Conn, group: Sequence[_Write], applied: _Applied, *, retried: bool
    ) -> None:
        """The group's writes not yet answered: their rows read `FOR UPDATE`, the transitions applied, written."""
        todo = [at for at in range(len(group)) if at not in applied.answers]
        read = await conn.execute(_READ, (self._lease_s, sorted({group[at].user_id for at in todo})))
        begun = {group[at].user_id for at in todo if isinstance(group[at], _Begin)}
        # Sent after the read, and fetched with it: one round trip, rows locked before their claims.
        claimed = await self._queue.claimed(conn, begun) if self._queue.in_fleet and begun else set()
        rows: dict[str, LedgerRow] = {}
        tokens: dict[str, str | None] = {}
        elsewhere: set[str] = set()  # rows whose attempt another live run is making now
        for found in await read.fetchall():
            uid = found[0]
            rows[uid] = schema.row(found[:_N])
            tokens[uid] = found[_N]
            if found[_N + 1]:
                elsewhere.add(uid)
        new_ids = {group[at].user_id for at in todo} - rows.keys()
        # A forgotten ID has no row: each begun one the ledger holds no row for is looked for among the tombstones.
        tombstones = await forgotten.read(conn, self._key, sorted(begun & new_ids))
        written: set[str] = set()
        for at in todo:
            write = group[at]
            uid = write.user_id
            answer: Answer
            if isinstance(write, _Begin):
                answer, new = self._begin(
                    write,
                    rows.get(uid),
                    tokens.get(uid),
                    claimed=uid in claimed,
                    elsewhere=uid in elsewhere,
                    retried=retried,
                    applied=applied,
                    tombstone=tombstones.get(uid),
                )
                if isinstance(answer, Ticket):
                    tokens[uid] = write.token
                    applied.begun[uid] = (rows[uid] if new is None else new, write.token)
            else:
                answer, new = _settle(write.outcome, rows.get(uid), retried=retried)
            if new is not None:
                rows[uid] = new
                written.add(uid)
                elsewhere.discard(uid)  # its attempt is this run's now
            applied.answers[at] = answer
        if inserted := [rows[u] for u in sorted(written & new_ids)]:
            await _write(conn, inserted, tokens, _INSERT)
        if updated := [rows[u] for u in sorted(written - new_ids)]:
            await _write(conn, updated, tokens, _UPDATE)
        await self._queue.hand_back(conn, applied.handed_back)

    def _begin(
        self,
        write: _Begin,
        row: LedgerRow | None,
        token: str | None,
        *,
        claimed: bool,
        elsewhere: bool,
        retried: bool,
        applied: _Applied,
        tombstone: Tombstone | None = None,
    ) -> tuple[Ticket | Refused, LedgerRow | None]:
        """The answer to one attempt, and the row after it (None: unchanged)."""
        request = write.request
        if retried and row is not None and token == write.token:
            # The commit was lost to the outage, yet it happened: this very attempt is recorded.
            return Ticket(user_id=row.user_id, number=row.attempts, doubt_before=row.doubt), None
        if self._queue.in_fleet and not claimed:
            applied.lost.add(request.user_id)
            return Refused(
                user_id=request.user_id, why=Refusal.CLAIM_LOST, row=row or _placeholder(request)
            ), None
        if row is not None and elsewhere and row.run_id != request.run_id:
            # Claims are per manifest line: two manifests (or retries) holding one ID could send it twice at
            # once. The row is given back for a moment; by then the other attempt has its answer.
            applied.handed_back.add(request.user_id)
            return Refused(user_id=request.user_id, why=Refusal.SENT_ELSEWHERE, row=row), None
        result = tr.begin(row, request, tombstone)
        if isinstance(result, Refused):
            return result, None
        new, ticket = result
        return ticket, new


def _settle(outcome: Outcome, row: LedgerRow | None, *, retried: bool) -> tuple[Settled, LedgerRow | None]:
    """The answer to one outcome, and the row after it (None: unchanged)."""
    new = tr.settle(row, outcome)
    if new is not None:
        return Settled.APPLIED, new
    if (
        retried
        and row is not None
        and row.attempts == outcome.attempt
        and row.state is outcome.state
        and row.finished_at == outcome.at
    ):
        return Settled.APPLIED, None  # applied by the try whose commit the outage hid
    return Settled.FENCED, None


async def _write(
    conn: Conn, rows: list[LedgerRow], tokens: Mapping[str, str | None], statement: str, *before: Any
) -> AsyncCursor[tuple[Any, ...]]:
    """These rows as they now are, in one statement (whose parameters `before` come first)."""
    objects = [dict(zip(_KEYS, (*schema.values(r), tokens.get(r.user_id)), strict=True)) for r in rows]
    return await conn.execute(statement, (*before, _json(objects)))


def _firsts(rows: list[LedgerRow], tokens: Mapping[str, str]) -> str:
    """New rows as _INSERT_FIRST takes them."""
    return _json([dict(zip(_FIRST_KEYS, (*_FIRST_OF(r), tokens[r.user_id]), strict=True)) for r in rows])


def _json(objects: list[dict[str, Any]]) -> str:
    return json.dumps(objects, separators=(",", ":"))


def _fail(group: Sequence[_Write], exc: BaseException) -> None:
    for write in group:
        if not write.done.done():
            write.done.set_exception(exc)


def _placeholder(request: AttemptRequest) -> LedgerRow:
    """What a refusal shows for an ID the ledger has no row for yet (its claim went to another process)."""
    return LedgerRow(
        user_id=request.user_id,
        state=State.PENDING,
        attempts=0,
        doubt=False,
        photo_sha256=None,
        image_ref=None,
        image_size=None,
        image_version=None,
        user_created_at=request.user_created_at,
    )

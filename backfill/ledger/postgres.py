"""The PostgreSQL Store: one ledger a fleet of runs shares, which is also their work queue and their rate limit.

psycopg 3 rather than asyncpg: psycopg is libpq, so a password comes from PGPASSWORD, ~/.pgpass or a service
file exactly as `psql` finds it (asyncpg reimplements that lookup, without service files), and it has COPY and
an async connection pool of its own. psycopg is imported by this module only.

Every operation is one short transaction on a pooled connection. A transition reads its row `FOR UPDATE` and
applies the same pure functions as SQLite (`transitions.py`), so the two backends can't drift. Writes whose loss
in a crash loses no promise (see `transitions.must_be_durable`) commit with `synchronous_commit = off`: the
fencing answer is still exact, only the fsync is skipped. A lost connection (a restart, a failover) is retried
for `outage_s`, with each write made safe to repeat: an attempt carries a token, so a begin whose commit was
lost in the outage is recognised instead of being counted twice.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import fields, replace
from typing import Any, TypeVar
from urllib.parse import urlsplit

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from .. import redact
from ..errors import CheckpointError, LedgerAbsent
from ..manifest import Batch, Candidate, Reject
from ..vocab import DONE_STATES, TRANSIENT_STATES, Reason, State
from . import (
    AttemptRequest,
    Binding,
    DoneRow,
    Fleet,
    LedgerRow,
    LedgerStatus,
    Outcome,
    Process,
    QueueState,
    RateChange,
    RateState,
    Refusal,
    Refused,
    RunRecord,
    Settled,
    Store,
    Ticket,
    row_of,
    row_values,
)
from . import transitions as tr

T = TypeVar("T")
SCHEMA_VERSION = "1"
OUTAGE_S = (
    60.0  # how long a lost database is waited for before the run stops (exit 2), every attempt recorded
)
LEASE_S = 30.0
GAVE_UP_TRY_S = (
    2.0  # past the outage bound, each step waits this long for a connection, once (a TLS connect fits)
)
HAND_BACK_S = 2.0  # a row another live process is sending is left alone this long before it is claimed again
log = logging.getLogger("backfill")
# psycopg's pool logs every failed reconnect in an outage, in its own format, to stderr (Python's last-resort
# handler) and in between the lines of a JSON log: this module says what matters itself, once, in the run's log.
logging.getLogger("psycopg").addHandler(logging.NullHandler())
Conn = psycopg.AsyncConnection[tuple[Any, ...]]

_STATES = ", ".join(f"'{s.value}'" for s in State)
_SCHEMA = f"""
CREATE SCHEMA IF NOT EXISTS backfill;
CREATE TABLE IF NOT EXISTS backfill.meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS backfill.users (
    user_id text COLLATE "C" PRIMARY KEY,  -- byte order, whatever the database's: keyset pages rely on it
    state text NOT NULL CHECK (state IN ({_STATES})),
    attempts integer NOT NULL CHECK (attempts >= 0),
    doubt boolean NOT NULL DEFAULT false,
    photo_sha256 text,
    image_ref text,
    image_size bigint,
    image_version text,
    user_created_at text,
    http_status integer,
    result_code text NOT NULL DEFAULT '',
    result_text text NOT NULL DEFAULT '',
    smile_job_id text NOT NULL DEFAULT '',
    job_id text NOT NULL DEFAULT '',
    first_attempt_at text,
    last_attempt_at text,
    finished_at text,
    run_id text,
    attempt_token text
);
CREATE INDEX IF NOT EXISTS users_state ON backfill.users (state);
CREATE TABLE IF NOT EXISTS backfill.runs (
    run_id text PRIMARY KEY,
    started_at text NOT NULL,
    manifest text,
    manifest_sha256 text,
    pid integer,
    host text,
    finished_at text,
    rows bigint,
    exit_code integer,
    heartbeat_at timestamptz,
    outputs_at timestamptz,  -- its results.csv and rejects.csv are written: the rows it finished are told
    note text
);
CREATE TABLE IF NOT EXISTS backfill.manifests (
    sha256 text PRIMARY KEY,
    path text NOT NULL,
    rows bigint NOT NULL DEFAULT 0,
    loaded_by text,
    loaded_at timestamptz NOT NULL DEFAULT now(),
    pass integer NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS backfill.queue (
    manifest_sha256 text NOT NULL,
    line integer NOT NULL,
    user_id text NOT NULL,
    user_created_at text,
    image text,
    reason text,  -- set for a row the manifest's text rules rejected: it is claimed and told like any other
    message text,
    claimed_by text,
    lease_until timestamptz,
    done boolean NOT NULL DEFAULT false,
    finished_by text,  -- the run whose outputs tell this row; until they are written, the row is not safe
    PRIMARY KEY (manifest_sha256, line)
);
CREATE INDEX IF NOT EXISTS queue_todo ON backfill.queue (manifest_sha256, line) WHERE NOT done;
CREATE INDEX IF NOT EXISTS queue_claims ON backfill.queue (claimed_by) WHERE NOT done;
CREATE INDEX IF NOT EXISTS queue_finished_by ON backfill.queue (finished_by) WHERE done;
CREATE TABLE IF NOT EXISTS backfill.rate (
    id integer PRIMARY KEY CHECK (id = 1),
    ceiling double precision NOT NULL,
    rate double precision NOT NULL,
    tat double precision NOT NULL,
    paused_until double precision NOT NULL,
    generation integer NOT NULL,
    grown_at double precision NOT NULL
);
"""
_SCHEMA_LOCK = 0x6261636B66696C6C  # "backfill": serialises schema creation when a fleet starts all at once
_COLUMNS = tuple(f.name for f in fields(LedgerRow))
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM backfill.users"
_INSERT = (
    f"INSERT INTO backfill.users ({', '.join(_COLUMNS)}, attempt_token) "
    f"VALUES ({', '.join(['%s'] * (len(_COLUMNS) + 1))})"
)
_UPDATE = (
    f"UPDATE backfill.users SET ({', '.join(_COLUMNS)}, attempt_token) = "
    f"({', '.join(['%s'] * (len(_COLUMNS) + 1))}) WHERE user_id = %s"
)
_RUN_COLUMNS = tuple(f.name for f in fields(RunRecord))
_STATE_OF = {s.value: s for s in State}
_STATE_AT = _COLUMNS.index("state")
_DONE_IN = ", ".join(f"'{s.value}'" for s in sorted(DONE_STATES))
_RATE_COLUMNS = tuple(f.name for f in fields(RateState))


class _Again(Exception):
    """A race lost to another process (a row inserted meanwhile): run the transaction again, at once."""


def _row(values: Sequence[Any]) -> LedgerRow:
    typed = list(values)
    typed[_STATE_AT] = _STATE_OF[typed[_STATE_AT]]
    return row_of(typed)


def _said(exc: BaseException, *, hints: bool = False) -> str:
    """A driver error in one line (never a password: libpq doesn't echo one); `hints`: with libpq's own hint
    ("Is the server running...") and ours for a refused password or a missing database."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if not hints:
        return lines[0]
    said = " ".join(lines)
    lowered = said.lower()
    if "password" in lowered:
        said += ". The password comes from PGPASSWORD, ~/.pgpass or a service file (PGSERVICE), as for psql"
    elif "does not exist" in lowered and "database" in lowered:
        said += ". The database must exist (createdb NAME); the tool makes its own schema in it"
    return said


def location_of(url: str) -> str:
    """The URL as messages show it: scheme, user, host, port and database; never a password or options."""
    parts = urlsplit(url)
    user = f"{parts.username}@" if parts.username else ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{user}{parts.hostname or ''}{port}{parts.path}"


class PostgresStore(Store, Fleet):
    """A ledger in PostgreSQL, shared by any number of runs (see `Fleet` for how they share it)."""

    def __init__(
        self, pool: AsyncConnectionPool[Conn], *, binding: Binding, location: str, writable: bool,
        lease_s: float, outage_s: float,
    ) -> None:  # fmt: skip
        self.binding = binding
        self.location = location
        self.lease_s = lease_s
        self._pool = pool
        self._writable = writable
        self._outage_s = outage_s
        self._run_id: str | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._claims: dict[str, tuple[str, int]] = {}  # user_id -> (manifest, line) this process claimed
        # Every line this process holds a claim on (rejects too), until it is finished or given back: only these
        # are renewed, so a claim it has forgotten (one whose answer an outage swallowed) expires for others.
        self._held: dict[str, set[int]] = {}
        self._fleet = False  # set once a manifest is loaded or joined: every attempt then needs its claim
        self._unflushed = False
        self._closed = False
        # When the database was first found unreachable (None: it isn't). One outage, one bound, for every
        # operation: ones that start late in it don't each wait the whole bound again, and once it has passed
        # each operation tries once, briefly, so that a run stops within the bound, not a multiple of it.
        self._outage_since: float | None = None

    @classmethod
    async def open(
        cls, url: str, binding: Binding | None, *, writable: bool, pool_size: int = 8,
        lease_s: float = LEASE_S, outage_s: float = OUTAGE_S,
    ) -> PostgresStore:  # fmt: skip
        """Connect, create (writable) or check the schema, and check the ledger belongs to `binding`."""
        location = location_of(url)
        # libpq reads it from the environment; should any message ever echo it, the scrubber masks it.
        redact.register(os.environ.get("PGPASSWORD", ""))
        try:
            conn = await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=10,
                                                         application_name="backfill")  # fmt: skip
        except psycopg.Error as exc:
            raise CheckpointError(
                f"can't connect to the ledger {location}: {_said(exc, hints=True)}"
            ) from exc
        try:
            held = await _prepare(conn, binding, writable=writable, location=location)
        except pg_errors.InsufficientPrivilege as exc:
            raise CheckpointError(
                f"can't open the ledger {location}: {_said(exc)}. The first run creates the schema `backfill`: "
                "the role needs CREATE on the database then (GRANT CREATE ON DATABASE <db> TO <role>), and "
                "USAGE and read/write on that schema's tables after"
            ) from exc
        except psycopg.Error as exc:
            raise CheckpointError(f"can't open the ledger {location}: {_said(exc)}") from exc
        finally:
            await conn.close()
        pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            url, min_size=1, max_size=pool_size, open=False, timeout=10, name="backfill-ledger",
            reconnect_timeout=outage_s,
            kwargs={"autocommit": True, "connect_timeout": 10, "application_name": "backfill"},
        )  # fmt: skip
        await pool.open(wait=False)
        return cls(pool, binding=held, location=location, writable=writable, lease_s=lease_s,
                   outage_s=outage_s)  # fmt: skip

    # --- the Store contract ---

    async def lookup(self, user_ids: Sequence[str]) -> dict[str, LedgerRow]:
        async def work(conn: Conn, retried: bool) -> dict[str, LedgerRow]:
            cur = await conn.execute(_SELECT + " WHERE user_id = ANY(%s)", (list(user_ids),))
            return {r[0]: _row(r) for r in await cur.fetchall()}

        return await self._tx(work, what="read")

    async def done(self, user_ids: Sequence[str]) -> dict[str, DoneRow]:
        sql = ("SELECT user_id, state, image_ref, image_size, image_version, result_code, smile_job_id, job_id "
               "FROM backfill.users "
               f"WHERE user_id = ANY(%s) AND state IN ({_DONE_IN})")  # fmt: skip

        async def work(conn: Conn, retried: bool) -> dict[str, DoneRow]:
            cur = await conn.execute(sql, (list(user_ids),))
            return {uid: DoneRow(_STATE_OF[st], ref, size, ver, code, smile, job)
                    for uid, st, ref, size, ver, code, smile, job in await cur.fetchall()}  # fmt: skip

        return await self._tx(work, what="read")

    async def begin_attempt(self, request: AttemptRequest) -> Ticket | Refused:
        token = uuid.uuid4().hex

        async def work(conn: Conn, retried: bool) -> Ticket | Refused:
            row = await _get(conn, request.user_id)
            if retried and row is not None and await _token(conn, request.user_id) == token:
                # The commit was lost to the outage, yet it happened: this very attempt is recorded.
                return Ticket(user_id=row.user_id, number=row.attempts, doubt_before=row.doubt)
            if self._fleet and not await self._holds_claim(conn, request.user_id):
                self._forget(request.user_id)
                return Refused(
                    user_id=request.user_id, why=Refusal.CLAIM_LOST, row=row or _placeholder(request)
                )
            if (
                row is not None and row.state is State.SENDING and row.run_id != request.run_id
                and row.run_id is not None and await _alive(conn, row.run_id, self.lease_s)
            ):  # fmt: skip
                # Claims are per manifest line: two manifests (or retries) holding one ID could send it twice at
                # once. The row is given back for a moment; by then the other attempt has its answer.
                await self._hand_back(conn, request.user_id)
                return Refused(user_id=request.user_id, why=Refusal.SENT_ELSEWHERE, row=row)
            result = tr.begin(row, request)
            if isinstance(result, Refused):
                return result
            new, ticket = result
            await _write(conn, new, token, insert=row is None)
            return ticket

        ticket: Ticket | Refused = await self._tx(work)  # durable: "recorded before sent" is the whole point
        return ticket

    async def settle(self, outcome: Outcome) -> Settled:
        durable = tr.must_be_durable(outcome)

        async def work(conn: Conn, retried: bool) -> Settled:
            row = await _get(conn, outcome.user_id)
            new = tr.settle(row, outcome)
            if new is None:
                if (retried and row is not None and row.attempts == outcome.attempt
                        and row.state is outcome.state and row.finished_at == outcome.at):  # fmt: skip
                    return Settled.APPLIED  # applied by the try whose commit the outage hid
                return Settled.FENCED
            await _write(conn, new, None, insert=False)
            return Settled.APPLIED

        result: Settled = await self._tx(work, durable=durable)
        if result is Settled.APPLIED and not durable:
            self._unflushed = True
            return Settled.QUEUED  # committed, but not yet fsynced: on disk within the WAL writer's delay
        return result

    async def flush(self) -> None:
        if not self._writable or not self._unflushed:
            return

        async def work(conn: Conn, retried: bool) -> None:
            # A durable commit flushes the WAL up to itself, so every asynchronous commit before it too.
            await conn.execute("INSERT INTO backfill.meta (key, value) VALUES ('flushed_at', now()::text) "
                               "ON CONFLICT (key) DO UPDATE SET value = excluded.value")  # fmt: skip

        await self._tx(work)
        self._unflushed = False

    async def start_run(self, record: RunRecord) -> None:
        record = replace(record, pid=record.pid or os.getpid(), host=record.host or socket.gethostname())
        cols = ", ".join(_RUN_COLUMNS)
        sql = (f"INSERT INTO backfill.runs ({cols}, heartbeat_at) VALUES ({', '.join(['%s'] * len(_RUN_COLUMNS))}, "
               "now()) ON CONFLICT (run_id) DO NOTHING")  # fmt: skip
        values = tuple(getattr(record, c) for c in _RUN_COLUMNS)

        async def work(conn: Conn, retried: bool) -> None:
            await conn.execute(sql, values)

        await self._tx(work)
        self._run_id = record.run_id
        if self._heartbeat is None:
            self._heartbeat = asyncio.create_task(self._beat(), name="ledger-heartbeat")

    async def finish_run(self, run_id: str, *, finished_at: str, rows: int, exit_code: int) -> None:
        async def work(conn: Conn, retried: bool) -> None:
            await conn.execute("UPDATE backfill.runs SET finished_at=%s, rows=%s, exit_code=%s WHERE run_id=%s",
                               (finished_at, rows, exit_code, run_id))  # fmt: skip

        await self._tx(work)

    async def note_run(self, run_id: str, note: str | None) -> None:
        async def work(conn: Conn, retried: bool) -> None:
            await conn.execute("UPDATE backfill.runs SET note=%s WHERE run_id=%s", (note, run_id))

        await self._tx(work)

    async def status(self, *, last_runs: int = 10) -> LedgerStatus:
        async def work(conn: Conn, retried: bool) -> LedgerStatus:
            cur = await conn.execute(
                "SELECT state, count(*) FROM backfill.users GROUP BY state ORDER BY state"
            )
            counts = {s: int(n) for s, n in await cur.fetchall()}
            transient = [s.value for s in TRANSIENT_STATES]
            cur = await conn.execute(
                _SELECT + " WHERE state = ANY(%s) ORDER BY first_attempt_at LIMIT 1", (transient,)
            )
            oldest = await cur.fetchone()
            # Through to_jsonb: a reader may meet a ledger last written by a version without `note`.
            chosen = ", ".join(c if c != "note" else "to_jsonb(r) ->> 'note'" for c in _RUN_COLUMNS)
            cur = await conn.execute(
                f"SELECT {chosen} FROM backfill.runs r ORDER BY started_at DESC LIMIT %s", (last_runs,)
            )
            runs = [RunRecord(**dict(zip(_RUN_COLUMNS, r, strict=True))) for r in await cur.fetchall()]
            cur = await conn.execute(
                "SELECT r.run_id, r.host, r.pid, r.started_at, extract(epoch FROM now() - r.heartbeat_at), "
                "(SELECT count(*) FROM backfill.queue q WHERE q.claimed_by = r.run_id AND NOT q.done "
                " AND q.lease_until > now()) "
                "FROM backfill.runs r WHERE r.finished_at IS NULL AND r.heartbeat_at > now() - "
                "make_interval(secs => %s) ORDER BY r.started_at",
                (self.lease_s,),
            )
            processes = [Process(run_id=rid, host=host or "", pid=pid or 0, started_at=started,
                                 heartbeat_age_s=round(float(age), 1), claimed=int(claimed))
                         for rid, host, pid, started, age, claimed in await cur.fetchall()]  # fmt: skip
            cur = await conn.execute("SELECT rate, ceiling FROM backfill.rate WHERE id = 1")
            rate = await cur.fetchone()
            cur = await conn.execute(
                "SELECT m.sha256, m.path, m.rows, to_char(m.loaded_at AT TIME ZONE 'UTC', "
                '\'YYYY-MM-DD"T"HH24:MI:SS"Z"\'), count(q.line) FILTER (WHERE q.done), '
                "count(q.line) FILTER (WHERE NOT q.done AND q.claimed_by IS NOT NULL AND q.lease_until > now()) "
                "FROM backfill.manifests m LEFT JOIN backfill.queue q ON q.manifest_sha256 = m.sha256 "
                "GROUP BY m.sha256 ORDER BY m.loaded_at DESC LIMIT 5"
            )
            queues = [QueueState(manifest_sha256=sha, path=path, rows=int(rows), finished=int(done),
                                 claimed=int(claimed), loaded_at=loaded)
                      for sha, path, rows, loaded, done, claimed in await cur.fetchall()]  # fmt: skip
            return LedgerStatus(
                location=self.location, binding=self.binding, counts=counts,
                waiting_for_retry=sum(n for s, n in counts.items() if s in TRANSIENT_STATES),
                oldest_unfinished=None if oldest is None else _row(oldest), runs=runs,
                writer_alive=bool(processes), processes=processes,
                fleet_rate=None if rate is None else float(rate[0]),
                fleet_ceiling=None if rate is None else float(rate[1]), queues=queues,
            )  # fmt: skip

        return await self._tx(work, what="read")

    async def rows(self, states: Collection[State] | None = None) -> AsyncIterator[LedgerRow]:
        chosen = None if states is None else sorted({State(s).value for s in states})
        after = ""
        while True:
            # Keyset pages: a fleet may be writing, and no cursor is held open between pages.
            async def work(conn: Conn, retried: bool, after: str = after) -> list[LedgerRow]:
                where, params = "user_id > %s", [after]
                if chosen is not None:
                    where += " AND state = ANY(%s)"
                    params.append(chosen)  # type: ignore[arg-type]
                cur = await conn.execute(f"{_SELECT} WHERE {where} ORDER BY user_id LIMIT 1000",
                                         params)  # fmt: skip
                return [_row(r) for r in await cur.fetchall()]

            page = await self._tx(work, what="read")
            for row in page:
                yield row
            if len(page) < 1000:
                return
            after = page[-1].user_id

    async def close(self) -> None:
        if self._closed:
            return
        try:
            if self._heartbeat is not None:
                self._heartbeat.cancel()
            if self._writable:
                if self._fleet and self._run_id is not None:
                    await self.release()
                await self.flush()
        finally:
            self._closed = True
            await self._pool.close()

    # --- the Fleet contract ---

    async def load(self, manifest_sha256: str, path: str, rows: AsyncIterator[Batch]) -> bool:
        self._fleet = True
        # One transaction, not retried: if this process dies or the database goes away part-way, nothing of it
        # stays, and the next process to join loads the manifest instead. Joiners wait on the row's lock.
        try:
            async with self._pool.connection() as conn, conn.transaction():
                cur = await conn.execute(
                    "INSERT INTO backfill.manifests (sha256, path, loaded_by) VALUES (%s, %s, %s) "
                    "ON CONFLICT (sha256) DO NOTHING RETURNING sha256",
                    (manifest_sha256, path, self._run_id),
                )
                if await cur.fetchone() is None:
                    await self._maybe_new_pass(conn, manifest_sha256)
                    return False
                loaded = 0
                async with conn.cursor().copy(
                    "COPY backfill.queue (manifest_sha256, line, user_id, user_created_at, image, reason, message) "
                    "FROM STDIN"
                ) as copy:
                    async for batch in rows:
                        for c in batch.candidates:
                            await copy.write_row((manifest_sha256, c.line, c.user_id, c.user_created_at, c.image,
                                                  None, None))  # fmt: skip
                        for r in batch.rejects:
                            await copy.write_row((manifest_sha256, r.line, r.user_id, None, None, r.reason.value,
                                                  r.message))  # fmt: skip
                        loaded += len(batch.candidates) + len(batch.rejects)
                await conn.execute("UPDATE backfill.manifests SET rows = %s WHERE sha256 = %s",
                                   (loaded, manifest_sha256))  # fmt: skip
                return True
        except psycopg.Error as exc:
            raise CheckpointError(
                f"can't load the manifest into the ledger {self.location}: {_said(exc)}"
            ) from exc

    async def _maybe_new_pass(self, conn: Conn, manifest_sha256: str) -> None:
        await conn.execute(
            "SELECT 1 FROM backfill.manifests WHERE sha256 = %s FOR UPDATE", (manifest_sha256,)
        )
        cur = await conn.execute(
            "SELECT EXISTS (SELECT 1 FROM backfill.queue WHERE manifest_sha256 = %s "
            "AND (NOT done OR finished_by = ANY(%s)))",
            (manifest_sha256, await _dead_runs(conn, self.lease_s)),
        )
        left = await cur.fetchone()
        if left is not None and not left[0]:
            await conn.execute(
                "UPDATE backfill.queue SET done = false, finished_by = NULL, claimed_by = NULL, lease_until = NULL "
                "WHERE manifest_sha256 = %s", (manifest_sha256,),
            )  # fmt: skip
            await conn.execute(
                "UPDATE backfill.manifests SET pass = pass + 1 WHERE sha256 = %s", (manifest_sha256,)
            )

    async def claim(self, manifest_sha256: str, n: int) -> Batch:
        me = self._require_run()

        async def work(conn: Conn, retried: bool) -> Batch:
            # Lines this process holds are never claimed again by it, even with their lease run out (an outage
            # longer than the lease): the same row twice in one process would be sent twice at once.
            held_now = sorted(self._held.get(manifest_sha256, ()))
            params = {"m": manifest_sha256, "n": n, "me": me, "l": self.lease_s, "held": held_now}
            if retried:
                # An earlier try may have claimed rows whose answer the outage swallowed: give them back now.
                held = sorted(self._held.get(manifest_sha256, ()))
                await conn.execute(
                    "UPDATE backfill.queue SET claimed_by = NULL, lease_until = NULL WHERE manifest_sha256 = %s "
                    "AND claimed_by = %s AND NOT done AND NOT (line = ANY(%s))", (manifest_sha256, me, held),
                )  # fmt: skip
            cur = await conn.execute(_CLAIM_OPEN, params)
            found = await cur.fetchall()
            if len(found) < n:
                # Rows finished by a run that died before its outputs were written are in no results.csv:
                # they are claimed again (the ledger then skips the done ones), or they would be lost.
                dead = await _dead_runs(conn, self.lease_s)
                if dead:
                    cur = await conn.execute(_CLAIM_ORPHANED, {**params, "n": n - len(found), "dead": dead})
                    found += await cur.fetchall()
            batch = Batch(candidates=[], rejects=[])
            for line, uid, created, image, reason, message in sorted(found):
                if reason is None:
                    batch.candidates.append(
                        Candidate(line=line, user_id=uid, user_created_at=created, image=image)
                    )
                else:
                    batch.rejects.append(
                        Reject(line=line, user_id=uid, reason=Reason(reason), message=message)
                    )
            return batch

        # Not durable: a claim lost in a crash only expires, and nothing was sent for it.
        claimed = await self._tx(work, durable=False)
        for c in claimed.candidates:
            self._claims[c.user_id] = (manifest_sha256, c.line)
        self._held.setdefault(manifest_sha256, set()).update(
            [c.line for c in claimed.candidates] + [r.line for r in claimed.rejects]
        )
        return claimed

    async def unfinished(self, manifest_sha256: str) -> int:
        async def work(conn: Conn, retried: bool) -> int:
            cur = await conn.execute(
                "SELECT count(*) FILTER (WHERE NOT done) + count(*) FILTER (WHERE done AND finished_by = ANY(%s)) "
                "FROM backfill.queue WHERE manifest_sha256 = %s",
                (await _dead_runs(conn, self.lease_s), manifest_sha256),
            )
            found = await cur.fetchone()
            return int(found[0]) if found else 0

        return await self._tx(work, what="read")

    async def finish(self, manifest_sha256: str, lines: Sequence[int]) -> None:
        if not lines:
            return
        me = self._require_run()

        async def work(conn: Conn, retried: bool) -> int:
            # A row still `sending` under this run lost its outcome: an asynchronous commit the database dropped
            # in a crash or an immediate restart. Finished, nobody would ever settle it; given back, another
            # attempt settles it (its 2209 is ours), as a re-run after a crash does on SQLite.
            await conn.execute(
                "UPDATE backfill.queue q SET done = true, finished_by = %s, claimed_by = NULL, lease_until = NULL "
                "WHERE q.manifest_sha256 = %s AND q.line = ANY(%s) AND q.claimed_by = %s AND NOT EXISTS ("
                "SELECT 1 FROM backfill.users u WHERE u.user_id = q.user_id AND u.state = 'sending' "
                "AND u.run_id = %s)",
                (me, manifest_sha256, list(lines), me, me),
            )
            cur = await conn.execute(
                "UPDATE backfill.queue SET claimed_by = NULL, lease_until = NULL "
                "WHERE manifest_sha256 = %s AND line = ANY(%s) AND claimed_by = %s AND NOT done",
                (manifest_sha256, list(lines), me),
            )
            return cur.rowcount

        # Not durable: a finish lost in a crash makes the row claimed again, and the ledger then skips it.
        lost = await self._tx(work, durable=False)
        if lost > 0:
            log.warning(
                "%d finished row(s) had lost their outcome in the ledger (the database restarted?): given back, "
                "so another attempt settles them", lost, extra={"event": "outcome_lost"},
            )  # fmt: skip
        self._unflushed = True
        done = set(lines)
        self._held.get(manifest_sha256, set()).difference_update(done)
        for uid in [u for u, (m, line) in self._claims.items() if m == manifest_sha256 and line in done]:
            del self._claims[uid]

    async def give_back(self, manifest_sha256: str, lines: Sequence[int]) -> None:
        if not lines:
            return
        me = self._require_run()

        async def work(conn: Conn, retried: bool) -> None:
            await conn.execute(
                "UPDATE backfill.queue SET claimed_by = NULL, lease_until = NULL "
                "WHERE manifest_sha256 = %s AND line = ANY(%s) AND claimed_by = %s AND NOT done",
                (manifest_sha256, list(lines), me),
            )

        await self._tx(work, durable=False)  # lost in a crash, the claims simply expire
        back = set(lines)
        self._held.get(manifest_sha256, set()).difference_update(back)
        for uid in [u for u, (m, line) in self._claims.items() if m == manifest_sha256 and line in back]:
            del self._claims[uid]

    async def release(self) -> None:
        me = self._require_run()

        async def work(conn: Conn, retried: bool) -> None:
            await conn.execute("UPDATE backfill.queue SET claimed_by = NULL, lease_until = NULL "
                               "WHERE claimed_by = %s AND NOT done", (me,))  # fmt: skip

        await self._tx(work)
        self._claims.clear()
        self._held.clear()

    async def outputs_written(self) -> None:
        me = self._require_run()

        async def work(conn: Conn, retried: bool) -> None:
            await conn.execute("UPDATE backfill.runs SET outputs_at = now() WHERE run_id = %s", (me,))

        await self._tx(work)

    async def change_rate(self, change: RateChange[T]) -> T:
        async def work(conn: Conn, retried: bool) -> T:
            cur = await conn.execute(
                f"SELECT {', '.join(_RATE_COLUMNS)}, extract(epoch FROM clock_timestamp())::float8 "
                "FROM backfill.rate WHERE id = 1 FOR UPDATE"
            )
            found = await cur.fetchone()
            if found is None:
                cur = await conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8")
                now_row = await cur.fetchone()
                assert now_row is not None
                current, now = None, float(now_row[0])
            else:
                current = RateState(**dict(zip(_RATE_COLUMNS, found[:-1], strict=True)))
                now = float(found[-1])
            new, result = change(current, now)
            values = tuple(getattr(new, c) for c in _RATE_COLUMNS)
            if current is None:
                try:
                    await conn.execute(f"INSERT INTO backfill.rate (id, {', '.join(_RATE_COLUMNS)}) "
                                       f"VALUES (1, {', '.join(['%s'] * len(_RATE_COLUMNS))})", values)  # fmt: skip
                except pg_errors.UniqueViolation:
                    raise _Again from None
            else:
                sets = ", ".join(f"{c} = %s" for c in _RATE_COLUMNS)
                await conn.execute(f"UPDATE backfill.rate SET {sets} WHERE id = 1", values)
            return result

        return await self._tx(work, durable=False)  # a rate lost in a crash is simply re-learnt

    # --- inside ---

    def _require_run(self) -> str:
        if self._run_id is None:
            raise CheckpointError("a fleet's claims need a run: start_run() first")
        return self._run_id

    async def _holds_claim(self, conn: Conn, user_id: str) -> bool:
        held = self._claims.get(user_id)
        if held is None:
            return False
        # FOR UPDATE: while this attempt is being recorded, no other process can take the claim over.
        cur = await conn.execute(
            "SELECT 1 FROM backfill.queue WHERE manifest_sha256 = %s AND line = %s AND claimed_by = %s "
            "AND NOT done AND lease_until > now() FOR UPDATE",
            (held[0], held[1], self._run_id),
        )
        return await cur.fetchone() is not None

    def _forget(self, user_id: str) -> None:
        """A claim this process no longer holds: not renewed, not counted as its own."""
        held = self._claims.pop(user_id, None)
        if held is not None:
            self._held.get(held[0], set()).discard(held[1])

    async def _hand_back(self, conn: Conn, user_id: str) -> None:
        """Give the row's claim back to the queue, not to be claimed again for a moment."""
        held = self._claims.get(user_id)
        if held is not None:
            await conn.execute(
                "UPDATE backfill.queue SET claimed_by = NULL, lease_until = now() + make_interval(secs => %s) "
                "WHERE manifest_sha256 = %s AND line = %s AND claimed_by = %s",
                (HAND_BACK_S, held[0], held[1], self._run_id),
            )
        self._forget(user_id)

    async def _beat(self) -> None:
        """Renew this process's claims and heartbeat while it lives: a third of the lease at a time."""
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:

                async def work(conn: Conn, retried: bool) -> None:
                    await conn.execute("UPDATE backfill.runs SET heartbeat_at = now() WHERE run_id = %s",
                                       (self._run_id,))  # fmt: skip
                    for manifest, lines in list(self._held.items()):
                        await conn.execute(
                            "UPDATE backfill.queue SET lease_until = now() + make_interval(secs => %s) "
                            "WHERE manifest_sha256 = %s AND line = ANY(%s) AND claimed_by = %s AND NOT done",
                            (self.lease_s, manifest, sorted(lines), self._run_id),
                        )

                await self._tx(work, durable=False)
            except CheckpointError as exc:
                # Renewal is best effort: a claim that expires meanwhile is refused at its next attempt.
                log.warning("can't renew this run's claims: %s", exc, extra={"event": "lease_renewal_failed"})

    async def _tx(
        self, work: Callable[[Conn, bool], Awaitable[T]], *, durable: bool = True, what: str = "write"
    ) -> T:
        """`work` in one transaction; a lost connection is retried until the outage is `outage_s` old."""
        retried = False
        races = 0
        while True:
            gave_up = (
                self._outage_since is not None and time.monotonic() >= self._outage_since + self._outage_s
            )
            try:
                async with (
                    self._pool.connection(timeout=GAVE_UP_TRY_S if gave_up else None) as conn,
                    conn.transaction(),
                ):
                    # Said either way: a role or database set to `synchronous_commit = off` (a common tuning)
                    # must not make "recorded before sent" a write that a crash of the server can lose.
                    await conn.execute(_DURABLE if durable else _NOT_DURABLE)
                    result = await work(conn, retried)
                if self._outage_since is not None:
                    log.warning("the ledger %s is reachable again, after %.1fs", self.location,
                                time.monotonic() - self._outage_since, extra={"event": "ledger_reachable"})  # fmt: skip
                    self._outage_since = None
                return result
            except (_Again, pg_errors.UniqueViolation) as exc:
                # A row inserted by another process since we read it: read it again (a few times at most).
                races += 1
                if races > 20:
                    raise CheckpointError(
                        f"the ledger {self.location} kept refusing a {what}: {_said(exc)}"
                    ) from exc
            except psycopg.OperationalError as exc:
                if _is_race(exc):
                    races += 1
                    if races > 20:
                        raise CheckpointError(
                            f"the ledger {self.location} kept refusing a {what}: {_said(exc)}"
                        ) from exc
                    continue
                if not _is_lost_connection(exc):
                    # The server answered, and said no (a statement timeout, a full disk): not an outage to wait out.
                    raise CheckpointError(
                        f"the ledger {self.location} refused a {what}: {_said(exc)}"
                    ) from exc
                now = time.monotonic()
                if self._outage_since is None:
                    self._outage_since = now
                    log.warning(
                        "the ledger %s can't be reached (%s); retrying for up to %gs", self.location,
                        _said(exc), self._outage_s, extra={"event": "ledger_unreachable"},
                    )  # fmt: skip
                deadline = self._outage_since + self._outage_s
                if now >= deadline or self._closed:
                    raise CheckpointError(
                        f"the ledger {self.location} can't be reached ({_said(exc)}) after {self._outage_s:g}s; "
                        "every attempt sent is recorded. Re-run once the database is back to continue"
                    ) from exc
                retried = True
                await asyncio.sleep(min(1.0, 0.05 * 2 ** min(5, int(now - self._outage_since))))
            except psycopg.Error as exc:
                raise CheckpointError(f"the ledger {self.location} refused a {what}: {_said(exc)}") from exc


# --- one transaction's statements ---

_DURABLE = "SET LOCAL synchronous_commit TO on"
_NOT_DURABLE = "SET LOCAL synchronous_commit TO off"
_CLAIM_OPEN = (
    "WITH c AS (SELECT line FROM backfill.queue WHERE manifest_sha256 = %(m)s AND NOT done "
    " AND (lease_until IS NULL OR lease_until < now()) AND NOT (claimed_by = %(me)s AND line = ANY(%(held)s)) "
    " ORDER BY line LIMIT %(n)s FOR UPDATE SKIP LOCKED) "
    "UPDATE backfill.queue q SET claimed_by = %(me)s, lease_until = now() + make_interval(secs => %(l)s) "
    "FROM c WHERE q.manifest_sha256 = %(m)s AND q.line = c.line "
    "RETURNING q.line, q.user_id, q.user_created_at, q.image, q.reason, q.message"
)
_CLAIM_ORPHANED = (
    "WITH c AS (SELECT line FROM backfill.queue WHERE manifest_sha256 = %(m)s AND done "
    " AND finished_by = ANY(%(dead)s) ORDER BY line LIMIT %(n)s FOR UPDATE SKIP LOCKED) "
    "UPDATE backfill.queue q SET done = false, finished_by = NULL, claimed_by = %(me)s, "
    " lease_until = now() + make_interval(secs => %(l)s) "
    "FROM c WHERE q.manifest_sha256 = %(m)s AND q.line = c.line "
    "RETURNING q.line, q.user_id, q.user_created_at, q.image, q.reason, q.message"
)


def _is_race(exc: psycopg.Error) -> bool:
    """A deadlock or serialization failure: another transaction won; this one is simply run again."""
    return exc.sqlstate in ("40P01", "40001")


def _is_lost_connection(exc: psycopg.Error) -> bool:
    """No server to talk to (refused, dropped, shutting down, starting up, no pooled connection in time)."""
    state = exc.sqlstate
    return (
        isinstance(exc, PoolTimeout) or state is None or state.startswith("08") or state in _SHUTDOWN_STATES
    )


_SHUTDOWN_STATES = frozenset(
    {"57P01", "57P02", "57P03"}
)  # admin shutdown, crash shutdown, cannot connect now


async def _alive(conn: Conn, run_id: str, lease_s: float) -> bool:
    """Whether the run is still going: not finished, and it renewed its heartbeat within a lease."""
    cur = await conn.execute(
        "SELECT 1 FROM backfill.runs WHERE run_id = %s AND finished_at IS NULL "
        "AND heartbeat_at > now() - make_interval(secs => %s)",
        (run_id, lease_s),
    )
    return await cur.fetchone() is not None


async def _dead_runs(conn: Conn, lease_s: float) -> list[str]:
    """Runs that stopped renewing (they died) before their outputs were written."""
    cur = await conn.execute(
        "SELECT run_id FROM backfill.runs WHERE outputs_at IS NULL "
        "AND heartbeat_at < now() - make_interval(secs => %s)",
        (lease_s,),
    )
    return [r for (r,) in await cur.fetchall()]


async def _get(conn: Conn, user_id: str) -> LedgerRow | None:
    cur = await conn.execute(_SELECT + " WHERE user_id = %s FOR UPDATE", (user_id,))
    found = await cur.fetchone()
    return None if found is None else _row(found)


async def _token(conn: Conn, user_id: str) -> str | None:
    cur = await conn.execute("SELECT attempt_token FROM backfill.users WHERE user_id = %s", (user_id,))
    found = await cur.fetchone()
    return None if found is None else found[0]


async def _write(conn: Conn, row: LedgerRow, token: str | None, *, insert: bool) -> None:
    values = row_values(row)
    values[_STATE_AT] = row.state.value
    if insert:
        await conn.execute(_INSERT, (*values, token))
    elif token is None:
        sets = ", ".join(f"{c} = %s" for c in _COLUMNS)
        await conn.execute(f"UPDATE backfill.users SET {sets} WHERE user_id = %s", (*values, row.user_id))
    else:
        await conn.execute(_UPDATE, (*values, token, row.user_id))


def _placeholder(request: AttemptRequest) -> LedgerRow:
    """What a refusal shows for an ID the ledger has no row for yet (its claim went to another process)."""
    return LedgerRow(
        user_id=request.user_id, state=State.PENDING, attempts=0, doubt=False, photo_sha256=None, image_ref=None,
        image_size=None, image_version=None, user_created_at=request.user_created_at,
    )  # fmt: skip


async def _add_run_note(conn: Conn) -> None:
    """`runs.note`, added within schema 1 (older versions name their columns, so they read and write it still).

    Looked up first: ALTER TABLE takes the table's strongest lock and needs its owner even when the column is
    there, and every process of a fleet opens the ledger, some with a role that may read and write but not own.
    """
    cur = await conn.execute(
        "SELECT 1 FROM information_schema.columns "
        "WHERE table_schema = 'backfill' AND table_name = 'runs' AND column_name = 'note'"
    )
    if await cur.fetchone() is None:
        await conn.execute("ALTER TABLE backfill.runs ADD COLUMN note text")


async def _prepare(conn: Conn, binding: Binding | None, *, writable: bool, location: str) -> Binding:
    """Create or migrate the schema (writable), then read and check the binding."""
    if writable:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            await conn.execute(_SCHEMA)
            await _add_run_note(conn)
            cur = await conn.execute("SELECT key, value FROM backfill.meta")
            meta: dict[str, str] = dict(await cur.fetchall())
            if not meta and binding is not None:
                for key, value in (("schema", SCHEMA_VERSION), ("partner_id", binding.partner_id),
                                   ("endpoint", binding.endpoint)):  # fmt: skip
                    await conn.execute("INSERT INTO backfill.meta (key, value) VALUES (%s, %s)", (key, value))
                await conn.execute(
                    "INSERT INTO backfill.meta (key, value) VALUES ('created_at', now()::text)"
                )
                return binding
    else:
        cur = await conn.execute("SELECT to_regclass('backfill.meta') IS NOT NULL")
        exists = await cur.fetchone()
        if exists is None or not exists[0]:
            raise LedgerAbsent(f"no backfill ledger in {location} (its schema `backfill` is absent). "
                               "A run with this --checkpoint creates it")  # fmt: skip
        cur = await conn.execute("SELECT key, value FROM backfill.meta")
        meta = dict(await cur.fetchall())
    if not meta:
        raise CheckpointError(f"{location} holds no backfill ledger (it has no binding)")
    if meta.get("schema") != SCHEMA_VERSION:
        raise CheckpointError(
            f"the ledger {location} has schema {meta.get('schema')!r}; this version of backfill reads schema "
            f"{SCHEMA_VERSION}. Upgrade backfill"
        )
    held = Binding(partner_id=meta.get("partner_id", ""), endpoint=meta.get("endpoint", ""))
    if binding is not None and held != binding:
        raise CheckpointError(
            f"the ledger {location} belongs to partner {held.partner_id!r} on {held.endpoint}, not partner "
            f"{binding.partner_id!r} on {binding.endpoint}: a run must never mark users done against one API "
            "that were sent to another. Use a database (or another --checkpoint) for this partner and endpoint"
        )
    return held

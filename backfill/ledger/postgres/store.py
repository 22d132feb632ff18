"""The rest of the Store contract on PostgreSQL: rows read, runs recorded, `status`, and the flush.

Attempts and outcomes, the writes every row makes, are grouped in attempts.py; what is here runs once per
batch or per run, one short transaction each.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import replace

from ...vocab import TRANSIENT_STATES, State
from .. import HOLDERS_PAGE, Binding, DoneRow, Holder, LedgerRow, LedgerStatus, Process, QueueState, RunRecord
from . import schema
from .connection import Commit, Database
from .schema import Conn

_PAGE = 1000
_DONE = (
    "SELECT user_id, state, image_ref, image_size, image_version, result_code, smile_job_id, job_id "
    f"FROM backfill.users WHERE user_id = ANY(%s) AND state IN ({schema.DONE_IN})"
)
# `transitions.holder`'s rule in SQL: a pin, a size and a sample, all set (users_photo holds sampled rows only).
_HOLDERS = (
    "SELECT u.user_id, u.image_size, u.photo_sample, u.photo_sha256 FROM backfill.users u "
    "JOIN unnest(%s::bigint[], %s::bigint[]) AS p(size, sample) "
    "ON u.image_size = p.size AND u.photo_sample = p.sample "
    "WHERE u.photo_sha256 IS NOT NULL AND u.photo_sample IS NOT NULL "
    "AND (u.image_size, u.photo_sample, u.user_id) > (%s, %s, %s) "
    "ORDER BY u.image_size, u.photo_sample, u.user_id LIMIT %s"
)
_BEFORE_ALL = (-(2**63), -(2**63), "")  # a (size, sample, user_id) below any
# Only where the row still holds the pin the sample was taken for, and no sample yet.
_KEEP_SAMPLES = (
    "UPDATE backfill.users u SET photo_sample = k.sample FROM unnest(%s::text[], %s::text[], %s::bigint[]) "
    "AS k(user_id, pin, sample) WHERE u.user_id = k.user_id AND u.photo_sha256 = k.pin AND u.photo_sample IS NULL"
)
_START = (
    f"INSERT INTO backfill.runs ({', '.join(schema.RUN_COLUMNS)}, heartbeat_at) "
    f"VALUES ({', '.join(['%s'] * len(schema.RUN_COLUMNS))}, now()) ON CONFLICT (run_id) DO NOTHING"
)
# Through to_jsonb: a reader may meet a ledger last written by a version without `note`.
_RUN_READ = ("to_jsonb(r) ->> 'note'" if c == "note" else c for c in schema.RUN_COLUMNS)
_RUNS = f"SELECT {', '.join(_RUN_READ)} FROM backfill.runs r ORDER BY started_at DESC LIMIT %s"
_PROCESSES = (
    "SELECT r.run_id, r.host, r.pid, r.started_at, extract(epoch FROM now() - r.heartbeat_at), "
    "(SELECT count(*) FROM backfill.queue q WHERE q.claimed_by = r.run_id AND NOT q.done "
    " AND q.lease_until > now()) "
    "FROM backfill.runs r WHERE r.finished_at IS NULL AND r.heartbeat_at > now() - "
    "make_interval(secs => %s) ORDER BY r.started_at"
)
_QUEUES = (
    "SELECT m.sha256, m.path, m.rows, to_char(m.loaded_at AT TIME ZONE 'UTC', "
    '\'YYYY-MM-DD"T"HH24:MI:SS"Z"\'), count(q.line) FILTER (WHERE q.done), '
    "count(q.line) FILTER (WHERE NOT q.done AND q.claimed_by IS NOT NULL AND q.lease_until > now()) "
    "FROM backfill.manifests m LEFT JOIN backfill.queue q ON q.manifest_sha256 = m.sha256 "
    "GROUP BY m.sha256 ORDER BY m.loaded_at DESC LIMIT 5"
)


class Records:
    """What the ledger holds, read; the runs, recorded; and every lazy commit so far made durable on demand."""

    def __init__(self, db: Database, *, binding: Binding, lease_s: float) -> None:
        self._db = db
        self._binding = binding
        self._lease_s = lease_s

    async def lookup(self, user_ids: Sequence[str]) -> dict[str, LedgerRow]:
        async def work(conn: Conn, retried: bool) -> dict[str, LedgerRow]:
            cur = await conn.execute(schema.SELECT + " WHERE user_id = ANY(%s)", (list(user_ids),))
            return {r[0]: schema.row(r) for r in await cur.fetchall()}

        return await self._db.run(work, commit=Commit.READ, what="read")

    async def holders(
        self, photos: Sequence[tuple[int, int]], after: Holder | None = None, limit: int = HOLDERS_PAGE
    ) -> list[Holder]:
        since = _BEFORE_ALL if after is None else (after.size, after.sample, after.user_id)

        async def work(conn: Conn, retried: bool) -> list[Holder]:
            sizes, samples = [size for size, _ in photos], [sample for _, sample in photos]
            cur = await conn.execute(_HOLDERS, (sizes, samples, *since, limit))
            return [Holder(*found) for found in await cur.fetchall()]

        return await self._db.run(work, commit=Commit.READ, what="read")

    async def keep_samples(self, samples: Sequence[tuple[str, str, int]]) -> None:
        async def work(conn: Conn, retried: bool) -> None:
            await conn.execute(_KEEP_SAMPLES, tuple(list(column) for column in zip(*samples, strict=True)))

        if samples:
            await self._db.run(work, commit=Commit.DURABLE, what="write")

    async def done(self, user_ids: Sequence[str]) -> dict[str, DoneRow]:
        async def work(conn: Conn, retried: bool) -> dict[str, DoneRow]:
            cur = await conn.execute(_DONE, (list(user_ids),))
            return {
                uid: DoneRow(schema.state(st), ref, size, ver, code, smile, job)
                for uid, st, ref, size, ver, code, smile, job in await cur.fetchall()
            }

        return await self._db.run(work, commit=Commit.READ, what="read")

    async def flush(self) -> None:
        if not self._db.unflushed:
            return

        async def work(conn: Conn, retried: bool) -> None:
            # A durable commit flushes the WAL up to itself, so every asynchronous commit before it too.
            await conn.execute(
                "INSERT INTO backfill.meta (key, value) VALUES ('flushed_at', now()::text) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
            )

        self._db.unflushed = False  # a lazy commit made from here on is flushed by the next call
        try:
            await self._db.run(work)
        except BaseException:
            self._db.unflushed = True
            raise

    async def start_run(self, record: RunRecord) -> None:
        record = replace(record, pid=record.pid or os.getpid(), host=record.host or socket.gethostname())
        values = tuple(getattr(record, c) for c in schema.RUN_COLUMNS)

        async def work(conn: Conn, retried: bool) -> None:
            await conn.execute(_START, values)

        await self._db.run(work)

    async def finish_run(self, run_id: str, *, finished_at: str, rows: int, exit_code: int) -> None:
        async def work(conn: Conn, retried: bool) -> None:
            await conn.execute(
                "UPDATE backfill.runs SET finished_at=%s, rows=%s, exit_code=%s WHERE run_id=%s",
                (finished_at, rows, exit_code, run_id),
            )

        await self._db.run(work)

    async def note_run(self, run_id: str, note: str | None) -> None:
        async def work(conn: Conn, retried: bool) -> None:
            await conn.execute("UPDATE backfill.runs SET note=%s WHERE run_id=%s", (note, run_id))

        await self._db.run(work)

    async def status(self, *, last_runs: int = 10, tombstones: bool = True) -> LedgerStatus:
        async def work(conn: Conn, retried: bool) -> LedgerStatus:
            forgotten = 0
            if tombstones:
                cur = await conn.execute("SELECT count(*) FROM backfill.forgotten")
                found = await cur.fetchone()
                forgotten = 0 if found is None else int(found[0])
            cur = await conn.execute(
                "SELECT state, count(*) FROM backfill.users GROUP BY state ORDER BY state"
            )
            counts = {s: int(n) for s, n in await cur.fetchall()}
            transient = [s.value for s in TRANSIENT_STATES]
            cur = await conn.execute(
                schema.SELECT + " WHERE state = ANY(%s) ORDER BY first_attempt_at LIMIT 1", (transient,)
            )
            oldest = await cur.fetchone()
            cur = await conn.execute(_RUNS, (last_runs,))
            runs = [RunRecord(**dict(zip(schema.RUN_COLUMNS, r, strict=True))) for r in await cur.fetchall()]
            cur = await conn.execute(_PROCESSES, (self._lease_s,))
            processes = [
                Process(
                    run_id=rid,
                    host=host or "",
                    pid=pid or 0,
                    started_at=started,
                    heartbeat_age_s=round(float(age), 1),
                    claimed=int(claimed),
                )
                for rid, host, pid, started, age, claimed in await cur.fetchall()
            ]
            cur = await conn.execute("SELECT rate, ceiling FROM backfill.rate WHERE id = 1")
            rate = await cur.fetchone()
            cur = await conn.execute(_QUEUES)
            queues = [
                QueueState(
                    manifest_sha256=sha,
                    path=path,
                    rows=int(rows),
                    finished=int(done),
                    claimed=int(claimed),
                    loaded_at=loaded,
                )
                for sha, path, rows, loaded, done, claimed in await cur.fetchall()
            ]
            return LedgerStatus(
                location=self._db.location,
                binding=self._binding,
                counts=counts,
                waiting_for_retry=sum(n for s, n in counts.items() if s in TRANSIENT_STATES),
                oldest_unfinished=None if oldest is None else schema.row(oldest),
                runs=runs,
                writer_alive=bool(processes),
                processes=processes,
                fleet_rate=None if rate is None else float(rate[0]),
                fleet_ceiling=None if rate is None else float(rate[1]),
                queues=queues,
                forgotten=forgotten,
            )

        return await self._db.run(work, commit=Commit.READ, what="read")

    async def rows(self, states: Collection[State] | None = None) -> AsyncIterator[LedgerRow]:
        chosen = None if states is None else sorted({State(s).value for s in states})
        where = "user_id > %s" + ("" if chosen is None else " AND state = ANY(%s)")
        after = ""
        while True:
            # Keyset pages: a fleet may be writing, and no cursor is held open between pages.
            async def work(conn: Conn, retried: bool, after: str = after) -> list[LedgerRow]:
                params = (after,) if chosen is None else (after, chosen)
                cur = await conn.execute(
                    f"{schema.SELECT} WHERE {where} ORDER BY user_id LIMIT {_PAGE}", params
                )
                return [schema.row(r) for r in await cur.fetchall()]

            page = await self._db.run(work, commit=Commit.READ, what="read")
            for row in page:
                yield row
            if len(page) < _PAGE:
                return
            after = page[-1].user_id

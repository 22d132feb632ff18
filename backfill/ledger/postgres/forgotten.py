"""Erasure on PostgreSQL: `forget` and `purge` leave tombstones, and `forgotten` reads them (schema 4's table)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import psycopg

from ...errors import LedgerError
from ...images import PhotoKey
from ...vocab import FINISHED_STATES
from .. import Forgetting, LedgerRow, Tombstone
from .. import transitions as tr
from . import schema
from .connection import Commit, Database
from .schema import Conn

log = logging.getLogger("backfill")
_COLUMNS = ("user_key", "state", "doubt", "first_attempt_at", "finished_at", "forgotten_at", "forgotten_by")
_READ = f"SELECT {', '.join(_COLUMNS)} FROM backfill.forgotten WHERE user_key = ANY(%s)"
_FINISHED = [s.value for s in sorted(FINISHED_STATES)]
# Live processes of a fleet other than the erasure's own record: while one runs, nothing is forgotten. A process
# beats every third of its own lease, which the erasure doesn't know (a fleet may run with --lease 120): a beat
# within the last LIVE_WINDOW_S, or the erasure's own lease if longer, counts as alive.
_LIVE = (
    "SELECT count(*) FROM backfill.runs WHERE finished_at IS NULL AND run_id <> %s "
    "AND heartbeat_at > now() - make_interval(secs => %s)"
)
LIVE_WINDOW_S = 600.0
_SCRUBBED = "(forgotten on request)"


class Tombstones:
    """The ledger's tombstones: made by `forget` and `purge`, read by `forgotten` and by every first attempt."""

    def __init__(self, db: Database, key: PhotoKey, *, lease_s: float) -> None:
        self._db = db
        self._key = key
        self._lease_s = lease_s

    async def forgotten(self, user_ids: Sequence[str]) -> dict[str, Tombstone]:
        async def work(conn: Conn, retried: bool) -> dict[str, Tombstone]:
            return await read(conn, self._key, user_ids)

        return await self._db.run(work, commit=Commit.READ, what="read")

    async def forget(
        self, user_ids: Sequence[str] | None, before: str | None, *, at: str, by: str, dry_run: bool
    ) -> Forgetting:
        async def work(conn: Conn, retried: bool) -> Forgetting:
            # Held until the commit: a process joining the fleet now (its run's row) waits for the erasure, and
            # plans its rows with the tombstones in place; one alive already refuses it (an attempt of a row may
            # be on its way: a fleet is stopped, or finishes, before anything is forgotten).
            await conn.execute("LOCK TABLE backfill.runs IN SHARE ROW EXCLUSIVE MODE")
            cur = await conn.execute(_LIVE, (by, max(self._lease_s, LIVE_WINDOW_S)))
            live = await cur.fetchone()
            if live is not None and live[0]:
                raise LedgerError(
                    f"{live[0]} process(es) of a fleet are running on the ledger {self._db.location} (a heartbeat "
                    f"in the last {max(self._lease_s, LIVE_WINDOW_S):.0f} s): nothing is forgotten while rows may "
                    "be on their way. Run it when they are done (backfill status)"
                )
            # And every write to users waits for this transaction: a process the check above took for dead (its
            # beats stalled) can't make a first attempt whose "no tombstone" test reads a snapshot from before
            # this commit. A write's snapshot is taken once it holds its lock, so it sees the tombstones.
            await conn.execute("LOCK TABLE backfill.users IN SHARE ROW EXCLUSIVE MODE")
            if user_ids is not None:
                cur = await conn.execute(
                    schema.SELECT + " WHERE user_id = ANY(%s) FOR UPDATE", (list(user_ids),)
                )
            else:
                cur = await conn.execute(
                    schema.SELECT + " WHERE state = ANY(%s) AND finished_at < %s FOR UPDATE",
                    (_FINISHED, before),
                )
            rows: list[LedgerRow] = [schema.row(r) for r in await cur.fetchall()]
            if before is not None:
                rows = [r for r in rows if tr.purged(r, before)]
            already = unknown = 0
            if user_ids is not None:
                held = {r.user_id for r in rows}
                absent = [uid for uid in user_ids if uid not in held]
                already = len(await read(conn, self._key, absent)) if absent else 0
                unknown = len(absent) - already
            gone, done = tr.forget_all(rows, self._key.user, at=at, by=by, already=already, unknown=unknown)
            ids = [uid for uid, _ in gone]
            if gone and not dry_run:
                await conn.execute(
                    f"INSERT INTO backfill.forgotten ({', '.join(_COLUMNS)}) SELECT * FROM unnest(%s::text[], "
                    "%s::text[], %s::boolean[], %s::text[], %s::text[], %s::text[], %s::text[]) "
                    "ON CONFLICT (user_key) DO NOTHING",
                    [[getattr(t, c) for _, t in gone] for c in _COLUMNS],
                )
                await conn.execute("DELETE FROM backfill.users WHERE user_id = ANY(%s)", (ids,))
                # The queue keeps a manifest's line (so a pass of it says `forgotten`), not the user's data.
                await conn.execute(
                    "UPDATE backfill.queue SET user_created_at = '', image = '', "
                    "message = CASE WHEN message IS NULL THEN NULL ELSE %s END WHERE user_id = ANY(%s)",
                    (_SCRUBBED, ids),
                )
            return done

        done = await self._db.run(work)
        # Also when the IDs were forgotten before (or for every purge): if the rewrite after that erasure's commit
        # failed or was cut, asking again is how it is finished.
        if not dry_run and (done.count or done.already or user_ids is None):
            await self._rewrite()
        return done

    async def _rewrite(self) -> None:
        """Rewrite the tables the forgotten rows were in, so their old versions leave the files too.

        A DELETE or UPDATE leaves the row as it was in the table's pages until VACUUM reuses them; VACUUM FULL
        writes each table anew from its live rows. It needs the tables' owner: a role that isn't is told to ask.
        """
        try:
            await self._db.outside("VACUUM (FULL) backfill.users, backfill.queue")
        except psycopg.errors.InsufficientPrivilege:
            log.warning(
                "the ledger %s: the forgotten rows' old versions stay in its files until the tables' owner runs "
                "VACUUM (FULL) backfill.users, backfill.queue",
                self._db.location,
            )
        except (psycopg.Error, OSError) as exc:  # the erasure is committed: only its rewrite is left to do
            log.warning(
                "the ledger %s: the rows are forgotten, but rewriting its tables failed (%s): their old versions "
                "stay in its files until the same command is run again, or the tables' owner runs VACUUM (FULL) "
                "backfill.users, backfill.queue",
                self._db.location,
                type(exc).__name__,
            )


async def read(conn: Conn, key: PhotoKey, user_ids: Sequence[str]) -> dict[str, Tombstone]:
    """The tombstones of those of `user_ids` that were forgotten, by the ID given."""
    keyed = {key.user(uid): uid for uid in user_ids}
    if not keyed:
        return {}
    cur = await conn.execute(_READ, (list(keyed),))
    return {
        keyed[user_key]: Tombstone(
            user_key=user_key,
            state=schema.state(state),
            doubt=doubt,
            first_attempt_at=first,
            finished_at=finished,
            forgotten_at=at,
            forgotten_by=by,
        )
        for user_key, state, doubt, first, finished, at, by in await cur.fetchall()
    }

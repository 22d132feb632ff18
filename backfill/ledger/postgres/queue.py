"""A fleet's work queue in the PostgreSQL ledger: a manifest loaded once, claims with leases, and finishes.

A claim is one manifest line held by one run until its lease ends; the run renews the leases of the lines it
knows it holds (and its heartbeat) a third of a lease at a time. `begin_attempt` checks the claim inside the
same transaction that records the attempt (attempts.py asks `claimed` here), so a process that lost its lease
can never start an attempt another process may be making.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Collection, Sequence

from ...errors import LedgerError
from ...manifest import Batch, Candidate, Reject
from ...vocab import Reason
from .connection import Commit, Database
from .schema import LINES, Conn, integers

HAND_BACK_S = 2.0  # a row another live process is sending is left alone this long before it is claimed again
log = logging.getLogger("backfill")

# The rows are updated through the primary key (`line = ANY(ARRAY(...))`): joined to the CTE instead, the
# planner may hash the whole manifest's queue for each batch. Each kind of row is read through its own index
# (schema.py's queue_open and queue_leases), which holds no row another process may still be sending.
_CLAIM = (
    "WITH c AS ({take} LIMIT %(n)s) "
    "UPDATE backfill.queue q SET done = false, finished_by = NULL, claimed_by = %(me)s, "
    " lease_until = now() + make_interval(secs => %(l)s) "
    "WHERE q.manifest_sha256 = %(m)s AND q.line = ANY(ARRAY(SELECT line FROM c)) "
    "RETURNING q.line, q.user_id, q.user_created_at, q.image, q.reason, q.message"
)
# One kind of row, each locked as it is read: under the LIMIT of the whole claim, no more are read (or locked) than
# it takes, so a kind is read only while those before it fall short.
_KIND = (
    "SELECT line FROM (SELECT line FROM backfill.queue WHERE manifest_sha256 = %(m)s AND {which} "
    " ORDER BY {order} LIMIT %(n)s FOR UPDATE SKIP LOCKED) {name}"
)
# Rows whose claim's lease ended (its process died, stalled, or forgot it), the longest ended first. Lines this
# process holds are never claimed again by it, even with their lease run out (an outage longer than the lease):
# the same row twice in one process would be sent twice at once.
_EXPIRED = _KIND.format(
    which="NOT done AND claimed_by IS NOT NULL AND lease_until < now() "
    "AND NOT (claimed_by = %(me)s AND line = ANY(%(held)s::integer[]))",
    order="lease_until",
    name="expired",
)
# Rows no process holds: never claimed, or given back (and no longer left alone).
_OPEN = _KIND.format(
    which="NOT done AND claimed_by IS NULL AND (lease_until IS NULL OR lease_until < now())",
    order="line",
    name="open",
)
# The expired first, then the open, in one statement, sent with its BEGIN in one round trip (its commit in another).
_CLAIM_EXPIRED_OR_OPEN = _CLAIM.format(take=f"{_EXPIRED} UNION ALL {_OPEN}")
# Rows finished by a run that died before its outputs were written: they are in no results.csv.
_CLAIM_ORPHANED = _CLAIM.format(
    take=_KIND.format(which="done AND finished_by = ANY(%(dead)s)", order="line", name="orphaned")
)
# Where lines are named, a run's claim is tested as `claimed_by IS NOT DISTINCT FROM`: for a run's id the same
# as `=`, but not a test from which the planner infers `claimed_by IS NOT NULL`, and so picks the index of held
# rows (queue_leases) and reads it whole for each statement, its statistics having been taken before any line
# was claimed.
# Those of these lines of one manifest this run still holds, locked: while an attempt is being recorded, no
# other process can take its claim over.
_CLAIMED = (
    f"SELECT line FROM backfill.queue WHERE manifest_sha256 = %s AND line = {LINES} "
    "AND claimed_by IS NOT DISTINCT FROM %s "
    "AND NOT done AND lease_until > now() ORDER BY line FOR UPDATE"
)
_HAND_BACK = (
    "UPDATE backfill.queue SET claimed_by = NULL, lease_until = now() + make_interval(secs => %s) "
    f"WHERE manifest_sha256 = %s AND line = {LINES} AND claimed_by IS NOT DISTINCT FROM %s"
)

# Finished: these lines this run holds, except where the row's outcome was lost (see `finish`).
_FINISH = (
    "UPDATE backfill.queue q SET done = true, finished_by = %s, claimed_by = NULL, lease_until = NULL "
    f"WHERE q.manifest_sha256 = %s AND q.line = {LINES} "
    "AND q.claimed_by IS NOT DISTINCT FROM %s "
    "AND NOT EXISTS (SELECT 1 FROM backfill.users u WHERE u.user_id = q.user_id AND u.state = 'sending' "
    " AND u.run_id = %s) "
    "RETURNING q.line"
)
_GIVE_BACK = (
    "UPDATE backfill.queue SET claimed_by = NULL, lease_until = NULL WHERE manifest_sha256 = %s "
    f"AND line = {LINES} AND claimed_by IS NOT DISTINCT FROM %s AND NOT done"
)


class Queue:
    """One process's side of the fleet's queue: what it claimed, and the statements that claim and finish."""

    def __init__(self, db: Database, *, lease_s: float) -> None:
        self.lease_s = lease_s
        self.run_id: str | None = None
        self.in_fleet = False  # set once a manifest is loaded or joined: every attempt then needs its claim
        self._db = db
        self.heartbeat: asyncio.Task[None] | None = None  # renews the claims and says this run lives
        self._claims: dict[str, tuple[str, int]] = {}  # user_id -> (manifest, line) this process claimed
        # Every line this process holds a claim on, by manifest, with its user_id (None: a reject), until it is
        # finished or given back: only these are renewed, so a claim it has forgotten (one whose answer an outage
        # swallowed) expires for others.
        self._held: dict[str, dict[int, str | None]] = {}

    def started(self, run_id: str) -> None:
        """The run is recorded: its claims are its own from now on, renewed while it lives."""
        self.run_id = run_id
        if self.heartbeat is None:
            self.heartbeat = asyncio.create_task(self._beat(), name="ledger-heartbeat")

    def stop(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.cancel()

    # --- inside an attempt's transaction (attempts.py) ---

    def claim_of(self, user_id: str) -> tuple[str, int] | None:
        """The manifest and line in which this process claimed `user_id`, as far as it knows."""
        return self._claims.get(user_id)

    async def claimed(self, conn: Conn, user_ids: Collection[str]) -> set[str]:
        """Those of these IDs whose claim this run still holds, each locked until the transaction ends."""
        lines = self.lines_of(user_ids)
        # Every manifest's statement is sent before any result is read: in pipeline mode, one round trip.
        cursors = [
            (manifest, await conn.execute(_CLAIMED, (manifest, integers(of), self.run_id)))
            for manifest, of in sorted(lines.items())
        ]
        still = {(manifest, line) for manifest, cur in cursors for (line,) in await cur.fetchall()}
        return {uid for uid in user_ids if self._claims.get(uid) in still}

    async def hand_back(self, conn: Conn, user_ids: Collection[str]) -> None:
        """Give these rows' claims back to the queue, not to be claimed again for a moment."""
        for manifest, lines in sorted(self.lines_of(user_ids).items()):
            await conn.execute(_HAND_BACK, (HAND_BACK_S, manifest, integers(lines), self.run_id))

    def lines_of(self, user_ids: Collection[str]) -> dict[str, set[int]]:
        """The lines this process claimed for these IDs, by manifest."""
        found: dict[str, set[int]] = {}
        for uid in user_ids:
            if (at := self._claims.get(uid)) is not None:
                found.setdefault(at[0], set()).add(at[1])
        return found

    def forget(self, user_id: str) -> None:
        """A claim this process no longer holds: not renewed, not counted as its own."""
        held = self._claims.pop(user_id, None)
        if held is not None:
            self._held.get(held[0], {}).pop(held[1], None)

    # --- the Fleet contract ---

    async def load(self, manifest_sha256: str, path: str, rows: AsyncIterator[Batch]) -> bool:
        self.in_fleet = True
        started = False  # the manifest's rows are read once: a load cut once they are is not tried again

        async def read() -> AsyncIterator[Batch]:
            nonlocal started
            started = True
            async for batch in rows:
                yield batch

        # One transaction: if this process dies or the database goes away part-way, nothing of it stays, and the
        # next process to join loads the manifest instead. Joiners wait on the row's lock. An outage before the
        # rows are read (a process joining while the database restarts) is waited out, as any other.
        async def work(conn: Conn, retried: bool) -> bool:
            if started:
                raise LedgerError(
                    f"can't load the manifest into the ledger {self._db.location}: the load was cut part-way, "
                    "and the manifest's rows are read once. Run again: a load is made whole or not at all"
                )
            cur = await conn.execute(
                "INSERT INTO backfill.manifests (sha256, path, loaded_by) VALUES (%s, %s, %s) "
                "ON CONFLICT (sha256) DO NOTHING RETURNING sha256",
                (manifest_sha256, path, self.run_id),
            )
            if await cur.fetchone() is None:
                await self._maybe_new_pass(conn, manifest_sha256)
                return False
            loaded = 0
            async with conn.cursor().copy(
                "COPY backfill.queue (manifest_sha256, line, user_id, user_created_at, image, reason, message) "
                "FROM STDIN"
            ) as copy:
                async for batch in read():
                    for c in batch.candidates:
                        await copy.write_row(
                            (manifest_sha256, c.line, c.user_id, c.user_created_at, c.image, None, None)
                        )
                    for r in batch.rejects:
                        await copy.write_row(
                            (manifest_sha256, r.line, r.user_id, None, None, r.reason.value, r.message)
                        )
                    loaded += len(batch.candidates) + len(batch.rejects)
            await conn.execute(
                "UPDATE backfill.manifests SET rows = %s WHERE sha256 = %s", (loaded, manifest_sha256)
            )
            # The queue's statistics, now: until autovacuum's next look (up to a minute), the planner would take
            # a queue of a million rows for an empty one, and scan all of it for each claim. A role that doesn't
            # own the table is told so in a warning, and the claims wait for autovacuum.
            await conn.execute("ANALYZE backfill.queue")
            return True

        return await self._db.run(work, what="load of the manifest")

    async def _maybe_new_pass(self, conn: Conn, manifest_sha256: str) -> None:
        await conn.execute(
            "SELECT 1 FROM backfill.manifests WHERE sha256 = %s FOR UPDATE", (manifest_sha256,)
        )
        cur = await conn.execute(
            "SELECT EXISTS (SELECT 1 FROM backfill.queue WHERE manifest_sha256 = %s "
            "AND (NOT done OR finished_by = ANY(%s)))",
            (manifest_sha256, await dead_runs(conn, self.lease_s)),
        )
        left = await cur.fetchone()
        if left is not None and not left[0]:
            await conn.execute(
                "UPDATE backfill.queue SET done = false, finished_by = NULL, claimed_by = NULL, lease_until = NULL "
                "WHERE manifest_sha256 = %s",
                (manifest_sha256,),
            )
            await conn.execute(
                "UPDATE backfill.manifests SET pass = pass + 1 WHERE sha256 = %s", (manifest_sha256,)
            )

    async def claim(self, manifest_sha256: str, n: int) -> Batch:
        me = self._require_run()

        async def work(conn: Conn, retried: bool) -> Batch:
            held = integers(self._held.get(manifest_sha256, ()))
            params = {"m": manifest_sha256, "n": n, "me": me, "l": self.lease_s, "held": held}
            if retried:
                # An earlier try may have claimed rows whose answer the outage swallowed: give them back now.
                await conn.execute(
                    "UPDATE backfill.queue SET claimed_by = NULL, lease_until = NULL WHERE manifest_sha256 = %s "
                    "AND claimed_by = %s AND NOT done AND NOT (line = ANY(%s::integer[]))",
                    (manifest_sha256, me, held),
                )
            cur = await conn.execute(_CLAIM_EXPIRED_OR_OPEN, params)
            found = await cur.fetchall()
            if len(found) < n:
                # Claimed again (the ledger then skips the done ones), or they would be lost.
                dead = await dead_runs(conn, self.lease_s)
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

        # Lazy: a claim lost in a crash only expires, and nothing was sent for it.
        claimed = await self._db.run(work, commit=Commit.LAZY, pipeline=True)
        held = self._held.setdefault(manifest_sha256, {})
        for c in claimed.candidates:
            self._claims[c.user_id] = (manifest_sha256, c.line)
            held[c.line] = c.user_id
        held.update(dict.fromkeys([r.line for r in claimed.rejects]))
        return claimed

    async def unfinished(self, manifest_sha256: str) -> int:
        async def work(conn: Conn, retried: bool) -> int:
            cur = await conn.execute(
                "SELECT count(*) FILTER (WHERE NOT done) + count(*) FILTER (WHERE done AND finished_by = ANY(%s)) "
                "FROM backfill.queue WHERE manifest_sha256 = %s",
                (await dead_runs(conn, self.lease_s), manifest_sha256),
            )
            found = await cur.fetchone()
            return int(found[0]) if found else 0

        return await self._db.run(work, commit=Commit.READ, what="read")

    async def finish(self, manifest_sha256: str, lines: Sequence[int]) -> None:
        if not lines:
            return
        me = self._require_run()

        async def work(conn: Conn, retried: bool) -> int:
            # A row still `sending` under this run lost its outcome: an asynchronous commit the database dropped
            # in a crash or an immediate restart. Finished, nobody would ever settle it; given back, another
            # attempt settles it (its 2209 is ours), as a re-run after a crash does on SQLite.
            cur = await conn.execute(_FINISH, (me, manifest_sha256, integers(lines), me, me))
            left = set(lines).difference(line for (line,) in await cur.fetchall())
            if not left:
                return 0
            cur = await conn.execute(_GIVE_BACK, (manifest_sha256, integers(left), me))
            return cur.rowcount

        # Lazy: a finish lost in a crash makes the row claimed again, and the ledger then skips it.
        lost = await self._db.run(work, commit=Commit.LAZY)
        if lost > 0:
            log.warning(
                "%d finished row(s) had lost their outcome in the ledger (the database restarted?): given back, "
                "so another attempt settles them",
                lost,
                extra={"event": "outcome_lost"},
            )
        self._let_go(manifest_sha256, lines)

    async def give_back(self, manifest_sha256: str, lines: Sequence[int]) -> None:
        if not lines:
            return
        me = self._require_run()

        async def work(conn: Conn, retried: bool) -> None:
            await conn.execute(_GIVE_BACK, (manifest_sha256, integers(lines), me))

        await self._db.run(work, commit=Commit.LAZY)  # lost in a crash, the claims simply expire
        self._let_go(manifest_sha256, lines)

    async def release(self) -> None:
        me = self._require_run()

        async def work(conn: Conn, retried: bool) -> None:
            await conn.execute(
                "UPDATE backfill.queue SET claimed_by = NULL, lease_until = NULL "
                "WHERE claimed_by = %s AND NOT done",
                (me,),
            )

        await self._db.run(work)
        self._claims.clear()
        self._held.clear()

    async def outputs_written(self) -> None:
        me = self._require_run()

        async def work(conn: Conn, retried: bool) -> None:
            await conn.execute("UPDATE backfill.runs SET outputs_at = now() WHERE run_id = %s", (me,))

        await self._db.run(work)

    # --- inside ---

    def _require_run(self) -> str:
        if self.run_id is None:
            raise LedgerError("a fleet's claims need a run: start_run() first")
        return self.run_id

    def _let_go(self, manifest_sha256: str, lines: Sequence[int]) -> None:
        """These lines are no longer this process's: finished, or given back."""
        held = self._held.get(manifest_sha256, {})
        for line in lines:
            uid = held.pop(line, None)
            if uid is not None and self._claims.get(uid) == (manifest_sha256, line):
                del self._claims[uid]

    async def _beat(self) -> None:
        """Renew this process's claims and heartbeat while it lives: a third of the lease at a time."""
        while True:
            await asyncio.sleep(self.lease_s / 3)

            async def work(conn: Conn, retried: bool) -> None:
                await conn.execute(
                    "UPDATE backfill.runs SET heartbeat_at = now() WHERE run_id = %s", (self.run_id,)
                )
                for manifest, lines in list(self._held.items()):
                    await conn.execute(
                        "UPDATE backfill.queue SET lease_until = now() + make_interval(secs => %s) "
                        f"WHERE manifest_sha256 = %s AND line = {LINES} "
                        "AND claimed_by IS NOT DISTINCT FROM %s AND NOT done",
                        (self.lease_s, manifest, integers(lines), self.run_id),
                    )

            try:
                await self._db.run(work, commit=Commit.LAZY)
            except LedgerError as exc:
                # Renewal is best effort: a claim that expires meanwhile is refused at its next attempt.
                log.warning("can't renew this run's claims: %s", exc, extra={"event": "lease_renewal_failed"})


async def dead_runs(conn: Conn, lease_s: float) -> list[str]:
    """Runs that stopped renewing (they died) before their outputs were written."""
    cur = await conn.execute(
        "SELECT run_id FROM backfill.runs WHERE outputs_at IS NULL "
        "AND heartbeat_at < now() - make_interval(secs => %s)",
        (lease_s,),
    )
    return [r for (r,) in await cur.fetchall()]

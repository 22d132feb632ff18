"""The PostgreSQL ledger's queue and its schema: what a claim reads, and a ledger of schema 2 migrated in place."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from backfill.errors import LedgerError
from backfill.ledger import Binding, RunRecord, Ticket
from backfill.ledger.postgres import PostgresStore
from backfill.ledger.postgres.queue import _CLAIM_EXPIRED_OR_OPEN, _FINISH
from backfill.ledger.postgres.schema import SCHEMA_VERSION, integers
from backfill.manifest import Batch, Candidate

from .pg_server import ROLE_PASSWORD, PgCluster
from .test_ledger_contract import request

NEWER = str(int(SCHEMA_VERSION) + 1)  # a later version's schema

BINDING = Binding(partner_id="085", endpoint="http://127.0.0.1:1")
# Schema 2's queue indexes (1's too), as the versions before schema 3 made them.
_SCHEMA_2_INDEXES = """
CREATE INDEX queue_todo ON backfill.queue (manifest_sha256, line) WHERE NOT done;
CREATE INDEX queue_claims ON backfill.queue (claimed_by) WHERE NOT done;
"""


async def _rows(n: int) -> AsyncIterator[Batch]:
    yield Batch(
        candidates=[
            Candidate(line=i + 2, user_id=f"u{i:05d}", user_created_at="2021-01-01", image=f"u{i}.png")
            for i in range(n)
        ],
        rejects=[],
    )


async def _process(url: str, run_id: str) -> PostgresStore:
    store = await PostgresStore.open(url, BINDING, writable=True)
    await store.start_run(RunRecord(run_id=run_id, started_at="2026-01-01T00:00:00Z", manifest="m.csv"))
    return store


def _queue_indexes(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        found = conn.execute(
            "SELECT indexname FROM pg_indexes WHERE schemaname = 'backfill' AND tablename = 'queue'"
        ).fetchall()
    return {name for (name,) in found}


def _schema(url: str) -> str:
    with psycopg.connect(url) as conn:
        found = conn.execute("SELECT value FROM backfill.meta WHERE key = 'schema'").fetchone()
    assert found is not None
    return str(found[0])


def _as_schema_2(url: str) -> None:
    """Turn a ledger into what the version before schema 3 left: the queue's indexes of then, schema 2 (photo
    pins already keyed)."""
    with psycopg.connect(url) as conn:
        conn.execute("DROP INDEX backfill.queue_open, backfill.queue_leases")
        conn.execute(_SCHEMA_2_INDEXES)
        conn.execute("UPDATE backfill.meta SET value = '2' WHERE key = 'schema'")


def _filtered(plan: dict[str, Any]) -> int:
    """Rows a plan's scans read and threw away, over every node."""
    below = sum(_filtered(p) for p in plan.get("Plans", ()))
    return below + int(plan.get("Rows Removed by Filter", 0))


async def test_a_claim_reads_no_row_that_another_claim_holds(pg_url: str) -> None:
    """With 2,000 rows in flight, a claim reads the rows it takes and no others, among the expired ones or the
    open: each claim would otherwise read every row in flight before the first it may take (the queue's largest
    cost per row, in schema 2)."""
    a, b = await _process(pg_url, "run-a"), await _process(pg_url, "run-b")
    try:
        await a.load("m1", "m.csv", _rows(2_100))
        assert len((await a.claim("m1", 2_000)).candidates) == 2_000
        params = {"m": "m1", "n": 50, "me": "run-b", "l": 30.0, "held": "{}"}
        with psycopg.connect(pg_url) as conn:
            found = conn.execute(
                f"EXPLAIN (ANALYZE, FORMAT JSON) {_CLAIM_EXPIRED_OR_OPEN}", params
            ).fetchone()
            conn.rollback()  # EXPLAIN ANALYZE made the claim: undone
        assert found is not None
        (plan,) = found[0]
        assert plan["Plan"]["Actual Rows"] == 50  # the claim took what it could
        assert _filtered(plan["Plan"]) == 0
        assert [c.line for c in (await b.claim("m1", 200)).candidates] == list(range(2_002, 2_102))
    finally:
        await a.close()
        await b.close()


async def test_a_finish_reads_the_rows_it_names_and_no_others(pg_url: str) -> None:
    """A finish names a second's rows (1,500 here), on a queue whose statistics were taken at its load: read row
    by row, not the whole queue held against the list (which grows with the queue, each half second)."""
    a = await _process(pg_url, "run-a")
    try:
        await a.load("m1", "m.csv", _rows(3_000))
        lines = [c.line for c in (await a.claim("m1", 1_500)).candidates]
        with psycopg.connect(pg_url) as conn:
            found = conn.execute(
                f"EXPLAIN (ANALYZE, FORMAT JSON) {_FINISH}",
                ("run-a", "m1", integers(lines), "run-a", "run-a"),
            ).fetchone()
            conn.rollback()  # EXPLAIN ANALYZE made the finish: undone
        assert found is not None
        (plan,) = found[0]
        assert plan["Plan"]["Actual Rows"] == 1_500
        assert _filtered(plan["Plan"]) == 0
    finally:
        await a.close()


def _cut_connections(url: str) -> None:
    """Every other connection to the database cut, as a restart or a failover cuts them."""
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )


async def test_a_process_that_joins_as_the_database_restarts_waits_for_it_and_loads(pg_url: str) -> None:
    a = await _process(pg_url, "run-a")
    try:
        _cut_connections(pg_url)  # the connections its pool holds are gone
        assert await a.load("m1", "m.csv", _rows(10)) is True
        assert len((await a.claim("m1", 20)).candidates) == 10
    finally:
        await a.close()


async def test_a_load_cut_part_way_leaves_nothing_and_the_next_process_loads(pg_url: str) -> None:
    async def cut_once_read() -> AsyncIterator[Batch]:
        async for batch in _rows(10):
            yield batch
        _cut_connections(pg_url)  # every row read, the COPY not yet ended: they can't be read again

    a, b = await _process(pg_url, "run-a"), await _process(pg_url, "run-b")
    try:
        with pytest.raises(LedgerError, match="cut part-way"):
            await a.load("m1", "m.csv", cut_once_read())
        with psycopg.connect(pg_url) as conn:
            assert conn.execute("SELECT count(*) FROM backfill.queue").fetchone() == (0,)
        assert await b.load("m1", "m.csv", _rows(10)) is True
        assert len((await b.claim("m1", 20)).candidates) == 10
    finally:
        await a.close()
        await b.close()


async def test_a_schema_2_ledger_is_migrated_in_place_and_its_claims_kept(pg_url: str) -> None:
    a = await _process(pg_url, "run-a")
    try:
        await a.load("m1", "m.csv", _rows(10))
        assert [c.line for c in (await a.claim("m1", 4)).candidates] == [2, 3, 4, 5]
    finally:
        await a.close()  # a clean stop gives its claims back: A's are taken again below
    a = await _process(pg_url, "run-a2")
    try:
        assert [c.line for c in (await a.claim("m1", 3)).candidates] == [2, 3, 4]
        await a.finish("m1", [2])
        _as_schema_2(pg_url)

        # Schema 4's users have two more columns, which every read names: a reader asks for a writer first.
        with pytest.raises(LedgerError, match=r"has schema 2, from an earlier version.*writing command"):
            await PostgresStore.open(pg_url, None, writable=False)
        assert _schema(pg_url) == "2"  # a reader never writes, a migration neither

        b = await _process(pg_url, "run-b")
        try:
            assert _schema(pg_url) == SCHEMA_VERSION
            assert _queue_indexes(pg_url) == {"queue_pkey", "queue_open", "queue_leases", "queue_finished_by"}
            # A's claims (lines 3 and 4) held through the migration; line 2 finished; the rest open.
            assert [c.line for c in (await b.claim("m1", 10)).candidates] == [5, 6, 7, 8, 9, 10, 11]
            await a.finish("m1", [3, 4])
            assert await b.unfinished("m1") == 7
        finally:
            await b.close()
        # A process of the earlier version opens it: it makes its indexes again before it refuses schema 3.
        with psycopg.connect(pg_url) as conn:
            conn.execute(_SCHEMA_2_INDEXES)
        await (await _process(pg_url, "run-c")).close()
        assert _queue_indexes(pg_url) == {"queue_pkey", "queue_open", "queue_leases", "queue_finished_by"}
    finally:
        await a.close()


async def test_a_ledger_of_a_newer_schema_is_refused_and_nothing_is_made_in_it(pg_url: str) -> None:
    store = await _process(pg_url, "r")
    await store.close()
    with psycopg.connect(pg_url) as conn:
        conn.execute("DROP INDEX backfill.queue_open")
        conn.execute("UPDATE backfill.meta SET value = %s WHERE key = 'schema'", (NEWER,))
    for writable in (True, False):
        with pytest.raises(LedgerError, match=rf"has schema '{NEWER}'.*Upgrade backfill"):
            await PostgresStore.open(pg_url, BINDING, writable=writable)
    assert "queue_open" not in _queue_indexes(pg_url)


async def test_a_role_that_may_not_migrate_a_schema_2_ledger_is_told_who_may(
    pg_cluster: PgCluster, pg_url: str
) -> None:
    """A fleet's processes may run as a role that reads and writes the tables without owning them."""
    store = await _process(pg_url, "r")
    await store.close()
    _as_schema_2(pg_url)
    database = pg_url.rsplit("/", 1)[1]
    role = f"backfill_rw_{os.getpid()}"
    pg_cluster.sql(f"CREATE ROLE {role} LOGIN PASSWORD '{ROLE_PASSWORD}'")
    pg_cluster.sql(
        f"GRANT USAGE ON SCHEMA backfill TO {role}; "
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA backfill TO {role}",
        database,
    )
    with pytest.raises(
        LedgerError,
        match=r"has the queue of an earlier version.*the role that owns its tables must open it first",
    ):
        await PostgresStore.open(pg_cluster.url(database, user=role), BINDING, writable=True)
    assert _schema(pg_url) == "2" and "queue_todo" in _queue_indexes(pg_url)  # left as it was


async def test_a_role_that_reads_and_writes_the_tables_without_owning_them_runs_a_current_ledger(
    pg_cluster: PgCluster, pg_url: str
) -> None:
    """docs/fleet.md's role: USAGE on the schema, read and write on its tables, owner of nothing. Opening a
    ledger already at this version's schema creates nothing, so it needs no owner."""
    store = await _process(pg_url, "r")
    await store.close()
    database = pg_url.rsplit("/", 1)[1]
    role = f"backfill_rw_current_{os.getpid()}"  # roles are the cluster's: one name a test
    pg_cluster.sql(f"CREATE ROLE {role} LOGIN PASSWORD '{ROLE_PASSWORD}'")
    pg_cluster.sql(
        f"GRANT USAGE ON SCHEMA backfill TO {role}; "
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA backfill TO {role}",
        database,
    )
    store = await PostgresStore.open(pg_cluster.url(database, user=role), BINDING, writable=True)
    try:
        assert isinstance(await store.begin_attempt(request("rw1")), Ticket)
        await store.flush()
        assert [h.user_id for h in await store.holders([(10, ord("a"))])] == ["rw1"]
    finally:
        await store.close()

"""Forgetting a user (`backfill forget`, `purge`): their data gone from the ledger's files, the ID never sent again."""

from __future__ import annotations

import asyncio
import csv
import datetime
import hashlib
import json
import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from backfill import compose
from backfill.config import Settings
from backfill.errors import LedgerError
from backfill.images import Fingerprint
from backfill.ledger import AttemptRequest, Outcome, Refusal, Refused, RunRecord, Store, Ticket
from backfill.ledger.postgres.schema import SCHEMA_VERSION as PG_SCHEMA
from backfill.ledger.sqlite import SCHEMA_VERSION as SQLITE_SCHEMA
from backfill.ledger.sqlite import SqliteStore
from backfill.sandbox.server import RunningSandbox
from backfill.vocab import State

from .conftest import cli, enrolled, sandbox_ledger, simple_rows, write_manifest
from .pg_server import PgCluster
from .test_ledger_contract import BINDING, open_store


def facts(uid: str) -> tuple[str, str, str, str]:
    """A user's created_at, image, image version and result text: each names the user, so a byte search finds
    exactly that user's."""
    return f"1987-06-05T04:03:02Z/{uid}", f"/photos/secret-{uid}.jpg", f"mtime-{uid}", f"Enrolled-{uid}-text"


def attempt(uid: str, at: str) -> AttemptRequest:
    created, image, version, _ = facts(uid)
    return AttemptRequest(
        user_id=uid,
        photo_sha256=hashlib.sha256(uid.encode()).hexdigest(),  # as the pin is: this user's alone
        fingerprint=Fingerprint(ref=image, size=4711, version=version),
        user_created_at=created,
        run_id="r1",
        at=at,
    )


def answer(uid: str, n: int, state: State, *, may: bool = False) -> Outcome:
    return Outcome(
        user_id=uid,
        attempt=n,
        state=state,
        may_have_enrolled=may,
        proves_not_enrolled=False,
        http_status=200 if state is State.ENROLLED else 504,
        result_code="0840" if state is State.ENROLLED else "",
        result_text=facts(uid)[3],
        smile_job_id="job-1",
        job_id="j-1",
        at=f"2026-01-01T00:00:0{n}.000Z",
    )


async def enrol_twice(store: Store, uid: str) -> list[bytes]:
    """An ID tried twice (a lost answer, then a success), so its row is written four times: older copies of it
    may linger in the file's free space. What the ledger holds of the user: the ID, its facts and its pin."""
    assert isinstance(await store.begin_attempt(attempt(uid, "2026-01-01T00:00:00.000Z")), Ticket)
    await store.settle(answer(uid, 1, State.UNKNOWN, may=True))
    assert isinstance(await store.begin_attempt(attempt(uid, "2026-01-01T00:00:02.000Z")), Ticket)
    await store.settle(answer(uid, 2, State.ENROLLED))
    await store.flush()
    pin = (await store.lookup([uid]))[uid].photo_sha256
    assert pin is not None
    return [uid.encode(), pin.encode(), *(f.encode() for f in facts(uid))]


def file_bytes(path: Path) -> bytes:
    """The ledger's file and whatever SQLite keeps beside it (its WAL, a rollback journal)."""
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*") if p.is_file())


async def three_hundred_enrolled(path: Path) -> tuple[dict[str, list[bytes]], list[str]]:
    """A SQLite ledger of 300 users, each enrolled at the second try: what it holds of each, and every third ID.

    Enough rows, each written four times, that older copies of some lie in free space a delete never reaches
    (with a few rows, or without VACUUM at a few hundred, one is found; see _forget)."""
    store = await SqliteStore.open(path, BINDING, writable=True)
    try:
        held = {f"user-{i:04d}": await enrol_twice(store, f"user-{i:04d}") for i in range(300)}
    finally:
        await store.close()
    return held, [uid for uid in held if int(uid[-4:]) % 3 == 0]


async def test_a_forgotten_users_data_is_gone_from_every_byte_of_the_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    held, gone = await three_hundred_enrolled(path)
    # The control: before, the file holds every one of them (so finding none after means something).
    before = file_bytes(path)
    assert [s for facts in held.values() for s in facts if s not in before] == []

    store = await SqliteStore.open(path, BINDING, writable=True)
    try:
        done = await store.forget(gone, at="2026-02-01T00:00:00.000Z", by="f1")
        assert done.forgotten == {"enrolled": len(gone)}
        keys = [store.photo_key.user(uid).encode() for uid in gone]
        during = file_bytes(path)  # with the ledger still open: its WAL too
    finally:
        await store.close()
    after = file_bytes(path)
    for left in (during, after):
        assert [s for uid in gone for s in held[uid] if s in left] == []
        kept = [s for uid, facts in held.items() if uid not in gone for s in facts]
        assert [s for s in kept if s not in left] == []  # the other users' are all there
        assert [k for k in keys if k not in left] == []  # the tombstones, by the keyed hash find-user prints


async def test_an_erasure_whose_rewrite_could_not_finish_is_finished_by_asking_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "ledger.sqlite"
    held, gone = await three_hundred_enrolled(path)
    # A reader (a `status --watch`, say) holds a snapshot from before the erasure: the rewritten pages can't be
    # copied back into the file past it, so the old ones, the forgotten users' cells in them, stay there.
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM users").fetchone()
    store = await SqliteStore.open(path, BINDING, writable=True)
    try:
        with caplog.at_level(logging.WARNING, logger="backfill"):
            done = await store.forget(gone, at="2026-02-01T00:00:00.000Z", by="f1")
        assert done.forgotten == {"enrolled": len(gone)}  # committed: the erasure itself is done
        [warned] = [r.getMessage() for r in caplog.records if "rows are forgotten, but" in r.getMessage()]
        assert "the same command is run again" in warned
        assert [s for uid in gone for s in held[uid] if s in file_bytes(path)] != []  # the control
        reader.close()
        again = await store.forget(gone, at="2026-02-01T00:00:01.000Z", by="f2")
        assert (again.count, again.already) == (0, len(gone))
        left = file_bytes(path)  # the ledger still open, as before
        assert [s for uid in gone for s in held[uid] if s in left] == []
    finally:
        reader.close()
        await store.close()


def as_schema_3(path: Path) -> None:
    """Turn a ledger into one as the previous version left it: schema 3, no table of tombstones."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("DROP TABLE forgotten")
        conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema'")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


async def test_a_schema_3_sqlite_ledger_gains_tombstones_in_place(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    store = await SqliteStore.open(path, BINDING, writable=True)
    try:
        await enrol_twice(store, "u1")
        await enrol_twice(store, "u2")
    finally:
        await store.close()
    as_schema_3(path)
    with pytest.raises(Exception, match="schema '3'"):
        await SqliteStore.open(path, BINDING, writable=False)  # a reader never migrates
    store = await SqliteStore.open(path, BINDING, writable=True)
    try:
        assert {r.user_id: r.state for r in (await store.lookup(["u1", "u2"])).values()} == {
            "u1": State.ENROLLED,
            "u2": State.ENROLLED,
        }
        assert (await store.forget(["u1"], at="2026-02-01T00:00:00.000Z", by="f1")).count == 1
        refused = await store.begin_attempt(attempt("u1", "2026-02-02T00:00:00.000Z"))
        assert isinstance(refused, Refused) and refused.why is Refusal.FORGOTTEN
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == (SQLITE_SCHEMA,)
    finally:
        conn.close()


async def test_a_schema_3_postgres_ledger_is_refused_by_a_reader_and_gains_tombstones_when_written(
    tmp_path: Path, pg_url: str
) -> None:
    (tmp_path / "url").write_text(pg_url)
    store = await open_store("postgres", tmp_path)
    try:
        await enrol_twice(store, "u1")
    finally:
        await store.close()
    import psycopg

    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        # Schema 3 as it was: no tombstones' table, and none of the columns --normalize added in the same step.
        await conn.execute("DROP TABLE backfill.forgotten")
        await conn.execute("ALTER TABLE backfill.users DROP COLUMN sent_sha256, DROP COLUMN transform")
        await conn.execute("UPDATE backfill.meta SET value = '3' WHERE key = 'schema'")
    from backfill.ledger.postgres import PostgresStore

    with pytest.raises(LedgerError, match=r"schema 3.*open it once with a writing command"):
        await PostgresStore.open(pg_url, None, writable=False)
    store = await open_store("postgres", tmp_path)
    try:
        assert (await store.forget(["u1"], at="2026-02-01T00:00:00.000Z", by="f1")).count == 1
        refused = await store.begin_attempt(attempt("u1", "2026-02-02T00:00:00.000Z"))
        assert isinstance(refused, Refused) and refused.why is Refusal.FORGOTTEN
    finally:
        await store.close()
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        cur = await conn.execute("SELECT value FROM backfill.meta WHERE key = 'schema'")
        assert await cur.fetchone() == (PG_SCHEMA,)


# --- the commands, end to end ---


def results(out: Path) -> dict[str, str]:
    (run,) = sorted(p for p in out.iterdir() if p.is_dir())[-1:]
    with (run / "results.csv").open() as handle:
        return {r["user_id"]: r["status"] for r in csv.DictReader(handle)}


def test_forget_then_a_rerun_sends_nothing_for_the_forgotten_and_says_so(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(3))
    where = sandbox_ledger(tmp_path, threaded_sandbox)
    out = ["--out", str(tmp_path / "out"), "--no-progress"]
    assert cli("run", str(manifest), *where, *out)[0] == 0
    ids = tmp_path / "erase.txt"
    ids.write_text("user_0001\n\nuser_0002\nnobody\n")

    # No one at a terminal and no --yes: refused, nothing forgotten (it can't be undone).
    code, _, err = cli("forget", "--from", str(ids), *where)
    assert code == 2 and "--yes" in err
    code, out_text, _ = cli("forget", "--from", str(ids), "--dry-run", *where)
    assert code == 0 and "would forget 2 rows (2 enrolled); 1 never in the ledger" in out_text
    code, out_text, err = cli(
        "forget", "--from", str(ids), "--yes", *where, env={"BACKFILL_OPERATOR": "dpo@bank"}
    )
    assert code == 0, err
    assert "forgot 2 rows (2 enrolled); 1 never in the ledger" in out_text

    sent_before = dict(threaded_sandbox.state.requests)
    code, said, err = cli("run", str(manifest), *where, *out)
    assert code == 0, err  # a forgotten row ends well, as a skipped one does
    assert "new: 0, skipped (already done): 1, forgotten on request (not sent): 2, rejected: 0" in said
    assert results(tmp_path / "out") == {
        "user_0000": "skipped",
        "user_0001": "forgotten",
        "user_0002": "forgotten",
    }
    assert dict(threaded_sandbox.state.requests) == sent_before  # nothing sent

    code, exported, _ = cli("export", *where)
    assert (
        code == 0 and "user_0000" in exported and "user_0001" not in exported and "user_0002" not in exported
    )
    code, status, _ = cli("status", *where)
    assert "forgotten on request: 2" in status
    assert "dpo@bank" in status and "backfill forget (3 user_ids named)" in status
    assert "user_0001" not in status
    report = tmp_path / "ledger-report.html"
    code, _, err = cli("report", *where, "--output", str(report))
    assert code == 0, err
    page = report.read_text()
    assert "Forgotten on request" in page and "backfill forget (3 user_ids named)" in page
    assert "user_0001" not in page and "user_0002" not in page
    code, found, _ = cli("find-user", "user_0001", "user_0000", *where)
    forgotten_line, kept_line = found.splitlines()
    assert forgotten_line.split("\t")[1:] == ["user_0001", forgotten_line.split("\t")[2]]
    assert "forgotten 20" in forgotten_line and "(was enrolled; run " in forgotten_line
    assert kept_line.count("\t") == 1
    conn = sqlite3.connect(tmp_path / "cp.sqlite")
    try:
        keys = {k for (k,) in conn.execute("SELECT user_key FROM forgotten")}
        (note,) = conn.execute("SELECT note FROM runs WHERE manifest LIKE 'backfill forget%'").fetchone()
    finally:
        conn.close()
    assert found.split()[0] in keys and "user_0001" not in note


def test_purge_forgets_what_finished_before_the_date(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    where = enrolled(tmp_path, threaded_sandbox, 2)
    code, _, err = cli(
        "purge", "--before", "2020-01-01", "--dry-run", *where, env={"BACKFILL_LOG_FORMAT": "json"}
    )
    (line,) = [json.loads(x) for x in err.splitlines() if '"event": "forgotten"' in x]
    assert code == 0 and (line["dry_run"], line["forgotten"], line["refused"], line["exit_code"]) == (
        True,
        {},
        0,
        0,
    )
    code, said, _ = cli("purge", "--before", "2020-01-01", "--yes", *where)
    assert (
        code == 0 and "forgot 0 rows" in said and "audit trail: run" in said
    )  # recorded, though it found none
    code, _, err = cli("purge", "--before", "2999-01-01", "--yes", *where)
    assert code == 2 and "in the future" in err
    code, _, err = cli("purge", "--before", "yesterday", "--yes", *where)
    assert code == 2 and "YYYY-MM-DD" in err
    # Rows finished today are finished before tomorrow.
    day = (datetime.datetime.now(datetime.UTC).date() + datetime.timedelta(days=1)).isoformat()
    code, said, err = cli("purge", "--before", day, "--yes", *where)
    assert code == 0 and "forgot 2 rows (2 enrolled)" in said, err
    code, status, _ = cli("status", *where)
    assert "forgotten on request: 2" in status and f"backfill purge --before {day}" in status


def table_files(cluster: PgCluster, pg_url: str) -> bytes:
    """The bytes of the files that hold the ledger's users and queue now (after a checkpoint wrote them)."""
    database = pg_url.rsplit("/", 1)[1]
    cluster.sql("CHECKPOINT")
    found = b""
    for table in ("backfill.users", "backfill.queue"):
        relative = cluster.sql(f"SELECT pg_relation_filepath('{table}')", dbname=database).strip()
        found += b"".join(
            p.read_bytes() for p in (cluster.data / relative).parent.glob(Path(relative).name + "*")
        )
    return found


async def test_forget_on_a_fleets_ledger_clears_the_queue_and_a_later_pass_says_forgotten(
    tmp_path: Path,
    make_settings: Callable[..., Settings],
    sandbox: RunningSandbox,
    pg_cluster: PgCluster,
    pg_url: str,
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(3))
    settings = make_settings(sandbox, ledger=pg_url)
    first = await compose.run(settings, manifest)
    assert first.counts == {"enrolled": 3}
    photo = b"user_0001.png"  # in her row's image reference, and in the queue's copy of her manifest line
    assert photo in table_files(pg_cluster, pg_url)  # the control

    # A live process of a fleet (its heartbeat fresh, not finished): nothing is forgotten meanwhile.
    import psycopg

    from backfill.ledger.postgres import PostgresStore

    other = await PostgresStore.open(pg_url, compose.binding(settings), writable=True)
    try:
        await other.start_run(RunRecord(run_id="live", started_at="2026-01-01T00:00:00.000Z", manifest="m"))
        with pytest.raises(LedgerError, match="1 process"):
            await asyncio.to_thread(compose.forget, settings, ["user_0001"])
        # Alive still between two beats of a fleet run with --lease 120 (one every 40 s), though the erasure's
        # own lease is the default 30 s: a beat 45 s old is not taken for a dead process.
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
            await conn.execute(
                "UPDATE backfill.runs SET heartbeat_at = now() - interval '45 seconds' WHERE run_id = 'live'"
            )
        with pytest.raises(LedgerError, match="1 process"):
            await asyncio.to_thread(compose.forget, settings, ["user_0001"])
        await other.finish_run("live", finished_at="2026-01-01T00:00:01.000Z", rows=0, exit_code=0)
    finally:
        await other.close()

    erased = await asyncio.to_thread(compose.forget, settings, ["user_0001"])
    assert erased.done.forgotten == {"enrolled": 1} and erased.run_id is not None

    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT user_created_at, image FROM backfill.queue WHERE user_id = 'user_0001'"
        )
        assert await cur.fetchall() == [("", "")]  # the line kept, the user's data not
        cur = await conn.execute("SELECT count(*) FROM backfill.users WHERE user_id = 'user_0001'")
        assert await cur.fetchone() == (0,)
        cur = await conn.execute(
            "SELECT manifest, rows, operator, note FROM backfill.runs WHERE run_id = %s", (erased.run_id,)
        )
        record = await cur.fetchone()
    assert record is not None and record[:2] == ("backfill forget (1 user_id named)", 1) and record[2]
    # Rewritten (VACUUM FULL): not a byte of her photo's path left in either table's files, old versions included.
    assert photo not in table_files(pg_cluster, pg_url)
    assert "user_0001" not in str(record)

    sent = dict(sandbox.state.requests)
    again = await compose.run(settings, manifest)  # the same manifest: a new pass of its queue
    assert again.counts == {"skipped": 2, "forgotten": 1} and again.exit_code == 0
    assert dict(sandbox.state.requests) == sent


@pytest.mark.parametrize("said", ["n", "y"])
def test_forget_at_a_terminal_names_the_count_and_the_ledger_and_asks_once(
    tmp_path: Path, threaded_sandbox: RunningSandbox, said: str
) -> None:
    from .test_check_and_confirm import Terminal

    where = enrolled(tmp_path, threaded_sandbox, 3)
    terminal = Terminal(["forget", "user_0001", "user_0002", *where], tmp_path)
    shown = terminal.read_until("Forget them? [y/N]")
    assert "About to forget 2 rows (2 enrolled) for good" in shown, shown
    assert f"ledger:  {tmp_path / 'cp.sqlite'}" in shown, shown
    terminal.answer(said)
    code, out = terminal.finish()
    assert out.count("Forget them?") == 1 and "Traceback" not in out, out
    conn = sqlite3.connect(tmp_path / "cp.sqlite")
    try:
        users = {uid for (uid,) in conn.execute("SELECT user_id FROM users")}
        erasures = conn.execute(
            "SELECT count(*) FROM runs WHERE manifest LIKE 'backfill forget%'"
        ).fetchone()[0]
    finally:
        conn.close()
    if said == "y":
        assert code == 0 and "forgot 2 rows" in out, out
        assert users == {"user_0000"} and erasures == 1
    else:
        assert code == 1 and "nothing forgotten" in out, out
        assert users == {"user_0000", "user_0001", "user_0002"} and erasures == 0


def test_a_file_of_ids_saved_with_a_bom_forgets_its_first_id_too(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    # Excel's and Notepad's "UTF-8 with BOM": read as plain UTF-8 the first ID was "\ufeffuser_0000", which no
    # ledger holds, so the erasure said it was done and the user's data stayed.
    where = enrolled(tmp_path, threaded_sandbox, 2)
    ids = tmp_path / "erase.txt"
    ids.write_bytes(b"\xef\xbb\xbfuser_0000\r\nuser_0001\r\n")
    code, said, err = cli("forget", "--from", str(ids), "--yes", *where)
    assert code == 0, err
    assert "forgot 2 rows (2 enrolled)" in said and "never in the ledger" not in said + err
    assert cli("export", *where)[1].count("user_000") == 0


def test_a_line_that_is_no_user_id_forgets_nothing_and_is_named(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    # A manifest given where a list of IDs was meant: its lines match no ID, so an erasure "done" would be false.
    where = enrolled(tmp_path, threaded_sandbox, 2)
    manifest = tmp_path / "manifest.csv"
    code, _, err = cli("forget", "--from", str(manifest), "--yes", *where)
    assert code == 2, err
    assert f"line 1 of {manifest}" in err and "'user_id,user_created_at,image_path' is not a user_id" in err
    assert "Traceback" not in err
    code, exported, _ = cli("export", *where)
    assert "user_0000" in exported and "user_0001" in exported  # nothing was forgotten


def test_ids_the_ledger_never_held_are_named_to_whoever_named_them(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    where = enrolled(tmp_path, threaded_sandbox, 1)
    code, _, err = cli("forget", "user_0000", "user_O000", "--dry-run", "--log-format", "json", *where)
    [line] = map(json.loads, err.splitlines())  # the flag, as every command that writes lines takes it
    assert (line["event"], line["never_held"], line["dry_run"], code) == ("forgotten", 1, True, 0)
    code, said, err = cli("forget", "user_0000", "user_O000", "--yes", *where)  # a letter O for a zero
    assert code == 0, err
    assert "forgot 1 row (1 enrolled); 1 never in the ledger" in said
    assert "never in the ledger (nothing to forget): user_O000." in err
    [line] = [line for line in cli("status", *where)[1].splitlines() if "backfill forget" in line]
    assert "user_O000" not in line  # the audit trail keeps counts, never the IDs


def test_check_counts_forgotten_ids_and_reads_none_of_their_photos(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    where = enrolled(tmp_path, threaded_sandbox, 3)
    manifest = tmp_path / "manifest.csv"
    assert cli("forget", "user_0001", "user_0002", "--yes", *where)[0] == 0
    # Their photos blanked, as an archive's may be after an erasure: check must not read them, nor call them
    # unusable (a run never reads them).
    for uid in ("user_0001", "user_0002"):
        (tmp_path / "images" / f"{uid}.png").write_bytes(b"erased")
    code, out, err = cli("check", str(manifest), *where)
    assert code == 0, out + err
    [held] = [line for line in out.splitlines() if "ledger holds:" in line]
    assert "of this manifest's 3 IDs: 1 enrolled, 2 forgotten on request; 0 not in the ledger" in held
    assert not [line for line in out.splitlines() if line.startswith("problem")], out


async def test_a_write_to_a_fleets_users_waits_for_the_erasure_and_then_sees_its_tombstones(
    tmp_path: Path, make_settings: Callable[..., Settings], sandbox: RunningSandbox, pg_url: str
) -> None:
    # A process the liveness check takes for dead (its beats stalled) may still make a first attempt: PostgreSQL
    # would evaluate its "no tombstone" test on a snapshot from before the erasure's commit, and insert the ID
    # anew once the deleted row is gone. So the erasure holds every write to users until it commits, and a
    # write's snapshot is taken once it has its lock. Seen here from the other side: an open write holds the
    # erasure back (the lock the erasure waits for is in pg_locks), and the erasure goes on once it commits.
    import psycopg

    from backfill.ledger.postgres import PostgresStore

    manifest = write_manifest(tmp_path, simple_rows(2))
    settings = make_settings(sandbox, ledger=pg_url)
    assert (await compose.run(settings, manifest)).counts == {"enrolled": 2}
    store = await PostgresStore.open(pg_url, compose.binding(settings), writable=True)
    try:
        async with await psycopg.AsyncConnection.connect(pg_url) as writer:
            await writer.execute("UPDATE backfill.users SET attempts = attempts WHERE user_id = 'user_0000'")
            erasing = asyncio.create_task(store.forget(["user_0001"], at="2026-02-01T00:00:00.000Z", by="f1"))
            async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as watch:
                waiting = 0
                for _ in range(600):  # the event: the erasure's lock on users, asked for and not granted
                    cur = await watch.execute(
                        "SELECT count(*) FROM pg_locks WHERE relation = 'backfill.users'::regclass "
                        "AND NOT granted AND mode = 'ShareRowExclusiveLock'"
                    )
                    (waiting,) = await cur.fetchone() or (0,)
                    if waiting or erasing.done():
                        break
                    await asyncio.sleep(0.05)
                assert waiting == 1 and not erasing.done()
            await writer.commit()
        erased = await erasing
        assert erased.forgotten == {"enrolled": 1}
    finally:
        await store.close()

"""The Store contract, checked the same way against every backend: a stateful model test and targeted cases."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from backfill.errors import LedgerError, LedgerLocked
from backfill.images import Fingerprint
from backfill.ledger import (
    AttemptRequest,
    Binding,
    DoneRow,
    Outcome,
    Refusal,
    Refused,
    RunRecord,
    Settled,
    Store,
    Ticket,
)
from backfill.ledger.memory import MemoryStore
from backfill.ledger.sqlite import SqliteStore, acquire_lock
from backfill.vocab import FINISHED_STATES, TERMINAL_STATES, State

T = TypeVar("T")
BINDING = Binding(partner_id="085", endpoint="https://testapi.smileidentity.com:443")
BACKENDS = ("memory", "sqlite", "postgres")


async def open_store(kind: str, folder: Path, binding: Binding = BINDING) -> Store:
    """A store of `kind` whose data lives in `folder` (for PostgreSQL: a database named in folder/url)."""
    if kind == "memory":
        return MemoryStore(binding)
    if kind == "postgres":
        from backfill.ledger.postgres import PostgresStore

        from .pg_server import fresh_database, shared_cluster

        named = folder / "url"
        if not named.exists():
            if shared_cluster() is None:
                pytest.skip("no PostgreSQL binaries on this machine")
            named.write_text(fresh_database())
        return await PostgresStore.open(named.read_text(), binding, writable=True)
    return await SqliteStore.open(folder / "ledger.sqlite", binding, writable=True)


def request(user_id: str, photo: str = "a", *, run: str = "r1", sample: int | None = None) -> AttemptRequest:
    """An attempt with photo `photo` (a letter): its pin is the letter 64 times, its sample the letter's code
    unless `sample` says otherwise (0: a photo whose read took no sample)."""
    fp = Fingerprint(
        ref=f"/img/{user_id}.jpg", size=10, version="1", sample=ord(photo) if sample is None else sample
    )
    return AttemptRequest(
        user_id=user_id,
        photo_sha256=photo * 64,
        fingerprint=fp,
        user_created_at="2021-01-01",
        run_id=run,
        at="2026-01-01T00:00:00.000Z",
    )


def outcome(
    user_id: str,
    attempt: int,
    state: State,
    *,
    may: bool = False,
    proves: bool = False,
    at: str = "2026-01-01T00:00:01.000Z",
) -> Outcome:
    return Outcome(
        user_id=user_id,
        attempt=attempt,
        state=state,
        may_have_enrolled=may,
        proves_not_enrolled=proves,
        http_status=200,
        result_code="0840" if state is State.ENROLLED else "x",
        result_text="t",
        smile_job_id="1",
        job_id="j",
        at=at,
    )


# --- the model: what the contract promises, written independently of ledger/transitions.py ---


@dataclass
class ModelRow:
    state: State
    attempts: int
    doubt: bool  # from settled attempts
    pin: str | None

    @property
    def in_doubt(self) -> bool:
        return self.doubt or self.state is State.SENDING


class LedgerMachine(RuleBasedStateMachine):
    kind = "memory"
    ids = ("u1", "u2", "u3")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.folder = Path(tempfile.mkdtemp(prefix="ledger-contract-"))
        self.store = self.run(open_store(self.kind, self.folder))
        self.model: dict[str, ModelRow] = {}
        self.forgotten: set[str] = set()  # IDs forgotten: no row, and never begun again

    def run(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coro)  # type: ignore[arg-type]

    def teardown(self) -> None:
        self.run(self.store.close())
        self.loop.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    @rule(uid=st.sampled_from(ids), photo=st.sampled_from("ab"))
    def begin(self, uid: str, photo: str) -> None:
        result = self.run(self.store.begin_attempt(request(uid, photo)))
        row = self.model.get(uid)
        if uid in self.forgotten:
            assert isinstance(result, Refused) and result.why is Refusal.FORGOTTEN
            return
        if row is not None and row.state in TERMINAL_STATES:
            assert isinstance(result, Refused) and result.why is Refusal.TERMINAL
            return
        if row is not None and row.pin is not None and row.pin != photo * 64:
            assert isinstance(result, Refused) and result.why is Refusal.PHOTO_PINNED
            return
        assert isinstance(result, Ticket)
        expected_doubt = row.in_doubt if row is not None else False
        assert result.doubt_before == expected_doubt
        assert result.number == (row.attempts + 1 if row else 1)
        self.model[uid] = ModelRow(State.SENDING, result.number, expected_doubt, photo * 64)

    @rule(
        uid=st.sampled_from(ids),
        offset=st.sampled_from([0, 0, 0, -1, 1]),
        state=st.sampled_from(sorted(set(State) - {State.SENDING})),
        may=st.booleans(),
        proves=st.booleans(),
    )
    def settle(self, uid: str, offset: int, state: State, may: bool, proves: bool) -> None:
        row = self.model.get(uid)
        attempt = (row.attempts if row else 1) + offset
        result = self.run(self.store.settle(outcome(uid, attempt, state, may=may, proves=proves)))
        allowed = (
            row is not None
            and row.state is State.SENDING
            and attempt == row.attempts
            and not (state is State.ALREADY_ENROLLED and not row.doubt)
            and not (state is State.ID_CONFLICT and row.doubt)
        )
        if result is Settled.QUEUED:
            self.run(self.store.flush())
        else:
            assert (result is Settled.APPLIED) == allowed
        if not allowed or row is None:
            return
        if proves and state is State.FAILED:
            row.doubt, row.pin = False, None
        else:
            row.doubt = row.doubt or may
        row.state = state

    @rule(uid=st.sampled_from(ids))
    def forget(self, uid: str) -> None:
        """An erasure request: every state but SENDING leaves a tombstone; SENDING is kept whole."""
        self.run(self.store.flush())
        done = self.run(self.store.forget([uid], at="2026-01-02T00:00:00.000Z", by="f1"))
        row = self.model.get(uid)
        if row is None:
            assert (done.count, done.refused) == (0, ())
            assert (done.already, done.unknown) == ((1, 0) if uid in self.forgotten else (0, 1))
        elif row.state is State.SENDING:
            assert (done.count, done.refused) == (0, (uid,))
        else:
            assert done.forgotten == {row.state.value: 1}
            del self.model[uid]
            self.forgotten.add(uid)

    @rule(before=st.sampled_from(["2026-01-01", "2026-01-02"]))
    def purge(self, before: str) -> None:
        """Every row finished (FINISHED_STATES) before the date: every settle here finishes at 2026-01-01T00:00:01."""
        self.run(self.store.flush())
        done = self.run(self.store.purge(before, at="2026-01-03T00:00:00.000Z", by="p1"))
        gone = [
            uid for uid, row in self.model.items() if row.state in FINISHED_STATES and before > "2026-01-01T"
        ]
        expected: dict[str, int] = {}
        for uid in gone:
            expected[self.model[uid].state.value] = expected.get(self.model[uid].state.value, 0) + 1
            del self.model[uid]
            self.forgotten.add(uid)
        assert (done.forgotten, done.refused) == (dict(sorted(expected.items())), ())

    @precondition(lambda self: self.kind in ("sqlite", "postgres"))
    @rule()
    def reopen(self) -> None:
        """Close and open again: everything written is still there, and nothing else."""
        self.run(self.store.close())
        self.store = self.run(open_store(self.kind, self.folder))

    @invariant()
    def ledger_matches_model(self) -> None:
        self.run(self.store.flush())
        rows = self.run(self.store.lookup(list(self.ids)))
        assert set(rows) == set(self.model)
        assert set(self.run(self.store.forgotten(list(self.ids)))) == self.forgotten
        # Store.holders: exactly the IDs whose pin stands, by their photo's size and sample.
        held = self.run(self.store.holders([(10, ord("a")), (10, ord("b"))]))
        assert sorted(held) == sorted(
            (uid, 10, ord(m.pin[0]), m.pin) for uid, m in self.model.items() if m.pin is not None
        )
        for uid, expected in self.model.items():
            got = rows[uid]
            assert (got.state, got.attempts, got.in_doubt, got.photo_sha256) == (
                expected.state,
                expected.attempts,
                expected.in_doubt,
                expected.pin,
            ), uid


class MemoryLedger(LedgerMachine):
    kind = "memory"


class SqliteLedger(LedgerMachine):
    kind = "sqlite"


class PostgresLedger(LedgerMachine):
    kind = "postgres"


_SETTINGS = settings(
    max_examples=60, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestMemoryLedger = _SETTINGS(MemoryLedger).TestCase
TestSqliteLedger = _SETTINGS(SqliteLedger).TestCase
# Fewer examples: each one makes a database of its own on the shared cluster.
TestPostgresLedger = settings(_SETTINGS, max_examples=25)(PostgresLedger).TestCase


# --- targeted cases, every backend ---


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    opened = await open_store(request.param, tmp_path)
    yield opened
    await opened.close()


async def test_a_late_outcome_never_overwrites_a_newer_attempt(store: Store) -> None:
    first = await store.begin_attempt(request("u1"))
    assert isinstance(first, Ticket)
    assert await store.settle(outcome("u1", 1, State.PENDING, may=True)) in (Settled.APPLIED, Settled.QUEUED)
    second = await store.begin_attempt(request("u1"))
    assert isinstance(second, Ticket) and second.number == 2 and second.doubt_before
    # The first attempt's answer arrives late (a lost lease, a duplicate): it is fenced.
    assert await store.settle(outcome("u1", 1, State.ENROLLED)) in (Settled.FENCED, Settled.QUEUED)
    await store.flush()
    assert (await store.lookup(["u1"]))["u1"].state is State.SENDING


async def test_enrolled_is_terminal(store: Store) -> None:
    assert isinstance(await store.begin_attempt(request("u1")), Ticket)
    await store.settle(outcome("u1", 1, State.ENROLLED))
    await store.flush()
    refused = await store.begin_attempt(request("u1"))
    assert isinstance(refused, Refused) and refused.why is Refusal.TERMINAL
    assert await store.settle(outcome("u1", 1, State.FAILED)) in (Settled.FENCED, Settled.QUEUED)
    await store.flush()
    assert (await store.lookup(["u1"]))["u1"].state is State.ENROLLED


async def test_the_photo_is_pinned_until_a_verified_not_enrolled(store: Store) -> None:
    assert isinstance(await store.begin_attempt(request("u1", "a")), Ticket)
    await store.settle(outcome("u1", 1, State.RETRY_EXHAUSTED, may=True))
    refused = await store.begin_attempt(request("u1", "b"))
    assert isinstance(refused, Refused) and refused.why is Refusal.PHOTO_PINNED
    # An unverified permanent failure keeps the pin; a verified "not enrolled" releases it.
    again = await store.begin_attempt(request("u1", "a"))
    assert isinstance(again, Ticket)
    assert await store.settle(outcome("u1", 2, State.FAILED)) is Settled.APPLIED
    assert isinstance(await store.begin_attempt(request("u1", "b")), Refused)
    third = await store.begin_attempt(request("u1", "a"))
    assert isinstance(third, Ticket)
    assert await store.settle(outcome("u1", 3, State.FAILED, proves=True)) is Settled.APPLIED
    fixed = await store.begin_attempt(request("u1", "b"))
    assert isinstance(fixed, Ticket) and not fixed.doubt_before


async def test_2209_is_ours_only_after_doubt(store: Store) -> None:
    assert isinstance(await store.begin_attempt(request("u1")), Ticket)
    # Never in doubt: ALREADY_ENROLLED is refused; ID_CONFLICT is what it is.
    assert await store.settle(outcome("u1", 1, State.ALREADY_ENROLLED)) in (Settled.FENCED, Settled.QUEUED)
    await store.flush()
    assert (await store.lookup(["u1"]))["u1"].state is State.SENDING
    assert await store.settle(outcome("u1", 1, State.ID_CONFLICT)) is Settled.APPLIED
    assert isinstance(await store.begin_attempt(request("u2")), Ticket)
    await store.settle(outcome("u2", 1, State.UNKNOWN, may=True))
    assert isinstance(await store.begin_attempt(request("u2")), Ticket)
    assert await store.settle(outcome("u2", 2, State.ID_CONFLICT)) is Settled.FENCED


async def test_done_is_the_done_rows_among_the_ids_asked_and_only_those(store: Store) -> None:
    """`done`, by which a resume settles a row without sending it: every ID asked that is enrolled (or
    already_enrolled), each with its own pin and results, whatever the order or repeats of the IDs asked; a row
    not done (failed, being sent) and an ID the ledger never saw are not in it."""
    for uid in ("u1", "u2", "u3", "u4", "u5"):
        assert isinstance(await store.begin_attempt(request(uid)), Ticket)
    await store.settle(outcome("u1", 1, State.ENROLLED))
    await store.settle(outcome("u2", 1, State.FAILED))
    await store.settle(outcome("u4", 1, State.UNKNOWN, may=True))
    assert isinstance(await store.begin_attempt(request("u4")), Ticket)
    await store.settle(outcome("u4", 2, State.ALREADY_ENROLLED))
    await store.settle(outcome("u5", 1, State.ENROLLED))
    await store.flush()
    found = await store.done(["u9", "u5", "u3", "u1", "u2", "u4", "u5"])
    known = await store.lookup(["u1", "u4", "u5"])
    assert found == {
        uid: DoneRow(
            state=k.state,
            image_ref=k.image_ref,
            image_size=k.image_size,
            image_version=k.image_version,
            result_code=k.result_code,
            smile_job_id=k.smile_job_id,
            job_id=k.job_id,
        )
        for uid, k in known.items()
    }
    assert found["u4"].state is State.ALREADY_ENROLLED and found["u5"].image_ref == "/img/u5.jpg"


async def test_holders_are_found_by_size_and_sample_alone(store: Store) -> None:
    """`holders` answers by (size, sample): another size or sample finds nothing, and an ID whose photo took no
    sample (0) holds nothing, since nothing was kept to find it by."""
    for uid, photo, sample in (("u1", "a", None), ("u2", "a", None), ("u3", "b", None), ("u4", "c", 0)):
        assert isinstance(await store.begin_attempt(request(uid, photo, sample=sample)), Ticket)
    await store.flush()
    assert sorted(await store.holders([(10, ord("a"))])) == [
        ("u1", 10, 97, "a" * 64),
        ("u2", 10, 97, "a" * 64),
    ]
    assert await store.holders([(11, ord("a")), (10, ord("z")), (10, 0)]) == []
    assert [h.user_id for h in await store.holders([(10, ord("b")), (10, ord("c"))])] == ["u3"]
    assert await store.holders([]) == []
    # A page at a time, in (size, sample, user_id) order, from the one after the last of the page before.
    first = await store.holders([(10, ord("a")), (10, ord("b"))], limit=2)
    assert [h.user_id for h in first] == ["u1", "u2"]
    rest = await store.holders([(10, ord("a")), (10, ord("b"))], after=first[-1], limit=2)
    assert [h.user_id for h in rest] == ["u3"]
    (row,) = (await store.lookup(["u4"])).values()
    assert row.photo_sample is None and row.photo_sha256 == "c" * 64


async def test_keep_samples_fills_only_rows_that_still_hold_that_pin_and_no_sample(store: Store) -> None:
    for uid, photo, sample in (("u1", "a", 0), ("u2", "b", 0), ("u3", "c", None)):
        assert isinstance(await store.begin_attempt(request(uid, photo, sample=sample)), Ticket)
    await store.flush()
    await store.keep_samples(
        [("u1", "a" * 64, 5), ("u2", "x" * 64, 6), ("u3", "c" * 64, 7), ("u9", "a" * 64, 8)]
    )
    await store.keep_samples([])
    rows = await store.lookup(["u1", "u2", "u3", "u9"])
    # u2's pin is another photo's, u3 has a sample already, u9 has no row: only u1 takes one.
    assert {uid: row.photo_sample for uid, row in rows.items()} == {"u1": 5, "u2": None, "u3": ord("c")}
    assert [h.user_id for h in await store.holders([(10, 5)])] == ["u1"]


async def test_runs_and_status(store: Store) -> None:
    await store.start_run(RunRecord(run_id="r1", started_at="2026-01-01T00:00:00Z", manifest="m.csv"))
    assert isinstance(await store.begin_attempt(request("u1")), Ticket)
    assert isinstance(await store.begin_attempt(request("u2")), Ticket)
    await store.settle(outcome("u1", 1, State.ENROLLED))
    await store.finish_run("r1", finished_at="2026-01-01T00:01:00Z", rows=2, exit_code=1)
    await store.flush()
    status = await store.status()
    assert status.counts == {"enrolled": 1, "sending": 1}
    assert status.waiting_for_retry == 1 and status.oldest_unfinished is not None
    assert status.oldest_unfinished.user_id == "u2"
    assert [(r.run_id, r.exit_code, r.rows) for r in status.runs] == [("r1", 1, 2)]
    assert [r.user_id async for r in store.rows([State.ENROLLED])] == ["u1"]
    assert [r.user_id async for r in store.rows()] == ["u1", "u2"]


# --- SQLite: one writer however named, binding, durability, migration ---


async def test_sqlite_lock_holds_through_any_name(tmp_path: Path) -> None:
    path = tmp_path / "data" / "ledger.sqlite"
    path.parent.mkdir()
    store = await SqliteStore.open(path, BINDING, writable=True)
    try:
        (tmp_path / "link.sqlite").symlink_to(path)
        (tmp_path / "other").mkdir()
        names = [
            tmp_path / "link.sqlite",
            tmp_path / "other" / ".." / "data" / "ledger.sqlite",
        ]
        for name in names:
            with pytest.raises(LedgerLocked, match="in use by pid"):
                await SqliteStore.open(name, BINDING, writable=True)
        cwd = os.getcwd()
        os.chdir(tmp_path / "other")
        try:
            with pytest.raises(LedgerLocked):
                await SqliteStore.open(Path("../data/ledger.sqlite"), BINDING, writable=True)
        finally:
            os.chdir(cwd)
    finally:
        await store.close()
    again = await SqliteStore.open(tmp_path / "link.sqlite", BINDING, writable=True)
    await again.close()
    # A hard link is refused outright: SQLite names the WAL after the path used, so the two names could see
    # two different ledgers after a crash.
    os.link(path, tmp_path / "hard.sqlite")
    for name in (tmp_path / "hard.sqlite", path):
        with pytest.raises(LedgerError, match="2 hard links"):
            await SqliteStore.open(name, BINDING, writable=True)
        with pytest.raises(LedgerError, match="2 hard links"):
            await SqliteStore.open(name, None, writable=False)


async def test_sqlite_binding_refuses_another_partner_or_endpoint(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    await (await SqliteStore.open(path, BINDING, writable=True)).close()
    for other in (
        Binding(partner_id="85", endpoint=BINDING.endpoint),
        Binding(partner_id="085", endpoint="http://127.0.0.1:8080"),
    ):
        with pytest.raises(LedgerError, match="belongs to partner '085' on https://testapi"):
            await SqliteStore.open(path, other, writable=True)
    reader = await SqliteStore.open(path, None, writable=False)
    assert reader.binding == BINDING
    await reader.close()


async def test_sqlite_writes_are_on_disk_when_they_return(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    store = await SqliteStore.open(path, BINDING, writable=True)
    assert isinstance(await store.begin_attempt(request("u1")), Ticket)
    # A second, independent connection sees it: committed, not just queued.
    seen = sqlite3.connect(path).execute("SELECT state, attempts FROM users").fetchall()
    assert seen == [("sending", 1)]
    assert await store.settle(outcome("u1", 1, State.PENDING)) is Settled.APPLIED  # lowers doubt: durable
    assert sqlite3.connect(path).execute("SELECT state FROM users").fetchall() == [("pending",)]
    await store.close()
    assert (path.stat().st_mode & 0o777) == 0o600


_CHILD = """
import asyncio, os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_ledger_contract import BINDING, outcome, request
from backfill.ledger.sqlite import SqliteStore
from backfill.vocab import State

async def main() -> None:
    store = await SqliteStore.open(Path({path!r}), BINDING, writable=True)
    await store.begin_attempt(request("lost"))
    await store.begin_attempt(request("refused"))
    await store.settle(outcome("lost", 1, State.ENROLLED))  # queued, then killed before any flush
    await store.settle(outcome("refused", 1, State.PENDING))  # durable before it returns
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


def test_sqlite_sigkill_keeps_every_attempt_and_every_doubt_lowering_outcome(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    code = textwrap.dedent(_CHILD.format(tests=str(Path(__file__).parent), path=str(path)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()

    async def check() -> None:
        store = await SqliteStore.open(path, BINDING, writable=True)
        rows = await store.lookup(["lost", "refused"])
        await store.close()
        assert rows["lost"].state in (State.SENDING, State.ENROLLED) and rows["lost"].attempts == 1
        assert rows["lost"].in_doubt or rows["lost"].state is State.ENROLLED
        assert rows["refused"].state is State.PENDING and not rows["refused"].in_doubt

    asyncio.run(check())


_V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE users (user_id TEXT PRIMARY KEY, state TEXT NOT NULL, in_doubt INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0, http_status INTEGER, result_code TEXT, result_text TEXT,
    smile_job_id TEXT, job_id TEXT, photo_sha256 TEXT, image_path TEXT, image_size INTEGER,
    image_mtime_ns INTEGER, user_created_at TEXT, first_attempt_at TEXT, last_attempt_at TEXT,
    finished_at TEXT, run_id TEXT) WITHOUT ROWID;
CREATE INDEX users_state ON users(state);
CREATE TABLE runs (run_id TEXT PRIMARY KEY, started_at TEXT NOT NULL, finished_at TEXT, manifest TEXT,
    rows INTEGER, exit_code INTEGER, pid INTEGER, host TEXT);
INSERT INTO meta VALUES ('schema', '1'), ('partner_id', '085'), ('env', 'sandbox'), ('created_at', 't');
INSERT INTO users VALUES ('u1', 'enrolled', 0, 1, 200, '0840', 'Enroll User', '7', 'j', 'ab', '/i/u1.jpg', 10,
    123, '2021-01-01', 't', 't', 't', 'r');
INSERT INTO users VALUES ('u2', 'sending', 1, 2, NULL, NULL, NULL, NULL, NULL, 'cd', '/i/u2.jpg', 11, 124,
    '2021-01-01', 't', 't', NULL, 'r');
"""


async def test_sqlite_migrates_a_schema_1_ledger(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(_V1_SCHEMA)
    conn.close()
    legacy = {"sandbox": BINDING.endpoint}
    store = await SqliteStore.open(path, BINDING, writable=True, legacy_endpoints=legacy)
    rows = await store.lookup(["u1", "u2"])
    await store.close()
    assert rows["u1"].state is State.ENROLLED and rows["u1"].fingerprint == Fingerprint(
        ref="/i/u1.jpg", size=10, version="123"
    )
    assert rows["u2"].in_doubt and rows["u2"].attempts == 2
    assert rows["u2"].photo_sha256 == store.photo_key.pin("cd")  # keyed, in the same step (schema 3)


async def test_sqlite_reader_never_creates_or_writes(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="no ledger at"):
        await SqliteStore.open(tmp_path / "none.sqlite", None, writable=False)
    assert not (tmp_path / "none.sqlite").exists()
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(LedgerError, match="is it a backfill ledger"):
        await SqliteStore.open(junk, None, writable=False)


def test_acquire_lock_names_the_holder(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    fd = acquire_lock(path)
    try:
        with pytest.raises(LedgerLocked, match=f"pid {os.getpid()}"):
            acquire_lock(path)
    finally:
        os.close(fd)
    os.close(acquire_lock(path))


async def test_sqlite_creates_the_ledgers_folder_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "data" / "backfill" / "ledgers" / "085@host_443.sqlite"
    store = await SqliteStore.open(path, BINDING, writable=True)
    await store.close()
    for folder in (tmp_path / "data", tmp_path / "data" / "backfill", path.parent):
        assert folder.stat().st_mode & 0o777 == 0o700, folder


# --- forgetting a user (an erasure request), every backend ---

FORGET_AT = "2026-02-01T00:00:00.000Z"


async def finished(store: Store, uid: str, state: State, *, at: str = "2026-01-01T00:00:01.000Z") -> None:
    assert isinstance(await store.begin_attempt(request(uid)), Ticket)
    await store.settle(outcome(uid, 1, state, may=state is State.UNKNOWN, at=at))
    await store.flush()


async def test_a_forgotten_user_leaves_a_keyed_tombstone_and_is_never_begun_again(store: Store) -> None:
    await finished(store, "u1", State.ENROLLED)
    await finished(store, "u2", State.UNKNOWN)
    done = await store.forget(["u1", "u2", "u9"], at=FORGET_AT, by="f1")
    assert (done.forgotten, done.refused, done.already, done.unknown) == (
        {"enrolled": 1, "unknown": 1},
        (),
        0,
        1,
    )
    assert await store.lookup(["u1", "u2"]) == {}
    assert [r async for r in store.rows()] == []
    stones = await store.forgotten(["u1", "u2", "u9"])
    assert set(stones) == {"u1", "u2"}
    one = stones["u1"]
    assert (one.user_key, one.state, one.doubt, one.forgotten_at, one.forgotten_by) == (
        store.photo_key.user("u1"),  # what `backfill find-user u1` prints
        State.ENROLLED,
        False,
        FORGET_AT,
        "f1",
    )
    assert stones["u2"].doubt and stones["u2"].first_attempt_at == "2026-01-01T00:00:00.000Z"
    for uid in ("u1", "u2"):
        refused = await store.begin_attempt(request(uid))
        assert isinstance(refused, Refused) and refused.why is Refusal.FORGOTTEN
        assert refused.row.user_created_at is None and refused.row.image_ref is None
    again = await store.forget(["u1"], at=FORGET_AT, by="f2")
    assert (again.count, again.already) == (0, 1)
    status = await store.status()
    assert status.counts == {} and status.forgotten == 2


async def test_a_row_being_sent_is_not_forgotten(store: Store) -> None:
    assert isinstance(await store.begin_attempt(request("u1")), Ticket)
    done = await store.forget(["u1"], at=FORGET_AT, by="f1")
    assert (done.count, done.refused) == (0, ("u1",))
    assert (await store.lookup(["u1"]))["u1"].state is State.SENDING  # kept whole: its outcome still comes
    assert await store.settle(outcome("u1", 1, State.ENROLLED)) in (Settled.APPLIED, Settled.QUEUED)


async def test_purge_forgets_only_rows_finished_before_the_date(store: Store) -> None:
    await finished(store, "old_ok", State.ENROLLED, at="2026-01-01T00:00:01.000Z")
    await finished(store, "old_failed", State.FAILED, at="2026-01-02T00:00:01.000Z")
    await finished(store, "old_unknown", State.UNKNOWN, at="2026-01-01T00:00:01.000Z")  # open: not finished
    await finished(store, "new_ok", State.ENROLLED, at="2026-03-01T00:00:01.000Z")
    dry = await store.purge("2026-02-01", at=FORGET_AT, by="", dry_run=True)
    assert dry.forgotten == {"enrolled": 1, "failed": 1}
    assert len(await store.lookup(["old_ok", "old_failed"])) == 2  # a dry run changes nothing
    done = await store.purge("2026-02-01", at=FORGET_AT, by="p1")
    assert done.forgotten == {"enrolled": 1, "failed": 1}
    assert set(await store.lookup(["old_ok", "old_failed", "old_unknown", "new_ok"])) == {
        "old_unknown",
        "new_ok",
    }
    assert set(await store.forgotten(["old_ok", "old_failed", "old_unknown", "new_ok"])) == {
        "old_ok",
        "old_failed",
    }

"""The SQLite ledger's writer: a group commit is its writes applied one by one, and a failed one fails its callers."""

from __future__ import annotations

import asyncio
import gc
import logging
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backfill.errors import LedgerError
from backfill.images import Fingerprint
from backfill.ledger import AttemptRequest, Binding, Outcome, Refused, Settled, Store, Ticket
from backfill.ledger import sqlite as sqlite_ledger
from backfill.ledger.memory import MemoryStore
from backfill.ledger.sqlite import SqliteStore
from backfill.vocab import State

from .test_ledger_contract import BINDING, outcome, request

IDS = ("u1", "u2", "u3")


async def _groups(store: SqliteStore) -> list[str]:
    """Every statement the store's connection runs from now on, in order: each group opens with BEGIN IMMEDIATE."""
    seen: list[str] = []
    await store._call(store._conn.set_trace_callback, seen.append)
    return seen


def _commits(statements: Sequence[str]) -> int:
    return sum(s == "BEGIN IMMEDIATE" for s in statements)


# --- a group is its writes, one by one, in the order they were made ---

# A write: ("begin", id, photo) or ("settle", id, attempt, state, may_have_enrolled, proves_not_enrolled).
_begin = st.tuples(st.just("begin"), st.sampled_from(IDS), st.sampled_from("ab"))
_settle = st.tuples(
    st.just("settle"),
    st.sampled_from(IDS),
    st.integers(min_value=1, max_value=3),
    st.sampled_from(sorted(set(State) - {State.SENDING})),
    st.booleans(),
    st.booleans(),
)
_bursts = st.lists(st.lists(st.one_of(_begin, _settle), min_size=1, max_size=8), min_size=1, max_size=6)


def _call(store: Store, write: tuple[Any, ...]) -> Any:
    if write[0] == "begin":
        return store.begin_attempt(request(write[1], write[2]))
    _, uid, attempt, state, may, proves = write
    return store.settle(outcome(uid, attempt, state, may=may, proves=proves))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bursts=_bursts)
def test_a_group_commit_is_its_writes_applied_one_by_one_in_order(
    bursts: list[list[tuple[Any, ...]]],
) -> None:
    """Each burst is made in one turn of the loop, so it is one group (one transaction): fenced writes, refusals,
    a queued outcome and the next attempt of the same ID side by side. Every result, and every row after it, is
    what the reference store gives for the same writes made one at a time."""

    async def check(folder: Path) -> None:
        store = await SqliteStore.open(folder / "ledger.sqlite", BINDING, writable=True)
        reference = MemoryStore(BINDING)
        try:
            statements = await _groups(store)
            for burst in bursts:
                before = _commits(statements)
                *got, _ = await asyncio.gather(*(_call(store, w) for w in burst), store.flush())
                assert _commits(statements) - before == 1  # the whole burst, and the flush, in one group
                for write, result in zip(burst, got, strict=True):
                    expected = await _call(reference, write)
                    if isinstance(expected, Refused):
                        assert isinstance(result, Refused) and result.why is expected.why, write
                    elif result is not Settled.QUEUED:  # a queued outcome is checked by the rows below
                        assert result == expected, write
                assert await store.lookup(IDS) == await reference.lookup(IDS)
        finally:
            await store.close()

    folder = Path(tempfile.mkdtemp(prefix="ledger-groups-"))
    try:
        asyncio.run(check(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def test_one_group_with_fenced_writes_applies_the_others(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "ledger.sqlite", BINDING, writable=True)
    try:
        for uid in ("a", "b", "c"):
            assert isinstance(await store.begin_attempt(request(uid)), Ticket)
        statements = await _groups(store)
        results = await asyncio.gather(
            store.settle(outcome("a", 1, State.PENDING)),  # applied
            store.settle(outcome("b", 2, State.PENDING)),  # fenced: b's attempt is 1
            store.settle(outcome("a", 1, State.FAILED)),  # fenced: a's attempt 1 was settled just above
            store.settle(outcome("c", 1, State.UNKNOWN, may=True)),  # queued, and applied
            store.begin_attempt(request("c")),  # after c's queued outcome: attempt 2, in doubt
            store.begin_attempt(request("b", "b")),  # refused: b is pinned to photo "a"
            store.settle(outcome("d", 1, State.PENDING)),  # fenced: no such row (yet)
            store.begin_attempt(request("d")),  # applied
        )
        assert _commits(statements) == 1
        assert results[:4] == [Settled.APPLIED, Settled.FENCED, Settled.FENCED, Settled.QUEUED]
        assert results[4] == Ticket(user_id="c", number=2, doubt_before=True)
        assert isinstance(results[5], Refused)
        assert results[6] is Settled.FENCED and results[7] == Ticket(
            user_id="d", number=1, doubt_before=False
        )
        rows = await store.lookup(["a", "b", "c", "d"])
        assert {u: (r.state, r.attempts, r.in_doubt) for u, r in rows.items()} == {
            "a": (State.PENDING, 1, False),
            "b": (State.SENDING, 1, True),
            "c": (State.SENDING, 2, True),
            "d": (State.SENDING, 1, True),
        }
    finally:
        await store.close()


async def test_a_groups_rows_are_written_a_statement_per_fifty_not_one_per_row(tmp_path: Path) -> None:
    """Every statement is a step, and the sqlite3 module lets go of the GIL around each: a step per row handed
    the event loop's thread the GIL and back twice a row. 120 rows in one group: three statements."""
    store = await SqliteStore.open(tmp_path / "ledger.sqlite", BINDING, writable=True)
    try:
        statements = await _groups(store)
        uids = [f"u{i:03d}" for i in range(120)]
        tickets = await asyncio.gather(*(store.begin_attempt(request(uid)) for uid in uids))
        assert _commits(statements) == 1 and all(isinstance(t, Ticket) for t in tickets)
        assert sum(s.startswith("INSERT OR REPLACE INTO users") for s in statements) == 3
        rows = await store.lookup(uids)
        assert sorted(rows) == uids and {(r.state, r.attempts) for r in rows.values()} == {(State.SENDING, 1)}
    finally:
        await store.close()


async def test_ids_a_lookup_found_absent_are_begun_without_reading_them_again(tmp_path: Path) -> None:
    """The planner looks up every row it sends: one that isn't in the ledger is begun as new without a read in
    the writer's transaction. Once written it is no longer absent: its next attempt is its second."""
    store = await SqliteStore.open(tmp_path / "ledger.sqlite", BINDING, writable=True)
    try:
        assert await store.lookup(["a", "b"]) == {}
        statements = await _groups(store)
        tickets = await asyncio.gather(store.begin_attempt(request("a")), store.begin_attempt(request("b")))
        assert [t.number for t in tickets if isinstance(t, Ticket)] == [1, 1]
        assert not any("json_each" in s for s in statements)
        assert await store.settle(outcome("a", 1, State.PENDING)) is Settled.APPLIED
        await store.flush()
        assert await store.begin_attempt(request("a")) == Ticket(user_id="a", number=2, doubt_before=False)
        assert await store.begin_attempt(request("c")) == Ticket(user_id="c", number=1, doubt_before=False)
        assert any("json_each" in s for s in statements)  # never looked up: read in the group
    finally:
        await store.close()


async def test_rows_the_cache_dropped_are_read_from_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows begun and not settled are cached, up to a bound; past it they are read again, never taken as new."""
    monkeypatch.setattr(sqlite_ledger, "_BEGUN_MAX", 2)
    store = await SqliteStore.open(tmp_path / "ledger.sqlite", BINDING, writable=True)
    try:
        uids = [f"u{i}" for i in range(5)]
        for uid in uids:
            assert isinstance(await store.begin_attempt(request(uid)), Ticket)
        for uid in uids:
            assert await store.settle(outcome(uid, 1, State.PENDING)) is Settled.APPLIED
        for uid in uids:
            assert await store.begin_attempt(request(uid)) == Ticket(
                user_id=uid, number=2, doubt_before=False
            )
    finally:
        await store.close()


# --- a caller hears of its write once it is on disk; the writer takes its next group without the loop ---


def _on_disk(path: Path, uid: str) -> bool:
    """Whether another connection sees `uid`'s row: committed, not just written in an open transaction."""
    with closing(sqlite3.connect(path)) as other:
        return other.execute("SELECT 1 FROM users WHERE user_id = ?", (uid,)).fetchone() is not None


async def test_a_begun_attempt_is_committed_before_its_caller_hears_of_it(tmp_path: Path) -> None:
    """ "Recorded before sent": just before each COMMIT, the ledger's thread lets the event loop run everything it
    has been handed and everything that wakes. A caller told before the commit would resume then, and another
    connection would not see its row."""
    path = tmp_path / "ledger.sqlite"
    store = await SqliteStore.open(path, BINDING, writable=True)
    loop = asyncio.get_running_loop()

    def hold_each_commit(statement: str) -> None:
        if statement == "COMMIT":
            turned = threading.Event()
            # Two hops: the second call_soon comes after any task the first hop's predecessors woke.
            loop.call_soon_threadsafe(loop.call_soon, turned.set)
            turned.wait(60)

    seen: list[bool] = []

    async def begin(uid: str) -> None:
        assert isinstance(await store.begin_attempt(request(uid)), Ticket)
        seen.append(_on_disk(path, uid))

    try:
        await store._call(store._conn.set_trace_callback, hold_each_commit)
        await asyncio.gather(*(begin(f"u{i}") for i in range(8)))
        await begin("later")
        assert seen == [True] * 9
    finally:
        await store.close()


async def test_the_writer_takes_its_next_group_while_the_event_loop_is_busy(tmp_path: Path) -> None:
    """The ledger's thread takes the next group itself once a commit is done: a loop busy elsewhere (here, held
    outright) no longer holds the writes handed to the writer. Two groups commit while the loop runs nothing."""
    store = await SqliteStore.open(tmp_path / "ledger.sqlite", BINDING, writable=True)
    began, go, both = threading.Event(), threading.Event(), threading.Event()
    commits = 0

    def trace(statement: str) -> None:
        nonlocal commits
        if statement == "BEGIN IMMEDIATE" and not began.is_set():
            began.set()
            go.wait(60)  # the first group holds until the second has been handed over
        elif statement == "COMMIT":
            commits += 1
            if commits == 2:
                both.set()

    try:
        await store._call(store._conn.set_trace_callback, trace)
        first = asyncio.ensure_future(store.begin_attempt(request("a")))
        assert await asyncio.to_thread(began.wait, 60)
        second = asyncio.ensure_future(store.begin_attempt(request("b")))
        while store._unconfirmed < 2:
            await asyncio.sleep(0)  # the second write made and handed over: a turn or two of the loop
        go.set()
        # The loop's thread now waits, running nothing, for the second group's commit.
        assert both.wait(60), "the second group waited for the event loop"
        assert [await first, await second] == [
            Ticket(user_id="a", number=1, doubt_before=False),
            Ticket(user_id="b", number=1, doubt_before=False),
        ]
    finally:
        go.set()
        await store.close()


# --- a failed group fails its callers, and only what it held is lost ---


@pytest.mark.parametrize("fault", ["disk full", "locked"])
async def test_a_group_that_cant_be_written_fails_its_callers_with_a_checkpoint_error(
    tmp_path: Path, fault: str
) -> None:
    path = tmp_path / "ledger.sqlite"
    store = await SqliteStore.open(path, BINDING, writable=True)
    blocker: sqlite3.Connection | None = None
    try:
        assert isinstance(await store.begin_attempt(request("kept")), Ticket)
        assert await store.settle(outcome("kept", 1, State.PENDING)) is Settled.APPLIED
        assert isinstance(await store.begin_attempt(request("queued")), Ticket)
        conn = store._conn
        if fault == "disk full":
            pages = (await store._call(lambda: conn.execute("PRAGMA page_count").fetchone()))[0]
            await store._call(conn.execute, f"PRAGMA max_page_count = {pages}")
        else:
            # Someone holds the file's write lock (an open `sqlite3` shell, say), longer than the writer waits.
            await store._call(conn.execute, "PRAGMA busy_timeout = 0")
            blocker = sqlite3.connect(path, isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")
        big = [request(f"lost{i}") for i in range(200)]  # more rows than the file has room for
        results = await asyncio.gather(
            *(store.begin_attempt(r) for r in big),
            store.settle(outcome("queued", 1, State.ENROLLED)),  # nobody waits for it: no error to hear
            store.settle(outcome("kept", 1, State.PENDING)),  # fenced, were it written
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        assert results[200] is Settled.QUEUED
        assert len(errors) == 201 and all(isinstance(e, LedgerError) for e in errors)
        # Its own reason, not what undoing it said (SQLite has rolled a full disk's transaction back itself).
        reason = "database or disk is full" if fault == "disk full" else "database is locked"
        assert all(str(e) == f"the ledger can no longer be written: {reason}" for e in errors)
        assert len({id(e) for e in errors}) == len(errors)  # each caller its own, with its own traceback
        # Fail-stop: every later call hears it, the queued outcome's writer included.
        with pytest.raises(LedgerError, match="can no longer be written"):
            await store.settle(outcome("queued", 1, State.ENROLLED))
        with pytest.raises(LedgerError, match="can no longer be written"):
            await store.lookup(["kept"])
    finally:
        await store.close()  # still closes, and releases the lock
        if blocker is not None:
            blocker.close()
    again = await SqliteStore.open(path, BINDING, writable=True)
    try:
        rows = await again.lookup(["kept", "queued", *(r.user_id for r in big)])
    finally:
        await again.close()
    assert set(rows) == {"kept", "queued"}  # the failed group's rows are none of them on disk
    assert rows["kept"].state is State.PENDING
    assert rows["queued"].state is State.SENDING and rows["queued"].in_doubt


# --- a queued outcome lost to a kill loses no promise ---

_KILLED_WITH_AN_OUTCOME_QUEUED = """
import asyncio, os, signal, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from tests.test_ledger_contract import BINDING, outcome, request
from backfill.ledger import Settled
from backfill.ledger.sqlite import SqliteStore
from backfill.vocab import State

async def main() -> None:
    store = await SqliteStore.open(Path({path!r}), BINDING, writable=True)
    await store.begin_attempt(request("u1"))
    assert await store.settle(outcome("u1", 1, State.ENROLLED)) is Settled.QUEUED
    # In the same turn of the loop: the group that would write the outcome has not even started.
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


def test_a_queued_outcome_lost_to_a_kill_leaves_its_attempt_in_doubt(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    root = str(Path(__file__).resolve().parent.parent)
    code = textwrap.dedent(_KILLED_WITH_AN_OUTCOME_QUEUED.format(root=root, path=str(path)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()

    async def resume() -> None:
        store = await SqliteStore.open(path, BINDING, writable=True)
        try:
            row = (await store.lookup(["u1"]))["u1"]
            assert (row.state, row.attempts, row.in_doubt) == (State.SENDING, 1, True)  # lost, as allowed
            # The promise holds: the attempt that may have enrolled the user makes the next one's 2209 ours,
            # and never someone else's.
            assert await store.begin_attempt(request("u1")) == Ticket(
                user_id="u1", number=2, doubt_before=True
            )
            assert await store.settle(outcome("u1", 2, State.ID_CONFLICT)) is Settled.FENCED
            assert await store.settle(outcome("u1", 2, State.ALREADY_ENROLLED)) is Settled.QUEUED
        finally:
            await store.close()
        reader = await SqliteStore.open(path, None, writable=False)
        try:
            assert (await reader.lookup(["u1"]))["u1"].state is State.ALREADY_ENROLLED
        finally:
            await reader.close()

    asyncio.run(resume())


# --- the send path's cost: no garbage in reference cycles per row ---


async def test_the_send_path_leaves_no_garbage_in_reference_cycles(tmp_path: Path) -> None:
    """A row's writes leave nothing for the cycle collector: 32 objects a row once cost 26 us of collection."""
    store = await SqliteStore.open(tmp_path / "ledger.sqlite", BINDING, writable=True)
    rows = 400

    async def worker(uids: list[str]) -> None:
        for uid in uids:
            assert isinstance(await store.begin_attempt(request(uid)), Ticket)
            # Both kinds of outcome: one a caller waits for, one queued.
            state = State.ENROLLED if int(uid[1:]) % 2 else State.PENDING
            assert await store.settle(outcome(uid, 1, state)) is not Settled.FENCED

    try:
        await asyncio.gather(*(worker([f"w{i}" for i in range(j, 40, 8)]) for j in range(8)))  # warm up
        gc.collect()
        gc.disable()
        try:
            await asyncio.gather(*(worker([f"u{i}" for i in range(j, rows, 8)]) for j in range(8)))
            await store.flush()
            found = gc.collect()
        finally:
            gc.enable()
    finally:
        await store.close()
    assert found < rows // 10, f"{found} objects in reference cycles for {rows} rows"


async def test_a_refused_outcome_queued_without_waiting_is_still_told(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLite answered QUEUED for an outcome its transitions then refused, and nobody heard of it."""
    binding = Binding(partner_id="085", endpoint="http://127.0.0.1:1")
    request = AttemptRequest(
        user_id="u1",
        photo_sha256="a" * 64,
        fingerprint=Fingerprint(ref="/x", size=1, version="1"),
        user_created_at="2021-08-12",
        run_id="r",
        at="t",
    )
    stale = Outcome(
        user_id="u1",
        attempt=1,
        state=State.ENROLLED,
        may_have_enrolled=False,
        proves_not_enrolled=False,
        http_status=200,
        result_code="0840",
        result_text="",
        smile_job_id="",
        job_id="",
        at="t",
    )
    store = await SqliteStore.open(tmp_path / "l.sqlite", binding, writable=True)
    try:
        await store.begin_attempt(request)
        await store.begin_attempt(request)
        with caplog.at_level(logging.WARNING, logger="backfill"):
            assert await store.settle(stale) in (Settled.QUEUED, Settled.FENCED)
            await store.flush()
        assert (await store.lookup(["u1"]))["u1"].state is State.SENDING
        assert any(getattr(r, "event", "") == "outcome_fenced" for r in caplog.records)
    finally:
        await store.close()


async def test_the_done_rows_query_searches_each_id_by_its_primary_key(tmp_path: Path) -> None:
    """A resume asks it of every manifest row: one search of the key a row, not one of users_state per done
    state and then the key (told by SQLite's own plan, not by timing it)."""
    await (await SqliteStore.open(tmp_path / "ledger.sqlite", BINDING, writable=True)).close()
    conn = sqlite3.connect(tmp_path / "ledger.sqlite")
    try:
        plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sqlite_ledger._DONE_SQL, ("[]",))]
    finally:
        conn.close()
    assert "SEARCH users USING PRIMARY KEY (user_id=?)" in plan, plan
    assert not [step for step in plan if "users_state" in step], plan


async def test_a_write_made_in_the_turn_the_closing_flush_woke_is_written_not_left_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() flushes, then ends the ledger's thread. A writer woken by the same commit writes before close()
    runs on: its write, held for the end of that turn, must go in the last group, not to a thread that is gone.

    The hand-off is slowed (the event loop busy elsewhere) so that, were the write handed over only at the end
    of its turn, the thread would have taken its last job alone and ended: the test then hangs on `late`. With
    the write handed over by close() itself, no timing matters."""
    path = tmp_path / "ledger.sqlite"
    store = await SqliteStore.open(path, BINDING, writable=True)
    hand_off = store._hand_off

    def slow_hand_off() -> None:
        time.sleep(0.05)
        hand_off()

    monkeypatch.setattr(store, "_hand_off", slow_hand_off)

    async def writer() -> Ticket | Refused:
        await store.flush()  # told by the commit that tells close()'s flush, and first
        return await store.begin_attempt(request("late"))

    # The ledger's thread is held until the first write, the writer's flush and close()'s flush are all handed
    # over, so that it takes them as one group and wakes both flushes with one commit.
    gate = threading.Event()
    held = asyncio.ensure_future(store._call(gate.wait))
    first = asyncio.ensure_future(store.begin_attempt(request("first")))
    late = asyncio.ensure_future(writer())
    closer = asyncio.ensure_future(store.close())
    for _ in range(5):
        await asyncio.sleep(0)
    gate.set()
    await held
    await asyncio.wait_for(closer, 30)
    assert isinstance(await asyncio.wait_for(late, 30), Ticket)
    assert isinstance(await first, Ticket)
    with closing(sqlite3.connect(path)) as conn:
        assert {uid for (uid,) in conn.execute("SELECT user_id FROM users")} == {"first", "late"}


async def test_closing_twice_at_once_closes_once_and_both_return(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "ledger.sqlite", BINDING, writable=True)
    pending = asyncio.ensure_future(store.begin_attempt(request("a")))
    await asyncio.sleep(0)
    await asyncio.wait_for(asyncio.gather(store.close(), store.close()), 30)
    assert isinstance(await pending, Ticket)
    await store.close()  # and again, later: nothing left to do
    again = await SqliteStore.open(tmp_path / "ledger.sqlite", BINDING, writable=True)  # the flock is free
    await again.close()

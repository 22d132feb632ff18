"""The PostgreSQL ledger's group commit: one row's race or an outage in a group, and the waits an outage takes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import MISSING, fields
from typing import Any

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from backfill.errors import LedgerError
from backfill.images import Fingerprint
from backfill.ledger import (
    AttemptRequest,
    Binding,
    LedgerRow,
    Outcome,
    Refused,
    RunRecord,
    Settled,
    Ticket,
    evolve,
)
from backfill.ledger import transitions as tr
from backfill.ledger.postgres import PostgresStore, schema
from backfill.ledger.postgres.attempts import (
    _OUTCOME_KEYS,
    _OUTCOME_OF,
    _SETTLE_BEGUN,
    FIRST_COLUMNS,
    OUTCOME_COLUMNS,
    _json,
)
from backfill.ledger.postgres.connection import Conn, Database
from backfill.manifest import Batch, Candidate
from backfill.run.policy import RetryPolicy
from backfill.vocab import State

BINDING = Binding(partner_id="085", endpoint="http://127.0.0.1:1")


def request(user_id: str, run: str = "r1") -> AttemptRequest:
    fp = Fingerprint(ref=f"/img/{user_id}.png", size=10, version="1")
    return AttemptRequest(user_id=user_id, photo_sha256="a" * 64, fingerprint=fp, user_created_at="2021-01-01",
                          run_id=run, at="2026-01-01T00:00:00.000Z")  # fmt: skip


def failed(user_id: str, attempt: int) -> Outcome:
    """An outcome that lowers doubt: durable before `settle` returns."""
    return Outcome(user_id=user_id, attempt=attempt, state=State.FAILED, may_have_enrolled=False,
                   proves_not_enrolled=True, http_status=200, result_code="0001", result_text="no face",
                   smile_job_id="1", job_id="j", at="2026-01-01T00:00:01.000Z")  # fmt: skip


class Recorded:
    """A retry policy that says what `answer` says, and notes what the ledger asked it."""

    def __init__(self, answer: Callable[[int], float | None]) -> None:
        self.answer = answer
        self.asked: list[tuple[int, float, float]] = []
        self.first = asyncio.Event()

    def during_outage(self, tries: int, *, lasted: float, bound: float) -> float | None:
        self.asked.append((tries, lasted, bound))
        self.first.set()
        return self.answer(tries)


async def waiting_for_a_lock(admin: psycopg.AsyncConnection[Any], database: str) -> int:
    """The backend of `database` that waits for a row lock, once one does: its pid (an event, not a time)."""
    for _ in range(12_000):  # a guard against a hang: two minutes
        cur = await admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'", (database,)
        )
        found = await cur.fetchone()
        if found is not None:
            return int(found[0])
        await asyncio.sleep(0.01)
    raise AssertionError(f"nothing in {database} ever waited for a lock")


@pytest.fixture
async def held_row(pg_url: str) -> AsyncIterator[tuple[PostgresStore, psycopg.AsyncConnection[Any]]]:
    """A store whose rows `held` and `beside` exist, `held` locked by another connection (in a transaction it
    leaves open). Attempts of both are read, and wait for that lock, in one group."""
    store = await PostgresStore.open(pg_url, BINDING, writable=True)
    for uid in ("held", "beside"):
        assert isinstance(await store.begin_attempt(request(uid)), Ticket)
        assert await store.settle(failed(uid, 1)) is Settled.APPLIED
    holder = await psycopg.AsyncConnection.connect(pg_url)
    await holder.execute("SELECT 1 FROM backfill.users WHERE user_id = 'held' FOR UPDATE")
    try:
        yield store, holder
    finally:
        await holder.close()
        await store.close()


# --- an outcome of this process's attempt travels as the columns it changes ---


@given(
    doubt=st.booleans(),
    attempts=st.integers(min_value=1, max_value=5),
    state=st.sampled_from(sorted(set(State) - {State.SENDING})),
    may=st.booleans(),
    proves=st.booleans(),
    http_status=st.none() | st.sampled_from([200, 500]),
    ids=st.sampled_from(["", "7"]),
)
def test_an_outcome_changes_no_column_its_conditional_write_leaves_out(
    doubt: bool, attempts: int, state: State, may: bool, proves: bool, http_status: int | None, ids: str
) -> None:
    """A settle of an attempt this process began writes `OUTCOME_COLUMNS` alone, over the row its attempt wrote:
    a column `transitions.settle` changed besides would differ between the ledger and this process's view."""
    made = tr.begin(None, request("u1"))
    assert not isinstance(made, Refused)
    begun = evolve(made[0], doubt=doubt, attempts=attempts, smile_job_id="old", job_id="old")
    outcome = Outcome(
        user_id="u1",
        attempt=attempts,
        state=state,
        may_have_enrolled=may,
        proves_not_enrolled=proves,
        http_status=http_status,
        result_code="0840",
        result_text="ok",
        smile_job_id=ids,
        job_id=ids,
        at="2026-01-01T00:00:01.000Z",
    )
    settled = tr.settle(begun, outcome)
    if settled is not None:
        changed = {f.name for f in fields(LedgerRow) if getattr(settled, f.name) != getattr(begun, f.name)}
        assert changed <= set(OUTCOME_COLUMNS)


@given(
    image_size=st.none() | st.integers(min_value=0, max_value=10**9),
    created=st.none() | st.sampled_from(["2021-01-01"]),
)
def test_a_first_attempt_sets_no_column_its_conditional_write_leaves_out(
    image_size: int | None, created: str | None
) -> None:
    """A first attempt written on condition sends `FIRST_COLUMNS` alone, the table's defaults making the rest:
    a column `transitions.begin` set besides would be lost on the way to the ledger."""
    fp = Fingerprint(ref="/img/u1.png", size=image_size, version=None)
    first = AttemptRequest(
        user_id="u1",
        photo_sha256="a" * 64,
        fingerprint=fp,
        user_created_at=created,
        run_id="r1",
        at="2026-01-01T00:00:00.000Z",
    )
    made = tr.begin(None, first)
    assert not isinstance(made, Refused)
    defaults = {f.name: f.default for f in fields(LedgerRow) if f.default is not MISSING}
    assert defaults.keys() | set(FIRST_COLUMNS) == {f.name for f in fields(LedgerRow)}
    assert {k: getattr(made[0], k) for k in defaults.keys() - set(FIRST_COLUMNS)} == {
        k: v for k, v in defaults.items() if k not in FIRST_COLUMNS
    }


@pytest.mark.parametrize("in_fleet", [False, True])
async def test_rows_written_on_condition_read_back_as_the_transitions_made_them(
    pg_url: str, in_fleet: bool
) -> None:
    """The table's defaults are the LedgerRow's: a first attempt and its outcome, each sent as the columns it
    sets, read back whole, exactly as `transitions` made them."""
    store = await PostgresStore.open(pg_url, BINDING, writable=True)
    try:
        await store.start_run(RunRecord(run_id="r1", started_at="2026-01-01T00:00:00Z", manifest="m.csv"))
        if in_fleet:
            rows = [Candidate(line=2, user_id="u1", user_created_at="2021-01-01", image="u1.png")]
            await store.load("m1", "m.csv", _one_batch(rows))
            await store.claim("m1", 10)
        made = tr.begin(None, request("u1"))
        assert not isinstance(made, Refused)
        assert isinstance(await store.begin_attempt(request("u1")), Ticket)
        assert (await store.lookup(["u1"]))["u1"] == made[0]
        outcome = Outcome(
            user_id="u1",
            attempt=1,
            state=State.ENROLLED,
            may_have_enrolled=False,
            proves_not_enrolled=False,
            http_status=200,
            result_code="0840",
            result_text="ok",
            smile_job_id="7",
            job_id="j",
            at="2026-01-01T00:00:01.000Z",
        )
        assert await store.settle(outcome) in (Settled.APPLIED, Settled.QUEUED)
        assert (await store.lookup(["u1"]))["u1"] == tr.settle(made[0], outcome)
    finally:
        await store.close()


def _read(plan: dict[str, Any], relation: str) -> int:
    """Rows a plan's scans of `relation` read, kept or thrown away, over every node and every loop."""
    below = sum(_read(p, relation) for p in plan.get("Plans", ()))
    if plan.get("Relation Name") != relation or "Scan" not in plan["Node Type"]:
        return below
    return below + (int(plan["Actual Rows"]) + int(plan.get("Rows Removed by Filter", 0))) * int(
        plan["Actual Loops"]
    )


async def test_a_groups_outcomes_read_their_own_rows_and_no_others(pg_url: str) -> None:
    """With 2,000 attempts in flight, a group's 50 outcomes read their 50 rows: read by state, each group would
    read every row still `sending`, and every row ever begun once it has been (the index of states keeps those
    entries until a vacuum), a cost that grows with the ledger."""
    store = await PostgresStore.open(pg_url, BINDING, writable=True)
    try:
        # Statistics taken while few rows were `sending`, as a long run's autovacuum takes them.
        await asyncio.gather(*(store.begin_attempt(request(f"a{i:05d}")) for i in range(2_000)))
        await asyncio.gather(*(store.settle(failed(f"a{i:05d}", 1)) for i in range(2_000)))
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("ANALYZE backfill.users")
        await asyncio.gather(*(store.begin_attempt(request(f"u{i:05d}")) for i in range(2_000)))
    finally:
        await store.close()
    with psycopg.connect(pg_url) as conn:
        with_token = schema.SELECT.replace(" FROM", ", attempt_token FROM")
        begun = conn.execute(f"{with_token} WHERE user_id LIKE 'u%%' ORDER BY user_id LIMIT 50").fetchall()
        outcomes = []
        for found in begun:
            settled = tr.settle(schema.row(found[:-1]), failed(found[0], 1))
            assert settled is not None
            outcomes.append(dict(zip(_OUTCOME_KEYS, (*_OUTCOME_OF(settled), found[-1]), strict=True)))
        # The plan a group's statement gets once prepared (psycopg prepares it at its sixth), for any group.
        conn.execute(f"PREPARE settle (json) AS {_SETTLE_BEGUN.replace('%s', '$1')}")
        conn.execute("SET plan_cache_mode = force_generic_plan")
        literal = psycopg.sql.Literal(_json(outcomes))
        explained = conn.execute(
            psycopg.sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE settle({})").format(literal)
        ).fetchone()
        conn.rollback()  # EXPLAIN ANALYZE wrote the outcomes: undone
    assert explained is not None
    (plan,) = explained[0]
    assert plan["Plan"]["Actual Rows"] == 50  # each outcome written
    assert _read(plan["Plan"], "users") == 50


async def _one_batch(candidates: list[Candidate]) -> AsyncIterator[Batch]:
    yield Batch(candidates=candidates, rejects=[])


# --- one row's race in a group ---


async def test_a_row_another_process_inserts_meanwhile_is_read_again_and_the_rest_of_its_group_commits(
    pg_url: str,
) -> None:
    store = await PostgresStore.open(pg_url, BINDING, writable=True)
    other = await psycopg.AsyncConnection.connect(pg_url)
    admin = await psycopg.AsyncConnection.connect(pg_url, autocommit=True)
    try:
        # Another process records its attempt of `raced`, not yet committed: invisible to this group's read.
        await other.execute(
            "INSERT INTO backfill.users (user_id, state, attempts, doubt, photo_sha256, run_id) "
            "VALUES ('raced', 'sending', 1, false, %s, 'other-run')",
            ("a" * 64,),
        )
        ids = ["u1", "u2", "raced", "u3"]
        group = asyncio.gather(*(store.begin_attempt(request(uid)) for uid in ids))
        await waiting_for_a_lock(admin, pg_url.rsplit("/", 1)[1])  # the group's insert waits for the other's
        await other.commit()
        answers = dict(zip(ids, await group, strict=True))
    finally:
        await other.close()
        await admin.close()
    try:
        assert all(isinstance(a, Ticket) for a in answers.values()), answers
        assert [answers[u].number for u in ("u1", "u2", "u3")] == [1, 1, 1]  # type: ignore[union-attr]
        # Read again: the other process's attempt, never settled (its run is not alive), may have enrolled it.
        raced = answers["raced"]
        assert isinstance(raced, Ticket) and raced.number == 2 and raced.doubt_before
        rows = await store.lookup(ids)
        assert {u: (r.state, r.attempts) for u, r in rows.items()} == {
            "u1": (State.SENDING, 1), "u2": (State.SENDING, 1), "u3": (State.SENDING, 1),
            "raced": (State.SENDING, 2),
        }  # fmt: skip
    finally:
        await store.close()


async def test_a_row_the_server_refuses_fails_only_its_own_caller(pg_url: str) -> None:
    store = await PostgresStore.open(pg_url, BINDING, writable=True)
    try:
        for uid in ("u1", "bad", "u2"):
            assert isinstance(await store.begin_attempt(request(uid)), Ticket)
        # PostgreSQL text can't hold a NUL: an answer carrying one can't be written. Its neighbours still are.
        bad = Outcome(user_id="bad", attempt=1, state=State.FAILED, may_have_enrolled=False,
                      proves_not_enrolled=True, http_status=200, result_code="0001", result_text="no\x00face",
                      smile_job_id="1", job_id="j", at="2026-01-01T00:00:01.000Z")  # fmt: skip
        answers = await asyncio.gather(
            store.settle(failed("u1", 1)),
            store.settle(bad),
            store.settle(failed("u2", 1)),
            return_exceptions=True,
        )
        assert answers[0] is Settled.APPLIED and answers[2] is Settled.APPLIED
        assert isinstance(answers[1], LedgerError)
        rows = await store.lookup(["u1", "bad", "u2"])
        assert [rows[u].state for u in ("u1", "bad", "u2")] == [State.FAILED, State.SENDING, State.FAILED]
    finally:
        await store.close()


# --- an outage in a group ---


async def test_a_group_cut_by_a_lost_connection_is_tried_again_whole_as_the_policy_says(
    pg_url: str, held_row: tuple[PostgresStore, psycopg.AsyncConnection[Any]]
) -> None:
    store, holder = held_row
    policy = Recorded(lambda tries: 0.0)
    store._attempts._db._retries = policy
    admin = await psycopg.AsyncConnection.connect(pg_url, autocommit=True)
    try:
        ids = ["u1", "held", "beside"]
        group = asyncio.gather(*(store.begin_attempt(request(uid)) for uid in ids))
        # The group waits on `held`'s lock; its connection is cut (as a failover would), then the lock is let go.
        pid = await waiting_for_a_lock(admin, pg_url.rsplit("/", 1)[1])
        await admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        await asyncio.wait_for(policy.first.wait(), timeout=60)  # a guard against a hang, not a measure
        await holder.commit()
        answers = dict(zip(ids, await group, strict=True))
    finally:
        await admin.close()
    assert [(tries, bound) for tries, _, bound in policy.asked] == [(1, store._attempts._db.outage_s)]
    assert {u: (a.number, a.doubt_before) for u, a in answers.items() if isinstance(a, Ticket)} == {
        "u1": (1, False), "held": (2, False), "beside": (2, False),
    }  # fmt: skip
    rows = await store.lookup(ids)
    assert {u: r.attempts for u, r in rows.items()} == {"u1": 1, "held": 2, "beside": 2}


async def test_an_outage_the_policy_gives_up_on_fails_the_whole_group_and_records_nothing_twice(
    pg_url: str, held_row: tuple[PostgresStore, psycopg.AsyncConnection[Any]]
) -> None:
    store, holder = held_row
    policy = Recorded(lambda tries: None)  # past the bound already: no more tries
    store._attempts._db._retries = policy
    admin = await psycopg.AsyncConnection.connect(pg_url, autocommit=True)
    try:
        group = asyncio.gather(
            *(store.begin_attempt(request(uid)) for uid in ("beside", "held")), return_exceptions=True
        )
        pid = await waiting_for_a_lock(admin, pg_url.rsplit("/", 1)[1])
        await admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        await asyncio.wait_for(policy.first.wait(), timeout=60)  # a guard against a hang, not a measure
        await holder.commit()
        answers = await group
    finally:
        await admin.close()
    assert len(policy.asked) == 1
    assert all(isinstance(a, LedgerError) and "can't be reached" in str(a) for a in answers), answers
    rows = await store.lookup(["beside", "held"])
    assert rows["beside"].attempts == 1 and rows["held"].attempts == 1  # nothing of the group was committed


class AnswerLost:
    """A Database whose first write commits and then, as an outage would, loses its answer: it is tried again."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self.cut = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)

    async def run(self, work: Callable[[Conn, bool], Awaitable[Any]], **options: Any) -> Any:
        if self.cut:
            return await self._db.run(work, **options)
        self.cut = True
        await self._db.run(work, **options)  # committed; the answer never came back

        async def again(conn: Conn, retried: bool) -> Any:
            return await work(conn, True)

        return await self._db.run(again, **options)


async def test_a_group_whose_commit_happened_unseen_answers_each_write_as_made_once(pg_url: str) -> None:
    store = await PostgresStore.open(pg_url, BINDING, writable=True)
    try:
        await store.start_run(RunRecord(run_id="r1", started_at="2026-01-01T00:00:00Z", manifest="m.csv"))
        assert isinstance(await store.begin_attempt(request("u0")), Ticket)
        attempts = store._attempts
        lost = AnswerLost(attempts._db)
        attempts._db = lost  # type: ignore[assignment]
        answers = await asyncio.gather(
            store.begin_attempt(request("u1")),
            store.begin_attempt(request("u2")),
            store.settle(failed("u0", 1)),
        )
        assert lost.cut
        assert [(a.user_id, a.number) for a in answers[:2] if isinstance(a, Ticket)] == [("u1", 1), ("u2", 1)]
        assert answers[2] is Settled.APPLIED  # not FENCED: it was this very outcome that the row holds
        rows = await store.lookup(["u0", "u1", "u2"])
        assert {u: (r.state, r.attempts) for u, r in rows.items()} == {
            "u0": (State.FAILED, 1), "u1": (State.SENDING, 1), "u2": (State.SENDING, 1),
        }  # fmt: skip
    finally:
        await store.close()


async def test_an_outcome_whose_row_another_process_took_over_is_read_and_fenced(pg_url: str) -> None:
    store = await PostgresStore.open(pg_url, BINDING, writable=True)
    other = await PostgresStore.open(pg_url, BINDING, writable=True)
    try:
        assert isinstance(await store.begin_attempt(request("u1")), Ticket)
        taken = await other.begin_attempt(request("u1", run="r2"))  # a newer attempt, by another process
        assert isinstance(taken, Ticket) and taken.number == 2
        assert await store.settle(failed("u1", 1)) is Settled.FENCED
        assert await other.settle(failed("u1", 2)) is Settled.APPLIED
        row = (await store.lookup(["u1"]))["u1"]
        assert (row.state, row.attempts, row.run_id) == (State.FAILED, 2, "r2")
    finally:
        await other.close()
        await store.close()


# --- the run's retry policy decides the waits ---


@given(
    tries=st.integers(min_value=1, max_value=60),
    lasted=st.floats(min_value=0, max_value=200),
    bound=st.floats(min_value=0.1, max_value=120),
)
def test_the_policy_waits_out_an_outage_within_its_bound_and_stops_at_it(
    tries: int, lasted: float, bound: float
) -> None:
    policy = RetryPolicy(max_attempts=5, backoff_initial=0.5, backoff_max=30.0)
    wait = policy.during_outage(tries, lasted=lasted, bound=bound)
    if lasted >= bound:
        assert wait is None
    else:
        assert wait is not None and 0 <= wait <= min(bound / 10, bound - lasted, 30.0)


async def test_compose_hands_the_ledger_the_runs_one_retry_policy_and_its_outage_bound(pg_url: str) -> None:
    from backfill import compose
    from backfill.config import load_settings

    settings = load_settings(flags={"checkpoint": pg_url, "ledger_outage": 7, "backoff_max": 3},
                             environ={}, need_credentials=False)  # fmt: skip
    store = await compose.open_postgres(settings, writable=True)
    try:
        assert isinstance(store, PostgresStore)
        db = store._attempts._db
        assert db._retries == compose.retry_policy(settings) and db.outage_s == 7
    finally:
        await store.close()


# --- a first attempt, written on condition, still checks its claim ---


async def test_a_first_attempt_after_the_claim_went_to_another_process_is_refused(pg_url: str) -> None:
    from backfill.ledger import Refusal, Refused
    from backfill.manifest import Batch, Candidate

    async def rows() -> AsyncIterator[Batch]:
        yield Batch(candidates=[Candidate(line=2, user_id="u1", user_created_at="2021-01-01", image="u1.png")],
                    rejects=[])  # fmt: skip

    a = await PostgresStore.open(pg_url, BINDING, writable=True, lease_s=0.6)
    b = await PostgresStore.open(pg_url, BINDING, writable=True, lease_s=0.6)
    try:
        for store, run in ((a, "run-a"), (b, "run-b")):
            await store.start_run(RunRecord(run_id=run, started_at="2026-01-01T00:00:00Z", manifest="m.csv"))
        await a.load("m1", "m.csv", rows())
        await b.load("m1", "m.csv", rows())
        assert [c.user_id for c in (await a.claim("m1", 10)).candidates] == ["u1"]
        assert a._heartbeat is not None
        a._heartbeat.cancel()  # A stalls before its first attempt, past its lease
        for _ in range(600):  # B takes the row once A's lease has ended (the bound: a guard against a hang)
            if (await b.claim("m1", 10)).candidates:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("A's lease never ended")
        refused = await a.begin_attempt(request("u1", run="run-a"))
        assert isinstance(refused, Refused) and refused.why is Refusal.CLAIM_LOST
        ticket = await b.begin_attempt(request("u1", run="run-b"))
        assert isinstance(ticket, Ticket) and ticket.number == 1 and not ticket.doubt_before  # nothing of A's
    finally:
        await a.close()
        await b.close()

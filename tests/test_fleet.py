"""A fleet on one PostgreSQL ledger: claims, fencing, the one rate, and real processes killed under faults."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import heapq
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from backfill.cli import main
from backfill.config import load_settings
from backfill.errors import ConfigError
from backfill.images import Fingerprint
from backfill.ledger import (
    AttemptRequest,
    Binding,
    Outcome,
    RateState,
    Refusal,
    Refused,
    RunRecord,
    Settled,
    Ticket,
)
from backfill.ledger.postgres import PostgresStore
from backfill.manifest import Batch, Candidate
from backfill.run.rate import FleetGate, throttle
from backfill.run.stops import Stops
from backfill.vocab import State

from .conftest import png_bytes, request_log, spawn_sandbox
from .pg_server import ROLE_PASSWORD, PgCluster
from .test_adaptive_rate import worst_window

PARTNER_ID = "085"
API_KEY = "fleet-test-key-93be1"
BINDING = Binding(partner_id=PARTNER_ID, endpoint="http://127.0.0.1:1")


# --- settings: a URL, never a password on the command line ---


def test_a_url_with_a_password_is_refused_and_says_where_the_password_goes() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(
            flags={"checkpoint": "postgresql://app:hunter2-pw@db.example:5432/migration"},
            environ={},
            need_credentials=False,
        )
    error = caught.value
    assert error.key == "checkpoint" and "flag --checkpoint" in error.source
    assert "PGPASSWORD" in str(error) and "~/.pgpass" in str(error)
    assert "hunter2-pw" not in str(error)
    with pytest.raises(ConfigError, match="password"):
        load_settings(
            flags={"checkpoint": "postgres://app@db/migration?password=hunter2-pw"},
            environ={},
            need_credentials=False,
        )
    with pytest.raises(ConfigError, match="password"):  # a client certificate's key's password
        load_settings(
            flags={"checkpoint": "postgresql://app@db/m?sslpassword=hunter2-pw"},
            environ={},
            need_credentials=False,
        )
    with pytest.raises(ConfigError, match="password"):  # libpq decodes the key: this is `password`
        load_settings(
            flags={"checkpoint": "postgresql://app@db/m?pass%77ord=hunter2-pw"},
            environ={},
            need_credentials=False,
        )
    with pytest.raises(ConfigError, match="names no database"):
        load_settings(flags={"checkpoint": "postgresql://app@db.example"}, environ={}, need_credentials=False)


def test_both_schemes_are_kept_as_urls_from_flags_and_the_environment() -> None:
    s = load_settings(
        flags={"checkpoint": "postgres://app@db.example:6432/m"}, environ={}, need_credentials=False
    )
    assert s.ledger_url == "postgres://app@db.example:6432/m"
    s = load_settings(
        environ={"BACKFILL_CHECKPOINT": "postgresql://app@db/m", "BACKFILL_LEASE": "5"},
        need_credentials=False,
    )
    assert s.ledger_url == "postgresql://app@db/m" and s.lease == 5.0
    file_ledger = load_settings(flags={"checkpoint": "ledger.sqlite"}, environ={}, need_credentials=False)
    assert file_ledger.ledger_url is None and file_ledger.ledger_path().name == "ledger.sqlite"


def test_the_cli_never_echoes_a_password_given_in_the_url(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["status", "--checkpoint", "postgresql://app:Zq81-secret@127.0.0.1:1/m"]
    )
    assert result.exit_code == 2
    assert "PGPASSWORD" in result.output and "Zq81-secret" not in result.output


# --- the one rate: every process of a fleet together, on virtual time ---


class VirtualTime:
    """Discrete-event time: `sleep` parks the caller until the clock reaches its wake-up; the driver jumps the
    clock to the next wake-up once every task is parked."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._wakeups: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = 0

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._seq += 1
        heapq.heappush(self._wakeups, (self.now + max(0.0, seconds), self._seq, future))
        await future

    async def drive(self, until: float) -> None:
        while self.now < until:
            for _ in range(20):
                await asyncio.sleep(0)  # let every runnable task reach its next sleep
            if not self._wakeups:
                return
            at, _, future = heapq.heappop(self._wakeups)
            self.now = max(self.now, at)
            if not future.done():
                future.set_result(None)


class SharedBucket:
    """The ledger's side of the fleet's rate, in memory: one row changed atomically, on the 'server' clock,
    behind a round trip that the caller's offset estimate has to see through. `waits`: the longest wait for a
    pooled connection or the row's lock before the server reads its clock (a busy database)."""

    def __init__(self, time_: VirtualTime, rng: random.Random, *, waits: float = 0.002) -> None:
        self.state: RateState | None = None
        self.time, self.rng = time_, rng
        self.lease_s = 30.0
        self.lock = asyncio.Lock()
        self.waits = waits
        self.calls = 0

    async def change_rate(self, change: Callable[[RateState | None, float], tuple[RateState, Any]]) -> Any:
        self.calls += 1
        await self.time.sleep(self.rng.uniform(0.0002, self.waits))
        async with self.lock:
            self.state, result = change(self.state, self.time.now)
        await self.time.sleep(self.rng.uniform(0.0002, 0.002))
        return result


@pytest.mark.parametrize("seed", range(8))
async def test_a_fleet_joining_leaving_and_dying_stays_within_its_one_rate(seed: int) -> None:
    rng = random.Random(seed)
    vt = VirtualTime()
    # Half the seeds on a busy database: up to 0.4 s waiting for a connection before the server reads its clock.
    bucket = SharedBucket(vt, rng, waits=0.4 if seed % 2 else 0.002)
    rate = rng.choice([5.0, 20.0, 100.0, 400.0])
    sent: list[float] = []  # server time of every slot used, by any process
    stops = Stops(vt.sleep)

    async def process(joins: float, leaves: float, skew: float, workers: int) -> None:
        await vt.sleep(joins - vt.now)
        # Each process has its own clock: the server's plus a skew of up to a few seconds.
        gate = FleetGate(bucket, rate, clock=lambda: vt.now + skew, sleep=vt.sleep)  # type: ignore[arg-type]

        async def worker() -> None:
            while vt.now < leaves:
                await gate.wait_turn(stops)
                if vt.now >= leaves:
                    return  # it died holding reserved slots: they are never used
                sent.append(vt.now)
                if rng.random() < 0.002:
                    gate.throttled(gate.generation)  # a 429 now and then: the fleet slows, never speeds up
                else:
                    gate.answered()  # and climbs back

        await asyncio.gather(*(worker() for _ in range(workers)))

    plans = [
        (1000.0 + rng.uniform(0, 3), 1000.0 + rng.uniform(4, 12), rng.uniform(-5, 5), rng.randint(1, 16))
        for _ in range(rng.randint(2, 6))
    ]
    tasks = [asyncio.ensure_future(process(*p)) for p in plans]
    await vt.drive(until=1013.0)
    for t in tasks:
        t.cancel()
    assert len(sent) > rate  # it did send, for several seconds
    assert worst_window(sent) <= rate * 1.1 + 1, (rate, worst_window(sent))


def test_a_429_anywhere_pauses_the_fleet_until_retry_after() -> None:
    state = RateState(ceiling=10, rate=10, tat=100.0, paused_until=0.0, generation=3, grown_at=90.0)
    after, _ = throttle(state, 100.0, generation=3, retry_after=7.0)
    assert after.rate == 5 and after.generation == 4 and after.paused_until == 107.0 and after.tat >= 107.0
    again, _ = throttle(after, 100.1, generation=3, retry_after=None)  # an older slot's 429: not halved again
    assert again.rate == 5 and again.generation == 4


# --- claims and fencing, on a real PostgreSQL ---


def _request(user_id: str, run: str, photo: str = "a") -> AttemptRequest:
    fp = Fingerprint(ref=f"/img/{user_id}.png", size=10, version="1")
    return AttemptRequest(
        user_id=user_id,
        photo_sha256=photo * 64,
        fingerprint=fp,
        user_created_at="2021-01-01",
        run_id=run,
        at="2026-01-01T00:00:00.000Z",
    )


def _outcome(user_id: str, attempt: int, state: State) -> Outcome:
    return Outcome(
        user_id=user_id,
        attempt=attempt,
        state=state,
        may_have_enrolled=False,
        proves_not_enrolled=False,
        http_status=200,
        result_code="0840",
        result_text="ok",
        smile_job_id="1",
        job_id="j",
        at="2026-01-01T00:00:01.000Z",
    )


async def _rows(candidates: list[Candidate]) -> AsyncIterator[Batch]:
    yield Batch(candidates=candidates, rejects=[])


@contextlib.asynccontextmanager
async def two_processes(pg_url: str, **options: Any) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two processes of a fleet on one ledger, runs "run-a" and "run-b" started: what the fleet tests share."""
    a = await PostgresStore.open(pg_url, BINDING, writable=True, **options)
    b = await PostgresStore.open(pg_url, BINDING, writable=True, **options)
    try:
        for store, run in ((a, "run-a"), (b, "run-b")):
            await store.start_run(RunRecord(run_id=run, started_at="2026-01-01T00:00:00Z", manifest="m.csv"))
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_a_finished_row_whose_outcome_the_database_lost_goes_back_to_the_fleet(pg_url: str) -> None:
    """An outcome commits asynchronously; an immediate restart of the database can drop it while the run goes
    on, writes the row to results.csv and finishes it. Finished, the row would stay `sending` for ever with
    no process to settle it (a success the ledger doesn't know). It goes back to the queue instead."""
    async with two_processes(pg_url) as (a, b):
        rows = [
            Candidate(line=i + 2, user_id=f"u{i}", user_created_at="2021-01-01", image=f"u{i}.png")
            for i in range(2)
        ]
        await a.load("m1", "m.csv", _rows(rows))
        assert [c.user_id for c in (await a.claim("m1", 10)).candidates] == ["u0", "u1"]
        for uid in ("u0", "u1"):
            assert isinstance(await a.begin_attempt(_request(uid, "run-a")), Ticket)
        assert await a.settle(_outcome("u0", 1, State.ENROLLED)) in (Settled.APPLIED, Settled.QUEUED)
        # u1's outcome was lost with the database's restart: the row is still `sending` under run-a.
        await a.finish("m1", [2, 3])
        assert await a.unfinished("m1") == 1
        assert [c.user_id for c in (await b.claim("m1", 10)).candidates] == [
            "u1"
        ]  # at once, not after a lease


async def test_a_process_whose_lease_ended_cannot_write_over_a_newer_attempt(pg_url: str) -> None:
    async with two_processes(pg_url, lease_s=0.6) as (a, b):
        rows = [Candidate(line=2, user_id="u1", user_created_at="2021-01-01", image="u1.png")]
        assert await a.load("m1", "m.csv", _rows(rows)) is True
        assert await b.load("m1", "m.csv", _rows(rows)) is False  # joined: not loaded twice
        assert [c.user_id for c in (await a.claim("m1", 10)).candidates] == ["u1"]
        assert (await b.claim("m1", 10)).candidates == []  # held by A
        first = await a.begin_attempt(_request("u1", "run-a"))
        assert isinstance(first, Ticket) and first.number == 1
        # A stalls (its renewals stop) past its lease; B claims the row and sends it again.
        assert a._heartbeat is not None
        a._heartbeat.cancel()
        await asyncio.sleep(0.8)
        assert [c.user_id for c in (await b.claim("m1", 10)).candidates] == ["u1"]
        second = await b.begin_attempt(_request("u1", "run-b"))
        assert isinstance(second, Ticket) and second.number == 2
        assert second.doubt_before  # A's attempt was recorded and never settled: it may have enrolled u1
        # A wakes up: its late answer is fenced, and it may not start another attempt.
        assert await a.settle(_outcome("u1", 1, State.ENROLLED)) is Settled.FENCED
        refused = await a.begin_attempt(_request("u1", "run-a"))
        assert isinstance(refused, Refused) and refused.why is Refusal.CLAIM_LOST
        await a.finish("m1", [2])  # A's "finished" doesn't end B's claim either
        assert await a.unfinished("m1") == 1
        assert await b.settle(_outcome("u1", 2, State.ENROLLED)) in (Settled.APPLIED, Settled.QUEUED)
        await b.finish("m1", [2])
        assert await b.unfinished("m1") == 0
        row = (await b.lookup(["u1"]))["u1"]
        assert (row.state, row.attempts, row.run_id) == (State.ENROLLED, 2, "run-b")


async def test_claims_split_the_rows_and_a_clean_stop_gives_its_claims_back(pg_url: str) -> None:
    async with two_processes(pg_url, lease_s=30) as (a, b):
        rows = [
            Candidate(line=i + 2, user_id=f"u{i}", user_created_at="2021-01-01", image=f"u{i}.png")
            for i in range(10)
        ]
        await a.load("m1", "m.csv", _rows(rows))
        await b.load("m1", "m.csv", _rows(rows))
        got_a = (await a.claim("m1", 4)).candidates
        got_b = (await b.claim("m1", 4)).candidates
        assert [c.line for c in got_a] == [2, 3, 4, 5] and [c.line for c in got_b] == [6, 7, 8, 9]
        status = await a.status()
        assert sorted(p.claimed for p in status.processes) == [4, 4] and status.writer_alive
        (queue,) = status.queues  # rows never attempted are counted here: the ledger's states don't have them
        assert (queue.manifest_sha256, queue.rows, queue.finished, queue.claimed) == ("m1", 10, 0, 8)
        await a.release()  # a clean stop: B takes A's rows at once, not after a lease
        assert [c.line for c in (await b.claim("m1", 10)).candidates] == [2, 3, 4, 5, 10, 11]


async def test_a_manifest_every_row_of_which_is_done_starts_a_new_pass(pg_url: str) -> None:
    store = await PostgresStore.open(pg_url, BINDING, writable=True)
    try:
        await store.start_run(RunRecord(run_id="r", started_at="2026-01-01T00:00:00Z", manifest="m.csv"))
        rows = [Candidate(line=2, user_id="u1", user_created_at="2021-01-01", image="u1.png")]
        await store.load("m1", "m.csv", _rows(rows))
        await store.finish("m1", [c.line for c in (await store.claim("m1", 10)).candidates])
        assert await store.unfinished("m1") == 0
        # Run again (a cron re-run): every row is claimed again, and the ledger decides each one as on SQLite.
        assert await store.load("m1", "m.csv", _rows(rows)) is False
        assert [c.user_id for c in (await store.claim("m1", 10)).candidates] == ["u1"]
    finally:
        await store.close()


# --- real processes: a fleet killed at random, the database restarted under it ---

BAD_ROWS = [
    ("bad id!", "2021-01-01", "ok_0.png"),
    ("future_user", "2999-01-01", "ok_0.png"),
    ("missing_image", "2021-01-01", "nowhere.png"),
]


CHAOS_KILLS = 6


class Fleet:
    def __init__(
        self, folder: Path, cluster: PgCluster, url: str, *, rows: int, foreign: int, seed: int
    ) -> None:
        self.folder, self.cluster, self.url = folder, cluster, url
        self.rng = random.Random(seed)
        self.valid = [f"f{i:05d}" for i in range(rows)]
        self.foreign = set(self.rng.sample(self.valid, foreign))
        (folder / "foreign.txt").write_text("".join(f"{u}\n" for u in sorted(self.foreign)))
        self.manifest = self._manifest()
        self.request_log = folder / "requests.jsonl"
        self.env = {
            **os.environ,
            **cluster.env(),
            "SMILE_PARTNER_ID": PARTNER_ID,
            "SMILE_API_KEY": API_KEY,
            "BACKFILL_BACKOFF_INITIAL": "0.05",
            "BACKFILL_BACKOFF_MAX": "0.3",
        }
        self.sandbox: subprocess.Popen[bytes] | None = None
        self.base_url = ""
        self.runs = 0
        self.logs: list[Path] = []
        # Rows a killed process left `sending`: its attempt may have reached the server (or its answer was lost
        # with it), so a later 2209 may rightly be read as ours, as the crash suite allows on SQLite.
        self.left_sending: set[str] = set()

    def kill(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        run_ids = (
            {json.loads(line).get("run_id") for line in log.read_text().splitlines()}
            if log.exists()
            else set()
        )
        with psycopg.connect(self.url) as conn:
            if conn.execute("SELECT to_regclass('backfill.users')").fetchone() == (None,):
                return  # killed before any process made the schema: nothing was sent
            found = conn.execute(
                "SELECT user_id FROM backfill.users WHERE state = 'sending' AND run_id = ANY(%s)",
                (sorted(r for r in run_ids if r),),
            ).fetchall()
        self.left_sending |= {u for (u,) in found}

    def _manifest(self) -> Path:
        (self.folder / "images").mkdir()
        rows = [(u, "2021-08-12", f"{u}.png") for u in self.valid] + BAD_ROWS
        self.rng.shuffle(rows)
        path = self.folder / "manifest.csv"
        with path.open("w", newline="") as handle:
            out = csv.writer(handle)
            out.writerow(["user_id", "user_created_at", "image_path"])
            for i, (uid, created, image) in enumerate(rows):
                out.writerow([uid, created, f"images/{image}"])
                if image != "nowhere.png":
                    (self.folder / "images" / image).write_bytes(png_bytes(i))
        return path

    def start_sandbox(self) -> None:
        self.sandbox, self.base_url = spawn_sandbox(
            [
                "--latency-ms",
                "40",
                "--jitter-ms",
                "30",
                "--error-rate",
                "0.08",
                "--reset-before-rate",
                "0.04",
                "--reset-after-rate",
                "0.04",
                "--retry-after",
                "0.05",
                "--seed",
                str(self.rng.randrange(1 << 30)),
                "--state-file",
                str(self.folder / "sandbox-state.jsonl"),
                "--request-log",
                str(self.request_log),
                "--foreign-ids",
                str(self.folder / "foreign.txt"),
            ],
            self.env,
        )

    def start_run(self, rate: float) -> subprocess.Popen[bytes]:
        self.runs += 1
        self.logs.append(self.folder / f"run{self.runs}.log")
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "backfill",
                "run",
                str(self.manifest),
                "--env",
                "local",
                "--base-url",
                self.base_url,
                "--checkpoint",
                self.url,
                "--out",
                str(self.folder / "out"),
                "--no-progress",
                "--timeout",
                "1",
                "--max-attempts",
                "6",
                "--concurrency",
                "4",
                "--rate",
                str(rate),
                "--fail-threshold",
                "1",
                "--lease",
                "2",
                "--log-format",
                "json",
                "--log-file",
                str(self.folder / f"run{self.runs}.log"),
            ],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=self.folder,
        )

    def wait_for_arrivals(self, count: int, procs: list[subprocess.Popen[bytes]]) -> int:
        """Block until the sandbox has seen `count` requests arrive, or every process has exited: how many it saw.

        Polls the request log (an event count), with a bound only as a guard against a hang."""
        give_up = time.monotonic() + 300
        while True:
            text = self.request_log.read_text() if self.request_log.exists() else ""
            whole = text[: text.rfind("\n") + 1]  # a line still being written is counted next time
            seen = sum(json.loads(line)["event"] == "request" for line in whole.splitlines() if line.strip())
            if seen >= count or all(p.poll() is not None for p in procs):
                return seen
            assert time.monotonic() < give_up, f"the fleet stalled at {seen} requests"
            time.sleep(0.05)

    def wait_for_start(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        """Block until the run has logged its start (its ledger open), or has exited."""
        give_up = time.monotonic() + 300
        while proc.poll() is None and not (log.exists() and '"run_started"' in log.read_text()):
            assert time.monotonic() < give_up, "the run never started"
            time.sleep(0.05)

    def unfinished(self) -> int:
        async def count() -> int:
            store = await PostgresStore.open(self.url, None, writable=False)
            try:
                with psycopg.connect(self.url) as conn:
                    (sha,) = conn.execute("SELECT sha256 FROM backfill.manifests").fetchone() or ("",)
                return await store.unfinished(sha)
            finally:
                await store.close()

        return asyncio.run(count())

    def requests(self) -> list[dict[str, Any]]:
        return request_log(self.request_log)

    def ledger(self) -> dict[str, str]:
        with psycopg.connect(self.url) as conn:
            return dict(conn.execute("SELECT user_id, state FROM backfill.users").fetchall())

    def outputs(self) -> tuple[set[int], set[str]]:
        """Manifest lines in any run's rejects.csv, and user_ids in any run's results.csv."""
        lines: set[int] = set()
        ids: set[str] = set()
        for path in (self.folder / "out").rglob("rejects.csv"):
            with path.open(newline="") as handle:
                lines |= {int(r["line"]) for r in csv.DictReader(handle)}
        for path in (self.folder / "out").rglob("results.csv"):
            with path.open(newline="") as handle:
                ids |= {r["user_id"] for r in csv.DictReader(handle)}
        return lines, ids


def test_a_fleet_killed_at_random_with_the_database_restarted_loses_nothing_and_keeps_its_rate(
    tmp_path: Path, pg_cluster: PgCluster, pg_url: str
) -> None:
    rate = 40.0
    fleet = Fleet(tmp_path, pg_cluster, pg_url, rows=300, foreign=12, seed=11)
    fleet.start_sandbox()
    procs = [fleet.start_run(rate) for _ in range(3)]
    logs = list(fleet.logs)
    kills = restarts = 0
    status_seen = ""
    # Kills are paced by the fleet's own progress (requests arriving at the sandbox), never by the clock, so a
    # busy machine slows the harness with the fleet: every kill lands mid-run, however slow the run is.
    arrived = 0
    looking: subprocess.Popen[str] | None = None
    try:
        while kills < CHAOS_KILLS:
            arrived = fleet.wait_for_arrivals(arrived + fleet.rng.randint(10, 30), procs)
            alive = [i for i, p in enumerate(procs) if p.poll() is None]
            if not alive:
                break  # the fleet finished first: the count below says so
            victim = fleet.rng.choice(alive)
            fleet.kill(procs[victim], logs[victim])
            kills += 1
            if kills == CHAOS_KILLS // 2:
                # Every connection drops mid-run. Only once each live process holds its connections: a process
                # can't start with the database down, and one still starting on a busy machine would exit so.
                for i in alive:
                    if i != victim:
                        fleet.wait_for_start(procs[i], logs[i])
                pg_cluster.restart_immediate(down_for=1.0)  # returns with the database up again
                restarts += 1
            procs[victim] = fleet.start_run(rate)  # restarted at once: the fleet keeps 3 processes
            logs[victim] = fleet.logs[-1]
            # `status` runs beside the fleet, not in the harness's way: a slow start on a busy machine must not
            # let the fleet finish before the kills are made.
            if looking is not None and looking.poll() is not None:
                said = looking.communicate()[0]
                status_seen = said if "process(es) live" in said else ""
                looking = None
            if looking is None and not status_seen:
                looking = subprocess.Popen(
                    [sys.executable, "-m", "backfill", "status", "--checkpoint", pg_url],
                    env=fleet.env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                )
        if looking is not None and not status_seen:
            said = looking.communicate(timeout=60)[0]
            status_seen = said if "process(es) live" in said else ""
        codes = [p.wait(timeout=240) for p in procs]
        assert all(c in (0, 1) for c in codes), (
            codes,
            [p.stderr.read().decode()[-1500:] for p in procs if p.stderr],
        )
        # The fleet waits for the rows a dead process held, so nothing should be left. (Another run now would
        # start a new pass over a finished manifest and hide a row lost from the outputs: none is started.)
        assert fleet.unfinished() == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        if fleet.sandbox is not None:
            fleet.sandbox.kill()
    assert (kills, restarts) == (CHAOS_KILLS, 1)
    assert "rows claimed" in status_seen

    ledger = fleet.ledger()
    own = set(fleet.valid) - fleet.foreign
    ours = {u for u, s in ledger.items() if s in ("enrolled", "already_enrolled")}
    # Every own row enrolled, and no false id_conflict: an own ID is never called someone else's.
    assert own <= ours
    assert not {u for u, s in ledger.items() if s == "id_conflict"} & own
    # Another partner's user is called ours only where our own request may have reached the server unseen:
    # its answer was a fault (a reset, a 5xx) or never came, or a killed process left its attempt `sending`.
    arrived, answered, faulted = defaultdict(int), defaultdict(int), set()
    for r in fleet.requests():
        if r["user_id"] in fleet.foreign:
            if r["event"] == "request":
                arrived[r["user_id"]] += 1
            else:
                answered[r["user_id"]] += 1
                faulted |= {r["user_id"]} if r["answer"] != "2209" else set()
    unseen = faulted | {u for u, n in arrived.items() if n > answered[u]} | fleet.left_sending
    assert ours - own <= unseen
    assert {u for u, s in ledger.items() if s == "id_conflict"} == fleet.foreign - ours
    assert fleet.foreign - ours  # and the rule did call someone else's IDs theirs
    enrolled_by_sandbox = {
        json.loads(line)["user_id"] for line in (tmp_path / "sandbox-state.jsonl").read_text().splitlines()
    }
    assert enrolled_by_sandbox == own
    # No ID ever arrived with a second photo.
    photos: dict[str, set[str]] = defaultdict(set)
    arrivals = [r for r in fleet.requests() if r["event"] == "request"]
    for r in arrivals:
        photos[r["user_id"]].add(r["photo"])
    assert all(len(p) == 1 for p in photos.values())
    # No row lost: every manifest row is in the results or rejects of some run, as files that exist (a killed
    # run's never do: the rows it finished were claimed again by the living).
    rejected_lines, result_ids = fleet.outputs()
    assert len(rejected_lines) == len(BAD_ROWS)
    assert set(fleet.valid) <= result_ids
    # The database password (from PGPASSWORD) is in nothing the fleet wrote: outputs, logs.
    for path in [*(tmp_path / "out").rglob("*"), *tmp_path.glob("run*.log")]:
        if path.is_file():
            assert ROLE_PASSWORD.encode() not in path.read_bytes(), path
    with psycopg.connect(pg_url) as conn:
        dumped = conn.execute("SELECT string_agg(r::text, '') FROM backfill.runs r").fetchone()
    assert dumped is not None and ROLE_PASSWORD not in (dumped[0] or "")
    # The fleet's worst second at the server, while processes joined, died and the database restarted. Its bound
    # is the bucket's own on exact time (rate * 1.1 + 1, as the virtual-time test above holds it), plus one slot
    # for each of the 3 processes alive at once: a process stalled by a busy machine sends the one slot still
    # within an interval of its time, late, and drops the rest (`FleetGate._take`), so each stall can put one
    # more request into a second than exact time would. A process off the shared bucket, or a backlog sent at
    # once, puts far more.
    times = sorted(float(r["t"]) for r in arrivals)
    assert worst_window(times) <= rate * 1.1 + 1 + 3, worst_window(times)


# --- every command on a PostgreSQL ledger, as a user meets it ---


def test_run_status_export_retry_report_and_check_all_take_a_postgresql_ledger(
    tmp_path: Path, threaded_sandboxes: Any, pg_url: str
) -> None:
    from backfill.sandbox import Faults

    from .conftest import simple_rows, write_manifest

    server = threaded_sandboxes.start(faults=Faults(script={"user_0001": [503, 503]}))
    manifest = write_manifest(tmp_path, simple_rows(8))
    env = {"SMILE_PARTNER_ID": PARTNER_ID, "SMILE_API_KEY": "test-api-key", "PGPASSWORD": ROLE_PASSWORD}
    where = ["--env", "local", "--base-url", server.base_url, "--checkpoint", pg_url]
    runner = CliRunner()

    def cli(*args: str) -> tuple[int, str]:
        result = runner.invoke(main, list(args), env=env, catch_exceptions=False)
        return result.exit_code, result.output

    code, out = cli("check", str(manifest), *where)  # before any run: no ledger yet is no problem
    assert code == 0 and "the first run creates it" in out, out
    code, out = cli(
        "run", str(manifest), *where, "--dry-run", "--out", str(tmp_path / "out"), "--no-progress"
    )
    assert code == 0 and "8 dry_run" in out and server.state.total_requests == 0, out
    code, out = cli(
        "run", str(manifest), *where, "--out", str(tmp_path / "out"), "--no-progress", "--max-attempts", "2"
    )
    assert code == 1 and "7 enrolled" in out, out  # user_0001 got two 503s: left for a retry
    code, out = cli("status", *where)
    assert code == 0 and re.search(r"enrolled +7", out) and "fleet: 0 process(es) live; rate" in out, out
    assert "8 of 8 rows finished, 0 claimed now" in out, out  # retry_exhausted ends its row for this pass
    code, out = cli("export", *where, "--status", "unknown,retry_exhausted")
    assert code == 0 and "user_0001" in out and "user_0002" not in out, out
    code, out = cli("retry", *where, "--out", str(tmp_path / "out"), "--no-progress")
    assert code == 0 and ("1 enrolled" in out or "1 already_enrolled" in out), out
    code, out = cli("report", *where, "--out", str(tmp_path / "reports"))
    assert code == 0 and f"from the ledger {pg_url}" in Path(out.strip()).read_text()
    code, out = cli("check", str(manifest), *where)
    assert code == 0 and "run(s) of a fleet live now" in out, out
    assert server.state.total_requests == 7 + 2 + 1  # nothing sent twice but the row that was retried


def test_a_nul_byte_in_a_manifest_is_a_reject_on_a_fleet_as_on_sqlite(
    tmp_path: Path, threaded_sandboxes: Any, pg_url: str
) -> None:
    # PostgreSQL text can't hold a NUL, and the fleet queues every row of the manifest, rejects too: one NUL
    # must cost its row, not stop every process of the fleet before anything is sent.
    (tmp_path / "images").mkdir()
    rows = [
        ("good_1", "2021-08-12", "images/good_1.png", ""),
        ("nul\x00id", "2021-08-12", "images/good_2.png", ""),
        ("nul_image", "2021-08-12", "images/nul\x00.png", ""),
        ("nul_date", "2021-08-12\x00", "images/good_3.png", ""),
        ("good_4", "2021-08-12", "images/good_4.png", "a note\x00 in a column that isn't read"),
    ]
    for i, name in enumerate(("good_1", "good_2", "good_3", "good_4")):
        (tmp_path / "images" / f"{name}.png").write_bytes(png_bytes(i))
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["user_id", "user_created_at", "image_path", "notes"])
        out.writerows(rows)
    env = {"SMILE_PARTNER_ID": PARTNER_ID, "SMILE_API_KEY": "test-api-key", "PGPASSWORD": ROLE_PASSWORD}

    def run(ledger: str, name: str) -> tuple[list[dict[str, str]], dict[str, str], bytes]:
        server = threaded_sandboxes.start()  # a sandbox each: the second run must not meet the first's users
        result = CliRunner().invoke(
            main,
            [
                "run",
                str(manifest),
                "--env",
                "local",
                "--base-url",
                server.base_url,
                "--checkpoint",
                ledger,
                "--out",
                str(tmp_path / name),
                "--no-progress",
            ],
            env=env,
            catch_exceptions=False,
        )
        assert result.exit_code == 1, result.output
        assert server.state.total_requests == 2  # the good rows only, once each
        (rejects,) = (tmp_path / name).rglob("rejects.csv")
        (results,) = (tmp_path / name).rglob("results.csv")
        with rejects.open(newline="") as r, results.open(newline="") as s:
            return (
                list(csv.DictReader(r)),
                {x["user_id"]: x["status"] for x in csv.DictReader(s)},
                rejects.read_bytes(),
            )

    fleet_rejects, fleet_results, fleet_raw = run(pg_url, "fleet")
    assert [(r["line"], r["user_id"], r["reason"]) for r in fleet_rejects] == [
        ("3", "nul\u2400id", "bad_user_id"),
        ("4", "nul_image", "image_missing"),
        ("5", "nul_date", "bad_date"),
    ]
    assert "NUL" in fleet_rejects[1]["message"] and r"'2021-08-12\x00'" in fleet_rejects[2]["message"]
    assert b"\x00" not in fleet_raw  # the NUL shown as a symbol: readable in rejects.csv, as in the ledger
    assert r"'nul\x00id' contains a NUL character (character 4)" in fleet_rejects[0]["message"]
    assert fleet_results == {"good_1": "enrolled", "good_4": "enrolled"}
    # The same manifest on one machine's SQLite ledger: the same rejects, said the same way, and the same sends.
    sqlite_rejects, sqlite_results, _ = run(str(tmp_path / "ledger.sqlite"), "sqlite")
    assert sqlite_rejects == fleet_rejects
    assert sqlite_results == fleet_results


# --- the database goes away: outcomes wait for it, up to a bound, then the run stops cleanly ---


@pytest.fixture(scope="module")
def own_cluster(pg_cluster: PgCluster) -> Any:
    """A cluster of this module's own, to stop and start without disturbing the shared one."""
    cluster = PgCluster.create()
    yield cluster
    cluster.destroy()


async def test_an_outcome_waits_for_a_restarted_database_and_a_longer_outage_is_a_clean_error(
    own_cluster: PgCluster,
) -> None:
    from backfill.errors import LedgerError

    url = own_cluster.create_database(f"outage{os.getpid()}")
    # A bound well above one try's GAVE_UP_TRY_S (2 s), so a busy machine can't blur "once" into "the bound".
    store = await PostgresStore.open(url, BINDING, writable=True, outage_s=10.0)
    try:
        await store.start_run(RunRecord(run_id="r", started_at="2026-01-01T00:00:00Z", manifest="m.csv"))
        assert isinstance(await store.begin_attempt(_request("u1", "r")), Ticket)
        assert isinstance(await store.begin_attempt(_request("u2", "r")), Ticket)
        # Down for less than the bound: the outcome is written once the server is back.
        own_cluster.stop("immediate")
        loop = asyncio.get_running_loop()
        back = loop.run_in_executor(None, lambda: (time.sleep(0.8), own_cluster.start()))
        failed = Outcome(
            user_id="u1",
            attempt=1,
            state=State.FAILED,
            may_have_enrolled=False,
            proves_not_enrolled=True,
            http_status=200,
            result_code="0001",
            result_text="no face",
            smile_job_id="1",
            job_id="j",
            at="2026-01-01T00:00:01.000Z",
        )
        assert await store.settle(failed) is Settled.APPLIED
        await back
        # Down for longer: a LedgerError (exit 2), not a hang or a traceback; the attempt stays recorded.
        own_cluster.stop("immediate")
        began = time.monotonic()
        with pytest.raises(LedgerError, match="can't be reached"):
            await store.settle(_outcome("u2", 1, State.ENROLLED))
        assert 1.5 < time.monotonic() - began < 30
        # Past the bound, each further step tries once, briefly: a run stops within the bound, not a multiple.
        began = time.monotonic()
        with pytest.raises(LedgerError, match="can't be reached"):
            await store.finish_run("r", finished_at="2026-01-01T00:01:00Z", rows=2, exit_code=2)
        assert time.monotonic() - began < 8  # one try of GAVE_UP_TRY_S, not the bound (10 s) again
    finally:
        own_cluster.start()
        await store.close()
    again = await PostgresStore.open(url, BINDING, writable=False)
    try:
        rows = await again.lookup(["u1", "u2"])
        assert (
            rows["u1"].state is State.FAILED and rows["u1"].photo_sha256 is None
        )  # written after the restart
        assert (
            rows["u2"].state is State.SENDING and rows["u2"].in_doubt
        )  # the next run reads it as maybe sent
    finally:
        await again.close()


async def _fleet_on_virtual_time(
    bucket: SharedBucket,
    vt: VirtualTime,
    *,
    processes: int,
    workers: int,
    rate: float,
    answer_s: float,
    until: float,
    on_send: Callable[[int, FleetGate], None] | None = None,
) -> list[float]:
    """`processes` gates sharing `bucket`, each with `workers` that take a slot, then wait `answer_s`."""
    sent: list[float] = []
    stops = Stops(vt.sleep)
    gates = [FleetGate(bucket, rate, clock=lambda: vt.now, sleep=vt.sleep) for _ in range(processes)]  # type: ignore[arg-type]

    async def worker(p: int) -> None:
        while vt.now < until:
            await gates[p].wait_turn(stops)
            sent.append(vt.now)
            if on_send is not None:
                on_send(p, gates[p])
            gates[p].answered()
            await vt.sleep(answer_s)

    tasks = [asyncio.ensure_future(worker(p)) for p in range(processes) for _ in range(workers)]
    await vt.drive(until=until)
    for t in tasks:
        t.cancel()
    return sent


async def test_a_429_with_retry_after_pauses_every_process_of_the_fleet_at_once() -> None:
    vt = VirtualTime()
    bucket = SharedBucket(vt, random.Random(3))
    paused: list[float] = []

    def on_send(p: int, gate: FleetGate) -> None:
        if not paused and vt.now >= 1005.0:  # one process hears 429, Retry-After: 5
            paused.append(vt.now)
            gate.throttled(gate.generation)
            gate.pause(5.0)

    sent = await _fleet_on_virtual_time(
        bucket, vt, processes=20, workers=8, rate=200, answer_s=0.05, until=1015.0, on_send=on_send
    )
    t429 = paused[0]
    during = [t for t in sent if t429 + 0.3 < t < t429 + 5.0]
    assert during == []  # every process heard it within a reservation or two, and held off
    assert [t for t in sent if t > t429 + 5.0]  # and resumed after it


async def test_a_fleet_that_answers_slowly_still_reaches_its_capacity_under_the_rate() -> None:
    # 10 processes of 4 workers, answers in 0.3 s: at most 133 a second, under --rate 400. Reserving slots
    # nobody waits for would spend the fleet's rate and hold it far below that.
    vt = VirtualTime()
    sent = await _fleet_on_virtual_time(
        SharedBucket(vt, random.Random(4)), vt, processes=10, workers=4, rate=400, answer_s=0.3, until=1020.0
    )
    busy = [t for t in sent if 1005.0 <= t < 1015.0]
    assert len(busy) / 10 >= 0.9 * (10 * 4 / 0.3)


async def test_a_reservation_the_ledger_refuses_is_an_error_not_a_free_slot() -> None:
    from backfill.errors import LedgerError

    class Refusing:
        lease_s = 30.0

        async def change_rate(self, change: Any) -> Any:
            raise LedgerError("the ledger can't be reached")

    gate = FleetGate(Refusing(), 2.0)  # type: ignore[arg-type]
    with pytest.raises(LedgerError):
        await gate.wait_turn(Stops(asyncio.sleep))


# --- found in review: claims forgotten, one ID in two manifests, a database's collation ---


async def test_a_claim_this_process_has_forgotten_expires_instead_of_holding_the_fleet(pg_url: str) -> None:
    async with two_processes(pg_url, lease_s=0.6) as (a, b):
        rows = [
            Candidate(line=i + 2, user_id=f"u{i}", user_created_at="2021-01-01", image=f"u{i}.png")
            for i in range(3)
        ]
        await a.load("m1", "m.csv", _rows(rows))
        await a.claim("m1", 1)  # line 2: known to A
        # Line 3 is claimed by A in the database but not in its memory (the claim's answer was lost in an
        # outage): A's renewals must not keep it alive, or no process could ever finish the manifest.
        with psycopg.connect(pg_url) as conn:
            conn.execute(
                "UPDATE backfill.queue SET claimed_by = 'run-a', lease_until = now() + interval '0.6 s' "
                "WHERE line = 3"
            )
        await asyncio.sleep(1.2)  # A renews (every 0.2 s) what it knows of
        got = await b.claim("m1", 10)
        assert [c.line for c in got.candidates] == [3, 4]  # line 2 still A's; the forgotten line 3 came back


async def test_one_id_in_two_manifests_is_never_sent_by_two_processes_at_once(pg_url: str) -> None:
    async with two_processes(pg_url, lease_s=30) as (a, b):
        row = [Candidate(line=2, user_id="u1", user_created_at="2021-01-01", image="u1.png")]
        await a.load("v1", "v1.csv", _rows(row))  # yesterday's manifest, still running
        await b.load("v2", "v2.csv", _rows(row))  # today's, holding the same user
        await a.claim("v1", 10)
        await b.claim("v2", 10)
        assert isinstance(await a.begin_attempt(_request("u1", "run-a")), Ticket)
        refused = await b.begin_attempt(_request("u1", "run-b"))  # A's request is on the wire
        assert isinstance(refused, Refused) and refused.why is Refusal.SENT_ELSEWHERE
        assert (await b.claim("v2", 10)).candidates == []  # given back, and left alone for a moment
        assert await a.settle(_outcome("u1", 1, State.ENROLLED)) in (Settled.APPLIED, Settled.QUEUED)
        await asyncio.sleep(2.2)
        assert [c.user_id for c in (await b.claim("v2", 10)).candidates] == ["u1"]
        done = await b.begin_attempt(_request("u1", "run-b"))
        assert isinstance(done, Refused) and done.why is Refusal.TERMINAL  # B skips it: never sent twice


async def test_rows_pages_through_every_id_whatever_the_databases_collation(pg_cluster: PgCluster) -> None:
    name = f"icu{os.getpid()}"
    pg_cluster.sql(
        f"CREATE DATABASE {name} OWNER backfill_app TEMPLATE template0 LOCALE_PROVIDER icu "
        "ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
    )
    store = await PostgresStore.open(pg_cluster.url(name), BINDING, writable=True)
    try:
        # Upper and lower case: en-US sorts them together, byte order apart. 2,500 IDs: three pages.
        ids = [f"{'User' if i % 2 else 'user'}{i:04d}" for i in range(2500)]
        for uid in ids:
            assert isinstance(await store.begin_attempt(_request(uid, "r")), Ticket)
        assert [r.user_id async for r in store.rows()] == sorted(ids)
    finally:
        await store.close()


# --- found by trying it as a new user ---


@pytest.mark.parametrize(
    "value",
    [
        "host=127.0.0.1 port=5432 dbname=migration user=bf password=Kq9-secret",  # libpq's keyword form
        "dbname=migration",
        "postgresq://bf@127.0.0.1:5432/migration",  # a typo of the scheme
        "pg://bf@127.0.0.1/migration",
    ],
)
def test_a_connection_string_that_isnt_a_postgresql_url_never_becomes_a_sqlite_file(value: str) -> None:
    # As a file, it would be a new empty ledger: every enrolled user sent again, their 2209s called conflicts.
    with pytest.raises(ConfigError) as caught:
        load_settings(flags={"checkpoint": value}, environ={}, need_credentials=False)
    assert "postgresql://user@host:port/dbname" in str(caught.value)
    assert "Kq9-secret" not in str(caught.value) and "migration" not in str(caught.value)
    for fine in ("ledger.sqlite", "/srv/ledgers/085.sqlite", "a=b.sqlite"):
        assert (
            load_settings(flags={"checkpoint": fine}, environ={}, need_credentials=False).ledger_url is None
        )


async def test_a_row_stopped_before_its_retry_goes_back_to_the_fleet_not_finished(pg_url: str) -> None:
    from types import SimpleNamespace

    from backfill.run.claims import Claims, FinishingSink
    from backfill.run.records import ResultRow
    from backfill.vocab import Status

    async with two_processes(pg_url) as (a, b):
        rows = [
            Candidate(line=i + 2, user_id=f"u{i}", user_created_at="2021-01-01", image=f"u{i}.png")
            for i in range(3)
        ]
        await a.load("m1", "m.csv", _rows(rows))
        manifest = SimpleNamespace(sha256="m1", name="m.csv")
        claims = Claims(a, manifest, batch=10, stopping=lambda: False, nap=asyncio.sleep)  # type: ignore[arg-type]
        assert [
            c.user_id for c in (await claims.next_batch() or Batch(candidates=[], rejects=[])).candidates
        ] == ["u0", "u1", "u2"]

        class Collect:
            def result(self, row: Any) -> None: ...
            def reject(self, row: Any) -> None: ...
            def skipped(self, rows: Any, finished_at: str) -> None: ...

        sink = FinishingSink(Collect(), claims)  # type: ignore[arg-type]
        sink.result(ResultRow(user_id="u0", status=Status.ENROLLED))
        # SIGTERM came during their backoff: after a refusal (pending), after a lost answer (in doubt).
        sink.result(ResultRow(user_id="u1", status=Status.PENDING, unfinished=True))
        sink.result(ResultRow(user_id="u2", status=Status.UNKNOWN, unfinished=True))
        await claims.close()  # a drain: finished rows told, the rest given back
        assert await a.unfinished("m1") == 2
        assert [c.user_id for c in (await b.claim("m1", 10)).candidates] == [
            "u1",
            "u2",
        ]  # another process retries them


async def test_closing_the_claim_stage_tells_its_finished_rows_at_once_not_after_the_flush_delay(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from backfill.run import claims as claim_stage
    from backfill.run.claims import Claims

    # A delay no test outlives: a close that waited it out fails by the bound below, whatever the machine's speed.
    monkeypatch.setattr(claim_stage, "FINISH_EVERY_S", 3600.0)
    async with two_processes(pg_url) as (a, _):
        rows = [Candidate(line=2, user_id="u0", user_created_at="2021-01-01", image="u0.png")]
        await a.load("m1", "m.csv", _rows(rows))
        manifest = SimpleNamespace(sha256="m1", name="m.csv")
        claims = Claims(a, manifest, batch=10, stopping=lambda: False, nap=asyncio.sleep)  # type: ignore[arg-type]
        await claims.next_batch()
        claims.finished(("u0",))  # its flush is now waiting out FINISH_EVERY_S
        await asyncio.wait_for(claims.close(), timeout=120)
        assert await a.unfinished("m1") == 0  # told, not given back


def test_a_run_that_loses_its_ledger_for_longer_than_the_bound_exits_2_soon_and_says_so(
    tmp_path: Path, own_cluster: PgCluster, threaded_sandboxes: Any
) -> None:
    from backfill.sandbox import Faults

    from .conftest import simple_rows, write_manifest

    url = own_cluster.create_database(f"gone{os.getpid()}")
    server = threaded_sandboxes.start(faults=Faults(latency_ms=100))
    manifest = write_manifest(tmp_path, simple_rows(200))
    env = {
        **os.environ,
        **own_cluster.env(),
        "SMILE_PARTNER_ID": PARTNER_ID,
        "SMILE_API_KEY": "test-api-key",
        "BACKFILL_LEDGER_OUTAGE": "2",
    }
    log = tmp_path / "run.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "backfill",
            "run",
            str(manifest),
            "--env",
            "local",
            "--base-url",
            server.base_url,
            "--checkpoint",
            url,
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
            "--rate",
            "20",
            "--log-format",
            "json",
            "--log-file",
            str(log),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        while server.state.total_requests < 10:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        own_cluster.stop("immediate")  # and it stays down
        began = time.monotonic()
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - began
    finally:
        if proc.poll() is None:
            proc.kill()
        own_cluster.start()
    assert proc.returncode == 2, err.decode()[-2000:]
    # The bound once (2 s), then each remaining step tries once (2 s), not the 60 s this test would wait: the
    # margin is for a busy machine, where the process's own start and exit take seconds.
    assert took < 40
    events = [json.loads(line) for line in log.read_text().splitlines()]
    finished = [e for e in events if e["event"] == "run_finished"]
    assert finished and "exit code 2" in finished[0]["message"]  # what the process exits with, said
    assert b"discarding closed connection" not in err and b"error connecting in" not in err  # no pool chatter
    assert "can't be reached" in err.decode()
    # Its results.csv is whole (no summary.json: the run did not finish), and every attempt it sent is recorded.
    (results,) = (tmp_path / "out").rglob("results.csv")
    assert not (results.parent / "summary.json").exists()


# --- found in the second review ---


async def test_a_process_never_claims_again_a_line_it_still_holds(pg_url: str) -> None:
    async with two_processes(pg_url, lease_s=0.6) as (a, b):
        rows = [Candidate(line=2, user_id="u0", user_created_at="2021-01-01", image="u0.png")]
        await a.load("m1", "m.csv", _rows(rows))
        assert [c.line for c in (await a.claim("m1", 10)).candidates] == [2]
        assert a._heartbeat is not None
        a._heartbeat.cancel()  # an outage longer than the lease: A's renewals don't get through
        await asyncio.sleep(0.8)
        # Its lease ran out, but A still has the row queued: claiming it again would send it twice from A.
        assert (await a.claim("m1", 10)).candidates == []
        assert [c.line for c in (await b.claim("m1", 10)).candidates] == [
            2
        ]  # another process may take it over


async def test_a_row_handed_to_another_process_gives_its_claim_back(pg_url: str) -> None:
    from types import SimpleNamespace

    from backfill.run.claims import Claims

    async with two_processes(pg_url) as (a, b):
        await a.load(
            "m1",
            "m.csv",
            _rows([Candidate(line=2, user_id="u0", user_created_at="2021-01-01", image="u0.png")]),
        )
        manifest = SimpleNamespace(sha256="m1", name="m.csv")
        claims = Claims(a, manifest, batch=10, stopping=lambda: False, nap=asyncio.sleep)  # type: ignore[arg-type]
        await claims.next_batch()
        # Its outcome was fenced: another process's newer attempt tells the row. A keeping (and renewing) the
        # claim would leave this manifest unfinished for as long as A lives.
        claims.handed_back("u0")
        await asyncio.sleep(0.8)  # the next flush
        assert [c.line for c in (await b.claim("m1", 10)).candidates] == [2]
        await claims.close()


async def test_a_server_that_answers_no_is_an_error_at_once_not_an_outage_to_wait_out(pg_url: str) -> None:
    from backfill.errors import LedgerError

    name = pg_url.rsplit("/", 1)[1]
    store = await PostgresStore.open(pg_url, BINDING, writable=True, outage_s=30)
    try:
        assert isinstance(await store.begin_attempt(_request("u1", "r")), Ticket)
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute(f"ALTER DATABASE \"{name}\" SET lock_timeout = '200ms'")
        await store.close()
        store = await PostgresStore.open(pg_url, BINDING, writable=True, outage_s=30)
        with psycopg.connect(pg_url) as holder:
            holder.execute(
                "SELECT 1 FROM backfill.users WHERE user_id = 'u1' FOR UPDATE"
            )  # held, not released
            began = time.monotonic()
            with pytest.raises(LedgerError, match="refused"):
                await store.settle(_outcome("u1", 1, State.ENROLLED))
            assert time.monotonic() - began < 10  # not the 30 s an outage would be waited for
    finally:
        await store.close()

"""A bounded stop: answers awaited --stop-timeout at most, the rest left in doubt; none sent after; claims back at once."""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import IO, Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backfill import compose
from backfill.config import Settings
from backfill.images import Fingerprint, Photo
from backfill.images.local import LocalImageSource
from backfill.ledger import AttemptRequest, Binding, Refused, RunRecord, Ticket
from backfill.ledger.sqlite import SqliteStore
from backfill.manifest import Candidate
from backfill.run.claims import Claims, FinishingSink
from backfill.run.engine import Engine
from backfill.run.records import RejectRow, ResultRow, SkippedRow
from backfill.sandbox import Faults, start_sandbox
from backfill.vocab import Status

from .conftest import API_KEY, PARTNER_ID, ThreadedSandboxes, simple_rows, write_manifest
from .crash_rig import Chaos, CrashRig
from .test_fleet import _rows

STOP_TIMEOUT = 2.0  # --stop-timeout in these tests
GRACE = 5.0  # seconds the issue allows past --stop-timeout for writing the outputs and leaving
GENEROUS = 120.0  # seconds: a bound only against a hang, never a measure


class Lines:
    """A child's stderr, read line by line as it comes, each line with the moment it was read."""

    def __init__(self, stream: IO[str] | None) -> None:
        assert stream is not None
        self._stream = stream
        self._lines: queue.Queue[tuple[float, str]] = queue.Queue()
        self.text = ""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self._stream:
            self._lines.put((time.monotonic(), line))

    def wait_for(self, part: str) -> float:
        """When the first line holding `part` was read."""
        give_up = time.monotonic() + GENEROUS
        while time.monotonic() < give_up:
            try:
                at, line = self._lines.get(timeout=0.1)
            except queue.Empty:
                continue
            self.text += line
            if part in line:
                return at
        raise AssertionError(f"no line with {part!r} on stderr; read so far:\n{self.text}")

    def rest(self) -> str:
        """Every line read, once the child has exited."""
        while True:
            try:
                self.text += self._lines.get(timeout=1)[1]
            except queue.Empty:
                return self.text


def requests_seen(log: Path) -> int:
    """Requests the sandbox has logged on arrival (an event count, read as often as asked)."""
    if not log.exists():
        return 0
    whole = log.read_text()
    whole = whole[: whole.rfind("\n") + 1]  # a line still being written is counted next time
    return sum(json.loads(line)["event"] == "request" for line in whole.splitlines() if line.strip())


def wait_until(done: Callable[[], bool], what: str) -> None:
    give_up = time.monotonic() + GENEROUS
    while not done():
        assert time.monotonic() < give_up, f"never: {what}"
        time.sleep(0.02)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


# --- SIGTERM while every answer hangs for a minute: exit 143 within --stop-timeout + 5 s, rows in doubt ---

HANGING = Chaos(
    latency_ms=60_000,
    jitter_ms=0,
    error_rate=0,
    reset_before_rate=0,
    reset_after_rate=0,
    slow_rate=0,
    timeout_s=120,
    sandbox_kill_rate=0,
    rate=100,
)


class BoundedRig(CrashRig):
    """The crash rig's run, stopped with a short --stop-timeout."""

    def run_command(self) -> list[str]:
        return [*super().run_command(), "--stop-timeout", f"{STOP_TIMEOUT:g}"]


def test_sigterm_while_every_answer_hangs_exits_143_in_time_and_a_rerun_settles_the_rows_as_ours(
    tmp_path: Path,
) -> None:
    rig = BoundedRig(tmp_path, rows=30, chaos=HANGING, seed=3)
    rig.start_sandbox()  # every request is enrolled at once, then answered a minute later
    try:
        run = subprocess.Popen(
            rig.run_command(),
            env=rig.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=rig.folder,
        )
        stderr = Lines(run.stderr)
        wait_until(lambda: requests_seen(rig.request_log) >= 8, "every worker's request on the wire")
        signalled = time.monotonic()
        run.send_signal(signal.SIGTERM)
        code = run.wait(GENEROUS)
        took = time.monotonic() - signalled
        said = stderr.rest()
        assert code == 143, said[-3000:]
        assert took <= STOP_TIMEOUT + GRACE, f"exited {took:.1f}s after SIGTERM"
        assert "answers awaited 2s at most (--stop-timeout)" in said  # the first-signal line says the bound
        assert "8 requests still unanswered 2s after the stop" in said and "Traceback" not in said

        # The outputs are whole, and every manifest row is accounted for: in doubt, rejected, or not reached.
        summary = rig.last_summary()
        assert summary["exit_code"] == 143 and summary["counts"] == {"unknown": 8, "rejected": 3}
        assert summary["not_reached"] == 30 - 8
        folder = rig.out / str(summary["run_id"])
        results = read_csv(folder / "results.csv")
        assert len(results) == 8 and {r["status"] for r in results} == {"unknown"}
        assert all("--stop-timeout" in r["error"] for r in results)
        assert len(read_csv(folder / "rejects.csv")) == 3
        # In doubt in the ledger too: recorded as sent, never as not sent, pending or failed.
        with sqlite3.connect(rig.checkpoint) as conn:
            held = conn.execute("SELECT state, doubt, count(*) FROM users GROUP BY state, doubt").fetchall()
        assert held == [("unknown", 1, 8)]

        # A re-run against an API that answers settles them: the 2209 each gets is ours (already_enrolled).
        rig.kill_sandbox()
        rig.chaos = dataclasses.replace(HANGING, latency_ms=0, timeout_s=5)
        rig.start_sandbox()
        figures = rig.verify(rig.resume_until_done())
        assert figures["answers_2209"] == 8 and figures["duplicates"] == 0
    finally:
        rig.kill_sandbox()


def test_max_duration_against_an_api_answering_in_30s_exits_within_the_duration_and_the_stop_timeout(
    tmp_path: Path, threaded_sandboxes: ThreadedSandboxes
) -> None:
    server = threaded_sandboxes.start(faults=Faults(latency_ms=30_000))
    manifest = write_manifest(tmp_path, simple_rows(10))
    env = {**os.environ, "SMILE_PARTNER_ID": PARTNER_ID, "SMILE_API_KEY": API_KEY}
    run = subprocess.Popen(
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
            str(tmp_path / "cp.sqlite"),
            "--out",
            str(tmp_path / "out"),
            "--concurrency",
            "4",
            "--rate",
            "100",
            "--timeout",
            "60",
            "--max-duration",
            "2",
            "--stop-timeout",
            f"{STOP_TIMEOUT:g}",
            "--no-progress",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    stderr = Lines(run.stderr)
    started = stderr.wait_for("run_started")  # the --max-duration clock starts with the run
    code = run.wait(GENEROUS)
    took = time.monotonic() - started
    said = stderr.rest()
    assert code == 1, said[-3000:]  # a planned stop with rows left, not a failure
    assert took <= 2 + STOP_TIMEOUT + GRACE, f"exited {took:.1f}s after the run started"
    assert server.state.total_requests == 4  # no request started after the stop
    [folder] = (tmp_path / "out").iterdir()
    summary = json.loads((folder / "summary.json").read_text())
    assert "--max-duration" in summary["stop_reason"]
    assert summary["counts"] == {"unknown": 4} and summary["not_reached"] == 6


# --- in one process: the library's stop, cut off at --stop-timeout ---


async def test_a_stop_abandons_the_requests_still_unanswered_at_the_stop_timeout_and_says_they_are_in_doubt(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(6))
    engines: list[Engine] = []
    async with await start_sandbox(PARTNER_ID, API_KEY, faults=Faults(latency_ms=60_000)) as server:

        async def stop_once_sent() -> float:
            while server.state.total_requests < 3:
                await asyncio.sleep(0.01)
            engines[0].interrupt(signal.SIGTERM)
            return time.monotonic()

        stopper = asyncio.ensure_future(stop_once_sent())
        summary = await asyncio.wait_for(
            compose.run(
                make_settings(server, concurrency=3, timeout=120, stop_timeout=0.5),
                manifest,
                engine_ready=engines.append,
            ),
            GENEROUS,
        )
        took = time.monotonic() - await stopper
    assert took <= 0.5 + GRACE
    assert (summary.exit_code, summary.counts, summary.not_reached) == (143, {"unknown": 3}, 3)
    assert server.state.total_requests == 3
    with sqlite3.connect(tmp_path / "checkpoint.sqlite") as conn:
        assert conn.execute("SELECT state, doubt FROM users").fetchall() == [("unknown", 1)] * 3


async def test_answers_that_come_within_the_stop_timeout_are_recorded_not_abandoned(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(6))
    engines: list[Engine] = []
    async with await start_sandbox(PARTNER_ID, API_KEY, faults=Faults(latency_ms=300)) as server:

        async def stop_once_sent() -> None:
            while server.state.total_requests < 3:
                await asyncio.sleep(0.01)
            engines[0].interrupt(signal.SIGTERM)

        stopper = asyncio.ensure_future(stop_once_sent())
        summary = await compose.run(
            make_settings(server, concurrency=3, stop_timeout=60), manifest, engine_ready=engines.append
        )
        await stopper
    assert (summary.exit_code, summary.counts, summary.not_reached) == (143, {"enrolled": 3}, 3)


class StopWhileRecording(SqliteStore):
    """A real SQLite ledger, and a stop that comes while its first attempt is being recorded."""

    stop: Callable[[], None] | None = None

    async def begin_attempt(self, request: AttemptRequest) -> Ticket | Refused:
        ticket = await super().begin_attempt(request)
        if self.stop is not None:
            self.stop()
            self.stop = None
        return ticket


class StopWhileReading(LocalImageSource):
    """The real local photos, and a stop that comes while the first one is read to be sent."""

    stop: Callable[[], None] | None = None

    async def read(self, fingerprint: Fingerprint) -> Photo:
        photo = await super().read(fingerprint)
        if self.stop is not None:
            self.stop()
            self.stop = None
        return photo


@pytest.mark.parametrize("during", ["the photo read", "the attempt recorded"])
async def test_no_request_starts_after_a_stop_and_an_attempt_never_sent_adds_no_doubt(
    tmp_path: Path, make_settings: Callable[..., Settings], during: str
) -> None:
    """The stop comes while the row's photo is read, or while its attempt is recorded: it is not sent. An attempt
    recorded and then withdrawn is settled as it stood, so a 2209 for the ID later is someone else's, rightly."""
    manifest = write_manifest(tmp_path, simple_rows(1))
    foreign = Faults(foreign_ids=frozenset({"user_0000"}))
    async with await start_sandbox(PARTNER_ID, API_KEY, faults=foreign) as server:
        settings = make_settings(server, concurrency=1)
        store = await StopWhileRecording.open(
            tmp_path / "checkpoint.sqlite", compose.binding(settings), writable=True
        )
        images = StopWhileReading(base=tmp_path, root=None, max_bytes=5 * 1024 * 1024)
        engines: list[Engine] = []

        def stop() -> None:
            engines[0].interrupt(signal.SIGTERM)

        if during == "the photo read":
            images.stop = stop
        else:
            store.stop = stop
        try:
            summary = await compose.run(
                settings, manifest, store=store, images=images, engine_ready=engines.append
            )
        finally:
            await store.close()
        assert server.state.total_requests == 0
        assert (summary.exit_code, summary.counts, summary.not_reached) == (143, {}, 1)
        with sqlite3.connect(tmp_path / "checkpoint.sqlite") as conn:
            rows = conn.execute("SELECT state, doubt FROM users").fetchall()
        # Read but not recorded: the ledger never heard of it. Recorded, then withdrawn: pending, not in doubt.
        assert rows == ([] if during == "the photo read" else [("pending", 0)])
        again = await compose.run(settings, manifest)
    assert again.counts == {"id_conflict": 1}  # someone else's: no request of ours ever reached the server


async def test_cancelling_a_run_whose_requests_hang_still_cancels_it(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    """What cuts a request off at --stop-timeout must never swallow a cancellation that isn't its own."""
    manifest = write_manifest(tmp_path, simple_rows(4))
    async with await start_sandbox(PARTNER_ID, API_KEY, faults=Faults(latency_ms=60_000)) as server:
        run = asyncio.ensure_future(compose.run(make_settings(server, concurrency=2, timeout=120), manifest))
        while server.state.total_requests < 2:
            await asyncio.sleep(0.01)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(run, GENEROUS)


# --- a fleet: a SIGTERMed process's unsent claims go back at once, and another process takes them ---


@pytest.fixture
def fleet_sandbox(threaded_sandboxes: ThreadedSandboxes, tmp_path: Path) -> Iterator[Any]:
    # The first two rows are enrolled, then answered only after a minute; every other answer comes at once.
    hang = {"user_0000": ["slow"], "user_0001": ["slow"]}
    yield threaded_sandboxes.start(
        faults=Faults(script=hang, slow_ms=60_000), request_log=tmp_path / "requests.jsonl"
    )


def test_a_sigtermed_fleet_process_gives_its_unsent_claims_back_at_once_and_another_takes_them(
    tmp_path: Path, pg_url: str, fleet_sandbox: Any
) -> None:
    from backfill.ledger.postgres import PostgresStore

    manifest = write_manifest(tmp_path, simple_rows(12))
    env = {**os.environ, "SMILE_PARTNER_ID": PARTNER_ID, "SMILE_API_KEY": API_KEY}

    def start(name: str, concurrency: int) -> tuple[subprocess.Popen[str], Lines]:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "backfill",
                "run",
                str(manifest),
                "--env",
                "local",
                "--base-url",
                fleet_sandbox.base_url,
                "--checkpoint",
                pg_url,
                "--out",
                str(tmp_path / name),
                "--no-progress",
                "--concurrency",
                str(concurrency),
                "--rate",
                "50",
                "--timeout",
                "120",
                "--lease",
                "30",
                "--stop-timeout",
                f"{STOP_TIMEOUT:g}",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        return process, Lines(process.stderr)

    loop = asyncio.new_event_loop()
    ledgers: list[PostgresStore] = []  # opened once the first run has made the ledger

    def claimed_by(pid: int) -> int:
        if not ledgers:
            ledgers.append(loop.run_until_complete(PostgresStore.open(pg_url, None, writable=False)))
        found = loop.run_until_complete(ledgers[0].status()).processes
        return next((p.claimed for p in found if p.pid == pid), 0)

    a, a_said = start("a", concurrency=2)
    b: subprocess.Popen[str] | None = None
    try:
        # A claims all 12 rows (one batch); its two workers send the two rows that hang, and hold the rest.
        wait_until(lambda: fleet_sandbox.state.total_requests >= 2, "A's two requests on the wire")
        wait_until(lambda: claimed_by(a.pid) == 12, "A holding every row")
        assert set(fleet_sandbox.state.requests) == {"user_0000", "user_0001"}
        b, b_said = start("b", concurrency=4)
        b_said.wait_for("fleet_joined")  # B is in: it finds nothing to claim, and looks again

        signalled = time.monotonic()
        a.send_signal(signal.SIGTERM)
        heard = a_said.wait_for("stopping:")
        wait_until(lambda: claimed_by(a.pid) <= 2, "A's unsent claims back")
        back = time.monotonic()
        assert back - heard <= 1.0, f"A's unsent claims came back {back - heard:.2f}s after it heard SIGTERM"

        assert a.wait(GENEROUS) == 143, a_said.rest()[-3000:]
        assert time.monotonic() - signalled <= STOP_TIMEOUT + GRACE
        # B sent the rows A gave back, then the two A abandoned in doubt: their 2209 is ours.
        assert b.wait(GENEROUS) == 0, b_said.rest()[-3000:]
    finally:
        for process in (a, b):
            if process is not None and process.poll() is None:
                process.kill()
        for ledger in ledgers:
            loop.run_until_complete(ledger.close())
        loop.close()
    [a_run] = (tmp_path / "a").iterdir()
    a_results = {r["user_id"]: r["status"] for r in read_csv(a_run / "results.csv")}
    assert a_results == {"user_0000": "unknown", "user_0001": "unknown"}
    assert json.loads((a_run / "summary.json").read_text())["not_reached"] == 10
    [b_run] = (tmp_path / "b").iterdir()
    b_results = {r["user_id"]: r["status"] for r in read_csv(b_run / "results.csv")}
    expected = {f"user_{i:04d}": "enrolled" for i in range(2, 12)}
    assert b_results == {**expected, "user_0000": "already_enrolled", "user_0001": "already_enrolled"}
    # Each user enrolled once: the sandbox answered the two resent IDs 2209.
    state = fleet_sandbox.state
    assert len(state.enrolled) == 12
    assert state.enroll_attempts_after_enrolled == {"user_0000": 1, "user_0001": 1}


class Unwritten:
    """A run's files, left out: the claim stage is what these tests look at."""

    def result(self, row: ResultRow) -> None:
        pass

    def reject(self, row: RejectRow) -> None:
        pass

    def skipped(self, rows: Sequence[SkippedRow], finished_at: str) -> None:
        pass


async def stopped_with_rows_in_hand(
    pg_url: str, ids: list[str], done: set[str], in_hand: set[str], ends: dict[str, str]
) -> None:
    """Process A claims every row; some finish; a stop comes with `in_hand` in its workers' hands, which then end
    as `ends` says (finished, unfinished: stopped between attempts or cut off in doubt, unsent). Process B must
    be able to take, at once, exactly the rows A will not send, and after A's close exactly those not finished."""
    from backfill.ledger.postgres import PostgresStore

    line = {uid: i + 2 for i, uid in enumerate(ids)}
    sha = uuid.uuid4().hex  # a manifest of its own in the one database the examples share
    binding = Binding(partner_id=PARTNER_ID, endpoint="http://127.0.0.1:1")
    a = await PostgresStore.open(pg_url, binding, writable=True, lease_s=30)
    b = await PostgresStore.open(pg_url, binding, writable=True, lease_s=30)
    try:
        for store in (a, b):
            await store.start_run(
                RunRecord(run_id=uuid.uuid4().hex, started_at="2026-01-01T00:00:00Z", manifest="m")
            )
        rows = [
            Candidate(line=line[u], user_id=u, user_created_at="2021-01-01", image=f"{u}.png") for u in ids
        ]
        await a.load(sha, "m.csv", _rows(rows))
        stopping = False
        manifest = SimpleNamespace(sha256=sha, name="m.csv")
        claims = Claims(a, manifest, batch=len(ids), stopping=lambda: stopping, nap=asyncio.sleep)  # type: ignore[arg-type]
        batch = await claims.next_batch()
        assert batch is not None and len(batch.candidates) == len(ids)
        sink = FinishingSink(Unwritten(), claims)
        for uid in sorted(done):
            sink.result(ResultRow(user_id=uid, status=Status.ENROLLED))

        stopping = True
        hand = set(in_hand)
        claims.give_back_unsent(hand)
        # Before A closes: B takes every row neither finished nor in a worker's hands, and no other.
        now = {line[u] for u in ids if u not in done | in_hand}
        taken: set[int] = set()
        give_up = time.monotonic() + 10  # one write of A's: only a hang takes this long
        while taken != now:
            assert time.monotonic() < give_up, f"B took {sorted(taken)}, not {sorted(now)}"
            got = {c.line for c in (await b.claim(sha, len(ids))).candidates}
            assert not got & taken and got <= now, f"B took {sorted(got)} of {sorted(now)}"
            taken |= got
            await asyncio.sleep(0.01)

        for uid, end in sorted(ends.items()):
            if end == "finished":
                sink.result(ResultRow(user_id=uid, status=Status.ENROLLED))
            elif end == "unfinished":
                sink.result(ResultRow(user_id=uid, status=Status.UNKNOWN, unfinished=True))
            hand.discard(uid)  # "unsent": the sender returned nothing, and nothing is told
            claims.give_back_unsent(hand)
        await claims.close()
        later = {line[u] for u, end in ends.items() if end != "finished"}
        assert {c.line for c in (await b.claim(sha, len(ids))).candidates} == later
        finished = len(done) + sum(end == "finished" for end in ends.values())
        assert await a.unfinished(sha) == len(ids) - finished
    finally:
        await a.close()
        await b.close()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_stop_gives_back_at_once_exactly_the_claimed_rows_it_will_not_send(pg_url: str, data: Any) -> None:
    ids = [f"u{i}" for i in range(data.draw(st.integers(1, 10), label="rows"))]
    done = data.draw(st.sets(st.sampled_from(ids)), label="finished before the stop")
    rest = [u for u in ids if u not in done]
    in_hand = data.draw(st.sets(st.sampled_from(rest)) if rest else st.just(set()), label="in hand")
    ways = st.sampled_from(["finished", "unfinished", "unsent"])
    ends = {u: data.draw(ways, label=f"{u} ends") for u in sorted(in_hand)}
    asyncio.run(stopped_with_rows_in_hand(pg_url, ids, done, in_hand, ends))

"""The crash rig: real `backfill run` and `backfill sandbox` processes, killed and resumed, then audited."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from backfill.run.crash import CRASH_BOUNDARIES, CRASH_ENV
from backfill.vocab import DONE_STATES, TERMINAL_STATES, State

from .conftest import png_bytes

PARTNER_ID = "085"
API_KEY = "crash-rig-key-7d2f9a"
# Rows the manifest holds on purpose that validation must reject, by the reason expected.
BAD_ROWS = [
    ("bad id!", "2021-01-01", "ok_0.png", "invalid_user_id"),
    ("future_user", "2999-01-01", "ok_0.png", "future_date"),
    ("missing_image", "2021-01-01", "nowhere.png", "image_missing"),
]


@dataclass(frozen=True)
class Chaos:
    """What goes wrong in one rig: sandbox faults, and how the client and sandbox get killed."""

    latency_ms: float = 30.0
    jitter_ms: float = 20.0
    error_rate: float = 0.1
    reset_before_rate: float = 0.05
    reset_after_rate: float = 0.05
    slow_rate: float = 0.03
    slow_ms: float = 1500.0
    timeout_s: float = 0.5
    sandbox_kill_rate: float = 0.2  # chance, per client run, that the sandbox is killed and restarted mid-run
    max_kill_after_s: float = 1.5
    rate: float = 400.0


@dataclass
class Audit:
    runs: int = 0
    kills: int = 0
    boundary_kills: Counter[str] = field(default_factory=Counter)
    sandbox_restarts: int = 0
    requests: int = 0
    sent_after_enrolled: list[str] = field(default_factory=list)
    # IDs the ledger held as id_conflict (terminal: someone else's) that a later run still sent.
    sent_after_conflict: list[str] = field(default_factory=list)
    # Foreign IDs sent by a client run that was then killed: it may have died before hearing or recording the
    # 2209, so the promise lets a resume read that 2209 as ours.
    foreign_sent_in_killed_run: set[str] = field(default_factory=set)
    # Foreign IDs a killed run left SENDING in the ledger: recorded, perhaps not yet on the wire (the
    # after_attempt window), which the ledger must count as "may have reached the server".
    foreign_left_sending_by_kill: set[str] = field(default_factory=set)
    # Per kind of kill, rows a killed run left SENDING with more attempts recorded in that run than the sandbox
    # received from it: recorded, never arrived. A kill between the record and the send (after_attempt) leaves
    # them, as does one that lands while the sandbox is down (the connection refused, the outcome not written).
    recorded_unsent_by_kill: Counter[str] = field(default_factory=Counter)
    foreign_recorded_unsent_by_kill: set[str] = field(default_factory=set)


def _int(value: object) -> int:
    assert isinstance(value, int), value
    return value


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class CrashRig:
    """`foreign`: how many of the `rows` valid manifest IDs another partner user already holds on the sandbox."""

    def __init__(self, folder: Path, rows: int, chaos: Chaos, seed: int, *, foreign: int = 0) -> None:
        self.folder = folder
        self.chaos = chaos
        self.rng = random.Random(seed)
        self.seed = seed
        self.valid_ids = [f"u{i:06d}" for i in range(rows)]
        self.manifest = self._write_manifest()
        # Named like every other ID, so nothing but the ledger's own attempt records can tell them apart.
        self.foreign_ids = frozenset(self.rng.sample(self.valid_ids, foreign)) if foreign else frozenset()
        self.own_ids = [u for u in self.valid_ids if u not in self.foreign_ids]
        self.foreign_file = folder / "foreign-ids.txt"
        self.foreign_file.write_text("".join(f"{u}\n" for u in sorted(self.foreign_ids)))
        self.checkpoint = folder / "checkpoint.sqlite"
        # What runs are told with --checkpoint, when not `checkpoint` itself (a link to it, a relative path); the
        # rig always reads the ledger at `checkpoint`.
        self.checkpoint_name: str | None = None
        self.out = folder / "out"
        self.state_file = folder / "sandbox-state.jsonl"
        self.request_log = folder / "requests.jsonl"
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.sandbox: subprocess.Popen[bytes] | None = None
        self.audit = Audit()
        self.last_output = ""
        self.last_log_start = 0  # where the latest run's requests begin in the request log
        self.last_kill = ""  # how the latest run was killed: a boundary, "random", or "" when it wasn't
        self.env = {
            **os.environ,
            "SMILE_PARTNER_ID": PARTNER_ID,
            "SMILE_API_KEY": API_KEY,
            "BACKFILL_BACKOFF_INITIAL": "0.02",
            "BACKFILL_BACKOFF_MAX": "0.2",
        }
        self.env.pop(CRASH_ENV, None)

    # --- processes ---

    def _write_manifest(self) -> Path:
        images = self.folder / "images"
        images.mkdir(parents=True, exist_ok=True)
        path = self.folder / "manifest.csv"
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["user_id", "user_created_at", "image_path"])
            rows = [(uid, "2021-08-12", f"{uid}.png") for uid in self.valid_ids]
            rows += [(uid, created, image) for uid, created, image, _ in BAD_ROWS]
            self.rng.shuffle(rows)
            for i, (uid, created, image) in enumerate(rows):
                writer.writerow([uid, created, f"images/{image}"])
                if uid in self.valid_ids:
                    (images / image).write_bytes(png_bytes(i))
            (images / "ok_0.png").write_bytes(png_bytes(0))
        return path

    def start_sandbox(self) -> None:
        c = self.chaos
        command = [
            sys.executable,
            "-m",
            "backfill",
            "sandbox",
            "--port",
            str(self.port),
            "--latency-ms",
            str(c.latency_ms),
            "--jitter-ms",
            str(c.jitter_ms),
            "--error-rate",
            str(c.error_rate),
            "--reset-before-rate",
            str(c.reset_before_rate),
            "--reset-after-rate",
            str(c.reset_after_rate),
            "--slow-rate",
            str(c.slow_rate),
            "--slow-ms",
            str(c.slow_ms),
            "--retry-after",
            "0.05",
            "--seed",
            str(self.rng.randrange(1 << 30)),
            "--state-file",
            str(self.state_file),
            "--request-log",
            str(self.request_log),
        ]
        if self.foreign_ids:
            # An explicit set, so every restart's new --seed keeps the same IDs foreign.
            command += ["--foreign-ids", str(self.foreign_file)]
        self.sandbox = subprocess.Popen(
            command, env=self.env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL
        )
        assert self.sandbox.stderr is not None
        line = self.sandbox.stderr.readline().decode()
        assert "sandbox on" in line, f"the sandbox did not start: {line!r}"

    def kill_sandbox(self) -> None:
        if self.sandbox is not None:
            self.sandbox.kill()
            self.sandbox.wait()
            self.sandbox = None

    def run_command(self) -> list[str]:
        return [
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
            self.checkpoint_name or str(self.checkpoint),
            "--out",
            str(self.out),
            "--no-progress",
            "--timeout",
            str(self.chaos.timeout_s),
            "--max-attempts",
            "4",
            "--concurrency",
            "8",
            "--rate",
            str(self.chaos.rate),
            "--fail-threshold",
            "1",
        ]

    # --- one cycle: run, maybe kill, check what was sent ---

    def cycle(
        self,
        *,
        crash_at: str | None = None,
        kill_after: float | None = None,
        signals: Sequence[tuple[float, int]] = (),
        preexec: Callable[[], None] | None = None,
        expect: Collection[int] = (0, 1, 4),  # 4: the breaker stopped a run while the sandbox was down
    ) -> int | None:
        """One `backfill run`; returns its exit code, or None when it was killed."""
        before = self.ledger_rows()
        held = {u for u, row in before.items() if row["state"] in DONE_STATES}
        conflicts = {u for u, row in before.items() if row["state"] == State.ID_CONFLICT}
        log_start = self.request_log.stat().st_size if self.request_log.exists() else 0
        env = dict(self.env)
        if crash_at:
            env[CRASH_ENV] = crash_at
        process = subprocess.Popen(
            self.run_command(),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=self.folder,
            preexec_fn=preexec,
        )
        sending_since: float | None = None  # signals are timed from the first request the sandbox sees
        pending = sorted(signals)
        restart_at = None
        if self.rng.random() < self.chaos.sandbox_kill_rate:
            restart_at = time.monotonic() + self.rng.uniform(0.05, self.chaos.max_kill_after_s)
        deadline = time.monotonic() + kill_after if kill_after is not None else None
        killed = False
        while process.poll() is None:
            now = time.monotonic()
            if restart_at is not None and now >= restart_at:
                self.kill_sandbox()
                self.start_sandbox()
                self.audit.sandbox_restarts += 1
                restart_at = None
            if (
                sending_since is None
                and self.request_log.exists()
                and self.request_log.stat().st_size > log_start
            ):
                sending_since = now
            while pending and sending_since is not None and now - sending_since >= pending[0][0]:
                process.send_signal(pending.pop(0)[1])
            if deadline is not None and now >= deadline:
                process.send_signal(signal.SIGKILL)
                killed = True
                break
            time.sleep(0.01)
        out, err = process.communicate(timeout=120)
        self.last_output = (out + err).decode()
        self.audit.runs += 1
        code = process.returncode
        if code == -signal.SIGKILL:
            killed = True
        self.last_kill = ""
        if killed:
            self.audit.kills += 1
            self.last_kill = crash_at.partition(":")[0] if crash_at else "random"
            if crash_at:
                self.audit.boundary_kills[self.last_kill] += 1
        elif code not in expect:
            raise AssertionError(f"backfill run exited {code}: {err.decode()[-2000:]}")
        self.last_log_start = log_start
        self._check_sends(held, conflicts, log_start, killed=killed, before=before)
        return None if killed else code

    def _check_sends(
        self,
        held: set[str],
        conflicts: set[str],
        log_start: int,
        *,
        killed: bool,
        before: dict[str, dict[str, object]],
    ) -> None:
        sent: set[str] = set()
        for record in self._log_records(log_start):
            if record["event"] != "request":
                continue
            self.audit.requests += 1
            user_id = str(record["user_id"])
            sent.add(user_id)
            if user_id in held:
                self.audit.sent_after_enrolled.append(user_id)
            if user_id in conflicts:
                self.audit.sent_after_conflict.append(user_id)
        if not killed:
            return
        unsent = self.recorded_not_received(before, log_start)
        self.audit.recorded_unsent_by_kill[self.last_kill] += len(unsent)
        if self.foreign_ids:
            audit = self.audit
            audit.foreign_sent_in_killed_run |= sent & self.foreign_ids
            audit.foreign_left_sending_by_kill |= (
                self.states_in_checkpoint({State.SENDING}) & self.foreign_ids
            )
            audit.foreign_recorded_unsent_by_kill |= unsent & self.foreign_ids

    def recorded_not_received(self, before: dict[str, dict[str, object]], log_start: int) -> set[str]:
        """Rows SENDING in the ledger for which the latest run recorded more attempts than the sandbox received
        from it: `before` is the ledger as that run found it, `log_start` where its requests begin in the log."""
        received = self.requests_by_user(log_start)
        found = set()
        for user_id, row in self.ledger_rows().items():
            earlier = before.get(user_id)
            recorded = _int(row["attempts"]) - (_int(earlier["attempts"]) if earlier else 0)
            if row["state"] == State.SENDING and recorded > received[user_id]:
                found.add(user_id)
        return found

    def _log_records(self, start: int = 0) -> list[dict[str, str | bool]]:
        if not self.request_log.exists():
            return []
        with self.request_log.open("rb") as handle:
            handle.seek(start)
            data = handle.read()
        # A line cut short by a sandbox kill belongs to a request whose answer was never sent.
        return [json.loads(line) for line in data.splitlines() if line.endswith(b"}")]

    # --- the whole story ---

    def until_done(self, *, kills: int, max_runs: int = 200) -> dict[str, object]:
        """Kill `kills` runs (at each boundary first, then at random moments), then resume until finished."""
        self.start_sandbox()
        try:
            planned = [f"{b}:{self.rng.randint(1, 6)}" for b in CRASH_BOUNDARIES]
            for i in range(kills):
                if i < len(planned):
                    self.cycle(crash_at=planned[i])
                else:
                    self.cycle(kill_after=self.rng.uniform(0.05, self.chaos.max_kill_after_s))
            return self.resume_until_done(max_runs)
        finally:
            self.kill_sandbox()

    def resume_until_done(self, max_runs: int = 50) -> dict[str, object]:
        """Re-run the same command until a run finishes with every valid row done."""
        for _ in range(max_runs):
            code = self.cycle()
            summary = self.last_summary()
            if code is not None and self._finished(summary):
                return summary
        raise AssertionError(f"not finished after {max_runs} resumes: {self.last_summary()}")

    def _finished(self, summary: dict[str, object]) -> bool:
        counts = summary["counts"]
        assert isinstance(counts, dict)
        ends = {"enrolled", "already_enrolled", "skipped", "rejected"}
        if self.foreign_ids:
            # A foreign ID's right end is id_conflict: a run can finish with some (and exits 1 for them);
            # verify() checks that only foreign IDs are among them.
            ends.add("id_conflict")
        return summary["not_reached"] == 0 and set(counts) <= ends

    def last_summary(self) -> dict[str, object]:
        runs = sorted(self.out.glob("*/summary.json"))
        summary: dict[str, object] = json.loads(runs[-1].read_text())
        return summary

    # --- the audit ---

    def enrolled_in_checkpoint(self) -> set[str]:
        return self.states_in_checkpoint(DONE_STATES)

    def states_in_checkpoint(self, states: Collection[State]) -> set[str]:
        """The IDs the ledger holds in any of `states` (read by a plain sqlite3 reader, as a person would)."""
        return {user_id for user_id, row in self.ledger_rows().items() if row["state"] in states}

    def ledger_rows(self) -> dict[str, dict[str, object]]:
        """Every ledger row as the sqlite `users` table holds it, by user_id."""
        if not self.checkpoint.exists():
            return {}
        conn = self._read_only()
        try:
            conn.row_factory = sqlite3.Row
            try:
                rows = conn.execute("SELECT * FROM users").fetchall()
            except sqlite3.OperationalError:
                return {}  # killed before the schema was made
            return {row["user_id"]: dict(row) for row in rows}
        finally:
            conn.close()

    def _read_only(self) -> sqlite3.Connection:
        """A reader that leaves the files as a crash left them. A read-write connection's close checkpoints the
        WAL into the database and deletes it, so the next run would never meet a killed run's hot WAL."""
        return sqlite3.connect(f"{self.checkpoint.absolute().as_uri()}?mode=ro", uri=True)

    def requests_by_user(self, start: int = 0) -> Counter[str]:
        """How many requests the sandbox received per user_id, from byte `start` of its request log on."""
        return Counter(str(r["user_id"]) for r in self._log_records(start) if r["event"] == "request")

    def foreign_answers_lost(self) -> set[str]:
        """Foreign IDs with a request whose answer the sandbox never wrote, or wrote as a fault (not 2209).

        Faults a foreign ID can meet here: a reset before processing, a 500/502/503, or the sandbox killed
        mid-request; "slow" and "reset_after" only follow an enrollment, which a foreign ID never gets.
        """
        requests: Counter[str] = Counter()
        answers: Counter[str] = Counter()
        faulted = set()
        for r in self._log_records():
            user_id = str(r["user_id"])
            if user_id not in self.foreign_ids:
                continue
            if r["event"] == "request":
                requests[user_id] += 1
            else:
                answers[user_id] += 1
                if r.get("answer") != "2209":
                    faulted.add(user_id)
        return faulted | {u for u, n in requests.items() if n > answers[u]}

    def _check_no_secrets_or_photos(self) -> None:
        """The key and photo bytes never reach anything the tool wrote: outputs, checkpoint, logs."""
        photo_marks = [b"iVBORw0KGgo", b"/9j/"]  # how base64 of a PNG and of a JPEG begin
        for path in self.folder.rglob("*"):
            if not path.is_file() or "images" in path.parts:
                continue
            data = path.read_bytes()
            assert API_KEY.encode() not in data, f"the API key is in {path}"
            assert not any(mark in data for mark in photo_marks), f"photo bytes are in {path}"
        assert API_KEY not in self.last_output

    def verify(self, summary: dict[str, object]) -> dict[str, int]:
        """Every promise of the tool, checked from the sandbox's and the checkpoint's own records."""
        sandbox_lines = [
            json.loads(line) for line in self.state_file.read_text().splitlines() if line.strip()
        ]
        enrolled_counts = Counter(line["user_id"] for line in sandbox_lines)
        duplicates = sum(n - 1 for n in enrolled_counts.values() if n > 1)
        assert duplicates == 0, (
            f"enrolled twice on the sandbox: {[u for u, n in enrolled_counts.items() if n > 1]}"
        )
        enrolled_foreign = sorted(set(enrolled_counts) & self.foreign_ids)
        assert not enrolled_foreign, f"the sandbox enrolled foreign IDs: {enrolled_foreign[:5]}"
        assert set(enrolled_counts) == set(self.own_ids), (
            "the sandbox's enrolled users are not the valid rows"
        )
        assert not self.audit.sent_after_enrolled, (
            f"sent after enrolled: {self.audit.sent_after_enrolled[:5]}"
        )
        assert not self.audit.sent_after_conflict, (
            f"sent after id_conflict: {self.audit.sent_after_conflict[:5]}"
        )

        with contextlib.closing(self._read_only()) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            states = dict(conn.execute("SELECT user_id, state FROM users").fetchall())
            jobs = dict(
                conn.execute("SELECT user_id, smile_job_id FROM users WHERE state = 'enrolled'").fetchall()
            )
        lost = [u for u in self.own_ids if states.get(u) not in DONE_STATES]
        lost += [u for u in self.foreign_ids if states.get(u) not in TERMINAL_STATES]
        assert not lost, f"not enrolled (or, foreign, not settled) in the checkpoint: {lost[:5]}"
        by_user = {line["user_id"]: line["smile_job_id"] for line in sandbox_lines}
        assert all(by_user[u] == job for u, job in jobs.items()), "a checkpoint's job id isn't the sandbox's"
        records = self._log_records()
        flagged = {str(r["user_id"]) for r in records if r.get("foreign")}
        assert flagged <= self.foreign_ids, f"the sandbox flags IDs not made foreign: {sorted(flagged)[:5]}"
        assert all(r.get("foreign") for r in records if r["user_id"] in self.foreign_ids), (
            "a request for a foreign ID was not flagged foreign in the request log"
        )
        conflicted = {
            str(r["user_id"])
            for r in records
            if r.get("answer") == "2209" and r["user_id"] not in self.foreign_ids
        }
        # Every 2209 for one of our own IDs followed an attempt of ours that was recorded, so none may read as
        # someone else's ID.
        assert all(states[u] in DONE_STATES for u in conflicted)
        own_conflicts = [u for u in self.own_ids if states.get(u) == State.ID_CONFLICT]
        assert not own_conflicts, f"our own IDs read as someone else's: {own_conflicts[:5]}"

        # The finished run's outputs cover every manifest line exactly once.
        folder = self.out / str(summary["run_id"])
        with (folder / "results.csv").open() as handle:
            result_rows = list(csv.DictReader(handle))
        results = Counter(row["user_id"] for row in result_rows)
        with (folder / "rejects.csv").open() as handle:
            rejects = Counter(row["user_id"] for row in csv.DictReader(handle))
        assert results == Counter(self.valid_ids), "results.csv does not hold each valid row once"
        assert rejects == Counter(uid for uid, *_ in BAD_ROWS), "rejects.csv does not hold each bad row once"
        foreign = self._verify_foreign(states, {row["user_id"]: row["status"] for row in result_rows})
        self._check_no_secrets_or_photos()
        return {
            "rows": len(self.valid_ids),
            "runs": self.audit.runs,
            "kills": self.audit.kills,
            "sandbox_restarts": self.audit.sandbox_restarts,
            "requests": self.audit.requests,
            "answers_2209": len(conflicted),
            "duplicates": duplicates,
            "lost": len(lost),
            "recorded_unsent_at_kill": sum(self.audit.recorded_unsent_by_kill.values()),
            **foreign,
        }

    def _verify_foreign(self, states: dict[str, str], final: dict[str, str]) -> dict[str, int]:
        """Foreign IDs: never enrolled (checked with the sandbox's enrollments), each someone else's in the
        ledger and the final results, unless an attempt of ours for it may have been lost in transit.

        The promise reads a 2209 as ours only if our own request for it may have reached the server. From the
        sandbox's side that is a request whose answer is missing or a fault; from the client's side, a request
        made by a run that was killed before it could record the answer, or an attempt a killed run recorded
        and left SENDING (it may have been on its way). For every other foreign ID, already_enrolled would
        be a claim on someone else's user.
        """
        if not self.foreign_ids:
            return {}
        lost_per_sandbox = self.foreign_answers_lost()
        audit = self.audit
        may_be_ours = lost_per_sandbox | audit.foreign_sent_in_killed_run | audit.foreign_left_sending_by_kill
        ours = {u for u in self.foreign_ids if states[u] == State.ALREADY_ENROLLED}
        wrongly_ours = sorted(ours - may_be_ours)
        assert not wrongly_ours, (
            f"foreign IDs read as ours though no attempt of ours for them may have been lost: {wrongly_ours[:5]}"
        )
        for user_id in self.foreign_ids:
            # A foreign ID settled as ours in an earlier run is skipped by the final one, like any enrolled ID.
            expected = {"already_enrolled", "skipped"} if user_id in ours else {"id_conflict"}
            assert final[user_id] in expected, (
                f"{user_id}: final status {final[user_id]}, expected {expected}"
            )
        requests = self.requests_by_user()
        return {
            "foreign": len(self.foreign_ids),
            "foreign_requests": sum(requests[u] for u in self.foreign_ids),
            "foreign_id_conflict": len(self.foreign_ids) - len(ours),
            "foreign_already_enrolled": len(ours),
            "foreign_answer_lost_per_sandbox": len(lost_per_sandbox),
            "foreign_sent_in_killed_run": len(audit.foreign_sent_in_killed_run),
            "foreign_left_sending_by_kill": len(audit.foreign_left_sending_by_kill),
            # Read as ours with no lost answer in the sandbox's log: allowed only by a client kill.
            "foreign_ours_by_client_kill_only": len(ours - lost_per_sandbox),
            # ...of which recorded by a killed run and never received: the after_attempt window.
            "foreign_ours_recorded_unsent": len(ours & audit.foreign_recorded_unsent_by_kill),
        }

"""The crash rig: real `backfill run` and `backfill sandbox` processes, killed and resumed, then audited."""

from __future__ import annotations

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
from backfill.vocab import DONE_STATES

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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class CrashRig:
    def __init__(self, folder: Path, rows: int, chaos: Chaos, seed: int) -> None:
        self.folder = folder
        self.chaos = chaos
        self.rng = random.Random(seed)
        self.seed = seed
        self.valid_ids = [f"u{i:06d}" for i in range(rows)]
        self.manifest = self._write_manifest()
        self.checkpoint = folder / "checkpoint.sqlite"
        self.out = folder / "out"
        self.state_file = folder / "sandbox-state.jsonl"
        self.request_log = folder / "requests.jsonl"
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.sandbox: subprocess.Popen[bytes] | None = None
        self.audit = Audit()
        self.last_output = ""
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
            sys.executable, "-m", "backfill", "sandbox", "--port", str(self.port),
            "--latency-ms", str(c.latency_ms), "--jitter-ms", str(c.jitter_ms), "--error-rate", str(c.error_rate),
            "--reset-before-rate", str(c.reset_before_rate), "--reset-after-rate", str(c.reset_after_rate),
            "--slow-rate", str(c.slow_rate), "--slow-ms", str(c.slow_ms), "--retry-after", "0.05",
            "--seed", str(self.rng.randrange(1 << 30)), "--state-file", str(self.state_file),
            "--request-log", str(self.request_log),
        ]  # fmt: skip
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
            sys.executable, "-m", "backfill", "run", str(self.manifest), "--env", "local",
            "--base-url", self.base_url, "--checkpoint", str(self.checkpoint), "--out", str(self.out),
            "--no-progress", "--timeout", str(self.chaos.timeout_s), "--max-attempts", "4",
            "--concurrency", "8", "--rate", str(self.chaos.rate), "--fail-threshold", "1",
        ]  # fmt: skip

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
        held = self.enrolled_in_checkpoint()
        log_start = self.request_log.stat().st_size if self.request_log.exists() else 0
        env = dict(self.env)
        if crash_at:
            env[CRASH_ENV] = crash_at
        process = subprocess.Popen(
            self.run_command(), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=self.folder,
            preexec_fn=preexec,
        )  # fmt: skip
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
        if killed:
            self.audit.kills += 1
            if crash_at:
                self.audit.boundary_kills[crash_at.partition(":")[0]] += 1
        elif code not in expect:
            raise AssertionError(f"backfill run exited {code}: {err.decode()[-2000:]}")
        self._check_sends(held, log_start)
        return None if killed else code

    def _check_sends(self, held: set[str], log_start: int) -> None:
        for record in self._log_records(log_start):
            if record["event"] != "request":
                continue
            self.audit.requests += 1
            if record["user_id"] in held:
                self.audit.sent_after_enrolled.append(record["user_id"])

    def _log_records(self, start: int = 0) -> list[dict[str, str]]:
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
        return summary["not_reached"] == 0 and set(counts) <= {
            "enrolled",
            "already_enrolled",
            "skipped",
            "rejected",
        }

    def last_summary(self) -> dict[str, object]:
        runs = sorted(self.out.glob("*/summary.json"))
        summary: dict[str, object] = json.loads(runs[-1].read_text())
        return summary

    # --- the audit ---

    def enrolled_in_checkpoint(self) -> set[str]:
        if not self.checkpoint.exists():
            return set()
        with sqlite3.connect(self.checkpoint) as conn:
            marks = ",".join("?" * len(DONE_STATES))
            rows = conn.execute(f"SELECT user_id FROM users WHERE state IN ({marks})", tuple(DONE_STATES))
            return {r[0] for r in rows}

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
        assert set(enrolled_counts) == set(self.valid_ids), (
            "the sandbox's enrolled users are not the valid rows"
        )
        assert not self.audit.sent_after_enrolled, (
            f"sent after enrolled: {self.audit.sent_after_enrolled[:5]}"
        )

        with sqlite3.connect(self.checkpoint) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            states = dict(conn.execute("SELECT user_id, state FROM users").fetchall())
            jobs = dict(
                conn.execute("SELECT user_id, smile_job_id FROM users WHERE state = 'enrolled'").fetchall()
            )
        lost = [u for u in self.valid_ids if states.get(u) not in DONE_STATES]
        assert not lost, f"not enrolled in the checkpoint: {lost[:5]}"
        by_user = {line["user_id"]: line["smile_job_id"] for line in sandbox_lines}
        assert all(by_user[u] == job for u, job in jobs.items()), "a checkpoint's job id isn't the sandbox's"
        conflicted = {r["user_id"] for r in self._log_records() if r.get("answer") == "2209"}
        # Every 2209 followed an attempt of ours that was recorded, so none may read as someone else's ID.
        assert all(states[u] in DONE_STATES for u in conflicted)
        assert "id_conflict" not in states.values()

        # The finished run's outputs cover every manifest line exactly once.
        folder = self.out / str(summary["run_id"])
        with (folder / "results.csv").open() as handle:
            results = Counter(row["user_id"] for row in csv.DictReader(handle))
        with (folder / "rejects.csv").open() as handle:
            rejects = Counter(row["user_id"] for row in csv.DictReader(handle))
        assert results == Counter(self.valid_ids), "results.csv does not hold each valid row once"
        assert rejects == Counter(uid for uid, *_ in BAD_ROWS), "rejects.csv does not hold each bad row once"
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
        }

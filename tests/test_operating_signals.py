"""What a run tells its operator: which setting holds it back, what a second Ctrl-C left, and status over time."""

from __future__ import annotations

import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backfill.cli import short_path
from backfill.cli.progress import TqdmProgress
from backfill.cli.watch import CLEAR, Screen, every
from backfill.ledger import RunRecord
from backfill.ledger.sqlite import SqliteStore
from backfill.run.workers import Window, Workers, note, workers_are_the_limit
from backfill.sandbox import Faults

from .conftest import (
    API_KEY,
    PARTNER_ID,
    ThreadedSandboxes,
    request_log,
    simple_rows,
    spawn_sandbox,
    write_manifest,
)
from .test_ledger_contract import BACKENDS, BINDING, open_store
from .test_operate import cli, place, run_flags

# --- 8. when the workers, not the rate, are the limit, the run says so and names --concurrency ---


class Clock:
    """An injected clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_workers_are_the_limit_when_all_are_busy_and_rate_slots_go_unused() -> None:
    clock = Clock()
    workers = Workers(clock)
    for _ in range(8):  # eight slow answers hold all eight workers for the whole window
        workers.started()
    clock.now += 10
    window = workers.window()
    assert window == Window(seconds=10, busy=8, slots=8)
    assert workers_are_the_limit(window, concurrency=8, rate=25)  # 0.8 requests/s of 25 allowed
    assert "raise --concurrency" in note(window, concurrency=8, rate=25)
    # The same busy workers with the rate used up: the rate is the limit, more workers would not help.
    assert not workers_are_the_limit(window, concurrency=8, rate=0.8)


def test_workers_are_not_the_limit_when_some_of_them_idle() -> None:
    clock = Clock()
    workers = Workers(clock)
    workers.started()
    clock.now += 5
    workers.ended()  # one worker (of two) busy half the window: 0.5 busy on average
    clock.now += 5
    window = workers.window()
    assert window == Window(seconds=10, busy=0.5, slots=1)
    assert not workers_are_the_limit(window, concurrency=2, rate=1000)
    # Each window starts afresh: the next one sees the two workers busy from its start.
    workers.started()
    workers.started()
    clock.now += 1
    assert workers_are_the_limit(workers.window(), concurrency=2, rate=1000)
    assert not workers_are_the_limit(Window(seconds=0, busy=0, slots=0), concurrency=1, rate=1)


def test_the_progress_bar_names_the_setting_to_raise_while_workers_are_the_limit() -> None:
    bar = TqdmProgress(enabled=False)
    bar.start(5)
    said = note(Window(seconds=1, busy=8, slots=6), concurrency=8, rate=25)
    bar.limited(said)
    assert bar._postfix["limited_by"] == said and "--concurrency" in said
    bar.limited(None)
    assert "limited_by" not in bar._postfix
    bar.close()


def test_a_run_held_by_one_slow_worker_says_workers_are_the_limit_in_its_log_and_status(
    tmp_path: Path, threaded_sandboxes: ThreadedSandboxes
) -> None:
    # One worker, answers of 1.2 s and 1000 requests/s allowed: every 0.1 s window inside an answer's wait has
    # the worker busy throughout and no slot taken, so the condition holds whatever the machine's speed.
    server = threaded_sandboxes.start(faults=Faults(latency_ms=1200))
    manifest = write_manifest(tmp_path, simple_rows(1))
    log = tmp_path / "run.jsonl"
    code, _, err = cli(
        "run",
        str(manifest),
        *run_flags(tmp_path, server),
        "--concurrency",
        "1",
        "--rate",
        "1000",
        "--log-format",
        "json",
        "--log-file",
        str(log),
        env={"BACKFILL_STATUS_EVERY": "0.1"},
    )
    assert code == 0, err
    progress = [r for line in log.read_text().splitlines() if (r := json.loads(line))["event"] == "progress"]
    limited = [r for r in progress if r["limited_by"] == "workers"]
    assert limited, progress
    assert "workers are the limit" in limited[0]["message"] and "raise --concurrency" in limited[0]["message"]
    run_id = limited[0]["run_id"]
    code, out, _ = cli("status", *place(tmp_path))
    assert code == 0 and f"{run_id}: workers are the limit" in out and "raise --concurrency" in out


@pytest.mark.parametrize("kind", BACKENDS)
async def test_every_ledger_keeps_a_runs_note_for_status(kind: str, tmp_path: Path) -> None:
    store = await open_store(kind, tmp_path)
    try:
        await store.start_run(RunRecord(run_id="r1", started_at="2026-01-01T00:00:00Z", manifest="m.csv"))
        await store.note_run("r1", "workers are the limit")
        await store.flush()
        assert [r.note for r in (await store.status()).runs] == ["workers are the limit"]
        await store.note_run("r1", None)
        await store.flush()
        assert [r.note for r in (await store.status()).runs] == [None]
    finally:
        await store.close()


async def test_a_ledger_from_before_the_note_is_read_as_it_is_and_given_the_column_when_written(
    tmp_path: Path,
) -> None:
    path = tmp_path / "cp.sqlite"
    store = await SqliteStore.open(path, BINDING, writable=True)
    await store.start_run(RunRecord(run_id="r1", started_at="2026-01-01T00:00:00Z", manifest="m.csv"))
    await store.close()
    with sqlite3.connect(path) as conn:
        conn.execute("ALTER TABLE runs DROP COLUMN note")  # as an earlier version left it
    reader = await SqliteStore.open(path, BINDING, writable=False)
    try:
        assert [(r.run_id, r.note) for r in (await reader.status()).runs] == [("r1", None)]
    finally:
        await reader.close()
    writer = await SqliteStore.open(path, BINDING, writable=True)
    try:
        await writer.note_run("r1", "said")
        await writer.flush()
        assert [r.note for r in (await writer.status()).runs] == ["said"]
    finally:
        await writer.close()


# --- 10. a second Ctrl-C says what it left behind and how to resume ---

GENEROUS = 60.0  # seconds: only a hang fails on time


class Lines:
    """A child's stderr, read line by line as it comes, on a thread of its own."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        self._process = process
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._process.stderr is not None
        for text in self._process.stderr:
            self._queue.put(text)
        self._queue.put("")  # the end of stderr: nothing more will come

    def wait_for(self, part: str) -> str:
        deadline = time.monotonic() + GENEROUS
        while time.monotonic() < deadline:
            try:
                text = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if not text:
                break
            self.seen.append(text)
            if part in text:
                return text
        raise AssertionError(f"no line with {part!r} on stderr: {self.seen}")


@pytest.fixture
def slow_sandbox_process(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """`backfill sandbox` as a process, answering after 30 s: a signal always finds the requests in flight."""
    log = tmp_path / "requests.jsonl"
    env = {**os.environ, "SMILE_PARTNER_ID": PARTNER_ID, "SMILE_API_KEY": API_KEY}
    proc, base_url = spawn_sandbox(["--latency-ms", "30000", "--request-log", str(log)], env)
    yield base_url, log
    proc.kill()
    proc.wait()


def test_a_second_ctrl_c_says_what_was_in_flight_where_the_part_files_are_and_how_to_resume(
    tmp_path: Path, slow_sandbox_process: tuple[str, Path]
) -> None:
    base_url, requests = slow_sandbox_process
    manifest = write_manifest(tmp_path, simple_rows(20))
    out = tmp_path / "out"
    env = {**os.environ, "SMILE_PARTNER_ID": PARTNER_ID, "SMILE_API_KEY": API_KEY}
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
            base_url,
            "--checkpoint",
            str(tmp_path / "cp.sqlite"),
            "--out",
            str(out),
            "--concurrency",
            "3",
            "--rate",
            "100",
            "--no-progress",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stderr = Lines(process)
        deadline = time.monotonic() + GENEROUS
        while time.monotonic() < deadline:  # until the sandbox has seen all three requests arrive
            if requests.exists() and sum(r["event"] == "request" for r in request_log(requests)) >= 3:
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        stderr.wait_for("stopping: 3 requests in flight")
        process.send_signal(signal.SIGINT)
        assert process.wait(GENEROUS) == 130
        said = stderr.wait_for("left now:")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    [folder] = out.iterdir()
    parts = sorted(p.name for p in folder.glob(".*.part"))
    assert parts and all(name in said for name in parts) and str(folder) in said
    assert "3 requests in flight, in doubt until a re-run settles them" in said
    assert said.rstrip().endswith("re-run the same command to resume")


# --- 13. status names each run's manifest, and --watch redraws it until Ctrl-C ---


def test_a_long_manifest_path_keeps_its_end_in_whole_folders() -> None:
    assert short_path("exports/users.csv") == "exports/users.csv"
    long = "/srv/backfill/exports/2026/november/partner-085/users-full-export.csv"
    # The last 39 characters start inside "november": the folder cut in half is left out.
    assert short_path(long) == "…/partner-085/users-full-export.csv"
    nameonly = "x" * 60 + ".csv"
    assert short_path(nameonly) == "…" + nameonly[-39:]


def test_status_lists_each_runs_manifest(tmp_path: Path, threaded_sandboxes: ThreadedSandboxes) -> None:
    server = threaded_sandboxes.start()
    folder = tmp_path / "exports" / "a-folder-name-long-enough-to-be-shortened"
    folder.mkdir(parents=True)
    manifest = write_manifest(folder, simple_rows(2))
    code, _, err = cli("run", str(manifest), *run_flags(tmp_path, server))
    assert code == 0, err
    code, out, _ = cli("status", *place(tmp_path))
    header, _, row = out.split("last runs:\n", 1)[1].splitlines()[:3]
    assert code == 0 and header.split() == [
        "run",
        "started",
        "finished",
        "by",
        "api",
        "key",
        "manifest",
        "rows",
        "exit",
    ]
    assert (
        short_path(str(manifest)) in row
        and str(manifest) not in row
        and row.split()[5].endswith("manifest.csv")
    )
    code, out, _ = cli("status", *place(tmp_path), "--json")
    assert json.loads(out)["runs"][0]["manifest"] == str(manifest)  # in full where a program reads it


class Waits:
    """An injected sleep: records what the loop asked to wait, waits not at all."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def test_watch_redraws_every_interval_a_separator_between_reports_off_a_terminal() -> None:
    written: list[str] = []
    drawn = iter(f"report {n}" for n in range(10))
    waits = Waits()
    every(lambda: next(drawn), 2.0, Screen(write=written.append, tty=False), sleep=waits, rounds=3)
    assert waits.calls == [2.0, 2.0]  # between reports, none after the last
    assert written[0] == "report 0"
    assert [w.split("\n")[1] for w in written[1:]] == ["report 1", "report 2"]
    assert all(w.startswith("--- ") for w in written[1:])


def test_watch_clears_a_terminal_before_each_report_and_ends_on_ctrl_c() -> None:
    written: list[str] = []

    def interrupted(seconds: float) -> None:
        if len(written) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the second wait

    with pytest.raises(KeyboardInterrupt):
        every(lambda: "report", 5.0, Screen(write=written.append, tty=True), sleep=interrupted)
    assert len(written) == 2 and all(w.startswith(CLEAR) and w.endswith("\nreport") for w in written)
    assert "every 5s (Ctrl-C to stop)" in written[0]


def test_status_watch_reports_again_until_stopped(
    tmp_path: Path, threaded_sandboxes: ThreadedSandboxes
) -> None:
    server = threaded_sandboxes.start()
    manifest = write_manifest(tmp_path, simple_rows(2))
    assert cli("run", str(manifest), *run_flags(tmp_path, server))[0] == 0
    code, out, err = cli("status", *place(tmp_path), "--watch", "0.01", "--watch-rounds", "2")
    assert code == 0, err
    assert out.count("last runs:") == 2 and out.count("\n--- ") == 1
    # --watch alone takes the default interval; JSON lines stay one parseable object per report.
    code, out, err = cli("status", *place(tmp_path), "--watch", "--json", "--watch-rounds", "1")
    assert code == 0, err
    assert [json.loads(line)["counts"] for line in out.splitlines()] == [{"enrolled": 2}]


def test_the_log_file_and_error_lines_are_scrubbed_like_every_other_output(tmp_path: Path) -> None:
    key = "k3y-abcdefgh"
    folder = tmp_path / "data-k3y-abcdefgh"  # the key turns up in a path (or a user_id, an image path...)
    folder.mkdir()
    manifest = folder / "m.csv"
    manifest.write_text("user_id,user_created_at,image_path\n")
    env = {**os.environ, "SMILE_PARTNER_ID": "000", "SMILE_API_KEY": key}
    log = tmp_path / "log.jsonl"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "backfill",
            "run",
            str(manifest),
            "--env",
            "local",
            "--base-url",
            "http://127.0.0.1:9/v1",
            "--checkpoint",
            str(tmp_path / "l.sqlite"),
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
            "--log-file",
            str(log),
            "--log-format",
            "json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    summary = next((tmp_path / "o").glob("*/summary.json")).read_text()
    assert key not in summary and key not in log.read_text() and key not in done.stderr + done.stdout
    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "backfill",
            "run",
            str(folder / "nope.csv"),
            "--env",
            "local",
            "--base-url",
            "http://127.0.0.1:9/v1",
            "--checkpoint",
            str(tmp_path / "l.sqlite"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert missing.returncode == 2 and key not in missing.stderr and "***" in missing.stderr

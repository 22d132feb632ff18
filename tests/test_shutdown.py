"""Stopping well: signals, a second signal, and local failures (unwritable output, a full disk) mid-run."""

from __future__ import annotations

import json
import resource
import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from .crash_rig import Chaos, CrashRig

# Slow answers and a low rate, so a signal always finds rows in flight and rows not yet sent.
CALM = Chaos(
    latency_ms=300,
    jitter_ms=0,
    error_rate=0,
    reset_before_rate=0,
    reset_after_rate=0,
    slow_rate=0,
    timeout_s=5,
    sandbox_kill_rate=0,
    rate=20,
)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[CrashRig]:
    rig = CrashRig(tmp_path, rows=60, chaos=CALM, seed=5)
    rig.start_sandbox()
    yield rig
    rig.kill_sandbox()


def states(rig: CrashRig) -> dict[str, str]:
    with sqlite3.connect(rig.checkpoint) as conn:
        return dict(conn.execute("SELECT user_id, state FROM users").fetchall())


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_first_signal_finishes_in_flight_rows_writes_outputs_and_resumes(
    rig: CrashRig, signum: int, code: int
) -> None:
    assert rig.cycle(signals=[(1.0, signum)], expect=[code]) == code
    summary = rig.last_summary()
    assert summary["exit_code"] == code and "interrupted" in str(summary["stop_reason"])
    # In-flight requests were answered and recorded: nothing is left in doubt, and some rows were not reached.
    recorded = states(rig)
    assert recorded and "sending" not in recorded.values()
    assert 0 < int(summary["not_reached"]) < 60  # type: ignore[call-overload]
    assert "run the same command again" in rig.last_output
    rig.verify(rig.resume_until_done())


def test_second_signal_leaves_at_once_and_resume_reconciles(rig: CrashRig) -> None:
    # The second signal lands while requests wait on 300 ms answers: those rows stay SENDING.
    code = rig.cycle(signals=[(1.0, signal.SIGTERM), (1.05, signal.SIGTERM)], expect=[143])
    assert code == 143
    assert "sending" in states(rig).values()
    figures = rig.verify(rig.resume_until_done())
    assert figures["answers_2209"] >= 1  # the abandoned requests had enrolled; resume owned them


def test_unwritable_output_folder_stops_before_sending(rig: CrashRig) -> None:
    blocker = rig.folder / "not-a-folder"
    blocker.write_text("")
    rig.out = blocker / "out"
    assert rig.cycle(expect=[2]) == 2
    assert "can't create the output folder" in rig.last_output and "Traceback" not in rig.last_output
    assert rig.audit.requests == 0


def test_full_disk_mid_run_stops_cleanly_and_resume_finishes(rig: CrashRig) -> None:
    def small_disk() -> None:
        # Writes past 96 KB per file fail with EFBIG, as they would on a full disk; the signal that
        # would otherwise kill the process is ignored so the tool sees the error.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (96 * 1024, 96 * 1024))

    code = rig.cycle(preexec=small_disk, expect=[2])
    assert code == 2 and "Traceback" not in rig.last_output
    assert "can no longer be written" in rig.last_output or "can't write" in rig.last_output
    with sqlite3.connect(rig.checkpoint) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert len(states(rig)) < 60  # it did stop part-way
    rig.verify(rig.resume_until_done())


@pytest.mark.parametrize("limit_kb", [8, 24, 40])
def test_a_disk_too_full_to_make_the_ledger_is_a_ledger_error_not_a_crash(
    rig: CrashRig, limit_kb: int
) -> None:
    def tiny_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_kb * 1024, limit_kb * 1024))

    code = rig.cycle(preexec=tiny_disk, expect=[2])
    assert code == 2 and "internal error" not in rig.last_output and "Traceback" not in rig.last_output
    assert "ledger" in rig.last_output


def test_summary_is_json_after_a_clean_stop(rig: CrashRig) -> None:
    rig.cycle(signals=[(1.0, signal.SIGTERM)], expect=[143])
    summary = json.loads(sorted(rig.out.glob("*/summary.json"))[-1].read_text())
    assert summary["counts"] and summary["settings"]["api_key"] != rig.env["SMILE_API_KEY"]

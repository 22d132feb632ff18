"""`backfill status` tells a run that died (SIGKILL) from one still going and from one that finished."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from backfill.ledger.sqlite import acquire_lock, writer_alive
from backfill.run.crash import CRASH_ENV
from backfill.sandbox import Faults

from .conftest import API_KEY, PARTNER_ID, ThreadedSandboxes, simple_rows, write_manifest
from .test_cli import run_cli


def runs_table(out: str) -> list[str]:
    return out.split("last runs:", 1)[1].strip().splitlines()[2:]


def test_a_killed_run_shows_as_died_and_a_finished_one_its_finish_time(
    tmp_path: Path, threaded_sandboxes: ThreadedSandboxes
) -> None:
    # Slower than the crash point's 20 ms: the run dies with answers still on their way.
    server = threaded_sandboxes.start(faults=Faults(latency_ms=300))
    manifest = write_manifest(tmp_path, simple_rows(8))
    checkpoint = tmp_path / "cp.sqlite"
    args = [
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
        str(checkpoint),
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
        "--rate",
        "100",
    ]
    env = {**os.environ, "SMILE_PARTNER_ID": PARTNER_ID, "SMILE_API_KEY": API_KEY, CRASH_ENV: "in_flight:2"}
    killed = subprocess.run(args, env=env, capture_output=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not writer_alive(checkpoint)

    code, out, _ = run_cli("status", "--checkpoint", str(checkpoint), "--env", "local")
    assert code == 0
    [died] = runs_table(out)
    assert " died " in f" {died} " and "(not finished)" not in out

    env.pop(CRASH_ENV)
    assert subprocess.run(args, env=env, capture_output=True, timeout=60).returncode == 0
    code, out, _ = run_cli("status", "--checkpoint", str(checkpoint), "--env", "local", "--json")
    assert code == 0 and '"writer_alive": false' in out
    code, out, _ = run_cli("status", "--checkpoint", str(checkpoint), "--env", "local")
    finished, died = runs_table(out)  # newest first
    assert "died" not in finished and finished.split()[2][:2] == "20"  # a timestamp in the finished column
    assert finished.split()[-1] == "0" and " died " in f" {died} "


def test_the_run_holding_the_lock_shows_as_running(
    tmp_path: Path, threaded_sandboxes: ThreadedSandboxes
) -> None:
    server = threaded_sandboxes.start(faults=Faults(latency_ms=300))
    manifest = write_manifest(tmp_path, simple_rows(4))
    checkpoint = tmp_path / "cp.sqlite"
    args = [
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
        str(checkpoint),
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
    ]
    env = {**os.environ, "SMILE_PARTNER_ID": PARTNER_ID, "SMILE_API_KEY": API_KEY, CRASH_ENV: "in_flight:1"}
    assert subprocess.run(args, env=env, capture_output=True, timeout=60).returncode == -signal.SIGKILL
    lock = acquire_lock(checkpoint)  # as a live run holds it
    try:
        assert writer_alive(checkpoint)
        code, out, _ = run_cli("status", "--checkpoint", str(checkpoint), "--env", "local")
    finally:
        os.close(lock)
    assert code == 0 and "(running)" in runs_table(out)[0]
    assert not writer_alive(checkpoint)

"""The checkpoint on real SQLite on disk: group commits, the in-doubt rule, and partner/env ownership."""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from backfill.errors import CheckpointError, CheckpointLocked
from backfill.ledger.sqlite import Attempt, Outcome, SqliteStore, acquire_lock


def attempt(user_id: str, *, in_doubt: bool = False) -> Attempt:
    return Attempt(user_id, in_doubt, "ab" * 32, f"/img/{user_id}.jpg", 10, 1, "2021-01-01", "t", "run1")


def outcome(user_id: str, state: str, *, in_doubt: bool = False) -> Outcome:
    return Outcome(user_id, state, in_doubt, 200, "0840", "Enroll User", "000001", "job-1", "t2")


async def test_attempt_is_on_disk_when_record_attempt_returns(tmp_path: Path) -> None:
    path = tmp_path / "cp.sqlite"
    store = await SqliteStore.open(path, "085", "sandbox")
    await store.record_attempt(attempt("u1"))
    # A second, independent connection sees it: it was committed, not just queued.
    row = sqlite3.connect(path).execute("SELECT state, attempts FROM users WHERE user_id='u1'").fetchone()
    assert row == ("sending", 1)
    await store.close()


async def test_concurrent_attempts_share_commits(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "cp.sqlite", "085", "sandbox")
    await asyncio.gather(*(store.record_attempt(attempt(f"u{i}")) for i in range(200)))
    known = await store.lookup([f"u{i}" for i in range(200)] + ["nobody"])
    assert len(known) == 200 and all(k.state == "sending" for k in known.values())
    await store.close()


async def test_outcome_and_lookup_round_trip(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "cp.sqlite", "085", "sandbox")
    await store.record_attempt(attempt("u1"))
    store.record_outcome(outcome("u1", "enrolled"))
    await store.flush()
    k = (await store.lookup(["u1"]))["u1"]
    assert (k.state, k.attempts, k.in_doubt, k.result_code, k.image_size) == (
        "enrolled",
        1,
        False,
        "0840",
        10,
    )
    await store.close()


async def test_doubt_is_what_the_runner_says_and_only_grows(tmp_path: Path) -> None:
    path = tmp_path / "cp.sqlite"
    store = await SqliteStore.open(path, "085", "sandbox")
    await store.record_attempt(attempt("lost"))  # crash: no outcome recorded
    await store.record_attempt(attempt("retried"))
    await store.record_attempt(attempt("retried"))  # a second attempt in one run, after a refused one
    await store.close()
    store = await SqliteStore.open(path, "085", "sandbox")
    known = await store.lookup(["lost", "retried"])
    # Left SENDING: the runner reads that as in doubt; the store never invents doubt from the state.
    assert known["lost"].state == "sending" and not known["retried"].in_doubt
    await store.record_attempt(attempt("lost", in_doubt=True))
    await store.record_attempt(attempt("lost", in_doubt=False))
    known = await store.lookup(["lost"])
    assert known["lost"].in_doubt and known["lost"].attempts == 3
    await store.close()


async def test_refuses_another_partner_or_environment(tmp_path: Path) -> None:
    path = tmp_path / "cp.sqlite"
    await (await SqliteStore.open(path, "085", "sandbox")).close()
    for partner, env in (("085", "production"), ("85", "sandbox")):
        with pytest.raises(CheckpointError, match="belongs to partner '085' in 'sandbox'"):
            await SqliteStore.open(path, partner, env)


async def test_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "cp.sqlite"
    path.write_bytes(b"this is not sqlite at all, not even close" * 100)
    with pytest.raises(CheckpointError, match="is it a backfill checkpoint"):
        await SqliteStore.open(path, "085", "sandbox")


async def test_file_is_owner_only_and_integrity_checks(tmp_path: Path) -> None:
    path = tmp_path / "cp.sqlite"
    store = await SqliteStore.open(path, "085", "sandbox")
    await store.record_attempt(attempt("u1"))
    await store.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone() == ("ok",)


async def test_second_writer_is_refused_naming_the_holder(tmp_path: Path) -> None:
    path = tmp_path / "cp.sqlite"
    first = await SqliteStore.open(path, "085", "sandbox")
    with pytest.raises(CheckpointLocked) as info:
        await SqliteStore.open(path, "085", "sandbox")
    message = str(info.value)
    assert f"pid {os.getpid()}" in message and socket.gethostname() in message and info.value.exit_code == 3
    assert "since 20" in message or "started 20" in message  # the holder's start time
    await first.close()
    await (await SqliteStore.open(path, "085", "sandbox")).close()  # released on close


def test_lock_of_a_killed_process_is_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "cp.sqlite"
    code = f"from backfill.ledger.sqlite import acquire_lock; from pathlib import Path; acquire_lock(Path({str(path)!r}))\n"
    code += "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    killed = subprocess.run([sys.executable, "-c", code], check=False)
    assert killed.returncode == -9
    assert "pid" in (tmp_path / "cp.sqlite.lock").read_text()  # the dead holder's note is still there
    os.close(acquire_lock(path))

"""The audit trail: who ran each run, from where, with which tool version and API key, in the ledger and summary.json."""

from __future__ import annotations

import asyncio
import getpass
import json
import socket
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from backfill import __version__, compose
from backfill.api.signing import key_id
from backfill.config import Settings
from backfill.ledger import LedgerStatus, RunRecord
from backfill.sandbox.server import RunningSandbox

from .conftest import API_KEY, PARTNER_ID, cli, simple_rows, write_manifest
from .test_ledger_contract import open_store


async def test_a_run_records_who_ran_it_in_the_ledger_and_its_summary(
    tmp_path: Path, make_settings: Callable[..., Settings], sandbox: RunningSandbox
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(3))
    settings = make_settings(sandbox, operator="jane.doe@bank.example")
    summary = await compose.run(settings, manifest)
    written = (Path(summary.out_dir) / "summary.json").read_text()
    audit = json.loads(written)["audit"]
    assert audit == {
        "operator": "jane.doe@bank.example",
        "host": socket.gethostname(),
        "version": __version__,
        "api_key_id": key_id(API_KEY),
        "partner_id": PARTNER_ID,
        "endpoint": settings.endpoint,
    }
    assert API_KEY not in written and key_id(API_KEY) != key_id(API_KEY + "x")
    (run,) = (await ledger_status(settings)).runs
    assert (run.run_id, run.operator, run.host, run.version, run.api_key_id) == (
        summary.run_id,
        "jane.doe@bank.example",
        socket.gethostname(),
        __version__,
        key_id(API_KEY),
    )
    assert run.manifest_sha256 == summary.manifest_sha256 and run.exit_code == 0 and run.finished_at


def test_the_operator_is_the_os_user_unless_named_and_status_shows_who_ran_what(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(2))
    where = [
        "--env",
        "local",
        "--base-url",
        threaded_sandbox.base_url,
        "--checkpoint",
        str(tmp_path / "cp.sqlite"),
    ]
    code, _, err = cli("run", str(manifest), *where, "--out", str(tmp_path / "out"), "--no-progress")
    assert code == 0, err
    (tmp_path / "more").mkdir()
    more = write_manifest(tmp_path / "more", simple_rows(2, prefix="more_"), first_seed=1000)
    env = {"BACKFILL_OPERATOR": "ops-team"}
    code, _, err = cli("run", str(more), *where, "--out", str(tmp_path / "out"), "--no-progress", env=env)
    assert code == 0, err
    code, out, err = cli("status", *where)
    assert code == 0, err
    assert f"ops-team@{socket.gethostname()}" in out and f"{getpass.getuser()}@{socket.gethostname()}" in out
    assert out.count(key_id(API_KEY)) == 2


async def test_an_older_ledgers_runs_table_gains_the_audit_columns(
    tmp_path: Path, make_settings: Callable[..., Settings], sandbox: RunningSandbox
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(2))
    settings = make_settings(sandbox)
    await compose.run(settings, manifest)
    conn = sqlite3.connect(tmp_path / "checkpoint.sqlite")
    for column in ("operator", "version", "api_key_id"):  # as a ledger made before the audit trail has it
        conn.execute(f"ALTER TABLE runs DROP COLUMN {column}")
    conn.close()
    older = (await ledger_status(settings)).runs[0]
    assert older.operator is None and older.api_key_id is None  # read as it stands, by a reader
    summary = await compose.run(settings, manifest)
    latest = (await ledger_status(settings)).runs[0]
    assert latest.run_id == summary.run_id and latest.api_key_id == key_id(API_KEY)


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_each_ledger_keeps_a_runs_audit_trail(tmp_path: Path, kind: str) -> None:
    store = await open_store(kind, tmp_path)
    record = RunRecord(
        run_id="r1",
        started_at="2026-01-01T00:00:00.000Z",
        manifest="m.csv",
        manifest_sha256="ab" * 32,
        pid=7,
        host="h1",
        operator="jane",
        version="9.9",
        api_key_id="k-0123456789abcdef",
    )
    try:
        await store.start_run(record)
        await store.finish_run("r1", finished_at="2026-01-01T00:01:00.000Z", rows=3, exit_code=0)
        (run,) = (await store.status()).runs
    finally:
        await store.close()
    assert (run.operator, run.version, run.api_key_id, run.host, run.exit_code) == (
        "jane",
        "9.9",
        record.api_key_id,
        "h1",
        0,
    )


async def ledger_status(settings: Settings) -> LedgerStatus:
    store = await compose.open_store(settings, writable=False)
    try:
        return await store.status()
    finally:
        await store.close()


async def test_the_migration_report_shows_who_ran_each_run(
    tmp_path: Path, make_settings: Callable[..., Settings], sandbox: RunningSandbox
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(2))
    settings = make_settings(sandbox, operator="jane.doe@bank.example")
    await compose.run(settings, manifest)
    page = (await asyncio.to_thread(compose.migration_report, settings, tmp_path / "m.html")).read_text()
    assert f"jane.doe@bank.example@{socket.gethostname()}" in page and key_id(API_KEY) in page

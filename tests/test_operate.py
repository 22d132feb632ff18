"""Operating it: status, retry, export, config show, cron-style runs, logs and exit codes, through the CLI."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from backfill.cli import main
from backfill.ledger.sqlite import acquire_lock
from backfill.sandbox import Faults, RunningSandbox

from .conftest import (
    API_KEY,
    MAPPED,
    PARTNER_ID,
    RENAMED,
    ThreadedSandboxes,
    european_export,
    sandbox_ledger,
    simple_rows,
    write_manifest,
)

ENV = {
    "SMILE_PARTNER_ID": PARTNER_ID,
    "SMILE_API_KEY": API_KEY,
    "BACKFILL_BACKOFF_INITIAL": "0.001",
    "BACKFILL_BACKOFF_MAX": "0.01",
}


def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), env={**ENV, **(env or {})}, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def place(tmp_path: Path, server: RunningSandbox | None = None) -> list[str]:
    """The flags every command here shares: one checkpoint, one output folder, the test's sandbox."""
    flags = ["--env", "local", "--checkpoint", str(tmp_path / "cp.sqlite")]
    return flags + (["--base-url", server.base_url] if server is not None else [])


def run_flags(tmp_path: Path, server: RunningSandbox) -> list[str]:
    return [*place(tmp_path, server), "--out", str(tmp_path / "out"), "--no-progress", "--rate", "500"]


def test_rerun_walkthrough_run_fail_fix_retry_status(
    tmp_path: Path, threaded_sandboxes: ThreadedSandboxes
) -> None:
    # user_0001 fails permanently once (the partner fixes it), user_0002 keeps hitting 503 until retries run out.
    server = threaded_sandboxes.start(faults=Faults(script={"user_0001": ["2213"], "user_0002": [503, 503]}))
    manifest = write_manifest(tmp_path, simple_rows(6))
    code, out, _ = cli("run", str(manifest), *run_flags(tmp_path, server), "--max-attempts", "2")
    assert code == 1 and "4 enrolled" in out and "1 failed" in out and "1 retry_exhausted" in out

    code, out, _ = cli("status", *place(tmp_path), "--json")
    status = json.loads(out)
    assert status["counts"] == {"enrolled": 4, "failed": 1, "retry_exhausted": 1}
    assert status["waiting_for_retry"] == 1 and status["oldest_unfinished"]["user_id"] == "user_0002"
    assert status["runs"][0]["exit_code"] == 1 and status["runs"][0]["rows"] == 6

    # The default retry re-sends transient failures only: the permanent one waits to be named.
    code, out, _ = cli("retry", *run_flags(tmp_path, server))
    assert code == 0 and "1 enrolled" in out and server.state.requests["user_0001"] == 1
    code, out, _ = cli("retry", *run_flags(tmp_path, server), "--status", "failed")
    assert code == 0 and "1 enrolled" in out and server.state.requests["user_0001"] == 2

    code, out, _ = cli("status", *place(tmp_path))
    assert code == 0 and "enrolled" in out and "waiting for a retry: 0" in out and "failed" not in out
    assert server.state.enrolled.keys() == {f"user_{i:04d}" for i in range(6)}


def test_retry_refuses_states_that_cannot_be_resent(tmp_path: Path, threaded_sandbox: RunningSandbox) -> None:
    write_manifest(tmp_path, simple_rows(1))
    code, _, err = cli("retry", *run_flags(tmp_path, threaded_sandbox), "--status", "enrolled")
    assert code == 2 and "--status" in err and "can't be retried" in err and "Traceback" not in err


def test_export_is_manifest_shaped_and_feeds_back(
    tmp_path: Path, threaded_sandboxes: ThreadedSandboxes
) -> None:
    server = threaded_sandboxes.start(faults=Faults(script={"user_0003": ["2213"]}))
    manifest = write_manifest(tmp_path, simple_rows(5))
    cli("run", str(manifest), *run_flags(tmp_path, server))
    code, out, _ = cli("export", *place(tmp_path), "--status", "failed")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and [r["user_id"] for r in rows] == ["user_0003"]
    assert (
        list(rows[0])[:3] == ["user_id", "user_created_at", "image_path"] and rows[0]["result_code"] == "2213"
    )
    # Saved to a file, it is a manifest `validate` accepts as it is.
    fixed = tmp_path / "failed.csv"
    code, _, _ = cli("export", *place(tmp_path), "--status", "failed", "--out", str(fixed))
    assert code == 0 and fixed.stat().st_mode & 0o777 == 0o600
    code, out, _ = cli("validate", str(fixed), "--out", str(tmp_path / "v"))
    assert code == 0 and out.startswith("1 valid, 0 rejected")
    code, out, _ = cli("export", *place(tmp_path), "--format", "jsonl")
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 5 and {line["state"] for line in lines} == {"enrolled", "failed"}
    assert API_KEY not in out
    code, _, err = cli("export", *place(tmp_path), "--out", str(fixed))
    assert code == 2 and "never overwrites" in err  # an export is a record: it never overwrites a file


def test_config_show_names_each_source_and_redacts_the_key(tmp_path: Path) -> None:
    config = tmp_path / "backfill.yaml"
    config.write_text("rate: 7\nconcurrency: 3\n")
    code, out, _ = cli(
        "config", "show", "--config", str(config), "--env", "local", env={"BACKFILL_CONCURRENCY": "5"}
    )
    lines = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert code == 0 and API_KEY not in out
    assert "7.0" in lines["rate"] and str(config) in lines["rate"]
    assert "5" in lines["concurrency"] and "BACKFILL_CONCURRENCY" in lines["concurrency"]
    assert "flag --env" in lines["env"] and "***" in lines["api_key"]
    code, out, _ = cli("config", "show", "--json")
    assert json.loads(out)["api_key"]["value"] == "***"


def test_nightly_manifest_sends_only_the_new_users(tmp_path: Path, threaded_sandbox: RunningSandbox) -> None:
    cli("run", str(write_manifest(tmp_path, simple_rows(10))), *run_flags(tmp_path, threaded_sandbox))
    tonight = write_manifest(tmp_path, simple_rows(10) + simple_rows(3, prefix="new_"))
    code, out, _ = cli("run", str(tonight), *run_flags(tmp_path, threaded_sandbox))
    assert code == 0 and "new: 3, skipped (already done): 10, rejected: 0" in out
    assert threaded_sandbox.state.total_requests == 13
    summary = json.loads(sorted((tmp_path / "out").glob("*/summary.json"))[-1].read_text())
    assert summary["new_rows"] == 3 and summary["counts"] == {"enrolled": 3, "skipped": 10}


def test_max_duration_stops_starting_rows_and_resumes(
    tmp_path: Path, threaded_sandboxes: ThreadedSandboxes
) -> None:
    server = threaded_sandboxes.start(faults=Faults(latency_ms=100))
    manifest = write_manifest(tmp_path, simple_rows(40))
    flags = [*run_flags(tmp_path, server), "--rate", "20", "--concurrency", "2"]
    code, out, err = cli("run", str(manifest), *flags, "--max-duration", "0.5")
    assert code == 1 and "--max-duration" in err and "not reached in this run" in out
    assert 0 < len(server.state.enrolled) < 40
    code, out, _ = cli("run", str(manifest), *flags)
    assert code == 0 and len(server.state.enrolled) == 40 and server.state.total_requests == 40


def test_json_log_has_stable_events_one_run_id_and_no_secrets(
    tmp_path: Path, threaded_sandboxes: ThreadedSandboxes
) -> None:
    server = threaded_sandboxes.start(
        faults=Faults(script={"user_0001": [503], "user_0002": [429]}, retry_after_s=0.01)
    )
    manifest = write_manifest(tmp_path, [*simple_rows(4), ("bad id", "2021-01-01", "x.png")])
    log = tmp_path / "run.log"
    code, _, err = cli(
        "run",
        str(manifest),
        *run_flags(tmp_path, server),
        "--log-format",
        "json",
        "--log-file",
        str(log),
        env={"BACKFILL_STATUS_EVERY": "0.01"},
    )
    assert code == 1
    records = [json.loads(line) for line in log.read_text().splitlines()]
    events = [r["event"] for r in records]
    # The run's last event is run_finished; the command's summary of it follows, the log file's last line.
    assert events[0] == "run_started" and events[-2:] == ["run_finished", "run_summary"]
    assert {"row_finished", "retry_scheduled", "rate_lowered"} <= set(events)
    assert len({r["run_id"] for r in records}) == 1 and records[0]["run_id"]
    finished = {r["user_id"]: r["status"] for r in records if r["event"] == "row_finished"}
    assert finished == {f"user_{i:04d}": "enrolled" for i in range(4)}
    text = log.read_text() + err
    assert API_KEY not in text and "iVBORw0KGgo" not in text  # no key, no base64 PNG
    # The terminal (stderr here: not a TTY) gets run-level lines and warnings, as JSON too, not each good row.
    terminal = [json.loads(line)["event"] for line in err.splitlines() if line.startswith("{")]
    assert "run_started" in terminal and "rate_lowered" in terminal and "row_finished" not in terminal
    assert log.stat().st_mode & 0o777 == 0o600


def test_without_a_terminal_a_status_line_replaces_the_bar(
    tmp_path: Path, threaded_sandboxes: ThreadedSandboxes
) -> None:
    server = threaded_sandboxes.start(faults=Faults(latency_ms=50))
    manifest = write_manifest(tmp_path, simple_rows(10))
    flags = [*run_flags(tmp_path, server)]
    flags.remove("--no-progress")
    code, _, err = cli("run", str(manifest), *flags, "--rate", "20", env={"BACKFILL_STATUS_EVERY": "0.1"})
    progress = [line for line in err.splitlines() if " progress " in line]
    assert code == 0 and progress and "rows/s" in progress[0] and "/10 rows" in progress[0]


@pytest.mark.parametrize("case", ["ok", "rejected", "config", "locked", "systemic"])
def test_exit_codes(tmp_path: Path, threaded_sandboxes: ThreadedSandboxes, case: str) -> None:
    faults = Faults(systemic_code="2205") if case == "systemic" else Faults()
    server = threaded_sandboxes.start(faults=faults)
    rows = simple_rows(3) + ([("bad id", "2021-01-01", "x.png")] if case == "rejected" else [])
    manifest = write_manifest(tmp_path, rows)
    flags = run_flags(tmp_path, server) + (["--rate", "-1"] if case == "config" else [])
    lock = acquire_lock(tmp_path / "cp.sqlite") if case == "locked" else None
    code, _, err = cli("run", str(manifest), *flags)
    expected = {"ok": 0, "rejected": 1, "config": 2, "locked": 3, "systemic": 4}[case]
    assert code == expected and "Traceback" not in err
    if lock is not None:
        import os

        os.close(lock)


def test_export_with_mapped_columns_feeds_back_into_run_with_the_same_config(
    tmp_path: Path, threaded_sandboxes: ThreadedSandboxes
) -> None:
    """A partner who maps column names: what `export --status failed` writes, `run` with that config reads."""
    server = threaded_sandboxes.start(faults=Faults(script={"user_0001": ["2213"]}))
    config = tmp_path / "backfill.yaml"
    config.write_text("columns: {user_id: customer_ref, user_created_at: opened_on, image_path: selfie}\n")
    source = write_manifest(tmp_path, simple_rows(3))
    mapped = tmp_path / "mapped.csv"
    mapped.write_text(
        source.read_text().replace("user_id,user_created_at,image_path", "customer_ref,opened_on,selfie", 1)
    )
    code, _, err = cli("run", str(mapped), "--config", str(config), *run_flags(tmp_path, server))
    assert code == 1, err
    fixed = tmp_path / "failed.csv"
    code, _, err = cli(
        "export", "--config", str(config), *place(tmp_path), "--status", "failed", "--out", str(fixed)
    )
    assert code == 0, err
    assert fixed.read_text().splitlines()[0].startswith("customer_ref,opened_on,selfie")
    code, out, err = cli("validate", str(fixed), "--config", str(config), "--out", str(tmp_path / "v"))
    assert code == 0 and out.startswith("1 valid, 0 rejected"), err


def test_a_retry_refused_by_the_lock_leaves_no_record_of_a_send(
    tmp_path: Path, threaded_sandboxes: ThreadedSandboxes
) -> None:
    """retry writes retry-*.csv ("a record of what was re-sent") only once it holds the ledger."""
    server = threaded_sandboxes.start(faults=Faults(script={"user_0000": [503, 503]}))
    manifest = write_manifest(tmp_path, simple_rows(2))
    code, _, _ = cli("run", str(manifest), *run_flags(tmp_path, server), "--max-attempts", "2")
    assert code == 1
    lock = acquire_lock(tmp_path / "cp.sqlite")
    try:
        code, _, err = cli("retry", *run_flags(tmp_path, server))
    finally:
        import os

        os.close(lock)
    assert code == 3 and "in use" in err
    assert not list((tmp_path / "out").glob("retry-*.csv"))


# --- a partner's own manifest format, for run and retry alike --------------------------------------------------


def test_validate_check_and_run_read_a_semicolon_cp1252_export_with_its_own_headers(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    manifest = european_export(tmp_path)
    how = ["--delimiter", ";", "--encoding", "cp1252", *RENAMED]
    code, out, err = cli("validate", str(manifest), *how, "--out", str(tmp_path / "v"))
    assert code == 0 and out.startswith("3 valid, 0 rejected"), err

    code, out, _ = cli("check", str(manifest), *how, *sandbox_ledger(tmp_path, threaded_sandbox))
    assert f"ok       manifest: {manifest}: 3 rows, 3 pass the text rules" in out, out
    assert "problem  photos" not in out

    code, out, err = cli(
        "run",
        str(manifest),
        *how,
        *sandbox_ledger(tmp_path, threaded_sandbox),
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
    )
    assert code == 0 and "3 rows: 3 enrolled" in out, err
    assert threaded_sandbox.state.enrolled.keys() == {"user_0000", "user_0001", "user_0002"}


def test_retry_reads_its_own_manifest_whatever_delimiter_the_partners_files_use(
    tmp_path: Path, threaded_sandboxes: ThreadedSandboxes
) -> None:
    server = threaded_sandboxes.start(faults=Faults(script={"user_0001": [503]}))
    manifest = european_export(tmp_path)
    # As a nightly job would: the partner's format in the environment, for run and retry alike.
    env: dict[str, str | None] = {
        "BACKFILL_DELIMITER": ";",
        "BACKFILL_ENCODING": "cp1252",
        "BACKFILL_COLUMNS": MAPPED,
    }
    where = [*sandbox_ledger(tmp_path, server), "--out", str(tmp_path / "out"), "--no-progress"]
    code, out, err = cli("run", str(manifest), *where, "--max-attempts", "1", env=env)
    assert code == 1 and "1 retry_exhausted" in out, err
    code, out, err = cli("retry", *where, env=env)
    assert code == 0 and "1 enrolled" in out, err
    assert server.state.enrolled.keys() == {"user_0000", "user_0001", "user_0002"}

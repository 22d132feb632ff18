"""The CLI as a user meets it: CliRunner against a real sandbox served from another thread."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import backfill.demo
from backfill.cli import main
from backfill.ledger.sqlite import acquire_lock
from backfill.sandbox import RunningSandbox

from .conftest import API_KEY, CREDENTIALS, PARTNER_ID, cli, enrolled, simple_rows, write_manifest

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data" / "manifest.csv"
ENV = {"SMILE_PARTNER_ID": PARTNER_ID, "SMILE_API_KEY": API_KEY}


def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), env=env if env is not None else ENV, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_validate_sample_data_writes_rejects(tmp_path: Path) -> None:
    code, out, _ = run_cli("validate", str(SAMPLE), "--out", str(tmp_path))
    assert code == 1 and "valid" in out and "rejected" in out
    rejects = next(tmp_path.glob("*-validate/rejects.csv")).read_text().splitlines()
    assert rejects[0] == "line,user_id,reason,message" and len(rejects) > 1


def test_run_against_the_sandbox_then_resume(tmp_path: Path, threaded_sandbox: RunningSandbox) -> None:
    manifest = write_manifest(tmp_path, simple_rows(12))
    args = [
        "run",
        str(manifest),
        "--env",
        "local",
        "--base-url",
        threaded_sandbox.base_url,
        "--checkpoint",
        str(tmp_path / "cp.sqlite"),
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
    ]
    code, out, _ = run_cli(*args)
    assert code == 0 and "12 enrolled" in out
    code, out, _ = run_cli(*args)
    assert code == 0 and "12 skipped" in out
    assert threaded_sandbox.state.total_requests == 12


def test_api_key_appears_in_no_output(tmp_path: Path, threaded_sandbox: RunningSandbox) -> None:
    manifest = write_manifest(tmp_path, [*simple_rows(5), ("bad id", "2021-01-01", "x.png")])
    _, out, err = run_cli(
        "run",
        str(manifest),
        "--env",
        "local",
        "--base-url",
        threaded_sandbox.base_url,
        "--checkpoint",
        str(tmp_path / "cp.sqlite"),
        "--out",
        str(tmp_path / "out"),
    )
    assert API_KEY not in out + err
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "images" not in p.parts]
    assert len(written) >= 4  # checkpoint, results, rejects, summary (and the lock file)
    for path in written:
        assert API_KEY.encode() not in path.read_bytes(), path


def test_config_error_exits_2_naming_the_key_without_traceback(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, simple_rows(1))
    code, _, err = run_cli("run", str(manifest), "--concurrency", "0")
    assert code == 2 and "concurrency (from flag --concurrency)" in err and "Traceback" not in err
    code, _, err = run_cli("run", str(manifest), env={"SMILE_PARTNER_ID": "085", "SMILE_API_KEY": ""})
    assert code == 2 and "SMILE_API_KEY" in err


def test_unreadable_manifest_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "m.csv"
    bad.write_text("id,when,photo\n1,2,3\n")
    code, _, err = run_cli(
        "run",
        str(bad),
        "--env",
        "local",
        "--out",
        str(tmp_path / "o"),
        "--checkpoint",
        str(tmp_path / "cp.sqlite"),
    )
    assert code == 2 and "user_id" in err and "Traceback" not in err


def test_locked_checkpoint_exits_3(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, simple_rows(1))
    lock = acquire_lock(tmp_path / "cp.sqlite")
    try:
        code, _, err = run_cli(
            "run",
            str(manifest),
            "--env",
            "local",
            "--checkpoint",
            str(tmp_path / "cp.sqlite"),
            "--out",
            str(tmp_path / "o"),
        )
    finally:
        os.close(lock)
    assert code == 3 and f"pid {os.getpid()}" in err


def test_demo_runs_the_sample_data(tmp_path: Path) -> None:
    code, out, _ = run_cli("demo", "--no-progress", env={})
    assert code == 0 and "enrolled" in out and "results:" in out
    assert "rejected" in out  # the sample manifest carries bad rows on purpose


def test_demo_reads_the_sample_data_from_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # From any folder: the data ships inside the package (.ci/wheel-check runs it from an installed wheel).
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli("demo", "--no-progress", env={})
    folder = Path(out.split("results: ", 1)[1].split("\n", 1)[0])
    summary = json.loads((folder / "summary.json").read_text())
    demo = Path(backfill.demo.__file__).parent / "manifest.csv"
    assert code == 0 and Path(summary["manifest"]) == demo and not list(tmp_path.iterdir())
    assert summary["manifest_sha256"] == hashlib.sha256(demo.read_bytes()).hexdigest()
    # sample_data/, the README's documented sample, is the same files.
    assert (SAMPLE.resolve() == demo.resolve()) and SAMPLE.read_bytes() == demo.read_bytes()


def test_the_progress_bar_counts_rejects_apart_from_failures() -> None:
    from backfill.cli.progress import TqdmProgress

    bar = TqdmProgress(enabled=False)
    bar.start(5)
    for status in ("rejected", "rejected", "enrolled", "failed", "skipped"):
        bar.advance(status)
    assert (bar._rejected, bar._failures) == (2, 1)
    assert bar._postfix == {"rejected": 2, "failed": 1}
    bar.close()


# --- commands with no ledger, and a reader gone from the pipe -----------------------------------------------


def test_export_with_no_ledger_prints_no_header_before_the_error(tmp_path: Path) -> None:
    code, out, err = cli("export", "--checkpoint", str(tmp_path / "none.sqlite"))
    assert code == 2 and out == "" and "no ledger" in err


def test_status_and_export_create_no_folder_for_a_ledger_that_isnt_there(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "cp.sqlite"
    assert cli("status", "--checkpoint", str(missing))[0] == 2
    assert not missing.parent.exists()


def test_export_into_a_pipe_closed_early_exits_141_quietly(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    where = enrolled(tmp_path, threaded_sandbox, rows=3)
    # As in `backfill export | head -0`: the reader is gone before the first write. Buffered as in cron.
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | CREDENTIALS
    for command in (["export", *where], ["status", *where]):
        child = subprocess.Popen(
            [sys.executable, "-m", "backfill", *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environ,
            cwd=tmp_path,
        )
        assert child.stdout is not None and child.stderr is not None
        child.stdout.close()
        err = child.stderr.read().decode()
        assert child.wait(timeout=60) == 141 and err == "", (command, err)


def test_only_a_reader_gone_from_stdout_counts_as_a_closed_pipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from backfill.cli._common import _stdout_gone

    read_end, write_end = os.pipe()
    with open(write_end, "w") as pipe, (tmp_path / "out.txt").open("w") as file:
        monkeypatch.setattr(sys, "stdout", pipe)
        assert not _stdout_gone()  # a BrokenPipeError from elsewhere is not swallowed
        os.close(read_end)
        assert _stdout_gone()
        monkeypatch.setattr(sys, "stdout", file)
        assert not _stdout_gone()

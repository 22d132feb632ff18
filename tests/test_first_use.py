"""What a new user tripped on: each case through the CLI (or the shell) as that user met it."""

from __future__ import annotations

import csv
import fnmatch
import io
import os
import stat
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from backfill.cli import main
from backfill.config import Settings
from backfill.sandbox import RunningSandbox

from .conftest import API_KEY, PARTNER_ID, simple_rows, write_manifest

REPO = Path(__file__).resolve().parent.parent
ENV = {"SMILE_PARTNER_ID": PARTNER_ID, "SMILE_API_KEY": API_KEY}


def cli(*args: str, env: dict[str, str | None] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), env={**ENV, **(env or {})}, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def sent(tmp_path: Path, server: RunningSandbox, *extra: str, rows: int = 3) -> list[str]:
    """Run `rows` rows through the sandbox into tmp_path/cp.sqlite; the flags that name that ledger."""
    manifest = write_manifest(tmp_path, simple_rows(rows))
    where = ["--env", "local", "--base-url", server.base_url, "--checkpoint", str(tmp_path / "cp.sqlite")]
    code, _, err = cli("run", str(manifest), *where, "--out", str(tmp_path / "out"), "--no-progress", *extra)
    assert code == 0, err
    return where


def private(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) == 0o700


# --- 2. the cron example's alert names the exit code of backfill, not of `test` ------------------------------

# The nightly job in docs/operating.md, after the command: `$?` read once, into a variable, before anything else runs.
CRON_ALERT = 'code=$?; [ "$code" -le 1 ] || mail -s "backfill exit $code" ops@example.com </dev/null'
OLD_CRON_ALERT = 'test $? -le 1 || mail -s "backfill exit $?" ops@example.com </dev/null'


def alert(shell: str, snippet: str, exit_code: int) -> str:
    """What the snippet mails after a backfill that exits `exit_code` (mail replaced by echo)."""
    script = f'mail() {{ echo "mail $*"; }}\nbackfill() {{ return {exit_code}; }}\nbackfill run users.csv\n{snippet}'
    return subprocess.run([shell, "-c", script], capture_output=True, text=True, check=False).stdout.strip()


@pytest.mark.parametrize("shell", ["bash", "sh"])  # cron runs /bin/sh
def test_the_cron_alert_mails_backfills_exit_code(shell: str) -> None:
    assert alert(shell, CRON_ALERT, 4) == "mail -s backfill exit 4 ops@example.com"
    assert alert(shell, CRON_ALERT, 130) == "mail -s backfill exit 130 ops@example.com"
    assert alert(shell, CRON_ALERT, 0) == alert(shell, CRON_ALERT, 1) == ""
    # The old line mailed the exit code of `test` (1), whatever backfill said.
    assert alert(shell, OLD_CRON_ALERT, 4) == "mail -s backfill exit 1 ops@example.com"


# --- 7. an unknown state name is a config error, with the nearest name -------------------------------------


def test_a_misspelt_status_is_exit_2_naming_it_the_valid_ones_and_the_nearest(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    where = sent(tmp_path, threaded_sandbox)
    code, out, err = cli("export", *where, "--status", "faild")
    assert code == 2 and out == "" and "'faild' is not a state (did you mean failed?)" in err
    assert "enrolled, failed, id_conflict" in err and "Traceback" not in err
    code, out, err = cli("retry", *where, "--status", "unknwon,pending", env={"SMILE_API_KEY": None})
    assert code == 2 and "'unknwon' is not a state (did you mean unknown?)" in err  # before the credentials
    assert cli("export", *where, "--status", "")[0] == 2  # naming nothing is not "everything"
    code, out, _ = cli("export", *where, "--status", "enrolled")
    assert code == 0 and len(list(csv.DictReader(io.StringIO(out)))) == 3


def test_export_with_no_ledger_prints_no_header_before_the_error(tmp_path: Path) -> None:
    code, out, err = cli("export", "--checkpoint", str(tmp_path / "none.sqlite"))
    assert code == 2 and out == "" and "no ledger" in err


# --- 8. a dry run needs the credentials it signs with ------------------------------------------------------


def test_a_dry_run_without_credentials_is_refused(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, simple_rows(2))
    code, _, err = cli("run", str(manifest), "--dry-run", "--out", str(tmp_path / "out"),
                       env={"SMILE_PARTNER_ID": None, "SMILE_API_KEY": None})  # fmt: skip
    assert code == 2 and "SMILE_PARTNER_ID" in err and "SMILE_API_KEY" in err and "backfill validate" in err
    assert not (tmp_path / "out").exists()


# --- 12. every path written to gets its missing folders, owner-only ----------------------------------------


def test_a_checkpoint_log_file_and_export_in_new_folders_get_them_owner_only(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(2))
    checkpoint = tmp_path / "state" / "ledgers" / "cp.sqlite"
    log = tmp_path / "logs" / "nightly" / "backfill.jsonl"
    code, _, err = cli("run", str(manifest), "--env", "local", "--base-url", threaded_sandbox.base_url,
                       "--checkpoint", str(checkpoint), "--log-file", str(log), "--out", str(tmp_path / "out"),
                       "--no-progress")  # fmt: skip
    assert code == 0, err
    assert checkpoint.is_file() and private(checkpoint.parent) and private(checkpoint.parent.parent)
    assert log.is_file() and private(log.parent) and private(log.parent.parent)
    out = tmp_path / "exports" / "2026" / "all.csv"
    code, _, err = cli("export", "--env", "local", "--checkpoint", str(checkpoint), "--out", str(out))
    assert code == 0 and out.is_file() and private(out.parent) and private(out.parent.parent), err


def test_the_default_ledger_folder_is_made_owner_only(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(1))
    data = tmp_path / "xdg"
    code, _, err = cli("run", str(manifest), "--env", "local", "--base-url", threaded_sandbox.base_url,
                       "--out", str(tmp_path / "out"), "--no-progress", env={"XDG_DATA_HOME": str(data)})  # fmt: skip
    assert code == 0, err
    ledgers = data / "backfill" / "ledgers"
    assert [p.suffix for p in ledgers.glob("*.sqlite")] == [".sqlite"]
    assert private(ledgers) and private(ledgers.parent)


def test_status_and_export_create_no_folder_for_a_ledger_that_isnt_there(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "cp.sqlite"
    assert cli("status", "--checkpoint", str(missing))[0] == 2
    assert not missing.parent.exists()


# --- 13. an unknown BACKFILL_* variable is said, not silently ignored --------------------------------------


def test_an_unknown_backfill_variable_warns_on_stderr(tmp_path: Path) -> None:
    code, out, err = cli(
        "config", "show", env={"BACKFILL_RAET": "20", "BACKFILL_TEST_CRASH_AT": "in_flight:3"}
    )
    assert code == 0 and "BACKFILL_RAET" not in out
    assert err.splitlines() == [
        "backfill: warning: environment BACKFILL_RAET is not a setting and was ignored (did you mean BACKFILL_RATE?)"
    ]
    # Said even when the settings then fail: the typo may be why.
    code, _, err = cli(
        "run", str(tmp_path / "m.csv"), env={"SMILE_PARTNER_ID": None, "BACKFILL_PARTNERID": "085"}
    )
    assert code == 2 and "did you mean BACKFILL_PARTNER_ID?" in err and "no partner ID" in err


# --- 14. a closed pipe, the defaults in --help ---------------------------------------------------------------


def test_export_into_a_pipe_closed_early_exits_141_quietly(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    where = sent(tmp_path, threaded_sandbox)
    # As in `backfill export | head -0`: the reader is gone before the first write. Buffered as in cron.
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | ENV
    for command in (["export", *where], ["status", *where]):
        child = subprocess.Popen([sys.executable, "-m", "backfill", *command], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, env=environ, cwd=tmp_path)  # fmt: skip
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


def test_run_help_shows_the_real_defaults_without_setting_them() -> None:
    defaults = {f.name: f.default for f in fields(Settings)}
    help_text = " ".join(CliRunner().invoke(main, ["run", "--help"]).stdout.split())
    command = main.commands["run"]
    context = click.Context(command)
    for key in ["concurrency", "rate", "max_attempts", "timeout", "fail_threshold", "out", "env", "log_level",
                "log_format"]:  # fmt: skip
        option = next(p for p in command.params if p.name == key and isinstance(p, click.Option))
        record = option.get_help_record(context)
        assert record is not None and f"[default: ({defaults[key]})]" in record[1], key
        assert " ".join(record[1].split()) in help_text
    # Shown, not set: a flag left out must reach the settings as None, or it would override YAML and BACKFILL_*.
    given = command.make_context("run", ["users.csv"]).params
    assert {k: v for k, v in given.items() if k in defaults and v is not None} == {}


# --- 15. the local rehearsal leaves nothing untracked -------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "backfill-000-local.sqlite",
        "backfill-000-local.sqlite.lock",
        "cp.sqlite-wal",
        ".results.csv.1a2b3c4d.part",
    ],
)
def test_what_a_rehearsal_leaves_in_the_repository_is_ignored(name: str) -> None:
    patterns = [p for p in (REPO / ".gitignore").read_text().splitlines() if p and not p.startswith("#")]
    assert any(fnmatch.fnmatchcase(name, p) for p in patterns), name


# --- 20. settings that contradict each other ----------------------------------------------------------------


def test_production_with_the_sandbox_url_stops_before_anything_is_sent(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, simple_rows(1))
    config = tmp_path / "backfill.yaml"
    config.write_text("base_url: https://testapi.smileidentity.com/v1\n")
    code, _, err = cli("run", str(manifest), "--config", str(config), "--env", "production",
                       "--out", str(tmp_path / "out"))  # fmt: skip
    assert code == 2 and "base_url (from config file" in err and "env is production (from flag --env)" in err
    assert not (tmp_path / "out").exists()

"""The files a run writes and the commands that write them again: their rows, spellings, folders and modes."""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import stat
from pathlib import Path

import pytest

from backfill.outputs.files import RunOutput
from backfill.run.records import ResultRow
from backfill.sandbox import RunningSandbox
from backfill.vocab import Status

from .conftest import cli, enrolled, sandbox_ledger, simple_rows, write_manifest

REPO = Path(__file__).resolve().parent.parent


def private(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) == 0o700


def test_a_checkpoint_log_file_and_export_in_new_folders_get_them_owner_only(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(2))
    checkpoint = tmp_path / "state" / "ledgers" / "cp.sqlite"
    log = tmp_path / "logs" / "nightly" / "backfill.jsonl"
    code, _, err = cli(
        "run",
        str(manifest),
        "--env",
        "local",
        "--base-url",
        threaded_sandbox.base_url,
        "--checkpoint",
        str(checkpoint),
        "--log-file",
        str(log),
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
    )
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
    code, _, err = cli(
        "run",
        str(manifest),
        "--env",
        "local",
        "--base-url",
        threaded_sandbox.base_url,
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
        env={"XDG_DATA_HOME": str(data)},
    )
    assert code == 0, err
    ledgers = data / "backfill" / "ledgers"
    assert [p.suffix for p in ledgers.glob("*.sqlite")] == [".sqlite"]
    assert private(ledgers) and private(ledgers.parent)


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


def results_of(out: Path) -> list[dict[str, str]]:
    (path,) = sorted(out.rglob("results.csv"))[-1:]
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_skipped_rows_carry_the_ledgers_job_ids_and_a_message_that_reads(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(3))
    first_out, again_out = tmp_path / "out1", tmp_path / "out2"
    code, _, err = cli(
        "run",
        str(manifest),
        *sandbox_ledger(tmp_path, threaded_sandbox),
        "--out",
        str(first_out),
        "--no-progress",
    )
    assert code == 0, err
    first_run = {r["user_id"]: r for r in results_of(first_out)}
    assert all(r["smile_job_id"] and r["job_id"] for r in first_run.values()), first_run
    # One photo gone since: the row is settled from the ledger by another path (nothing needs the photo).
    (tmp_path / "images" / "user_0002.png").unlink()
    code, _, err = cli(
        "run",
        str(manifest),
        *sandbox_ledger(tmp_path, threaded_sandbox),
        "--out",
        str(again_out),
        "--no-progress",
    )
    assert code == 0, err
    again = results_of(again_out)
    assert {r["status"] for r in again} == {"skipped"} and len(again) == 3
    for row in again:
        first = first_run[row["user_id"]]
        assert (row["smile_job_id"], row["job_id"], row["result_code"]) == (
            first["smile_job_id"],
            first["job_id"],
            first["result_code"],
        ), row
        assert "already already" not in row["error"] and "enrolled earlier" in row["error"], row


@pytest.mark.parametrize(
    ("user_id", "smile_job_id", "job_id"),
    [("u1", "0000000001", "job-1"), ("u,2", "", ""), ('u"3', "a,b", 'c"d'), ("u4", "x\ny", "")],
)
def test_a_skipped_row_is_written_as_a_result_row_would_be(
    tmp_path: Path, user_id: str, smile_job_id: str, job_id: str
) -> None:
    """The fast writer for skipped rows formats most fields once per batch: its lines must be the csv writer's."""
    fast, plain = RunOutput(tmp_path / "fast"), RunOutput(tmp_path / "plain")
    at = "2026-12-07T00:00:00.000Z"
    fast.skipped([(user_id, "0840", smile_job_id, job_id, "enrolled earlier, said, with a comma")], at)
    plain.result(
        ResultRow(
            user_id=user_id,
            status=Status.SKIPPED,
            result_code="0840",
            smile_job_id=smile_job_id,
            job_id=job_id,
            error="enrolled earlier, said, with a comma",
            finished_at=at,
        )
    )
    for out in (fast, plain):
        out.close_incomplete()
    lines = [(out.dir / "results.csv").read_bytes() for out in (fast, plain)]
    assert lines[0] == lines[1]
    assert next(csv.DictReader(io.StringIO(lines[0].decode())))["job_id"] == job_id


def test_booleans_are_lower_case_in_results_and_export_and_json_in_jsonl(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    where = enrolled(tmp_path, threaded_sandbox)
    (results,) = (tmp_path / "out").glob("*/results.csv")
    with results.open(newline="") as handle:
        assert {row["signature_ok"] for row in csv.DictReader(handle)} == {"true"}

    code, out, _ = cli("export", *where)
    exported = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and len(exported) == 2 and {row["in_doubt"] for row in exported} == {"false"}
    code, out, _ = cli("export", *where, "--format", "jsonl")
    assert {json.loads(line)["in_doubt"] for line in out.splitlines()} == {False}


def test_report_rewrites_its_own_report_html_but_not_a_users_file(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    enrolled(tmp_path, threaded_sandbox)
    (run_dir,) = (tmp_path / "out").iterdir()
    report = run_dir / "report.html"
    assert report.is_file()
    report.write_text(report.read_text(encoding="utf-8") + "<!-- an older rendering -->", encoding="utf-8")
    code, out, err = cli("report", str(run_dir))
    assert code == 0 and out.strip() == str(report), err
    # Rendered again, without --overwrite.
    assert "an older rendering" not in report.read_text(encoding="utf-8")

    mine = "<html><body>my own notes on this run</body></html>"
    report.write_text(mine, encoding="utf-8")
    code, _, err = cli("report", str(run_dir))
    assert code == 2 and "--overwrite" in err and "Traceback" not in err
    assert report.read_text(encoding="utf-8") == mine
    assert cli("report", str(run_dir), "--overwrite")[0] == 0
    assert "my own notes" not in report.read_text(encoding="utf-8")


def test_the_migration_report_rewrites_its_own_output_but_not_a_users_file(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    where = enrolled(tmp_path, threaded_sandbox)
    chosen = tmp_path / "signed" / "migration.html"
    assert cli("report", *where, "--output", str(chosen))[0] == 0
    code, out, err = cli("report", *where, "--output", str(chosen))
    assert code == 0 and out.strip() == str(chosen), err

    theirs = tmp_path / "notes.html"
    theirs.write_text("<html>the auditor's notes</html>", encoding="utf-8")
    code, _, err = cli("report", *where, "--output", str(theirs))
    assert code == 2 and "--overwrite" in err and theirs.read_text() == "<html>the auditor's notes</html>"
    # A run's report.html is not a migration report either: one kind never silently replaces the other.
    (run_dir,) = (tmp_path / "out").iterdir()
    code, _, err = cli("report", *where, "--output", str(run_dir / "report.html"))
    assert code == 2 and "--overwrite" in err

"""What a careful first-time user hit (second trial): each case through the CLI as that user met it."""

from __future__ import annotations

import csv
import io
import json
import socket
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from backfill import compose
from backfill.cli import main
from backfill.config import Settings
from backfill.outputs.files import RunOutput
from backfill.run.records import ResultRow
from backfill.sandbox import Faults, RunningSandbox, start_sandbox
from backfill.vocab import Status

from .conftest import API_KEY, PARTNER_ID, ThreadedSandboxes, png_bytes, simple_rows, write_manifest

ENV = {"SMILE_PARTNER_ID": PARTNER_ID, "SMILE_API_KEY": API_KEY}


def cli(*args: str, env: dict[str, str | None] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), env={**ENV, **(env or {})}, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def shown(out: str) -> dict[str, str]:
    """`config show`'s table as {setting: its whole line}."""
    return {line.split()[0]: line for line in out.splitlines()[2:]}


def ledger(tmp_path: Path, server: RunningSandbox) -> list[str]:
    """The flags that name the test's sandbox and a ledger of its own."""
    return ["--env", "local", "--base-url", server.base_url, "--checkpoint", str(tmp_path / "cp.sqlite")]


def enrolled(tmp_path: Path, server: RunningSandbox, rows: int = 2) -> list[str]:
    """`rows` rows run through the sandbox into tmp_path/out, every one enrolled: the flags that name the ledger."""
    manifest = write_manifest(tmp_path, simple_rows(rows))
    where = ledger(tmp_path, server)
    code, _, err = cli("run", str(manifest), *where, "--out", str(tmp_path / "out"), "--no-progress")
    assert code == 0, err
    return where


# --- 5. a skipped row says what the ledger knows of it, in words that read ----------------------------------


def results_of(out: Path) -> list[dict[str, str]]:
    (path,) = sorted(out.rglob("results.csv"))[-1:]
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_skipped_rows_carry_the_ledgers_job_ids_and_a_message_that_reads(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(3))
    first_out, again_out = tmp_path / "out1", tmp_path / "out2"
    code, _, err = cli("run", str(manifest), *ledger(tmp_path, threaded_sandbox), "--out", str(first_out),
                       "--no-progress")  # fmt: skip
    assert code == 0, err
    enrolled = {r["user_id"]: r for r in results_of(first_out)}
    assert all(r["smile_job_id"] and r["job_id"] for r in enrolled.values()), enrolled
    # One photo gone since: the row is settled from the ledger by another path (nothing needs the photo).
    (tmp_path / "images" / "user_0002.png").unlink()
    code, _, err = cli("run", str(manifest), *ledger(tmp_path, threaded_sandbox), "--out", str(again_out),
                       "--no-progress")  # fmt: skip
    assert code == 0, err
    again = results_of(again_out)
    assert {r["status"] for r in again} == {"skipped"} and len(again) == 3
    for row in again:
        first = enrolled[row["user_id"]]
        assert (row["smile_job_id"], row["job_id"], row["result_code"]) == (
            first["smile_job_id"], first["job_id"], first["result_code"]
        ), row  # fmt: skip
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
    plain.result(ResultRow(user_id=user_id, status=Status.SKIPPED, result_code="0840", smile_job_id=smile_job_id,
                           job_id=job_id, error="enrolled earlier, said, with a comma", finished_at=at))  # fmt: skip
    for out in (fast, plain):
        out.close_incomplete()
    lines = [(out.dir / "results.csv").read_bytes() for out in (fast, plain)]
    assert lines[0] == lines[1]
    assert next(csv.DictReader(io.StringIO(lines[0].decode())))["job_id"] == job_id


# --- 6. config show names the ledger a run would use ----------------------------------------------------------


def test_config_show_names_the_ledger_the_run_used_and_says_it_is_derived(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    env: dict[str, str | None] = {"XDG_DATA_HOME": str(tmp_path / "data"),
                                  "BACKFILL_BASE_URL": threaded_sandbox.base_url}  # fmt: skip
    manifest = write_manifest(tmp_path, simple_rows(2))
    code, _, err = cli("run", str(manifest), "--env", "local", "--out", str(tmp_path / "out"), "--no-progress",
                       env=env)  # fmt: skip
    assert code == 0, err
    code, out, _ = cli("status", "--env", "local", env=env)
    used = out.splitlines()[0].split()[1]  # "ledger PATH (partner ..., endpoint)"
    assert code == 0 and Path(used).is_file()

    code, out, _ = cli("config", "show", "--env", "local", env=env)
    row = shown(out)["ledger"]
    assert code == 0 and "null" not in row
    assert row.split()[1] == used and "partner_id and base_url" in row
    code, out, _ = cli("config", "show", "--env", "local", "--json", env=env)
    assert json.loads(out)["ledger"]["value"] == used

    # One that is named is shown as named, with where it was named, under its old name too.
    for variable in ("BACKFILL_LEDGER", "BACKFILL_CHECKPOINT"):
        code, out, _ = cli("config", "show", env={variable: str(tmp_path / "cp.sqlite")})
        row = shown(out)["ledger"]
        assert str(tmp_path / "cp.sqlite") in row and f"environment {variable}" in row


def test_config_show_without_a_partner_id_says_the_ledger_cannot_be_derived() -> None:
    code, out, _ = cli("config", "show", env={"SMILE_PARTNER_ID": None})
    row = shown(out)["ledger"]
    assert code == 0 and "null" not in row and "nopartner" not in row
    assert "no partner ID" in row and "SMILE_PARTNER_ID" in row
    code, out, _ = cli("config", "show", "--json", env={"SMILE_PARTNER_ID": None})
    assert "no partner ID" in json.loads(out)["ledger"]["source"]


# --- 7. one spelling of true and false in every CSV the tool writes ------------------------------------------


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


# --- 11. regenerating the tool's own report needs no --overwrite; someone else's file still does ------------


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


# --- 12. --metrics-addr :PORT listens on every interface, as Prometheus exporters do -------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", 0))
        return int(probe.getsockname()[1])


def test_metrics_addr_with_no_host_is_accepted_by_run_and_config_show(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(2))
    port = free_port()
    code, _, err = cli("run", str(manifest), *ledger(tmp_path, threaded_sandbox), "--out", str(tmp_path / "out"),
                       "--no-progress", "--metrics-addr", f":{port}")  # fmt: skip
    assert code == 0 and "config error" not in err, err
    code, out, _ = cli("config", "show", env={"BACKFILL_METRICS_ADDR": f":{port}"})
    row = shown(out)["metrics_addr"]
    assert code == 0 and f":{port}" in row and "environment BACKFILL_METRICS_ADDR" in row
    # The other forms still are what they were.
    for addr in (f"127.0.0.1:{port}", f"[::1]:{port}", f"0.0.0.0:{port}"):
        code, out, _ = cli("config", "show", env={"BACKFILL_METRICS_ADDR": addr})
        assert code == 0 and addr in shown(out)["metrics_addr"]


@pytest.mark.parametrize("bad", [":", ":0", ":http", ":70000", "9464"])
def test_a_bad_metrics_addr_still_names_the_key_its_source_and_the_fix(tmp_path: Path, bad: str) -> None:
    manifest = write_manifest(tmp_path, simple_rows(1))
    code, _, err = cli("run", str(manifest), "--metrics-addr", bad, "--out", str(tmp_path / "out"))
    assert code == 2 and "metrics_addr (from flag --metrics-addr)" in err and "Fix:" in err, err
    assert ":PORT for every interface (:9464)" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


class ScrapeThrough:
    """A progress object that scrapes `url` when the first row settles, while the run's listener is up."""

    def __init__(self, url: str) -> None:
        self.url, self.text = url, ""

    def start(self, total: int) -> None:
        pass

    def advance(self, status: str) -> None:
        if not self.text:
            with urllib.request.urlopen(self.url, timeout=5) as answer:
                self.text = answer.read().decode()


async def test_metrics_on_no_host_answer_on_an_address_other_than_localhost(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(2))
    port = free_port()
    # 127.0.0.2 is this machine too, but only a listener on every interface (not 127.0.0.1 alone) answers it.
    scrape = ScrapeThrough(f"http://127.0.0.2:{port}/metrics")
    async with await start_sandbox(PARTNER_ID, API_KEY) as server:
        summary = await compose.run(make_settings(server, metrics_addr=f":{port}"), manifest, progress=scrape)
    assert summary.counts == {"enrolled": 2} and "backfill_rows_total" in scrape.text


# --- 14. the manifest's delimiter, encoding and column names on the command line -----------------------------

MAPPED = "user_id=customer_ref,user_created_at=signup,image_path=selfie"
RENAMED = tuple(arg for pair in MAPPED.split(",") for arg in ("--column", pair))


def european_export(folder: Path, rows: int = 3) -> Path:
    """A spreadsheet's export as many European installs write it: semicolons, Windows-1252, its own headers,
    and photo names with accents (so only the right encoding finds the files)."""
    (folder / "images").mkdir(exist_ok=True)
    lines = ["customer_ref;signup;selfie"]
    for i in range(rows):
        name = f"josé_{i}.png"
        (folder / "images" / name).write_bytes(png_bytes(i))
        lines.append(f"user_{i:04d};2021-08-12;images/{name}")
    path = folder / "export.csv"
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode("cp1252"))
    return path


def test_validate_check_and_run_read_a_semicolon_cp1252_export_with_its_own_headers(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    manifest = european_export(tmp_path)
    how = ["--delimiter", ";", "--encoding", "cp1252", *RENAMED]
    code, out, err = cli("validate", str(manifest), *how, "--out", str(tmp_path / "v"))
    assert code == 0 and out.startswith("3 valid, 0 rejected"), err

    code, out, _ = cli("check", str(manifest), *how, *ledger(tmp_path, threaded_sandbox))
    assert f"ok       manifest: {manifest}: 3 rows, 3 pass the text rules" in out, out
    assert "problem  photos" not in out

    code, out, err = cli("run", str(manifest), *how, *ledger(tmp_path, threaded_sandbox), "--out",
                         str(tmp_path / "out"), "--no-progress")  # fmt: skip
    assert code == 0 and "3 rows: 3 enrolled" in out, err
    assert threaded_sandbox.state.enrolled.keys() == {"user_0000", "user_0001", "user_0002"}


def test_the_manifest_settings_take_yaml_then_environment_then_flags_and_say_where_each_came_from(
    tmp_path: Path,
) -> None:
    manifest = european_export(tmp_path)
    config = tmp_path / "backfill.yaml"
    config.write_text('delimiter: "|"\nencoding: latin-1\ncolumns: {user_id: customer_ref, image_path: x}\n')
    env: dict[str, str | None] = {"BACKFILL_ENCODING": "cp1252", "BACKFILL_COLUMNS": "image_path=selfie"}
    code, out, err = cli("config", "show", "--config", str(config), env=env)
    rows = shown(out)
    assert code == 0 and err == ""  # BACKFILL_COLUMNS is a setting: no "not a setting" warning
    assert rows["delimiter"].split()[1] == "|" and f"config file {config}" in rows["delimiter"]
    assert rows["encoding"].split()[1] == "cp1252" and "environment BACKFILL_ENCODING" in rows["encoding"]
    assert '"user_id": "customer_ref"' in rows["columns"] and '"image_path": "selfie"' in rows["columns"]
    mixed = f"user_id from config file {config}; image_path from environment BACKFILL_COLUMNS"
    assert mixed in rows["columns"]
    code, out, _ = cli("config", "show", "--config", str(config), "--json", env=env)
    assert json.loads(out)["delimiter"] == {"value": "|", "source": f"config file {config}"}

    # The file is semicolon-separated and calls its date column `signup`: only the flags make it readable.
    v = ["--out", str(tmp_path / "v")]
    code, _, err = cli("validate", str(manifest), "--config", str(config), *v, env=env)
    assert code == 2 and "--delimiter ';'" in err  # the mistake is named, with the flag that fixes it
    flags = ["--delimiter", ";", "--column", "user_created_at=signup"]
    code, out, err = cli("validate", str(manifest), "--config", str(config), *flags, *v, env=env)
    assert code == 0 and out.startswith("3 valid, 0 rejected"), err
    # A flag beats the environment, role by role.
    env["BACKFILL_COLUMNS"] = "image_path=x,user_created_at=signup"
    code, out, err = cli("validate", str(manifest), "--config", str(config), *flags, "--column", "image_path=selfie",
                         *v, env=env)  # fmt: skip
    assert code == 0 and out.startswith("3 valid, 0 rejected"), err


@pytest.mark.parametrize(
    ("flag", "problem", "fix"),
    [
        (["--column", "customer_ref"], "columns (from flag --column): 'customer_ref' is not ROLE=NAME",
         "Fix: write it as --column user_id=customer_ref"),
        (["--column", "userid=customer_ref"],
         "columns (from flag --column): 'userid' is not a column role (did you mean user_id?)",
         "use only user_id, user_created_at, image_path, e.g. --column user_id=customer_ref"),
        (["--column", "user_id="], "columns.user_id (from flag --column): '' is not a column name",
         "e.g. --column user_id=customer_ref"),
        (["--column", "user_id=a", "--column", "image_path=a"],
         "columns (from flag --column): user_id and image_path both map to the column 'a'", "its own column"),
        (["--delimiter", ";;"], "delimiter (from flag --delimiter): ';;' is not one ASCII character", "or tab"),
        (["--delimiter", "§"], "delimiter (from flag --delimiter): '§' is not one ASCII character", "or tab"),
        (["--encoding", "klingon"], "encoding (from flag --encoding): 'klingon' is not a text encoding", "cp1252"),
    ],
)  # fmt: skip
def test_a_bad_manifest_flag_is_a_config_error_naming_the_flag_and_the_fix(
    tmp_path: Path, flag: list[str], problem: str, fix: str
) -> None:
    manifest = european_export(tmp_path)
    for command in ("validate", "run"):
        code, out, err = cli(command, str(manifest), *flag, "--out", str(tmp_path / "out"))
        assert code == 2 and out == "" and problem in err and fix in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
    code, out, _ = cli("check", str(manifest), *flag)
    assert code == 2 and f"problem  settings: {problem}" in out


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
    where = [*ledger(tmp_path, server), "--out", str(tmp_path / "out"), "--no-progress"]
    code, out, err = cli("run", str(manifest), *where, "--max-attempts", "1", env=env)
    assert code == 1 and "1 retry_exhausted" in out, err
    code, out, err = cli("retry", *where, env=env)
    assert code == 0 and "1 enrolled" in out, err
    assert server.state.enrolled.keys() == {"user_0000", "user_0001", "user_0002"}

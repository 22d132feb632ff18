"""`backfill check` says every credential problem at once, and a production run from a terminal asks first."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

from click.testing import CliRunner

from backfill.cli import main
from backfill.sandbox import RunningSandbox

from .conftest import API_KEY, PARTNER_ID, png_bytes, simple_rows, write_manifest

ENV = {"SMILE_PARTNER_ID": PARTNER_ID, "SMILE_API_KEY": API_KEY}


def cli(*args: str, env: dict[str, str | None]) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    assert "Traceback" not in result.stdout + result.stderr
    return result.exit_code, result.stdout, result.stderr


def problems(out: str) -> list[str]:
    return [x for x in out.splitlines() if x.startswith("problem")]


def files(folder: Path) -> dict[str, str]:
    """Every file under `folder` with a hash of its bytes: what a command that writes nothing leaves as it was.

    SQLite's shared-memory index (-shm) is left out: any reader of a WAL database maps it, and it holds no data.
    An empty -wal (made by a reader too) is counted as no file: it holds no write either.
    """
    found = {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}
    return {name: hashlib.sha256(p.read_bytes()).hexdigest() for name, p in found.items()
            if not name.endswith("-shm") and not (name.endswith("-wal") and p.stat().st_size == 0)}  # fmt: skip


# --- 9. check: every credential problem in one run, and its wording ------------------------------------------


def test_check_names_every_missing_credential_at_once(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(3))
    code, out, _ = cli("check", str(manifest), "--env", "local", "--base-url", threaded_sandbox.base_url,
                       "--checkpoint", str(tmp_path / "cp.sqlite"),
                       env={"SMILE_PARTNER_ID": None, "SMILE_API_KEY": None})  # fmt: skip
    assert code == 2, out
    said = "\n".join(problems(out))
    assert "no partner ID is set" in said and "no API key is set" in said, out
    assert "SMILE_PARTNER_ID" in out and "SMILE_API_KEY" in out  # each with its fix


def test_check_names_a_bad_key_and_a_bad_partner_id_together_and_goes_on(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(3))
    code, out, _ = cli("check", str(manifest), "--env", "local", "--base-url", threaded_sandbox.base_url,
                       "--checkpoint", str(tmp_path / "cp.sqlite"),
                       env={"SMILE_PARTNER_ID": "abc", "SMILE_API_KEY": "good-part\x01rest"})  # fmt: skip
    assert code == 2, out
    said = "\n".join(problems(out))
    assert "'abc'" in said and "is not digits" in said, out
    assert "SMILE_API_KEY" in said and "U+0001" in said, out
    assert "good-part" not in out
    # The other checks still ran: the manifest and the API were looked at in the same run.
    assert any(x.startswith("ok       manifest:") for x in out.splitlines()), out
    assert any(x.startswith("ok       api connects:") for x in out.splitlines()), out
    assert threaded_sandbox.state.total_requests == 0


def test_check_wording_without_a_partner_id(tmp_path: Path, threaded_sandbox: RunningSandbox) -> None:
    manifest = write_manifest(tmp_path, simple_rows(3))
    env: dict[str, str | None] = {"SMILE_PARTNER_ID": None, "SMILE_API_KEY": API_KEY,
                                  "XDG_DATA_HOME": str(tmp_path / "data")}  # fmt: skip
    code, out, _ = cli("check", str(manifest), "--env", "local", env=env)
    assert code != 0
    assert "from derived from" not in out and "(from env=local)" in out, out
    assert "nopartner" not in out, out
    assert "can't be named until the partner ID is known" in out, out
    # A ledger named by --checkpoint, not there yet: what it will be bound to, with no blank partner.
    code, out, _ = cli("check", str(manifest), "--env", "local", "--base-url", threaded_sandbox.base_url,
                       "--checkpoint", str(tmp_path / "cp.sqlite"), env=env)  # fmt: skip
    assert "partner  on" not in out and "bound to partner" not in out, out
    assert "no partner ID is set yet" in out, out
    assert not (tmp_path / "data").exists() and not (tmp_path / "cp.sqlite").exists()


def test_check_reports_a_sampled_id_pinned_to_another_photo_as_run_would(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(3))
    where = ["--env", "local", "--base-url", threaded_sandbox.base_url,
             "--checkpoint", str(tmp_path / "cp.sqlite")]  # fmt: skip
    code, _, err = cli("run", str(manifest), *where, "--out", str(tmp_path / "out"), "--no-progress", env=ENV)
    assert code == 0, err
    (tmp_path / "images" / "user_0001.png").write_bytes(png_bytes(99))  # another person under the same ID
    sent, before = threaded_sandbox.state.total_requests, files(tmp_path)

    code, out, _ = cli("check", str(manifest), *where, env=ENV)
    assert code == 2, out
    assert threaded_sandbox.state.total_requests == sent  # sent nothing
    assert files(tmp_path) == before  # and wrote nothing

    code, _, err = cli("run", str(manifest), *where, "--out", str(tmp_path / "out2"), "--no-progress",
                       env=ENV)  # fmt: skip
    assert code == 1, err
    with next((tmp_path / "out2").glob("*/rejects.csv")).open(newline="") as handle:
        (reject,) = list(csv.DictReader(handle))
    assert reject["reason"] == "user_id_reused" and reject["user_id"] == "user_0001"
    flagged = [x for x in problems(out) if "user_0001" in x]
    assert len(flagged) == 1 and "user_id_reused" in flagged[0] and reject["message"] in flagged[0], out
    assert "fix:" in out.split(flagged[0], 1)[1].splitlines()[1]

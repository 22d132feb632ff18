"""Ledgers that can be found: `backfill ledgers` lists the default folder, and a command that reads a ledger with
none named uses the only one for this partner (saying so) or names those there are, never a new empty one.

Every ledger here is made by a real run against a real sandbox, in a default folder of the test's own
(XDG_DATA_HOME); the commands run through the CLI.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from backfill.cli import main
from backfill.config import ENVIRONMENTS
from backfill.sandbox import Faults, RunningSandbox

from .conftest import API_KEY, PARTNER_ID, ThreadedSandboxes, simple_rows, write_manifest
from .test_ledger_contract import _V1_SCHEMA


def cli(tmp_path: Path, *args: str, partner: str = PARTNER_ID) -> tuple[int, str, str]:
    env = {
        "SMILE_PARTNER_ID": partner,
        "SMILE_API_KEY": API_KEY,
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "BACKFILL_BACKOFF_INITIAL": "0.001",
        "BACKFILL_BACKOFF_MAX": "0.01",
    }
    result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def folder(tmp_path: Path) -> Path:
    return tmp_path / "data" / "backfill" / "ledgers"


def rehearse(tmp_path: Path, server: RunningSandbox, rows: int = 3, *, env: str = "local") -> int:
    """A real run into the default ledger of `server`'s endpoint (no --ledger): its exit code."""
    manifest = write_manifest(tmp_path, simple_rows(rows))
    code, _, _ = cli(
        tmp_path,
        "run",
        str(manifest),
        "--env",
        env,
        "--base-url",
        server.base_url,
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
        "--rate",
        "500",
        "--max-attempts",
        "1",
    )
    return code


def port_of(server: RunningSandbox) -> str:
    return server.base_url.split(":")[2].split("/")[0]


def snapshot(place: Path) -> dict[str, str]:
    """Every file in the folder, by name, with a hash of its bytes."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(place.iterdir())}


def test_ledgers_lists_each_with_partner_endpoint_rows_by_state_last_run_and_path_writing_nothing(
    tmp_path: Path, threaded_sandboxes: ThreadedSandboxes
) -> None:
    good = threaded_sandboxes.start()
    failing = threaded_sandboxes.start(faults=Faults(script={"user_0001": ["2213"]}))
    assert rehearse(tmp_path, good) == 0
    assert rehearse(tmp_path, failing) == 1
    place = folder(tmp_path)
    (place / "not-a-ledger.sqlite").write_bytes(b"hello")
    old = sqlite3.connect(place / "old.sqlite")
    old.executescript(_V1_SCHEMA)  # a ledger of an older version: listed, never migrated by a listing
    old.close()
    before = snapshot(place)

    code, out, err = cli(tmp_path, "ledgers")
    assert code == 0 and err == ""
    lines = {line.split()[-1]: line for line in out.splitlines()[3:]}
    first, second = (str(place / f"{PARTNER_ID}@127.0.0.1_{port_of(s)}.sqlite") for s in (good, failing))
    assert f"http://127.0.0.1:{port_of(good)}" in lines[first] and "3 enrolled" in lines[first]
    assert lines[first].split()[:3] == [PARTNER_ID, f"http://127.0.0.1:{port_of(good)}", "3"]
    assert "2 enrolled, 1 failed" in lines[second] and "(exit 1)" in lines[second]
    assert "not a backfill ledger" in lines[str(place / "not-a-ledger.sqlite")]
    assert "schema '1'" in lines[str(place / "old.sqlite")]
    assert snapshot(place) == before  # nothing created beside them (no -wal, no -shm), nothing migrated

    code, out, _ = cli(tmp_path, "ledgers", "--format", "json")
    listed = {entry["path"]: entry for entry in json.loads(out)["ledgers"]}
    assert code == 0 and json.loads(out)["folder"] == str(place)
    assert listed[second]["counts"] == {"enrolled": 2, "failed": 1} and listed[second]["rows"] == 3
    assert listed[second]["partner_id"] == PARTNER_ID and listed[second]["running"] is False
    assert listed[second]["last_run"]["exit_code"] == 1 and listed[second]["problem"] is None
    assert listed[str(place / "old.sqlite")]["problem"].startswith("schema '1'")
    assert snapshot(place) == before


def test_ledgers_in_an_empty_folder_says_where_it_looked(tmp_path: Path) -> None:
    code, out, _ = cli(tmp_path, "ledgers")
    assert code == 0 and out.startswith(f"no ledgers in {folder(tmp_path)}")
    assert not (tmp_path / "data").exists()


def test_readers_with_no_ledger_named_use_the_only_one_for_this_partner_and_say_so(
    tmp_path: Path, threaded_sandboxes: ThreadedSandboxes
) -> None:
    server = threaded_sandboxes.start(faults=Faults(script={"user_0002": ["2213"]}))
    assert rehearse(tmp_path, server) == 1
    only = str(folder(tmp_path) / f"{PARTNER_ID}@127.0.0.1_{port_of(server)}.sqlite")
    default = str(folder(tmp_path) / f"{PARTNER_ID}@testapi.smileidentity.com_443.sqlite")

    code, out, err = cli(tmp_path, "status", "--json")
    assert code == 0 and json.loads(out)["counts"] == {"enrolled": 2, "failed": 1}
    assert f"no ledger at {default}" in err and f"the only one for partner {PARTNER_ID} is {only}" in err

    code, out, err = cli(tmp_path, "export", "--status", "failed")
    assert code == 0 and [r["user_id"] for r in csv.DictReader(io.StringIO(out))] == ["user_0002"]
    assert only in err

    code, out, err = cli(tmp_path, "report", "--out", str(tmp_path / "reports"))
    assert code == 0 and Path(out.strip()).is_file() and only in err
    assert not Path(default).exists()  # read in its place: the default one was never made


@pytest.mark.parametrize("command", ["status", "export", "report", "retry"])
def test_with_several_ledgers_for_this_partner_each_is_named_and_none_is_made(
    tmp_path: Path, threaded_sandboxes: ThreadedSandboxes, command: str
) -> None:
    servers = [threaded_sandboxes.start(), threaded_sandboxes.start()]
    for server in servers:
        assert rehearse(tmp_path, server) == 0
    before = snapshot(folder(tmp_path))
    code, out, err = cli(tmp_path, command)
    assert code == 2 and out == ""
    for server in servers:
        assert str(folder(tmp_path) / f"{PARTNER_ID}@127.0.0.1_{port_of(server)}.sqlite") in err
    assert "3 rows" in err and "backfill ledgers lists them all" in err and "Traceback" not in err
    assert {name for name in snapshot(folder(tmp_path))} <= set(before)  # no default ledger made
    assert sum(s.state.total_requests for s in servers) == 6  # the rehearsals' requests only


def test_another_partners_ledger_is_named_not_read(tmp_path: Path, threaded_sandbox: RunningSandbox) -> None:
    assert rehearse(tmp_path, threaded_sandbox) == 0
    code, _, err = cli(tmp_path, "status", partner="999")
    assert code == 2 and "partner 999" in err and f"partner {PARTNER_ID}, http://127.0.0.1:" in err


def test_a_ledger_named_is_read_as_named_even_when_others_exist(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    assert rehearse(tmp_path, threaded_sandbox) == 0
    code, _, err = cli(tmp_path, "status", "--env", "sandbox")  # the default env, but named: no substitute
    assert code == 2 and "no ledger at" in err and "the only one" not in err and "ledgers in" not in err


def test_with_no_ledger_anywhere_a_reader_says_so_as_it_always_did(tmp_path: Path) -> None:
    code, _, err = cli(tmp_path, "status")
    assert code == 2 and "no ledger at" in err and "Name it with --ledger" in err


def test_retry_sends_from_the_only_ledger_when_an_env_other_than_production_names_its_api(
    tmp_path: Path, threaded_sandboxes: ThreadedSandboxes, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = threaded_sandboxes.start(faults=Faults(script={"user_0001": [503]}))
    # `local` names this sandbox here, as it names 127.0.0.1:8080 in a rehearsal: a port of the test's own.
    monkeypatch.setitem(ENVIRONMENTS, "local", server.base_url)
    manifest = write_manifest(tmp_path, simple_rows(3))
    code, _, _ = cli(
        tmp_path,
        "run",
        str(manifest),
        "--env",
        "local",
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
        "--max-attempts",
        "1",
    )
    assert code == 1 and server.state.requests["user_0001"] == 1

    code, out, err = cli(tmp_path, "retry", "--out", str(tmp_path / "out"), "--no-progress")
    assert code == 0 and "1 enrolled" in out, err
    assert f"to {server.base_url} (--env local)" in err and server.state.requests["user_0001"] == 2
    assert server.state.total_requests == 4


def test_retry_never_sends_to_an_api_nobody_named(
    tmp_path: Path, threaded_sandboxes: ThreadedSandboxes
) -> None:
    server = threaded_sandboxes.start(faults=Faults(script={"user_0001": [503]}))
    assert rehearse(tmp_path, server) == 1  # on a port no --env names
    code, out, err = cli(tmp_path, "retry", "--out", str(tmp_path / "out"))
    assert code == 2 and out == "" and "Name its API with --env" in err
    assert server.state.total_requests == 3  # the rehearsal's only
    assert len(list(folder(tmp_path).glob("*.sqlite"))) == 1  # and no default ledger made


def test_retry_never_picks_production_by_itself(
    tmp_path: Path, threaded_sandboxes: ThreadedSandboxes
) -> None:
    # A ledger bound to production's endpoint, made by a real run against a sandbox standing in for it.
    server = threaded_sandboxes.start()
    manifest = write_manifest(tmp_path, simple_rows(2))
    ledger = folder(tmp_path) / "elsewhere.sqlite"
    code, _, _ = cli(
        tmp_path,
        "run",
        str(manifest),
        "--env",
        "local",
        "--base-url",
        server.base_url,
        "--ledger",
        str(ledger),
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
    )
    assert code == 0
    conn = sqlite3.connect(ledger)  # rebound as a production ledger would be: only its binding differs
    conn.execute("UPDATE meta SET value = 'https://api.smileidentity.com:443' WHERE key = 'endpoint'")
    conn.commit()
    conn.close()
    code, _, err = cli(tmp_path, "retry", "--out", str(tmp_path / "out"))
    assert code == 2 and "https://api.smileidentity.com:443" in err and "--env production picks it" in err
    code, out, err = cli(tmp_path, "status", "--json")  # a reader reads it, saying so
    assert code == 0 and json.loads(out)["binding"]["endpoint"] == "https://api.smileidentity.com:443"

"""`backfill check` says every credential problem at once, and a production run from a terminal asks first."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from backfill.cli import main
from backfill.config import ENVIRONMENTS, Settings, load_settings
from backfill.images import Fingerprint
from backfill.ledger import AttemptRequest, Binding
from backfill.ledger.sqlite import SqliteStore
from backfill.sandbox import Faults, RunningSandbox

from .conftest import API_KEY, PARTNER_ID, ThreadedSandboxes, png_bytes, simple_rows, write_manifest

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
    return {
        name: hashlib.sha256(p.read_bytes()).hexdigest()
        for name, p in found.items()
        if not name.endswith("-shm") and not (name.endswith("-wal") and p.stat().st_size == 0)
    }


# --- 9. check: every credential problem in one run, and its wording ------------------------------------------


def test_check_names_every_missing_credential_at_once(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(3))
    code, out, _ = cli(
        "check",
        str(manifest),
        "--env",
        "local",
        "--base-url",
        threaded_sandbox.base_url,
        "--checkpoint",
        str(tmp_path / "cp.sqlite"),
        env={"SMILE_PARTNER_ID": None, "SMILE_API_KEY": None},
    )
    assert code == 2, out
    said = "\n".join(problems(out))
    assert "no partner ID is set" in said and "no API key is set" in said, out
    assert "SMILE_PARTNER_ID" in out and "SMILE_API_KEY" in out  # each with its fix


def test_check_names_a_bad_key_and_a_bad_partner_id_together_and_goes_on(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(3))
    code, out, _ = cli(
        "check",
        str(manifest),
        "--env",
        "local",
        "--base-url",
        threaded_sandbox.base_url,
        "--checkpoint",
        str(tmp_path / "cp.sqlite"),
        env={"SMILE_PARTNER_ID": "abc", "SMILE_API_KEY": "good-part\x01rest"},
    )
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
    env: dict[str, str | None] = {
        "SMILE_PARTNER_ID": None,
        "SMILE_API_KEY": API_KEY,
        "XDG_DATA_HOME": str(tmp_path / "data"),
    }
    code, out, _ = cli("check", str(manifest), "--env", "local", env=env)
    assert code != 0
    assert "from derived from" not in out and "(from env=local)" in out, out
    assert "nopartner" not in out, out
    assert "can't be named until the partner ID is known" in out, out
    # A ledger named by --checkpoint, not there yet: what it will be bound to, with no blank partner.
    code, out, _ = cli(
        "check",
        str(manifest),
        "--env",
        "local",
        "--base-url",
        threaded_sandbox.base_url,
        "--checkpoint",
        str(tmp_path / "cp.sqlite"),
        env=env,
    )
    assert "partner  on" not in out and "bound to partner" not in out, out
    assert "no partner ID is set yet" in out, out
    assert not (tmp_path / "data").exists() and not (tmp_path / "cp.sqlite").exists()


def test_check_reports_a_sampled_id_pinned_to_another_photo_as_run_would(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(3))
    where = [
        "--env",
        "local",
        "--base-url",
        threaded_sandbox.base_url,
        "--checkpoint",
        str(tmp_path / "cp.sqlite"),
    ]
    code, _, err = cli("run", str(manifest), *where, "--out", str(tmp_path / "out"), "--no-progress", env=ENV)
    assert code == 0, err
    (tmp_path / "images" / "user_0001.png").write_bytes(png_bytes(99))  # another person under the same ID
    sent, before = threaded_sandbox.state.total_requests, files(tmp_path)

    code, out, _ = cli("check", str(manifest), *where, env=ENV)
    assert code == 2, out
    assert threaded_sandbox.state.total_requests == sent  # sent nothing
    assert files(tmp_path) == before  # and wrote nothing

    code, _, err = cli(
        "run", str(manifest), *where, "--out", str(tmp_path / "out2"), "--no-progress", env=ENV
    )
    assert code == 1, err
    with next((tmp_path / "out2").glob("*/rejects.csv")).open(newline="") as handle:
        (reject,) = list(csv.DictReader(handle))
    assert reject["reason"] == "user_id_reused" and reject["user_id"] == "user_0001"
    flagged = [x for x in problems(out) if "user_0001" in x]
    assert len(flagged) == 1 and "user_id_reused" in flagged[0] and reject["message"] in flagged[0], out
    assert "fix:" in out.split(flagged[0], 1)[1].splitlines()[1]


def test_check_reports_a_pinned_id_still_to_be_sent_whose_photo_changed(
    tmp_path: Path, threaded_sandboxes: ThreadedSandboxes
) -> None:
    """A row not done (here retry_exhausted after a 503) keeps its pin; `run` is refused by the ledger at its
    next attempt, so `check` must say so too, not only for done rows."""
    server = threaded_sandboxes.start(faults=Faults(script={"user_0001": [503]}))
    manifest = write_manifest(tmp_path, simple_rows(3))
    where = ["--env", "local", "--base-url", server.base_url, "--checkpoint", str(tmp_path / "cp.sqlite")]
    code, _, err = cli(
        "run",
        str(manifest),
        *where,
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
        "--max-attempts",
        "1",
        env=ENV,
    )
    assert code == 1, err
    (tmp_path / "images" / "user_0001.png").write_bytes(png_bytes(99))
    code, out, _ = cli("check", str(manifest), *where, env=ENV)
    assert code == 2, out
    flagged = [x for x in problems(out) if "user_0001" in x]
    code, _, err = cli(
        "run", str(manifest), *where, "--out", str(tmp_path / "out2"), "--no-progress", env=ENV
    )
    with next((tmp_path / "out2").glob("*/rejects.csv")).open(newline="") as handle:
        (reject,) = list(csv.DictReader(handle))
    assert reject["reason"] == "user_id_reused" and reject["user_id"] == "user_0001", err
    assert len(flagged) == 1 and reject["message"] in flagged[0], out


# --- 15. a production run from a terminal says what it will send and asks first ---------------------------------
# Production can't be reached from here (and must never be, from a test): every manifest below names photos that
# don't exist, so even a run that went on would reject each row before any request could leave.

PRODUCTION_URL = "https://api.smileidentity.com/v1/backfill_users"
QUESTION = "Send to production? [y/N]"


class Terminal:
    """`python -m backfill ARGS` with a pseudo-terminal as its stdin, stdout and stderr, as a person runs it."""

    def __init__(self, args: list[str], tmp_path: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SMILE_", "BACKFILL_"))}
        env.update(ENV, XDG_DATA_HOME=str(tmp_path / "data"))
        master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "backfill", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            cwd=tmp_path,
        )
        os.close(slave)  # the child's copy alone keeps it open: its exit reads as the end of output here
        self.fd, self.seen, self.ended = master, "", False

    def read_until(self, text: str | None, timeout: float = 60.0) -> str:
        """Output until `text` appears (None: until the process closes the terminal); fails on a timeout."""
        deadline = time.monotonic() + timeout
        while not self.ended and (text is None or text not in self.seen):
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"waited {timeout:g}s for {text!r}; the terminal shows: {self.seen!r}"
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:  # EIO: every copy of the terminal's other side is closed
                chunk = b""
            self.ended = not chunk
            self.seen += chunk.decode(errors="replace").replace("\r\n", "\n")
        assert text is None or text in self.seen, f"the process ended without {text!r}: {self.seen!r}"
        return self.seen

    def answer(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\r")

    def finish(self) -> tuple[int, str]:
        out = self.read_until(None)
        code = self.proc.wait(timeout=60)
        os.close(self.fd)
        return code, out


def production_run(tmp_path: Path, *extra: str) -> list[str]:
    manifest = write_manifest(tmp_path, simple_rows(3), images=False)
    return [
        "run",
        str(manifest),
        "--env",
        "production",
        "--checkpoint",
        str(tmp_path / "cp.sqlite"),
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
        *extra,
    ]


def test_production_is_decided_by_the_endpoint_the_run_uses() -> None:
    def settings(**flags: str) -> Settings:
        return load_settings(None, ENV, flags)

    assert settings(env="production").production
    assert settings(env="production", base_url="https://API.SmileIdentity.com:443/v1/").production
    # Another label does not make the production URL anything else (load_settings refuses the pair; a
    # Settings built without it still sends where its URL says).
    assert Settings(env="local", base_url=ENVIRONMENTS["production"], partner_id=PARTNER_ID).production
    assert Settings(env="sandbox", base_url="https://api.smileidentity.com:443/v2").production
    assert not settings(env="sandbox").production and not settings(env="local").production
    assert not settings(env="sandbox", base_url="https://api.smileidentity.com:8443/v1").production


@pytest.mark.parametrize("said", ["n", "", "ok"], ids=["n", "empty", "anything-else"])
def test_a_production_run_in_a_terminal_asks_once_and_anything_but_yes_stops(
    tmp_path: Path, said: str
) -> None:
    terminal = Terminal(production_run(tmp_path), tmp_path)
    shown = terminal.read_until(QUESTION)
    assert f"3 rows in the manifest {tmp_path / 'manifest.csv'}" in shown, shown
    assert f"partner:  {PARTNER_ID}" in shown and PRODUCTION_URL in shown, shown
    assert f"ledger:   {tmp_path / 'cp.sqlite'}" in shown, shown
    terminal.answer(said)
    code, out = terminal.finish()
    assert code == 1, out
    assert out.count(QUESTION) == 1 and "nothing sent" in out and "Traceback" not in out, out
    # Stopped before the ledger and the run folder: nothing recorded, so nothing can have been sent.
    assert not (tmp_path / "cp.sqlite").exists() and not (tmp_path / "out").exists()
    assert not (tmp_path / "data").exists()


def test_yes_at_the_question_goes_on_with_the_run(tmp_path: Path) -> None:
    terminal = Terminal(production_run(tmp_path), tmp_path)
    terminal.read_until(QUESTION)
    terminal.answer("y")
    code, out = terminal.finish()
    assert code == 1 and "3 rejected" in out, out  # every photo is missing: rejected, and nothing to send
    assert (tmp_path / "cp.sqlite").exists() and (tmp_path / "out").exists()


def test_yes_flag_and_no_terminal_are_not_asked(tmp_path: Path) -> None:
    code, out = Terminal(production_run(tmp_path, "--yes"), tmp_path).finish()
    assert code == 1 and "3 rejected" in out and QUESTION not in out, out
    # Without a terminal (cron, CI): CliRunner's stdin is not one.
    code, stdout, stderr = cli(*production_run(tmp_path), env=ENV)
    assert code == 1 and "3 rejected" in stdout and QUESTION not in stdout + stderr, stdout + stderr


def test_a_production_retry_in_a_terminal_asks_before_opening_the_ledger_to_write(tmp_path: Path) -> None:
    ledger = tmp_path / "cp.sqlite"

    async def left_sending() -> None:
        # One row whose attempt was begun and never answered (a run killed mid-request); its photo is gone.
        binding = Binding(partner_id=PARTNER_ID, endpoint="https://api.smileidentity.com:443")
        store = await SqliteStore.open(ledger, binding, writable=True)
        try:
            await store.begin_attempt(
                AttemptRequest(
                    user_id="user_0000",
                    photo_sha256="a" * 64,
                    user_created_at="2021-08-12",
                    run_id="r1",
                    fingerprint=Fingerprint(ref=str(tmp_path / "gone.png"), size=1, version="1"),
                    at="t",
                )
            )
        finally:
            await store.close()

    asyncio.run(left_sending())
    before = files(tmp_path)
    terminal = Terminal(
        [
            "retry",
            "--env",
            "production",
            "--checkpoint",
            str(ledger),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ],
        tmp_path,
    )
    shown = terminal.read_until(QUESTION)
    assert "1 row in the ledger, in pending, retry_exhausted, sending, unknown" in shown, shown
    assert PRODUCTION_URL in shown, shown
    terminal.answer("n")
    code, out = terminal.finish()
    assert code == 1 and "nothing sent" in out, out
    assert files(tmp_path) == before and not (tmp_path / "out").exists()

"""The Python API an orchestrator calls: `backfill.run` and `backfill.arun`, against the real sandbox and ledger.

What a call returns and raises, where its settings come from, and how it stops: cancelled, as a first signal stops
the CLI (while it is set up, and again while it stops); interrupted in the blocking form (Ctrl-C, a host's own
SIGTERM handler); by a signal only when asked. Signals and printing are checked on real processes; the README's
example is run as written.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

import backfill
from backfill import python_api
from backfill.ledger.sqlite import acquire_lock
from backfill.sandbox import Faults, RunningSandbox, start_sandbox

from .conftest import API_KEY, PARTNER_ID, ThreadedSandboxes, simple_rows, spawn_sandbox, write_manifest

REPO = Path(__file__).resolve().parent.parent

CREDS = {"SMILE_PARTNER_ID": PARTNER_ID, "SMILE_API_KEY": API_KEY}
GENEROUS = 60.0  # seconds: only a hang fails on time
# Every answer waits until the test releases it (RunningSandbox.release_held); requests are taken, and enroll, at once.
HELD = Faults(latency_ms=600_000)


def settings(server: RunningSandbox | None, tmp_path: Path, **more: Any) -> dict[str, Any]:
    """The keywords of a run against `server`, as the config file's keys."""
    given: dict[str, Any] = {
        "env": "local",
        "ledger": tmp_path / "ledger.sqlite",
        "out": tmp_path / "out",
        "rate": 1000,
        "concurrency": 4,
        "backoff_initial": 0.001,
        "backoff_max": 0.01,
        "timeout": 30,
    }
    if server is not None:
        given["base_url"] = server.base_url
    return given | more


def ledger_states(path: Path) -> dict[str, int]:
    with sqlite3.connect(path) as conn:
        return dict(conn.execute("SELECT state, count(*) FROM users GROUP BY state").fetchall())


def the_run_dir(out: Path) -> Path:
    [run_dir] = [p for p in out.iterdir() if p.is_dir()]
    return run_dir


# --- what a call returns and raises ---------------------------------------------------------------------------


def test_a_run_returns_its_exit_code_counts_folder_and_summary(
    tmp_path: Path, threaded_sandboxes: ThreadedSandboxes
) -> None:
    server = threaded_sandboxes.start(faults=Faults(script={"user_0002": ["2204"]}))
    manifest = write_manifest(tmp_path, simple_rows(7))
    (tmp_path / "images" / "user_0006.png").unlink()  # rejected: its photo is missing

    result = backfill.run(manifest, environ=CREDS, **settings(server, tmp_path))

    assert result.exit_code == 1  # a failed row and a rejected one: as `backfill run` would exit
    assert result.counts == {"enrolled": 5, "failed": 1, "rejected": 1}
    assert result.run_dir.is_absolute() and result.run_dir == the_run_dir(tmp_path / "out").absolute()
    assert result.summary == json.loads((result.run_dir / "summary.json").read_text())
    assert result.summary["counts"] == result.counts and result.summary["run_id"] == result.run_id
    assert result.ledger == str(tmp_path / "ledger.sqlite") and result.stop_reason == ""
    assert (result.run_dir / "results.csv").exists() and (result.run_dir / "rejects.csv").exists()
    assert ledger_states(tmp_path / "ledger.sqlite") == {"enrolled": 5, "failed": 1}
    with pytest.raises(AttributeError):
        result.exit_code = 0  # type: ignore[misc]  # frozen: what the run did can't be rewritten


async def test_arun_is_the_same_run_in_the_callers_event_loop(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, simple_rows(5))
    async with await start_sandbox(PARTNER_ID, API_KEY) as server:
        first = await backfill.arun(manifest, environ=CREDS, **settings(server, tmp_path))
        again = await backfill.arun(str(manifest), environ=CREDS, **settings(server, tmp_path))
        assert server.state.total_requests == 5  # the second run sent nothing: every user was done
    assert (first.exit_code, first.counts) == (0, {"enrolled": 5})
    assert (again.exit_code, again.counts) == (0, {"skipped": 5}) and again.run_dir != first.run_dir


def test_a_call_prints_nothing_even_with_warnings_and_no_logging_configured(
    tmp_path: Path, threaded_sandboxes: ThreadedSandboxes
) -> None:
    """A real process with no logging set up: Python's last resort would print the run's warnings (a failed row,
    an unknown BACKFILL_* variable) on stderr. They reach the `backfill` logger only; the result has them."""
    server = threaded_sandboxes.start(faults=Faults(script={"user_0001": ["2204"]}))
    manifest = write_manifest(tmp_path, simple_rows(3))
    script = (
        "import json, sys, backfill\n"
        "r = backfill.run(sys.argv[1], env='local', base_url=sys.argv[2], out=sys.argv[3], rate=1000)\n"
        "json.dump({'exit_code': r.exit_code, 'counts': r.counts, 'warnings': r.warnings}, sys.stdout)\n"
    )
    env = {**os.environ, **CREDS, "XDG_DATA_HOME": str(tmp_path / "data"), "BACKFILL_RAET": "5"}
    done = subprocess.run(
        [sys.executable, "-c", script, str(manifest), server.base_url, str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=GENEROUS,
    )
    assert done.stderr == "" and done.returncode == 0
    said = json.loads(done.stdout)
    assert said["exit_code"] == 1 and said["counts"] == {"enrolled": 2, "failed": 1}
    assert any("BACKFILL_RAET" in w and "BACKFILL_RATE" in w for w in said["warnings"])


@pytest.mark.parametrize(
    ("given", "key", "said"),
    [
        ({"concurrency": 0}, "concurrency", "not at least 1"),
        ({"concurency": 3}, "concurency", "did you mean `concurrency`?"),
        ({"partner_id": 85}, "partner_id", "not text"),
        ({"ledger": "postgresql://u:s3cr3t-pw@db/backfill"}, "ledger", "PGPASSWORD"),
        ({"api_key": "k-never-shown"}, "api_key", "SMILE_API_KEY"),
        ({"log_format": "json"}, "log_format", "logging.getLogger('backfill')"),
        ({"progress": False}, "progress", "no progress bar"),
    ],
)
def test_a_bad_setting_raises_the_config_error_naming_key_source_and_fix(
    tmp_path: Path, given: dict[str, object], key: str, said: str
) -> None:
    with pytest.raises(backfill.ConfigError) as info:
        backfill.run(tmp_path / "users.csv", environ=CREDS, **(settings(None, tmp_path) | given))
    error = info.value
    assert (error.key, error.source, error.exit_code) == (key, "python argument", 2)
    assert said in str(error) and error.fix
    assert "k-never-shown" not in str(error) and "s3cr3t-pw" not in str(error)
    assert not (tmp_path / "out").exists() and not (tmp_path / "ledger.sqlite").exists()


def test_settings_are_the_files_keys_above_the_environment_and_the_file(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, [("c1", "2021-08-12", "c1.png")])
    manifest.write_text(manifest.read_text().replace("user_id,", "customer_ref,", 1))
    config = tmp_path / "backfill.yaml"
    config.write_text("rate: 5\nconcurrency: 3\nmax_attempts: 7\n")
    environ = {**CREDS, "BACKFILL_RATE": "6", "BACKFILL_CONCURRENCY": "4"}
    given = settings(None, tmp_path, dry_run=True) | {"rate": 9, "columns": {"user_id": "customer_ref"}}
    del given["concurrency"]

    result = backfill.run(manifest, config=config, environ=environ, **given)

    assert result.counts == {"dry_run": 1}  # signed, not sent: no API needed
    used = result.summary["settings"]
    assert (used["rate"], used["concurrency"], used["max_attempts"]) == (9.0, 4, 7)
    assert used["columns"]["user_id"] == "customer_ref"


def test_credentials_come_from_the_environment_as_for_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(1))
    dry = settings(None, tmp_path, dry_run=True)
    monkeypatch.delenv("SMILE_API_KEY", raising=False)
    monkeypatch.setenv("SMILE_PARTNER_ID", "999")
    with pytest.raises(backfill.ConfigError) as info:
        backfill.run(manifest, **dry)  # os.environ, which has no key
    assert (info.value.key, info.value.exit_code) == ("api_key", 2)

    monkeypatch.setenv("SMILE_API_KEY", API_KEY)
    assert backfill.run(manifest, **dry).summary["settings"]["partner_id"] == "999"
    # `environ` replaces os.environ, credentials and all.
    assert backfill.run(manifest, environ=CREDS, **dry).summary["settings"]["partner_id"] == PARTNER_ID
    # A file holding the key, named relative to the current folder.
    monkeypatch.chdir(tmp_path)
    Path("smile.key").write_text(API_KEY + "\n")
    keyed = backfill.run(manifest, environ={"SMILE_PARTNER_ID": "085"}, api_key_file="smile.key", **dry)
    assert keyed.summary["settings"]["api_key"] == "***"
    # A relative output folder: the result names the run's folder whatever folder the caller is in next.
    relative = backfill.run(manifest, environ=CREDS, **(dry | {"out": "out"}))
    assert relative.run_dir.is_absolute() and relative.run_dir.parent == tmp_path / "out"


def test_a_ledger_held_by_another_run_raises_ledger_locked_with_exit_3(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(2))
    backfill.run(manifest, environ=CREDS, **settings(threaded_sandbox, tmp_path))
    held = acquire_lock(tmp_path / "ledger.sqlite")
    try:
        with pytest.raises(backfill.LedgerLocked) as info:
            backfill.run(manifest, environ=CREDS, **settings(threaded_sandbox, tmp_path))
    finally:
        os.close(held)
    assert info.value.exit_code == 3 and isinstance(info.value, backfill.BackfillError)


def test_a_systemic_stop_raises_with_the_runs_result_and_exit_4(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(6))
    wrong = {**CREDS, "SMILE_API_KEY": "not-the-sandbox-key"}
    with pytest.raises(backfill.SystemicStop) as info:
        backfill.run(manifest, environ=wrong, **settings(threaded_sandbox, tmp_path))
    error = info.value
    assert error.exit_code == 4 and error.result.exit_code == 4 and isinstance(error, backfill.BackfillError)
    assert "2205" in error.result.stop_reason and error.result.stop_reason in str(error)
    assert (error.result.run_dir / "summary.json").exists() and str(error.result.run_dir) in str(error)


def test_backfill_run_stays_the_function_when_the_engines_package_is_imported() -> None:
    import backfill.run.engine  # the package of the same name, imported by its dotted name

    importlib.import_module("backfill.run.stops")
    assert backfill.run is python_api.run and callable(backfill.run)
    assert importlib.import_module("backfill.run").__name__ == "backfill.run"
    assert set(backfill.__all__) >= {"run", "arun", "RunResult", "BackfillError", "ConfigError", "ExitCode"}


async def test_run_inside_a_running_event_loop_says_to_await_arun(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"await backfill\.arun"):
        backfill.run(tmp_path / "users.csv", environ=CREDS)


# --- stopping: a cancellation, a second one, Ctrl-C, and signals only when asked ------------------------------


@pytest.fixture
async def held() -> AsyncIterator[RunningSandbox]:
    """A sandbox that takes every request (and enrolls) at once, and answers only when released."""
    async with await start_sandbox(PARTNER_ID, API_KEY, faults=HELD) as server:
        yield server


async def requests_reach(server: RunningSandbox, count: int) -> None:
    deadline = time.monotonic() + GENEROUS
    while server.state.total_requests < count:
        assert time.monotonic() < deadline, f"{server.state.total_requests} of {count} requests arrived"
        await asyncio.sleep(0.01)


async def settle() -> None:
    """Let the cancelled task take its next steps (the loop runs ready callbacks in order)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_cancelling_the_task_stops_the_run_as_a_first_signal_does(
    tmp_path: Path, held: RunningSandbox
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(40))
    task = asyncio.create_task(backfill.arun(manifest, environ=CREDS, **settings(held, tmp_path)))
    await requests_reach(held, 4)  # every worker has a request in flight

    task.cancel()
    await settle()
    held.release_held()  # the answers in flight come now: a stop waits for them and records them
    with pytest.raises(asyncio.CancelledError):
        await task

    summary = json.loads((the_run_dir(tmp_path / "out") / "summary.json").read_text())
    assert summary["stop_reason"] == python_api.CANCELLED and summary["exit_code"] == 143
    assert summary["counts"] == {"enrolled": 4} and summary["not_reached"] == 36
    assert held.state.total_requests == 4  # no request started after the cancellation
    assert ledger_states(tmp_path / "ledger.sqlite") == {"enrolled": 4}


async def test_cancelled_while_it_is_set_up_the_run_stops_before_its_first_request(
    tmp_path: Path, held: RunningSandbox
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(10))
    task = asyncio.create_task(backfill.arun(manifest, environ=CREDS, **settings(held, tmp_path)))
    # One step: the call has started the run, which is reading its manifest and opening its ledger.
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert held.state.total_requests == 0
    summary = json.loads((the_run_dir(tmp_path / "out") / "summary.json").read_text())
    assert summary["stop_reason"] == python_api.CANCELLED and summary["not_reached"] == 10
    # Nothing was left open: the ledger is free for the next run, which sends every row.
    held.release_held()
    again = await backfill.arun(manifest, environ=CREDS, **settings(held, tmp_path))
    assert again.counts == {"enrolled": 10}


async def test_cancelled_again_the_stop_goes_on_and_a_rerun_owns_the_rows_it_left_in_doubt(
    tmp_path: Path,
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(8))
    enrolled = tmp_path / "sandbox-state.jsonl"  # the API's memory, across the two sandboxes
    # Answers never come: the stop ends when the requests in flight time out (timeout 2 s).
    given = settings(None, tmp_path, timeout=2)
    async with await start_sandbox(PARTNER_ID, API_KEY, faults=HELD, state_file=enrolled) as server:
        task = asyncio.create_task(backfill.arun(manifest, environ=CREDS, base_url=server.base_url, **given))
        await requests_reach(server, 4)
        task.cancel()
        await settle()
        assert not task.done()  # stopping: waiting for the 4 answers
        task.cancel()  # changes nothing: the stop goes on, and writes the outputs
        with pytest.raises(asyncio.CancelledError):
            await task
        port = urlsplit(server.base_url).port  # the ledger is bound to the endpoint: the same one again
    summary = json.loads((the_run_dir(tmp_path / "out") / "summary.json").read_text())
    assert summary["counts"] == {"unknown": 4} and summary["stop_reason"] == python_api.CANCELLED
    assert ledger_states(tmp_path / "ledger.sqlite") == {"unknown": 4}  # in doubt: never "not sent"

    async with await start_sandbox(PARTNER_ID, API_KEY, state_file=enrolled, port=port or 0) as server:
        again = await backfill.arun(manifest, environ=CREDS, base_url=server.base_url, **given)
    # The 4 left in doubt had reached the API: its 2209 for them is ours, never someone else's.
    assert again.counts == {"already_enrolled": 4, "enrolled": 4} and again.exit_code == 0


@pytest.mark.parametrize("asked", [False, True])
async def test_no_signal_handler_is_installed_unless_asked_and_then_only_during_the_run(
    tmp_path: Path, held: RunningSandbox, asked: bool
) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    manifest = write_manifest(tmp_path, simple_rows(4))
    task = asyncio.create_task(
        backfill.arun(manifest, environ=CREDS, handle_signals=asked, **settings(held, tmp_path))
    )
    await requests_reach(held, 4)
    during = {s: signal.getsignal(s) for s in before}
    held.release_held()
    assert (await task).counts == {"enrolled": 4}
    assert (during != before) is asked
    assert {s: signal.getsignal(s) for s in before} == before  # put back as they were


class Child:
    """A Python process that calls the API, whose stdout is read once it ends."""

    def __init__(self, script: str, *args: str, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", script, *args],
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def finish(self) -> tuple[int, str, str]:
        try:
            out, err = self.process.communicate(timeout=GENEROUS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, err = self.process.communicate()
            raise AssertionError(f"the process did not end: {err}") from None
        return self.process.returncode, out, err


@pytest.fixture
def held_in_a_thread(threaded_sandboxes: ThreadedSandboxes) -> Iterator[RunningSandbox]:
    yield threaded_sandboxes.start(faults=HELD)


def wait_for_requests(server: RunningSandbox, count: int) -> None:
    deadline = time.monotonic() + GENEROUS
    while server.state.total_requests < count:
        assert time.monotonic() < deadline, f"{server.state.total_requests} of {count} requests arrived"
        time.sleep(0.02)


CHILD = """\
import json, signal, sys, backfill

class Interrupted(Exception):
    pass

def interrupted(signum, frame):
    raise Interrupted(signum)  # as Airflow's and Dagster's own SIGTERM handlers do

if sys.argv[5] == "host":
    signal.signal(signal.SIGTERM, interrupted)
try:
    r = backfill.run(sys.argv[1], env="local", base_url=sys.argv[2], out=sys.argv[3], ledger=sys.argv[4],
                     concurrency=4, timeout=2, handle_signals=sys.argv[5] == "yes")
    print(json.dumps({"exit_code": r.exit_code, "run_dir": str(r.run_dir)}))
except (KeyboardInterrupt, Interrupted) as error:
    print(type(error).__name__)
"""


@pytest.mark.parametrize(
    ("signum", "asked", "said", "reason", "code"),
    [
        # Asked: SIGTERM stops the run as it stops the CLI's, and the call returns its result.
        (signal.SIGTERM, "yes", '"exit_code": 143', "interrupted by SIGTERM", 143),
        # Not asked: Ctrl-C cancels the blocking call's run (a clean stop), then KeyboardInterrupt as usual.
        (signal.SIGINT, "no", "KeyboardInterrupt", python_api.CANCELLED, 143),
        # Not asked, and the host's own SIGTERM handler raises: the run stops cleanly before that goes on.
        (signal.SIGTERM, "host", "Interrupted", python_api.CANCELLED, 143),
    ],
    ids=["sigterm-handled", "ctrl-c-cancels", "host-handler-raises"],
)
def test_a_signal_stops_a_real_process_cleanly(
    tmp_path: Path,
    held_in_a_thread: RunningSandbox,
    signum: int,
    asked: str,
    said: str,
    reason: str,
    code: int,
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(20))
    out, ledger = tmp_path / "out", tmp_path / "ledger.sqlite"
    env = {**CREDS, "XDG_DATA_HOME": str(tmp_path / "data")}
    child = Child(CHILD, str(manifest), held_in_a_thread.base_url, str(out), str(ledger), asked, env=env)
    wait_for_requests(held_in_a_thread, 4)
    child.process.send_signal(signum)
    # The answers in flight never come: the stop waits them out (--timeout 2), and records them in doubt.
    exited, stdout, stderr = child.finish()
    assert exited == 0 and said in stdout, stderr
    summary = json.loads((the_run_dir(out) / "summary.json").read_text())
    assert summary["stop_reason"] == reason and summary["exit_code"] == code
    assert summary["counts"] == {"unknown": 4} and summary["not_reached"] == 16


# --- the README's example -------------------------------------------------------------------------------------


def test_the_readmes_python_api_example_runs_as_written(tmp_path: Path) -> None:
    """The section's shell lines start the sandbox (on a free port here) with the credentials they export; each
    Python block then runs as written, from a folder holding sample_data/, and says what the README shows."""
    section = (REPO / "README.md").read_text().split("## Python API\n", 1)[1].split("\n## ", 1)[0]
    page = read_text_blocks(section)
    shell = next(text for lang, text in page if lang == "sh")
    exported = next(line for line in shell.splitlines() if line.startswith("export "))
    env = {**os.environ, **dict(w.split("=", 1) for w in shlex.split(exported)[1:])}
    env.pop("BACKFILL_OUT", None)
    env["XDG_DATA_HOME"] = str(tmp_path / "data")  # the default ledger, in a folder of the test's own
    shutil.copytree(REPO / "backfill" / "demo", tmp_path / "sample_data")
    assert "backfill sandbox &" in shell
    sandbox, base_url = spawn_sandbox([], env)
    try:
        env["BACKFILL_BASE_URL"] = base_url  # where the sandbox listens, as the README says to set it
        said = []
        for lang, text in page:
            if lang != "python":
                continue
            done = subprocess.run(
                [sys.executable, "-c", text],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=GENEROUS,
            )
            assert done.returncode == 0 and done.stderr == "", done.stderr
            said.append(done.stdout.strip())
    finally:
        sandbox.terminate()
        sandbox.wait(GENEROUS)
    shown = next(text for lang, text in page if lang == "text")
    assert said[0].startswith(
        shown.split(" outputs in ")[0] + " outputs in " + str(tmp_path / "backfill-out")
    )
    # Run again, the deadline example sends nothing new: every valid user is already enrolled.
    assert said[1:] == ["exit 1: {'rejected': 9, 'skipped': 15}"]


def read_text_blocks(markdown: str) -> list[tuple[str, str]]:
    """(language, text) of each fenced block of `markdown`, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```$", markdown, re.M | re.S)]

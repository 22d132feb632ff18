"""`--log-format json`: every line on stderr is one JSON object with the documented keys, in real processes.

A clean run, a settings or usage error (the format asked for by flag, environment or config file), a systemic stop
and SIGTERM (once, then twice) each run `python -m backfill` against a real sandbox; every stderr line must parse,
carry the keys every line has, and hold no key the docs don't list for its event. The docs' tables of keys and
events are checked against the code: a new event, or a new key on every line, fails here until it is documented.
"""

from __future__ import annotations

import ast
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from backfill.cli.logs import Key, Said
from backfill.ledger import Refusal
from backfill.sandbox import Faults, RunningSandbox
from backfill.vocab import EXIT_FIXES, ExitCode

from .conftest import API_KEY, PARTNER_ID, ThreadedSandboxes, simple_rows, write_manifest

REPO = Path(__file__).resolve().parent.parent
GENEROUS = 60.0  # seconds: only a hang fails on time


def table(text: str, header: str) -> list[list[str]]:
    """The rows of the Markdown table whose header row starts with `header`, each as its cells."""
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[at + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


# The keys every line has (the README's table), and each event's own (docs/operating.md's table).
EVERY_LINE = {ticked(row[0])[0] for row in table((REPO / "README.md").read_text(), "| key | what it holds |")}
EVENTS = {
    ticked(row[0])[0]: set(ticked(row[3]))
    for row in table((REPO / "docs" / "operating.md").read_text(), "| event | level | when | its fields |")
}


def events_in_the_code() -> set[str]:
    """Every event name the package logs: `events(level, "name", ...)` and `self._event(...)` calls, and
    `extra={"event": "name"}` records; the sender's refusals (logged as str(refused.why)); the CLI's own lines."""
    found = set()
    for path in (REPO / "backfill").rglob("*.py"):
        if "sandbox" in path.parts:  # the emulator's request log is not the tool's log
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "attr", getattr(node.func, "id", None))
                if (
                    name in ("_event", "events")
                    and len(node.args) > 1
                    and isinstance(node.args[1], ast.Constant)
                ):
                    found.add(node.args[1].value)
            elif isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values, strict=True):
                    if (
                        isinstance(key, ast.Constant)
                        and key.value == "event"
                        and isinstance(value, ast.Constant)
                    ):
                        found.add(value.value)
    # run/send.py tells the two refusals that leave a row to another process; the formatter names a line that
    # has no event of its own (another library's warning) "log".
    return found | {Refusal.CLAIM_LOST, Refusal.SENT_ELSEWHERE} | {s.value for s in Said} | {"log"}


def test_the_readme_lists_the_keys_every_line_has() -> None:
    assert {k.value for k in Key} == EVERY_LINE


def test_the_docs_list_every_event_the_code_logs_and_no_other() -> None:
    assert set(EVENTS) == events_in_the_code()


def test_the_docs_example_lines_are_lines_as_the_docs_describe_them() -> None:
    for page in (REPO / "README.md", REPO / "docs" / "operating.md"):
        examples = re.findall(r"```json\n(.*?)```", page.read_text(), re.S)
        assert examples, page
        for example in examples:
            json_lines(example)


def test_the_event_reader_finds_calls_and_records() -> None:
    found = events_in_the_code()
    assert {"run_started", "progress", "report_failed", "fleet_joined", "fatal_error", "claim_lost"} <= found


# --- the CLI in a real process ----------------------------------------------------------------------------


def environment(tmp_path: Path, **more: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BACKFILL_")}
    return {
        **clean,
        "SMILE_PARTNER_ID": PARTNER_ID,
        "SMILE_API_KEY": API_KEY,
        "XDG_DATA_HOME": str(tmp_path / "data"),
        **more,
    }


def run_flags(tmp_path: Path, server: RunningSandbox) -> list[str]:
    return [
        "--env",
        "local",
        "--base-url",
        server.base_url,
        "--ledger",
        str(tmp_path / "ledger.sqlite"),
        "--out",
        str(tmp_path / "out"),
        "--rate",
        "500",
    ]


def backfill(*args: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "backfill", *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=GENEROUS,
    )


def json_lines(stderr: str) -> list[dict[str, Any]]:
    """Every line of stderr as JSON, each checked: the keys every line has first, then only its event's own."""
    records = []
    for line in stderr.splitlines():
        record = json.loads(line)  # a line that isn't JSON fails here, showing itself
        assert isinstance(record, dict), line
        assert list(record)[: len(Key)] == [k.value for k in Key], line
        assert record["event"] in EVENTS, f"an event the docs don't list: {line}"
        undocumented = set(record) - EVERY_LINE - EVENTS[record["event"]]
        assert not undocumented, f"keys the docs don't list for {record['event']}: {undocumented}"
        records.append(record)
    return records


def the(records: list[dict[str, Any]], event: str) -> dict[str, Any]:
    [record] = [r for r in records if r["event"] == event]
    return record


def test_a_clean_run_is_json_lines_from_start_to_summary_and_nothing_on_stdout(
    tmp_path: Path, threaded_sandboxes: ThreadedSandboxes
) -> None:
    server = threaded_sandboxes.start(faults=Faults(latency_ms=50))
    manifest = write_manifest(tmp_path, simple_rows(5))
    # One worker and 50 ms answers: the run lasts 250 ms or more, so a status line every 50 ms comes first.
    env = environment(tmp_path, BACKFILL_STATUS_EVERY="0.05", BACKFILL_RAET="1")
    done = backfill(
        "run",
        str(manifest),
        *run_flags(tmp_path, server),
        "--concurrency",
        "1",
        "--log-format",
        "json",
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""  # the summary is a log line, not text among them (stdout and stderr often merge)
    records = json_lines(done.stderr)
    events = [r["event"] for r in records]
    assert events[0] == "settings_warning" and "BACKFILL_RAET" in records[0]["message"]
    assert events[1] == "run_started" and events[-2:] == ["run_finished", "run_summary"]
    assert "progress" in events
    summary = the(records, "run_summary")
    assert summary["exit_code"] == 0 and summary["counts"] == {"enrolled": 5} and summary["fix"] is None
    assert summary["level"] == "info" and Path(summary["out_dir"]).is_dir()
    assert len({r["run_id"] for r in records[1:]}) == 1 and records[1]["run_id"]
    assert API_KEY not in done.stderr


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "backfill.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("asked", ["flag", "environment", "config file"])
@pytest.mark.parametrize("wrong", ["setting", "usage"])
def test_a_settings_or_usage_error_is_one_json_line_with_its_exit_code_and_fix(
    tmp_path: Path, asked: str, wrong: str
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(1))
    args = ["run", str(manifest), "--ledger", str(tmp_path / "ledger.sqlite")]
    env = environment(tmp_path)
    if asked == "flag":
        args += ["--log-format", "json"]
    elif asked == "environment":
        env["BACKFILL_LOG_FORMAT"] = "json"
    else:
        args += ["--config", write_config(tmp_path, "log_format: json\n")]
    args += ["--rate", "-1"] if wrong == "setting" else ["--no-such-flag"]
    done = backfill(*args, env=env)
    assert done.returncode == ExitCode.LOCAL and done.stdout == ""
    [error] = json_lines(done.stderr)
    assert error["event"] == "fatal_error" and error["level"] == "error" and error["exit_code"] == 2
    if wrong == "setting":
        assert (
            error["error"] == "ConfigError"
            and error["setting"] == "rate"
            and error["source"] == "flag --rate"
        )
        assert error["fix"] == "correct rate in flag --rate"
    else:
        assert "--no-such-flag" in error["message"] and error["fix"].endswith("backfill run --help")


def test_an_error_in_the_config_file_is_json_when_the_file_asks_for_json(tmp_path: Path) -> None:
    config = write_config(tmp_path, "log_format: json\nrate: -1\n")
    done = backfill("run", "m.csv", "--config", config, env=environment(tmp_path))
    [error] = json_lines(done.stderr)
    assert done.returncode == 2 and error["setting"] == "rate" and config in error["source"]


def test_text_stays_the_default_and_a_text_flag_wins_over_the_environment(tmp_path: Path) -> None:
    env = environment(tmp_path, BACKFILL_LOG_FORMAT="json")
    done = backfill("run", "m.csv", "--log-format", "text", "--rate", "-1", env=env)
    assert done.returncode == 2 and done.stderr.startswith("backfill: config error: rate (from flag --rate)")


def test_a_systemic_stop_ends_in_a_summary_line_at_error_level_with_the_fix(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(3))
    env = environment(tmp_path, SMILE_API_KEY="a-key-the-api-refuses")  # every signature is refused: 2205
    done = backfill(
        "run", str(manifest), *run_flags(tmp_path, threaded_sandbox), "--log-format", "json", env=env
    )
    assert done.returncode == ExitCode.SYSTEMIC and done.stdout == ""
    records = json_lines(done.stderr)
    assert "2205" in the(records, "run_stopped")["reason"]
    summary = the(records, "run_summary")
    assert summary["level"] == "error" and summary["exit_code"] == 4 and "2205" in summary["stop_reason"]
    assert summary["fix"] == EXIT_FIXES[ExitCode.SYSTEMIC]
    assert "a-key-the-api-refuses" not in done.stderr


class Running:
    """`backfill run --log-format json` in a child process whose stderr lines are read as they come."""

    def __init__(self, tmp_path: Path, server: RunningSandbox) -> None:
        manifest = write_manifest(tmp_path, simple_rows(20))
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "backfill",
                "run",
                str(manifest),
                *run_flags(tmp_path, server),
                "--concurrency",
                "4",
                "--timeout",
                "30",
                "--log-format",
                "json",
            ],
            env=environment(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for text in self.process.stderr:
            self.lines.put(text)

    def wait_for(self, event: str) -> None:
        deadline = time.monotonic() + GENEROUS
        while time.monotonic() < deadline:
            try:
                text = self.lines.get(timeout=0.1)
            except queue.Empty:
                continue
            self.seen.append(text)
            if json.loads(text)["event"] == event:
                return
        raise AssertionError(f"no {event} line on stderr: {self.seen}")

    def finish(self) -> tuple[int, str, list[dict[str, Any]]]:
        """The exit code, stdout, and every stderr line (those read already, then the rest up to the end)."""
        code = self.process.wait(GENEROUS)
        assert self.process.stdout is not None
        out = self.process.stdout.read()
        self.reader.join(GENEROUS)  # stderr read to its end
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return code, out, json_lines("".join(self.seen))


@pytest.fixture
def running(tmp_path: Path, threaded_sandboxes: ThreadedSandboxes) -> Iterator[Running]:
    # Answers take 4 s: a signal always finds requests in flight.
    server = threaded_sandboxes.start(faults=Faults(latency_ms=4000))
    run = Running(tmp_path, server)
    run.wait_for("run_started")
    deadline = time.monotonic() + GENEROUS
    while server.state.total_requests < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.state.total_requests >= 1, "no request reached the sandbox"
    yield run
    if run.process.poll() is None:
        run.process.kill()
        run.process.wait()


def test_sigterm_is_told_in_json_from_the_signal_to_the_summary(running: Running) -> None:
    running.process.send_signal(signal.SIGTERM)
    running.wait_for("stop_requested")
    code, out, records = running.finish()
    assert code == ExitCode.SIGTERM and out == ""
    stop = the(records, "stop_requested")
    assert stop["signal"] == "SIGTERM" and stop["in_flight"] >= 1 and stop["run_id"] == records[0]["run_id"]
    summary = the(records, "run_summary")
    assert (
        summary["exit_code"] == 143 and summary["level"] == "warning" and summary["fix"] == "re-run to resume"
    )


def test_a_second_sigterm_leaves_at_once_saying_so_in_json(running: Running) -> None:
    running.process.send_signal(signal.SIGTERM)
    running.wait_for("stop_requested")
    running.process.send_signal(signal.SIGTERM)
    code, out, records = running.finish()
    assert code == ExitCode.SIGTERM and out == ""
    left = the(records, "left_now")
    assert left["signal"] == "SIGTERM" and left["in_flight"] >= 1 and left["run_id"] == records[0]["run_id"]
    assert "run_summary" not in [r["event"] for r in records]  # it left without one: a re-run resumes

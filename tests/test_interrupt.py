"""Ctrl-C in a real process: the first is said at once with its bound, a second leaves no empty file under a final name."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backfill.sandbox import Faults, RunningSandbox

from .conftest import API_KEY, PARTNER_ID, ThreadedSandboxes, simple_rows, write_manifest

GENEROUS = 30.0  # seconds: only a hang fails on time; how fast the acknowledgment comes is shown otherwise


class Running:
    """`backfill run` in a child process whose stderr is read line by line as it comes."""

    def __init__(self, tmp_path: Path, server: RunningSandbox) -> None:
        manifest = write_manifest(tmp_path, simple_rows(40))
        self.out = tmp_path / "out"
        env = {**os.environ, "SMILE_PARTNER_ID": PARTNER_ID, "SMILE_API_KEY": API_KEY}
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "backfill",
                "run",
                str(manifest),
                "--env",
                "local",
                "--base-url",
                server.base_url,
                "--checkpoint",
                str(tmp_path / "cp.sqlite"),
                "--out",
                str(self.out),
                "--concurrency",
                "4",
                "--rate",
                "100",
                "--timeout",
                "30",
                "--no-progress",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for text in self.process.stderr:
            self.lines.put(text)

    def wait_for_line(self, part: str) -> str:
        deadline = time.monotonic() + GENEROUS
        while time.monotonic() < deadline:
            try:
                text = self.lines.get(timeout=0.1)
            except queue.Empty:
                continue
            if part in text:
                return text
        raise AssertionError(f"no line with {part!r} on stderr")


@pytest.fixture
def slow_sandbox(threaded_sandboxes: ThreadedSandboxes) -> RunningSandbox:
    # Answers take 4 s: a signal always finds requests in flight, and a prompt acknowledgment comes before them.
    return threaded_sandboxes.start(faults=Faults(latency_ms=4000))


@pytest.fixture
def running(tmp_path: Path, slow_sandbox: RunningSandbox) -> Iterator[Running]:
    run = Running(tmp_path, slow_sandbox)
    deadline = time.monotonic() + GENEROUS
    while slow_sandbox.state.total_requests < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert slow_sandbox.state.total_requests >= 4, "no request reached the sandbox"
    yield run
    if run.process.poll() is None:
        run.process.kill()
        run.process.wait()


def test_first_ctrl_c_is_acknowledged_at_once_naming_the_requests_in_flight(running: Running) -> None:
    running.process.send_signal(signal.SIGINT)
    said = running.wait_for_line("stopping:")
    # Said while the 4 s answers are still on their way: the process has not finished stopping.
    assert running.process.poll() is None
    assert "4 requests in flight" in said and "press Ctrl-C again to leave now" in said
    assert "answers awaited 20s at most (--stop-timeout)" in said  # how long, at most: the default
    assert running.process.wait(GENEROUS) == 130
    assert (next(running.out.iterdir()) / "summary.json").exists()


def test_second_ctrl_c_leaves_no_empty_file_under_a_final_name(running: Running) -> None:
    running.process.send_signal(signal.SIGINT)
    running.wait_for_line("stopping:")
    running.process.send_signal(signal.SIGINT)
    assert running.process.wait(GENEROUS) == 130
    [folder] = running.out.iterdir()
    final = [p for p in folder.iterdir() if not p.name.endswith(".part")]
    assert not [p.name for p in final if p.stat().st_size == 0]
    assert not (folder / "summary.json").exists()  # its absence says the run didn't finish

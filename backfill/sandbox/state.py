"""What a sandbox remembers: its enrollments and counters, the state file that keeps them, the request log."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from aiohttp import web

from ..errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class EnrolledUser:
    """One enrollment as the sandbox committed it; also one line of the state file."""

    user_id: str
    job_id: str
    smile_job_id: str
    photo_sha256: str
    user_created_at: str
    enrolled_at: str


@dataclass
class SandboxState:
    """Everything the sandbox has seen and done; tests read it directly."""

    enrolled: dict[str, EnrolledUser] = field(default_factory=dict)
    requests: Counter[str] = field(default_factory=Counter)
    enroll_attempts_after_enrolled: Counter[str] = field(default_factory=Counter)
    total_requests: int = 0
    # What each POST got: a ResultCode, an error code, an HTTP status for faults, or the reset fault's name.
    answers: Counter[str] = field(default_factory=Counter)
    script_used: Counter[str] = field(default_factory=Counter)
    last_smile_job_id: int = 0
    # Foreign user_ids (held by another partner user) that any request arrived for; `requests` has the counts.
    foreign_requested: set[str] = field(default_factory=set)
    # With `keep_photos` (off: a long rehearsal would hold every photo), the bytes each user_id was enrolled
    # with, for a test to look at what arrived: in memory only, never in the state file (which keeps a digest).
    keep_photos: bool = False
    photos: dict[str, bytes] = field(default_factory=dict)

    def snapshot(self) -> dict[str, Any]:
        """The JSON served at {root}/_sandbox/state, for tests that drive the sandbox from another process."""
        return {
            "enrolled": sorted(self.enrolled),
            "requests": dict(self.requests),
            "conflicts_answered": dict(self.enroll_attempts_after_enrolled),
            "total_requests": self.total_requests,
            "foreign_requested": sorted(self.foreign_requested),
        }


STATE_KEY: Final = web.AppKey("backfill_sandbox_state", SandboxState)


def sandbox_state(app: web.Application) -> SandboxState:
    """The state of an app built by make_app."""
    return app[STATE_KEY]


class StateFile:
    """The enrollments on disk, one JSON line each, appended and fsynced before the answer goes out."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = asyncio.Lock()

    def load(self, state: SandboxState, is_foreign: Callable[[str], bool]) -> None:
        """Put the file's enrollments into `state`; one naming a foreign ID came from other options."""
        path = self.path
        fix = "delete the file to start with no enrollments, or point state_file elsewhere"
        try:
            # Opening for append creates it now, so a bad path fails here and not on the first enrollment.
            with path.open("ab"):
                pass
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                # A line cut short by a crash was never acknowledged: drop it so the next append starts clean.
                data = data[: data.rfind(b"\n") + 1]
                with path.open("r+b") as handle:
                    handle.truncate(len(data))
        except OSError as error:
            raise ConfigError("state_file", str(path), f"can't be used ({error})", fix) from error
        for number, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                user = EnrolledUser(**{name: str(record[name]) for name in EnrolledUser.__dataclass_fields__})
                sequence = int(user.smile_job_id)
            except (ValueError, TypeError, KeyError) as error:
                problem = f"line {number} is not an enrollment record ({error})"
                raise ConfigError("state_file", str(path), problem, fix) from error
            if is_foreign(user.user_id):
                # Loading it would make the ID both ours and someone else's; skipping it rewrites history.
                problem = f"line {number} enrolls {user.user_id!r}, which these faults make a foreign ID"
                raise ConfigError(
                    "state_file", str(path), problem, "use the seed and foreign IDs of the run that wrote it"
                )
            state.enrolled[user.user_id] = user
            state.last_smile_job_id = max(state.last_smile_job_id, sequence)

    async def append(self, user: EnrolledUser) -> None:
        line = json.dumps(asdict(user), separators=(",", ":")) + "\n"
        async with self._lock:
            await asyncio.to_thread(_append_synced, self.path, line)


class RequestLog:
    """One JSON line when a request arrives and one when it is answered: a slow answer can come much later."""

    def __init__(self, path: Path) -> None:
        try:
            # Line-buffered, not fsynced: a SIGKILL of this process keeps what write() handed the kernel,
            # which is what a crash test that kills the sandbox needs.
            self._file: IO[str] = path.open("a", encoding="utf-8", buffering=1)
        except OSError as error:
            raise ConfigError(
                "request_log", str(path), f"can't be opened ({error})", "choose a writable path"
            ) from error

    def write(
        self, user_id: str | None, answer: str | None, *, foreign: bool, photo: str | None = None
    ) -> None:
        """The arrival line when `answer` is None, else the answer line.

        An arrival carries its wall-clock time (a fleet's rate is audited across processes from these) and a
        short digest of the photo as sent (an audit checks no ID ever arrives with a second photo).
        """
        event = "answer" if answer else "request"
        record: dict[str, str | bool | float | None] = {"user_id": user_id, "event": event}
        if not answer:
            record["t"] = time.time()
            if photo is not None:
                record["photo"] = photo
        if answer:
            record["answer"] = answer
        if foreign:
            # Lets an audit tell a foreign 2209 from one for an ID this sandbox enrolled, line by line.
            record["foreign"] = True
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()


def _append_synced(path: Path, line: str) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())

"""The durable record of every attempt and outcome, keyed by user_id: the source of truth for resuming."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import socket
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from ..errors import CheckpointError, CheckpointLocked

SCHEMA_VERSION = "1"

# States a user_id can be in. SENDING means an attempt was recorded and no answer recorded after it:
# the request may have reached the server, so a later 2209 for it means "already enrolled".
SENDING = "sending"
PENDING = "pending"  # known, not enrolled, nothing in flight (e.g. a run stopped on a systemic error)
ENROLLED = "enrolled"
ALREADY_ENROLLED = "already_enrolled"
ID_CONFLICT = "id_conflict"
FAILED = "failed"
RETRY_EXHAUSTED = "retry_exhausted"
UNKNOWN = "unknown"
DONE_STATES = frozenset({ENROLLED, ALREADY_ENROLLED})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    user_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    in_doubt INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    http_status INTEGER,
    result_code TEXT,
    result_text TEXT,
    smile_job_id TEXT,
    job_id TEXT,
    photo_sha256 TEXT,
    image_path TEXT,
    image_size INTEGER,
    image_mtime_ns INTEGER,
    user_created_at TEXT,
    first_attempt_at TEXT,
    last_attempt_at TEXT,
    finished_at TEXT,
    run_id TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS users_state ON users(state);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    manifest TEXT,
    rows INTEGER,
    exit_code INTEGER,
    pid INTEGER,
    host TEXT
);
"""


@dataclass(frozen=True, slots=True)
class Known:
    """What the checkpoint holds for a user_id, as far as deciding whether to send it again."""

    user_id: str
    state: str
    in_doubt: bool
    attempts: int
    photo_sha256: str | None
    image_path: str | None
    image_size: int | None
    image_mtime_ns: int | None
    result_code: str | None


@dataclass(frozen=True, slots=True)
class Attempt:
    """An attempt about to be sent. Recorded durably before the request leaves."""

    user_id: str
    in_doubt: bool
    photo_sha256: str
    image_path: str
    image_size: int
    image_mtime_ns: int
    user_created_at: str
    at: str
    run_id: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """What an attempt (or a run of retries) ended in for one user_id."""

    user_id: str
    state: str
    in_doubt: bool
    http_status: int | None
    result_code: str
    result_text: str
    smile_job_id: str
    job_id: str
    at: str


class Store(Protocol):
    """What the runner needs of a checkpoint; SQLite today, a shared store for multi-machine runs later."""

    async def lookup(self, user_ids: Sequence[str]) -> dict[str, Known]: ...
    async def record_attempt(self, attempt: Attempt) -> None: ...
    def record_outcome(self, outcome: Outcome) -> None: ...
    async def flush(self) -> None: ...
    async def start_run(self, run_id: str, manifest: str, started_at: str) -> None: ...
    async def finish_run(self, run_id: str, finished_at: str, rows: int, exit_code: int) -> None: ...
    async def close(self) -> None: ...


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class SqliteStore:
    """SQLite in WAL mode with synchronous=FULL, driven by one thread.

    Group commit: callers queue operations; whenever the writer thread is idle it takes everything queued
    and commits it as one transaction. An attempt's caller waits until its transaction is on disk, so
    "recorded before sent" holds, while one fsync is shared by every attempt that arrived meanwhile.
    """

    def __init__(
        self, conn: sqlite3.Connection, executor: ThreadPoolExecutor, lock: int | None = None
    ) -> None:
        self._conn = conn
        self._lock = lock
        self._executor = executor
        self._queue: list[tuple[str, tuple[Any, ...], asyncio.Future[None] | None]] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None

    @classmethod
    async def open(cls, path: Path, partner_id: str, env: str, *, create: bool = True) -> SqliteStore:
        """Open (or create) the checkpoint. A writer (create=True) holds the run lock until close()."""
        lock = acquire_lock(path) if create else None
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        loop = asyncio.get_running_loop()
        try:
            conn = await loop.run_in_executor(executor, _connect, path, partner_id, env, create)
        except BaseException:
            executor.shutdown(wait=False)
            if lock is not None:
                os.close(lock)
            raise
        return cls(conn, executor, lock)

    async def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as exc:
            # A damaged file can open cleanly and fail on the first read of a users page.
            raise CheckpointError(
                f"the checkpoint can't be read: {exc}. Check it with `sqlite3 FILE 'PRAGMA integrity_check'`"
            ) from exc

    async def lookup(self, user_ids: Sequence[str]) -> dict[str, Known]:
        self._raise_if_failed()
        result: dict[str, Known] = await self._call(_lookup, self._conn, list(user_ids))
        return result

    async def record_attempt(self, attempt: Attempt) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._enqueue(_UPSERT_ATTEMPT, _attempt_params(attempt), future)
        await future

    def record_outcome(self, outcome: Outcome) -> None:
        # No waiting: losing an outcome in a crash only leaves the row SENDING, and resume re-sends it,
        # where 2209 then reads as already enrolled.
        self._enqueue(_UPDATE_OUTCOME, _outcome_params(outcome), None)

    async def flush(self) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._enqueue("", (), future)
        await future

    async def start_run(self, run_id: str, manifest: str, started_at: str) -> None:
        params = (run_id, started_at, manifest, os.getpid(), socket.gethostname())
        self._enqueue(
            "INSERT INTO runs(run_id, started_at, manifest, pid, host) VALUES (?,?,?,?,?)", params, None
        )
        await self.flush()

    async def finish_run(self, run_id: str, finished_at: str, rows: int, exit_code: int) -> None:
        sql = "UPDATE runs SET finished_at=?, rows=?, exit_code=? WHERE run_id=?"
        self._enqueue(sql, (finished_at, rows, exit_code, run_id), None)
        await self.flush()

    async def close(self) -> None:
        try:
            if self._writer is not None and self._failure is None:
                await self.flush()
        finally:
            if self._writer is not None:
                self._writer.cancel()
            await self._call(self._conn.close)
            self._executor.shutdown(wait=True)
            if self._lock is not None:
                os.close(self._lock)  # closing the descriptor releases the flock
                self._lock = None

    def _enqueue(self, sql: str, params: tuple[Any, ...], future: asyncio.Future[None] | None) -> None:
        self._raise_if_failed()
        self._queue.append((sql, params, future))
        self._wake.set()
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(
                self._write_loop(), name="checkpoint-writer"
            )

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise CheckpointError(f"the checkpoint can no longer be written: {self._failure}")

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._queue = self._queue, []
            if not batch:
                continue
            try:
                await self._call(_commit, self._conn, [(sql, params) for sql, params, _ in batch if sql])
            except Exception as exc:  # any failure: waiters must hear of it, or they wait for ever
                self._failure = exc
                error = CheckpointError(f"the checkpoint can no longer be written: {exc}")
                for _, _, future in [*batch, *self._queue]:
                    if future is not None and not future.done():
                        future.set_exception(error)
                return
            for _, _, future in batch:
                if future is not None and not future.done():
                    future.set_result(None)


_UPSERT_ATTEMPT = """
INSERT INTO users (user_id, state, in_doubt, attempts, photo_sha256, image_path, image_size, image_mtime_ns,
                   user_created_at, first_attempt_at, last_attempt_at, run_id)
VALUES (?, 'sending', ?, 1, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT(user_id) DO UPDATE SET
    state = 'sending',
    -- Doubt only grows. Whether this attempt follows a lost answer is the runner's call (a row left SENDING
    -- by a crash is in doubt; this run's own earlier 503 is not), so the state alone must not decide it.
    in_doubt = users.in_doubt OR excluded.in_doubt,
    attempts = users.attempts + 1,
    photo_sha256 = excluded.photo_sha256, image_path = excluded.image_path,
    image_size = excluded.image_size, image_mtime_ns = excluded.image_mtime_ns,
    user_created_at = excluded.user_created_at,
    last_attempt_at = excluded.last_attempt_at, run_id = excluded.run_id
"""

_UPDATE_OUTCOME = """
UPDATE users SET state = ?, in_doubt = (in_doubt OR ?), http_status = ?, result_code = ?, result_text = ?,
    smile_job_id = COALESCE(NULLIF(?, ''), smile_job_id), job_id = COALESCE(NULLIF(?, ''), job_id),
    finished_at = ?
WHERE user_id = ?
"""


def _attempt_params(a: Attempt) -> tuple[Any, ...]:
    return (
        a.user_id, int(a.in_doubt), a.photo_sha256, a.image_path, a.image_size, a.image_mtime_ns,
        a.user_created_at, a.at, a.at, a.run_id,
    )  # fmt: skip


def _outcome_params(o: Outcome) -> tuple[Any, ...]:
    return (
        o.state, int(o.in_doubt), o.http_status, o.result_code, o.result_text, o.smile_job_id, o.job_id,
        o.at, o.user_id,
    )  # fmt: skip


def acquire_lock(path: Path) -> int:
    """Hold `<checkpoint>.lock` for this process, or raise CheckpointLocked naming the live holder.

    flock is released by the kernel when its holder dies, however it dies, so a lock left by a killed
    run is simply taken over; the file's text only tells a person who holds it.
    """
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise CheckpointError(f"can't create the lock file {lock_path}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode("utf-8", "replace")
        os.close(fd)
        try:
            info = json.loads(holder)
            who = f"pid {info['pid']} on {info['host']}, started {info['started_at']}"
        except (ValueError, KeyError, TypeError):
            who = "another process"
        raise CheckpointLocked(
            f"the checkpoint {path} is in use by {who}. Wait for that run to finish, or stop it; "
            "two runs on one checkpoint would interleave"
        ) from None
    holder_info = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": now_iso()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder_info).encode(), 0)
    return fd


# --- functions below run on the checkpoint's own thread only ---


def _connect(path: Path, partner_id: str, env: str, create: bool) -> sqlite3.Connection:
    if not create and not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        if create and not path.exists():
            # Created owner-only before SQLite opens it: it holds user_ids and file paths.
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        if create:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.executescript(_SCHEMA)
        else:
            # A reader (a dry run) never writes: not the schema, not into some other SQLite file.
            uri = f"{path.resolve().as_uri()}?mode=ro"
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=5000")
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.DatabaseError as exc:
        raise CheckpointError(
            f"can't open the checkpoint {path}: {exc} (is it a backfill checkpoint?)"
        ) from exc
    except OSError as exc:
        raise CheckpointError(f"can't create the checkpoint {path}: {exc.strerror}") from exc
    if not meta:
        rows = [
            ("schema", SCHEMA_VERSION),
            ("partner_id", partner_id),
            ("env", env),
            ("created_at", now_iso()),
        ]
        conn.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", rows)
        return conn
    held = (meta.get("partner_id"), meta.get("env"))
    if held != (partner_id, env):
        conn.close()
        raise CheckpointError(
            f"the checkpoint {path} belongs to partner {held[0]!r} in {held[1]!r}, "
            f"not partner {partner_id!r} in {env!r}: a run must never mark one environment's users "
            "as done in another. "
            "Use the checkpoint made for this partner and environment (--checkpoint), or a new path"
        )
    if meta.get("schema") != SCHEMA_VERSION:
        conn.close()
        raise CheckpointError(
            f"the checkpoint {path} has schema {meta.get('schema')}, expected {SCHEMA_VERSION}"
        )
    return conn


def _commit(conn: sqlite3.Connection, statements: Iterable[tuple[str, tuple[Any, ...]]]) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        for sql, params in statements:
            conn.execute(sql, params)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


_LOOKUP = """
SELECT user_id, state, in_doubt, attempts, photo_sha256, image_path, image_size, image_mtime_ns, result_code
FROM users WHERE user_id IN (SELECT value FROM json_each(?))
"""


def _lookup(conn: sqlite3.Connection, user_ids: list[str]) -> dict[str, Known]:
    rows = conn.execute(_LOOKUP, (json.dumps(user_ids),)).fetchall()
    return {
        r[0]: Known(r[0], r[1], bool(r[2]), r[3], r[4], r[5], r[6], r[7], r[8])
        for r in rows
    }  # fmt: skip


# --- reading a checkpoint for `status` and `export` (no lock: a live run may be writing) ---

# States a row can be re-sent from with `retry`: the transient ones by default, `failed` only when named.
RETRYABLE_STATES = frozenset({PENDING, SENDING, RETRY_EXHAUSTED, UNKNOWN, FAILED})
TRANSIENT_STATES = frozenset({PENDING, SENDING, RETRY_EXHAUSTED, UNKNOWN})
EXPORT_FIELDS = (
    "user_id", "user_created_at", "image_path", "state", "in_doubt", "attempts", "http_status", "result_code",
    "result_text", "smile_job_id", "job_id", "photo_sha256", "first_attempt_at", "last_attempt_at",
    "finished_at", "run_id",
)  # fmt: skip


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    started_at: str
    finished_at: str | None
    manifest: str | None
    rows: int | None
    exit_code: int | None
    host: str | None
    pid: int | None


@dataclass(frozen=True)
class Status:
    """What `backfill status` shows: a checkpoint's counts, its recent runs, and what is left to do."""

    path: str
    partner_id: str
    env: str
    counts: dict[str, int]
    waiting_for_retry: int
    oldest_unfinished: dict[str, Any] | None
    runs: list[RunRecord]


def _open_read_only(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}. Name it with --checkpoint, or run from its folder")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("SELECT 1 FROM meta LIMIT 1").fetchall()
    except sqlite3.DatabaseError as exc:
        raise CheckpointError(
            f"can't read the checkpoint {path}: {exc} (is it a backfill checkpoint?)"
        ) from exc
    return conn


def read_status(path: Path, *, last_runs: int = 10) -> Status:
    conn = _open_read_only(path)
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        counts = dict(
            conn.execute("SELECT state, count(*) FROM users GROUP BY state ORDER BY state").fetchall()
        )
        marks = ",".join("?" * len(TRANSIENT_STATES))
        oldest = conn.execute(
            f"SELECT user_id, state, attempts, first_attempt_at, last_attempt_at, result_code, result_text "
            f"FROM users WHERE state IN ({marks}) ORDER BY first_attempt_at LIMIT 1",
            tuple(sorted(TRANSIENT_STATES)),
        ).fetchone()
        runs = [
            RunRecord(*row)
            for row in conn.execute(
                "SELECT run_id, started_at, finished_at, manifest, rows, exit_code, host, pid FROM runs "
                "ORDER BY started_at DESC LIMIT ?",
                (last_runs,),
            )
        ]
    except sqlite3.DatabaseError as exc:
        raise CheckpointError(f"can't read the checkpoint {path}: {exc}") from exc
    finally:
        conn.close()
    names = (
        "user_id",
        "state",
        "attempts",
        "first_attempt_at",
        "last_attempt_at",
        "result_code",
        "result_text",
    )
    return Status(
        path=str(path),
        partner_id=meta.get("partner_id", ""),
        env=meta.get("env", ""),
        counts=counts,
        waiting_for_retry=sum(n for state, n in counts.items() if state in TRANSIENT_STATES),
        oldest_unfinished=dict(zip(names, oldest, strict=True)) if oldest else None,
        runs=runs,
    )


def iter_rows(path: Path, states: Iterable[str] | None = None) -> Iterator[dict[str, Any]]:
    """Every row the checkpoint knows (or those in `states`), in user_id order, streamed."""
    conn = _open_read_only(path)
    try:
        sql = f"SELECT {', '.join(EXPORT_FIELDS)} FROM users"
        params: tuple[str, ...] = ()
        if states is not None:
            params = tuple(sorted(set(states)))
            sql += f" WHERE state IN ({','.join('?' * len(params))})"
        cursor = conn.execute(sql + " ORDER BY user_id", params)
        while batch := cursor.fetchmany(1000):
            for row in batch:
                yield dict(zip(EXPORT_FIELDS, row, strict=True))
    except sqlite3.DatabaseError as exc:
        raise CheckpointError(f"can't read the checkpoint {path}: {exc}") from exc
    finally:
        conn.close()

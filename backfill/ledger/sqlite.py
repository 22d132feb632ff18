"""The SQLite Store: one file on local disk, WAL with synchronous=FULL, group commits from one writer thread."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import logging
import operator
import os
import queue
import socket
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from itertools import chain
from pathlib import Path
from typing import Any

from ..clock import now_iso
from ..errors import LedgerError, LedgerLocked
from ..images import PhotoKey
from ..vocab import DONE_STATES, FINISHED_STATES, TRANSIENT_STATES, State
from . import (
    HOLDERS_PAGE,
    AttemptRequest,
    Binding,
    DoneRow,
    Forgetting,
    Holder,
    LedgerRow,
    LedgerStatus,
    Outcome,
    Refused,
    RunRecord,
    Settled,
    Store,
    Ticket,
    Tombstone,
    row_of,
)
from . import transitions as tr

SCHEMA_VERSION = "5"
_AUDIT_COLUMNS = ("operator", "version", "api_key_id")
_KEY = "photo_key"  # meta's row holding the ledger's PhotoKey secret, in hex
log = logging.getLogger("backfill")
_STATES = ", ".join(f"'{s.value}'" for s in State)
_USERS = f"""
CREATE TABLE IF NOT EXISTS users (
    user_id TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ({_STATES})),
    attempts INTEGER NOT NULL CHECK (attempts >= 0),
    doubt INTEGER NOT NULL DEFAULT 0,
    photo_sha256 TEXT,
    image_ref TEXT,
    image_size INTEGER,
    image_version TEXT,
    user_created_at TEXT,
    http_status INTEGER,
    result_code TEXT NOT NULL DEFAULT '',
    result_text TEXT NOT NULL DEFAULT '',
    smile_job_id TEXT NOT NULL DEFAULT '',
    job_id TEXT NOT NULL DEFAULT '',
    first_attempt_at TEXT,
    last_attempt_at TEXT,
    finished_at TEXT,
    run_id TEXT,
    sent_sha256 TEXT,
    transform TEXT NOT NULL DEFAULT '',
    photo_sample INTEGER
) WITHOUT ROWID"""
# How the shared-photo census finds the IDs pinned to a photo like one it may send (`Store.holders`).
_PHOTO_INDEX = """
CREATE INDEX IF NOT EXISTS users_photo ON users(image_size, photo_sample) WHERE photo_sample IS NOT NULL"""
# A forgotten user's tombstone (`backfill forget`): its ID's keyed hash, never the ID; no personal data.
_FORGOTTEN = f"""
CREATE TABLE IF NOT EXISTS forgotten (
    user_key TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ({_STATES})),
    doubt INTEGER NOT NULL,
    first_attempt_at TEXT,
    finished_at TEXT,
    forgotten_at TEXT NOT NULL,
    forgotten_by TEXT NOT NULL
) WITHOUT ROWID"""
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
{_USERS};
{_FORGOTTEN};
CREATE INDEX IF NOT EXISTS users_state ON users(state);
{_PHOTO_INDEX};
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    started_at TEXT NOT NULL,
    manifest TEXT,
    manifest_sha256 TEXT,
    pid INTEGER,
    host TEXT,
    finished_at TEXT,
    rows INTEGER,
    exit_code INTEGER,
    note TEXT,
    operator TEXT,
    version TEXT,
    api_key_id TEXT
);
"""
_COLUMNS = tuple(f.name for f in fields(LedgerRow))
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM users"
_UPSERT = f"INSERT OR REPLACE INTO users ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
# A group's rows go in statements of this many rows at most: each is one sqlite3_step, and the sqlite3 module lets
# go of the GIL around every step, so executemany's step per row handed the GIL to the event loop's thread and
# back twice a row (see _upsert_many). 50 rows bind 900 values, within the 999 any SQLite allows.
_ROWS_PER_STATEMENT = 50
_RUN_COLUMNS = tuple(f.name for f in fields(RunRecord))


_BEGUN_MAX = 65_536
_STATE_OF = {s.value: s for s in State}
_STATE_AT, _DOUBT_AT = _COLUMNS.index("state"), _COLUMNS.index("doubt")
# A row's values in column order, as _UPSERT binds them: sqlite3 binds the State (a str) and the bool (an int)
# as they are, so nothing is converted on the way in.
_values: Callable[[LedgerRow], tuple[Any, ...]] = operator.attrgetter(*_COLUMNS)


@functools.lru_cache(maxsize=_ROWS_PER_STATEMENT)
def _upsert_rows(n: int) -> str:
    """_UPSERT for `n` rows in one statement."""
    one = f"({', '.join('?' * len(_COLUMNS))})"
    return f"INSERT OR REPLACE INTO users ({', '.join(_COLUMNS)}) VALUES {', '.join([one] * n)}"


def _upsert_many(conn: sqlite3.Connection, rows: Sequence[LedgerRow]) -> None:
    """Write `rows` (one per user_id), a statement per _ROWS_PER_STATEMENT of them.

    Not executemany: it steps once per row, and each step lets go of the GIL and takes it back, which with the
    event loop's thread busy meant a wait (and a context switch on both threads) per row written. Measured in a
    run of 20 KB photos: the ledger's thread took 80 us of CPU a row, with 1.3 context switches a row.
    """
    for start in range(0, len(rows), _ROWS_PER_STATEMENT):
        chunk = rows[start : start + _ROWS_PER_STATEMENT]
        conn.execute(_upsert_rows(len(chunk)), list(chain.from_iterable(map(_values, chunk))))


def _row(values: Sequence[Any]) -> LedgerRow:
    typed = list(values)
    typed[_STATE_AT] = _STATE_OF[typed[_STATE_AT]]
    typed[_DOUBT_AT] = bool(typed[_DOUBT_AT])
    return row_of(typed)


# One write waiting for the next group commit: an attempt to begin, an outcome to settle, a statement on the runs
# table, or None (a flush: nothing but the wait). With it, the future of whoever waits for that commit, or None.
_Statement = tuple[str, tuple[Any, ...]]
_Write = tuple[AttemptRequest | Outcome | _Statement | None, asyncio.Future[Any] | None]


@dataclass(frozen=True, slots=True, kw_only=True)
class _Batch:
    """The writes made in one turn of the event loop, handed to the ledger's thread together."""

    loop: asyncio.AbstractEventLoop
    writes: list[_Write]


@dataclass(frozen=True, slots=True, kw_only=True)
class _Call:
    """Anything else the connection does (a read, a forget, closing it): run on the ledger's thread, told back."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    future: asyncio.Future[Any]
    last: bool = False  # the store's closing: the thread ends once it has run


class SqliteStore(Store):
    """SQLite in WAL mode with synchronous=FULL, driven by one thread.

    Group commit: the writes made in one turn of the event loop are handed to the ledger's thread together, and
    that thread, whenever it is free, takes everything handed to it so far and applies it as one transaction. It
    takes its next group itself, as soon as a commit is done, and wakes the event loop once a group to tell its
    writers: the next group no longer waits for the loop to have heard of the last one. A caller that must know its write is
    on disk waits for that commit, while one fsync is shared by every write that arrived meanwhile; a write nobody
    waits for (an outcome whose loss costs no promise, a note) costs no future at all. Each write goes through
    the pure transition functions of transitions.py, in the order it was made, so this backend can't drift from
    the contract; the rows a group changes are then written by multi-row statements.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        binding: Binding,
        location: str,
        lock: int | None,
        photo_key: PhotoKey,
    ) -> None:
        self.binding = binding
        self.location = location
        self.photo_key = photo_key
        self._conn = conn
        self._lock = lock
        # The writes made in this turn of the loop, not yet handed to the ledger's thread (see _enqueue).
        self._pending: list[_Write] = []
        # Writes handed over whose group's commit the loop hasn't heard of yet: close() waits for them.
        self._unconfirmed = 0
        # Set on the ledger's thread when a group can't be written, before any caller hears of it: from then on
        # every write fails with it (a plain attribute: one reference stored, atomic under the GIL).
        self._failure: BaseException | None = None
        # The ledger's thread's work, in the order given: batches of writes and calls. A SimpleQueue, so that the
        # thread blocks on it between groups and takes its next group without the event loop's help.
        self._jobs: queue.SimpleQueue[_Batch | _Call] = queue.SimpleQueue()
        self._closed = False
        self._closing: asyncio.Task[None] | None = None
        # Rows this store left SENDING (begun, not yet settled), as written: a group reads its rows here instead of
        # SELECTing them again. Touched only on the writer thread, after each commit; exact, because this store is
        # the ledger's one writer (the flock) and every write to users goes through begin/settle.
        self._begun: dict[str, LedgerRow] = {}
        # IDs a lookup found nowhere in the ledger and no commit has written since: a group begins them as new
        # without reading them again. The planner looks up every row it sends just before, so a run's new rows
        # cost no read in the writer's transaction. Exact for the same reason as `_begun`; touched only on the
        # ledger's thread.
        self._absent: set[str] = set()
        # The ledger's key while it holds any tombstone, else None: only then is a new ID looked for among the
        # forgotten before it is begun (this store is the one writer: none is made behind its back).
        self._forgotten_key: PhotoKey | None = None
        # The connection is only ever used on this thread: reads, groups, forgets, its closing.
        self._thread = threading.Thread(target=self._serve, name="ledger", daemon=True)
        self._thread.start()

    @classmethod
    async def open(
        cls, path: Path, binding: Binding | None, *, writable: bool, legacy_endpoints: Mapping[str, str] = {}
    ) -> SqliteStore:
        """Open (or, writable, create) the ledger at `path`; check it belongs to `binding` when one is given.

        A writable store holds the ledger's lock until close(): the lock is on the database file itself, so the
        same ledger reached through a symlink, a relative path or `..` is still one ledger with one writer.
        `legacy_endpoints` maps a schema-1 ledger's env label to its endpoint, to migrate it forward.
        """
        named = Path(os.path.abspath(path))
        if not writable and not named.is_file():
            raise LedgerError(f"no ledger at {named}. Name it with --ledger")
        # SQLite names the WAL after the path it is given: opened by another name, a ledger whose last commits
        # are still in its WAL (as a killed run leaves them) would read as empty. A symlink is resolved here; a
        # hard link can't be, so it is refused, before the lock, so that nothing about it is half-done.
        if writable:
            _make_private_parents(named.parent)
        path = Path(os.path.realpath(named))
        _refuse_hard_links(named, path)
        lock = acquire_lock(path) if writable else None
        try:
            _refuse_hard_links(named, path)  # made between the check and the lock
        except BaseException:
            if lock is not None:
                os.close(lock)
            raise
        loop = asyncio.get_running_loop()
        try:
            conn, held, key = await loop.run_in_executor(
                None, _connect, path, binding, writable, dict(legacy_endpoints)
            )
        except BaseException:
            if lock is not None:
                os.close(lock)
            raise
        store = cls(conn, binding=held, location=str(path), lock=lock, photo_key=key)
        try:
            if await store._call(_any_forgotten, conn):
                store._forgotten_key = key
        except BaseException:
            await store.close()
            raise
        return store

    # --- the contract ---

    async def lookup(self, user_ids: Sequence[str]) -> dict[str, LedgerRow]:
        self._raise_if_failed()
        found: dict[str, LedgerRow] = await self._call(_lookup, self._conn, list(user_ids), self._absent)
        return found

    async def done(self, user_ids: Sequence[str]) -> dict[str, DoneRow]:
        self._raise_if_failed()
        found: dict[str, DoneRow] = await self._call(_done, self._conn, list(user_ids))
        return found

    async def holders(
        self, photos: Sequence[tuple[int, int]], after: Holder | None = None, limit: int = HOLDERS_PAGE
    ) -> list[Holder]:
        self._raise_if_failed()
        found: list[Holder] = await self._call(_holders, self._conn, list(photos), after, limit)
        return found

    async def keep_samples(self, samples: Sequence[tuple[str, str, int]]) -> None:
        if samples:
            await self._write((_KEEP_SAMPLES, (json.dumps(list(samples)),)))

    async def begin_attempt(self, request: AttemptRequest) -> Ticket | Refused:
        # Waited for: "recorded before sent" is the whole point.
        result: Ticket | Refused = await self._write(request)
        return result

    async def settle(self, outcome: Outcome) -> Settled:
        if tr.must_be_durable(outcome):
            result: Settled = await self._write(outcome)
            return result
        # Not waited for: the next commit takes it with whatever else is queued. A refusal is still told, by the
        # log line its group's commit writes.
        self._enqueue(outcome, None)
        return Settled.QUEUED

    async def flush(self) -> None:
        await self._write(None)

    async def start_run(self, record: RunRecord) -> None:
        record = replace(record, pid=record.pid or os.getpid(), host=record.host or socket.gethostname())
        sql = f"INSERT INTO runs ({', '.join(_RUN_COLUMNS)}) VALUES ({', '.join('?' * len(_RUN_COLUMNS))})"
        await self._write((sql, tuple(getattr(record, c) for c in _RUN_COLUMNS)))

    async def finish_run(self, run_id: str, *, finished_at: str, rows: int, exit_code: int) -> None:
        sql = "UPDATE runs SET finished_at=?, rows=?, exit_code=? WHERE run_id=?"
        await self._write((sql, (finished_at, rows, exit_code, run_id)))

    async def note_run(self, run_id: str, note: str | None) -> None:
        # On disk with the next commit: a note lost in a crash costs nothing but the note.
        self._enqueue(("UPDATE runs SET note=? WHERE run_id=?", (note, run_id)), None)

    async def status(self, *, last_runs: int = 10) -> LedgerStatus:
        self._raise_if_failed()
        counts, oldest, runs = await self._call(_status, self._conn, last_runs)
        forgotten: int = await self._call(_count_forgotten, self._conn)
        return LedgerStatus(
            forgotten=forgotten,
            location=self.location,
            binding=self.binding,
            counts=counts,
            waiting_for_retry=sum(n for s, n in counts.items() if s in TRANSIENT_STATES),
            oldest_unfinished=oldest,
            runs=runs,
            writer_alive=self._lock is not None or writer_alive(Path(self.location)),
        )

    async def rows(self, states: Collection[State] | None = None) -> AsyncIterator[LedgerRow]:
        chosen = None if states is None else sorted({State(s).value for s in states})
        after = ""
        while True:
            # Keyset pages: a live run may be writing, and no cursor is held open between pages.
            page: list[LedgerRow] = await self._call(_page, self._conn, chosen, after, 1000)
            for row in page:
                yield row
            if len(page) < 1000:
                return
            after = page[-1].user_id

    async def forgotten(self, user_ids: Sequence[str]) -> dict[str, Tombstone]:
        self._raise_if_failed()
        if self._lock is not None and self._forgotten_key is None:
            return {}  # this store is the one writer, and it holds no tombstone: nothing to read
        found: dict[str, Tombstone] = await self._call(_forgotten, self._conn, self.photo_key, list(user_ids))
        return found

    async def forget(self, user_ids: Sequence[str], *, at: str, by: str, dry_run: bool = False) -> Forgetting:
        return await self._forget(list(dict.fromkeys(user_ids)), None, at=at, by=by, dry_run=dry_run)

    async def purge(self, before: str, *, at: str, by: str, dry_run: bool = False) -> Forgetting:
        return await self._forget(None, before, at=at, by=by, dry_run=dry_run)

    async def _forget(
        self, user_ids: list[str] | None, before: str | None, *, at: str, by: str, dry_run: bool
    ) -> Forgetting:
        if self._lock is None:
            raise LedgerError(
                f"the ledger {self.location} was opened to read: nothing can be forgotten in it"
            )
        await self.flush()  # every write before it is in, so the rows it reads are the ledger's last word
        done: Forgetting = await self._call(self._forget_here, user_ids, before, at, by, dry_run)
        return done

    def _forget_here(
        self, user_ids: list[str] | None, before: str | None, at: str, by: str, dry_run: bool
    ) -> Forgetting:
        """On the ledger's thread, as the caches it clears are only ever touched there."""
        done = _forget(self._conn, self.photo_key, user_ids, before, at, by, dry_run)
        if not dry_run and done.count:
            self._forgotten_key = self.photo_key
            self._begun.clear()
            self._absent.clear()
        return done

    async def close(self) -> None:
        # One closing, whoever asks and however often: every caller returns once the flock is released.
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        try:
            if (self._pending or self._unconfirmed) and self._failure is None:
                await self.flush()
        finally:
            self._closed = True  # from here a write is refused (_enqueue)
            # A write made in the turn the flush woke, still held for the end of that turn, goes in the last
            # group: handed over later, it would wait for ever on a queue whose thread has ended.
            self._hand_off()
            try:
                await self._call(self._conn.close, last=True)
            finally:
                if self._lock is not None:
                    os.close(self._lock)  # closing the descriptor releases the flock
                    self._lock = None

    # --- the writer: queued on the event loop, taken and applied by the ledger's thread, told back once a group ---

    async def _call(self, fn: Callable[..., Any], *args: Any, last: bool = False) -> Any:
        if self._closed and not last:
            raise LedgerError(f"the ledger {self.location} is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._jobs.put(_Call(fn=fn, args=args, future=future, last=last))
        try:
            return await future
        except sqlite3.Error as exc:
            # A damaged file can open cleanly and fail on the first read of a users page.
            raise LedgerError(
                f"the ledger {self.location} can't be read: {exc}. "
                "Check it with `sqlite3 FILE 'PRAGMA integrity_check'`"
            ) from exc

    def _write(self, what: AttemptRequest | Outcome | _Statement | None) -> asyncio.Future[Any]:
        """Queue `what`; the future is its result, set once the group holding it is on disk."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._enqueue(what, future)
        return future

    def _enqueue(
        self, what: AttemptRequest | Outcome | _Statement | None, future: asyncio.Future[Any] | None
    ) -> None:
        # A write nobody waits for still fails loudly: every later caller hears of it here.
        self._raise_if_failed()
        if self._closed:
            raise LedgerError(f"the ledger {self.location} is closed: nothing more can be written to it")
        if not self._pending:
            # A turn of the loop later, so that the writes made in this turn (every worker the last commit woke)
            # are handed over, and go in a group, together: one hand-off a turn, not one a write.
            asyncio.get_running_loop().call_soon(self._hand_off)
        self._pending.append((what, future))

    def _hand_off(self) -> None:
        writes, self._pending = self._pending, []
        if not writes:
            return  # a failure since failed them (_failed)
        self._unconfirmed += len(writes)
        self._jobs.put(_Batch(loop=asyncio.get_running_loop(), writes=writes))

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise _unwritable(self._failure)

    def _serve(self) -> None:
        """The ledger's thread: wait for work, take everything handed over by then, do it; until closed.

        The calls taken (reads) run first, on what is committed: a read never sees a write before its commit,
        and may run ahead of writes handed over before it (nothing relies on more: each write is applied to the
        row as committed, or as the group before it left it). Then the writes taken, from every batch in the
        order handed over, are one group; the store's closing, if taken, runs last. The thread holds the store
        until then: a store must be closed.
        """
        jobs = self._jobs
        while True:
            taken = [jobs.get()]
            try:
                while True:
                    taken.append(jobs.get_nowait())
            except queue.Empty:
                pass
            writes: list[_Write] = []
            loop: asyncio.AbstractEventLoop | None = None
            last: _Call | None = None
            for job in taken:
                if isinstance(job, _Batch):
                    writes += job.writes
                    loop = job.loop
                elif job.last:
                    last = job  # the store's closing: after this group, whatever it holds
                else:
                    _run(job)
            if loop is not None:
                self._commit(writes, loop)
            if last is not None:
                _run(last)
                return

    def _commit(self, writes: list[_Write], loop: asyncio.AbstractEventLoop) -> None:
        """On the ledger's thread: apply the group, then wake the event loop once to tell every writer in it."""
        if self._failure is not None:  # a write handed over before its caller could hear of the failure
            _tell(loop, self._failed, writes, self._failure)
            return
        try:
            results = _apply(self._conn, self._begun, self._absent, writes, self._forgotten_key)
        except BaseException as exc:  # any failure: waiters must hear of it, or they wait for ever
            self._failure = exc
            _tell(loop, self._failed, writes, exc)
        else:
            _tell(loop, self._committed, writes, results)

    def _committed(self, writes: list[_Write], results: list[object]) -> None:
        self._unconfirmed -= len(writes)
        for (what, future), result in zip(writes, results, strict=True):
            if future is not None:
                if not future.done():  # a waiter cancelled (a stop) no longer wants the result
                    future.set_result(result)
            elif result is Settled.FENCED and isinstance(what, Outcome):
                _tell_fenced(what)

    def _failed(self, writes: list[_Write], exc: BaseException) -> None:
        # The group was rolled back and nothing more is written: every write in it, and every one made since,
        # fails with the reason; a later call raises it too (_raise_if_failed).
        self._unconfirmed -= len(writes)
        waiting, self._pending = [*writes, *self._pending], []
        for _, future in waiting:
            if future is not None and not future.done():
                future.set_exception(_unwritable(exc))


def _run(call: _Call) -> None:
    """Run `call` on the ledger's thread; its result or error goes back to its caller's loop."""
    try:
        result = call.fn(*call.args)
    except BaseException as exc:
        _tell(call.future.get_loop(), _settle_future, call.future, None, exc)
    else:
        _tell(call.future.get_loop(), _settle_future, call.future, result, None)


def _settle_future(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # its caller was cancelled
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


def _tell(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    """Wake `loop` to run fn(*args): the one hand-back from the ledger's thread."""
    with contextlib.suppress(RuntimeError):  # the loop is closed: no one is left to tell
        loop.call_soon_threadsafe(fn, *args)


def _unwritable(exc: BaseException) -> LedgerError:
    return LedgerError(f"the ledger can no longer be written: {exc}")


def _tell_fenced(outcome: Outcome) -> None:
    log.warning(
        "%s: the ledger refused attempt %s's outcome %s",
        outcome.user_id,
        outcome.attempt,
        outcome.state,
        extra={
            "event": "outcome_fenced",
            "fields": {"user_id": outcome.user_id, "attempt": outcome.attempt},
        },
    )


def _make_private_parents(folder: Path) -> None:
    """The ledger's folder and any missing parents, new ones owner-only: it holds user_ids and file paths."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        for parent in reversed(missing):
            parent.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise LedgerError(
            f"can't create the ledger's folder {folder}: {exc.strerror}. Name a writable place with --ledger"
        ) from exc


def _refuse_hard_links(named: Path, path: Path) -> None:
    try:
        links = os.stat(path).st_nlink
    except FileNotFoundError:
        return
    except OSError as exc:
        raise LedgerError(f"can't open the ledger {named}: {exc.strerror}") from exc
    if links > 1:
        raise LedgerError(
            f"the ledger {named} has {links} hard links: SQLite keeps its latest commits in a file named after "
            "the path used, so two names could see two different ledgers. Remove the extra links and name the "
            "ledger by one path (a symbolic link is fine)"
        )


def acquire_lock(path: Path) -> int:
    """Hold the ledger at `path` for this process, or raise LedgerLocked naming the live holder.

    The flock is on the database file itself (created owner-only if absent), so every name of the same file
    (symlinks, hard links, relative paths) meets the same lock. flock is released by the kernel when its holder
    dies, however it dies, so a lock left by a killed run is simply taken over. `<real path>.lock` only tells a
    person who holds it.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise LedgerError(f"can't open the ledger {path}: {exc.strerror}") from exc
    note = Path(os.path.realpath(path) + ".lock")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        try:
            info = json.loads(note.read_text(encoding="utf-8"))
            who = f"pid {info['pid']} on {info['host']}, started {info['started_at']}"
        except (OSError, ValueError, KeyError, TypeError):
            who = "another process"
        raise LedgerLocked(
            f"the ledger {path} is in use by {who}. Wait for it to finish, or stop it: one process at a time "
            "writes a SQLite ledger (two runs on one would send the same users twice; a forget would remove rows "
            "a run is about to settle)"
        ) from None
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": now_iso()}
    try:
        handle = os.open(note, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(holder, out)
    except OSError:
        pass  # the note is for people; the flock is the lock
    return fd


def writer_alive(path: Path) -> bool:
    """Whether some live process holds the ledger's writer lock now: a shared probe, released at once.

    The kernel drops a flock when its holder dies, so a run whose row says "not finished" while this is False
    died without finishing (SIGKILL, power loss). A probe that can't open the file holds nothing: False.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing the descriptor releases the probe's shared lock, if it got one
    return False


@dataclass(frozen=True, slots=True, kw_only=True)
class FoundLedger:
    """A SQLite ledger found in a folder, as read without writing: whose it is, what it holds, its last run."""

    path: str
    binding: Binding | None  # None: not a ledger this version reads (see `problem`)
    counts: dict[str, int]  # rows by state
    last_run: RunRecord | None
    running: bool  # a live process holds its writer's lock now
    problem: str = ""  # why it can't be read as it is: an older schema, not a ledger, damaged

    @property
    def rows(self) -> int:
        return sum(self.counts.values())


def find_ledgers(folder: Path) -> list[FoundLedger]:
    """Every SQLite ledger (`*.sqlite`) in `folder`, by path: none when the folder doesn't exist.

    Each is opened read-only: nothing is created, migrated or locked (a run may be writing it now). One that can't
    be read as this version's ledger is still listed, with the reason.
    """
    if not folder.is_dir():
        return []
    return [_found(Path(os.path.abspath(p))) for p in sorted(folder.glob("*.sqlite")) if p.is_file()]


def _found(path: Path) -> FoundLedger:
    running = writer_alive(path)
    # With no write-ahead log beside it, every commit is in the file itself and no one is writing (a writer's
    # connection keeps its log): read as it stands, SQLite leaves no -wal or -shm file behind. With one (a run
    # now, or one that was killed), its commits are read through it, from the files already there.
    quiet = not Path(f"{path}-wal").exists()

    def unread(problem: str, binding: Binding | None = None) -> FoundLedger:
        return FoundLedger(
            path=str(path), binding=binding, counts={}, last_run=None, running=running, problem=problem
        )

    try:
        mode = "immutable=1" if quiet else "mode=ro"
        conn = sqlite3.connect(f"{path.as_uri()}?{mode}", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        return unread(f"can't be opened: {exc}")
    try:
        conn.execute("PRAGMA busy_timeout=5000")
        try:
            meta = _meta(conn)
        except sqlite3.DatabaseError as exc:
            return unread(f"not a backfill ledger ({exc})")
        if not meta:
            return unread("not a backfill ledger (it has no binding)")
        if meta.get("schema") != SCHEMA_VERSION:
            # Schema 1 was bound to an env label, not an endpoint; 2 pinned plain digests; 3 had no tombstones: a
            # writable command migrates each.
            endpoint = meta.get("endpoint") or meta.get("env", "")
            old = Binding(partner_id=meta.get("partner_id", ""), endpoint=endpoint)
            return unread(f"schema {meta.get('schema')!r}: run or retry with it once to migrate it", old)
        counts, _, runs = _status(conn, 1)
    except sqlite3.Error as exc:
        return unread(f"can't be read: {exc}")
    finally:
        conn.close()
    binding = Binding(partner_id=meta.get("partner_id", ""), endpoint=meta.get("endpoint", ""))
    return FoundLedger(
        path=str(path), binding=binding, counts=counts, last_run=next(iter(runs), None), running=running
    )


# --- functions below run on the ledger's own thread only ---


def _connect(
    path: Path, binding: Binding | None, writable: bool, legacy: dict[str, str]
) -> tuple[sqlite3.Connection, Binding, PhotoKey]:
    try:
        if writable:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=5000")
            meta = _meta(conn)
            if meta.get("schema") in ("1", "2"):
                # The plain photo digests an older schema kept must not outlive the migration anywhere in the
                # file: what a migration frees or overwrites is zeroed, and the WAL that held the pages as they
                # were is checkpointed into the file and truncated.
                conn.execute("PRAGMA secure_delete=ON")
                if meta.get("schema") == "1":
                    _migrate_v1(conn, meta, legacy)
                _migrate_v2(conn)
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                conn.execute("PRAGMA secure_delete=OFF")
            if _meta(conn).get("schema") == "3":
                _migrate_v3(conn)
            if _meta(conn).get("schema") == "4":
                _migrate_v4(conn)
            # One transaction: each statement committed on its own wrote the schema's pages to the WAL again and
            # again (about 100 KB for a new ledger), and a full disk is then met making the ledger.
            conn.executescript(f"BEGIN;{_SCHEMA}COMMIT;")
            present = _run_columns(conn)
            # Added within a schema: older versions name their columns, so they read and write it still.
            for column in ("note", *_AUDIT_COLUMNS):
                if column not in present:
                    conn.execute(f"ALTER TABLE runs ADD COLUMN {column} TEXT")
        else:
            # A reader (status, export, a dry run) never writes: not the schema, not into some other file.
            conn = sqlite3.connect(
                f"{path.as_uri()}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA busy_timeout=5000")
        meta = _meta(conn)
    except sqlite3.DatabaseError as exc:
        raise LedgerError(f"can't open the ledger {path}: {exc} (is it a backfill ledger?)") from exc
    except OSError as exc:
        raise LedgerError(f"can't create the ledger {path}: {exc.strerror}") from exc
    if not meta:
        if not writable or binding is None:
            conn.close()
            raise LedgerError(f"{path} is not a backfill ledger (it has no binding)")
        key = PhotoKey.new()
        rows = [
            ("schema", SCHEMA_VERSION),
            ("partner_id", binding.partner_id),
            ("endpoint", binding.endpoint),
            ("created_at", now_iso()),
            (_KEY, key.secret.hex()),
        ]
        try:
            conn.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", rows)
        except sqlite3.DatabaseError as exc:  # a full disk, say: the ledger's own error, not a crash
            conn.close()
            raise LedgerError(f"can't create the ledger {path}: {exc}") from exc
        return conn, binding, key
    if meta.get("schema") != SCHEMA_VERSION:
        conn.close()
        raise LedgerError(
            f"the ledger {path} has schema {meta.get('schema')!r}; this version of backfill reads schema "
            f"{SCHEMA_VERSION}. Open it once with a writable command (run, retry) to migrate it, or upgrade"
        )
    held = Binding(partner_id=meta.get("partner_id", ""), endpoint=meta.get("endpoint", ""))
    if binding is not None and held != binding:
        conn.close()
        raise LedgerError(
            f"the ledger {path} belongs to partner {held.partner_id!r} on {held.endpoint}, not partner "
            f"{binding.partner_id!r} on {binding.endpoint}: a run must never mark users done against one API "
            "that were sent to another. Use the ledger made for this partner and endpoint (--ledger), or "
            "drop --ledger to use the default one for this partner and endpoint"
        )
    return conn, held, PhotoKey(secret=bytes.fromhex(meta[_KEY]))


def _meta(conn: sqlite3.Connection) -> dict[str, str]:
    exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
    return dict(conn.execute("SELECT key, value FROM meta").fetchall()) if exists else {}


def _run_columns(conn: sqlite3.Connection) -> set[str]:
    return {name for _, name, *_ in conn.execute("PRAGMA table_info(runs)")}


def _migrate_v1(conn: sqlite3.Connection, meta: dict[str, str], legacy: dict[str, str]) -> None:
    """Schema 1 (bound to an env label) to 2 (bound to the endpoint; attempts fenced; photo pinned)."""
    endpoint = legacy.get(meta.get("env", ""))
    if endpoint is None:
        raise LedgerError(f"a schema-1 ledger for env {meta.get('env')!r} can't be migrated: unknown env")
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("ALTER TABLE users RENAME TO users_v1")
        conn.execute("DROP INDEX IF EXISTS users_state")
        conn.execute(_USERS)  # executescript would commit the migration's transaction half-way
        conn.execute("CREATE INDEX users_state ON users(state)")
        conn.execute(
            "INSERT INTO users (user_id, state, attempts, doubt, photo_sha256, image_ref, image_size, "
            "image_version, user_created_at, http_status, result_code, result_text, smile_job_id, job_id, "
            "first_attempt_at, last_attempt_at, finished_at, run_id) "
            "SELECT user_id, state, attempts, in_doubt, photo_sha256, image_path, image_size, "
            "CAST(image_mtime_ns AS TEXT), user_created_at, http_status, COALESCE(result_code, ''), "
            "COALESCE(result_text, ''), COALESCE(smile_job_id, ''), COALESCE(job_id, ''), first_attempt_at, "
            "last_attempt_at, finished_at, run_id FROM users_v1"
        )
        conn.execute("DROP TABLE users_v1")
        conn.execute("ALTER TABLE runs ADD COLUMN manifest_sha256 TEXT")
        conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('endpoint', ?)", (endpoint,))
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema'")
        conn.execute("DELETE FROM meta WHERE key = 'env'")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _migrate_v2(conn: sqlite3.Connection) -> None:
    """Schema 2 (photos pinned by their plain SHA-256) to 3 (pinned by PhotoKey, the ledger's own secret).

    Each stored digest is replaced by its pin, computed from the digest alone: no photo is read, and a finished
    row is still skipped by its fingerprint, or its photo's pin, exactly as before.
    """
    key = PhotoKey.new()
    conn.create_function("backfill_pin", 1, key.pin, deterministic=True)
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "UPDATE users SET photo_sha256 = backfill_pin(photo_sha256) WHERE photo_sha256 IS NOT NULL"
        )
        conn.execute("INSERT INTO meta(key, value) VALUES (?, ?)", (_KEY, key.secret.hex()))
        conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema'")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _migrate_v3(conn: sqlite3.Connection) -> None:
    """Schema 3 to 4: beside each pin, the digest of the bytes sent and what --normalize did to them; and the
    table of tombstones `backfill forget` leaves.

    Two columns added in place, empty for every row so far (their photos went as read); no photo is read. A
    ledger that schema 1's migration just rebuilt has them already.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        present = {name for _, name, *_ in conn.execute("PRAGMA table_info(users)")}
        if "sent_sha256" not in present:
            conn.execute("ALTER TABLE users ADD COLUMN sent_sha256 TEXT")
        if "transform" not in present:
            conn.execute("ALTER TABLE users ADD COLUMN transform TEXT NOT NULL DEFAULT ''")
        conn.execute(_FORGOTTEN)
        conn.execute("UPDATE meta SET value = '4' WHERE key = 'schema'")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _migrate_v4(conn: sqlite3.Connection) -> None:
    """Schema 4 to 5: beside each pin, its photo's sample, keyed, and the index the shared-photo census asks.

    The column is added empty: the rows sent so far keep no sample (none is made up, no photo is read), so a
    later census finds no photo they share with an ID it may send (docs/manifest.md says so). A ledger that
    schema 1's migration just rebuilt has the column already.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        present = {name for _, name, *_ in conn.execute("PRAGMA table_info(users)")}
        if "photo_sample" not in present:
            conn.execute("ALTER TABLE users ADD COLUMN photo_sample INTEGER")
        conn.execute(_PHOTO_INDEX)
        conn.execute("UPDATE meta SET value = '5' WHERE key = 'schema'")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _apply(
    conn: sqlite3.Connection,
    begun: dict[str, LedgerRow],
    absent: set[str],
    writes: list[_Write],
    forgotten_key: PhotoKey | None = None,
) -> list[object]:
    """Apply one group of writes in one transaction; each one's result, in order (None for a statement or flush).

    Each attempt and outcome goes through transitions.py in the order it was made, onto the row as the writes
    before it in the group left it (a queued outcome and the next attempt of the same ID can share a group). Every
    row the group changed is then written once, in its final state, by multi-row INSERTs. `begun` is the cache of
    rows left SENDING and `absent` the IDs known to have no row; both are brought up to date only once the commit
    has succeeded.
    """
    changed: dict[str, LedgerRow] = {}
    results: list[object] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        # The rows neither cache holds, read in one query: IDs seen before by another run, or never looked up.
        unknown = {
            w.user_id
            for w, _ in writes
            if isinstance(w, AttemptRequest | Outcome) and w.user_id not in begun and w.user_id not in absent
        }
        stored = _lookup(conn, list(unknown)) if unknown else {}
        # A forgotten ID has no row: each attempt of one the ledger holds no row for is checked for a tombstone.
        tombstones: dict[str, Tombstone] = {}
        if forgotten_key is not None:
            rowless = [
                w.user_id
                for w, _ in writes
                if isinstance(w, AttemptRequest) and w.user_id not in begun and w.user_id not in stored
            ]
            tombstones = _forgotten(conn, forgotten_key, rowless) if rowless else {}
        for what, _ in writes:
            if isinstance(what, AttemptRequest):
                uid = what.user_id
                begin = tr.begin(
                    changed.get(uid) or begun.get(uid) or stored.get(uid), what, tombstones.get(uid)
                )
                if isinstance(begin, Refused):
                    results.append(begin)
                else:
                    changed[uid], ticket = begin
                    results.append(ticket)
            elif isinstance(what, Outcome):
                uid = what.user_id
                settled = tr.settle(changed.get(uid) or begun.get(uid) or stored.get(uid), what)
                if settled is None:
                    results.append(Settled.FENCED)
                else:
                    changed[uid] = settled
                    results.append(Settled.APPLIED)
            else:
                if what is not None:
                    conn.execute(*what)
                results.append(None)
        if changed:
            _upsert_many(conn, list(changed.values()))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # a COMMIT that failed may have ended the transaction itself
            conn.execute("ROLLBACK")
        raise
    if len(begun) >= _BEGUN_MAX:
        begun.clear()  # rows begun and never settled (stops): bounded, and a miss is read from disk
    absent.difference_update(changed)
    for uid, row in changed.items():
        if row.state is State.SENDING:
            begun[uid] = row
        else:
            begun.pop(uid, None)
    return results


def _lookup(
    conn: sqlite3.Connection, user_ids: list[str], absent: set[str] | None = None
) -> dict[str, LedgerRow]:
    """The rows of `user_ids` the ledger holds; those it doesn't are added to `absent`, if given."""
    sql = _SELECT + " WHERE user_id IN (SELECT value FROM json_each(?))"
    found = {r[0]: _row(r) for r in conn.execute(sql, (json.dumps(user_ids),)).fetchall()}
    if absent is not None:
        if len(absent) >= _BEGUN_MAX:
            absent.clear()  # bounded as `begun` is: an ID it forgets is read again, never taken as new
        absent.update(uid for uid in user_ids if uid not in found)
    return found


_DONE_IN = ", ".join(repr(str(s)) for s in sorted(DONE_STATES))
# `+state`: each ID is one search of the primary key. Left to choose, SQLite searches users_state once per ID
# and done state, then the row by its key: ~0.5 us more a row of a resume (1M IDs, 2026-12-07).
_DONE_SQL = (
    "SELECT user_id, state, image_ref, image_size, image_version, result_code, smile_job_id, job_id FROM users "
    f"WHERE user_id IN (SELECT value FROM json_each(?)) AND +state IN ({_DONE_IN})"
)


def _done(conn: sqlite3.Connection, user_ids: list[str]) -> dict[str, DoneRow]:
    # Eight columns and a tuple per row, not eighteen and a LedgerRow: a resume asks this of every manifest row.
    # (tuple.__new__ builds the NamedTuple in C: its generated __new__ cost a third of this function.)
    state_of, make = _STATE_OF, tuple.__new__
    return {
        uid: make(DoneRow, (state_of[state], ref, size, version, code, smile, job))
        for uid, state, ref, size, version, code, smile, job in conn.execute(
            _DONE_SQL, (json.dumps(user_ids),)
        )
    }


# `transitions.holder`'s rule in SQL: a pin, a size and a sample, all set (the index holds only sampled rows).
# In users_photo's own order, (size, sample) and then user_id (the key of a WITHOUT ROWID table's every index).
_HOLDERS_SQL = (
    "SELECT user_id, image_size, photo_sample, photo_sha256 FROM users WHERE photo_sha256 IS NOT NULL AND "
    "photo_sample IS NOT NULL AND (image_size, photo_sample) IN "
    "(SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?)) "
    "AND (image_size, photo_sample, user_id) > (?, ?, ?) "
    "ORDER BY image_size, photo_sample, user_id LIMIT ?"
)
_BEFORE_ALL = (-(2**63), -(2**63), "")  # a (size, sample, user_id) below any


# Only where the row still holds the pin the sample was taken for, and no sample yet.
_KEEP_SAMPLES = (
    "UPDATE users SET photo_sample = k.sample FROM (SELECT json_extract(value, '$[0]') AS uid, "
    "json_extract(value, '$[1]') AS pin, json_extract(value, '$[2]') AS sample FROM json_each(?)) AS k "
    "WHERE users.user_id = k.uid AND users.photo_sha256 = k.pin AND users.photo_sample IS NULL"
)


def _holders(
    conn: sqlite3.Connection, photos: list[tuple[int, int]], after: Holder | None, limit: int
) -> list[Holder]:
    make = tuple.__new__
    since = _BEFORE_ALL if after is None else tr.holders_order(after)
    return [make(Holder, found) for found in conn.execute(_HOLDERS_SQL, (json.dumps(photos), *since, limit))]


def _page(conn: sqlite3.Connection, states: list[str] | None, after: str, size: int) -> list[LedgerRow]:
    where, params = "user_id > ?", [after]
    if states is not None:
        where += f" AND state IN ({','.join('?' * len(states))})"
        params += states
    sql = f"{_SELECT} WHERE {where} ORDER BY user_id LIMIT {int(size)}"
    return [_row(r) for r in conn.execute(sql, params).fetchall()]


def _status(
    conn: sqlite3.Connection, last_runs: int
) -> tuple[dict[str, int], LedgerRow | None, list[RunRecord]]:
    counts = dict(conn.execute("SELECT state, count(*) FROM users GROUP BY state ORDER BY state").fetchall())
    marks = ",".join("?" * len(TRANSIENT_STATES))
    found = conn.execute(
        f"{_SELECT} WHERE state IN ({marks}) ORDER BY first_attempt_at LIMIT 1",
        tuple(sorted(s.value for s in TRANSIENT_STATES)),
    ).fetchone()
    held = _run_columns(conn)  # a reader may meet a ledger last written by a version without `note`
    chosen = ", ".join(c if c in held else f"NULL AS {c}" for c in _RUN_COLUMNS)
    runs = [
        RunRecord(**dict(zip(_RUN_COLUMNS, r, strict=True)))
        for r in conn.execute(f"SELECT {chosen} FROM runs ORDER BY started_at DESC LIMIT ?", (last_runs,))
    ]
    return counts, (None if found is None else _row(found)), runs


_TOMBSTONE_COLUMNS = (
    "user_key",
    "state",
    "doubt",
    "first_attempt_at",
    "finished_at",
    "forgotten_at",
    "forgotten_by",
)
_FINISHED_IN = ", ".join(repr(str(s)) for s in sorted(FINISHED_STATES))


def _any_forgotten(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM forgotten LIMIT 1").fetchone() is not None


def _count_forgotten(conn: sqlite3.Connection) -> int:
    found: int = conn.execute("SELECT count(*) FROM forgotten").fetchone()[0]
    return found


def _forgotten(conn: sqlite3.Connection, key: PhotoKey, user_ids: list[str]) -> dict[str, Tombstone]:
    """The tombstones of those of `user_ids` that were forgotten, by the ID given."""
    keyed = {key.user(uid): uid for uid in user_ids}
    sql = (
        f"SELECT {', '.join(_TOMBSTONE_COLUMNS)} FROM forgotten "
        "WHERE user_key IN (SELECT value FROM json_each(?))"
    )
    found = {}
    for user_key, state, doubt, first, finished, at, by in conn.execute(sql, (json.dumps(list(keyed)),)):
        found[keyed[user_key]] = Tombstone(
            user_key=user_key,
            state=_STATE_OF[state],
            doubt=bool(doubt),
            first_attempt_at=first,
            finished_at=finished,
            forgotten_at=at,
            forgotten_by=by,
        )
    return found


def _rewrite(conn: sqlite3.Connection) -> None:
    """VACUUM, then the WAL checkpointed and truncated; a failure is a warning, since the erasure is committed."""
    try:
        conn.execute("VACUUM")
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        problem = "a reader holds the ledger, so its log (WAL) was not emptied" if busy else None
    except sqlite3.Error as exc:
        problem = f"rewriting it failed ({exc})"
    if problem:
        log.warning(
            "the ledger %s: the rows are forgotten, but %s: older copies of them may stay in the file until "
            "the same command is run again (it finishes the rewrite) with no other process reading the ledger",
            conn.execute("PRAGMA database_list").fetchone()[2],
            problem,
        )


def _forget(
    conn: sqlite3.Connection,
    key: PhotoKey,
    user_ids: list[str] | None,
    before: str | None,
    at: str,
    by: str,
    dry_run: bool,
) -> Forgetting:
    """Forget the named rows (or, `before`, every row finished before it) in one transaction; then rewrite the
    file, so that no byte of a forgotten row survives anywhere in it.

    secure_delete zeroes what the transaction frees, but a row updated earlier (SENDING, then settled) may have
    left older copies of its cells in free space no delete reaches: VACUUM writes the file anew from the live rows
    alone, and the WAL that held the pages as they were is checkpointed into the file and truncated.
    """
    already = unknown = 0
    conn.execute("PRAGMA secure_delete=ON")
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            if user_ids is not None:
                rows = list(_lookup(conn, user_ids).values())
                held = {r.user_id for r in rows}
                absent = [uid for uid in user_ids if uid not in held]
                already = len(_forgotten(conn, key, absent)) if absent else 0
                unknown = len(absent) - already
            else:
                assert before is not None
                sql = f"{_SELECT} WHERE state IN ({_FINISHED_IN}) AND finished_at < ?"
                rows = [r for r in map(_row, conn.execute(sql, (before,))) if tr.purged(r, before)]
            gone, done = tr.forget_all(rows, key.user, at=at, by=by, already=already, unknown=unknown)
            if not dry_run and gone:
                conn.executemany(  # the first tombstone stays, as on PostgreSQL
                    f"INSERT OR IGNORE INTO forgotten ({', '.join(_TOMBSTONE_COLUMNS)}) "
                    f"VALUES ({', '.join('?' * len(_TOMBSTONE_COLUMNS))})",
                    [tuple(getattr(t, c) for c in _TOMBSTONE_COLUMNS) for _, t in gone],
                )
                conn.execute(
                    "DELETE FROM users WHERE user_id IN (SELECT value FROM json_each(?))",
                    (json.dumps([uid for uid, _ in gone]),),
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        # Also when the IDs were forgotten before (or for every purge): if the rewrite after that erasure's commit
        # failed or was cut, asking again is how it is finished.
        if not dry_run and (gone or already or user_ids is None):
            _rewrite(conn)
    finally:
        conn.execute("PRAGMA secure_delete=OFF")
    return done

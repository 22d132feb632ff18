"""The connection to a PostgreSQL ledger: the pool, one transaction at a time, and outages waited out.

psycopg 3 rather than asyncpg: psycopg is libpq, so a password comes from PGPASSWORD, ~/.pgpass or a service
file exactly as `psql` finds it (asyncpg reimplements that lookup, without service files), and it has COPY,
pipeline mode and an async connection pool of its own. psycopg is imported under ledger/postgres/ only.

A lost connection (a restart, a failover) is retried for the ledger's outage bound, waiting between tries what
the run's retry policy says; every write is made safe to repeat by its caller (see attempts.py). A race lost to
another process (a deadlock, a serialization failure, a row inserted meanwhile) is no outage: the transaction
runs again at once, a bounded number of times.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Protocol, TypeVar
from urllib.parse import urlsplit

import psycopg
from psycopg import errors as pg_errors
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from ... import redact
from ...errors import LedgerError
from .. import Binding
from .schema import Conn, prepare

T = TypeVar("T")
Work = Callable[
    [Conn, bool], Awaitable[T]
]  # one transaction's statements; the flag: an outage cut a try of it
RACES = 20  # a transaction that loses this many races in a row is refused, not run again
GAVE_UP_TRY_S = (
    2.0  # past the outage bound, each step waits this long for a connection, once (a TLS connect fits)
)
log = logging.getLogger("backfill")
# psycopg's pool logs every failed reconnect in an outage, in its own format, to stderr (Python's last-resort
# handler) and in between the lines of a JSON log: this package says what matters itself, once, in the run's log.
logging.getLogger("psycopg").addHandler(logging.NullHandler())


class Retries(Protocol):
    """How long to wait between tries while the ledger can't be reached: the run's retry policy
    (run/policy.py `RetryPolicy`) is one."""

    def during_outage(self, tries: int, *, lasted: float, bound: float) -> float | None:
        """The `tries`-th try failed, `lasted` seconds into an outage waited for up to `bound`: seconds before the
        next try, or None: no more."""
        ...


class SteadyRetries:
    """For a caller that hands in no policy (a script, a test): a try every quarter second, up to the bound."""

    def during_outage(self, tries: int, *, lasted: float, bound: float) -> float | None:
        return None if lasted >= bound else min(0.25, bound - lasted)


class Commit(StrEnum):
    """What a transaction's commit must promise."""

    DURABLE = "durable"  # on disk when it returns (synchronous_commit on, whatever the role's default)
    LAZY = "lazy"  # its loss in a server's crash loses no promise: the fsync is left to the WAL writer
    READ = "read"  # it writes nothing


class Race(Exception):
    """A race lost to another process (a row inserted meanwhile): run the transaction again, at once."""


class RefusedByDatabase(LedgerError):
    """The server answered, and said no (a statement or lock timeout, a full disk, a value it can't hold)."""


# Said either way: a role or database set to `synchronous_commit = off` (a common tuning) must not make
# "recorded before sent" a write that a crash of the server can lose.
_SYNCHRONOUS = {
    Commit.DURABLE: "SET LOCAL synchronous_commit TO on",
    Commit.LAZY: "SET LOCAL synchronous_commit TO off",
}
# Admin shutdown, crash shutdown, cannot connect now.
_SHUTDOWN_STATES = frozenset({"57P01", "57P02", "57P03"})


class Database:
    """One ledger's connections, shared by every part of the store; `run` is its one way to a transaction."""

    def __init__(
        self, pool: AsyncConnectionPool[Conn], *, location: str, outage_s: float, retries: Retries
    ) -> None:
        self.location = location
        self.outage_s = outage_s
        self.closed = False
        # A commit made without waiting for the disk since the last durable one: `flush` makes one.
        self.unflushed = False
        self._pool = pool
        self._retries = retries
        # When the database was first found unreachable (None: it isn't). One outage, one bound, for every
        # operation: ones that start late in it don't each wait the whole bound again, and once it has passed
        # each operation tries once, briefly, so that a run stops within the bound, not a multiple of it.
        self._outage_since: float | None = None

    @classmethod
    async def open(
        cls,
        url: str,
        binding: Binding | None,
        *,
        writable: bool,
        pool_size: int,
        outage_s: float,
        retries: Retries,
    ) -> tuple[Database, Binding]:
        """Connect, create (writable) or check the schema; the ledger's binding, checked against `binding`."""
        location = location_of(url)
        # libpq reads it from the environment; should any message ever echo it, the scrubber masks it.
        redact.register(os.environ.get("PGPASSWORD", ""))
        try:
            conn = await psycopg.AsyncConnection.connect(
                url, autocommit=True, connect_timeout=10, application_name="backfill"
            )
        except psycopg.Error as exc:
            raise LedgerError(f"can't connect to the ledger {location}: {said(exc, hints=True)}") from exc
        try:
            held = await prepare(conn, binding, writable=writable, location=location)
        except pg_errors.InsufficientPrivilege as exc:
            raise LedgerError(
                f"can't open the ledger {location}: {said(exc)}. The first run creates the schema `backfill`: "
                "the role needs CREATE on the database then (GRANT CREATE ON DATABASE <db> TO <role>), and "
                "USAGE and read/write on that schema's tables after"
            ) from exc
        except psycopg.Error as exc:
            raise LedgerError(f"can't open the ledger {location}: {said(exc)}") from exc
        finally:
            await conn.close()
        pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            open=False,
            timeout=10,
            name="backfill-ledger",
            reconnect_timeout=outage_s,
            kwargs={"autocommit": True, "connect_timeout": 10, "application_name": "backfill"},
        )
        await pool.open(wait=False)
        return cls(pool, location=location, outage_s=outage_s, retries=retries), held

    async def close(self) -> None:
        self.closed = True
        await self._pool.close()

    async def outside(self, statement: str) -> None:
        """One statement outside any transaction (VACUUM can run in none); psycopg's errors as they come."""
        async with self._pool.connection() as conn:
            await conn.execute(statement)

    async def run(
        self, work: Work[T], *, commit: Commit = Commit.DURABLE, what: str = "write", pipeline: bool = False
    ) -> T:
        """`work` in one transaction; a lost connection is retried until the outage is `outage_s` old.

        `work` is told whether an earlier try was cut by an outage: its commit may have happened unseen.
        `pipeline`: in pipeline mode, where a statement's result comes when it is fetched (a round trip for all
        sent so far); what `work` leaves unfetched goes with the commit, its results read from their cursors.
        """
        retried = False
        races = tries = 0
        while True:
            gave_up = (
                self._outage_since is not None and time.monotonic() >= self._outage_since + self.outage_s
            )
            try:
                async with self._pool.connection(timeout=GAVE_UP_TRY_S if gave_up else None) as conn:
                    if pipeline:
                        result = await _pipelined(conn, work, commit, retried)
                    else:
                        async with conn.transaction():
                            if commit is not Commit.READ:
                                await conn.execute(_SYNCHRONOUS[commit])
                            result = await work(conn, retried)
                if commit is Commit.LAZY:
                    self.unflushed = True
                if self._outage_since is not None:
                    log.warning(
                        "the ledger %s is reachable again, after %.1fs",
                        self.location,
                        time.monotonic() - self._outage_since,
                        extra={"event": "ledger_reachable"},
                    )
                    self._outage_since = None
                return result
            except (Race, pg_errors.UniqueViolation) as exc:
                # A row inserted by another process since it was read: read it again (a few times at most).
                races += 1
                if races > RACES:
                    raise RefusedByDatabase(
                        f"the ledger {self.location} kept refusing a {what}: {said(exc)}"
                    ) from exc
            except psycopg.OperationalError as exc:
                if is_race(exc):
                    races += 1
                    if races > RACES:
                        raise RefusedByDatabase(
                            f"the ledger {self.location} kept refusing a {what}: {said(exc)}"
                        ) from exc
                    continue
                if not is_lost_connection(exc):
                    # The server answered, and said no (a statement timeout, a full disk): not an outage to wait out.
                    raise RefusedByDatabase(
                        f"the ledger {self.location} refused a {what}: {said(exc)}"
                    ) from exc
                tries += 1
                await self._wait_out(exc, tries)
                retried = True
            except psycopg.Error as exc:
                raise RefusedByDatabase(f"the ledger {self.location} refused a {what}: {said(exc)}") from exc

    async def _wait_out(self, exc: psycopg.Error, tries: int) -> None:
        """An outage: wait what the retry policy says before the next try, or stop once it says no more."""
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since = now
            log.warning(
                "the ledger %s can't be reached (%s); retrying for up to %gs",
                self.location,
                said(exc),
                self.outage_s,
                extra={"event": "ledger_unreachable"},
            )
        wait = (
            None
            if self.closed
            else self._retries.during_outage(tries, lasted=now - self._outage_since, bound=self.outage_s)
        )
        if wait is None:
            raise LedgerError(
                f"the ledger {self.location} can't be reached ({said(exc)}) after {self.outage_s:g}s; "
                "every attempt sent is recorded. Re-run once the database is back to continue"
            ) from exc
        await asyncio.sleep(wait)


async def _pipelined(conn: Conn, work: Work[T], commit: Commit, retried: bool) -> T:
    """`work` between a BEGIN and a COMMIT sent by hand: psycopg's transaction block would sync (one more round
    trip) before its COMMIT."""
    try:
        async with conn.pipeline():
            await conn.execute("BEGIN")
            if commit is not Commit.READ:
                await conn.execute(_SYNCHRONOUS[commit])
            result = await work(conn, retried)
            await conn.execute("COMMIT")
    except BaseException:
        if not conn.closed and conn.info.transaction_status is not TransactionStatus.IDLE:
            with contextlib.suppress(psycopg.Error):
                await conn.execute("ROLLBACK")  # the pool would, but say it here rather than in its log
        raise
    return result


def said(exc: BaseException, *, hints: bool = False) -> str:
    """A driver error in one line (never a password: libpq doesn't echo one); `hints`: with libpq's own hint
    ("Is the server running...") and ours for a refused password or a missing database."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if not hints:
        return lines[0]
    text = " ".join(lines)
    lowered = text.lower()
    if "password" in lowered:
        text += ". The password comes from PGPASSWORD, ~/.pgpass or a service file (PGSERVICE), as for psql"
    elif "does not exist" in lowered and "database" in lowered:
        text += ". The database must exist (createdb NAME); the tool makes its own schema in it"
    return text


def location_of(url: str) -> str:
    """The URL as messages show it: scheme, user, host, port and database; never a password or options."""
    parts = urlsplit(url)
    user = f"{parts.username}@" if parts.username else ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{user}{parts.hostname or ''}{port}{parts.path}"


def is_race(exc: psycopg.Error) -> bool:
    """A deadlock or serialization failure: another transaction won; this one is simply run again."""
    return exc.sqlstate in ("40P01", "40001")


def is_lost_connection(exc: psycopg.Error) -> bool:
    """No server to talk to (refused, dropped, shutting down, starting up, no pooled connection in time)."""
    state = exc.sqlstate
    return (
        isinstance(exc, PoolTimeout) or state is None or state.startswith("08") or state in _SHUTDOWN_STATES
    )

"""The fleet's one rate limit, as the PostgreSQL ledger keeps it: one row, changed atomically on the server's clock."""

from __future__ import annotations

from dataclasses import fields
from typing import TypeVar

from psycopg import errors as pg_errors

from .. import RateChange, RateState
from .connection import Commit, Database, Race
from .schema import Conn

T = TypeVar("T")
_COLUMNS = tuple(f.name for f in fields(RateState))
_READ = (
    f"SELECT {', '.join(_COLUMNS)}, extract(epoch FROM clock_timestamp())::float8 "
    "FROM backfill.rate WHERE id = 1 FOR UPDATE"
)
_INSERT = (
    f"INSERT INTO backfill.rate (id, {', '.join(_COLUMNS)}) VALUES (1, {', '.join(['%s'] * len(_COLUMNS))})"
)
_UPDATE = f"UPDATE backfill.rate SET {', '.join(f'{c} = %s' for c in _COLUMNS)} WHERE id = 1"


class SharedRate:
    """The rate every process of a fleet shares; `run/rate.py` owns what its fields mean."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def change(self, change: RateChange[T]) -> T:
        """Apply `change(current, server_now)` to the shared rate atomically; what it returns beside the state."""

        async def work(conn: Conn, retried: bool) -> T:
            cur = await conn.execute(_READ)
            found = await cur.fetchone()
            if found is None:
                cur = await conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8")
                now_row = await cur.fetchone()
                assert now_row is not None
                current, now = None, float(now_row[0])
            else:
                current = RateState(**dict(zip(_COLUMNS, found[:-1], strict=True)))
                now = float(found[-1])
            new, result = change(current, now)
            values = tuple(getattr(new, c) for c in _COLUMNS)
            if current is None:
                try:
                    await conn.execute(_INSERT, values)
                except pg_errors.UniqueViolation:
                    raise Race from None  # another process made the row first: read it
            else:
                await conn.execute(_UPDATE, values)
            return result

        return await self._db.run(work, commit=Commit.LAZY)  # a rate lost in a crash is simply re-learnt

"""The PostgreSQL ledger's schema: its tables, how a row of `users` maps to a LedgerRow, and the binding check."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import fields
from typing import Any

import psycopg

from ...errors import LedgerAbsent, LedgerError
from ...images import PhotoKey
from ...vocab import DONE_STATES, State
from .. import Binding, LedgerRow, RunRecord, row_of, row_values

# A connection of the ledger's pool: rows come back as plain tuples.
Conn = psycopg.AsyncConnection[tuple[Any, ...]]

SCHEMA_VERSION = "5"
# Schema 1 pinned photos by their plain SHA-256 (2 keyed them); 2 differs from 3 in the queue's indexes alone; 4
# adds two columns to `users` (sent_sha256, transform) and the tombstones' table; 5 one column (photo_sample)
# and its index. Every read names every column: a reader takes schema 5 alone, an older one is read once a
# writer has migrated it.
READS = frozenset({SCHEMA_VERSION})
OLDER = ("1", "2", "3", "4")
_STATES = ", ".join(f"'{s.value}'" for s in State)
# How a claim finds its rows without reading the ones other claims hold (queue.py): rows no process holds, in
# line order, and held rows by the end of their lease. A claim moves its row from the one to the other and a
# finish out of both, so neither holds a row in flight: a claim reads only rows it may take.
_QUEUE_INDEXES = """
CREATE INDEX IF NOT EXISTS queue_open ON backfill.queue (manifest_sha256, line) WHERE NOT done AND claimed_by IS NULL;
CREATE INDEX IF NOT EXISTS queue_leases ON backfill.queue (manifest_sha256, lease_until)
    WHERE NOT done AND claimed_by IS NOT NULL;
CREATE INDEX IF NOT EXISTS queue_finished_by ON backfill.queue (finished_by) WHERE done;
"""
# How the shared-photo census finds the IDs pinned to a photo like one it may send (`Store.holders`). Made after
# the migrations, since an older ledger's `users` gains its column in one of them.
PHOTO_INDEX = """
CREATE INDEX IF NOT EXISTS users_photo ON backfill.users (image_size, photo_sample, user_id)
    WHERE photo_sample IS NOT NULL
"""
# A forgotten user's tombstone (`backfill forget`): its ID's keyed hash, never the ID; no personal data.
_FORGOTTEN = f"""
CREATE TABLE IF NOT EXISTS backfill.forgotten (
    user_key text PRIMARY KEY,
    state text NOT NULL CHECK (state IN ({_STATES})),
    doubt boolean NOT NULL,
    first_attempt_at text,
    finished_at text,
    forgotten_at text NOT NULL,
    forgotten_by text NOT NULL
);
"""
_SCHEMA = f"""
CREATE SCHEMA IF NOT EXISTS backfill;
CREATE TABLE IF NOT EXISTS backfill.meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS backfill.users (
    user_id text COLLATE "C" PRIMARY KEY,  -- byte order, whatever the database's: keyset pages rely on it
    state text NOT NULL CHECK (state IN ({_STATES})),
    attempts integer NOT NULL CHECK (attempts >= 0),
    doubt boolean NOT NULL DEFAULT false,
    photo_sha256 text,
    image_ref text,
    image_size bigint,
    image_version text,
    user_created_at text,
    http_status integer,
    result_code text NOT NULL DEFAULT '',
    result_text text NOT NULL DEFAULT '',
    smile_job_id text NOT NULL DEFAULT '',
    job_id text NOT NULL DEFAULT '',
    first_attempt_at text,
    last_attempt_at text,
    finished_at text,
    run_id text,
    attempt_token text,
    sent_sha256 text,
    transform text NOT NULL DEFAULT '',
    photo_sample bigint
);
CREATE INDEX IF NOT EXISTS users_state ON backfill.users (state);
CREATE TABLE IF NOT EXISTS backfill.runs (
    run_id text PRIMARY KEY,
    started_at text NOT NULL,
    manifest text,
    manifest_sha256 text,
    pid integer,
    host text,
    finished_at text,
    rows bigint,
    exit_code integer,
    heartbeat_at timestamptz,
    outputs_at timestamptz,  -- its results.csv and rejects.csv are written: the rows it finished are told
    note text,
    operator text,
    version text,
    api_key_id text
);
CREATE TABLE IF NOT EXISTS backfill.manifests (
    sha256 text PRIMARY KEY,
    path text NOT NULL,
    rows bigint NOT NULL DEFAULT 0,
    loaded_by text,
    loaded_at timestamptz NOT NULL DEFAULT now(),
    pass integer NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS backfill.queue (
    manifest_sha256 text NOT NULL,
    line integer NOT NULL,
    user_id text NOT NULL,
    user_created_at text,
    image text,
    reason text,  -- set for a row the manifest's text rules rejected: it is claimed and told like any other
    message text,
    claimed_by text,
    lease_until timestamptz,
    done boolean NOT NULL DEFAULT false,
    finished_by text,  -- the run whose outputs tell this row; until they are written, the row is not safe
    PRIMARY KEY (manifest_sha256, line)
);
{_QUEUE_INDEXES}
{_FORGOTTEN}
-- The ledger's PhotoKey secret, apart from meta so that a role may be let read meta (status) and not this.
CREATE TABLE IF NOT EXISTS backfill.secrets (name text PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE IF NOT EXISTS backfill.rate (
    id integer PRIMARY KEY CHECK (id = 1),
    ceiling double precision NOT NULL,
    rate double precision NOT NULL,
    tat double precision NOT NULL,
    paused_until double precision NOT NULL,
    generation integer NOT NULL,
    grown_at double precision NOT NULL
);
"""
_PHOTO_KEY = "photo_key"
_REPIN_BATCH = 10_000
_SCHEMA_LOCK = 0x6261636B66696C6C  # "backfill": serialises schema creation when a fleet starts all at once

COLUMNS = tuple(f.name for f in fields(LedgerRow))
SELECT = f"SELECT {', '.join(COLUMNS)} FROM backfill.users"
RUN_COLUMNS = tuple(f.name for f in fields(RunRecord))
DONE_IN = ", ".join(f"'{s.value}'" for s in sorted(DONE_STATES))
_STATE_OF = {s.value: s for s in State}
_STATE_AT = COLUMNS.index("state")


def row(values: Sequence[Any]) -> LedgerRow:
    """A LedgerRow from a `users` row read in COLUMNS order."""
    typed = list(values)
    typed[_STATE_AT] = _STATE_OF[typed[_STATE_AT]]
    return row_of(typed)


def values(of: LedgerRow) -> list[Any]:
    """A LedgerRow's values in COLUMNS order, as `users` holds them."""
    found = row_values(of)
    found[_STATE_AT] = of.state.value
    return found


# Lines a statement names (`line = {LINES}`, its parameter made by `integers`) come through `ARRAY(SELECT ...)`,
# whose length the planner can't see: it then reads each row through the primary key. Shown a thousand lines on
# a queue its statistics call small, it read the whole queue instead and held each row against the list, once a
# generic plan had made the list a parameter (a finish of 1,500 lines cost 20-50 ms on a queue of 8,000 rows).
LINES = "ANY(ARRAY(SELECT unnest(%s::integer[])))"


def integers(values: Iterable[int]) -> str:
    """Lines as the text of an `integer[]` parameter (see LINES): psycopg adapts a list element by element in
    Python, and a process holds a few thousand lines."""
    return "{" + ",".join(map(str, sorted(values))) + "}"


def state(value: str) -> State:
    return _STATE_OF[value]


async def _add_run_note(conn: Conn) -> None:
    """`runs.note` and the audit trail's columns, added within a schema (older versions name their columns, so
    they read and write it still).

    Looked up first: ALTER TABLE takes the table's strongest lock and needs its owner even when the column is
    there, and every process of a fleet opens the ledger, some with a role that may read and write but not own.
    """
    cur = await conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = 'backfill' AND table_name = 'runs'"
    )
    held = {name for (name,) in await cur.fetchall()}
    for column in ("note", "operator", "version", "api_key_id"):  # the last three: the audit trail
        if column not in held:
            await conn.execute(f"ALTER TABLE backfill.runs ADD COLUMN {column} text")


async def _keep_key(conn: Conn, key: PhotoKey) -> None:
    await conn.execute("INSERT INTO backfill.secrets (name, value) VALUES (%s, %s)", (_PHOTO_KEY, key.secret))


async def _migrate_v1(conn: Conn) -> None:
    """Schema 1's photo pins (their plain SHA-256) to schema 2's (keyed by PhotoKey, the ledger's own secret).

    Each stored digest is replaced by its pin, computed from the digest alone: no photo is read, and a finished
    row is still skipped exactly as before. Inside prepare's transaction, under its lock: a fleet starting all
    at once migrates once. The old row versions stay in the table's files until VACUUM (FULL) rewrites them.
    """
    key = PhotoKey.new()
    await _keep_key(conn, key)
    cur = await conn.execute(
        "SELECT user_id, photo_sha256 FROM backfill.users WHERE photo_sha256 IS NOT NULL"
    )
    held = await cur.fetchall()
    for start in range(0, len(held), _REPIN_BATCH):
        part = held[start : start + _REPIN_BATCH]
        await conn.execute(
            "UPDATE backfill.users u SET photo_sha256 = p.pin FROM unnest(%s::text[], %s::text[]) AS p(uid, pin) "
            "WHERE u.user_id = p.uid",
            ([uid for uid, _ in part], [key.pin(digest) for _, digest in part]),
        )


async def _migrate_v3(conn: Conn, location: str) -> None:
    """Schema 3 to 4: beside each pin, the digest of the bytes sent and what --normalize did to them; and the
    table of tombstones `backfill forget` leaves. From schemas 1 and 2 too, each step after the one before it.

    Two columns added in place, empty for every row so far (their photos went as read); no photo is read.
    Inside prepare's transaction, under its lock, like the other steps. Looked up first, as `_add_run_note`
    does: ALTER TABLE needs the table's owner even when the column is there.
    """
    await conn.execute(_FORGOTTEN)
    cur = await conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = 'backfill' "
        "AND table_name = 'users'"
    )
    held = {name for (name,) in await cur.fetchall()}
    try:
        if "sent_sha256" not in held:
            await conn.execute("ALTER TABLE backfill.users ADD COLUMN sent_sha256 text")
        if "transform" not in held:
            await conn.execute("ALTER TABLE backfill.users ADD COLUMN transform text NOT NULL DEFAULT ''")
    except psycopg.errors.InsufficientPrivilege as exc:
        raise LedgerError(
            f"the ledger {location} has schema 3, which this version migrates to schema {SCHEMA_VERSION} (two new "
            "columns and a table): the role that owns its tables must open it first with this version, in any "
            "writing command (`backfill run`)"
        ) from exc


async def _migrate_v4(conn: Conn, location: str) -> None:
    """Schema 4 to 5: beside each pin, its photo's sample, keyed (the index is made by `prepare`, after).

    The column is added empty: the rows sent so far keep no sample (none is made up, no photo is read), so a
    later census finds no photo they share with an ID it may send. Inside prepare's transaction, under its lock.
    """
    cur = await conn.execute(
        "SELECT 1 FROM information_schema.columns WHERE table_schema = 'backfill' AND table_name = 'users' "
        "AND column_name = 'photo_sample'"
    )
    if await cur.fetchone() is not None:
        return
    try:
        await conn.execute("ALTER TABLE backfill.users ADD COLUMN photo_sample bigint")
    except psycopg.errors.InsufficientPrivilege as exc:
        raise LedgerError(
            f"the ledger {location} has an older schema, which this version migrates to schema {SCHEMA_VERSION} "
            "(a new column): the role that owns its tables must open it first with this version, in any writing "
            "command (`backfill run`)"
        ) from exc


async def photo_key(conn: Conn, retried: bool = False) -> PhotoKey:
    """The ledger's PhotoKey, as `Database.run` reads it."""
    cur = await conn.execute("SELECT value FROM backfill.secrets WHERE name = %s", (_PHOTO_KEY,))
    found = await cur.fetchone()
    if found is None:
        raise LedgerError("the ledger holds no photo key (backfill.secrets): it can't check any photo's pin")
    return PhotoKey(secret=bytes(found[0]))


async def tombstones_kept(conn: Conn, retried: bool = False) -> bool:
    """Whether the ledger has the table of tombstones (schema 4): a reader may meet a schema-3 one."""
    return await _exists(conn, "backfill.forgotten")


async def _exists(conn: Conn, relation: str) -> bool:
    cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (relation,))
    found = await cur.fetchone()
    return found is not None and bool(found[0])


async def _meta(conn: Conn) -> dict[str, str]:
    cur = await conn.execute("SELECT key, value FROM backfill.meta")
    return dict(await cur.fetchall())


async def _migrate_queue(conn: Conn, location: str) -> None:
    """Schemas 1 and 2's queue indexes to 3's, in place: by what a claim may take (see _QUEUE_INDEXES).

    Under the schema lock, in the opening transaction: a fleet starting all at once migrates once, and a process
    that dies part-way leaves the schema as it was. The old ones indexed the rows not done, held or not, so each
    claim read every row in flight before the first it could take.
    """
    try:
        await conn.execute(_QUEUE_INDEXES)
        await conn.execute("DROP INDEX IF EXISTS backfill.queue_todo, backfill.queue_claims")
    except psycopg.errors.InsufficientPrivilege as exc:
        raise LedgerError(
            f"the ledger {location} has the queue of an earlier version of backfill, which this version migrates "
            f"to schema {SCHEMA_VERSION} (new indexes): the role that owns its tables must "
            "open it first with this version, in any writing command (`backfill run`)"
        ) from exc


async def prepare(conn: Conn, binding: Binding | None, *, writable: bool, location: str) -> Binding:
    """Create or migrate the schema (writable), then read and check the binding."""
    if writable:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            meta: dict[str, str] = await _meta(conn) if await _exists(conn, "backfill.meta") else {}
            older = meta.get("schema") in OLDER
            if meta and not older and meta.get("schema") != SCHEMA_VERSION:
                raise _unknown(location, meta.get("schema"))  # a newer version's: nothing is created in it
            # An earlier version's writer makes its indexes again before it refuses a newer schema: they go too.
            if meta.get("schema") in ("1", "2") or await _exists(conn, "backfill.queue_todo"):
                await _migrate_queue(conn, location)
            # Made or migrated: CREATE ... IF NOT EXISTS checks its privileges before it looks, so a ledger
            # already at this schema is left alone, and a role that reads and writes its tables without owning
            # them (or holding CREATE on the database) opens it.
            making = meta.get("schema") != SCHEMA_VERSION
            if making:
                await conn.execute(_SCHEMA)
            await _add_run_note(conn)
            if meta.get("schema") == "1":
                await _migrate_v1(conn)  # after _SCHEMA: the key goes into its secrets table
            if older:
                await _migrate_v3(conn, location)
                await _migrate_v4(conn, location)
                await conn.execute(
                    "UPDATE backfill.meta SET value = %s WHERE key = 'schema'", (SCHEMA_VERSION,)
                )
                meta["schema"] = SCHEMA_VERSION
            if making:  # after the migrations: an older ledger's `users` gains the column in one of them
                await conn.execute(PHOTO_INDEX)
            if not meta and binding is not None:
                for key, value in (
                    ("schema", SCHEMA_VERSION),
                    ("partner_id", binding.partner_id),
                    ("endpoint", binding.endpoint),
                ):
                    await conn.execute("INSERT INTO backfill.meta (key, value) VALUES (%s, %s)", (key, value))
                await conn.execute(
                    "INSERT INTO backfill.meta (key, value) VALUES ('created_at', now()::text)"
                )
                await _keep_key(conn, PhotoKey.new())
                return binding
    else:
        if not await _exists(conn, "backfill.meta"):
            raise LedgerAbsent(
                f"no backfill ledger in {location} (its schema `backfill` is absent). "
                "A run with this --ledger creates it"
            )
        meta = await _meta(conn)
    if not meta:
        raise LedgerError(f"{location} holds no backfill ledger (it has no binding)")
    if meta.get("schema") not in READS:
        raise _unknown(location, meta.get("schema"))
    held = Binding(partner_id=meta.get("partner_id", ""), endpoint=meta.get("endpoint", ""))
    if binding is not None and held != binding:
        raise LedgerError(
            f"the ledger {location} belongs to partner {held.partner_id!r} on {held.endpoint}, not partner "
            f"{binding.partner_id!r} on {binding.endpoint}: a run must never mark users done against one API "
            "that were sent to another. Use a database (or another --ledger) for this partner and endpoint"
        )
    return held


def _unknown(location: str, found: str | None) -> LedgerError:
    if found in OLDER:  # an older ledger, which a writer migrates (no photo is read)
        return LedgerError(
            f"the ledger {location} has schema {found}, from an earlier version of backfill: open it once with a writing "
            f"command (`backfill run` or `retry`) to migrate it to schema {SCHEMA_VERSION}"
        )
    return LedgerError(
        f"the ledger {location} has schema {found!r}; this version of backfill reads schema "
        f"{SCHEMA_VERSION}. Upgrade backfill"
    )

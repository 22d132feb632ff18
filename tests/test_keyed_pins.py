"""Photo pins are keyed by the ledger's own secret: no file the tool writes holds a photo's plain SHA-256."""

from __future__ import annotations

import base64
import hashlib
import os
import sqlite3
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest

from backfill import compose
from backfill.config import Settings
from backfill.errors import LedgerError
from backfill.images import PhotoKey
from backfill.ledger import Refused
from backfill.ledger.sqlite import SCHEMA_VERSION, SqliteStore
from backfill.sandbox.server import RunningSandbox

from .conftest import cli, png_bytes, sandbox_ledger, simple_rows, write_manifest
from .test_ledger_contract import _V1_SCHEMA as V1_SCHEMA
from .test_ledger_contract import BINDING, open_store, request
from .test_promise import CountingImages

RUN_CODE = 1  # some rows rejected (the empty photo)


def plain_forms(data: bytes) -> list[bytes]:
    """Every way a file could hold the plain SHA-256 of `data`: hex either case, base64 and its URL-safe form."""
    digest = hashlib.sha256(data).digest()
    return [
        digest.hex().encode(),
        digest.hex().upper().encode(),
        base64.b64encode(digest).rstrip(b"="),
        base64.urlsafe_b64encode(digest).rstrip(b"="),
        digest,
    ]


def holders(folder: Path, photos: list[bytes], *, skip: Path | None = None) -> list[str]:
    """The files under `folder` (but `skip`) that hold some photo's plain digest, in any form."""
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if skip is not None and path.is_relative_to(skip):
            continue
        body = path.read_bytes()
        found += [
            f"{path.name}: photo {i}"
            for i, data in enumerate(photos)
            if any(f in body for f in plain_forms(data))
        ]
    return found


def test_a_run_its_resume_export_and_reports_hold_no_plain_photo_digest(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    """A real run (enrolled and rejected rows), a resume after one photo's file changed but not its bytes (so its
    pin is compared), an export, status and both reports: no file under the run's folders, nor the ledger, nor
    any line on the terminal, holds a photo's plain SHA-256 as hex or base64."""
    work = tmp_path / "work"
    work.mkdir()
    manifest = write_manifest(work, [*simple_rows(4), ("user_bad", "2021-08-12", "bad.png")])
    (work / "images" / "bad.png").write_bytes(b"")
    photos = [(work / "images" / f"user_{i:04d}.png").read_bytes() for i in range(4)]
    where = sandbox_ledger(work, threaded_sandbox)
    out = work / "out"
    said: list[str] = []
    code, stdout, stderr = cli("run", str(manifest), *where, "--out", str(out), "--no-progress")
    assert code == RUN_CODE, stderr
    said += [stdout, stderr]
    # The same bytes, rewritten: the quick check fails, so the resume reads the photo and compares its pin.
    target = work / "images" / "user_0000.png"
    target.write_bytes(target.read_bytes())
    os.utime(target, ns=(1, 1))
    code, stdout, stderr = cli("run", str(manifest), *where, "--out", str(out), "--no-progress")
    assert code == RUN_CODE, stderr
    said += [stdout, stderr]
    assert "user_id_reused" not in stdout + stderr
    for fmt in ("csv", "jsonl"):
        code, stdout, stderr = cli("export", *where, "--format", fmt, "--out", str(work / f"export.{fmt}"))
        assert code == 0, stderr
        said += [stdout, stderr]
    runs = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(runs) == 2
    for args in (
        ["report", str(runs[0])],
        ["report", *where, "--output", str(work / "migration.html")],
        ["status", *where],
    ):
        code, stdout, stderr = cli(*args)
        assert code == 0, stderr
        said += [stdout, stderr]
    # Each of these would hold the pins if anything did: the ledger pinned every photo sent.
    assert (work / "export.csv").read_text().count("\n") == 5 and (work / "migration.html").exists()
    assert (work / "cp.sqlite").exists() and (runs[0] / "results.csv").exists()
    key = ledger_key(work / "cp.sqlite")
    assert {key.of(p) for p in photos} <= set((work / "export.csv").read_text().replace("\n", ",").split(","))
    assert holders(work, photos, skip=work / "images") == []
    terminal = "\n".join(said).encode()
    assert not [i for i, data in enumerate(photos) if any(f in terminal for f in plain_forms(data))]


def ledger_key(path: Path) -> PhotoKey:
    conn = sqlite3.connect(path)
    try:
        (secret,) = conn.execute("SELECT value FROM meta WHERE key = 'photo_key'").fetchone()
    finally:
        conn.close()
    return PhotoKey(secret=bytes.fromhex(secret))


def as_schema_2(path: Path, photos: dict[str, bytes]) -> None:
    """Turn a ledger into one as the previous version left it: schema 2, no key, each pin a plain SHA-256.

    Schema 2's tables are schema 3's (only meta differs), so this is the file an older run would have written.
    """
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN")
        conn.executemany(
            "UPDATE users SET photo_sha256 = ? WHERE user_id = ?",
            [(hashlib.sha256(data).hexdigest(), uid) for uid, data in photos.items()],
        )
        conn.execute("DELETE FROM meta WHERE key = 'photo_key'")
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema'")
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


async def test_a_schema_2_ledger_is_keyed_in_place_and_its_finished_rows_are_skipped_without_a_read(
    tmp_path: Path, make_settings: Callable[..., Settings], threaded_sandbox: RunningSandbox
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(6))
    photos = {f"user_{i:04d}": (tmp_path / "images" / f"user_{i:04d}.png").read_bytes() for i in range(6)}
    settings = make_settings(threaded_sandbox)
    first = await compose.run(settings, manifest)
    assert first.counts == {"enrolled": 6}
    ledger = tmp_path / "checkpoint.sqlite"
    as_schema_2(ledger, photos)
    assert holders(tmp_path, list(photos.values()), skip=tmp_path / "images") != []  # what it held before

    store = await SqliteStore.open(ledger, compose.binding(settings), writable=True)
    try:
        known = await store.lookup(list(photos))
        key = store.photo_key
    finally:
        await store.close()
    assert {uid: row.photo_sha256 for uid, row in known.items()} == {
        uid: key.of(p) for uid, p in photos.items()
    }
    assert ledger_key(ledger) == key
    conn = sqlite3.connect(ledger)
    try:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == (SCHEMA_VERSION,)
    finally:
        conn.close()
    # The old digests are gone from the ledger's files too (what an update leaves behind, and the WAL).
    assert holders(tmp_path, list(photos.values()), skip=tmp_path / "images") == []

    images = CountingImages(tmp_path)
    again = await compose.run(settings, manifest, images=images)
    assert again.counts == {"skipped": 6} and images.calls["read"] == 0
    # A photo whose file changed but not its bytes is read and matches its migrated pin; another photo doesn't.
    same, other = tmp_path / "images" / "user_0000.png", tmp_path / "images" / "user_0001.png"
    same.write_bytes(photos["user_0000"])
    os.utime(same, ns=(1, 1))
    other.write_bytes(png_bytes(99))
    images = CountingImages(tmp_path)
    third = await compose.run(settings, manifest, images=images)
    assert third.counts == {"skipped": 5, "rejected": 1} and images.calls["read"] == 2
    assert holders(tmp_path, [*photos.values(), png_bytes(99)], skip=tmp_path / "images") == []


def test_a_pin_is_keyed_by_the_secret_and_is_never_the_plain_digest() -> None:
    data = png_bytes(3)
    one, two = PhotoKey.new(), PhotoKey.new()
    plain = hashlib.sha256(data).hexdigest()
    assert one.of(data) == one.pin(plain) == PhotoKey(secret=one.secret).of(data)
    assert one.of(data) != two.of(data) and plain not in (one.of(data), two.of(data))
    assert one.of(data) != one.of(png_bytes(4))
    assert one.secret.hex() not in repr(one) and len(one.secret) == 32


async def test_a_schema_1_ledger_keeps_no_plain_digest_in_its_file_once_migrated(tmp_path: Path) -> None:
    """Schema 1 to 3 rebuilds `users` and drops the old table: the pages it frees held every plain digest."""
    path = tmp_path / "ledger.sqlite"
    photos = [png_bytes(i, size=8 + i) for i in range(40)]
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(V1_SCHEMA)
    conn.executemany(
        "INSERT INTO users VALUES (?, 'enrolled', 0, 1, 200, '0840', 'Enroll User', '7', 'j', ?, ?, 10, 123, "
        "'2021-01-01', 't', 't', 't', 'r')",
        [(f"v{i}", hashlib.sha256(p).hexdigest(), f"/i/v{i}.png") for i, p in enumerate(photos)],
    )
    conn.close()
    assert holders(tmp_path, photos) != []
    store = await SqliteStore.open(
        path, BINDING, writable=True, legacy_endpoints={"sandbox": BINDING.endpoint}
    )
    try:
        known = await store.lookup([f"v{i}" for i in range(len(photos))])
        assert [known[f"v{i}"].photo_sha256 for i in range(len(photos))] == [
            store.photo_key.of(p) for p in photos
        ]
    finally:
        await store.close()
    assert holders(tmp_path, photos) == []


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_a_ledger_keeps_its_own_key_for_good(tmp_path: Path, kind: str) -> None:
    """Made with the ledger, the same whoever opens it later, and another ledger's is another."""
    for folder in (tmp_path / "a", tmp_path / "b"):
        folder.mkdir()
    first = await open_store(kind, tmp_path / "a")
    made = first.photo_key
    await first.close()
    again = await open_store(kind, tmp_path / "a")
    other = await open_store(kind, tmp_path / "b")
    try:
        assert again.photo_key == made and len(made.secret) == 32 and other.photo_key != made
    finally:
        await again.close()
        await other.close()


async def test_a_postgres_schema_1_ledger_is_keyed_in_place(pg_url: str) -> None:
    from backfill.ledger.postgres import PostgresStore

    store = await PostgresStore.open(pg_url, BINDING, writable=True)
    try:
        for uid, photo in (("p1", "a"), ("p2", "b")):
            assert not isinstance(await store.begin_attempt(request(uid, photo)), Refused)
        await store.flush()
    finally:
        await store.close()
    plain = {"p1": "a" * 64, "p2": "b" * 64}
    with psycopg.connect(pg_url, autocommit=True) as conn:  # as schema 1 left it: plain digests, no key
        conn.execute("DROP TABLE backfill.secrets")
        conn.execute("UPDATE backfill.meta SET value = '1' WHERE key = 'schema'")
        for uid, digest in plain.items():
            conn.execute("UPDATE backfill.users SET photo_sha256 = %s WHERE user_id = %s", (digest, uid))
    with pytest.raises(LedgerError, match=r"has schema 1, from an earlier version.*writing command"):
        await PostgresStore.open(pg_url, BINDING, writable=False)
    store = await PostgresStore.open(pg_url, BINDING, writable=True)
    try:
        rows = await store.lookup(list(plain))
        assert {u: r.photo_sha256 for u, r in rows.items()} == {
            u: store.photo_key.pin(d) for u, d in plain.items()
        }
        # The pin still holds: the same bytes are let go again, others refused.
        same = replace(request("p1"), photo_sha256=store.photo_key.pin(plain["p1"]))
        assert not isinstance(await store.begin_attempt(same), Refused)
        other = replace(request("p2"), photo_sha256=store.photo_key.pin("c" * 64))
        assert isinstance(await store.begin_attempt(other), Refused)
    finally:
        await store.close()
    reader = await PostgresStore.open(pg_url, BINDING, writable=False)
    try:
        assert reader.photo_key == store.photo_key
    finally:
        await reader.close()

"""Photos shared by several user_ids (max_ids_per_photo): `validate` lists them, `run` sends none of their rows."""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import os
import sqlite3
import struct
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from backfill import compose
from backfill.config import Settings
from backfill.errors import LedgerError
from backfill.images import Fingerprint, ImageError, ImageProblem, Photo, PhotoKey
from backfill.images.content import sample_in
from backfill.ledger import DoneRow, Refused
from backfill.ledger.postgres.schema import SCHEMA_VERSION as PG_SCHEMA
from backfill.ledger.sqlite import SCHEMA_VERSION as SQLITE_SCHEMA
from backfill.ledger.sqlite import SqliteStore
from backfill.manifest import open_manifest
from backfill.run import shared
from backfill.run.shared import Census
from backfill.sandbox import Faults, RunningSandbox, start_sandbox
from backfill.vocab import Reason

from .conftest import API_KEY, PARTNER_ID, Sleeps, cli, png_bytes, sandbox_ledger, write_manifest
from .test_promise import CountingImages, rejects, results

FACE = png_bytes(999)  # the one photo every shared row names


def shared_manifest(folder: Path, shared: int = 50, own: int = 3) -> Path:
    """`shared` rows whose photos are FACE (under two file names: found by content, not by path), then `own`
    rows with a photo each."""
    (folder / "images").mkdir(exist_ok=True)
    (folder / "images" / "face.png").write_bytes(FACE)
    (folder / "images" / "face_copy.png").write_bytes(FACE)
    rows = [(f"same_{i:03d}", "2021-08-12", "face.png" if i % 2 else "face_copy.png") for i in range(shared)]
    rows += [(f"own_{i:03d}", "2021-08-12", f"own_{i:03d}.png") for i in range(own)]
    return write_manifest(folder, rows)


def later_manifest(tmp_path: Path, first: Path, rows: list[str]) -> Path:
    """A later export, in tmp_path/later, naming the photos of `first` ("user_id:photo", a .png there)."""
    later = tmp_path / "later"
    later.mkdir()
    (later / "images").symlink_to(first / "images")
    with (later / "manifest.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["user_id", "user_created_at", "image_path"])
        for row in rows:
            uid, photo = row.split(":")
            writer.writerow([uid, "2021-08-12", f"images/{photo}.png"])
    return later / "manifest.csv"


def photos_counted(caplog: pytest.LogCaptureFixture) -> tuple[logging.LogRecord, dict[str, int]]:
    """The one `photos_counted` event a run logged (its census), and its fields."""
    [record] = [r for r in caplog.records if getattr(r, "event", "") == "photos_counted"]
    fields: dict[str, int] = getattr(record, "fields")  # noqa: B009 - set by the logger's `extra`
    return record, fields


def test_validate_flags_fifty_ids_sharing_one_photo(tmp_path: Path) -> None:
    manifest = shared_manifest(tmp_path)
    code, out, err = cli("validate", str(manifest), "--out", str(tmp_path / "out"))
    assert code == 1, err
    assert "3 valid, 50 rejected" in out
    assert "  shared_photo: 50" in out
    assert "1 photo(s) named by more than 1 user_id (max_ids_per_photo)" in out
    assert "  50 user_ids: lines 2, 3, 4, 5, 6, 7, 8, 9, 10, 11 and 40 more" in out
    [found] = (tmp_path / "out").glob("*/rejects.csv")
    with found.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["user_id"] for r in rows} == {f"same_{i:03d}" for i in range(50)}
    assert {r["reason"] for r in rows} == {"shared_photo"}
    assert "named by 50 different user_ids" in rows[0]["message"]
    # The setting has no flag (a manifest rule): the message says where it can be raised.
    assert "max_ids_per_photo (the config file's key, or BACKFILL_MAX_IDS_PER_PHOTO)" in rows[0]["message"]


def test_check_lists_the_shared_photos_as_a_problem(tmp_path: Path, threaded_sandbox: RunningSandbox) -> None:
    manifest = shared_manifest(tmp_path)
    code, out, err = cli("check", str(manifest), *sandbox_ledger(tmp_path, threaded_sandbox))
    assert code == 2, out + err
    [line] = [line for line in out.splitlines() if "shared photos:" in line]
    assert line.startswith("problem")
    assert "1 photo(s) named by more than 1 user_id (max_ids_per_photo): `run` rejects their 50 rows" in line
    assert "largest: 50 user_ids: lines 2, 3, 4, 5, 6, 7, 8, 9, 10, 11 and 40 more" in line
    code, out, _ = cli(
        "check",
        str(manifest),
        *sandbox_ledger(tmp_path, threaded_sandbox),
        env={"BACKFILL_MAX_IDS_PER_PHOTO": "50"},
    )
    assert code == 0, out
    assert "ok       shared photos: 53 photos still to be sent, none named by more than 50 user_ids" in out


def test_the_setting_allows_a_group_that_size_and_zero_checks_nothing(tmp_path: Path) -> None:
    manifest = shared_manifest(tmp_path, shared=3)
    for setting, valid in (("3", 6), ("2", 3), ("0", 6)):
        env = {"BACKFILL_MAX_IDS_PER_PHOTO": setting}
        code, out, _ = cli("validate", str(manifest), "--out", str(tmp_path / "out"), env=env)
        assert f"{valid} valid" in out, (setting, out)
        assert code == (0 if valid == 6 else 1)


def test_a_negative_setting_is_refused_naming_the_key(tmp_path: Path) -> None:
    manifest = shared_manifest(tmp_path, shared=2)
    code, _, err = cli("validate", str(manifest), env={"BACKFILL_MAX_IDS_PER_PHOTO": "-1"})
    assert code == 2
    assert "max_ids_per_photo (from environment BACKFILL_MAX_IDS_PER_PHOTO): -1 is negative" in err
    assert "Traceback" not in err


async def test_run_sends_no_row_of_a_shared_photo(
    tmp_path: Path,
    sandbox: RunningSandbox,
    make_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    manifest = shared_manifest(tmp_path)
    with caplog.at_level(logging.INFO, logger="backfill"):
        summary = await compose.run(make_settings(sandbox), manifest)
    record, fields = photos_counted(caplog)
    assert record.levelno == logging.WARNING
    assert fields == {"photos": 53, "read_whole": 50, "shared_photos": 1, "rejected": 50}
    assert summary.exit_code == 1
    assert summary.counts == {"enrolled": 3, "rejected": 50}
    assert summary.sent == 3
    assert {uid: r["reason"] for uid, r in rejects(summary).items()} == {
        f"same_{i:03d}": "shared_photo" for i in range(50)
    }
    assert set(sandbox.state.requests) == {"own_000", "own_001", "own_002"}


async def test_the_shared_rows_of_a_dry_run_are_rejected_too(
    tmp_path: Path, sandbox: RunningSandbox, make_settings: Callable[..., Settings]
) -> None:
    summary = await compose.run(make_settings(sandbox, dry_run=True), shared_manifest(tmp_path, shared=2))
    assert summary.counts == {"dry_run": 3, "rejected": 2}


async def test_an_enrolled_id_stays_enrolled_and_new_ids_naming_its_photo_are_rejected(
    tmp_path: Path, sandbox: RunningSandbox, make_settings: Callable[..., Settings]
) -> None:
    first = tmp_path / "first"
    first.mkdir()
    earlier = await compose.run(make_settings(sandbox), shared_manifest(first, shared=1, own=1))
    assert earlier.counts == {"enrolled": 2}  # same_000 alone names FACE: nothing shared
    # Later the export names FACE for a new ID as well, same_000's row and photo unchanged.
    later = later_manifest(tmp_path, first, ["same_000:face_copy", "own_000:own_000", "new_001:face"])
    again = await compose.run(make_settings(sandbox), later)
    assert again.counts == {"skipped": 2, "rejected": 1}
    assert results(again)["same_000"]["status"] == "skipped"
    refused = rejects(again)
    assert {uid: r["reason"] for uid, r in refused.items()} == {"new_001": "shared_photo"}
    assert "named by 2 different user_ids" in refused["new_001"]["message"]
    assert "1 of them enrolled earlier with it, and stay enrolled" in refused["new_001"]["message"]
    # And a re-run of the first manifest rejects nothing: a row is never shared with itself.
    rerun = await compose.run(make_settings(sandbox), first / "manifest.csv")
    assert rerun.exit_code == 0 and rerun.counts == {"skipped": 2}


def _padded_png(middle: int) -> bytes:
    """A 20 KB PNG (complete to the check, which reads its head and tail only) whose byte 10,000 is `middle`:
    photos made with different values differ in neither size, head nor tail."""
    data = bytearray(20_000)
    data[10_000] = middle
    # The CRC is left 0 (the check never reads it): a true one would differ in the tail.
    chunk = struct.pack(">I", len(data)) + b"IDAT" + bytes(data) + bytes(4)
    iend = b"\x00\x00\x00\x00IEND\xaeB`\x82"
    return b"\x89PNG\r\n\x1a\n" + chunk + iend


async def test_only_photos_alike_in_size_head_and_tail_are_read_whole(tmp_path: Path) -> None:
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    rows = []
    for i in range(20):  # twenty photos of their own, several of them the same size
        (images_dir / f"own_{i}.png").write_bytes(png_bytes(i))
        rows.append((f"own_{i}", "2021-08-12", f"own_{i}.png"))
    (images_dir / "a.png").write_bytes(_padded_png(1))
    (images_dir / "a_again.png").write_bytes(_padded_png(1))
    (images_dir / "b.png").write_bytes(_padded_png(2))  # like a.png but in the middle
    rows += [("a1", "2021-08-12", "a.png"), ("a2", "2021-08-12", "a_again.png"), ("b", "2021-08-12", "b.png")]
    manifest = open_manifest(write_manifest(tmp_path, rows), compose.manifest_rules(Settings()))
    images = CountingImages(tmp_path)
    census = Census(1, PhotoKey.new())
    try:
        for batch in manifest.batches():
            checked = await images.check_many([c.image for c in batch.candidates])
            census.add((c.line, c.user_id, f) for c, f in zip(batch.candidates, checked, strict=True))
            assert all(isinstance(f, Fingerprint) and f.sample for f in checked)
        shared = await census.settle(images)
        assert images.calls["read"] == 3  # a.png, a_again.png and b.png; none of the twenty
        assert shared.read_whole == 3
        assert (shared.groups, shared.rows) == (1, 2)
        assert {r.user_id for r in shared.every_reject()} == {"a1", "a2"}
    finally:
        census.close()


async def test_a_fleet_of_two_rejects_each_shared_row_once_and_sends_the_others_once(
    tmp_path: Path, sandbox: RunningSandbox, make_settings: Callable[..., Settings], pg_url: str
) -> None:
    manifest = shared_manifest(tmp_path, shared=20, own=10)
    runs = [make_settings(sandbox, ledger=pg_url, out=tmp_path / f"out-{n}", concurrency=2) for n in (1, 2)]
    summaries = await asyncio.gather(*(compose.run(s, manifest) for s in runs))
    refused: dict[str, str] = {}
    for summary in summaries:
        for uid, r in rejects(summary).items():
            assert uid not in refused  # each row told once, by the process that claimed it
            refused[uid] = r["reason"]
    assert refused == {f"same_{i:03d}": "shared_photo" for i in range(20)}
    assert sum(s.sent for s in summaries) == 10
    assert set(sandbox.state.requests) == {f"own_{i:03d}" for i in range(10)}
    assert all(n == 1 for n in sandbox.state.requests.values())


async def test_the_resume_of_a_finished_job_takes_no_census(
    tmp_path: Path,
    sandbox: RunningSandbox,
    make_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    manifest = shared_manifest(tmp_path, shared=1, own=30)
    with caplog.at_level(logging.INFO, logger="backfill"):
        first = await compose.run(make_settings(sandbox, chunk_rows=7), manifest)
        counted = [r for r in caplog.records if getattr(r, "event", "") == "photos_counted"]
        assert first.counts == {"enrolled": 31} and len(counted) == 1
        caplog.clear()
        asked: list[int] = []
        done = SqliteStore.done

        async def counted_done(self: SqliteStore, user_ids: list[str]) -> dict[str, DoneRow]:
            asked.append(len(user_ids))
            return await done(self, user_ids)

        monkeypatch.setattr(SqliteStore, "done", counted_done)
        again = await compose.run(make_settings(sandbox, chunk_rows=7), manifest)
    assert again.counts == {"skipped": 31}
    # Every row is done: none of them can be rejected for sharing, so the manifest isn't read a second time.
    assert not [r for r in caplog.records if getattr(r, "event", "") == "photos_counted"]
    # And the ledger is asked once a chunk which of its rows are done: the answer that spared the census is
    # the one the planner skips them by.
    assert asked == [7, 7, 7, 7, 3]


def test_a_forgotten_id_is_left_out_of_the_census_and_its_photo_is_not_read(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    # same_000 is enrolled with FACE, then forgotten on request. A later manifest names it again, and a new ID
    # with FACE: the forgotten row is told `forgotten` (never a shared_photo reject: it is never sent, and its
    # photo is not read for a user who asked to be forgotten); the new ID is the only one left with FACE.
    where = sandbox_ledger(tmp_path, threaded_sandbox)
    out = ["--out", str(tmp_path / "out"), "--no-progress"]
    first = tmp_path / "first"
    first.mkdir()
    assert cli("run", str(shared_manifest(first, shared=1, own=0)), *where, *out)[0] == 0
    assert cli("forget", "same_000", "--yes", *where)[0] == 0
    later = later_manifest(tmp_path, first, ["same_000:face_copy", "new_001:face"])
    code, said, err = cli("run", str(later), *where, *out, "--log-format", "json")
    assert code == 0, said + err
    [counted] = [e for e in map(json.loads, err.splitlines()) if e["event"] == "photos_counted"]
    assert (counted["photos"], counted["read_whole"], counted["shared_photos"]) == (1, 0, 0)
    (run,) = sorted(p for p in (tmp_path / "out").iterdir() if p.is_dir())[-1:]
    with (run / "results.csv").open(newline="") as handle:
        statuses = {r["user_id"]: r["status"] for r in csv.DictReader(handle)}
    assert statuses == {"same_000": "forgotten", "new_001": "enrolled"}
    assert "new_001" in threaded_sandbox.state.requests


# --- IDs sent from other manifests: the ledger's samples ---


def other_manifest(tmp_path: Path, first: Path) -> Path:
    """A later export (tmp_path/later) naming FACE, which `first` sent for same_000, for a new ID, and a photo
    of its own for another."""
    (first / "images" / "fresh.png").write_bytes(png_bytes(4242))
    return later_manifest(tmp_path, first, ["new_001:face_copy", "new_002:fresh"])


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_an_id_sent_from_another_manifest_counts_and_a_new_id_naming_its_photo_is_rejected(
    tmp_path: Path,
    sandbox: RunningSandbox,
    make_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
    request: pytest.FixtureRequest,
    kind: str,
) -> None:
    where = {"ledger": request.getfixturevalue("pg_url")} if kind == "postgres" else {}
    first = tmp_path / "first"
    first.mkdir()
    earlier = await compose.run(make_settings(sandbox, **where), shared_manifest(first, shared=1, own=1))
    assert earlier.counts == {"enrolled": 2}
    later = other_manifest(tmp_path, first)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="backfill"):
        again = await compose.run(make_settings(sandbox, **where), later)
    # same_000 is on no line of the later file: the ledger's sample of its photo finds it, and only the new
    # row alike in size and sample (face_copy) is read whole; fresh.png is not.
    _, fields = photos_counted(caplog)
    assert fields == {"photos": 2, "read_whole": 1, "shared_photos": 1, "rejected": 1}
    assert again.exit_code == 1 and again.counts == {"enrolled": 1, "rejected": 1}
    refused = rejects(again)
    assert {uid: r["reason"] for uid, r in refused.items()} == {"new_001": "shared_photo"}
    said = refused["new_001"]["message"]
    assert (
        "named by 2 different user_ids (lines 2; and 1 more user_id sent with it earlier, which no line"
        in said
    )
    assert "new_001" not in sandbox.state.requests and sandbox.state.requests["new_002"] == 1
    # same_000 stays enrolled, untouched.
    rerun = await compose.run(make_settings(sandbox, **where), first / "manifest.csv")
    assert rerun.exit_code == 0 and rerun.counts == {"skipped": 2}


def test_check_counts_the_ids_of_other_manifests_in_a_shared_photo(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    where = sandbox_ledger(tmp_path, threaded_sandbox)
    first = tmp_path / "first"
    first.mkdir()
    code, _, err = cli(
        "run", str(shared_manifest(first, shared=1, own=0)), *where, "--out", str(tmp_path / "out")
    )
    assert code == 0, err
    code, out, err = cli("check", str(other_manifest(tmp_path, first)), *where)
    assert code == 2, out + err
    [line] = [line for line in out.splitlines() if "shared photos:" in line]
    assert "`run` rejects their 1 rows" in line
    assert "largest: 2 user_ids: lines 2, and 1 sent earlier from other manifests" in line


async def test_ids_sent_before_the_ledger_kept_samples_are_not_found_and_later_ones_are(
    tmp_path: Path, sandbox: RunningSandbox, make_settings: Callable[..., Settings]
) -> None:
    """A schema-4 ledger gains the column empty: nothing is made up for the rows it sent (their photos are not
    read), so their photos aren't found from another manifest; an ID sent after the migration is."""
    first = tmp_path / "first"
    first.mkdir()
    earlier = await compose.run(make_settings(sandbox), shared_manifest(first, shared=1, own=1))
    assert earlier.counts == {"enrolled": 2}
    ledger = tmp_path / "checkpoint.sqlite"
    conn = sqlite3.connect(ledger)
    try:  # as schema 4 left it
        conn.execute("DROP INDEX users_photo")
        conn.execute("ALTER TABLE users DROP COLUMN photo_sample")
        conn.execute("UPDATE meta SET value = '4' WHERE key = 'schema'")
        conn.commit()
    finally:
        conn.close()
    with pytest.raises(LedgerError, match=r"schema '4'.*Open it once with a writable command"):
        await compose.open_store(make_settings(sandbox), writable=False)

    later = other_manifest(tmp_path, first)  # new_001 names same_000's photo, sent before the migration
    again = await compose.run(make_settings(sandbox), later)
    assert again.counts == {"enrolled": 2}
    conn = sqlite3.connect(ledger)
    try:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == (SQLITE_SCHEMA,)
        samples = dict(conn.execute("SELECT user_id, photo_sample FROM users").fetchall())
        assert samples["same_000"] is None and samples["own_000"] is None
        # Keyed with the ledger's secret, like the pin: the plain sample of FACE is nowhere in it.
        key = PhotoKey(
            secret=bytes.fromhex(conn.execute("SELECT value FROM meta WHERE key = 'photo_key'").fetchone()[0])
        )
        assert samples["new_001"] == key.sample(sample_in(FACE)) != sample_in(FACE)
        assert samples["new_002"] is not None
        assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'users_photo'").fetchone() == (
            1,
        )
    finally:
        conn.close()
    # new_001 (sent after the migration, with FACE) is found now, by a third export naming FACE again.
    third = tmp_path / "third"
    third.mkdir()
    (third / "images").symlink_to(first / "images")
    (third / "manifest.csv").write_text(
        "user_id,user_created_at,image_path\nnew_003,2021-08-12,images/face.png\n"
    )
    last = await compose.run(make_settings(sandbox), third / "manifest.csv")
    assert {uid: r["reason"] for uid, r in rejects(last).items()} == {"new_003": "shared_photo"}
    assert "new_003" not in sandbox.state.requests


async def test_a_postgres_schema_4_ledger_gains_the_column_and_its_index(pg_url: str) -> None:
    from backfill.ledger.postgres import PostgresStore

    from .test_ledger_contract import BINDING, request

    store = await PostgresStore.open(pg_url, BINDING, writable=True)
    try:
        assert not isinstance(await store.begin_attempt(request("p1")), Refused)
        await store.flush()
    finally:
        await store.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:  # as schema 4 left it
        conn.execute("DROP INDEX backfill.users_photo")
        conn.execute("ALTER TABLE backfill.users DROP COLUMN photo_sample")
        conn.execute("UPDATE backfill.meta SET value = '4' WHERE key = 'schema'")
    with pytest.raises(LedgerError, match=r"has schema 4, from an earlier version.*writing command"):
        await PostgresStore.open(pg_url, BINDING, writable=False)
    store = await PostgresStore.open(pg_url, BINDING, writable=True)
    try:
        (old,) = (await store.lookup(["p1"])).values()
        assert old.photo_sha256 == "a" * 64 and old.photo_sample is None
        assert not isinstance(await store.begin_attempt(request("p2")), Refused)
        await store.flush()
        assert [h.user_id for h in await store.holders([(10, ord("a"))])] == ["p2"]
    finally:
        await store.close()
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT value FROM backfill.meta WHERE key = 'schema'").fetchone() == (PG_SCHEMA,)
        assert conn.execute("SELECT to_regclass('backfill.users_photo') IS NOT NULL").fetchone() == (True,)


class UnreadableOnce(CountingImages):
    """The local source, whose first read of `name` fails as storage failing past its retries would."""

    def __init__(self, base: Path, name: str) -> None:
        super().__init__(base)
        self.name = name
        self.failed = False

    async def read_source(self, fingerprint: Fingerprint) -> Photo:
        if fingerprint.ref.endswith(self.name) and not self.failed:
            self.failed = True
            problem = ImageProblem(
                reason=Reason.IMAGE_UNREADABLE, message=f"image {fingerprint.ref}: I/O error"
            )
            raise ImageError(problem)
        return await super().read_source(fingerprint)


async def test_a_photo_that_cant_be_read_to_be_counted_is_held_back_with_the_rows_alike_to_it(
    tmp_path: Path, sandbox: RunningSandbox, make_settings: Callable[..., Settings]
) -> None:
    """Two IDs share FACE; the census's read of one copy fails, then reads work again. Neither is sent: the one
    unread is rejected with its read's reason, the one alike to it as a possible shared photo. Sending either
    would send a shared photo uncounted."""
    manifest = shared_manifest(tmp_path, shared=2, own=1)
    images = UnreadableOnce(tmp_path, "face.png")
    summary = await compose.run(make_settings(sandbox), manifest, images=images)
    assert images.failed
    assert summary.counts == {"enrolled": 1, "rejected": 2}
    refused = rejects(summary)
    assert {uid: r["reason"] for uid, r in refused.items()} == {
        "same_001": "image_unreadable",
        "same_000": "shared_photo",
    }
    assert "not sent uncounted" in refused["same_001"]["message"]
    assert "may be the same as another row's" in refused["same_000"]["message"]
    assert set(sandbox.state.requests) == {"own_000"}
    # Run again, every read working: the two are one photo, both rejected as shared.
    again = await compose.run(make_settings(sandbox), manifest)
    assert {uid: r["reason"] for uid, r in rejects(again).items()} == {
        "same_000": "shared_photo",
        "same_001": "shared_photo",
    }
    assert set(sandbox.state.requests) == {"own_000"}


def test_sample_photos_gives_rows_sent_before_schema_5_their_samples_where_their_photos_are_unchanged(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    where = sandbox_ledger(tmp_path, threaded_sandbox)
    out = ["--out", str(tmp_path / "out"), "--no-progress"]
    first = tmp_path / "first"
    first.mkdir()
    assert cli("run", str(shared_manifest(first, shared=1, own=2)), *where, *out)[0] == 0
    conn = sqlite3.connect(tmp_path / "cp.sqlite")
    try:  # as a ledger from before schema 5 holds them once migrated
        conn.execute("UPDATE users SET photo_sample = NULL")
        conn.commit()
    finally:
        conn.close()
    os.utime(first / "images" / "own_001.png", ns=(1, 1))  # another version than the one sent
    (first / "images" / "own_000.png").unlink()  # gone
    code, said, err = cli("sample-photos", *where)
    assert code == 0, said + err
    assert (
        "1 of 3 photos pinned without a sample are sampled now; 1 have changed since they were sent and 1 "
        in said
    )
    # same_000's photo (FACE) is found now, when another manifest names it for a new ID.
    code, said, err = cli("run", str(other_manifest(tmp_path, first)), *where, *out)
    assert code == 1, said + err
    (run,) = sorted(p for p in (tmp_path / "out").iterdir() if p.is_dir())[-1:]
    with (run / "rejects.csv").open(newline="") as handle:
        assert {r["user_id"]: r["reason"] for r in csv.DictReader(handle)} == {"new_001": "shared_photo"}
    assert "new_001" not in threaded_sandbox.state.requests
    # Asked again, nothing is left to sample but the two it couldn't.
    code, said, _ = cli("sample-photos", *where)
    assert code == 0 and said.startswith("0 of 2 photos pinned without a sample are sampled now")


async def test_a_row_the_ledger_holds_for_its_own_id_alone_is_not_read_whole_again(
    tmp_path: Path, make_settings: Callable[..., Settings], sleeps: Sleeps, caplog: pytest.LogCaptureFixture
) -> None:
    """A row sent before and not done (here a 503 its one attempt ended on) is pinned in the ledger to its own
    ID: alike to its own photo, it is no candidate, and the re-run's census reads no photo whole."""
    manifest = shared_manifest(tmp_path, shared=0, own=3)
    async with await start_sandbox(PARTNER_ID, API_KEY, faults=Faults(script={"own_000": [503]})) as server:
        first = await compose.run(make_settings(server, max_attempts=1), manifest, sleep=sleeps)
        assert first.counts == {"enrolled": 2, "retry_exhausted": 1}
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="backfill"):
            again = await compose.run(make_settings(server), manifest, sleep=sleeps)
    _, fields = photos_counted(caplog)
    assert fields == {"photos": 1, "read_whole": 0, "shared_photos": 0, "rejected": 0}
    assert again.counts == {"skipped": 2, "enrolled": 1}


async def test_the_ledgers_ids_come_a_page_at_a_time_and_all_count(
    tmp_path: Path,
    sandbox: RunningSandbox,
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Five IDs sent with FACE earlier (that run allowed it), a new one now: with pages of two IDs, all five are
    fetched and counted, none of their photos read."""
    first = tmp_path / "first"
    first.mkdir()
    allowed = make_settings(sandbox, max_ids_per_photo=5)
    assert (await compose.run(allowed, shared_manifest(first, shared=5, own=0))).counts == {"enrolled": 5}
    monkeypatch.setattr(shared, "HOLDERS_PAGE", 2)
    again = await compose.run(make_settings(sandbox), later_manifest(tmp_path, first, ["new_001:face"]))
    said = rejects(again)["new_001"]["message"]
    assert "named by 6 different user_ids (lines 2; and 5 more user_ids sent with it earlier" in said

"""The resume decision (run/plan.py): its one skip test, and a done ID's photo changed in any one of its facts."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from backfill import compose
from backfill.config import Settings
from backfill.images import Fingerprint, ImageProblem, Pinned
from backfill.images.local import LocalImageSource
from backfill.ledger import DoneRow
from backfill.ledger.sqlite import SqliteStore
from backfill.run.plan import DoneOnce, unchanged
from backfill.run.records import Summary
from backfill.sandbox import RunningSandbox
from backfill.vocab import Reason

from .conftest import png_bytes, simple_rows, write_manifest

PINNED = Fingerprint(ref="/photos/a.png", size=120, version="1700000000000000000")


def facts(fp: Fingerprint) -> tuple[str, int, str]:
    return fp.ref, fp.size, fp.version


def test_the_skip_test_needs_every_fact_of_the_pinned_photo() -> None:
    assert unchanged(PINNED, *facts(PINNED))
    for other in (
        Fingerprint(ref="/photos/b.png", size=PINNED.size, version=PINNED.version),
        Fingerprint(ref=PINNED.ref, size=121, version=PINNED.version),
        Fingerprint(ref=PINNED.ref, size=PINNED.size, version="1700000000000000001"),
    ):
        assert not unchanged(other, *facts(PINNED)), other
    gone = ImageProblem(reason=Reason.IMAGE_MISSING, message="image 'a.png' doesn't exist: check the path")
    assert not unchanged(gone, *facts(PINNED))
    assert not unchanged(PINNED, None, None, None)  # a row never sent has no pinned photo


async def test_the_local_sources_batch_skip_test_is_the_skip_test_of_each_fingerprint(tmp_path: Path) -> None:
    """`unchanged_many` answers without making fingerprints: it must say what `unchanged` of each would, for
    photos as found on the first ask (folders not yet resolved) and the next (its common case, one lstat)."""
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    for name in ("same.png", "bigger.png", "touched.png", "target.png"):
        (root / "a" / name).write_bytes(png_bytes(1))
    (root / "a" / "link.png").symlink_to(root / "a" / "target.png")
    (root / "a" / "dir.png").mkdir()
    outside = tmp_path / "outside.png"
    outside.write_bytes(png_bytes(1))
    (root / "a" / "out.png").symlink_to(outside)
    source = LocalImageSource(base=root, root=root, max_bytes=1 << 20)
    raws = [
        "a/same.png",
        "a/bigger.png",
        "a/touched.png",
        "a/link.png",
        "a/gone.png",
        "a/dir.png",
        "a/out.png",
    ]
    pinned: list[Pinned] = []
    for raw in raws:
        found = (await source.fingerprint_many([raw]))[0]
        pinned.append(facts(found) if isinstance(found, Fingerprint) else (str(root / raw), 1, "1"))
    bigger = (root / "a" / "bigger.png").stat()
    (root / "a" / "bigger.png").write_bytes(png_bytes(1) + b"\0")
    os.utime(root / "a" / "bigger.png", ns=(bigger.st_atime_ns, bigger.st_mtime_ns))  # the size alone tells
    touched = (root / "a" / "touched.png").stat()
    os.utime(root / "a" / "touched.png", ns=(touched.st_atime_ns, touched.st_mtime_ns + 1))
    raws += ["a/same.png"]
    pinned += [(str(root / "a" / "other.png"), pinned[0][1], pinned[0][2])]  # another photo's path pinned
    found = await LocalImageSource(base=root, root=root, max_bytes=1 << 20).fingerprint_many(raws)
    expected = [unchanged(f, *p) for f, p in zip(found, pinned, strict=True)]
    assert expected == [True, False, False, True, False, False, False, False]
    fresh = LocalImageSource(base=root, root=root, max_bytes=1 << 20)
    assert await fresh.unchanged_many(raws, pinned) == expected  # the folder resolved at its first row
    assert await fresh.unchanged_many(raws, pinned) == expected  # and known from the first


def rejects(summary: Summary) -> dict[str, str]:
    with (Path(summary.out_dir) / "rejects.csv").open(newline="") as handle:
        return {r["user_id"]: r["reason"] for r in csv.DictReader(handle)}


def same_size_other_photo(photo: bytes) -> bytes:
    """Another valid PNG of exactly `photo`'s size."""
    for seed in range(1, 10_000):
        other = png_bytes(seed)
        if len(other) == len(photo) and other != photo:
            return other
    raise AssertionError("no PNG of that size")


@pytest.mark.parametrize("fact", ["version", "size", "ref"])
async def test_a_done_ids_photo_changed_in_one_fact_alone_is_noticed_and_never_sent(
    tmp_path: Path, sandbox: RunningSandbox, make_settings: Callable[..., Settings], fact: str
) -> None:
    """Each fact of the quick check, changed with the other two kept, sends the row to its byte comparison,
    which finds another person's photo: a reuse, reported, with nothing sent."""
    rows = simple_rows(3)
    manifest = write_manifest(tmp_path, rows)
    await compose.run(make_settings(sandbox), manifest)
    photo = tmp_path / "images" / "user_0001.png"
    before = photo.stat()
    if fact == "version":  # same path, same size, new bytes (and so a new mtime)
        photo.write_bytes(same_size_other_photo(photo.read_bytes()))
        os.utime(photo, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    elif fact == "size":  # same path, same mtime, other bytes of another size
        photo.write_bytes(png_bytes(99, 9))
        os.utime(photo, ns=(before.st_atime_ns, before.st_mtime_ns))
    else:  # the manifest names another file, of the same size and mtime as the photo sent
        other = tmp_path / "images" / "other.png"
        other.write_bytes(same_size_other_photo(photo.read_bytes()))
        os.utime(other, ns=(before.st_atime_ns, before.st_mtime_ns))
        rows[1] = (rows[1][0], rows[1][1], "other.png")
        manifest = write_manifest(tmp_path, rows)
    changed = photo if fact != "ref" else tmp_path / "images" / "other.png"
    assert (changed.stat().st_size == before.st_size) == (fact != "size")
    assert (changed.stat().st_mtime_ns == before.st_mtime_ns) == (fact != "version")
    sent = sandbox.state.total_requests
    again = await compose.run(make_settings(sandbox), manifest)
    assert rejects(again) == {"user_0001": "user_id_reused"}
    assert again.counts == {"skipped": 2, "rejected": 1}
    assert sandbox.state.total_requests == sent


async def test_a_done_answer_is_kept_for_the_next_ask_of_the_same_ids_alone(
    tmp_path: Path,
    sandbox: RunningSandbox,
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """plan.DoneOnce: the answer the shared-photo rows were given is the planner's, and never another chunk's."""
    settings = make_settings(sandbox)
    await compose.run(settings, write_manifest(tmp_path, simple_rows(3)))
    asked: list[list[str]] = []
    done = SqliteStore.done

    async def counted_done(self: SqliteStore, user_ids: list[str]) -> dict[str, DoneRow]:
        asked.append(list(user_ids))
        return await done(self, user_ids)

    monkeypatch.setattr(SqliteStore, "done", counted_done)
    first, second = ["user_0000", "user_0001"], ["user_0001", "user_0002"]
    store = await compose.open_store(settings, writable=False)
    try:
        once = DoneOnce(store)
        assert set(await once(first)) == set(first)
        other = await once(second)  # not the answer kept for `first`
        assert set(other) == set(second) and asked == [first, second]
        assert await once(list(second)) is other and asked == [first, second]  # the same IDs: kept
        assert set(await once(second)) == set(second) and asked == [first, second, second]  # kept for one ask
    finally:
        await store.close()

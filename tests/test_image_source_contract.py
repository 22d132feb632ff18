"""One contract for every ImageSource, run on each backend: local files, and S3, GCS and Azure on real servers.

A backend is a small factory (`Backend`): it stores photos where its source reads them, replaces and removes
them, and names them as a manifest would. Every object store the tool reads is one: S3 on moto's server, GCS on
fake-gcs-server, Azure Blob on Azurite (tests/storage_servers.py); every promise below is tested on each, with
nothing mocked.

The promises, as the run relies on them:
- `check_many` gives one answer per value, in order: a complete JPEG or PNG within the limit passes with its
  fingerprint, anything else is rejected with the same reason whatever it is stored on (an empty or oversized
  photo with the one size rule's own message, `images.size_problem`);
- `fingerprint_many` reads metadata alone, and its fingerprint of an unchanged photo is the one `check_many`
  and `read` give (a resume skips a done row on it); any new version has another;
- `read` returns exactly the bytes it read, their SHA-256, and the fingerprint of *those* bytes: a photo
  replaced since it was fingerprinted comes back under its new fingerprint if it still passes every rule, and
  is refused with that rule's reason if not. Never the new bytes under the old fingerprint;
- the sample a check takes (`Fingerprint.sample`, which the shared-photo census compares, and the ledger keeps
  keyed) is a function of the photo's bytes alone, and `read` gives back the one its check took;
- `close` may be called more than once.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar

import pytest

from backfill.images import Fingerprint, ImageError, ImageProblem, ImageSource, size_problem
from backfill.images.content import sample_in
from backfill.images.local import LocalImageSource
from backfill.images.remote import FIRST_READ, RemoteImageSource
from backfill.vocab import Reason

from . import storage_servers
from .conftest import default_retry_policy, png_bytes
from .storage_servers import StorageServer
from .test_images import BIG_SCAN, jpeg

LIMIT = 200_000  # max_image_bytes of every source here, inclusive

SMALL_JPEG = jpeg()
SAME_SIZE_JPEG = jpeg([b"\x65\x43\xff\x21" * 8])  # another photo of exactly SMALL_JPEG's size
BIG_JPEG = jpeg([BIG_SCAN])  # over the first read of an object check, so its tail is read too
PNG = png_bytes(1)
AT_LIMIT = SMALL_JPEG + bytes(LIMIT - len(SMALL_JPEG))  # padding after the end marker: still complete
OVER_LIMIT = AT_LIMIT + b"\x00"
HTML = b"<html><body>Not Found</body></html>"
GIF = b"GIF89a" + bytes(200)
CUT_JPEG = BIG_JPEG[:-100]
CUT_SMALL_JPEG = SMALL_JPEG[:-2]
CUT_PNG = png_bytes(4, 100)[:-20]

assert len(SAME_SIZE_JPEG) == len(SMALL_JPEG) and SAME_SIZE_JPEG != SMALL_JPEG
assert len(BIG_JPEG) > FIRST_READ


# --- the backends -------------------------------------------------------------------------------------------


class Backend(ABC):
    """Photos on one kind of storage, and the ImageSource that reads them.

    `name` is a photo's name within the backend's own folder or bucket; `ref(name)` is the image_path a
    manifest would hold for it, `where(name)` the ref its Fingerprint must carry (where the photo really is).
    """

    label: ClassVar[str]

    @classmethod
    @abstractmethod
    def create(cls, request: pytest.FixtureRequest) -> Backend:
        """An empty folder or bucket of the backend's own for one test (its server started once a session)."""

    @abstractmethod
    def put(self, name: str, data: bytes) -> None:
        """A new photo."""

    @abstractmethod
    def replace(self, name: str, data: bytes) -> None:
        """A new version of an existing photo, in place, as a partner re-exporting it would make."""

    @abstractmethod
    def remove(self, name: str) -> None: ...

    @abstractmethod
    def ref(self, name: str) -> str: ...

    @abstractmethod
    def where(self, name: str) -> str: ...

    @abstractmethod
    def source(self) -> ImageSource:
        """A new source for this storage, its limit LIMIT, made as a run makes one."""


class LocalFiles(Backend):
    """Files in a folder, named relative to it as a manifest beside them would name them."""

    label = "local"

    def __init__(self, base: Path) -> None:
        self.base = base
        (base / "photos").mkdir()

    @classmethod
    def create(cls, request: pytest.FixtureRequest) -> Backend:
        tmp_path: Path = request.getfixturevalue("tmp_path")
        return cls(tmp_path)

    def _path(self, name: str) -> Path:
        return self.base / "photos" / name

    def put(self, name: str, data: bytes) -> None:
        self._path(name).write_bytes(data)

    def replace(self, name: str, data: bytes) -> None:
        # A file's version is its mtime, and a rewrite within one tick of the file system's clock may keep it:
        # give the new version an mtime of its own, as any later write would have, rather than wait for one.
        path = self._path(name)
        before = path.stat().st_mtime_ns
        path.write_bytes(data)
        later = before + 1_000_000_000
        os.utime(path, ns=(later, later))

    def remove(self, name: str) -> None:
        self._path(name).unlink()

    def ref(self, name: str) -> str:
        return f"photos/{name}"

    def where(self, name: str) -> str:
        return str(self._path(name).resolve())

    def source(self) -> ImageSource:
        return LocalImageSource(base=self.base, root=None, max_bytes=LIMIT)


class ObjectStoreBackend(Backend):
    """Objects in a bucket of a real object-store server (tests/storage_servers.py), reached as a run reaches
    it: through the environment its server gives."""

    def __init__(self, server: StorageServer, bucket: str) -> None:
        self.server, self.bucket = server, bucket

    @classmethod
    def create(cls, request: pytest.FixtureRequest) -> Backend:
        server = storage_servers.server(cls.label)
        monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
        for name, value in server.env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("HOME", "/nonexistent")  # no shared config files of the machine's user
        bucket = f"contract-{next(_BUCKETS)}"
        server.create_bucket(bucket)
        return cls(server, bucket)

    def _key(self, name: str) -> str:
        return f"photos/{name}"

    def put(self, name: str, data: bytes) -> None:
        self.server.put(self.bucket, self._key(name), data)

    def replace(self, name: str, data: bytes) -> None:
        self.put(name, data)  # every write of an object is a new version, with its own ETag

    def remove(self, name: str) -> None:
        self.server.delete(self.bucket, self._key(name))

    def ref(self, name: str) -> str:
        return f"{self.label}://{self.bucket}/{self._key(name)}"

    def where(self, name: str) -> str:
        return self.ref(name)

    def source(self) -> ImageSource:
        # Its stores made from the environment, as in a run (compose.remote_image_source).
        return RemoteImageSource(max_bytes=LIMIT, read_concurrency=8, retries=default_retry_policy())


_BUCKETS = itertools.count(1)


class S3Objects(ObjectStoreBackend):
    """S3, on moto's server in its own process."""

    label = "s3"


class GCSObjects(ObjectStoreBackend):
    """Google Cloud Storage, on fake-gcs-server."""

    label = "gs"


class AzureObjects(ObjectStoreBackend):
    """Azure Blob Storage, on Azurite."""

    label = "az"


BACKENDS: tuple[type[Backend], ...] = (LocalFiles, S3Objects, GCSObjects, AzureObjects)


@pytest.fixture(params=BACKENDS, ids=[b.label for b in BACKENDS])
def backend(request: pytest.FixtureRequest) -> Backend:
    kind: type[Backend] = request.param
    return kind.create(request)


@pytest.fixture
async def source(backend: Backend) -> AsyncIterator[ImageSource]:
    made = backend.source()
    yield made
    await made.close()


def outcome(found: Fingerprint | ImageProblem) -> str:
    return "ok" if isinstance(found, Fingerprint) else found.reason.value


async def fingerprint_of(source: ImageSource, ref: str) -> Fingerprint:
    (found,) = await source.check_many([ref])
    assert isinstance(found, Fingerprint), found
    return found


# --- check_many ---------------------------------------------------------------------------------------------

PHOTOS = {
    "small.jpg": SMALL_JPEG,
    "big.jpg": BIG_JPEG,
    "photo.png": PNG,
    "at-limit.jpg": AT_LIMIT,
    "empty.jpg": b"",
    "over-limit.jpg": OVER_LIMIT,
    "page.jpg": HTML,
    "anim.png": GIF,
    "cut.jpg": CUT_JPEG,
    "cut-small.jpg": CUT_SMALL_JPEG,
    "cut.png": CUT_PNG,
}


async def test_check_many_judges_every_photo_by_the_same_rules_one_answer_each_in_order(
    backend: Backend, source: ImageSource
) -> None:
    for name, data in PHOTOS.items():
        backend.put(name, data)
    names = [
        "cut.jpg",
        "small.jpg",
        "missing.jpg",
        "photo.png",
        "empty.jpg",
        "big.jpg",
        "over-limit.jpg",
        "page.jpg",
        "small.jpg",
        "at-limit.jpg",
        "anim.png",
        "cut-small.jpg",
        "cut.png",
    ]
    found = await source.check_many([backend.ref(name) for name in names])
    assert [outcome(f) for f in found] == [
        "image_truncated",
        "ok",
        "image_missing",
        "ok",
        "image_empty",
        "ok",
        "image_too_large",
        "image_not_jpeg_or_png",
        "ok",
        "ok",
        "image_not_jpeg_or_png",
        "image_truncated",
        "image_truncated",
    ]
    for name, result in zip(names, found, strict=True):
        if isinstance(result, Fingerprint):
            assert result.ref == backend.where(name) and result.size == len(PHOTOS[name])
        else:
            assert repr(backend.ref(name)) in result.message, result  # the photo as the manifest names it
        if name in ("empty.jpg", "over-limit.jpg"):
            assert result == size_problem(repr(backend.ref(name)), len(PHOTOS[name]), LIMIT)
    assert found[1] == found[8]  # the same photo twice: the same fingerprint twice
    assert await source.check_many([]) == []


# --- fingerprint_many ---------------------------------------------------------------------------------------


async def test_an_unchanged_photo_has_one_fingerprint_whichever_call_gives_it(
    backend: Backend, source: ImageSource
) -> None:
    for name in ("small.jpg", "big.jpg", "photo.png"):
        backend.put(name, PHOTOS[name])
    refs = [backend.ref(name) for name in ("small.jpg", "big.jpg", "photo.png")]
    listed = await source.fingerprint_many(refs)
    assert listed == await source.fingerprint_many(refs)
    assert listed == await source.check_many(refs)  # a resume compares these with what the ledger holds
    for fingerprint in listed:
        assert isinstance(fingerprint, Fingerprint)
        assert (await source.read(fingerprint)).fingerprint == fingerprint


async def test_fingerprint_many_judges_no_content_and_answers_in_order(
    backend: Backend, source: ImageSource
) -> None:
    for name in ("cut.jpg", "page.jpg", "small.jpg"):
        backend.put(name, PHOTOS[name])
    names = ["page.jpg", "missing.jpg", "cut.jpg", "small.jpg", "page.jpg"]
    found = await source.fingerprint_many([backend.ref(name) for name in names])
    assert [outcome(f) for f in found] == ["ok", "image_missing", "ok", "ok", "ok"]
    for name, result in zip(names, found, strict=True):
        if isinstance(result, Fingerprint):
            assert result.ref == backend.where(name) and result.size == len(PHOTOS[name])
    assert await source.fingerprint_many([]) == []


@pytest.mark.parametrize(
    ("new", "same_size"), [(SAME_SIZE_JPEG, True), (PNG, False)], ids=["same-size", "other-size"]
)
async def test_a_new_version_has_another_fingerprint(
    backend: Backend, source: ImageSource, new: bytes, same_size: bool
) -> None:
    backend.put("a.jpg", SMALL_JPEG)
    (before,) = await source.fingerprint_many([backend.ref("a.jpg")])
    backend.replace("a.jpg", new)
    (after,) = await source.fingerprint_many([backend.ref("a.jpg")])
    assert isinstance(before, Fingerprint) and isinstance(after, Fingerprint)
    assert after.ref == before.ref and after.size == len(new) and after != before
    if same_size:
        assert after.version != before.version  # only the version can tell these two apart
    assert after == await fingerprint_of(source, backend.ref("a.jpg"))


# --- read ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["small.jpg", "big.jpg", "photo.png", "at-limit.jpg"])
async def test_read_gives_exactly_the_bytes_their_sha256_and_their_fingerprint(
    backend: Backend, source: ImageSource, name: str
) -> None:
    backend.put(name, PHOTOS[name])
    fingerprint = await fingerprint_of(source, backend.ref(name))
    photo = await source.read(fingerprint)
    assert photo.data == PHOTOS[name] and photo.sha256 == hashlib.sha256(PHOTOS[name]).hexdigest()
    assert photo.fingerprint == fingerprint


@pytest.mark.parametrize("new", [SAME_SIZE_JPEG, BIG_JPEG, PNG], ids=["same-size", "bigger", "png"])
async def test_a_photo_replaced_after_its_check_is_never_read_under_the_old_fingerprint(
    backend: Backend, source: ImageSource, new: bytes
) -> None:
    backend.put("a.jpg", SMALL_JPEG)
    checked = await fingerprint_of(source, backend.ref("a.jpg"))
    backend.replace("a.jpg", new)
    photo = await source.read(checked)
    # Another photo that passes every rule is what a send would carry, under its own fingerprint and hash
    # (which the ledger then compares with the ID's pinned photo): never the new bytes as the old version.
    assert photo.data == new and photo.sha256 == hashlib.sha256(new).hexdigest()
    assert photo.fingerprint != checked
    assert photo.fingerprint == await fingerprint_of(source, backend.ref("a.jpg"))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (None, Reason.IMAGE_MISSING),
        (b"", Reason.IMAGE_EMPTY),
        (OVER_LIMIT, Reason.IMAGE_TOO_LARGE),
        (HTML, Reason.IMAGE_NOT_JPEG_OR_PNG),
        (CUT_JPEG, Reason.IMAGE_TRUNCATED),
        (CUT_SMALL_JPEG, Reason.IMAGE_TRUNCATED),
        (CUT_PNG, Reason.IMAGE_TRUNCATED),
    ],
    ids=["removed", "emptied", "grown", "not-an-image", "cut", "cut-small", "cut-png"],
)
async def test_a_photo_that_broke_a_rule_after_its_check_is_refused_at_read(
    backend: Backend, source: ImageSource, change: bytes | None, reason: Reason
) -> None:
    backend.put("a.jpg", SMALL_JPEG)
    checked = await fingerprint_of(source, backend.ref("a.jpg"))
    if change is None:
        backend.remove("a.jpg")
    else:
        backend.replace("a.jpg", change)
    with pytest.raises(ImageError) as refused:
        await source.read(checked)
    assert refused.value.problem.reason is reason, refused.value.problem
    assert backend.where("a.jpg") in str(refused.value)
    if reason in (Reason.IMAGE_EMPTY, Reason.IMAGE_TOO_LARGE):
        # The one size rule, as found at read time (the photo named as each backend names it).
        assert change is not None
        shown = (backend.where("a.jpg"), repr(backend.where("a.jpg")))
        assert refused.value.problem in [size_problem(s, len(change), LIMIT, changed=True) for s in shown]


# --- close --------------------------------------------------------------------------------------------------


async def test_close_may_be_called_again_before_or_after_use(backend: Backend) -> None:
    unused = backend.source()
    await unused.close()
    await unused.close()
    used = backend.source()
    backend.put("a.jpg", SMALL_JPEG)
    photo = await used.read(await fingerprint_of(used, backend.ref("a.jpg")))
    assert photo.data == SMALL_JPEG
    await used.close()
    await used.close()


# --- the sample the shared-photo census compares ------------------------------------------------------------


@pytest.mark.parametrize("name", ["small.jpg", "big.jpg", "photo.png", "at-limit.jpg"])
async def test_the_sample_is_the_contents_whatever_stores_it_and_read_keeps_it(
    backend: Backend, source: ImageSource, name: str
) -> None:
    """The census compares samples across backends and with the ledger's (sent from any of them): the sample
    of a photo is a function of its bytes alone, and `read` gives back the one its check took."""
    backend.put(name, PHOTOS[name])
    (checked,) = await source.check_many([backend.ref(name)])
    assert isinstance(checked, Fingerprint), checked
    assert checked.sample == sample_in(PHOTOS[name]) != 0
    assert (await source.read(checked)).fingerprint.sample == checked.sample
    backend.replace(name, SAME_SIZE_JPEG if name != "small.jpg" else PNG)
    new = await source.read(checked)  # another version: the sample of the bytes read, as a check would take
    assert new.fingerprint.sample == sample_in(new.data) != checked.sample

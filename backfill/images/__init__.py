"""The ImageSource contract: how a photo is located, checked, fingerprinted and read, whatever it is stored on."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import stat
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..vocab import Reason


@dataclass(frozen=True, slots=True, kw_only=True)
class Fingerprint:
    """What identifies one version of a photo cheaply, without reading it (the rsync quick check).

    `ref` is where the photo really is (a local path with symlinks resolved, or an object URL); `version` is
    the store's own change marker (a local file's mtime in ns; a remote object's ETag and last-modified time);
    `sample`, set by a content check (`check_many`), tells photos apart cheaply for the shared-photo census.
    """

    ref: str
    size: int
    version: str
    # What a content check read first, digested (content.sample_of); 0 where nothing was read (a stat alone).
    # Not part of the identity: the same version of a photo, sampled or not, is the same photo.
    sample: int = field(default=0, compare=False)


# A photo as the ledger pinned it, by the quick check's facts: (ref, size, version), each None if never sent.
Pinned = tuple[str | None, int | None, str | None]


def unchanged(
    found: Fingerprint | ImageProblem, ref: str | None, size: int | None, version: str | None
) -> bool:
    """The resume's skip test: whether the photo found now is the one the ledger says the ID was sent with, by
    the quick check alone (where it really is, its size, its store's version), as rsync trusts a file unchanged.

    A done row that passes is skipped without a byte read; any other has its bytes compared (run/plan.py).
    """
    return type(found) is Fingerprint and found.ref == ref and found.size == size and found.version == version


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageProblem:
    """Why a photo can't be used: a reject reason and a message naming the photo and the fix."""

    reason: Reason
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Photo:
    """The exact bytes that will go out, their digest (the ledger pins it to the user_id), and what was read.

    `sha256` is the bytes' plain SHA-256 as a local or object-storage source reads them, held in memory only;
    the source a run is given (keyed.py) replaces it with its `PhotoKey.pin`, so the ledger never pins, and no
    file ever holds, a plain SHA-256 of a photo.
    """

    data: bytes
    sha256: str
    fingerprint: Fingerprint
    # With --normalize (normalize.py): the digest of `data` as it goes out, when it differs from the source's
    # (`sha256`, which is what the ledger pins), keyed like it; and what was done ("" for nothing).
    sent_sha256: str | None = None
    note: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class PhotoKey:
    """A ledger's secret, and the keyed digest of a photo under it: HMAC-SHA256(secret, SHA-256(bytes)), in hex
    (and, for logs that must not name users, of a user_id: `user`).

    A plain SHA-256 lets anyone holding a photo prove it was enrolled; without the secret this can't be computed.
    It is keyed over the photo's SHA-256, not over its bytes, so that a ledger which pinned plain digests is
    migrated in place (`pin` of each stored digest) without reading a single photo, and its pins then compare
    equal to those of photos read later, by the one formula.
    """

    secret: bytes = field(repr=False)

    @classmethod
    def new(cls) -> PhotoKey:
        """32 random bytes: made once, with the ledger that keeps it."""
        return cls(secret=secrets.token_bytes(SECRET_BYTES))

    def pin(self, sha256: str) -> str:
        """The keyed digest of a photo whose plain SHA-256 is `sha256` (hex)."""
        return hmac.new(self.secret, bytes.fromhex(sha256), "sha256").hexdigest()

    def sample(self, sample: int) -> int:
        """The keyed form of a photo's `Fingerprint.sample`, as the ledger keeps it beside the pin, so that a later
        run's shared-photo census finds the IDs a photo was sent for without reading their photos: a signed 64-bit
        integer (what SQLite and PostgreSQL hold), never 0. Like the pin, no one without the secret can compute it
        from a photo. BLAKE2b in its keyed mode (a MAC by design), personalised apart from the pin's and the
        user's HMACs: a third of an HMAC's time, since the census keys every photo it counts."""
        keyed = hashlib.blake2b(
            sample.to_bytes(8, "big", signed=True), key=self.secret, digest_size=8, person=b"photo sample"
        )
        return int.from_bytes(keyed.digest(), "big", signed=True) or 1

    def of(self, data: bytes) -> str:
        """The keyed digest of these bytes."""
        return self.pin(hashlib.sha256(data).hexdigest())

    def user(self, user_id: str) -> str:
        """How a log line names `user_id` when `log_user_ids` is hashed: whoever holds the ledger can compute it
        (`backfill find-user`), no one else can, nor link it to a photo's pin (another label is hashed)."""
        message = b"user_id\0" + user_id.encode("utf-8", "surrogatepass")
        return "u-" + hmac.new(self.secret, message, "sha256").hexdigest()[:USER_HEX]


SECRET_BYTES = 32
USER_HEX = (
    20  # 80 bits of a user_id's keyed hash: unique among billions of IDs, and short enough for a log line
)


def file_kind(mode: int) -> str:
    """What a non-regular file is, for a message: "a folder", "a named pipe (FIFO)", "a device"..."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return "not a regular file"


def size_problem(
    name: str, size: int, max_bytes: int, *, changed: bool = False, convert: bool = False
) -> ImageProblem | None:
    """Why a photo of `size` bytes can't be sent (empty, or over `max_bytes`, which is allowed), or None.

    The size rule of every source, with its messages. `name` is the photo as the message shows it; `changed`:
    the photo passed its checks and is found so now, at read time, so the message says it changed since;
    `convert` (--normalize): `max_bytes` is max_source_bytes, the limit of a photo before it is normalised.
    """
    if size == 0:
        if changed:
            message = (
                f"image {name} is now empty (0 bytes; it changed after it was checked): export the photo again, "
                "then run again"
            )
        else:
            message = f"image {name} is empty (0 bytes): export the photo again"
        return ImageProblem(reason=Reason.IMAGE_EMPTY, message=message)
    if size > max_bytes:
        return too_large(name, f"{size:,} bytes", max_bytes, changed=changed, convert=convert)
    return None


def too_large(
    name: str, size: str, max_bytes: int, *, changed: bool = False, convert: bool = False
) -> ImageProblem:
    """A photo over the size limit; `size` as the message says it ("6,000,000 bytes", "more than ...")."""
    if convert and not changed:
        message = (
            f"image {name} is {size}, over max_source_bytes ({max_bytes:,} bytes), the largest photo "
            "--normalize reads: export it smaller, or raise max_source_bytes"
        )
    elif changed:
        message = (
            f"image {name} is now {size}, over the limit of {max_bytes:,} bytes (it grew after it was checked): "
            "put the checked photo back, or resize or recompress it, then run again"
        )
    else:
        message = (
            f"image {name} is {size}, over the limit of {max_bytes:,} bytes: run with --normalize (normalize: "
            "true) to scale it down in memory, or resize or recompress it (or change max_image_bytes if the "
            "limit is wrong)"
        )
    return ImageProblem(reason=Reason.IMAGE_TOO_LARGE, message=message)


class ImageError(Exception):
    """A photo that passed its checks can't be read now; `problem` says why, as a reject would."""

    def __init__(self, problem: ImageProblem) -> None:
        self.problem = problem
        super().__init__(problem.message)


class ImageSource(ABC):
    """One kind of photo storage. Each method takes the image value exactly as the manifest holds it.

    Batches go in and come out in the same order, so a backend can do its I/O however suits it (a thread for
    local files, many requests in flight for object storage) without blocking the event loop.
    """

    @abstractmethod
    async def fingerprint_many(self, raws: Sequence[str]) -> list[Fingerprint | ImageProblem]:
        """Each photo's fingerprint from metadata alone (a stat, a listing): nothing of its content is read."""

    @abstractmethod
    async def check_many(self, raws: Sequence[str]) -> list[Fingerprint | ImageProblem]:
        """Every rule a photo must pass (exists, regular file, size, JPEG/PNG by content, complete), reading
        no more than its head and tail; the fingerprint of a photo that passes."""

    @abstractmethod
    async def read(self, fingerprint: Fingerprint) -> Photo:
        """The photo's bytes, bounded to the size limit, or ImageError. Never blocks the event loop; refuses
        anything that is not a regular file (or object) at read time."""

    async def unchanged_many(self, raws: Sequence[str], pinned: Sequence[Pinned]) -> list[bool]:
        """`unchanged` of each photo's fingerprint against its pinned facts: the resume's skip test of every
        done row. A source may answer it without making the fingerprints (local.py does, for its common case).
        """
        found = await self.fingerprint_many(raws)
        return [unchanged(f, *p) for f, p in zip(found, pinned, strict=True)]

    async def read_source(self, fingerprint: Fingerprint) -> Photo:
        """The photo as stored, for comparing it with its pin: `read`'s, less any normalising (whose result
        would be thrown away)."""
        return await self.read(fingerprint)

    async def close(self) -> None:  # noqa: B027 - most sources hold nothing to release
        """Release connections or threads; the source is not used again."""

"""The ImageSource contract: how a photo is located, checked, fingerprinted and read, whatever it is stored on."""

from __future__ import annotations

import stat
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from ..vocab import Reason


@dataclass(frozen=True, slots=True, kw_only=True)
class Fingerprint:
    """What identifies one version of a photo cheaply, without reading it (the rsync quick check).

    `ref` is where the photo really is (a local path with symlinks resolved, or an object URL); `version` is
    the store's own change marker (a local file's mtime in ns; a remote object's ETag and last-modified time).
    """

    ref: str
    size: int
    version: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageProblem:
    """Why a photo can't be used: a reject reason and a message naming the photo and the fix."""

    reason: Reason
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Photo:
    """The exact bytes that will go out, their SHA-256 (the ledger pins it to the user_id), and what was read."""

    data: bytes
    sha256: str
    fingerprint: Fingerprint


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

    async def close(self) -> None:  # noqa: B027 - most sources hold nothing to release
        """Release connections or threads; the source is not used again."""

"""Photos on the local file system (or a mounted share): paths resolved, checked and read without blocking."""

from __future__ import annotations

import asyncio
import errno
import functools
import hashlib
import os
import stat
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import TypeVar

from ..vocab import Reason
from . import (
    Fingerprint,
    ImageError,
    ImageProblem,
    ImageSource,
    Photo,
    Pinned,
    file_kind,
    size_problem,
    too_large,
    unchanged,
)
from .content import convertible, examine, examine_bytes, looks_like, problem, run_sampled, sample_in, sniff

_T = TypeVar("_T")

# O_NONBLOCK: should a path have become a FIFO, opening it can't hang (nor, with O_NOCTTY, can a terminal
# become ours). It changes nothing for a regular file, whose reads never block on it anyway.
_CHECK_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
# At read time the path is the real one found at validation, so a symbolic link there now is a swap:
# O_NOFOLLOW refuses it rather than follow it somewhere else (out of images_root, say).
_READ_FLAGS = _CHECK_FLAGS | os.O_NOFOLLOW
# A photo this small is read on the event loop itself, once the open and fstat above proved it a regular
# file; a bigger one goes to the executor. The line is where the two cost the same: measured on the dev VM
# with the page cache warm, a thread hop (submit, wake a worker, wake the loop) took ~50 us, and open + read +
# SHA-256 of 64 KB ~43 us (256 KB: ~160 us, too long to hold up every other row's I/O on the loop).
INLINE_READ_MAX = 64 * 1024
_DIR_CACHE_MAX = 65_536
_SET_REF, _SET_SIZE, _SET_VERSION, _SET_SAMPLE = (
    getattr(Fingerprint, f).__set__ for f in ("ref", "size", "version", "sample")
)


class LocalImageSource(ImageSource):
    """Photos named by paths, relative ones resolved against `base` (the manifest's folder).

    With `root` (images_root), a photo must really lie inside it, symbolic links followed. `max_bytes` is the
    size limit, inclusive. `convert` (--normalize): the formats normalize.py converts pass too, and
    `max_bytes` is the limit of the photo as read, before it is normalised. Each batch is checked in one call
    on `executor` (the loop's default if None), never one thread hop per photo: that is what keeps validation
    at tens of thousands of photos a second.
    """

    def __init__(
        self,
        *,
        base: Path,
        root: Path | None,
        max_bytes: int,
        executor: Executor | None = None,
        convert: bool = False,
    ) -> None:
        self._base = str(base)
        self._root = os.path.realpath(root) if root is not None else None
        self._root_prefix = "" if self._root is None else os.path.join(self._root, "")
        self._max_bytes = max_bytes
        self._executor = executor
        self._convert = convert
        # Folder as written -> its real path. Shared by the batches' threads: a lost update only costs a
        # realpath again, and clear() when full keeps it bounded.
        self._real_dirs: dict[str, str] = {}
        # Folder as written (what rpartition("/") gives) -> its real path ending in "/": _fingerprint_batch's.
        self._real_prefixes: dict[str, str] = {}

    async def fingerprint_many(self, raws: Sequence[str]) -> list[Fingerprint | ImageProblem]:
        return await self._in_thread(self._fingerprint_batch, raws)

    async def check_many(self, raws: Sequence[str]) -> list[Fingerprint | ImageProblem]:
        return await self._in_thread(self._check_batch, raws)

    async def unchanged_many(self, raws: Sequence[str], pinned: Sequence[Pinned]) -> list[bool]:
        """`unchanged` of what `_fingerprint_batch` finds, answered by it itself: a subclass that finds photos
        some other way (its own `fingerprint_many`) must answer this too, or a resume would stat the files."""
        if not raws:
            return []
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._unchanged_batch, list(raws), list(pinned))

    async def read(self, fingerprint: Fingerprint) -> Photo:
        ref = fingerprint.ref
        # The open and fstat run here, on the loop: with O_NONBLOCK neither waits on anything but the disk's
        # metadata, and only after them is it known that reading can't hang.
        fd, before = self._open_for_read(ref)
        if before.st_size <= INLINE_READ_MAX:
            try:
                return self._slurp(fd, fingerprint, before, min(self._max_bytes, INLINE_READ_MAX) + 1)
            finally:
                os.close(fd)
        # The thread opens the file again rather than take this fd: should this task be cancelled, the fd
        # would be closed under a read still running there (or never, if the thread never started).
        os.close(fd)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._read_blocking, fingerprint)

    # --- validation, in the executor ------------------------------------------------------------------

    async def _in_thread(self, check: Callable[[Sequence[str]], list[_T]], raws: Sequence[str]) -> list[_T]:
        if not raws:
            return []
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, check, list(raws))

    def _fingerprint_batch(self, raws: Sequence[str]) -> list[Fingerprint | ImageProblem]:
        """`_fingerprint` of each; a resume stats every manifest row here, so the common case is inlined
        (`_quick_stat`); anything else takes `_fingerprint` itself."""
        out: list[Fingerprint | ImageProblem] = []
        quick = self._quick_stat
        new, set_ref, set_size, set_version, set_sample = (
            object.__new__,
            _SET_REF,
            _SET_SIZE,
            _SET_VERSION,
            _SET_SAMPLE,
        )
        for raw in raws:
            found = quick(raw)
            if found is None:
                out.append(self._fingerprint(raw))
                continue
            real, st = found
            fp = new(Fingerprint)  # its slots set directly: half the cost of the frozen __init__
            set_ref(fp, real)
            set_size(fp, st.st_size)
            set_version(fp, str(st.st_mtime_ns))
            set_sample(fp, 0)
            out.append(fp)
        return out

    def _unchanged_batch(self, raws: Sequence[str], pinned: Sequence[Pinned]) -> list[bool]:
        """`unchanged` of each photo `_fingerprint_batch` would find, without making the fingerprints: a resume
        asks it of every done row. The common case (`_quick_stat`) is one lstat; any other is `unchanged` of
        `_fingerprint` itself."""
        out: list[bool] = []
        quick = self._quick_stat
        for raw, (ref, size, version) in zip(raws, pinned, strict=True):
            found = quick(raw)
            if found is None:
                out.append(unchanged(self._fingerprint(raw), ref, size, version))
                continue
            real, st = found
            out.append(real == ref and st.st_size == size and str(st.st_mtime_ns) == version)
        return out

    def _quick_stat(self, raw: str) -> tuple[str, os.stat_result] | None:
        """The real path and lstat of `raw` in the batches' common case: a path whose folder (as written) was
        resolved before, naming a regular file that is not a symbolic link, inside images_root; its real path
        is that folder's real path and the name, as `_resolve` would make it. None for anything else (a new
        folder, an error, a link, another kind of file), which `_fingerprint` then says; a new folder is learnt
        here, for the rows after it."""
        folder, _, name = raw.rpartition("/")
        prefix = self._real_prefixes.get(folder)
        if prefix is None:
            self._learn(folder)
            return None
        if name in ("", ".", "..") or "\x00" in name:
            return None
        real = prefix + name
        try:
            st = os.lstat(real)
        except OSError:
            return None  # the general path says why
        root = self._root
        inside = root is None or real == root or real.startswith(self._root_prefix)
        if stat.S_ISREG(st.st_mode) and inside:  # a link is not S_ISREG under lstat
            return real, st
        return None

    def _learn(self, folder: str) -> None:
        """Cache the real path of a folder as written, for the batches' common case."""
        if folder and not folder.endswith("/") and "\x00" not in folder:
            # The folder as os.path.split would give it (no trailing or repeated slash at its end).
            prefixes = self._real_prefixes
            if len(prefixes) >= _DIR_CACHE_MAX:
                prefixes.clear()
            prefixes[folder] = os.path.join(os.path.realpath(os.path.join(self._base, folder)), "")

    def _check_batch(self, raws: Sequence[str]) -> list[Fingerprint | ImageProblem]:
        return [self._check(raw) for raw in raws]

    def _fingerprint(self, raw: str) -> Fingerprint | ImageProblem:
        """Where the photo is and its stat: everything but its size and content checked."""
        found = self._locate(raw)
        if isinstance(found, ImageProblem):
            return found
        real, st = found
        return Fingerprint(ref=real, size=st.st_size, version=str(st.st_mtime_ns))

    def _check(self, raw: str) -> Fingerprint | ImageProblem:
        found = self._locate(raw)
        if isinstance(found, ImageProblem):
            return found
        real, st = found
        size = st.st_size
        wrong_size = size_problem(repr(raw), size, self._max_bytes, convert=self._convert)
        if wrong_size is not None:
            return wrong_size
        try:
            fd = os.open(real, _CHECK_FLAGS)
            try:
                verdict, sample = run_sampled(examine(size), functools.partial(_pread, fd))
            finally:
                os.close(fd)
        except OSError as exc:
            return self._path_problem(raw, real, exc)
        if not verdict.complete:
            wrong = problem(verdict, repr(raw), convert=self._convert)
            if wrong is not None:
                return wrong
        return Fingerprint(ref=real, size=size, version=str(st.st_mtime_ns), sample=sample)

    def _locate(self, raw: str) -> tuple[str, os.stat_result] | ImageProblem:
        """The real path of a regular file inside images_root, and its stat; or why not."""
        if "\x00" in raw:
            return ImageProblem(
                reason=Reason.IMAGE_MISSING,
                message=f"image path {raw!r} contains a NUL character: correct the path",
            )
        real, st = self._resolve(raw)
        if self._root is not None and real != self._root and not real.startswith(self._root_prefix):
            return ImageProblem(
                reason=Reason.PATH_OUTSIDE_ROOT,
                message=f"image {raw!r} resolves to {real}, outside images_root {self._root}: move the photo "
                "into images_root (symbolic links count where they point), or change images_root",
            )
        if isinstance(st, OSError):
            return self._path_problem(raw, real, st)
        if not stat.S_ISREG(st.st_mode):
            return ImageProblem(
                reason=Reason.IMAGE_NOT_FILE,
                message=f"image {raw!r} is {file_kind(st.st_mode)}, not a file: point to the photo itself",
            )
        return real, st

    def _resolve(self, raw: str) -> tuple[str, os.stat_result | OSError]:
        """The real path and its stat (or why it can't be had); os.path.realpath only for symbolic links."""
        joined = os.path.join(self._base, raw)
        folder, name = os.path.split(joined)
        if name in ("", ".", ".."):
            real = os.path.realpath(joined)
        else:
            # realpath costs ~20 us; photos share a few folders, so resolve each folder once.
            real_folder = self._real_dirs.get(folder)
            if real_folder is None:
                if len(self._real_dirs) >= _DIR_CACHE_MAX:
                    self._real_dirs.clear()
                real_folder = self._real_dirs[folder] = os.path.realpath(folder)
            real = os.path.join(real_folder, name)
        try:
            st = os.lstat(real)
            if not stat.S_ISLNK(st.st_mode):
                return real, st
            real = os.path.realpath(real)
            return real, os.stat(real)
        except OSError as exc:
            return real, exc

    def _path_problem(self, raw: str, real: str, exc: OSError) -> ImageProblem:
        """Why a path can't be used; `real` is where it leads (for a broken link, the missing target)."""
        shown = (
            repr(raw) if os.path.isabs(raw) else f"{raw!r} (relative to the manifest's folder {self._base})"
        )
        if isinstance(exc, PermissionError):
            return ImageProblem(
                reason=Reason.IMAGE_UNREADABLE,
                message=f"image {shown} can't be read: permission denied; let the user running backfill read it",
            )
        if exc.errno == errno.ELOOP:
            return ImageProblem(
                reason=Reason.IMAGE_MISSING,
                message=f"image {shown} is a symbolic link that loops: point it at the photo",
            )
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):
            if os.path.islink(os.path.join(self._base, raw)):
                return ImageProblem(
                    reason=Reason.IMAGE_MISSING,
                    message=f"image {shown} is a symbolic link to {real}, which doesn't exist: fix the link or "
                    "the path",
                )
            hint = " (note the spaces around the path)" if raw != raw.strip() else ""
            return ImageProblem(
                reason=Reason.IMAGE_MISSING, message=f"image {shown} doesn't exist{hint}: check the path"
            )
        # Any other error (EIO, a stale network share...): still say what to do, not just what went wrong.
        return ImageProblem(
            reason=Reason.IMAGE_UNREADABLE,
            message=f"image {shown} can't be read: {exc.strerror or exc}; check the file and the disk or share "
            "it is on (copy it somewhere readable if need be), then run again",
        )

    # --- reading ------------------------------------------------------------------------------------------

    def _read_blocking(self, fingerprint: Fingerprint) -> Photo:
        fd, before = self._open_for_read(fingerprint.ref)
        try:
            return self._slurp(fd, fingerprint, before, self._max_bytes + 1)
        finally:
            os.close(fd)

    def _open_for_read(self, ref: str) -> tuple[int, os.stat_result]:
        """An fd on `ref` and its fstat, once that shows a regular file of a usable size; else ImageError."""
        try:
            fd = os.open(ref, _READ_FLAGS)
        except OSError as exc:
            raise ImageError(self._read_problem(ref, exc)) from exc
        try:
            st = os.fstat(fd)
        except OSError as exc:
            os.close(fd)
            raise ImageError(self._read_problem(ref, exc)) from exc
        found = self._stat_read_problem(ref, st)
        if found is not None:
            os.close(fd)
            raise ImageError(found)
        return fd, st

    def _stat_read_problem(self, ref: str, st: os.stat_result) -> ImageProblem | None:
        if not stat.S_ISREG(st.st_mode):
            return ImageProblem(
                reason=Reason.IMAGE_NOT_FILE,
                message=f"image {ref} is now {file_kind(st.st_mode)}, not a file (it was replaced after it was "
                "checked): put the photo back, then run again",
            )
        return size_problem(ref, st.st_size, self._max_bytes, changed=True)

    def _slurp(self, fd: int, checked: Fingerprint, before: os.stat_result, cap: int) -> Photo:
        """At most `cap` bytes of the open photo, checked, hashed and fingerprinted; else ImageError.

        A photo whose fingerprint is no longer `checked` is another version than the one validated: these very
        bytes, which are what would go out, are checked again in full, as remote.py does.
        """
        ref = checked.ref
        try:
            data = _read_upto(fd, cap, before.st_size)
            after = os.fstat(fd)
        except OSError as exc:
            raise ImageError(self._read_problem(ref, exc)) from exc
        if len(data) > self._max_bytes:
            raise ImageError(
                too_large(ref, f"more than {self._max_bytes:,} bytes", self._max_bytes, changed=True)
            )
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or len(
            data
        ) != after.st_size:
            # Bytes read while the file was being written may be half old, half new: never send those.
            raise ImageError(
                ImageProblem(
                    reason=Reason.IMAGE_UNREADABLE,
                    message=f"image {ref} changed while it was being read: make sure nothing writes to the "
                    "photos during the run, then run again",
                )
            )
        if sniff(data) is None and not (self._convert and convertible(data[:64])):
            raise ImageError(
                ImageProblem(
                    reason=Reason.IMAGE_NOT_JPEG_OR_PNG,
                    message=f"image {ref} is not a JPEG or PNG now ({looks_like(data[:64])}; it changed after "
                    "it was checked): put the checked photo back, or convert it to JPEG or PNG, then run again",
                )
            )
        version = str(after.st_mtime_ns)
        # The sample of the bytes read, always: a file rewritten in place at its size, its mtime kept (cp -p,
        # rsync -t, a coarse clock), is the version checked by its marks but not by its bytes, and the ledger
        # keeps this sample beside these bytes' pin.
        sample = sample_in(data)
        if after.st_size == checked.size and version == checked.version:
            # The version checked, as nearly every photo is: no new record, unless its bytes say otherwise.
            fingerprint = (
                checked
                if sample == checked.sample
                else Fingerprint(ref=ref, size=after.st_size, version=version, sample=sample)
            )
        else:
            fingerprint = Fingerprint(ref=ref, size=after.st_size, version=version, sample=sample)
            wrong = problem(examine_bytes(data), ref, convert=self._convert)
            if wrong is not None:
                raise ImageError(
                    ImageProblem(
                        reason=wrong.reason, message=f"{wrong.message} (it changed after it was checked)"
                    )
                )
        return Photo(data=data, sha256=hashlib.sha256(data).hexdigest(), fingerprint=fingerprint)

    def _read_problem(self, ref: str, exc: OSError) -> ImageProblem:
        if exc.errno == errno.ELOOP:
            return ImageProblem(
                reason=Reason.IMAGE_NOT_FILE,
                message=f"image {ref} is now a symbolic link (it was the photo itself when checked): put the "
                "photo back, then run again",
            )
        if exc.errno == errno.ENXIO:  # what opening a socket gives
            return ImageProblem(
                reason=Reason.IMAGE_NOT_FILE,
                message=f"image {ref} is now a socket or device, not a file (it was replaced after it was "
                "checked): put the photo back, then run again",
            )
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return ImageProblem(
                reason=Reason.IMAGE_MISSING,
                message=f"image {ref} no longer exists (it did when checked): put it back, or correct the "
                "manifest, then run again",
            )
        if isinstance(exc, PermissionError):
            return ImageProblem(
                reason=Reason.IMAGE_UNREADABLE,
                message=f"image {ref} can't be read: permission denied; let the user running backfill read it",
            )
        return ImageProblem(
            reason=Reason.IMAGE_UNREADABLE,
            message=f"image {ref} can't be read: {exc.strerror or exc}; check the file and the disk or share it "
            "is on, then run again",
        )


def _pread(fd: int, offset: int, length: int) -> bytes:
    return os.pread(fd, length, offset)


def _read_upto(fd: int, cap: int, expected: int) -> bytes:
    """The file's bytes from its current offset to its end, or the first `cap` of them if it is longer.

    `expected` is the size fstat gave. A first read that returns exactly that many is the whole file without a
    second read to see the end: the caller's fstat after reading, its size and mtime unchanged, proves it.
    """
    # One read of the size fstat gave (plus one byte, to see growth), then small ones to find the end: os.read
    # allocates all it is asked for, so asking for `cap` each time would cost 5 MB per call.
    ask = min(cap, expected + 1)
    first = os.read(fd, ask)
    if len(first) == expected:
        return first
    chunks = [first]
    left = cap - len(first)
    while first and left > 0:
        chunk = os.read(fd, min(left, 64 * 1024))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)

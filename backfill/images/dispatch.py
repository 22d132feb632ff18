"""One ImageSource for a whole manifest: each photo routed by how it is named, local path or object URL."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from ..vocab import Reason
from . import Fingerprint, ImageProblem, ImageSource, Photo, Pinned
from .urls import is_url, join, local_path_of


class DispatchingImageSource(ImageSource):
    """Local paths go to `local`, URLs to the source `remote()` makes on first use (a manifest of local
    photos never loads the object-storage client), each batch's order kept.

    `base` is where relative paths resolve: the manifest's folder (already given to `local`) or, for a
    manifest in object storage, its URL prefix ("s3://bucket/batch/"), against which they become URLs.
    Absolute local paths (and file:// URLs) are local wherever the manifest is. With `root` (images_root)
    set, only photos inside that local folder may be used, so a URL is refused as outside it.
    """

    def __init__(
        self,
        *,
        local: ImageSource,
        remote: Callable[[], ImageSource],
        base: str | None = None,
        root: str | None = None,
    ) -> None:
        self._local = local
        self._make_remote = remote
        self._remote: ImageSource | None = None
        self._base_url = base if base is not None and is_url(base) else None
        self._root = root

    async def fingerprint_many(self, raws: Sequence[str]) -> list[Fingerprint | ImageProblem]:
        return await self._split(raws, lambda s, part: s.fingerprint_many(part))

    async def check_many(self, raws: Sequence[str]) -> list[Fingerprint | ImageProblem]:
        return await self._split(raws, lambda s, part: s.check_many(part))

    async def unchanged_many(self, raws: Sequence[str], pinned: Sequence[Pinned]) -> list[bool]:
        if self._all_local(raws):
            return await self._local.unchanged_many(raws, pinned)
        return await super().unchanged_many(raws, pinned)  # each by its own source's fingerprint

    async def read(self, fingerprint: Fingerprint) -> Photo:
        if is_url(fingerprint.ref):
            return await self._remote_source().read(fingerprint)
        return await self._local.read(fingerprint)

    async def close(self) -> None:
        try:
            await self._local.close()
        finally:
            if self._remote is not None:
                await self._remote.close()

    def _remote_source(self) -> ImageSource:
        if self._remote is None:
            self._remote = self._make_remote()
        return self._remote

    def _all_local(self, raws: Sequence[str]) -> bool:
        return self._base_url is None and not any("://" in raw for raw in raws)

    def _route(self, raw: str) -> tuple[bool, str]:
        """(remote?, the value that source is given)."""
        if is_url(raw):
            return True, raw
        path = local_path_of(raw)
        if self._base_url is not None and not path.startswith("/"):
            return True, join(self._base_url, raw)
        return False, path

    async def _split(
        self,
        raws: Sequence[str],
        call: Callable[[ImageSource, Sequence[str]], Awaitable[list[Fingerprint | ImageProblem]]],
    ) -> list[Fingerprint | ImageProblem]:
        if self._all_local(raws):
            return await call(self._local, raws)  # all local: the common case, passed on untouched
        local: list[str] = []
        remote: list[str] = []
        where: list[bool] = []
        for raw in raws:
            is_remote, value = self._route(raw)
            where.append(is_remote)
            (remote if is_remote else local).append(value)
        got_local: list[Fingerprint | ImageProblem]
        got_remote: list[Fingerprint | ImageProblem]
        if self._root is not None:
            got_local = await call(self._local, local) if local else []
            got_remote = [self._outside_root(url) for url in remote]
        else:
            got_local, got_remote = await asyncio.gather(
                call(self._local, local) if local else _nothing(),
                call(self._remote_source(), remote) if remote else _nothing(),
            )
        from_local, from_remote = iter(got_local), iter(got_remote)
        return [next(from_remote) if is_remote else next(from_local) for is_remote in where]

    def _outside_root(self, url: str) -> ImageProblem:
        return ImageProblem(
            reason=Reason.PATH_OUTSIDE_ROOT,
            message=f"image {url.split('?', 1)[0]!r} is in object storage, outside images_root {self._root}: "
            "with images_root set only photos inside that folder are used; copy the photo there, or unset "
            "images_root",
        )


async def _nothing() -> list[Fingerprint | ImageProblem]:
    return []

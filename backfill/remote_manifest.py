"""A manifest named by an object-storage URL: fetched once into a private file, then read as a local one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path, PosixPath
from typing import TYPE_CHECKING

from .errors import ManifestError
from .images import ImageError
from .manifest import Manifest, ManifestRules, open_manifest

if TYPE_CHECKING:
    from .images.remote import RemoteImageSource

# The copy is the manifest's snapshot, as the open descriptor is for a local file: fetched whole before the
# pre-scan (a GET returns one version of an object even if it is overwritten meanwhile), so rows written to the
# object during a run are never seen. It lives in a folder only the owner can enter, and is unlinked as soon as
# open_manifest holds its descriptor: nothing is left behind, even by a run killed later (only one killed
# during the download leaves its folder in the temp directory).


class UrlPath(PosixPath):
    """The local copy's path, which shows itself as the manifest's URL: what summaries, logs, the ledger's run
    record and the manifest's own error messages name. Opening it (os.fspath) opens the copy."""

    _url: str | None = None  # paths derived from this one (its parent, say) are the copy's own

    def with_url(self, url: str) -> UrlPath:
        self._url = url
        return self

    def __str__(self) -> str:
        return self._url or super().__str__()

    def __repr__(self) -> str:
        return f"UrlPath({str(self)!r})"

    def __fspath__(self) -> str:
        return super().__str__()


async def open_remote_manifest(url: str, rules: ManifestRules, source: RemoteImageSource) -> Manifest:
    """The manifest at `url`, opened and pre-scanned like a local one; ManifestError if it can't be had."""
    folder = tempfile.mkdtemp(prefix="backfill-manifest-")  # 0700
    copy = Path(folder) / "manifest.csv"
    try:
        try:
            await source.download(url, copy)
        except ImageError as exc:
            raise ManifestError(exc.problem.message) from exc
        try:
            manifest = open_manifest(copy, rules)
        except ManifestError as exc:
            raise ManifestError(str(exc).replace(str(copy), url)) from exc
    finally:
        with contextlib.suppress(OSError):
            os.unlink(copy)
        shutil.rmtree(folder, ignore_errors=True)
    manifest.path = UrlPath(copy).with_url(url)
    return manifest

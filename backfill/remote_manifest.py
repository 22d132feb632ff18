"""A manifest named by an object-storage URL: fetched once into a private file, then read as a local one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ManifestError
from .images import ImageError
from .manifest import Manifest, ManifestRules, extension_of, open_manifest

if TYPE_CHECKING:
    from .images.remote import RemoteImageSource

# The copy is the manifest's snapshot, as the open descriptor is for a local file: fetched whole before the
# pre-scan (a GET returns one version of an object even if it is overwritten meanwhile), so rows written to the
# object during a run are never seen. It lives in a folder only the owner can enter, and is unlinked as soon as
# open_manifest holds its descriptor: nothing is left behind, even by a run killed later (only one killed
# during the download leaves its folder in the temp directory).


async def open_remote_manifest(url: str, rules: ManifestRules, source: RemoteImageSource) -> Manifest:
    """The manifest at `url`, opened and pre-scanned like a local one; ManifestError if it can't be had."""
    folder = tempfile.mkdtemp(prefix="backfill-manifest-")  # 0700
    # Its extension says the format as the URL's does (open_manifest goes by the name, the URL, first anyway).
    copy = Path(folder) / f"manifest{extension_of(url, rules.manifest_format)}"
    try:
        try:
            await source.download(url, copy)
        except ImageError as exc:
            raise ManifestError(exc.problem.message) from exc
        # Named by its URL from the start: every message, record and summary calls it that, never the copy.
        manifest = open_manifest(copy, rules, name=url)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(copy)
        shutil.rmtree(folder, ignore_errors=True)
    return manifest

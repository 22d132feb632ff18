"""Owner-only folders: every output folder this tool makes (runs, reports, logs) is readable by its owner alone."""

from __future__ import annotations

from pathlib import Path


def make_private_dirs(folder: Path) -> None:
    """`folder` and any missing parents, the new ones owner-only."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    for path in reversed(missing):
        path.mkdir(mode=0o700, exist_ok=True)

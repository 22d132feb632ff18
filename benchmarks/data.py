"""Benchmark inputs: photos of realistic sizes, trees of tiny distinct image files, and manifests."""

from __future__ import annotations

import csv
import os
import random
import struct
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

KB = 1024
MB = 1024 * KB
# Realistic selfie sizes: a small thumbnail-grade JPEG, a typical phone selfie, a full-resolution photo.
PHOTO_SIZES: dict[str, int] = {"20KB": 20 * KB, "200KB": 200 * KB, "2MB": 2 * MB}
# The mix used where one run carries every size: 45% small, 45% typical, 10% large (~300 KB a row).
MIX: tuple[str, ...] = ("20KB",) * 9 + ("200KB",) * 9 + ("2MB",) * 2
CREATED_AT = "2021-08-12"
FILES_PER_DIR = 1000


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def noisy_png(target_bytes: int, seed: int) -> bytes:
    """A valid RGB PNG of about `target_bytes`: random pixels, stored uncompressed, so nothing shrinks it.

    Level-0 deflate keeps generation cheap (2 MB in milliseconds) while the bytes stay incompressible for
    anything downstream, as a real JPEG's would be.
    """
    width = max(1, int((target_bytes / 3) ** 0.5))
    height = max(1, target_bytes // (3 * width + 1))
    rng = random.Random(seed)
    raw = b"".join(b"\x00" + rng.randbytes(3 * width) for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw, 0))
        + _chunk(b"IEND", b"")
    )


def tiny_png(seed: int = 0x808080) -> bytes:
    """The smallest useful valid PNG (1x1), for manifests where only the number of files matters; its one
    pixel's colour is `seed` (below 2**24), so that every user's photo can differ (one photo named by many IDs
    is rejected as shared_photo)."""
    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(b"\x00" + seed.to_bytes(3)))
        + _chunk(b"IEND", b"")
    )


def photo_pool(folder: Path, label: str, count: int) -> list[Path]:
    """`count` distinct noisy PNGs of size `label` in `folder`, made once and reused by later runs."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{label}-{i:04d}.png"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(noisy_png(PHOTO_SIZES[label], seed=zlib.crc32(path.name.encode())))
            tmp.replace(path)  # a run killed mid-write never leaves a truncated photo to be reused
        paths.append(path)
    return paths


def tiny_tree(folder: Path, count: int) -> Path:
    """`count` DISTINCT tiny PNG files under folder/dNNNN/, made once (a marker says the tree is whole).

    Distinct files rather than hard links: a hard link shares its inode and cached pages with every other
    link, so stats and reads of a million links would hit one warm inode and flatter the validator. Distinct
    photos too (each its own pixel): a photo named by many IDs is rejected as shared_photo.
    """
    marker = folder / f".complete-distinct-{count}"  # trees made before the photos differed are made again
    if marker.exists():
        return folder
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    for start in range(0, count, FILES_PER_DIR):
        sub = folder / f"d{start // FILES_PER_DIR:04d}"
        sub.mkdir(parents=True, exist_ok=True)
        for i in range(start, min(count, start + FILES_PER_DIR)):
            fd = os.open(sub / f"u{i:07d}.png", flags, 0o644)
            try:
                os.write(fd, tiny_png(i))
            finally:
                os.close(fd)
    marker.touch()
    return folder


def tiny_path(i: int) -> str:
    """The path of tiny file `i`, relative to the tree's folder."""
    return f"d{i // FILES_PER_DIR:04d}/u{i:07d}.png"


def user_id(i: int, prefix: str = "u") -> str:
    return f"{prefix}{i:07d}"


def write_manifest(path: Path, rows: Iterable[tuple[str, str, str]]) -> Path:
    """A manifest CSV of (user_id, user_created_at, image_path) rows; paths may be relative to it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["user_id", "user_created_at", "image_path"])
        writer.writerows(rows)
    return path


def pool_rows(n: int, photos: Sequence[Path], prefix: str = "u") -> list[tuple[str, str, str]]:
    """`n` rows cycling through `photos` (absolute paths), each with its own user_id."""
    return [(user_id(i, prefix), CREATED_AT, str(photos[i % len(photos)])) for i in range(n)]


def tiny_manifest(path: Path, tree: Path, n: int) -> Path:
    """A manifest of `n` rows, each pointing at its own tiny file in `tree`."""
    rows = ((user_id(i), CREATED_AT, str(tree / tiny_path(i))) for i in range(n))
    return write_manifest(path, rows)

"""Regenerates the sample data: small real photos and a manifest with a few rows rejected on purpose."""

from __future__ import annotations

import base64
import csv
import shutil
import struct
import zlib
from pathlib import Path

# The one copy lives in the package, so that `backfill demo` finds it from any install; sample_data/manifest.csv
# and sample_data/images are links to it, for the commands in README.md and docs/.
DEMO = Path(__file__).resolve().parent.parent / "backfill" / "demo"
IMAGES = DEMO / "images"

# An 8x8 grey baseline JPEG, made once with Pillow so that neither this script nor the project needs it.
# Each user's copy gets its own comment segment, so every photo has different bytes (and a different hash).
GREY_JPEG = bytes.fromhex(
    "ffd8ffe000104a46494600010100000100010000ffdb004300080606070605080707070909080a0c140d0c0b0b0c19121"
    "30f141d1a1f1e1d1a1c1c20242e2720222c231c1c2837292c30313434341f27393d38323c2e333432ffc0000b0800080008"
    "01011100ffc4001f0000010501010101010100000000000000000102030405060708090a0bffc400b51000020103030204"
    "03050504040000017d01020300041105122131410613516107227114328191a1082342b1c11552d1f0243362728209"
    "0a161718191a25262728292a3435363738393a434445464748494a535455565758595a636465666768696a737475767778"
    "797a838485868788898a92939495969798999aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9cad2d3d4"
    "d5d6d7d8d9dae1e2e3e4e5e6e7e8e9eaf1f2f3f4f5f6f7f8f9faffda0008010100003f002bffd9"
)
# A 1x1 GIF: saved under a .png name it stands for the photo exported in the wrong format.
GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")

# The manifest, in file order (line 2 is the first row): (user_id, user_created_at, image file, what to write
# there: "jpg", "png", "text", "gif", or None for no file). Rows with a comment are rejected on purpose.
ROWS = [
    ("user_0001", "2021-08-12", "user_0001.jpg", "jpg"),
    ("user_0002", "2021-05-18 15:14:43-0700", "user_0002.png", "png"),
    ("user_0003", "2021-05-18T15:14:43Z", "user_0003.jpg", "jpg"),
    ("00123", "2020-01-15", "00123.png", "png"),  # valid: leading zeros must stay "00123", never 123
    ("user_0099", "2021-01-01", "user_0099_a.jpg", "jpg"),  # duplicate_user_id: the same id twice...
    ("user_0004", "2021-05-18T15:14:43.123+01:00", "user_0004.jpg", "jpg"),
    ("user_0005", "2021-05-18 15:14", "user_0005.png", "png"),
    ("user_0020", "", "user_0020.jpg", "jpg"),  # empty_value: no creation date
    ("user_0006", "2019-11-30", "user_0006.jpg", "jpg"),
    ("user_0099", "2021-01-02", "user_0099_b.png", "png"),  # ...so both its rows are held back
    ("user_0007", "2020-02-29", "user_0007.png", "png"),  # valid: a leap day is a real date
    ("user_0021", "2099-01-01", "user_0021.png", "png"),  # future_date
    ("user_0008", "2018-03-01T08:00:00+05:30", "user_0008.jpg", "jpg"),
    ("bad id!", "2021-03-03", "bad_id.png", "png"),  # bad_user_id: a space and "!"
    ("user_0009", "2022-07-04 23:59:59Z", "user_0009.png", "png"),
    ("user_0022", "2021-02-30", "user_0022.jpg", "jpg"),  # bad_date: February has no 30th
    ("user-0010", "2017-06-21", "user-0010.jpg", "jpg"),
    ("user_0023", "2021-04-04", "user_0023.jpg", None),  # image_missing: there is no such file
    ("USER_0011", "2023-01-02T00:00:00-0300", "USER_0011.png", "png"),
    ("user_0024", "2021-05-05", "user_0024.jpg", "text"),  # image_not_jpeg_or_png: text named .jpg
    ("user_0012", "2016-12-31", "user_0012.jpg", "jpg"),
    ("user_0025", "2021-06-06", "user_0025.png", "gif"),  # image_not_jpeg_or_png: a GIF renamed .png
    ("user_0013", "2021-10-10 10:10:10", "user_0013.png", "png"),
    ("user_0014", "2015-05-05", "user_0014.jpg", "jpg"),
]


def jpeg_bytes(label: str) -> bytes:
    comment = f"backfill sample photo for {label}".encode()
    segment = b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment
    return GREY_JPEG[:2] + segment + GREY_JPEG[2:]  # right after the start-of-image marker


def png_bytes(seed: int, size: int = 24) -> bytes:
    """A real RGB PNG whose gradient depends on `seed`."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    pixels = b"".join(
        b"\x00" + bytes(channel for x in range(size) for channel in ((seed * 37 + x * 9) % 256, y * 10, 200))
        for y in range(size)
    )
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    signature = b"\x89PNG\r\n\x1a\n"
    return signature + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(pixels, 9)) + chunk(b"IEND", b"")


def content(kind: str | None, label: str, seed: int) -> bytes | None:
    if kind == "jpg":
        return jpeg_bytes(label)
    if kind == "png":
        return png_bytes(seed)
    if kind == "text":
        return b"This is not a photo: someone saved a note under a .jpg name.\n"
    if kind == "gif":
        return GIF
    return None


def main() -> None:
    # The folder belongs to this script: start clean so renamed rows leave no stale files behind.
    if IMAGES.exists():
        shutil.rmtree(IMAGES)
    IMAGES.mkdir()
    for seed, (user_id, _, name, kind) in enumerate(ROWS):
        data = content(kind, f"{user_id} ({name})", seed)
        if data is not None:
            (IMAGES / name).write_bytes(data)
    with (DEMO / "manifest.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["user_id", "user_created_at", "image_path"])
        writer.writerows([user_id, created, f"images/{name}"] for user_id, created, name, _ in ROWS)
    print(f"wrote {len(ROWS)} rows to {DEMO / 'manifest.csv'} and {len(list(IMAGES.iterdir()))} images")


if __name__ == "__main__":
    main()

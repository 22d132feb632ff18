"""--normalize: other formats become JPEG, upright, within the limit, stripped of metadata, in memory only; the
ledger pins the user's source photo, so the same photo is recognised whatever an encoder makes of it."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pillow_heif
import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageCms, PngImagePlugin

from backfill import compose, preflight
from backfill.config import Settings
from backfill.errors import ConfigError, LedgerError
from backfill.images import Fingerprint, ImageError, ImageProblem, ImageSource, Photo, PhotoKey
from backfill.images import normalize as norm
from backfill.images.normalize import NormalizingImageSource, normalize
from backfill.images.remote import RemoteImageSource
from backfill.ledger import LedgerRow, Refused
from backfill.ledger.postgres.schema import SCHEMA_VERSION as PG_SCHEMA
from backfill.ledger.sqlite import SCHEMA_VERSION as SQLITE_SCHEMA
from backfill.sandbox import Faults, RunningSandbox, start_sandbox
from backfill.vocab import Reason

from .conftest import API_KEY, PARTNER_ID, Sleeps, default_retry_policy, simple_rows, write_manifest
from .test_images_remote import Buckets
from .test_ledger_contract import BINDING, request
from .test_promise import CountingImages

pillow_heif.register_heif_opener()

LIMIT = 5 * 1024 * 1024
RED, BLUE = (220, 20, 20), (20, 20, 220)
GPS_IFD, ORIENTATION, MAKE = 0x8825, 0x0112, 0x010F


def picture(width: int = 320, height: int = 240) -> Image.Image:
    """Red with a blue top-left quarter: where the blue ends up tells which way up the photo arrived."""
    image = Image.new("RGB", (width, height), RED)
    image.paste(BLUE, (0, 0, width // 2, height // 2))
    return image


def encoded(image: Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def exif(orientation: int = 1) -> Image.Exif:
    """EXIF with a camera make, a GPS position and an orientation: everything normalising must drop."""
    data = Image.Exif()
    data[MAKE] = "Acme Phones"
    data[ORIENTATION] = orientation
    gps = data.get_ifd(GPS_IFD)
    gps[1], gps[2], gps[3], gps[4] = "N", (51.0, 30.0, 1.5), "W", (0.0, 7.0, 39.0)
    return data


def big_jpeg() -> bytes:
    """A phone-sized JPEG over 5 MB: noise does not compress."""
    noise = Image.frombytes("RGB", (3200, 2400), os.urandom(3200 * 2400 * 3))
    data = encoded(noise, "JPEG", quality=95, exif=exif())
    assert len(data) > LIMIT
    return data


def rotated_jpeg() -> bytes:
    """What a phone held upright saves: pixels stored on their side, EXIF orientation 6 to turn them back."""
    return encoded(picture().transpose(Image.Transpose.ROTATE_90), "JPEG", quality=92, exif=exif(6))


def texted_png() -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "taken at 12 Acacia Avenue")
    return encoded(picture(), "PNG", pnginfo=info)


SOURCES: dict[str, Callable[[], bytes]] = {
    "heic": lambda: encoded(picture(), "HEIF", quality=80),
    "webp": lambda: encoded(picture(), "WEBP", quality=80),
    "tiff": lambda: encoded(picture(), "TIFF"),
    "big": big_jpeg,
    "rotated": rotated_jpeg,
    "texted": texted_png,
}
NAMES = {
    "heic": "a.heic",
    "webp": "b.webp",
    "tiff": "c.tif",
    "big": "d.jpg",
    "rotated": "e.jpg",
    "texted": "f.png",
}


def upright(data: bytes) -> bool:
    """The photo as a viewer shows it (no EXIF to apply): landscape, blue in its top-left corner only."""
    with Image.open(io.BytesIO(data)) as image:
        rgb = image.convert("RGB")
        w, h = rgb.size
        corner, opposite = rgb.getpixel((w // 8, h // 8)), rgb.getpixel((w - w // 8, h - h // 8))
    assert isinstance(corner, tuple) and isinstance(opposite, tuple)
    return w > h and corner[2] > 150 > corner[0] and opposite[0] > 150 > opposite[2]


def no_metadata(data: bytes) -> bool:
    with Image.open(io.BytesIO(data)) as image:
        found = image.getexif()
        text = getattr(image, "text", {})
    return not found.get_ifd(GPS_IFD) and MAKE not in found and not text and b"Acacia" not in data


# --- the normaliser itself ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["heic", "webp", "tiff", "rotated"])
def test_each_format_becomes_an_upright_jpeg_without_metadata(kind: str) -> None:
    done = normalize(SOURCES[kind](), "p", LIMIT)
    assert done.data.startswith(b"\xff\xd8\xff") and len(done.data) <= LIMIT
    assert upright(done.data) and no_metadata(done.data)
    expected = {"heic": "converted from HEIC", "webp": "converted from WebP", "tiff": "converted from TIFF"}
    assert done.note.startswith(expected.get(kind, "rotated 90")), done.note


def test_a_motion_photos_video_and_a_progressive_jpegs_metadata_go_and_its_pixels_stay() -> None:
    """A phone's motion photo: a JPEG with an MP4 after its end marker, which has a location of its own. And a
    progressive JPEG (several scans, tables between them): its end is found across them all."""
    video = b"\x00\x00\x00\x18ftypmp42" + b"\xa9xyz+51.5000-000.1275/" + os.urandom(3000)
    for options in ({"quality": 90}, {"quality": 90, "progressive": True}):
        photo = encoded(picture(), "JPEG", exif=exif(), **options)
        done = normalize(photo + video, "p", LIMIT)
        assert done.note == f"metadata removed; {len(video):,} bytes after its end removed"
        assert (
            b"+51.5000-000.1275" not in done.data
            and done.data.endswith(b"\xff\xd9")
            and no_metadata(done.data)
        )
        with Image.open(io.BytesIO(done.data)) as a, Image.open(io.BytesIO(photo)) as b:
            assert a.tobytes() == b.tobytes()
    # Over the limit with its video, within it without: cut, not scaled.
    photo = encoded(picture(), "JPEG", quality=90)
    done = normalize(photo + bytes(LIMIT), "p", LIMIT)
    assert done.data == photo and done.note == f"{LIMIT:,} bytes after its end removed"
    png = texted_png()
    done = normalize(png + b"trailing", "p", LIMIT)
    assert done.note == "metadata removed; 8 bytes after its end removed" and done.data.endswith(
        b"IEND\xaeB`\x82"
    )


def test_the_colour_profile_is_kept_and_nothing_else() -> None:
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    done = normalize(encoded(picture(), "WEBP", icc_profile=profile), "p", LIMIT)
    with Image.open(io.BytesIO(done.data)) as image:
        assert image.info.get("icc_profile") == profile
    assert no_metadata(done.data)


def test_a_bmp_and_the_first_frame_of_a_gif_become_jpegs() -> None:
    frames = [picture(), Image.new("RGB", (320, 240), (0, 200, 0))]
    gif = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    for data, said in ((gif, "converted from GIF"), (encoded(picture(), "BMP"), "converted from BMP")):
        done = normalize(data, "p", LIMIT)
        assert done.data.startswith(b"\xff\xd8\xff") and done.note.startswith(said)
        assert upright(done.data)  # the first frame (red and blue), not the green second


def test_a_photo_over_the_limit_is_scaled_down_never_up() -> None:
    done = normalize(big_jpeg(), "p", LIMIT)
    assert len(done.data) <= LIMIT and no_metadata(done.data)
    with Image.open(io.BytesIO(done.data)) as image:
        w, h = image.size
    assert w < 3200 and h < 2400 and f"scaled 3200x2400 → {w}x{h}" in done.note
    small = normalize(encoded(picture(40, 30), "WEBP"), "p", LIMIT)
    with Image.open(io.BytesIO(small.data)) as image:
        assert image.size == (40, 30)


def test_a_jpeg_or_png_needing_nothing_goes_as_given_and_metadata_alone_is_stripped_losslessly() -> None:
    plain = encoded(picture(), "JPEG", quality=90)
    assert normalize(plain, "p", LIMIT).data is plain
    png = encoded(picture(), "PNG")
    assert normalize(png, "p", LIMIT).data is png
    # Metadata only: the segments go, the compressed pixels stay byte for byte (no re-encoding loss).
    tagged = encoded(picture(), "JPEG", quality=90, exif=exif())
    done = normalize(tagged, "p", LIMIT)
    assert done.note == "metadata removed" and no_metadata(done.data)
    assert done.data[-1000:] == tagged[-1000:] and done.data.startswith(b"\xff\xd8")
    stripped = normalize(texted_png(), "p", LIMIT)
    assert stripped.data.startswith(b"\x89PNG") and no_metadata(stripped.data)
    with Image.open(io.BytesIO(stripped.data)) as a, Image.open(io.BytesIO(png)) as b:
        assert a.tobytes() == b.tobytes()


def test_a_damaged_photo_or_a_decompression_bomb_is_a_reject_not_a_crash() -> None:
    heic = SOURCES["heic"]()
    for broken in (heic[: len(heic) // 2], b"RIFF\x00\x00\x00\x00WEBPVP8 garbage", rotated_jpeg()[:2000]):
        with pytest.raises(ImageError) as caught:
            normalize(broken, "'x.heic'", LIMIT)
        assert caught.value.problem.reason is Reason.IMAGE_UNDECODABLE
        assert "'x.heic'" in caught.value.problem.message and "BytesIO" not in caught.value.problem.message
    # A PNG header claiming 100,000 x 100,000 pixels: refused from the header, before any pixel is decoded.
    bomb = encoded(Image.new("L", (100, 100)), "PNG")
    header = b"IHDR" + (100_000).to_bytes(4) + (100_000).to_bytes(4) + bomb[24:29]
    bomb = bomb[:12] + header + zlib.crc32(header).to_bytes(4) + bomb[33:]
    with pytest.raises(ImageError) as caught:
        normalize(bomb, "'bomb.png'", LIMIT)
    assert caught.value.problem.reason is Reason.IMAGE_TOO_LARGE
    assert "too many pixels" in caught.value.problem.message


# --- a run ---------------------------------------------------------------------------------------------------


def archive(folder: Path, kinds: dict[str, bytes] | None = None) -> Path:
    """A manifest of one user per kind of photo, user_<kind>, the photos beside it."""
    made = kinds or {kind: make() for kind, make in SOURCES.items()}
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = ["user_id,user_created_at,image_path"]
    for kind, data in made.items():
        (folder / "images" / NAMES[kind]).write_bytes(data)
        lines.append(f"user_{kind},2021-08-12,images/{NAMES[kind]}")
    path = folder / "manifest.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def rows(summary: Any, name: str) -> dict[str, dict[str, str]]:
    with (Path(summary.out_dir) / name).open(newline="") as handle:
        return {row["user_id"]: row for row in csv.DictReader(handle)}


async def test_a_normalised_archive_is_enrolled_upright_small_and_clean_and_a_rerun_sends_nothing(
    tmp_path: Path, sandbox: RunningSandbox, make_settings: Callable[..., Settings]
) -> None:
    sandbox.state.keep_photos = True
    manifest = archive(tmp_path / "a")
    texted = (tmp_path / "a" / "images" / NAMES["texted"]).read_bytes()
    summary = await compose.run(make_settings(sandbox, normalize=True), manifest)
    assert summary.counts == {"enrolled": 6}, rows(summary, "rejects.csv")
    got = sandbox.state.photos
    for kind in SOURCES:
        data = got[f"user_{kind}"]
        assert len(data) <= LIMIT and no_metadata(data), kind
        assert kind == "big" or upright(data), kind  # the big one is noise: it has no way up
        assert data.startswith(b"\x89PNG" if kind == "texted" else b"\xff\xd8\xff"), kind
    assert got["user_texted"] != texted  # its text chunk removed, its pixels kept
    said = {user: row["normalized"] for user, row in rows(summary, "results.csv").items()}
    assert said["user_heic"] == "converted from HEIC; metadata removed"
    assert said["user_rotated"] == "rotated 90; metadata removed"
    assert said["user_big"].startswith("scaled 3200x2400 → ")
    assert said["user_texted"] == "metadata removed"

    before = sandbox.state.total_requests
    counting = CountingImages(tmp_path / "a")
    images = NormalizingImageSource(counting, max_bytes=LIMIT)
    again = await compose.run(make_settings(sandbox, normalize=True), manifest, images=images)
    assert again.counts == {"skipped": 6} and sandbox.state.total_requests == before
    assert counting.calls["read"] == 0  # a resume reads no photo of a done row


async def test_the_same_sources_elsewhere_or_encoded_otherwise_are_recognised_and_another_photo_is_not(
    tmp_path: Path, sandbox: RunningSandbox, make_settings: Callable[..., Settings]
) -> None:
    """The pin is the source's: the archive copied to another folder (another machine: every quick check fails,
    so each photo is read and compared) and normalised to another limit (other bytes from the encoder) is
    the same photos; a different photo for an enrolled ID is user_id_reused."""
    manifest = archive(tmp_path / "a")
    await compose.run(make_settings(sandbox, normalize=True), manifest)
    before = sandbox.state.total_requests
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    counting = CountingNormalizer(CountingImages(tmp_path / "b"), max_bytes=200_000)
    elsewhere = await compose.run(
        make_settings(sandbox, normalize=True, max_image_bytes=200_000),
        tmp_path / "b" / "manifest.csv",
        images=counting,
    )
    assert elsewhere.counts == {"skipped": 6} and sandbox.state.total_requests == before
    # Each photo read once, to compare its source's digest with the pin; none normalised for nothing.
    assert counting.calls == {"read_source": 6}

    (tmp_path / "b" / "images" / NAMES["heic"]).write_bytes(encoded(picture(330, 240), "HEIF", quality=80))
    swapped = await compose.run(make_settings(sandbox, normalize=True), tmp_path / "b" / "manifest.csv")
    assert rows(swapped, "rejects.csv")["user_heic"]["reason"] == Reason.USER_ID_REUSED
    assert sandbox.state.total_requests == before


class CountingNormalizer(NormalizingImageSource):
    def __init__(self, inner: ImageSource, *, max_bytes: int) -> None:
        super().__init__(inner, max_bytes=max_bytes)
        self.calls: Counter[str] = Counter()

    async def read(self, fingerprint: Fingerprint) -> Photo:
        self.calls["read"] += 1
        return await super().read(fingerprint)

    async def read_source(self, fingerprint: Fingerprint) -> Photo:
        self.calls["read_source"] += 1
        return await super().read_source(fingerprint)


def test_without_the_flag_what_it_would_save_is_rejected_naming_it(
    tmp_path: Path, sandbox: RunningSandbox, make_settings: Callable[..., Settings]
) -> None:
    manifest = archive(tmp_path / "a")
    n, rejects = compose.validate(make_settings(sandbox), manifest)
    by_user = {r.user_id: r for r in rejects}
    assert n == 2 and set(by_user) == {"user_heic", "user_webp", "user_tiff", "user_big"}
    assert by_user["user_heic"].reason is Reason.IMAGE_NOT_JPEG_OR_PNG
    assert by_user["user_big"].reason is Reason.IMAGE_TOO_LARGE
    assert all("--normalize" in r.message for r in rejects)
    n, rejects = compose.validate(make_settings(sandbox, normalize=True), manifest)
    assert n == 6 and not rejects


def test_validate_and_check_decode_what_a_send_would_decode(
    tmp_path: Path, threaded_sandbox: RunningSandbox, make_settings: Callable[..., Settings]
) -> None:
    """A HEIC cut in half and a WebP with garbage for pixels pass a check of their head and tail; with
    --normalize, validate and check decode them as a send would, and say so, as a run would at send time."""
    heic = SOURCES["heic"]()
    broken = {"heic": heic[: len(heic) // 2], "webp": b"RIFF\x00\x00\x00\x00WEBPVP8 garbage"}
    manifest = archive(tmp_path / "a", {**broken, "rotated": rotated_jpeg()})
    settings = make_settings(threaded_sandbox, normalize=True)
    n, rejects = compose.validate(settings, manifest)
    assert n == 1
    assert {r.user_id: r.reason for r in rejects} == {
        "user_heic": Reason.IMAGE_UNDECODABLE,
        "user_webp": Reason.IMAGE_UNDECODABLE,
    }
    assert all("can't be decoded" in r.message for r in rejects)
    checks = preflight.run_checks(settings, manifest)
    [images] = [c for c in checks if c.name == "images"]
    assert not images.ok and "2 of 3 sampled photos can't be used" in images.detail
    assert "image_undecodable" in images.detail
    assert all(c.ok for c in checks if c.name.startswith("api"))
    # The run says the same of them, at send time, and sends the photo that decodes.
    summary = asyncio.run(compose.run(settings, manifest))
    assert {uid: r["reason"] for uid, r in rows(summary, "rejects.csv").items()} == {
        "user_heic": "image_undecodable",
        "user_webp": "image_undecodable",
    }
    assert summary.counts == {"enrolled": 1, "rejected": 2}


def test_a_missing_extra_is_a_config_error_naming_the_pip_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    monkeypatch.setattr(norm, "_PIL", None)
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # as if not installed: importing it fails
    manifest = archive(tmp_path / "a", {"heic": SOURCES["heic"]()})
    with pytest.raises(ConfigError) as caught:
        compose.validate(make_settings(normalize=True), manifest)
    assert caught.value.key == "normalize" and "pip install 'backfill[images]'" in caught.value.fix
    # A run stops before it opens (or makes) its ledger or output folder.
    settings = make_settings(normalize=True)
    with pytest.raises(ConfigError, match=r"pip install 'backfill\[images\]'"):
        asyncio.run(compose.run(settings, manifest))
    assert not settings.ledger_path().exists() and not settings.out.exists()


def test_pillow_is_loaded_only_when_normalize_is_on(tmp_path: Path) -> None:
    """A run without the setting never imports Pillow nor pillow-heif (checked in a fresh interpreter)."""
    manifest = archive(tmp_path / "a", {"texted": texted_png()})
    code = (
        "import sys\n"
        "from backfill import compose\n"
        "from backfill.config import load_settings\n"
        f"settings = load_settings(None, {{'SMILE_PARTNER_ID': '1', 'SMILE_API_KEY': 'k'}}, {{'env': 'local'}})\n"
        f"compose.validate(settings, {str(manifest)!r})\n"
        "assert 'PIL' not in sys.modules and 'pillow_heif' not in sys.modules, 'loaded'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


# --- the ledger: the source pinned, the bytes sent and the transform beside it ---------------------------------


async def ledger_row(settings: Settings, user_id: str) -> tuple[LedgerRow, PhotoKey]:
    store = await compose.open_store(settings, writable=False)
    try:
        return (await store.lookup([user_id]))[user_id], store.photo_key
    finally:
        await store.close()


async def test_a_row_retried_with_other_bytes_from_the_same_source_is_sent_and_its_sent_digest_recorded(
    tmp_path: Path, make_settings: Callable[..., Settings], sleeps: Sleeps
) -> None:
    """The first attempt fails (503, attempts spent): the ledger pins the source photo and records the keyed
    digest of the bytes sent and the transform. A later run normalises to another limit (other bytes): the
    ledger lets them go, since the source is the same, and records the new digest and transform."""
    source = encoded(Image.frombytes("RGB", (320, 240), os.urandom(320 * 240 * 3)), "HEIF", quality=90)
    manifest = archive(tmp_path / "a", {"heic": source})
    async with await start_sandbox(PARTNER_ID, API_KEY, faults=Faults(script={"user_heic": [503]})) as server:
        server.state.keep_photos = True
        first = await compose.run(
            make_settings(server, normalize=True, max_attempts=1), manifest, sleep=sleeps
        )
        assert first.counts == {"retry_exhausted": 1}
        row, key = await ledger_row(make_settings(server), "user_heic")
        assert row.photo_sha256 == key.of(source) and row.transform == "converted from HEIC; metadata removed"
        assert row.sent_sha256 is not None and row.sent_sha256 != row.photo_sha256
        first_sent = row.sent_sha256

        second = await compose.run(make_settings(server, normalize=True, max_image_bytes=20_000), manifest)
        assert second.counts == {"enrolled": 1}, rows(second, "rejects.csv")
        got = server.state.photos["user_heic"]
        row, key = await ledger_row(make_settings(server), "user_heic")
        assert row.photo_sha256 == key.of(source)  # still the source's pin
        assert row.sent_sha256 == key.of(got) != first_sent and len(got) <= 20_000
        assert row.transform.startswith("converted from HEIC; scaled 320x240 → ")
        (exported,) = await asyncio.to_thread(lambda: list(compose.export_rows(make_settings(server), None)))
        assert (exported["sent_sha256"], exported["transform"]) == (row.sent_sha256, row.transform)


def as_schema_3(path: Path) -> None:
    """A ledger as schema 3 left it: no sent_sha256 nor transform column."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("ALTER TABLE users DROP COLUMN sent_sha256")
        conn.execute("ALTER TABLE users DROP COLUMN transform")
        conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema'")
        conn.commit()
    finally:
        conn.close()


async def test_a_schema_3_ledger_gains_the_columns_in_place_and_its_done_rows_are_skipped_unread(
    tmp_path: Path, sandbox: RunningSandbox, make_settings: Callable[..., Settings]
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(3))
    settings = make_settings(sandbox)
    assert (await compose.run(settings, manifest)).counts == {"enrolled": 3}
    ledger = tmp_path / "checkpoint.sqlite"
    as_schema_3(ledger)
    with pytest.raises(LedgerError, match=r"schema '3'.*Open it once with a writable command"):
        await compose.open_store(settings, writable=False)

    images = CountingImages(tmp_path)
    again = await compose.run(settings, manifest, images=images)
    assert again.counts == {"skipped": 3} and images.calls["read"] == 0
    conn = sqlite3.connect(ledger)
    try:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == (SQLITE_SCHEMA,)
        assert conn.execute(
            "SELECT count(*) FROM users WHERE sent_sha256 IS NULL AND transform = ''"
        ).fetchone() == (3,)
    finally:
        conn.close()
    row, _ = await ledger_row(settings, "user_0000")
    assert row.sent_sha256 is None and row.transform == ""


async def test_a_postgres_schema_3_ledger_gains_the_columns_in_place(pg_url: str) -> None:
    from backfill.ledger.postgres import PostgresStore

    store = await PostgresStore.open(pg_url, BINDING, writable=True)
    try:
        assert not isinstance(await store.begin_attempt(request("p1")), Refused)
        await store.flush()
    finally:
        await store.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:  # as schema 3 left it
        conn.execute("ALTER TABLE backfill.users DROP COLUMN sent_sha256, DROP COLUMN transform")
        conn.execute("UPDATE backfill.meta SET value = '3' WHERE key = 'schema'")
    with pytest.raises(LedgerError, match=r"has schema 3, from an earlier version.*writing command"):
        await PostgresStore.open(pg_url, BINDING, writable=False)
    store = await PostgresStore.open(pg_url, BINDING, writable=True)
    try:
        (old,) = (await store.lookup(["p1"])).values()
        assert old.photo_sha256 == "a" * 64 and old.sent_sha256 is None and old.transform == ""
        sent = replace(request("p2"), sent_sha256="b" * 64, transform="converted from HEIC")
        assert not isinstance(await store.begin_attempt(sent), Refused)
        await store.flush()
        (new,) = (await store.lookup(["p2"])).values()
        assert new.sent_sha256 == "b" * 64 and new.transform == "converted from HEIC"
    finally:
        await store.close()
    with psycopg.connect(pg_url) as conn:
        found = conn.execute("SELECT value FROM backfill.meta WHERE key = 'schema'").fetchone()
    assert found == (PG_SCHEMA,)


async def test_photos_in_object_storage_are_checked_and_normalised_alike() -> None:
    """The object-storage source passes what --normalize converts (its own size limit, the source's) only with
    the setting on, and its photos are normalised on read like local ones."""
    buckets = Buckets()
    heic, big = SOURCES["heic"](), big_jpeg()
    buckets.put("s3://b/a.heic", heic)
    buckets.put("s3://b/big.jpg", big)

    def remote(*, convert: bool) -> RemoteImageSource:
        limit = 64 * 1024 * 1024 if convert else LIMIT
        return RemoteImageSource(
            max_bytes=limit, stores=buckets, retries=default_retry_policy(), convert=convert
        )

    plain = await remote(convert=False).check_many(["s3://b/a.heic", "s3://b/big.jpg"])
    assert [p.reason for p in plain if isinstance(p, ImageProblem)] == [
        Reason.IMAGE_NOT_JPEG_OR_PNG,
        Reason.IMAGE_TOO_LARGE,
    ]
    assert all(isinstance(p, ImageProblem) and "--normalize" in p.message for p in plain)
    source = NormalizingImageSource(remote(convert=True), max_bytes=LIMIT)
    found = await source.check_many(["s3://b/a.heic", "s3://b/big.jpg"])
    photos = [await source.read(f) for f in found if isinstance(f, Fingerprint)]
    assert len(photos) == 2
    assert photos[0].note == "converted from HEIC; metadata removed" and upright(photos[0].data)
    assert photos[1].note.startswith("scaled 3200x2400 → ") and len(photos[1].data) <= LIMIT
    assert photos[0].sha256 == hashlib.sha256(heic).hexdigest()  # the source's digest: what the ledger pins


@settings(max_examples=40, deadline=None)
@given(
    width=st.integers(8, 96),
    height=st.integers(8, 96),
    progressive=st.booleans(),
    tagged=st.booleans(),
    comment=st.binary(max_size=40),
    trailing=st.binary(max_size=300),
    seed=st.integers(0, 2**16),
)
def test_an_upright_jpeg_loses_exactly_its_metadata_and_tail_and_keeps_every_pixel(
    width: int, height: int, progressive: bool, tagged: bool, comment: bytes, trailing: bytes, seed: int
) -> None:
    rng = random.Random(seed)
    image = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
    options: dict[str, Any] = {"quality": 85, "progressive": progressive}
    if tagged:
        options["exif"] = exif()
    if comment:
        options["comment"] = comment
    photo = encoded(image, "JPEG", **options)
    done = normalize(photo + trailing, "p", LIMIT)
    with Image.open(io.BytesIO(done.data)) as a, Image.open(io.BytesIO(photo)) as b:
        assert a.tobytes() == b.tobytes()
        assert "comment" not in a.info and not a.getexif()
    assert done.data.endswith(b"\xff\xd9") and len(done.data) <= len(photo)
    assert (done.data == photo + trailing) == (not (tagged or comment or trailing))  # untouched only if clean

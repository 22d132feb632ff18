"""The image checks: the content sniff on bytes, and LocalImageSource on real files, links, FIFOs and swaps."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import socket
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backfill.images import Fingerprint, ImageError, ImageProblem
from backfill.images.content import (
    WHOLE,
    Format,
    Span,
    Verdict,
    examine,
    examine_bytes,
    problem,
    run,
    run_async,
    run_sampled,
    sample_in,
)
from backfill.images.local import INLINE_READ_MAX, LocalImageSource
from backfill.vocab import Reason
from benchmarks.data import tiny_png

from .conftest import png_bytes

LIMIT = 5 * 1024 * 1024

# --- building JPEGs: real segment structure, fake pixels -------------------------------------------------

SOI, EOI = b"\xff\xd8", b"\xff\xd9"
XMP_ID = b"http://ns.adobe.com/xap/1.0/\x00"


def segment(marker: int, payload: bytes) -> bytes:
    return bytes((0xFF, marker)) + struct.pack(">H", len(payload) + 2) + payload


APP0 = segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
SOF0 = segment(0xC0, b"\x08\x00\x10\x00\x10\x01\x01\x11\x00")  # 16x16, one component
DHT = segment(0xC4, b"\x00" + bytes((0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0)) + bytes(range(12)))
SOS = segment(0xDA, b"\x01\x01\x00\x00\x3f\x00")


def stuffed(raw: bytes) -> bytes:
    """Entropy-coded data as an encoder writes it: every FF followed by 00."""
    return raw.replace(b"\xff", b"\xff\x00")


def jpeg(
    scans: list[bytes] | None = None,
    *,
    dqt: bytes = bytes(range(64)),
    before: bytes = b"",
    restart_every: int = 0,
) -> bytes:
    """SOI, APP0, `before` (more APPn segments), DQT, SOF0, DHT, then each scan (a DHT between scans, as in a
    progressive JPEG) and EOI. `restart_every` > 0 puts a restart marker after every that many raw bytes."""
    out = [SOI, APP0, before, segment(0xDB, b"\x00" + dqt), SOF0, DHT]
    for i, raw in enumerate(scans if scans is not None else [b"\x12\x34\xff\x56" * 8]):
        if i:
            out.append(DHT)
        out.append(SOS)
        if restart_every:
            parts = [raw[at : at + restart_every] for at in range(0, len(raw), restart_every)]
            out.append(b"".join(stuffed(p) + bytes((0xFF, 0xD0 + n % 8)) for n, p in enumerate(parts)))
        else:
            out.append(stuffed(raw))
    out.append(EOI)
    return b"".join(out)


def exif_with_thumbnail(thumbnail: bytes) -> bytes:
    """An APP1 EXIF segment carrying a whole JPEG (with its own FF D9), as cameras write."""
    return segment(0xE1, b"Exif\x00\x00MM\x00*\x00\x00\x00\x08" + thumbnail)


def xmp(body: str) -> bytes:
    packet = f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description {body}/></rdf:RDF></x:xmpmeta>'
    return segment(0xE1, XMP_ID + packet.encode())


def micro_video(offset: int) -> bytes:
    return xmp(f'GCamera:MicroVideo="1" GCamera:MicroVideoVersion="1" GCamera:MicroVideoOffset="{offset}"')


def container(video_length: int) -> bytes:
    return segment(
        0xE1,
        XMP_ID
        + (
            '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description Camera:MotionPhoto="1">'
            "<Container:Directory><rdf:Seq>"
            '<rdf:li rdf:parseType="Resource"><Container:Item Item:Mime="image/jpeg" Item:Semantic="Primary"'
            ' Item:Length="0" Item:Padding="0"/></rdf:li>'
            '<rdf:li rdf:parseType="Resource"><Container:Item Item:Mime="video/mp4" Item:Semantic="MotionPhoto"'
            f' Item:Length="{video_length}" Item:Padding="0"/></rdf:li>'
            "</rdf:Seq></Container:Directory></rdf:Description></rdf:RDF></x:xmpmeta>"
        ).encode(),
    )


def fake_mp4(size: int = 200_000) -> bytes:
    """Video-like bytes with no FF D9 in them, so only the JPEG's own end marker can be found."""
    body = bytes(i % 255 for i in range(size - 32))
    return (
        b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom"
        + struct.pack(">I", len(body) + 8)
        + b"mdat"
        + body
    )


BIG_SCAN = bytes((i * 7 + 3) % 256 for i in range(100_000))  # pushes the end marker far from the head


def counted(data: bytes) -> tuple[Verdict, list[Span]]:
    """The verdict on `data`, and every read it took."""
    reads: list[Span] = []

    def read_at(offset: int, length: int) -> bytes:
        assert 0 <= offset < len(data) and length >= 1 and offset + length <= len(data)
        reads.append(Span(offset, length))
        return data[offset : offset + length]

    return run(examine(len(data)), read_at), reads


def complete(data: bytes) -> bool:
    verdict = examine_bytes(data)
    assert verdict.format is not None
    return verdict.complete


PNG = png_bytes(1)


def chunky_png(chunks: int, chunk_size: int = 4000) -> bytes:
    """A PNG's chunk structure with several big IDAT chunks (their contents not really compressed pixels)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    idat = b"".join(
        chunk(b"IDAT", bytes((i * 31 + n) % 256 for i in range(chunk_size))) for n in range(chunks)
    )
    return PNG[:33] + idat + chunk(b"IEND", b"")


# --- the content sniff ----------------------------------------------------------------------------------


def test_whole_jpeg_and_png_are_complete() -> None:
    assert examine_bytes(jpeg()) == Verdict(format=Format.JPEG, complete=True)
    assert examine_bytes(PNG) == Verdict(format=Format.PNG, complete=True)


def test_common_case_is_one_head_and_one_tail_read() -> None:
    data = jpeg([BIG_SCAN])
    verdict, reads = counted(data)
    assert verdict.complete and len(reads) == 2 and sum(r.length for r in reads) <= 8192


@pytest.mark.parametrize("hint", ["micro_video", "container"])
def test_motion_photo_with_a_hint_is_complete_in_a_few_small_reads(hint: str) -> None:
    video = fake_mp4()
    data = jpeg(
        [BIG_SCAN], before=micro_video(len(video)) if hint == "micro_video" else container(len(video))
    )
    data += video
    verdict, reads = counted(data)
    assert verdict == Verdict(format=Format.JPEG, complete=True)
    assert sum(r.length for r in reads) < 8192  # head, tail, and a look just before where the video starts


def test_motion_photo_without_a_hint_is_complete_and_the_scan_stops_at_the_end_marker() -> None:
    data = jpeg([BIG_SCAN]) + fake_mp4()
    verdict, reads = counted(data)
    assert verdict.complete
    assert sum(r.length for r in reads) < len(data) - 50_000  # most of the video is never read


def test_a_wrong_hint_falls_back_to_the_scan() -> None:
    video = fake_mp4()
    assert complete(jpeg([BIG_SCAN], before=micro_video(len(video) + 5000)) + video)
    assert not complete((jpeg([BIG_SCAN], before=micro_video(len(video))) + video)[:50_000])


def test_zero_padding_after_the_end_marker_is_complete() -> None:
    assert complete(jpeg() + b"\x00" * 900)
    assert complete(jpeg() + b"\x00" * 50_000)  # far from the tail: found by the scan
    assert complete(jpeg([BIG_SCAN]) + b"\x00" * 300_000)


def test_a_jpeg_cut_short_is_truncated_even_with_a_thumbnail_end_marker_in_its_tail() -> None:
    thumbnail = jpeg()
    assert thumbnail.endswith(EOI)
    whole = jpeg([BIG_SCAN], before=exif_with_thumbnail(thumbnail))
    assert complete(whole)
    thumb_end = whole.index(thumbnail) + len(thumbnail)
    for cut in (thumb_end, thumb_end + 1, thumb_end + 200, thumb_end + 1500, len(whole) // 2, len(whole) - 1):
        assert not complete(whole[:cut]), cut
    # The old test case: an EXIF block holding a whole photo, then a few of the photo's own headers.
    assert not complete(SOI + exif_with_thumbnail(thumbnail) + thumbnail[2:60])


def test_progressive_jpeg_with_several_scans() -> None:
    data = jpeg([BIG_SCAN[:30_000], BIG_SCAN[30_000:70_000], BIG_SCAN[70_000:]])
    assert data.count(SOS) == 3
    assert complete(data) and complete(data + b"\x00" * 5000) and complete(data + fake_mp4())
    second = data.index(SOS, data.index(SOS) + 1)
    for cut in (second - 3, second + 5, second + 20_000, len(data) - 2):
        assert not complete(data[:cut]), cut


def test_restart_markers_and_fill_bytes() -> None:
    data = jpeg([BIG_SCAN[:5000]], restart_every=100)
    assert complete(data) and complete(data[:-2] + b"\xff\xff\xff" + EOI + b"\x00" * 3000)
    assert not complete(data[:-2]) and not complete(data[:2000])


def test_header_end_markers_before_the_first_scan_do_not_count() -> None:
    # Quantization values may well be FF D9; they are table data, not a marker.
    data = jpeg([BIG_SCAN[:3000]], dqt=(b"\xff\xd9" * 32))
    assert complete(data) and not complete(data[:-2]) and not complete(data[: data.index(SOS) + 4])


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\xff\xd8\xff", False),  # the signature only
        (b"\xff\xd8\xff\xd9", True),  # an end marker before any scan: nothing there to have been cut
        (b"\xff\xd8\xff\xe0" + b"\x01" * 294 + EOI, True),  # garbage headers: searched like a decoder would
        (b"\xff\xd8\xff\xe0" + b"\x01" * 294 + EOI + b"\x00" * 2000, True),
        (b"\xff\xd8\xff\xe0" + b"\x01" * 296, False),
        (b"\xff\xd8\xff\xe0\x00\x00" + b"\x00" * 20_000 + EOI, True),  # like a sparse file with both markers
    ],
)
def test_odd_jpegs(data: bytes, expected: bool) -> None:
    assert complete(data) is expected


def test_png_complete_cut_and_with_data_after_iend() -> None:
    assert complete(PNG) and complete(PNG + b"trailing junk") and complete(PNG + os.urandom(5000))
    assert not complete(PNG[:-12]) and not complete(PNG[:-1]) and not complete(PNG[:-12] + b"\x00" * 5000)
    assert not complete(PNG[:20])
    big = chunky_png(5)  # over WHOLE: a head and a tail read, then the walk
    assert len(big) > 8192 and complete(big) and complete(big + b"\x01" * 10_000) and not complete(big[:-12])


def test_the_walk_reads_chunk_headers_not_chunk_data() -> None:
    data = chunky_png(40) + b"\x01" * 100_000
    verdict, reads = counted(data)
    assert verdict.complete and sum(r.length for r in reads) < 20_000


@pytest.mark.parametrize(
    ("data", "looks_like"),
    [
        (b"just some notes\n", "text"),
        (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00;", "GIF"),
        (b"RIFF\x10\x00\x00\x00WEBPVP8 ", "WebP"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00", "HEIC"),
        (b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00", "video"),
        (b"<!DOCTYPE html><html>404</html>", "HTML"),
        (b"%PDF-1.7\n", "PDF"),
        (b"\x89PNX\r\n\x1a\n" + b"\x00" * 20, "bytes 89 50 4e 58"),
        (b"\xff\xd8\x00", "damaged"),
        (b"\x89PNG", "bytes 89 50 4e 47"),
    ],
)
def test_not_jpeg_or_png(data: bytes, looks_like: str) -> None:
    verdict = examine_bytes(data)
    assert verdict.format is None and not verdict.complete and looks_like in verdict.looks_like
    found = problem(verdict, "'x.jpg'")
    assert found is not None and found.reason is Reason.IMAGE_NOT_JPEG_OR_PNG
    assert "'x.jpg'" in found.message and "convert it to JPEG or PNG" in found.message
    # What --normalize would convert names the flag, and passes with it on.
    convertible = looks_like in ("GIF", "WebP", "HEIC")
    assert ("--normalize" in found.message) is convertible
    assert (problem(verdict, "'x.jpg'", convert=True) is None) is convertible


def test_problem_messages() -> None:
    assert problem(examine_bytes(jpeg()), "'a.jpg'") is None
    cut = problem(examine_bytes(jpeg()[:-2]), "'a.jpg'")
    assert cut == ImageProblem(
        reason=Reason.IMAGE_TRUNCATED,
        message="image 'a.jpg' is a JPEG without its end marker (FF D9): the file was cut short; copy or export "
        "it again",
    )
    png_cut = problem(examine_bytes(PNG[:-12]), "'a.png'")
    assert png_cut is not None and png_cut.reason is Reason.IMAGE_TRUNCATED and "IEND" in png_cut.message


def test_a_file_shorter_than_its_size_said_ends_where_it_ends() -> None:
    data = jpeg([BIG_SCAN])
    short = data[:40_000]
    verdict = run(examine(len(data)), lambda offset, length: short[offset : offset + length])
    assert verdict == Verdict(format=Format.JPEG, complete=False)


async def test_async_driver_agrees_and_asks_for_head_and_tail_together() -> None:
    video = fake_mp4()
    in_flight = most = 0

    async def read_at(offset: int, length: int) -> bytes:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0)
        in_flight -= 1
        return data[offset : offset + length]

    for data in (
        jpeg([BIG_SCAN], before=micro_video(len(video))) + video,
        jpeg([BIG_SCAN]) + video,
        (jpeg([BIG_SCAN]) + video)[:70_000],
        PNG[:-12],
    ):
        assert (await run_async(examine(len(data)), read_at))[0] == examine_bytes(data)
    assert most == 2  # the head and tail reads were in flight together


# --- properties -------------------------------------------------------------------------------------------

raw_scan = st.binary(min_size=0, max_size=3000)


@st.composite
def jpegs(draw: st.DrawFn) -> bytes:
    scans = draw(st.lists(raw_scan, min_size=1, max_size=3))
    thumbnail = draw(st.booleans())
    before = exif_with_thumbnail(jpeg([draw(raw_scan)])) if thumbnail else b""
    return jpeg(
        scans,
        dqt=draw(st.binary(min_size=64, max_size=64)),
        before=before,
        restart_every=draw(st.sampled_from([0, 0, 7, 300])),
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(jpegs(), st.one_of(st.binary(max_size=5000), st.integers(1, 20_000).map(lambda n: b"\x00" * n)))
def test_anything_after_a_complete_jpeg_keeps_it_complete(data: bytes, after: bytes) -> None:
    assert complete(data) and complete(data + after)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(jpegs(), st.data())
def test_a_jpeg_cut_before_its_end_marker_is_truncated(data: bytes, draw: st.DataObject) -> None:
    cut = draw.draw(st.integers(3, len(data) - 1))
    assert examine_bytes(data[:cut]) == Verdict(format=Format.JPEG, complete=False)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 255), st.binary(max_size=3000), st.data())
def test_png_cut_or_extended(seed: int, after: bytes, draw: st.DataObject) -> None:
    data = png_bytes(seed, size=draw.draw(st.integers(1, 40)))
    assert complete(data + after)
    cut = draw.draw(st.integers(8, len(data) - 1))
    assert not complete(data[:cut])


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b""]), st.binary(max_size=20_000))
def test_any_bytes_get_a_verdict(start: bytes, rest: bytes) -> None:
    verdict = examine_bytes(start + rest)
    assert isinstance(verdict, Verdict)


# --- LocalImageSource: checks -------------------------------------------------------------------------------


class CountingExecutor(ThreadPoolExecutor):
    """Counts the thread hops."""

    def __init__(self) -> None:
        super().__init__(max_workers=2)
        self.hops = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.hops += 1
        return super().submit(fn, *args, **kwargs)


@pytest.fixture
def executor() -> Iterator[CountingExecutor]:
    pool = CountingExecutor()
    yield pool
    pool.shutdown()


def source(
    base: Path, *, root: Path | None = None, max_bytes: int = LIMIT, executor: CountingExecutor | None = None
) -> LocalImageSource:
    return LocalImageSource(base=base, root=root, max_bytes=max_bytes, executor=executor)


def put(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


async def check(src: LocalImageSource, raw: str) -> Fingerprint | ImageProblem:
    (found,) = await src.check_many([raw])
    return found


async def reject(src: LocalImageSource, raw: str, reason: Reason, *fragments: str) -> str:
    found = await check(src, raw)
    assert isinstance(found, ImageProblem), found
    assert found.reason is reason, found
    assert repr(raw) in found.message, found.message  # the path, as the manifest has it
    assert ": " in found.message  # and then what to do
    for fragment in fragments:
        assert fragment in found.message, found.message
    return found.message


async def test_a_good_photo_has_its_real_path_size_and_mtime(tmp_path: Path) -> None:
    path = put(tmp_path / "photos" / "a.jpg", jpeg())
    found = await check(source(tmp_path), "photos/a.jpg")
    st_ = path.stat()
    assert found == Fingerprint(ref=str(path.resolve()), size=st_.st_size, version=str(st_.st_mtime_ns))
    assert await check(source(tmp_path / "elsewhere"), str(path)) == found  # an absolute path ignores base


async def test_every_reason(tmp_path: Path) -> None:
    src = source(tmp_path, root=tmp_path / "photos", max_bytes=10_000)
    put(tmp_path / "photos" / "ok.png", PNG)
    put(tmp_path / "out.png", PNG)
    put(tmp_path / "photos" / "empty.jpg", b"")
    put(tmp_path / "photos" / "big.jpg", jpeg([BIG_SCAN[:20_000]]))
    put(tmp_path / "photos" / "gif.png", b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00;")
    put(tmp_path / "photos" / "cut.jpg", jpeg()[:-2])
    put(tmp_path / "photos" / "cut.png", PNG[:-12])
    (tmp_path / "photos" / "folder").mkdir()
    os.mkfifo(tmp_path / "photos" / "fifo")
    assert isinstance(await check(src, "photos/ok.png"), Fingerprint)
    await reject(src, "out.png", Reason.PATH_OUTSIDE_ROOT, "outside images_root", "move the photo")
    await reject(src, "photos/nope.png", Reason.IMAGE_MISSING, "doesn't exist: check the path")
    await reject(src, "photos/folder", Reason.IMAGE_NOT_FILE, "is a folder, not a file: point to the photo")
    await reject(src, "photos/fifo", Reason.IMAGE_NOT_FILE, "named pipe (FIFO), not a file")
    await reject(src, "photos/empty.jpg", Reason.IMAGE_EMPTY, "empty (0 bytes): export the photo again")
    await reject(src, "photos/big.jpg", Reason.IMAGE_TOO_LARGE, "over the limit of 10,000 bytes", "resize")
    await reject(src, "photos/gif.png", Reason.IMAGE_NOT_JPEG_OR_PNG, "looks like a GIF", "convert it")
    await reject(src, "photos/cut.jpg", Reason.IMAGE_TRUNCATED, "FF D9", "copy or export it again")
    await reject(src, "photos/cut.png", Reason.IMAGE_TRUNCATED, "IEND", "copy or export it again")


async def test_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    put(tmp_path / "locked.png", PNG)
    put(tmp_path / "eio.png", PNG)
    real_open = os.open

    def refuse(path: str, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith("locked.png"):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        if str(path).endswith("eio.png"):
            raise OSError(errno.EIO, "Input/output error", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    src = source(tmp_path)
    await reject(
        src, "locked.png", Reason.IMAGE_UNREADABLE, "permission denied", "let the user running backfill"
    )
    await reject(src, "eio.png", Reason.IMAGE_UNREADABLE, "Input/output error", "check the file and the disk")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads everything")
async def test_unreadable_for_real(tmp_path: Path) -> None:
    put(tmp_path / "locked.png", PNG).chmod(0)
    put(tmp_path / "closed" / "a.png", PNG)
    (tmp_path / "closed").chmod(0)
    try:
        found = await source(tmp_path).check_many(["locked.png", "closed/a.png"])
        assert [f.reason for f in found if isinstance(f, ImageProblem)] == [Reason.IMAGE_UNREADABLE] * 2
    finally:
        (tmp_path / "closed").chmod(0o700)


async def test_paths_that_lead_nowhere(tmp_path: Path) -> None:
    put(tmp_path / "file.png", PNG)
    (tmp_path / "broken.png").symlink_to(tmp_path / "gone.png")
    (tmp_path / "loop1.png").symlink_to(tmp_path / "loop2.png")
    (tmp_path / "loop2.png").symlink_to(tmp_path / "loop1.png")
    src = source(tmp_path)
    await reject(src, "broken.png", Reason.IMAGE_MISSING, "symbolic link to", "gone.png", "fix the link")
    await reject(src, "loop1.png", Reason.IMAGE_MISSING, "symbolic link that loops: point it at the photo")
    await reject(src, "file.png/inside.png", Reason.IMAGE_MISSING, "doesn't exist")
    await reject(src, "x" * 300 + ".png", Reason.IMAGE_MISSING, "doesn't exist")
    await reject(src, " file.png", Reason.IMAGE_MISSING, "spaces around the path")
    await reject(src, "file.png ", Reason.IMAGE_MISSING, "spaces around the path")
    message = await reject(src, "nope.png", Reason.IMAGE_MISSING, "relative to the manifest's folder")
    assert str(tmp_path) in message
    found = await check(src, "file.png\x00.jpg")
    assert isinstance(found, ImageProblem) and found.reason is Reason.IMAGE_MISSING and "NUL" in found.message


async def test_devices_and_sockets_are_not_files(tmp_path: Path) -> None:
    (tmp_path / "ln_null.jpg").symlink_to("/dev/null")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    sock.close()
    src = source(tmp_path)
    await reject(src, "/dev/null", Reason.IMAGE_NOT_FILE, "a device")
    await reject(src, "ln_null.jpg", Reason.IMAGE_NOT_FILE, "a device")
    await reject(src, "sock", Reason.IMAGE_NOT_FILE, "a socket")
    await reject(src, ".", Reason.IMAGE_NOT_FILE, "a folder")


async def test_symbolic_links_count_where_they_point(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    inside = put(root / "in.png", PNG)
    put(tmp_path / "out.png", PNG)
    put(tmp_path / "photos-evil" / "x.png", PNG)
    (root / "link-in.png").symlink_to("in.png")
    (root / "link-out.png").symlink_to("../out.png")
    (tmp_path / "into-root.png").symlink_to(root / "in.png")
    (tmp_path / "album").symlink_to(root)
    src = source(tmp_path, root=root)
    for raw in ("photos/link-in.png", "into-root.png", "album/in.png", "photos/../photos/in.png"):
        found = await check(src, raw)
        assert isinstance(found, Fingerprint) and found.ref == str(inside.resolve()), raw
    await reject(src, "photos/link-out.png", Reason.PATH_OUTSIDE_ROOT, str(tmp_path / "out.png"))
    await reject(src, "photos/../out.png", Reason.PATH_OUTSIDE_ROOT)
    await reject(
        src, "photos-evil/x.png", Reason.PATH_OUTSIDE_ROOT
    )  # a sibling whose name starts like root's


async def test_size_limit_is_inclusive(tmp_path: Path) -> None:
    exact = jpeg([BIG_SCAN[:4000]])
    put(tmp_path / "exact.jpg", exact)
    put(tmp_path / "over.jpg", exact + b"\x00")
    src = source(tmp_path, max_bytes=len(exact))
    assert isinstance(await check(src, "exact.jpg"), Fingerprint)
    await reject(
        src, "over.jpg", Reason.IMAGE_TOO_LARGE, f"{len(exact) + 1:,} bytes", f"{len(exact):,} bytes"
    )


async def test_motion_photos_and_padding_pass(tmp_path: Path) -> None:
    video = fake_mp4()
    put(tmp_path / "hinted.jpg", jpeg([BIG_SCAN], before=micro_video(len(video))) + video)
    put(tmp_path / "plain.jpg", jpeg([BIG_SCAN]) + video)
    put(tmp_path / "padded.jpg", jpeg() + b"\x00" * 10_000)
    put(tmp_path / "cut.jpg", (jpeg([BIG_SCAN]) + video)[:60_000])
    found = await source(tmp_path).check_many(["hinted.jpg", "plain.jpg", "padded.jpg", "cut.jpg"])
    assert [type(f) for f in found[:3]] == [Fingerprint] * 3
    assert isinstance(found[3], ImageProblem) and found[3].reason is Reason.IMAGE_TRUNCATED


async def test_one_thread_hop_per_batch(tmp_path: Path, executor: CountingExecutor) -> None:
    names = [put(tmp_path / f"{i}.png", png_bytes(i)).name for i in range(50)]
    src = source(tmp_path, executor=executor)
    assert await src.check_many([]) == [] and executor.hops == 0
    found = await src.check_many([*names, "nope.png"])
    assert executor.hops == 1 and len(found) == 51 and isinstance(found[-1], ImageProblem)
    assert [f.ref for f in found[:50] if isinstance(f, Fingerprint)] == [str(tmp_path / n) for n in names]
    await src.fingerprint_many(names)
    assert executor.hops == 2


async def test_fingerprints_come_from_metadata_alone(tmp_path: Path) -> None:
    path = put(tmp_path / "cut.jpg", jpeg()[:-2])  # content is not looked at
    (tmp_path / "folder").mkdir()
    src = source(tmp_path)
    before, folder, missing = await src.fingerprint_many(["cut.jpg", "folder", "nope.jpg"])
    assert isinstance(before, Fingerprint) and before.size == path.stat().st_size
    assert isinstance(folder, ImageProblem) and folder.reason is Reason.IMAGE_NOT_FILE
    assert isinstance(missing, ImageProblem) and missing.reason is Reason.IMAGE_MISSING
    mtime = path.stat().st_mtime_ns
    path.write_bytes(jpeg()[:-3])  # another size
    (changed,) = await src.fingerprint_many(["cut.jpg"])
    assert isinstance(changed, Fingerprint) and changed != before and changed.ref == before.ref
    os.utime(path, ns=(mtime + 1_000_000, mtime + 1_000_000))
    path.write_bytes(jpeg()[:-2])  # the same size as at first: only the mtime tells
    os.utime(path, ns=(mtime + 7_000_000, mtime + 7_000_000))
    (touched,) = await src.fingerprint_many(["cut.jpg"])
    assert isinstance(touched, Fingerprint) and touched.size == before.size and touched != before


# --- LocalImageSource: reading ------------------------------------------------------------------------------


async def checked(src: LocalImageSource, raw: str) -> Fingerprint:
    found = await check(src, raw)
    assert isinstance(found, Fingerprint), found
    return found


async def read_problem(src: LocalImageSource, fingerprint: Fingerprint) -> ImageProblem:
    with pytest.raises(ImageError) as caught:
        await asyncio.wait_for(src.read(fingerprint), 2)
    assert (
        fingerprint.ref in caught.value.problem.message and str(caught.value) == caught.value.problem.message
    )
    return caught.value.problem


async def test_read_returns_the_exact_bytes_their_hash_and_fingerprint(tmp_path: Path) -> None:
    data = jpeg()
    put(tmp_path / "a.jpg", data)
    src = source(tmp_path)
    fingerprint = await checked(src, "a.jpg")
    photo = await src.read(fingerprint)
    assert photo.data == data and photo.sha256 == hashlib.sha256(data).hexdigest()
    assert photo.fingerprint == fingerprint


async def test_small_reads_stay_on_the_loop_big_ones_go_to_the_executor(
    tmp_path: Path, executor: CountingExecutor
) -> None:
    small = jpeg([BIG_SCAN[: INLINE_READ_MAX // 2]])
    big = jpeg([BIG_SCAN] * 4) + fake_mp4(INLINE_READ_MAX)
    put(tmp_path / "small.jpg", small)
    put(tmp_path / "big.jpg", big)
    src = source(tmp_path, executor=executor)
    small_fp, big_fp = await src.check_many(["small.jpg", "big.jpg"])
    assert isinstance(small_fp, Fingerprint) and isinstance(big_fp, Fingerprint) and executor.hops == 1
    assert (await src.read(small_fp)).data == small and executor.hops == 1
    photo = await src.read(big_fp)
    assert photo.data == big and photo.sha256 == hashlib.sha256(big).hexdigest() and executor.hops == 2


async def test_a_fifo_swapped_in_is_refused_without_hanging(tmp_path: Path) -> None:
    path = put(tmp_path / "a.jpg", jpeg())
    src = source(tmp_path)
    fingerprint = await checked(src, "a.jpg")
    path.unlink()
    os.mkfifo(path)
    found = await read_problem(src, fingerprint)
    assert (
        found.reason is Reason.IMAGE_NOT_FILE
        and "FIFO" in found.message
        and "put the photo back" in found.message
    )


async def test_a_folder_or_link_swapped_in_is_refused(tmp_path: Path) -> None:
    path = put(tmp_path / "a.jpg", jpeg())
    put(tmp_path / "other.jpg", jpeg([b"other"]))
    src = source(tmp_path)
    fingerprint = await checked(src, "a.jpg")
    path.unlink()
    path.mkdir()
    found = await read_problem(src, fingerprint)
    assert found.reason is Reason.IMAGE_NOT_FILE and "folder" in found.message
    path.rmdir()
    path.symlink_to(tmp_path / "other.jpg")  # never followed: it could lead anywhere, out of images_root too
    found = await read_problem(src, fingerprint)
    assert found.reason is Reason.IMAGE_NOT_FILE and "symbolic link" in found.message


async def test_a_device_is_refused_at_read(tmp_path: Path) -> None:
    found = await read_problem(source(tmp_path), Fingerprint(ref="/dev/zero", size=1, version="0"))
    assert found.reason is Reason.IMAGE_NOT_FILE and "device" in found.message


async def test_a_file_that_grew_past_the_limit_is_refused_at_read(tmp_path: Path) -> None:
    data = jpeg()
    path = put(tmp_path / "a.jpg", data)
    src = source(tmp_path, max_bytes=len(data))
    fingerprint = await checked(src, "a.jpg")
    path.write_bytes(data + b"\x00")
    found = await read_problem(src, fingerprint)
    assert found.reason is Reason.IMAGE_TOO_LARGE and f"{len(data) + 1:,} bytes" in found.message


async def test_a_file_emptied_removed_or_replaced_is_refused_at_read(tmp_path: Path) -> None:
    path = put(tmp_path / "a.jpg", jpeg())
    src = source(tmp_path)
    fingerprint = await checked(src, "a.jpg")
    path.write_bytes(b"")
    assert (await read_problem(src, fingerprint)).reason is Reason.IMAGE_EMPTY
    path.write_bytes(b"<html>oops</html>")
    found = await read_problem(src, fingerprint)
    assert found.reason is Reason.IMAGE_NOT_JPEG_OR_PNG and "HTML" in found.message
    path.unlink()
    found = await read_problem(src, fingerprint)
    assert found.reason is Reason.IMAGE_MISSING and "no longer exists" in found.message


async def test_a_changed_file_is_read_with_its_new_fingerprint(tmp_path: Path) -> None:
    path = put(tmp_path / "a.jpg", jpeg())
    src = source(tmp_path)
    fingerprint = await checked(src, "a.jpg")
    path.write_bytes(PNG)
    photo = await src.read(fingerprint)
    assert photo.data == PNG and photo.fingerprint != fingerprint and photo.fingerprint.size == len(PNG)


async def test_unreadable_at_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    put(tmp_path / "a.jpg", jpeg())
    src = source(tmp_path)
    fingerprint = await checked(src, "a.jpg")

    def refuse(path: str, *args: Any, **kwargs: Any) -> int:
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(os, "open", refuse)
    found = await read_problem(src, fingerprint)
    assert found.reason is Reason.IMAGE_UNREADABLE and "permission denied" in found.message


async def test_a_file_changing_while_read_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    put(tmp_path / "a.jpg", jpeg())
    src = source(tmp_path)
    fingerprint = await checked(src, "a.jpg")
    real_fstat = os.fstat
    calls = 0

    def later(fd: int) -> os.stat_result:
        nonlocal calls
        calls += 1
        st_ = real_fstat(fd)
        if calls == 1:
            return st_
        fields = list(st_)
        moved = st_.st_mtime_ns + 1_000_000_000
        return os.stat_result((*fields[:8], moved // 10**9, moved // 10**9), {"st_mtime_ns": moved})

    monkeypatch.setattr(os, "fstat", later)
    found = await read_problem(src, fingerprint)
    assert found.reason is Reason.IMAGE_UNREADABLE and "changed while it was being read" in found.message


async def test_a_photo_is_one_read_and_a_short_read_is_read_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that returns the size fstat gave is the whole file (the fstat after it says nothing changed): no
    second read to see the end. One that returns less, as a network share may, is read on to the end, never
    sent cut short."""
    data = jpeg([BIG_SCAN[:5000]])
    put(tmp_path / "a.jpg", data)
    src = source(tmp_path)
    fingerprint = await checked(src, "a.jpg")
    real_read = os.read
    reads: list[int] = []

    def counted(fd: int, n: int) -> bytes:
        reads.append(n)
        return real_read(fd, n)

    monkeypatch.setattr(os, "read", counted)
    assert (await src.read(fingerprint)).data == data and len(reads) == 1

    def short(fd: int, n: int) -> bytes:
        reads.append(n)
        return real_read(fd, min(n, 1000) if len(reads) == 1 else n)

    reads.clear()
    monkeypatch.setattr(os, "read", short)
    photo = await src.read(fingerprint)
    assert photo.data == data and photo.sha256 == hashlib.sha256(data).hexdigest() and len(reads) > 1


# --- the sample (content.sample_of): what the shared-photo census and the ledger compare ---


@given(st.binary(min_size=1, max_size=3 * WHOLE))
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_the_sample_of_whole_bytes_is_the_one_their_check_takes(data: bytes) -> None:
    """`sample_in` (a photo read whole, at send time) and a check's head and tail reads agree at every size,
    around WHOLE (one read) and past it (a head and a tail, overlapping or not)."""
    _, sampled = run_sampled(examine(len(data)), lambda offset, length: data[offset : offset + length])
    assert sampled == sample_in(data) != 0


def test_the_sample_is_the_same_in_every_process() -> None:
    """The ledger keeps samples for later runs, on other machines: not Python's hash, which is seeded per
    process."""
    data = bytes(range(256)) * 40
    code = "from backfill.images.content import sample_in; print(sample_in(bytes(range(256)) * 40))"
    seen = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert seen == {str(sample_in(data))}


def test_distinct_pngs_of_one_size_have_distinct_samples() -> None:
    """A PNG's chunks carry their own CRC-32 and Adler-32: a CRC-32 sample, being linear, gave half of the
    benchmark's distinct 1x1 PNGs the sample of another, and the census read them all whole."""
    photos = {tiny_png(i) for i in range(5000)}
    by_size: dict[int, set[int]] = {}
    for data in photos:
        by_size.setdefault(len(data), set()).add(sample_in(data))
    assert sum(len(s) for s in by_size.values()) == len(photos)


async def test_a_photo_rewritten_at_its_size_with_its_mtime_kept_is_read_with_its_own_sample(
    tmp_path: Path,
) -> None:
    """`cp -p` or `rsync -t` over a checked photo: the same size and mtime, other bytes. The read sends these
    bytes (and the ledger pins them): the sample it gives must be theirs, or a later census would look for the
    old photo's."""
    source = LocalImageSource(base=tmp_path, root=None, max_bytes=1 << 20)
    photo = tmp_path / "a.png"
    photo.write_bytes(tiny_png(1))
    (checked,) = await source.check_many(["a.png"])
    assert isinstance(checked, Fingerprint)
    stamp = photo.stat().st_mtime_ns
    photo.write_bytes(tiny_png(2))
    os.utime(photo, ns=(stamp, stamp))
    assert len(tiny_png(1)) == len(tiny_png(2))
    read = await source.read(checked)
    assert read.data == tiny_png(2) and read.fingerprint == checked  # the same version, by its marks
    assert read.fingerprint.sample == sample_in(tiny_png(2)) != checked.sample

"""Whether a photo's bytes are a complete JPEG or PNG, decided from a few ranged reads, whatever stores them."""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

from ..vocab import Reason
from . import ImageProblem

# The check is a structural sniff, not a decode, written once as a generator that asks for byte ranges (it
# yields Spans and is sent their bytes) so that local files, read with pread in a thread, and object storage,
# read with async ranged GETs, share it: `run` drives it synchronously, `run_async` asynchronously.
#
# JPEG: complete means its end marker (EOI, FF D9) is there; anything after it is fine (phones' motion photos
# append an MP4 after it, some encoders pad with zeros). In the entropy-coded data after a scan header (SOS)
# every FF is followed by 00 (stuffing) or D0-D7 (restart markers), so an FF D9 found at or after the first
# scan's data is an end marker, and a file cut before its end marker contains none there. The only FF D9
# before that are inside header segments (an EXIF thumbnail in APP1 is a whole JPEG), so those are skipped by
# their lengths. In order, cheapest first:
#   1. Walk the header segments from the start (FF xx LL LL each) up to the first SOS. The head read usually
#      holds them all; an EXIF block costs one more small read. Running out of file here means it was cut.
#   2. The tail: an FF D9 in the last TAIL bytes, at or after the first scan's data. The common case: one
#      head read and one tail read in all.
#   3. The XMP packet in APP1 may say how long the appended video is (Google's GCamera:MicroVideoOffset, or
#      the Container:Item lengths of the Motion Photo format): look for FF D9 just before it, in a small read.
#   4. Otherwise scan onwards from the first scan's data, in growing blocks, for the next marker: skip each
#      segment by its length (a progressive JPEG has several scans, with tables between them) until the end
#      marker (complete, wherever it is) or the end of the file (cut short). Only a file that is cut short, or
#      has more than TAIL bytes after its end marker and no usable hint, is read this far.
# Where the header walk finds no segment where one should be, it goes on from there as decoders do (searching
# for the next marker); an end marker before any scan (FF D8 FF D9) counts as complete: nothing in it can have
# been cut. Stricter than the old tail-only sniff in one way, on purpose: a header segment whose length runs
# past the end of the file means the file was cut, whatever FF D9 its tail holds (a thumbnail's, typically).
# The one blind spot of step 2: a table segment between two progressive scans that happens to hold FF D9, in
# a file cut within 1 KB after it. Huffman tables can't (no FF in their symbols); quantization tables and
# comments sit before the first scan in practice.
#
# PNG: complete means its IEND chunk is there; anything after it is fine. The tail is looked at first; then
# the chunks are walked from the start (a small read per chunk, their data skipped by length). Only a PNG cut
# short or with more than TAIL bytes after IEND is walked; on object storage that is a GET per chunk, which
# is still fine for so rare a case.
#
# Every read lies within [0, size): the caller passes a size it has already held to its size limit, so no
# check reads past the limit either; the block and segment caps below bound the work on hostile files.

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HEAD = 4096  # one page: a small photo's header segments, and a guess's worth of bytes for the message
TAIL = 1024  # where the end marker of a photo with nothing after it is (encoders pad, but not by much)
WHOLE = 8192  # a file this small is fetched in one read rather than a head and a tail
SAMPLED_HEAD, SAMPLED_TAIL = 256, 256  # of the bytes read first, what `sample_of` digests
# A header-walk read past the head: the segments after an EXIF block are small and close together.
_STEP = 4096
# A PNG-walk read: a chunk header, and any tiny chunks right after it. Kept small because chunks are big
# (IDAT is commonly 8-64 KB), so a bigger read would mostly fetch pixel data the walk skips.
_PNG_STEP = 64
_BLOCK = 64 * 1024  # the first scan read; each next one doubles, up to _BLOCK_MAX (fewer GETs on big files)
_BLOCK_MAX = 1 << 20
_HINT_WINDOW = 256  # slack before a hinted video start, for padding the hint doesn't account for
_MAX_SEGMENTS = 4096  # real JPEGs have tens; past this a hostile file is searched for FF D9 instead of walked
_MAX_CHUNKS = 65_536  # likewise for PNG chunks (5 MB of 12-byte chunks would be 400k Python steps)
_EOI = b"\xff\xd9"
_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # IEND's length, type and CRC, all fixed because it carries no data
_XMP = b"http://ns.adobe.com/xap/1.0/\x00"  # how an APP1 segment holding the XMP packet starts
_SOS = 0xDA
_APP1 = 0xE1
# Markers that have no length: TEM, SOI and the restart markers RST0-7.
_STANDALONE = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})
# A marker in or after entropy-coded data: FF, then anything but 00 (stuffing), D0-D7 (restarts) or FF (fill).
_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_VIDEO_OFFSET = re.compile(rb'MicroVideoOffset\s*=\s*"\s*(\d{1,12})\s*"|MicroVideoOffset>\s*(\d{1,12})\s*<')
_ITEM = re.compile(rb"<(?:[\w.-]+:)?Item\s([^>]*)>")
_ITEM_FIELD = re.compile(rb'\b(?:[\w.-]+:)?(Length|Padding)\s*=\s*"\s*(\d{1,12})\s*"')


class Format(StrEnum):
    JPEG = "JPEG"
    PNG = "PNG"


class Span(NamedTuple):
    """A byte range to read: always within the file, and never empty."""

    offset: int
    length: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """What a photo's bytes say: its format (None: neither JPEG nor PNG) and whether it is whole."""

    format: Format | None
    complete: bool  # False when format is None
    looks_like: str = ""  # when format is None: a guess at what the file is, for the message
    convertible: str = ""  # when format is None: the format --normalize converts it from, if it is one


# Made once: a frozen dataclass costs a microsecond to build, a noticeable part of checking a small photo.
_VERDICTS = {
    (kind, complete): Verdict(format=kind, complete=complete) for kind in Format for complete in (True, False)
}

# Yields the Spans it needs next (several at once where it can, so they may be fetched concurrently), is sent
# their bytes in the same order (short only if the file ends sooner than its size said), returns the Verdict.
Examination = Generator[tuple[Span, ...], Sequence[bytes], Verdict]
_Reads = Generator[tuple[Span, ...], Sequence[bytes], bytes]
_Found = Generator[tuple[Span, ...], Sequence[bytes], bool]


def examine(size: int) -> Examination:
    """The check of a photo of `size` bytes (> 0, already within the size limit): drive it with `run`."""
    if size <= 0:
        return Verdict(format=None, complete=False, looks_like=looks_like(b""))
    cache = _Cache(size)
    if size <= WHOLE:
        (head,) = yield (Span(0, size),)
        cache.pin(0, size, head)
    else:
        head, tail = yield (Span(0, HEAD), Span(size - TAIL, TAIL))
        cache.pin(0, HEAD, head)
        cache.pin(size - TAIL, TAIL, tail)
    kind = sniff(head)
    if kind is None:
        return Verdict(
            format=None, complete=False, looks_like=looks_like(head), convertible=convertible(head) or ""
        )
    complete = yield from (_jpeg(cache) if kind is Format.JPEG else _png(cache))
    return _VERDICTS[kind, complete]


def run(examination: Examination, read_at: Callable[[int, int], bytes]) -> Verdict:
    """Drives an examination with a blocking `read_at(offset, length)`; its errors propagate unchanged."""
    return run_sampled(examination, read_at)[0]


def run_sampled(examination: Examination, read_at: Callable[[int, int], bytes]) -> tuple[Verdict, int]:
    """`run`, and the `sample_of` the bytes it read first (0 if it read none)."""
    sample = 0
    try:
        spans = next(examination)
        got = [read_at(offset, length) for offset, length in spans]
        sample = sample_of(got)
        while True:
            spans = examination.send(got)
            got = [read_at(offset, length) for offset, length in spans]
    except StopIteration as done:
        verdict: Verdict = done.value
        return verdict, sample
    finally:
        examination.close()


async def run_async(
    examination: Examination, read_at: Callable[[int, int], Awaitable[bytes]]
) -> tuple[Verdict, int]:
    """Drives an examination with an async `read_at`; the reads asked for together run concurrently. Returns
    the verdict and the `sample_of` the bytes read first (0 if none)."""
    sample = 0
    try:
        spans = next(examination)
        got = await asyncio.gather(*(read_at(offset, length) for offset, length in spans))
        sample = sample_of(got)
        while True:
            spans = examination.send(got)
            got = await asyncio.gather(*(read_at(offset, length) for offset, length in spans))
    except StopIteration as done:
        verdict: Verdict = done.value
        return verdict, sample
    finally:
        examination.close()


def sample_of(first: Sequence[bytes]) -> int:
    """A cheap digest of what every check reads first, whatever stores the photo: the head and the tail (the
    whole of a small photo), which the size alone decides. Two photos whose sizes or samples differ are
    different photos; equal ones may be the same, which only a digest of the whole can say (the shared-photo
    census, run/shared.py, hashes only those). Never 0, which a Fingerprint holds when nothing was sampled.

    The same on every machine and in every process, since the ledger keeps it (keyed, `PhotoKey.sample`) for the
    census of a later run: so not Python's hash of bytes, which is seeded per process. Nor CRC-32, which is
    linear: a PNG's chunks carry their own CRC-32 and zlib's Adler-32, and the 100,000 distinct 1x1 PNGs of a
    benchmark had 51,294 CRC-32s between them, so the census read most of them whole. SHA-256 (the CPU's own
    instructions where it has them) of the first SAMPLED_HEAD bytes and the last SAMPLED_TAIL: the head says
    what made the photo (its headers, an EXIF date), the tail is the end of its compressed pixels, different in
    any two photos; the size is compared beside it. Over 512 bytes rather than all 5 KB read, it costs about
    what Python's hash of the 5 KB did (1.4 us against 1.15, measured side by side on a busy machine; over 1.5 KB
    it took 2.6, 4% of a validated row)."""
    digest = hashlib.sha256(first[0][:SAMPLED_HEAD])
    digest.update(first[-1][-SAMPLED_TAIL:])
    return int.from_bytes(digest.digest()[:8], "big", signed=True) or 1


def sample_in(data: bytes) -> int:
    """`sample_of` the bytes a check of this whole photo reads first: what `check_many` gives its version."""
    if not data:
        return 0
    if len(data) <= WHOLE:
        return sample_of((data,))
    return sample_of((data[:HEAD], data[len(data) - TAIL :]))


def examine_bytes(data: bytes) -> Verdict:
    """The verdict on photo bytes already in memory."""
    if not data:
        return Verdict(format=None, complete=False, looks_like=looks_like(data))
    return run(examine(len(data)), lambda offset, length: data[offset : offset + length])


def sniff(head: bytes) -> Format | None:
    """The format the first bytes announce, if JPEG or PNG."""
    if head.startswith(JPEG_MAGIC):
        return Format.JPEG
    if head.startswith(PNG_MAGIC):
        return Format.PNG
    return None


def convertible(head: bytes) -> str | None:
    """The format --normalize turns into a JPEG, if the first bytes announce one: HEIC/HEIF, WebP, TIFF, BMP,
    GIF. Its completeness is left to the decoder, at read time."""
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WebP"
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return "HEIC"
    if head.startswith(b"BM"):
        return "BMP"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    return None


_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1")


def problem(verdict: Verdict, name: str, *, convert: bool = False) -> ImageProblem | None:
    """What is wrong with a photo, by its verdict; `name` is how the message names it (e.g. "'a.jpg'").

    `convert` (--normalize): a format it converts passes; the decoder checks it whole when it is read.
    """
    if verdict.format is None:
        if verdict.convertible:
            if convert:
                return None
            return ImageProblem(
                reason=Reason.IMAGE_NOT_JPEG_OR_PNG,
                message=f"image {name} is not a JPEG or PNG ({verdict.looks_like}): run with --normalize "
                "(normalize: true) to convert it in memory, or convert it to JPEG or PNG yourself",
            )
        return ImageProblem(
            reason=Reason.IMAGE_NOT_JPEG_OR_PNG,
            message=f"image {name} is not a JPEG or PNG ({verdict.looks_like}): convert it to JPEG or PNG, the "
            "only formats the API accepts",
        )
    if verdict.complete:
        return None
    what = (
        "a JPEG without its end marker (FF D9)"
        if verdict.format is Format.JPEG
        else "a PNG without its IEND chunk"
    )
    return ImageProblem(
        reason=Reason.IMAGE_TRUNCATED,
        message=f"image {name} is {what}: the file was cut short; copy or export it again",
    )


def looks_like(head: bytes) -> str:
    """A guess at what the file is, from its first bytes, for the reject message."""
    if not head:
        return "it reads as empty"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "it looks like a GIF"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "it looks like a WebP image"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _HEIF_BRANDS:
            return "it looks like a HEIC/HEIF photo, as iPhones take"
        if brand in (b"avif", b"avis"):
            return "it looks like an AVIF image"
        return "it looks like a video or other ISO media file"
    if head.startswith(b"BM"):
        return "it looks like a BMP"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "it looks like a TIFF"
    if head.startswith(b"%PDF"):
        return "it looks like a PDF"
    if head.startswith(b"PK\x03\x04"):
        return "it looks like a ZIP archive or Office document"
    if head.startswith(b"\xff\xd8"):
        return "it starts like a JPEG but is damaged"
    sample = head[:64]
    if all(32 <= b < 127 or b in b"\t\r\n" for b in sample):
        if sample.lstrip().startswith(b"<"):
            return "it looks like HTML or XML text, perhaps an error page saved instead of the photo"
        return "it looks like text"
    return f"it starts with bytes {sample[:8].hex(' ')}"


class _Cache:
    """The bytes read so far: the head and tail for the whole check, plus the latest read (so memory stays
    bounded by one block); a read is only asked for when these don't hold the bytes wanted."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._pieces: list[tuple[int, bytes]] = []  # the pinned ones, then (if any) the latest read
        self._pinned = 0

    def pin(self, offset: int, length: int, data: bytes) -> None:
        """Keeps the bytes read for [offset, offset + length) for the whole check."""
        self._pieces.insert(self._pinned, (offset, data))
        self._pinned += 1
        self._saw(offset, length, data)

    def piece(self, offset: int, length: int) -> tuple[int, bytes] | None:
        """(where it starts, its bytes) of a piece already read that holds [offset, offset + length)."""
        for start, data in self._pieces:
            if start <= offset and offset + length <= start + len(data):
                return start, data
        return None

    def cached(self, offset: int, length: int) -> bytes | None:
        """Bytes [offset, offset + length) (fewer only at the end of the file) if already read, else None.
        Not a generator, unlike `read`, so cheaper where the bytes are most likely there already."""
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        for start, data in self._pieces:
            if start <= offset and end <= start + len(data):
                return data[offset - start : end - start]
        return None

    def read(self, offset: int, length: int, fetch: int) -> _Reads:
        """Bytes [offset, offset + length), fewer only at the end of the file; a missing range is fetched
        with at least `fetch` bytes, so that the next few small reads come from the same one."""
        data = self.cached(offset, length)
        if data is None:
            data = (yield from self._fetch(offset, max(length, fetch)))[:length]
        return data

    def more(self, offset: int, fetch: int, least: int) -> _Reads:
        """Some bytes from `offset` on: what is cached if that is at least `least` bytes (or reaches the end
        of the file), else a fetch of `fetch` bytes; empty at the end."""
        if offset >= self.size:
            return b""
        for start, data in self._pieces:
            if start <= offset and min(offset + least, self.size) <= start + len(data):
                return data[offset - start :]
        return (yield from self._fetch(offset, max(fetch, least)))

    def _fetch(self, offset: int, length: int) -> _Reads:
        span = Span(offset, min(length, self.size - offset))
        (data,) = yield (span,)
        del self._pieces[self._pinned :]
        self._pieces.append((offset, data))
        self._saw(offset, span.length, data)
        return data

    def _saw(self, offset: int, length: int, data: bytes) -> None:
        # A short read means the file is shorter now than its size said (it shrank since): it ends there,
        # which also guarantees that every loop over the file moves on.
        if len(data) < length:
            self.size = min(self.size, offset + len(data))


def _jpeg(cache: _Cache) -> _Found:
    pos = 2  # after SOI
    xmp: list[Span] = []
    segments = 0
    # The walk indexes into the cached piece holding `pos` rather than slicing bytes out for each segment:
    # it is most of the time spent on a small photo, and validation checks tens of thousands a second.
    at, buf = 0, b""
    while True:
        i = pos - at
        if i < 0 or i + 4 > len(buf):
            piece = cache.piece(pos, 4)
            if piece is None:
                seg = yield from cache.read(pos, 4, _STEP)
                if len(seg) < 4:
                    # The file ends here: an end marker before any scan leaves no image data to have been
                    # cut short (FF D8 FF D9 passes, as it always has); anything else means cut in the headers.
                    return seg[:2] == _EOI
                piece = cache.piece(pos, 4)
                assert piece is not None  # the read just made holds it
            at, buf = piece
            i = pos - at
        marker = buf[i + 1]
        if buf[i] != 0xFF or marker == 0xFF or segments >= _MAX_SEGMENTS:
            break  # no segment where one should be (or fill bytes): search onwards from here, as decoders do
        if marker == _EOI[1]:
            return True
        if marker in _STANDALONE:
            pos += 2
            continue
        length = buf[i + 2] << 8 | buf[i + 3]
        if length < 2:
            break
        segments += 1
        if marker == _APP1 and length - 2 > len(_XMP):
            ident = buf[i + 4 : i + 4 + len(_XMP)]
            if len(ident) < len(_XMP):
                ident = yield from cache.read(pos + 4, len(_XMP), _STEP)
            if ident == _XMP:
                xmp.append(Span(pos + 4 + len(_XMP), length - 2 - len(_XMP)))
        pos += 2 + length
        if marker == _SOS:
            break
    if pos >= cache.size:
        return False  # the file ends at or inside the first scan's header
    data_at = pos  # from here on, an FF D9 is an end marker

    tail_at = max(0, cache.size - TAIL)
    tail = cache.cached(tail_at, TAIL)
    if tail is None:  # only if the file shrank since its size was taken
        tail = yield from cache.read(tail_at, TAIL, TAIL)
    found = tail.rfind(_EOI)
    if found >= 0 and tail_at + found >= data_at:
        return True

    for span in xmp:
        packet = yield from cache.read(span.offset, span.length, 0)
        for end in _video_starts(packet, cache.size):
            start = max(data_at, end - _HINT_WINDOW)
            if end <= cache.size and start + 2 <= end:
                window = yield from cache.read(start, end - start, 0)
                if _EOI in window:
                    return True

    return (yield from _scan(cache, data_at))


def _video_starts(packet: bytes, size: int) -> list[int]:
    """Where an XMP packet says the video appended to the photo starts (so the JPEG ends), if it says."""
    starts = []
    for found in _VIDEO_OFFSET.finditer(packet):
        starts.append(size - int(found.group(1) or found.group(2)))
    items = [dict(_ITEM_FIELD.findall(found.group(1))) for found in _ITEM.finditer(packet)]
    if len(items) > 1 and all(b"Length" in item for item in items[1:]):
        # The first item is the primary image; the others follow it in order, each Length bytes long.
        after = sum(int(item[b"Length"]) + int(item.get(b"Padding", b"0")) for item in items[1:])
        starts.append(size - after - int(items[0].get(b"Padding", b"0")))
    return starts


def _scan(cache: _Cache, pos: int) -> _Found:
    """Whether an end marker follows `pos`, skipping each segment met on the way by its length."""
    block = _BLOCK
    segments = 0
    while pos < cache.size:
        data = yield from cache.more(pos, block, 2)
        found = _MARKER.search(data)
        if found is None:
            if pos + len(data) >= cache.size:
                return False
            # Keep a last FF back: the byte after it, in the next block, decides whether it starts a marker.
            pos += len(data) - 1 if data.endswith(b"\xff") else len(data)
            block = min(2 * block, _BLOCK_MAX)
            continue
        at = pos + found.start()
        marker = data[found.start() + 1]
        if marker == _EOI[1]:
            return True
        if marker in _STANDALONE:
            pos = at + 2
            continue
        segments += 1
        if segments > _MAX_SEGMENTS:
            return (yield from _search(cache, at, _EOI))
        seg = yield from cache.read(at + 2, 2, _STEP)
        if len(seg) < 2:
            return False
        length = int.from_bytes(seg)
        pos = at + 2 + (length if length >= 2 else 0)  # a bad length: search on from just after the marker
    return False


def _search(cache: _Cache, pos: int, pattern: bytes) -> _Found:
    """Whether `pattern` occurs at or after `pos`, read in growing blocks."""
    block = _BLOCK
    while pos < cache.size:
        data = yield from cache.more(pos, block, len(pattern))
        if pattern in data:
            return True
        if pos + len(data) >= cache.size:
            return False
        pos += len(data) - len(pattern) + 1  # overlap so that a match across two blocks is seen
        block = min(2 * block, _BLOCK_MAX)
    return False


def _png(cache: _Cache) -> _Found:
    tail_at = max(len(PNG_MAGIC), cache.size - TAIL)
    tail = cache.cached(tail_at, TAIL)
    if tail is None:  # only if the file shrank since its size was taken
        tail = yield from cache.read(tail_at, TAIL, TAIL)
    if _IEND in tail:
        return True
    pos = len(PNG_MAGIC)
    chunks = 0
    while pos + len(_IEND) <= cache.size:  # a chunk is at least its 4-byte length, 4-byte type and 4-byte CRC
        if chunks >= _MAX_CHUNKS:
            return (yield from _search(cache, pos, _IEND))
        header = yield from cache.read(pos, 8, _PNG_STEP)
        if len(header) < 8:
            return False
        kind = header[4:8]
        if kind == b"IEND":
            return True
        if not kind.isalpha():
            return False  # not a chunk: whatever follows, the IEND chunk isn't where it should be
        pos += 12 + int.from_bytes(header[:4])
        chunks += 1
    return False

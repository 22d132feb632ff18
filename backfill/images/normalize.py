"""Opt-in photo normalisation (--normalize): other formats to JPEG, upright, within the size limit, stripped of
metadata; in memory only. The one module that imports Pillow and pillow-heif, and only once the setting is on."""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..vocab import Reason
from . import Fingerprint, ImageError, ImageProblem, ImageSource, Photo, Pinned
from .content import Format, sniff

if TYPE_CHECKING:
    from PIL.Image import Image

QUALITY = 90  # what a re-encoded photo is saved at: well above what face matching needs, far below lossless
# Pixels a photo may have before decoding it is refused: Pillow's own decompression-bomb line (~89 MP), made
# a row's reject rather than a warning or a crash. A 108 MP phone sensor is still a photo: allow twice that.
MAX_PIXELS = 2 * 89_478_485
_FIT_TRIES = 8  # downscales tried to bring a photo under the limit (each aims a little below it)
_SMALLEST_SIDE = 64  # below this a face can't be matched: refuse rather than send a thumbnail
_ORIENTATION = 0x0112
_ROTATION = {3: 180, 6: 90, 8: 270}  # EXIF orientation -> degrees turned clockwise (2, 4, 5, 7 also mirror)
# JPEG segments that carry metadata and nothing a decoder needs: APP1 (EXIF: GPS, camera, time; XMP), APP3-12
# and APP15 (vendors'), APP13 (IPTC captions, Photoshop) and COM (comments). APP0 (JFIF), APP2 (the ICC colour
# profile) and APP14 (Adobe: how the colours were transformed) are kept: dropping them changes the colours.
_JPEG_STRIP = frozenset({0xE1, *range(0xE3, 0xED), 0xED, 0xEF, 0xFE})
# PNG chunks that carry metadata only: text (tEXt, zTXt, iTXt), EXIF (eXIf) and the modification time (tIME).
_PNG_STRIP = frozenset({b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"tIME"})
_PIL: Any = None  # the PIL.Image module, once `load` has run


@dataclass(frozen=True, slots=True, kw_only=True)
class Normalized:
    """The bytes to send and what was done to get them ("" when the photo goes exactly as given)."""

    data: bytes
    note: str


def load() -> None:
    """Imports Pillow and pillow-heif (HEIC/HEIF opener registered); ImportError names what is missing."""
    global _PIL
    if _PIL is not None:
        return
    from PIL import Image, ImageFile
    from pillow_heif import register_heif_opener

    register_heif_opener()
    Image.MAX_IMAGE_PIXELS = None  # its bomb check is MAX_PIXELS below, a row's reject, not a warning
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a cut-short photo is refused, never sent half grey
    _PIL = Image


def normalize(data: bytes, name: str, max_bytes: int) -> Normalized:
    """`data` as the API takes it: JPEG or PNG, upright, no metadata, at most `max_bytes`; or ImageError.

    A JPEG or PNG that is upright and small enough only loses its metadata segments (losslessly: the pixels
    are not decoded); anything else is decoded and encoded as a JPEG, scaled down until it fits.
    """
    load()
    kind = sniff(data)
    try:
        if kind is not None:
            done = _as_given(data, kind, name, max_bytes)
            if done is not None:
                return done
        return _reencode(data, kind, name, max_bytes)
    except ImageError:
        raise
    except _PIL.DecompressionBombError as exc:
        raise ImageError(_too_many_pixels(name, str(exc))) from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, RuntimeError) as exc:
        # What Pillow and libheif raise for a file they can't decode: cut short, damaged, or lying about itself.
        raise ImageError(
            ImageProblem(
                reason=Reason.IMAGE_UNDECODABLE,
                message=f"image {name} can't be decoded ({_said(exc)}): it is damaged or cut short; export the "
                "photo again",
            )
        ) from exc


def _said(exc: BaseException) -> str:
    """The decoder's complaint, without the in-memory buffer's repr Pillow puts in some."""
    return _BUFFER.sub("", str(exc)).strip() or type(exc).__name__


_BUFFER = re.compile(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>")


def _as_given(data: bytes, kind: Format, name: str, max_bytes: int) -> Normalized | None:
    """The JPEG or PNG with its metadata removed, if that is all it needs; None if it must be re-encoded."""
    with _PIL.open(io.BytesIO(data)) as image:
        _check_pixels(image, name)
        if _orientation(image) != 1:
            return None
    found = _strip_jpeg(data) if kind is Format.JPEG else _strip_png(data)
    if found is None:
        return None  # not walkable as its format says: decoding it tells what is wrong, or fixes it
    stripped, said = found
    if len(stripped) > max_bytes:
        return None  # over the limit even without its metadata and its video: it must be scaled down
    return Normalized(data=stripped, note=said)


def _reencode(data: bytes, kind: Format | None, name: str, max_bytes: int) -> Normalized:
    notes: list[str] = []
    with _PIL.open(io.BytesIO(data)) as opened:
        _check_pixels(opened, name)
        source = opened.format or (str(kind) if kind else "image")
        if kind is None or kind is Format.PNG:
            notes.append(f"converted from {_FORMAT_NAMES.get(source, source)}")
        orientation = _orientation(opened)
        # The colour profile is no personal data, and without it a wide-gamut photo (an iPhone's Display P3)
        # would be read as sRGB: duller, and another face to a matcher trained on true colours.
        icc = opened.info.get("icc_profile") or None
        opened.seek(0)  # the first frame of a GIF, a multi-page TIFF or a HEIF collection
        # Turned first, while the file is open: a turn makes a new image, so no copy of `opened` is needed
        # to outlive the `with` (a 12 MP copy cost a fifth more CPU than Pillow alone for a rotated photo).
        turned = _upright(opened, orientation)
        image = _flatten(turned, owned=turned is not opened)
    if orientation != 1:
        notes.append(f"rotated {_ROTATION.get(orientation, 0)}" if orientation in _ROTATION else "mirrored")
    original = image.size
    out = _encode(image, icc)
    tries = 0
    while len(out) > max_bytes:
        tries += 1
        # Bytes grow roughly with pixels: aim each try 10% below the limit, never above the size it was.
        scale = min(0.9, (max_bytes / len(out)) ** 0.5 * 0.9)
        width, height = (max(1, int(side * scale)) for side in image.size)
        if tries > _FIT_TRIES or min(width, height) < _SMALLEST_SIDE:
            raise ImageError(
                ImageProblem(
                    reason=Reason.IMAGE_TOO_LARGE,
                    message=f"image {name} can't be brought under {max_bytes:,} bytes without shrinking it "
                    f"below {_SMALLEST_SIDE} pixels a side: raise max_image_bytes, or export the photo "
                    "smaller",
                )
            )
        image = image.resize((width, height), _PIL.Resampling.LANCZOS, reducing_gap=3.0)
        out = _encode(image, icc)
    if image.size != original:
        notes.append(f"scaled {original[0]}x{original[1]} → {image.size[0]}x{image.size[1]}")
    if kind is Format.JPEG and not notes:
        notes.append("re-encoded")  # a JPEG that could not be walked, decoded and saved again
    notes.append("metadata removed")
    return Normalized(data=out, note="; ".join(notes))


_FORMAT_NAMES = {"HEIF": "HEIC", "WEBP": "WebP", "MPO": "JPEG"}


def _check_pixels(image: Image, name: str) -> None:
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageError(_too_many_pixels(name, f"{width}x{height} pixels"))


def _too_many_pixels(name: str, said: str) -> ImageProblem:
    return ImageProblem(
        reason=Reason.IMAGE_TOO_LARGE,
        message=f"image {name} has too many pixels to decode safely ({said}; the most is {MAX_PIXELS:,}): "
        "export it smaller",
    )


def _orientation(image: Image) -> int:
    try:
        value = image.getexif().get(_ORIENTATION, 1)
    except (OSError, SyntaxError, ValueError, TypeError):  # an EXIF block too damaged to read: as if none
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _flatten(image: Image, *, owned: bool) -> Image:
    """RGB pixels, transparency laid on white (a JPEG has none; black would hide a dark-haired face).
    `owned`: `image` is no opened file's, so it may be returned as it is."""
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        white: Image = _PIL.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    if image.mode == "RGB":
        if owned:
            return image
        image.load()
        return image.copy()
    return image.convert("RGB")


def _upright(image: Image, orientation: int) -> Image:
    transpose = _PIL.Transpose
    steps = {
        2: (transpose.FLIP_LEFT_RIGHT,),
        3: (transpose.ROTATE_180,),
        4: (transpose.FLIP_TOP_BOTTOM,),
        5: (transpose.TRANSPOSE,),
        6: (transpose.ROTATE_270,),
        7: (transpose.TRANSVERSE,),
        8: (transpose.ROTATE_90,),
    }
    for step in steps.get(orientation, ()):
        image = image.transpose(step)
    return image


def _encode(image: Image, icc: bytes | None) -> bytes:
    buffer = io.BytesIO()
    # No exif or comment passed: Pillow writes none, so nothing of the source's metadata goes but its colours.
    image.save(buffer, format="JPEG", quality=QUALITY, optimize=True, icc_profile=icc)
    return buffer.getvalue()


def _strip_jpeg(data: bytes) -> tuple[bytes, str] | None:
    """The JPEG without its metadata segments (_JPEG_STRIP) and without whatever follows its end marker (a
    phone's "motion photo" video, with its own location and camera atoms), the rest byte for byte, and what
    was removed; None if it can't be walked to its end marker."""
    pieces = [data[:2]]
    pos = 2
    kept_from = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:
            return None  # no image data at all: decoding it says so
        length = int.from_bytes(data[pos + 2 : pos + 4])
        if length < 2 or pos + 2 + length > len(data):
            return None
        if marker == 0xDA:
            break
        if marker in _JPEG_STRIP:
            pieces.append(data[kept_from:pos])
            kept_from = pos + 2 + length
        pos += 2 + length
    else:
        return None
    end = _jpeg_end(data, pos)
    if end is None:
        return None
    said = _removed(stripped=len(pieces) > 1, trailing=len(data) - end)
    if not said:
        return data, ""
    pieces.append(data[kept_from:end])
    return b"".join(pieces), said


def _jpeg_end(data: bytes, pos: int) -> int | None:
    """Where the JPEG whose first scan header is at `pos` ends (just after its end marker), or None if it has
    none. In entropy-coded data every FF is followed by 00 or a restart marker, so the next other marker is a
    table or scan header, skipped by its length, or the end (as content.py's check walks it)."""
    pos += 2 + int.from_bytes(data[pos + 2 : pos + 4])
    while True:
        found = _MARKER.search(data, pos)
        if found is None:
            return None
        at = found.start()
        marker = data[at + 1]
        if marker == 0xD9:
            return at + 2
        if marker in (0x01, 0xD8):
            pos = at + 2
            continue
        if at + 4 > len(data):
            return None
        pos = at + 2 + int.from_bytes(data[at + 2 : at + 4])


def _removed(*, stripped: bool, trailing: int) -> str:
    said = ["metadata removed"] if stripped else []
    if trailing:
        said.append(f"{trailing:,} bytes after its end removed")
    return "; ".join(said)


_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def _strip_png(data: bytes) -> tuple[bytes, str] | None:
    """The PNG without its metadata chunks (_PNG_STRIP) and whatever follows IEND, and what was removed; None
    if its chunks can't be walked to IEND."""
    pieces = [data[:8]]
    pos = 8
    dropped = False
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > len(data):
            return None
        if kind in _PNG_STRIP:
            dropped = True
        else:
            pieces.append(data[pos:end])
        pos = end
        if kind == b"IEND":
            said = _removed(stripped=dropped, trailing=len(data) - end)
            return (b"".join(pieces), said) if said else (data, "")
    return None


class NormalizingImageSource(ImageSource):
    """`inner`'s photos, each normalised on read (in a thread: decoding is CPU work) before it is sent.

    The photo's digest stays the source's own, so the ledger pins what the user gave, whatever bytes an
    encoder makes of it on another machine or with another Pillow; `sent_sha256` and `note` tell what went.
    `inner` checks photos with the source size limit and the other formats allowed (`convert=True`).
    """

    def __init__(self, inner: ImageSource, *, max_bytes: int) -> None:
        load()
        self._inner = inner
        self._max_bytes = max_bytes

    async def fingerprint_many(self, raws: Sequence[str]) -> list[Fingerprint | ImageProblem]:
        return await self._inner.fingerprint_many(raws)

    async def check_many(self, raws: Sequence[str]) -> list[Fingerprint | ImageProblem]:
        return await self._inner.check_many(raws)

    async def unchanged_many(self, raws: Sequence[str], pinned: Sequence[Pinned]) -> list[bool]:
        return await self._inner.unchanged_many(raws, pinned)

    async def read(self, fingerprint: Fingerprint) -> Photo:
        photo = await self._inner.read(fingerprint)
        done = await asyncio.to_thread(normalize, photo.data, fingerprint.ref, self._max_bytes)
        return _as_sent(photo, done.data, done.note)

    async def read_source(self, fingerprint: Fingerprint) -> Photo:
        return await self._inner.read_source(
            fingerprint
        )  # compared by the source's digest: nothing to encode

    async def close(self) -> None:
        await self._inner.close()


_TRIED_AT_ONCE = 8  # photos read whole and normalised at a time by `trial`: its memory is this many photos


async def trial(source: ImageSource, fingerprints: Sequence[Fingerprint]) -> list[ImageProblem | None]:
    """What reading each photo to send it would refuse (`source` normalising): `validate` and `check` with
    --normalize ask this, since a check reads only a photo's head and tail, and a HEIC or WebP that is damaged
    inside, or too many pixels to decode, is found only by decoding it. Each is read whole and normalised, as
    a run's send does, a few at a time; the bytes are dropped at once."""
    gate = asyncio.Semaphore(_TRIED_AT_ONCE)

    async def one(fingerprint: Fingerprint) -> ImageProblem | None:
        async with gate:
            try:
                await source.read(fingerprint)
            except ImageError as exc:
                return exc.problem
            return None

    return list(await asyncio.gather(*(one(f) for f in fingerprints)))


def _as_sent(photo: Photo, data: bytes, note: str) -> Photo:
    sent = photo.sha256 if data is photo.data else hashlib.sha256(data).hexdigest()
    return Photo(data=data, sha256=photo.sha256, fingerprint=photo.fingerprint, sent_sha256=sent, note=note)

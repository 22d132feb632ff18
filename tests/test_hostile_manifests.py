"""Bad input, tried on purpose: hostile manifests, each with the expected outcome of every row.

Two parts:
- CORPUS: one parametrized test over files built to break the reader (encodings, line ends, quoting, ragged
  rows, headers, ids, image paths, image contents, dates). Each case is the file's text and, per data row in
  file order, "ok" or the reason code (optionally "reason|text the message must contain"), or, for a file
  that is unusable as a whole, the ManifestError it must raise.
- Generated manifests (hypothesis), checked against the invariants every run keeps: nothing but a
  ManifestError for whole-file problems; otherwise every data record ends in exactly one place (a Row or a
  Reject) under its own line number; every Reject has a known reason and a message naming the value and a fix;
  values come back exactly as the csv module reads them ("00123", "NA" and "null" stay strings).

Decisions where the issue left a choice (the validator's own rules are at the top of backfill/manifest.py):
- Case variants are distinct ids: "Abc", "abc" and "ABC" are three valid ids, not duplicates. API.md says the
  user_id is the partner's own unique string id and never that the server folds case; folding here could
  merge (and then reject) two real users.
- Ids are sent exactly as written, never trimmed or normalised: " u1", "u1 " and "u1<NBSP>" are bad_user_id
  (with a "spaces" hint), not "u1". Look-alikes (Cyrillic a, fullwidth digits, a zero-width space, a combining
  accent) are bad_user_id, never mapped to ASCII: to the API they would be different ids. The message names
  the offending character (e.g. "U+0430 CYRILLIC SMALL LETTER A"), since it is invisible in the quoted value.
  The Latin original next to its look-alike stays valid: they are different strings, so not duplicates.
- "NA", "null", "None", "nan", "00123", "1e5" are ordinary strings: valid ids when they match the pattern.
- An image's format comes from its bytes, never its name: a JPEG named .png is fine, a GIF named .png is not.
- Truncated images: the check is a structural sniff, not a decode (backfill/images/content.py): JPEG/PNG magic
  at the start, and the end marker (JPEG FF D9, PNG IEND) found by walking the segments, so data after it (a
  motion photo's video, padding) is fine and an EXIF thumbnail's own FF D9 is not taken for the photo's. A JPEG
  cut anywhere in its compressed data has no FF D9 (the encoder stuffs every FF there as FF 00) and is
  image_truncated; so is a JPEG that is only its 3-byte signature. Known limit, accepted on purpose because a
  decoder would cost far more per row: a 4-byte FF D8 FF D9. Such a row then fails at the API (not enrolled,
  recorded per row), never anything worse.
- Paths resolve like the OS does for existing paths: symbolic links followed, ".." applied after them, and
  images_root checked where the path finally leads. For parts that don't exist os.path.realpath is lexical,
  so "ok.png/" and "nope/../ok.png" are accepted as ok.png: harmless, since Row.image_path (what is uploaded)
  is the resolved file, and images_root still applies to it.
- Dates: the ISO 8601 extended forms API.md shows. Week dates, ordinal dates, the basic format, hour-only
  offsets, a space before the offset (Ruby's "15:14:43 -0700"), comma fractions and leap seconds are bad_date;
  before 1900 is bad_date; a date-only value is future only after today's UTC date, a date-time is compared
  as an instant (naive = UTC).
"""

from __future__ import annotations

import csv
import io
import os
import re
import socket
import stat
import struct
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backfill.errors import BackfillError, ManifestError
from backfill.manifest import Manifest, ManifestRules, Reject, open_manifest
from backfill.vocab import Reason

from .conftest import Valid as Row
from .conftest import full_batches

HEADER = "user_id,user_created_at,image_path"
D = "2021-08-12"
NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
LIMIT = 5 * 1024 * 1024  # the default max_image_bytes, used as is: the size cases are sparse files
SAMPLE_IMAGES = Path(__file__).resolve().parent.parent / "sample_data" / "images"
PATTERN = re.compile(r"[A-Za-z0-9_-]+")

# --- the world: one folder of image files of every kind, shared by all cases (manifests are written into it,
# so relative image paths resolve against it) ---------------------------------------------------------------


def _app1(payload: bytes) -> bytes:
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def _sparse(path: Path, size: int) -> None:
    """A JPEG of exactly `size` bytes, mostly a hole: start and end markers, nothing real in between."""
    with path.open("wb") as handle:
        handle.write(b"\xff\xd8\xff\xe0")
        handle.seek(size - 2)
        handle.write(b"\xff\xd9")


def build_world(world: Path) -> None:
    jpeg = (SAMPLE_IMAGES / "user_0001.jpg").read_bytes()  # real, decodable (see sample_data/README.md)
    png = (SAMPLE_IMAGES / "user_0002.png").read_bytes()
    assert jpeg.startswith(b"\xff\xd8\xff") and jpeg.endswith(b"\xff\xd9") and png.startswith(b"\x89PNG")
    files = {
        "ok.png": png,
        "ok.jpg": jpeg,
        "smith, john.png": png,
        "jpeg_named.png": jpeg,
        "png_named.jpg": png,
        "noext": jpeg,
        "UPPER.JPG": jpeg,
        "text.jpg": b"just some notes\n",
        "page.jpg": b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n",
        "gif.png": b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00,"
        b"\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x01D\x00;",
        "zero.jpg": b"",
        "cut.jpg": jpeg[:-2],  # cut in the compressed data: no end marker
        "cut_half.jpg": jpeg[: len(jpeg) // 2],  # cut in the middle of its tables
        "soi_only.jpg": b"\xff\xd8\xff",
        "tiny.jpg": b"\xff\xd8\xff\xd9",  # known limit: start and end markers and nothing else pass the sniff
        # A photo with an EXIF thumbnail, cut soon after the thumbnail's own end marker.
        "thumb_cut.jpg": b"\xff\xd8" + _app1(b"Exif\x00\x00" + jpeg) + jpeg[2:200],
        "cut.png": png[:-12],
        "photos/in.png": png,
        "photos-evil/x.png": png,
    }
    for name, data in files.items():
        (world / name).parent.mkdir(parents=True, exist_ok=True)
        (world / name).write_bytes(data)
    _sparse(world / "exact.jpg", LIMIT)
    _sparse(world / "over.jpg", LIMIT + 1)
    (world / "folder").mkdir()
    os.mkfifo(world / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(world / "sock"))
    sock.close()  # the socket file stays
    links = {
        "ln_fifo.jpg": "fifo",
        "ln_zero.jpg": "zero.jpg",
        "ln_dir": "folder",
        "ln_devzero.jpg": "/dev/zero",
        "broken.png": "gone.png",
        "loop1": "loop2",
        "loop2": "loop1",
        "self": "self",
        "dirloop": "dirloop",
        "ln_chain.png": "ln_chain2.png",
        "ln_chain2.png": "ok.png",
        "ln_into_root.png": "photos/in.png",  # outside images_root, pointing into it
        "photos/ln_in.png": "in.png",
        "photos/ln_out.png": "../ok.png",  # inside images_root, pointing out of it
        "photos/loop": "loop",
    }
    for name, target in links.items():
        (world / name).symlink_to(target)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("world")
    build_world(folder)
    return folder


# --- reading and the invariants ------------------------------------------------------------------------------


def rules(world: Path, *, root: bool = False, chunk_rows: int = 10_000) -> ManifestRules:
    return ManifestRules(now=NOW, chunk_rows=chunk_rows, images_root=world / "photos" if root else None)


def records(path: Path) -> list[list[str]]:
    """The data records as Python's csv module reads them: the oracle for line numbers and exact values."""
    with path.open(encoding="utf-8-sig", newline="") as handle:
        return list(csv.reader(handle))[1:]


def actionable(reject: Reject, uid: str, created: str, image: str) -> None:
    """A message a person can act on: it names the value at fault (or the blank) and says what to do."""
    message = reject.message
    assert reject.reason in set(Reason) - {Reason.USER_ID_REUSED}, reject
    assert message and message == message.strip() and "nan" not in message.split(), reject
    fixes = (
        "fix",
        "check",
        "delete",
        "fill",
        "point",
        "move",
        "export",
        "convert",
        "resize",
        "give",
        "correct",
        "quote",
        "let ",
        "keep",
        "copy",
        "write",
        "set ",
        "change",
        "rename",
    )
    assert any(word in message.lower() for word in fixes), f"no fix in {message!r}"
    named = {
        "bad_user_id": repr(uid),
        "duplicate_user_id": repr(uid),
        "duplicate_row": repr(uid),
        "bad_date": repr(created),
        "future_date": repr(created),
    }.get(reject.reason, repr(image) if reject.reason.startswith(("image_", "path_")) else "")
    assert named in message, f"{named} not in {message!r}"
    if reject.reason == "empty_value":
        assert "empty" in message or "blank" in message
    if reject.reason == "malformed_row":
        assert "values" in message or "header" in message


def run(path: Path, given: ManifestRules) -> tuple[Manifest, list[Row | Reject]]:
    """Opens and reads the manifest, checks every invariant, and returns the outcomes in line order."""
    manifest = open_manifest(path, given)
    batches = full_batches(manifest)
    out: list[Row | Reject] = [r for b in batches for r in b.rows]
    out += [r for b in batches for r in b.rejects]
    assert sorted(r.line for r in out) == list(range(2, manifest.total_rows + 2)), "a row lost or doubled"
    found = records(path)
    assert len(found) == manifest.total_rows
    with path.open(encoding="utf-8-sig", newline="") as handle:
        header = next(csv.reader(handle))
    at = [
        header.index(c) for c in (given.user_id_column, given.user_created_at_column, given.image_path_column)
    ]
    valid_ids: list[str] = []
    for outcome in out:
        record = found[outcome.line - 2]
        uid, created, image = (record[i] if i < len(record) else "" for i in at)
        # Exactly as written: no trimming, no "00123" -> 123, no "NA" -> NaN. A reject's NUL is shown as a
        # symbol, which rejects.csv and a PostgreSQL ledger can hold; its message quotes the value as written.
        shown = uid.replace("\x00", "\u2400") if isinstance(outcome, Reject) else uid
        assert outcome.user_id == shown
        if isinstance(outcome, Row):
            assert outcome.user_created_at == created
            assert outcome.user_id.isascii() and PATTERN.fullmatch(outcome.user_id)
            assert outcome.image_path.is_absolute() and stat.S_ISREG(os.stat(outcome.image_path).st_mode)
            assert 0 < outcome.image_size <= given.max_image_bytes
            valid_ids.append(outcome.user_id)
        else:
            actionable(outcome, uid, created, image)
    assert len(valid_ids) == len(set(valid_ids)), "a duplicate id was let through"
    return manifest, sorted(out, key=lambda r: r.line)


# --- the corpus -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    body: str | bytes  # the whole file; "{world}" becomes the world folder's path; str is written as UTF-8
    # Per data row, in order: "ok", "reason" or "reason|text the message contains". A str: the file is refused
    # as a whole, with a ManifestError matching this regex.
    expect: list[str] | str
    root: bool = False  # images_root = {world}/photos


def lines(*rows: str, header: str = HEADER, end: str = "\n") -> str:
    return header + end + "".join(row + end for row in rows)


def table(values: list[tuple[str, ...]], header: str = HEADER) -> str:
    """Rows written by the csv module, so any value is quoted as needed."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header.split(","))
    writer.writerows(values)
    return buffer.getvalue()


def column(role: str, pairs: list[tuple[str, str]]) -> tuple[str, list[str]]:
    """One row per (value, expectation): `value` in the `role` column, a good id (u0, u1...), date and photo
    in the others; written by the csv module, so any value is quoted as needed."""
    good = {"user_id": "", "user_created_at": D, "image_path": "ok.png"}
    rows = [
        tuple(value if r == role else good[r] or f"u{i}" for r in good) for i, (value, _) in enumerate(pairs)
    ]
    return table(rows), [expect for _, expect in pairs]


def raw(pairs: list[tuple[str, str]], header: str = HEADER) -> tuple[str, list[str]]:
    """One line per (line as written, expectation)."""
    return lines(*(line for line, _ in pairs), header=header), [expect for _, expect in pairs]


def each(role: str, values: list[str], expect: str) -> tuple[str, list[str]]:
    return column(role, [(v, expect) for v in values])


CORPUS = [
    # --- encodings and line ends ---
    Case("bom", "\ufeff" + lines(f"u1,{D},ok.png"), ["ok"]),
    Case("bom-crlf-no-final-newline", f"\ufeff{HEADER}\r\nu1,{D},ok.png\r\nu2,{D},ok.jpg", ["ok", "ok"]),
    Case("cr-only-old-mac", lines(f"u1,{D},ok.png", f"u2,{D},ok.jpg", end="\r"), ["ok", "ok"]),
    Case("mixed-line-ends", f"{HEADER}\r\nu1,{D},ok.png\nu2,{D},ok.jpg\ru3,{D},ok.png\r\n", ["ok"] * 3),
    Case("cr-cr-lf", f"{HEADER}\nu1,{D},ok.png\r\r\nu2,{D},ok.jpg\n", ["ok", "empty_value|blank", "ok"]),
    Case(
        "latin1-in-data",
        lines(f"u1,{D},ok.png").encode() + f"Jos\xe9,{D},ok.png\n".encode("latin-1"),
        r"is not UTF-8: byte 0xE9 at offset \d+ \(line 3\).*save the file as UTF-8",
    ),
    Case("latin1-in-header", b"us\xe9r_id,user_created_at,image_path\n", r"0xE9 at offset 2 \(line 1\)"),
    Case("cp1252-smart-quotes", lines(f"u1,\x93{D}\x94,ok.png").encode("latin-1"), r"0x93 .*\(line 2\)"),
    Case("utf16-with-bom", lines(f"u1,{D},ok.png").encode("utf-16"), r"is UTF-16 text, not UTF-8"),
    Case("utf16-no-bom", lines(f"u1,{D},ok.png").encode("utf-16-le"), r"NUL bytes.*UTF-16.*save the file"),
    Case("utf32", lines(f"u1,{D},ok.png").encode("utf-32"), r"is UTF-32 text, not UTF-8"),
    Case("bom-twice", "\ufeff\ufeff" + lines(f"u1,{D},ok.png"), re.escape("did you mean '\\ufeffuser_id'")),
    Case(
        "semicolons", lines(f"u1;{D};ok.png").replace(",", ";"), r"separated by semicolons.*comma-separated"
    ),
    Case("tabs", lines(f"u1\t{D}\tok.png").replace(",", "\t"), r"separated by tabs, not commas"),
    Case(
        "two-exports-joined",
        *raw(
            [
                (f"u1,{D},ok.png", "ok"),
                (
                    "\ufeff" + HEADER,
                    "malformed_row|repeats the header",
                ),  # the second export's header, BOM and all
                (f"u2,{D},ok.png", "ok"),
                (HEADER, "malformed_row|repeats the header"),
            ]
        ),
    ),
    Case(
        "nul-in-values",
        *raw([(f"u\x001,{D},ok.png", "bad_user_id"), (f"u2,{D},ok.png\x00", "image_missing|NUL")]),
    ),
    # --- quoting ---
    Case("quoted-comma-in-path", lines(f'u1,{D},"smith, john.png"'), ["ok"]),
    Case("quoted-newline-in-id", *raw([(f'"u\n1",{D},ok.png', "bad_user_id"), (f"u2,{D},ok.png", "ok")])),
    Case(
        "quoted-crlf-in-other-column",
        *raw(
            [(f'u1,{D},ok.png,"a\r\nb\r\n\r\nc"', "ok"), (f"u2,{D},ok.png,", "ok")], header=HEADER + ",notes"
        ),
    ),
    Case("doubled-quotes-in-id", lines(f'"a""b",{D},ok.png'), ["bad_user_id"]),
    Case("quoted-blank-ids", *raw([(f'"",{D},ok.png', "empty_value"), (f'" ",{D},ok.png', "empty_value")])),
    Case(
        "stray-quote-mid-value",
        *raw([(f'ab"c,{D},ok.png', "bad_user_id"), (f'u2,{D},ok"x.png', "image_missing")]),
    ),
    Case(
        "everything-quoted", '"user_id","user_created_at","image_path"\n' + f'"u1","{D}","ok.png"\n', ["ok"]
    ),
    Case("space-before-quote", lines('u1, "a,b",ok.png'), ["malformed_row|4 values"]),
    # A quoted value followed by more text: both readers (and Excel) join them, so this is "u1x", valid.
    Case("text-after-closing-quote", lines(f'"u1"x,{D},ok.png'), ["ok"]),
    Case(
        "unclosed-quote",
        lines(f"u1,{D},ok.png", f'u2,"{D},ok.png', f"u3,{D},ok.png"),
        "line 3 is never closed",
    ),
    Case("unclosed-quote-in-header", '"' + lines(f"u1,{D},ok.png"), r"quote in it is probably never closed"),
    Case("quoted-newline-in-header", lines(f"x,u1,{D},ok.png", header='"my\nnotes",' + HEADER), ["ok"]),
    # --- ragged rows ---
    Case(
        "ragged",
        *raw(
            [
                (
                    f"u1,{D},ok.png,surprise",
                    "malformed_row|4 values",
                ),  # the first data row, which pandas alone exempts
                (f"u2,{D},ok.png,,", "ok"),  # trailing commas lose nothing
                (f"u3,{D}", "empty_value|image_path"),
                ("u4", "empty_value|user_created_at and image_path"),
                (f"u5,{D},ok.png" + "," * 20 + "z", "malformed_row|23 values"),
                (",,,,,,", "empty_value|blank"),
                (f"Smith, John,{D},ok.png", "malformed_row"),
            ]
        ),
    ),
    Case(
        "ragged-columns-reordered",
        *raw(
            [
                ("ok.png", "empty_value|user_id"),
                (f"ok.png,{D},u1", "ok"),
                (f"ok.png,{D},u2,x", "malformed_row"),
            ],
            header="image_path,user_created_at,user_id",
        ),
    ),
    Case(
        "whitespace-lines",
        *raw(
            [
                ("   ", "empty_value|blank"),
                ("\t", "empty_value|blank"),
                (f"u1,{D},ok.png", "ok"),
                ("", "empty_value"),
            ]
        ),
    ),
    # --- headers ---
    Case("no-header", f"u1,{D},ok.png\nu2,{D},ok.png\n", r"missing the columns 'user_id', 'user_created_at'"),
    Case(
        "duplicate-header",
        lines(f"u1,{D},ok.png,b.png", header=HEADER + ",image_path"),
        "more than one column",
    ),
    Case(
        "duplicate-and-blank-other-headers",
        *raw([(f"a,u1,b,c,{D},ok.png,", "ok")], header="n,user_id,n,,user_created_at,image_path,"),
    ),
    Case("header-only-no-newline", HEADER, []),
    Case("header-only-crlf", HEADER + "\r\n", []),
    Case("header-only-bom", "\ufeff" + HEADER + "\n", []),
    Case("empty-file", "", r"is empty: it needs a header row"),
    Case("spaces-only", "   \n", r"line 1 is blank"),
    Case("newlines-only", "\n\n\n", r"line 1 is blank"),
    Case(
        "header-case",
        lines(f"u1,{D},ok.png", header="User_ID,user_created_at,image_path"),
        "did you mean 'User_ID'",
    ),
    # --- user ids ---
    Case(
        "ids-as-written",
        *each(
            "user_id",
            ["00123", "0", "-0", "NA", "null", "None", "nan", "NaN", "TRUE", "1e5", "0x1F", "-", "_"],
            "ok",
        ),
    ),
    Case(
        "ids-not-allowed",
        *each("user_id", ["N/A", "#N/A", "1.0", "+1", "user@x", "u 1", "u\\1", "<u1>"], "bad_user_id"),
    ),
    Case(
        "ids-surrounding-spaces",
        *column(
            "user_id",
            [
                (
                    " v1",
                    "bad_user_id|spaces",
                ),  # trimmed, it would be "v1": a different user, or a hidden duplicate
                ("v1 ", "bad_user_id|spaces"),
                ("\tv1", "bad_user_id|spaces"),
                ("v1\u00a0", "bad_user_id|spaces"),  # a no-break space, as pasted from a web page
                ("\u00a0", "empty_value"),
                ("v1", "ok"),
            ],
        ),
    ),
    Case(
        "ids-look-alikes",
        *column(
            "user_id",
            [
                ("\u0430bc", "bad_user_id|character 1 is U+0430 CYRILLIC SMALL LETTER A"),
                ("\uff11\uff12\uff13", "bad_user_id|U+FF11 FULLWIDTH DIGIT ONE"),
                ("abc\u200b", "bad_user_id|character 4 is U+200B ZERO WIDTH SPACE"),
                ("\u00e9", "bad_user_id|U+00E9"),
                ("e\u0301", "bad_user_id|U+0301 COMBINING ACUTE ACCENT"),
                ("abc", "ok"),  # the Latin original of a look-alike: a different string, so no duplicate
                ("123", "ok"),
            ],
        ),
    ),
    Case("ids-case-variants", *each("user_id", ["Abc", "abc", "ABC", "aBc"], "ok")),
    Case("ids-leading-zeros", *each("user_id", ["00123", "0123", "123"], "ok")),
    Case("id-very-long", *each("user_id", ["a" * 5000], "ok")),  # API.md gives no length limit
    Case(
        "ids-duplicates",
        *raw(
            [
                (f"dup,{D},ok.png", "duplicate_user_id|appears 4 times in the manifest (lines 2, 4, 7, 8)"),
                (f"u1,{D},ok.png", "ok"),
                (f"dup,{D},ok.png", "duplicate_user_id"),
                (f"Dup,{D},ok.png", "ok"),  # a case variant is another id
                (f"dup ,{D},ok.png", "bad_user_id"),  # never trimmed, so not a copy of "dup"
                (
                    f"dup,{D},ok.png,extra",
                    "malformed_row",
                ),  # rejected for its own fault, but still counted as a copy
                (
                    "dup,nonsense,missing.png",
                    "duplicate_user_id",
                ),  # duplicate comes before the date and image checks
            ]
        ),
    ),
    Case(
        "rows-copied",
        *raw(
            [
                (f"twin,{D},ok.png", "ok"),  # the first of identical lines is the user's one row
                (f"u1,{D},ok.png", "ok"),
                (f"twin,{D},ok.png", "duplicate_row|'twin' is on line 2 too"),
                (f"twin,{D},ok.png", "duplicate_row|sent once from line 2"),
                (f"twin,{D},ok.png,extra", "malformed_row"),  # its own fault comes first
                (f'"twin","{D}","ok.png"', "duplicate_row"),  # the same values, quoted or not
            ]
        ),
    ),
    # --- image contents: the format is in the bytes, not the name ---
    Case(
        "image-formats",
        *column(
            "image_path",
            [
                ("jpeg_named.png", "ok"),
                ("png_named.jpg", "ok"),
                ("noext", "ok"),
                ("UPPER.JPG", "ok"),
                ("text.jpg", "image_not_jpeg_or_png|looks like text"),
                ("page.jpg", "image_not_jpeg_or_png|HTML"),
                ("gif.png", "image_not_jpeg_or_png|GIF"),
                ("zero.jpg", "image_empty"),
                ("ln_zero.jpg", "image_empty"),
            ],
        ),
    ),
    Case(
        "image-truncated",
        *column(
            "image_path",
            [
                ("cut.jpg", "image_truncated|FF D9"),
                ("cut_half.jpg", "image_truncated"),
                ("soi_only.jpg", "image_truncated"),
                ("cut.png", "image_truncated|IEND"),
                ("tiny.jpg", "ok"),  # known limit of the sniff, see the module docstring
                (
                    "thumb_cut.jpg",
                    "image_truncated",
                ),  # the thumbnail's own end marker is skipped, not taken for the photo's
            ],
        ),
    ),
    Case(
        "image-size-limit",
        *column(
            "image_path",
            [
                ("exact.jpg", "ok"),
                ("over.jpg", "image_too_large|5,242,881 bytes, over the limit of 5,242,880"),
            ],
        ),
    ),
    # --- image paths ---
    Case(
        "not-files",
        *column(
            "image_path",
            [
                ("folder", "image_not_file|folder"),
                ("folder/", "image_not_file|folder"),
                (".", "image_not_file|folder"),
                ("fifo", "image_not_file|FIFO"),  # never opened: reading a FIFO would hang the run
                ("ln_fifo.jpg", "image_not_file|FIFO"),
                ("sock", "image_not_file|socket"),
                ("ln_dir", "image_not_file|folder"),
                ("ln_devzero.jpg", "image_not_file|device"),
                ("/dev/null", "image_not_file|device"),
            ],
        ),
    ),
    Case(
        "links",
        *column(
            "image_path",
            [
                ("broken.png", "image_missing|gone.png"),
                ("loop1", "image_missing|loops"),
                ("self", "image_missing|loops"),
                ("dirloop/x.png", "image_missing|loops"),
                ("ln_chain.png", "ok"),
                ("ln_into_root.png", "ok"),
            ],
        ),
    ),
    Case(
        "odd-spellings",
        *column(
            "image_path",
            [
                (" ok.png", "image_missing|spaces"),
                ("ok.png ", "image_missing|spaces"),
                ("images\\ok.png", "image_missing"),  # a Windows path: "\" is part of the name here
                ("~/ok.png", "image_missing"),  # no shell: "~" is not expanded
                ("file://{world}/ok.png", "image_missing"),  # no URLs
                ("OK.PNG", "image_missing"),  # names are case-sensitive
                ("ok.png/x", "image_missing"),
                ("x" * 300, "image_missing"),
                ("ok.png\x00", "image_missing|NUL"),
                ("{world}/ok.png", "ok"),
                ("./ok.png", "ok"),
                (".//ok.png", "ok"),
                ("folder/../ok.png", "ok"),
                ("ok.png/", "ok"),  # realpath is lexical here: accepted, see the module docstring
                ("nope/../ok.png", "ok"),  # likewise
            ],
        ),
    ),
    Case(
        "images-root",
        *column(
            "image_path",
            [
                ("photos/in.png", "ok"),
                ("ok.png", "path_outside_root|outside images_root"),
                ("photos/../ok.png", "path_outside_root"),
                ("photos/nope/../../ok.png", "path_outside_root"),
                ("photos/ln_out.png", "path_outside_root"),  # a link counts where it points...
                ("ln_into_root.png", "ok"),  # ...both ways
                ("photos/ln_in.png", "ok"),
                ("{world}/ok.png", "path_outside_root"),
                ("{world}/photos/in.png", "ok"),
                ("photos/../photos/in.png", "ok"),
                ("photos-evil/x.png", "path_outside_root"),  # a sibling whose name starts with the root's
                ("/dev/null", "path_outside_root"),
                ("..", "path_outside_root"),
                ("loop1", "path_outside_root"),
                ("photos", "image_not_file"),
                ("photos/missing.png", "image_missing"),
                ("photos/loop", "image_missing|loops"),
            ],
        ),
        root=True,
    ),
    # --- dates (NOW is 2030-01-01 12:00 UTC) ---
    Case(
        "dates-valid",
        *each(
            "user_created_at",
            [
                "2021-08-12",
                "2021-08-12T15:14:43",
                "2021-08-12 15:14",
                "2021-08-12T15:14:43Z",
                "2021-08-12T15:14:43+05:30",
                "2021-08-12T15:14:43-0700",
                "2021-08-12T15:14:43.5Z",
                "2021-08-12T15:14:43.123456789-00:00",
                "2020-02-29",
                "1900-01-01",
                "1900-01-01T00:00:00+01:00",  # 1899 in UTC, but its own calendar date is what counts
                "2030-01-01",  # today is not the future
                "2030-01-01T12:00:00Z",  # exactly now
                "2030-01-01T23:59:59+14:00",  # 09:59:59 UTC
                "2030-01-01T11:59:59",  # naive = UTC
            ],
            "ok",
        ),
    ),
    Case(
        "dates-not-iso",
        *each(
            "user_created_at",
            [
                "2021-W32-4",
                "2021-W32",
                "2021-224",
                "20210812T151443Z",
                "2021-08-12T15:14:43+5",
                "2021-05-18 15:14:43 -0700",
                "2021-08-12T15:14:43.Z",
                "2021-08-12Z",
                "10000-01-01",
                "-2021-08-12",
                "12 Aug 2021",
                "Aug 12, 2021",
                "1628726400",
                "2021/08/12",
                "12/08/2021",
                "garbage",
                "NaT",
                "null",
                "NA",
            ],
            "bad_date|not an ISO 8601 date or date-time",
        ),
    ),
    # As databases and languages write them; sent as written.
    Case(
        "dates-as-systems-write-them",
        *each(
            "user_created_at",
            [
                "2021-08-12T15:14:43+05",
                "2021-05-18 15:14:43.924617+00",
                "2021-08-12T15:14:43,5Z",
                "2021-08-12t15:14:43.1234567z",
                "2021-08-12T15",
                "2016-12-31T23:59:60Z",  # RFC 3339's leap second
            ],
            "ok",
        ),
    ),
    Case(
        "dates-bad",
        *column(
            "user_created_at",
            [
                (
                    "2016-12-31T23:58:60Z",
                    "bad_date|not a real date",
                ),  # a leap second is the last of a minute 59
                ("2021-08-12T24:00:00", "bad_date|not a real date"),
                ("2021-02-29", "bad_date|not a real date"),
                ("2021-04-31", "bad_date|not a real date"),
                ("1899-12-31T23:59:59Z", "bad_date|before 1900"),
                ("0001-01-01", "bad_date|before 1900"),
                ("\uff12021-08-12", "bad_date|U+FF12 FULLWIDTH DIGIT TWO"),
                ("2021-08-12\u200b", "bad_date|U+200B ZERO WIDTH SPACE"),
                (" 2021-08-12", "bad_date|spaces"),
                ("2021-08-12\t", "bad_date|spaces"),
                ("2021-08-12\n", "bad_date|spaces"),
            ],
        ),
    ),
    Case(
        "dates-future",
        *each(
            "user_created_at",
            [
                "2030-01-03",
                "2030-01-01T12:00:01Z",
                "2030-01-01T12:00:00-00:01",
                "2030-01-02 02:00:00.000001",
                "2099-12-31T00:00:00Z",
                "9999-12-31",
                "9999-12-31T23:59:59-23:59",  # past year 9999 in UTC: no overflow
            ],
            "future_date|in the future",
        ),
    ),
]


@pytest.mark.parametrize("case", CORPUS, ids=[c.id for c in CORPUS])
def test_corpus(world: Path, case: Case) -> None:
    body = case.body.encode() if isinstance(case.body, str) else case.body
    path = world / f"{case.id}.csv"
    path.write_bytes(body.replace(b"{world}", os.fsencode(world)))
    if isinstance(case.expect, str):
        with pytest.raises(ManifestError) as caught:
            run(path, rules(world, root=case.root))
        assert str(path) in str(caught.value)
        assert re.search(case.expect, str(caught.value), re.DOTALL), str(caught.value)
        return
    first: list[tuple[int, str, str]] = []
    for chunk_rows in (10_000, 1):  # chunk boundaries must change nothing (duplicates span chunks)
        _, out = run(path, rules(world, root=case.root, chunk_rows=chunk_rows))
        got = [(r.line, r.reason, r.message) if isinstance(r, Reject) else (r.line, "ok", "") for r in out]
        first = first or got
        assert got == first
    assert len(first) == len(case.expect), [r[1] for r in first]
    for (line, reason, message), wanted in zip(first, case.expect, strict=True):
        code, _, text = wanted.partition("|")
        assert (line, reason) == (line, code), f"line {line}: {message}"
        assert text in message, f"line {line}: {text!r} not in {message!r}"


def test_corpus_covers_every_reason() -> None:
    seen = {e.partition("|")[0] for c in CORPUS if isinstance(c.expect, list) for e in c.expect}
    # image_unreadable needs a file root can't read: see test_unreadable_image_says_what_to_do. shared_photo is
    # a census of the whole manifest's photos, not a rule of one row: tests/test_shared_photos.py.
    # image_undecodable is the decoder's, with --normalize only: tests/test_normalize.py.
    assert seen | {"image_unreadable"} == {
        *(set(Reason) - {Reason.USER_ID_REUSED, Reason.SHARED_PHOTO, Reason.IMAGE_UNDECODABLE}),
        "ok",
    }


def test_values_are_exactly_as_written(world: Path) -> None:
    ids = ["00123", "NA", "null", "None", "nan", "1e5", "-0", "0x1F"]
    path = world / "exact-values.csv"
    path.write_text(
        table(
            [
                (i, d, "ok.png")
                for i, d in zip(ids, ["2021-08-12", "2021-08-12T15:14:43.500Z"] * 4, strict=True)
            ]
        )
    )
    _, out = run(path, rules(world))
    assert all(isinstance(r, Row) for r in out)
    assert [(r.user_id, r.user_created_at) for r in out if isinstance(r, Row)] == list(
        zip(ids, ["2021-08-12", "2021-08-12T15:14:43.500Z"] * 4, strict=True)
    )
    assert all(type(r.user_id) is str for r in out)


def test_unreadable_image_says_what_to_do(world: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An I/O error other than permission or a missing file still gets a message with a fix."""
    real_open = os.open

    def failing(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith("ok.jpg"):
            raise OSError(5, "Input/output error", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", failing)  # the image check opens with os.open; pandas and csv don't
    path = world / "eio.csv"
    path.write_text(lines(f"u1,{D},ok.jpg", f"u2,{D},ok.png"))
    _, out = run(path, rules(world))
    assert [r.reason if isinstance(r, Reject) else "ok" for r in out] == ["image_unreadable", "ok"]
    assert "Input/output error" in out[0].message if isinstance(out[0], Reject) else False


# --- generated manifests --------------------------------------------------------------------------------------

WORLD_IMAGES = [
    "ok.png",
    "ok.jpg",
    "jpeg_named.png",
    "text.jpg",
    "gif.png",
    "zero.jpg",
    "cut.jpg",
    "over.jpg",
    "folder",
    "fifo",
    "broken.png",
    "loop1",
    "photos/in.png",
    "photos/ln_out.png",
    "missing.png",
    " ok.png",
    "image_path",
]
ID_POOL = [
    "u1",
    "u2",
    "dup",
    "dup",
    "00123",
    "NA",
    "null",
    "nan",
    "Abc",
    "abc",
    " u1",
    "u1 ",
    "\u0430bc",
    "\uff11",
    "a\u200b",
    "",
    " ",
    "user_id",
    "\ufeffuser_id",
]
DATE_POOL = [
    "2021-08-12",
    "2021-05-18 15:14:43-0700",
    "2021-05-18T15:14:43Z",
    "2030-01-02",
    "9999-12-31T23:59:59-23:59",
    "2021-02-30",
    "2021-W32-4",
    "1899-12-31",
    "\uff12021-08-12",
    " 2021-08-12",
    "",
    "user_created_at",
]
any_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=8)  # anything UTF-8 can carry
generated_rows = st.lists(
    st.tuples(
        st.one_of(st.sampled_from(ID_POOL), st.text(alphabet="aZ09_-", min_size=1, max_size=4), any_text),
        st.one_of(st.sampled_from(DATE_POOL), any_text),
        st.one_of(st.sampled_from(WORLD_IMAGES), any_text),
        st.sampled_from([None, None, None, "", "x", " ", "a,b"]),  # an extra field: blank is fine, text isn't
    ),
    max_size=20,
)
layouts = st.tuples(
    st.permutations(["user_id", "user_created_at", "image_path", "notes"]),
    st.sampled_from(["\r\n", "\n"]),
    st.booleans(),  # a BOM
    st.booleans(),  # images_root
    st.integers(min_value=1, max_value=5),  # chunk_rows
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=generated_rows, layout=layouts)
def test_generated_manifests_keep_the_invariants(
    world: Path, rows: list[tuple[str, str, str, str | None]], layout: tuple[Any, ...]
) -> None:
    columns, newline, bom, root, chunk_rows = layout
    buffer = io.StringIO()
    # With "\n" line ends, Python 3.11's writer leaves a lone "\r" unquoted (it quotes only the terminator's
    # characters), which would really split the record: rows holding one are written with every value quoted.
    writer = csv.writer(buffer, lineterminator=newline)
    quote_all = csv.writer(buffer, lineterminator=newline, quoting=csv.QUOTE_ALL)
    writer.writerow(columns)
    for uid, created, image, extra in rows:
        by_name = {"user_id": uid, "user_created_at": created, "image_path": image, "notes": "n"}
        values = [by_name[c] for c in columns] + ([] if extra is None else [extra])
        (quote_all if any("\r" in v for v in values) else writer).writerow(values)
    path = world / "generated.csv"
    path.write_text(("\ufeff" if bom else "") + buffer.getvalue(), encoding="utf-8", newline="")
    # A file the csv module wrote correctly is always readable: no ManifestError, every row accounted for.
    manifest, out = run(path, rules(world, root=root, chunk_rows=chunk_rows))
    assert manifest.total_rows == len(rows)
    counts = Counter(uid for uid, *_ in rows)
    values = {uid: {(c, i) for u, c, i, _ in rows if u == uid} for uid in counts}
    firsts = {uid: next(n for n, r in enumerate(rows) if r[0] == uid) for uid in counts}
    for n, (outcome, (uid, _, _, extra)) in enumerate(zip(out, rows, strict=True)):
        reason = outcome.reason if isinstance(outcome, Reject) else "ok"
        if extra is not None and extra.strip():
            assert reason == "malformed_row"
        elif not (uid.isascii() and PATTERN.fullmatch(uid)):
            assert reason in ("malformed_row", "empty_value", "bad_user_id")
        elif counts[uid] > 1 and len(values[uid]) > 1:
            assert reason in ("malformed_row", "empty_value", "duplicate_user_id")
        elif counts[uid] > 1 and n != firsts[uid]:  # a later exact copy of the id's first line
            assert reason in ("malformed_row", "empty_value", "duplicate_row")


# Mostly text (separators, quotes, values, look-alikes, NUL, a stray BOM), plus at most one splice of random
# bytes: often invalid UTF-8, which must refuse the whole file, but not so often that nothing else is tried.
fragments = st.sampled_from(
    [
        b",",
        b",",
        b",",
        b"\n",
        b"\r\n",
        b"\r",
        b'"',
        b'""',
        b" ",
        b"\x00",
        b"\xef\xbb\xbf",
        b"ok.png",
        b"u1",
        b"u1",
        b"00123",
        b"NA",
        b"2021-08-12",
        b"2099-01-01",
        b"\xc3\xa9",
        b"\xd0\xb0bc",
        b"\xef\xbc\x91",
    ]
)
splices = st.one_of(st.none(), st.none(), st.binary(min_size=1, max_size=4))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    parts=st.lists(fragments, max_size=40),
    splice=st.tuples(splices, st.integers(min_value=0, max_value=40)),
    chunk_rows=st.integers(min_value=1, max_value=4),
)
def test_random_bytes_are_read_or_refused_as_a_whole(
    world: Path, parts: list[bytes], splice: tuple[bytes | None, int], chunk_rows: int
) -> None:
    noise, at = splice
    if noise is not None:
        parts.insert(at, noise)
    body = b"".join(parts)
    path = world / "random.csv"
    path.write_bytes(f"{HEADER}\n".encode() + body)
    try:
        body.decode("utf-8")
        utf8 = True
    except UnicodeDecodeError:
        utf8 = False
    try:
        run(path, rules(world, chunk_rows=chunk_rows))  # checks every invariant against the csv module
    except BackfillError as exc:
        assert isinstance(exc, ManifestError), exc  # the only whole-file error reading may raise
        message = str(exc)
        assert str(path) in message
        if utf8:  # valid text is refused only for quoting the two readers can't agree on
            assert "quote" in message, message
        else:
            assert "not UTF-8" in message and "save the file as UTF-8" in message, message
    else:
        assert utf8, "a file that isn't UTF-8 was read"

"""Reading the manifest (CSV, JSON lines or Parquet) and checking each row's text: a Candidate or a Reject per row."""

from __future__ import annotations

import codecs
import csv
import difflib
import hashlib
import io
import json
import os
import re
import shlex
import stat
import unicodedata
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from enum import StrEnum
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn

import numpy as np
import numpy.typing as npt
import pandas as pd

from ..errors import ManifestError
from ..images import file_kind
from ..vocab import Reason

if TYPE_CHECKING:
    from .parquet import ParquetManifest

# How the file is read, and why:
# - Line numbers are what a spreadsheet shows: the header is 1, the first data row 2. A value with a quoted
#   newline still counts as one row. Blank lines are rows too (rejected as `empty_value`), because skipping
#   them would shift every later line number.
# - Ragged rows. pandas' C parser can't tell how many fields a row had: with `usecols` it drops extra fields
#   silently, and without it it exempts the first data row (truncating it, or turning column 1 into the
#   index) and compares every other row with the row before it. So open_manifest reads the file twice in
#   lockstep, with Python's csv module (exact field counts) and with pandas (which batches() uses), and
#   compares the user_id of every row. A row with a non-blank value past the header's last column is
#   rejected as `malformed_row` (most likely an unquoted comma); blank extra fields (trailing commas, common in
#   exports) lose nothing and are ignored. If the two readers ever disagree (only broken quoting can do
#   that) the whole file is a ManifestError rather than a risk of rejecting the wrong lines.
# - Duplicates: every occurrence of a user_id that appears more than once is rejected, so they must be known
#   before the first batch. The pre-scan keeps one 64-bit hash per row (80 MB at 10M rows, never the
#   strings), finds repeated hashes with numpy, then a second user_id-only pass confirms the candidates
#   exactly. The hash is Python's own `hash` (stable within a process): measured 10x faster than
#   pd.util.hash_pandas_object on these strings, with the same collision odds for this purpose.
# - Exact copies: lines whose user_id, user_created_at and image_path are all the same text (an export that
#   wrote a row twice) are one user, not a conflict: the first is checked and sent, every later one is a
#   `duplicate_row` naming it. If any line of the id differs in either value, there is no telling which is
#   right, so every line of it is `duplicate_user_id`, the identical ones too. The confirming pass keeps, per
#   candidate id only, the first line's two values and whether every later line matched them. Reading those two
#   columns too costs that pass about 1 s a million rows (measured: 2.4 s against 1.3 s for the id alone), paid
#   only by a manifest in which some id repeats; hashing the three values in the pre-scan instead would double
#   its memory, and a hash can't prove two lines the same.
# - Values are never trimmed: user_id and user_created_at are sent exactly as written, so " 123" is a bad id,
#   not "123". Header names must match the configured column names exactly (the error suggests near misses).
# - JSON lines and Parquet: the same rules, reasons and checks on the same three values, read by name. JSON lines
#   have no header: line numbers are the file's own (the first object is line 1; blank lines are rows, as in a
#   CSV), and the columns are every key any object has. A used value that is missing or null is empty; one that
#   is not a JSON string (a number, which can't keep `00123`; true; a list) makes the row a malformed_row, as
#   does a line that isn't a JSON object. Parquet rows are numbered from 1, in file order; its used columns must
#   be text (an integer or timestamp column refuses the file, saying how to write it), and null is empty. Both
#   are read through the same snapshot as a CSV, a batch at a time; only the pre-scan's hashes are kept whole.
# - A NUL character can't be part of any id, date, file name or object key, and PostgreSQL text can't hold one
#   (a fleet's ledger queues every row, rejects too): a row with one in a column that is used is rejected, and
#   a reject's user_id shows it as U+2400, never the NUL itself (see Reject).

# The text rules' reasons, in the order they are checked; a row gets the first that applies. IMAGE_MISSING: an
# image_path with a NUL, which names no file (last, so the row gets the reason the image checks would give it).
REASONS = (
    Reason.MALFORMED_ROW,
    Reason.EMPTY_VALUE,
    Reason.BAD_USER_ID,
    Reason.DUPLICATE_USER_ID,
    Reason.DUPLICATE_ROW,
    Reason.BAD_DATE,
    Reason.FUTURE_DATE,
    Reason.IMAGE_MISSING,
)

# Codes for the checks done on whole columns; 0 means "no problem found yet".
# _HEADER_AGAIN is a row that repeats the header (two exports joined): a malformed_row with its own message.
_MALFORMED, _EMPTY, _BAD_ID, _DUPLICATE, _BAD_DATE, _FUTURE, _HEADER_AGAIN, _NUL_IMAGE, _COPY = range(1, 10)
_CODE_REASON = {
    _MALFORMED: Reason.MALFORMED_ROW,
    _EMPTY: Reason.EMPTY_VALUE,
    _BAD_ID: Reason.BAD_USER_ID,
    _DUPLICATE: Reason.DUPLICATE_USER_ID,
    _BAD_DATE: Reason.BAD_DATE,
    _FUTURE: Reason.FUTURE_DATE,
    _HEADER_AGAIN: Reason.MALFORMED_ROW,
    _NUL_IMAGE: Reason.IMAGE_MISSING,
    _COPY: Reason.DUPLICATE_ROW,
}

# The separators a header that reads as one column is checked for: what it is, said as its plural and as the
# --delimiter value a shell passes through unharmed.
_SEPARATORS = {
    ",": ("commas", "','"),
    ";": ("semicolons", "';'"),
    "\t": ("tabs", "tab"),
    "|": ("'|' characters", "'|'"),
}
_DUPLICATE_LINES_SHOWN = 10
_FIELD_LIMIT = 1 << 26
_FIRST_PLAUSIBLE_YEAR = 1900
# Dates and date-times in ISO 8601's extended format, as databases and languages write them (RFC 3339 and the
# forms around it): `T`, `t` or a space between date and time; the time as hours, hours:minutes or
# hours:minutes:seconds, with a fraction of any length after `.` or `,` (PostgreSQL writes 6 digits, .NET 7,
# Python's logging a comma); a zone of `Z`/`z`, or an offset of hours alone (`+00`, as PostgreSQL writes it),
# `+0530` or `+05:30`; or no zone (the partner's wall time, see `_RowChecker`). The value is sent exactly as
# written. Not accepted: the basic format (`20210518T151443Z`), week and ordinal dates, and a space before the
# zone; each gets a message saying how to write it.
_ISO = re.compile(
    r"(?P<y>[0-9]{4})-(?P<m>[0-9]{2})-(?P<d>[0-9]{2})"
    r"(?:[Tt ](?P<H>[0-9]{2})(?::(?P<M>[0-9]{2})(?::(?P<S>[0-9]{2})(?:[.,](?P<f>[0-9]+))?)?)?"
    r"(?P<tz>[Zz]|[+-][0-9]{2}(?::?[0-9]{2})?)?)?"
)
_BASIC = re.compile(r"[0-9]{8}(?:[Tt][0-9]{2,6}(?:[.,][0-9]+)?(?:[Zz]|[+-][0-9]{2,4})?)?")
_SPACED_ZONE = re.compile(r"(?P<time>.+[0-9]) (?P<tz>[Zz]|[+-][0-9:]+|UTC|GMT)")
# No place on Earth is more than 14 hours ahead of UTC (Kiribati, UTC+14): a wall time with no zone, or a
# date, is in the future only once it is later than that everywhere.
_MOST_AHEAD = timedelta(hours=14)
_QUOTING = (
    "check the quotes there: a value with a comma, quote or line break must be enclosed in double quotes, "
    'and a quote inside it doubled ("")'
)
_YAML_WORDS = frozenset({"yes", "no", "y", "n", "true", "false", "on", "off", "null"})  # not text to YAML 1.1
_DATE_EXAMPLES = "write it like 2021-08-12, 2021-05-18 15:14:43-0700 or 2021-05-18T15:14:43Z"


class ManifestFormat(StrEnum):
    CSV = "csv"
    JSONL = "jsonl"
    PARQUET = "parquet"


_EXTENSIONS = {
    ".jsonl": ManifestFormat.JSONL,
    ".ndjson": ManifestFormat.JSONL,
    ".parquet": ManifestFormat.PARQUET,
}
AUTO = "auto"  # the format named by the file's extension: anything not listed above is CSV, as it always was


def format_of(name: str, chosen: str = AUTO) -> ManifestFormat:
    """The format `chosen`, or when that is `auto` the one the extension of `name` (a path or a URL) says."""
    if chosen != AUTO:
        return ManifestFormat(chosen)
    path = name.split("?", 1)[0] if "://" in name else name  # a URL's query is no part of its name
    last = path.rstrip("/").rsplit("/", 1)[-1]
    return _EXTENSIONS.get(os.path.splitext(last)[1].lower(), ManifestFormat.CSV)


def extension_of(name: str, chosen: str = AUTO) -> str:
    """A file extension that `format_of` reads as the format of `name`: what a local copy of it is called."""
    kind = format_of(name, chosen)
    return next((ext for ext, f in _EXTENSIONS.items() if f is kind), ".csv")


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    """A row whose text passed every rule; its image is checked later, after the ledger has had its say."""

    line: int  # as a spreadsheet shows it: header is 1, first data row is 2
    user_id: str
    user_created_at: str  # exactly as in the file
    image: str  # exactly as in the file: resolved by the ImageSource


_CANDIDATE_SETTERS = tuple(
    getattr(Candidate, f).__set__ for f in ("line", "user_id", "user_created_at", "image")
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Reject:
    line: int
    # As in the file ("" if empty), but a NUL shown as U+2400 SYMBOL FOR NULL: readable in rejects.csv, storable
    # in PostgreSQL, and never equal to a sendable id (those are ASCII), by which a fleet knows a sent row.
    user_id: str
    reason: Reason
    message: str  # names the value and the fix


@dataclass(frozen=True)
class ManifestRules:
    user_id_column: str = "user_id"
    user_created_at_column: str = "user_created_at"
    image_path_column: str = "image_path"
    # Must match the whole id; ids must also be ASCII and free of NUL, whatever the pattern says.
    user_id_pattern: str = r"[A-Za-z0-9_-]+"
    max_image_bytes: int = 5 * 1024 * 1024  # of the file's bytes; exactly the limit is allowed
    images_root: Path | None = None  # when set, an image's real path (symlinks followed) must lie inside it
    chunk_rows: int = 10_000
    now: datetime | None = None  # "the future" is after this (naive = UTC); None = the time of open_manifest
    delimiter: str = ","  # the one character between values
    encoding: str = "utf-8"  # the file's text encoding, any Python knows; UTF-8 with or without a BOM
    manifest_format: str = AUTO  # a ManifestFormat, or `auto`: by the file name's extension

    def __post_init__(self) -> None:
        if self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be at least 1, not {self.chunk_rows}")
        if self.max_image_bytes < 1:
            raise ValueError(f"max_image_bytes must be at least 1, not {self.max_image_bytes}")
        if len(self.delimiter) != 1 or self.delimiter in '"\r\n' or not self.delimiter.isascii():
            raise ValueError(
                f"delimiter must be one character other than a quote or line break, not {self.delimiter!r}"
            )
        "".encode(self.encoding)  # LookupError for a name that is no text encoding
        if self.manifest_format != AUTO:
            ManifestFormat(self.manifest_format)  # ValueError for a format with no reader
        re.compile(self.user_id_pattern)

    @property
    def utf8(self) -> bool:
        return codecs.lookup(self.encoding).name == "utf-8"

    @property
    def codec(self) -> str:
        """What the file is decoded with: for UTF-8, the codec that also skips the byte order mark Excel writes."""
        return "utf-8-sig" if self.utf8 else self.encoding


@dataclass(frozen=True, slots=True, kw_only=True)
class Batch:
    candidates: list[Candidate]
    rejects: list[Reject]


class _Prescan(NamedTuple):
    total_rows: int
    candidates: npt.NDArray[np.int64]  # hashes seen more than once
    malformed_lines: npt.NDArray[np.int64]  # ascending
    malformed_fields: npt.NDArray[np.int64]  # each one's field count


class _Bounded(io.RawIOBase):
    """Reads one descriptor from the start, never past `size`: what was there when the manifest was opened."""

    def __init__(self, fd: int, size: int) -> None:
        super().__init__()
        self._fd, self._size, self._at = fd, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:  # Parquet is read from its footer back
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._at, io.SEEK_END: self._size}[whence]
        self._at = max(0, base + offset)
        return self._at

    def tell(self) -> int:
        return self._at

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self._size - self._at)
        if want <= 0:
            return 0
        data = os.pread(self._fd, want, self._at)
        buffer[: len(data)] = data
        self._at += len(data)
        return len(data)


class _Snapshot:
    """The manifest as it was when opened: one descriptor held for the whole run, reads bounded to its size then.

    Rows appended while a run reads the file are past the bound, so they are never seen (the duplicate scan
    never saw them either); a file replaced by rename is still read as the one opened; an edit in place changes
    the size or mtime, which `unchanged()` checks before each chunk is let through.
    """

    def __init__(self, path: Path, name: str) -> None:
        self.path = path
        self.name = name  # what messages call it: the path, or the URL a fetched copy came from
        try:
            # O_NONBLOCK: a FIFO given as the manifest must not hang the open; it is refused just below.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise ManifestError(f"manifest {name} doesn't exist: check the path") from exc
        except OSError as exc:
            raise ManifestError(f"manifest {name} can't be read: {exc.strerror or exc}") from exc
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise ManifestError(
                f"manifest {name} is {file_kind(st.st_mode)}, not a file: give the path of the manifest file"
            )
        self._fd, self.size, self._mtime_ns = fd, st.st_size, st.st_mtime_ns
        self._finalizer = weakref.finalize(self, os.close, fd)

    def stream(self) -> io.BufferedReader:
        return io.BufferedReader(_Bounded(self._fd, self.size), 1 << 20)

    def sha256(self) -> str:
        """The SHA-256 of the bytes this snapshot reads (up to its bound), from the held descriptor."""
        digest, at = hashlib.sha256(), 0
        while at < self.size:
            data = os.pread(self._fd, min(1 << 20, self.size - at), at)
            if not data:  # truncated in place: unchanged() stops the run before the next chunk
                break
            digest.update(data)
            at += len(data)
        return digest.hexdigest()

    def unchanged(self) -> None:
        st = os.fstat(self._fd)
        if (st.st_size, st.st_mtime_ns) != (self.size, self._mtime_ns):
            raise ManifestError(
                f"{self.name} changed while being read ({self.size:,} bytes when opened, {st.st_size:,} now): "
                "rows the duplicate scan didn't see must not be sent. Don't edit the manifest during a run; "
                "write a new file and run that"
            )

    def close(self) -> None:
        self._finalizer()


class Manifest:
    """An opened, pre-scanned manifest; batches() reads it again, chunk by chunk, checking every row's text."""

    def __init__(
        self,
        name: str,
        rules: ManifestRules,
        header: list[str],
        positions: tuple[int, int, int],
        scan: _Prescan,
        duplicates: _Duplicates,
        now: datetime,
        snapshot: _Snapshot,
        reading: _Reading,
    ) -> None:
        self.name = (
            name  # its path, or the URL it was fetched from: what the run's records and messages call it
        )
        self.total_rows = scan.total_rows
        self.duplicate_ids = len(duplicates.conflicts)
        self._rules = rules
        self._header = header
        self._positions = positions  # of user_id, user_created_at, image_path
        self._malformed_lines = scan.malformed_lines
        self._malformed_fields = scan.malformed_fields
        self._duplicates = duplicates.conflicts
        self._copies = duplicates.copies
        self._now = now
        self._snapshot = snapshot
        self._reading = reading
        # Of the file as this run reads it (a file replaced by rename since is not what was sent): for the record.
        self.sha256 = snapshot.sha256()

    def batches(self) -> Iterator[Batch]:
        """Every data row, in file order, as a Candidate or a Reject; one Batch per chunk of `chunk_rows` rows.

        No row beyond the pre-scan's count is ever yielded, and a file changed in place stops the reading
        before the chunk that might differ from what the duplicate scan saw.
        """
        checker = _RowChecker(self)
        order = sorted(set(self._positions))  # pandas returns the columns in file order
        uid, created, image = (order.index(p) for p in self._positions)
        first = line = self._reading.first_line
        for frame in self._reading.frames(order):
            self._snapshot.unchanged()
            frame = frame.iloc[: max(0, self.total_rows - (line - first))]
            if len(frame):
                yield checker.check(frame.iloc[:, uid], frame.iloc[:, created], frame.iloc[:, image], line)
                line += len(frame)
        self._snapshot.unchanged()
        if line - first != self.total_rows:
            raise ManifestError(
                f"{self.name} changed while being read ({line - first} rows now, {self.total_rows} when "
                "opened): don't edit the manifest during a run; run again"
            )


def open_manifest(path: Path, rules: ManifestRules, *, name: str | None = None) -> Manifest:
    """Check that the file is usable as a whole and pre-scan it; raises ManifestError when it isn't.

    `name`: what the manifest is called, when not its path (a local copy of an object named by its URL).
    """
    path = Path(os.path.abspath(path))
    name = str(path) if name is None else name
    snapshot = _Snapshot(path, name)
    now = _utc(rules.now) if rules.now is not None else datetime.now(UTC)
    pattern = re.compile(rules.user_id_pattern, re.ASCII)
    if rules.images_root is not None and not os.path.isdir(rules.images_root):
        raise ManifestError(
            f"images_root {str(rules.images_root)!r} is not a folder: set images_root in the config to the "
            "folder that holds the photos, or remove it"
        )
    kind = format_of(name, rules.manifest_format)
    if kind is not ManifestFormat.CSV:
        try:
            return _open_records(snapshot, rules, kind, now, pattern)
        except BaseException:
            snapshot.close()
            raise
    with (
        _decoding_errors(snapshot, rules),
        io.TextIOWrapper(snapshot.stream(), encoding=rules.codec, newline="") as text,
    ):
        reader = csv.reader(text, delimiter=rules.delimiter)
        # csv's default limit (128 KB a value) would refuse a file that pandas reads fine, e.g. one with a long
        # notes column; the limit is process-wide, so it is raised only for the scan.
        field_limit = csv.field_size_limit(max(csv.field_size_limit(), _FIELD_LIMIT))
        try:
            header = _read_header(reader, name)
            positions = _positions(header, rules, name)
            scan = _prescan(snapshot, reader, len(header), positions[0], rules)
        finally:
            csv.field_size_limit(field_limit)
    reading = _Reading(ManifestFormat.CSV, 2, lambda order: _frames(snapshot, order, rules), header)
    with _decoding_errors(snapshot, rules):
        duplicates = _confirm_duplicates(reading, positions, scan.candidates, pattern)
    return Manifest(name, rules, header, positions, scan, duplicates, now, snapshot, reading)


class _Reading(NamedTuple):
    """How one manifest's rows are read again: its format, the number of its first row, and its frames."""

    format: ManifestFormat
    first_line: int  # CSV: 2, after the header (as a spreadsheet shows); JSON lines: 1; Parquet: row 1
    frames: Callable[[list[int]], Iterator[pd.DataFrame]]  # the header's columns at these positions, as str
    header: list[str]
    problems: dict[int, str] | None = None  # {line: why it is a malformed_row}, for JSON lines

    @property
    def unit(self) -> str:
        return "row" if self.format is ManifestFormat.PARQUET else "line"


# A row's values (one list per column asked for) and {offset in the chunk: why the row is malformed}.
_Chunk = tuple[list[list[str]], dict[int, str]]


def _open_records(
    snapshot: _Snapshot, rules: ManifestRules, kind: ManifestFormat, now: datetime, pattern: re.Pattern[str]
) -> Manifest:
    """open_manifest for JSON lines and Parquet: the same pre-scan and duplicate scan, columns read by name."""
    name = snapshot.name
    roles = {
        "user_id": rules.user_id_column,
        "user_created_at": rules.user_created_at_column,
        "image_path": rules.image_path_column,
    }
    used = list(dict.fromkeys(roles.values()))
    parquet: ParquetManifest | None = None
    if kind is ManifestFormat.PARQUET:
        from .parquet import ParquetManifest  # only a Parquet manifest needs pyarrow

        parquet = ParquetManifest(snapshot.stream(), name)
        header = parquet.header
        positions = _positions(header, rules, name)
        parquet.require_text(roles)
        file = parquet

        def chunks(names: list[str]) -> Iterator[_Chunk]:
            return ((values, {}) for values in file.chunks(names, rules.chunk_rows))

        with _decoding_errors(snapshot, rules, kind):
            scan, problems = _prescan_records(chunks([rules.user_id_column]), 1)
        if scan.total_rows != parquet.total_rows:
            raise ManifestError(
                f"{name} holds {scan.total_rows} rows, but its footer says {parquet.total_rows}"
            )
    else:
        keys: dict[str, None] = {}
        example = json.dumps({column: _EXAMPLE[role] for role, column in roles.items()})

        def chunks(names: list[str]) -> Iterator[_Chunk]:
            return _jsonl_chunks(snapshot, names, rules, example)

        with _decoding_errors(snapshot, rules, kind):
            scan, problems = _prescan_records(_jsonl_chunks(snapshot, used, rules, example, keys), 1)
        if not scan.total_rows:
            raise ManifestError(f"{name} is empty: it needs one JSON object per line, one line per user")
        header = list(keys)
        positions = _positions(header, rules, name)

    def frames(order: list[int]) -> Iterator[pd.DataFrame]:
        for values, _ in chunks([header[p] for p in order]):
            yield pd.DataFrame(dict(enumerate(values)), dtype=object)

    reading = _Reading(kind, 1, frames, header, problems if kind is ManifestFormat.JSONL else None)
    with _decoding_errors(snapshot, rules, kind):
        duplicates = _confirm_duplicates(reading, positions, scan.candidates, pattern)
    return Manifest(name, rules, header, positions, scan, duplicates, now, snapshot, reading)


_EXAMPLE = {"user_id": "00123", "user_created_at": "2021-08-12", "image_path": "images/00123.jpg"}
_KEYS_KEPT = 1000  # of a JSON lines manifest's distinct keys: enough to name every column an export has


def _jsonl_chunks(
    snapshot: _Snapshot,
    names: list[str],
    rules: ManifestRules,
    example: str,
    keys: dict[str, None] | None = None,
) -> Iterator[_Chunk]:
    """The values of `names` in each line's object, `chunk_rows` lines at a time; `keys` gathers the keys seen."""
    columns: list[list[str]] = [[] for _ in names]
    problems: dict[int, str] = {}
    with snapshot.stream() as stream:
        for raw in stream:
            values, problem = _jsonl_values(raw.decode(rules.codec).rstrip("\r\n"), names, example, keys)
            if problem is not None:
                problems[len(columns[0])] = problem
            for column, value in zip(columns, values, strict=True):
                column.append(value)
            if len(columns[0]) == rules.chunk_rows:
                yield columns, problems
                columns, problems = [[] for _ in names], {}
    if columns[0]:
        yield columns, problems


def _jsonl_values(
    text: str, names: list[str], example: str, keys: dict[str, None] | None
) -> tuple[list[str], str | None]:
    """One line's values of `names`, and why the row is malformed (None if it isn't)."""
    blank = [""] * len(names)
    if not text.strip():
        return blank, None  # a blank line: every value empty, as in a CSV
    fix = f"write one JSON object per line, e.g. {example}"
    try:
        found = json.loads(text)
    except json.JSONDecodeError as exc:
        return blank, f"the line isn't valid JSON ({exc.msg} at character {exc.pos + 1}): {fix}"
    if not isinstance(found, dict):
        return blank, f"the line is a JSON {_json_kind(found)}, not an object with the user's values: {fix}"
    if keys is not None and len(keys) < _KEYS_KEPT:
        for key in found:
            keys.setdefault(key)
    values: list[str] = []
    problem = None
    for name in names:
        value = found.get(name)
        if value is None or isinstance(value, str):
            values.append(value or "")
            continue
        values.append("")
        if problem is None:
            written = json.dumps(value)[:60]
            problem = (
                f"{name!r} is the JSON {_json_kind(value)} {written}, not a string: values are sent exactly as "
                f"written, which a {_json_kind(value)} can't keep (00123 would be 123). Fix: write it as a JSON "
                f"string, e.g. {json.dumps(written)}"
            )
    return values, problem


def _json_kind(value: object) -> str:
    if isinstance(value, bool):
        return "true/false value"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, list):
        return "list"
    return "object" if isinstance(value, dict) else "value"


def _prescan_records(chunks: Iterator[_Chunk], first: int) -> tuple[_Prescan, dict[int, str]]:
    """Counts rows and hashes every user_id (the first column of each chunk); {line: problem} of bad rows."""
    hashes = _Hashes()
    problems: dict[int, str] = {}
    total = 0
    for values, found in chunks:
        uids = values[0]
        for offset, problem in found.items():
            problems[first + total + offset] = problem
        hashes.add(uids)
        total += len(uids)
    lines = np.array(sorted(problems), dtype=np.int64)
    return _Prescan(total, hashes.repeated(), lines, np.zeros(len(lines), dtype=np.int64)), problems


class _Hashes:
    """Every user_id's 64-bit hash, in blocks of a million; then the hashes seen more than once.

    Why blocks: the peak must stay one copy of the hashes (80 MB at 10M rows). Small per-chunk arrays, or a
    buffer grown by copying, leave the heap holding their freed memory while the sorted whole is built (measured:
    twice the hashes at 10M rows). A block is big enough for malloc to map it on its own, so each is returned to
    the system as soon as it is copied into the whole.
    """

    def __init__(self, block: int = 1 << 20) -> None:
        self._block = block
        self._blocks: list[npt.NDArray[np.int64]] = []
        self._used = block  # of the last block: full, so the first add starts one

    def add(self, uids: list[str]) -> None:
        hashed = np.fromiter(map(hash, uids), dtype=np.int64, count=len(uids))
        while len(hashed):
            if self._used == self._block:
                self._blocks.append(np.empty(self._block, dtype=np.int64))
                self._used = 0
            room = min(self._block - self._used, len(hashed))
            self._blocks[-1][self._used : self._used + room] = hashed[:room]
            self._used += room
            hashed = hashed[room:]

    def repeated(self) -> npt.NDArray[np.int64]:
        """The hashes that occur more than once, each once, sorted; the blocks are gone after."""
        total = len(self._blocks) * self._block - (self._block - self._used if self._blocks else 0)
        everything = np.empty(total, dtype=np.int64)
        self._blocks.reverse()
        at = 0
        while self._blocks:
            block = self._blocks.pop()[: total - at]
            everything[at : at + len(block)] = block
            at += len(block)
            del block
        everything.sort()
        return np.unique(everything[1:][everything[1:] == everything[:-1]])


class _RowChecker:
    """The per-chunk checks of each row's text, on whole columns; images are the ImageSource's business."""

    def __init__(self, manifest: Manifest) -> None:
        rules = manifest._rules
        self._manifest = manifest
        self._pattern = rules.user_id_pattern
        self._now = manifest._now
        # The present where it is latest: what a zoneless date-time or a date must not be after.
        self._latest_wall = (manifest._now + _MOST_AHEAD).replace(tzinfo=None)
        self._labels = {
            "user_id": _label(rules.user_id_column, "user_id"),
            "user_created_at": _label(rules.user_created_at_column, "user_created_at"),
            "image_path": _label(rules.image_path_column, "image_path"),
        }

    def check(
        self, uid: pd.Series[str], created: pd.Series[str], image: pd.Series[str], first_line: int
    ) -> Batch:
        n = len(uid)
        codes = np.zeros(n, dtype=np.int8)
        m = self._manifest
        lo, hi = np.searchsorted(m._malformed_lines, [first_line, first_line + n])
        codes[m._malformed_lines[lo:hi] - first_line] = _MALFORMED
        uids, dates, images = uid.tolist(), created.tolist(), image.tolist()

        # A row equal to the header (a second export appended, its BOM and all) is no user: without this it
        # would be called a bad date ("user_created_at"), which sends the reader looking in the wrong place.
        names = [m._header[p] for p in m._positions]
        again = np.ones(n, dtype=bool)
        for values, name in zip((uid, created, image), names, strict=True):
            again &= values.str.removeprefix("\ufeff").eq(name).to_numpy(dtype=bool)
        _mark(codes, again, _HEADER_AGAIN)
        _mark(codes, _blank(uid) | _blank(created) | _blank(image), _EMPTY)
        good_id = uid.str.fullmatch(self._pattern, flags=re.ASCII).to_numpy(dtype=bool) & np.fromiter(
            map(str.isascii, uids), dtype=bool, count=n
        )
        _mark(codes, ~good_id | _nul(uids), _BAD_ID)
        if m._duplicates:
            _mark(codes, uid.isin(m._duplicates.keys()).to_numpy(dtype=bool), _DUPLICATE)
        if m._copies:
            later = np.zeros(n, dtype=bool)
            for i in np.flatnonzero(uid.isin(m._copies.keys()).to_numpy(dtype=bool)).tolist():
                later[i] = m._copies[uids[i]] != first_line + i
            _mark(codes, later, _COPY)
        # Dates repeat a lot (many accounts a day), so each distinct value is parsed once.
        index, distinct = pd.factorize(created)
        verdicts = [self._date_verdict(v) for v in distinct]
        date_codes = np.array([v[0] for v in verdicts], dtype=np.int8)[index]
        pending = (codes == 0) & (date_codes != 0)
        codes[pending] = date_codes[pending]
        _mark(codes, _nul(images), _NUL_IMAGE)

        candidates: list[Candidate] = []
        rejects: list[Reject] = []
        new, (set_line, set_uid, set_created, set_image) = object.__new__, _CANDIDATE_SETTERS
        for i, code in enumerate(codes.tolist()):
            line = first_line + i
            if code:
                message = self._explain(code, line, uids[i], dates[i], images[i], verdicts[index[i]][1])
                shown = uids[i].replace("\x00", "\u2400")
                rejects.append(Reject(line=line, user_id=shown, reason=_CODE_REASON[code], message=message))
            else:
                # Its slots set directly (a frozen __init__ per row cost ~1 us of every manifest row's time).
                candidate = new(Candidate)
                set_line(candidate, line)
                set_uid(candidate, uids[i])
                set_created(candidate, dates[i])
                set_image(candidate, images[i])
                candidates.append(candidate)
        return Batch(candidates=candidates, rejects=rejects)

    def _date_verdict(self, value: str) -> tuple[int, str]:
        """(code, message) for one user_created_at value; code 0 means it is fine."""
        label = self._labels["user_created_at"]
        match = _ISO.fullmatch(value)
        if match is None:
            return (
                _BAD_DATE,
                f"{label} {value!r} is not an ISO 8601 date or date-time: {_DATE_EXAMPLES}{_hint(value)}",
            )
        g = match.groupdict()
        try:
            day = date(int(g["y"]), int(g["m"]), int(g["d"]))
            moment = None
            if g["H"] is not None:
                second = int(g["S"] or 0)
                leap = second == 60 and g["M"] == "59"  # RFC 3339's leap second, 23:59:60 UTC at most
                micro = int((g["f"] or "0")[:6].ljust(6, "0"))
                moment = datetime(
                    day.year,
                    day.month,
                    day.day,
                    int(g["H"]),
                    int(g["M"] or 0),
                    59 if leap else second,
                    micro,
                    tzinfo=_zone(g["tz"]) if g["tz"] else None,
                ) + timedelta(seconds=leap)
        except (ValueError, OverflowError) as exc:  # OverflowError: a leap second after 9999-12-31T23:59:59
            return _BAD_DATE, f"{label} {value!r} is not a real date or time ({exc}): correct it"
        if day.year < _FIRST_PLAUSIBLE_YEAR:
            return _BAD_DATE, (
                f"{label} {value!r} is before {_FIRST_PLAUSIBLE_YEAR}, not a plausible account creation date: "
                "check that this column holds when the account was created"
            )
        fix = "give the date the account was created; if this machine's clock is wrong, fix it"
        now = f"{self._now:%Y-%m-%d %H:%M:%S} UTC"
        if moment is not None and moment.tzinfo is not None:
            if moment > self._now:
                return _FUTURE, f"{label} {value!r} is in the future (it is now {now}): {fix}"
        elif moment is not None:
            # No zone: the partner's wall time, wherever that is. Only later than the latest clock on Earth
            # is surely the future (read as UTC, a nightly export from Nairobi would have three hours of it).
            if moment > self._latest_wall:
                return _FUTURE, (
                    f"{label} {value!r} has no time zone and is in the future everywhere on Earth (it is now "
                    f"{now}, {self._latest_wall:%Y-%m-%d %H:%M:%S} at UTC+14): {fix}"
                )
        elif day > self._latest_wall.date():
            return _FUTURE, (
                f"{label} {value!r} is in the future: after today everywhere on Earth (it is now {now}, "
                f"{self._latest_wall:%Y-%m-%d} at UTC+14): {fix}"
            )
        return 0, ""

    def _explain(self, code: int, line: int, uid: str, created: str, image: str, date_message: str) -> str:
        labels = self._labels
        if code == _MALFORMED:
            m = self._manifest
            if m._reading.problems is not None:
                return m._reading.problems[line]
            at = int(np.searchsorted(m._malformed_lines, line))
            fields = int(m._malformed_fields[at])
            one = _called(m._rules.delimiter)[:-1]
            return (
                f"the row has {fields} values but the header has {len(m._header)} columns: a value probably "
                f"contains a {one} without quotes around it; quote that value (or remove the extra values)"
            )
        if code == _HEADER_AGAIN:
            return (
                "the row repeats the header row (were two files joined into one?): delete it; the rows after "
                "it are read as usual"
            )
        if code == _EMPTY:
            empty = [
                labels[k]
                for k, v in (("user_id", uid), ("user_created_at", created), ("image_path", image))
                if not v.strip()
            ]
            if len(empty) == 3:
                return "the row is blank: delete it, or fill in the user's id, creation date and photo"
            return f"{' and '.join(empty)} {'is' if len(empty) == 1 else 'are'} empty: fill in a value"
        if code == _BAD_ID:
            if "\x00" in uid:
                at = uid.index("\x00") + 1
                return (
                    f"{labels['user_id']} {uid!r} contains a NUL character (character {at}), which no id can: "
                    "fix the id in the export"
                )
            hint = ""
            if uid != uid.strip():
                hint = " (it has spaces around it)"
            elif not uid.isascii():
                # Name the character: a Cyrillic a (U+0430) or a zero-width space is invisible in the quoted id.
                hint = f" ({_non_ascii(uid)}, not ASCII: a look-alike of an ASCII letter or an invisible character?)"
            return (
                f"{labels['user_id']} {uid!r} doesn't match the allowed pattern {self._pattern!r}{hint}: fix "
                "the id; if your ids legitimately look like this, set user_id_pattern in the config YAML"
            )
        if code == _DUPLICATE:
            count, lines = self._manifest._duplicates[uid]
            shown = ", ".join(map(str, lines)) + (
                f" and {count - len(lines)} more" if count > len(lines) else ""
            )
            unit = self._manifest._reading.unit
            return (
                f"{labels['user_id']} {uid!r} appears {count} times in the manifest ({unit}s {shown}): every copy "
                "is held back because there is no telling which photo is right; keep one row per user"
            )
        if code == _COPY:
            first, unit = self._manifest._copies[uid], self._manifest._reading.unit
            return (
                f"{labels['user_id']} {uid!r} is on {unit} {first} too, with the same {labels['user_created_at']} "
                f"and {labels['image_path']}: the same user written twice, sent once from {unit} {first}; delete "
                "this copy"
            )
        if code == _NUL_IMAGE:
            return (
                f"{labels['image_path']} {image!r} contains a NUL character, which no file or object name can: "
                "correct the path"
            )
        return date_message


def _called(delimiter: str) -> str:
    """The delimiter's name for messages, in the plural (`commas`)."""
    return _SEPARATORS.get(delimiter, (f"{delimiter!r} characters", ""))[0]


def _header_problem(header: list[str], rules: ManifestRules) -> str | None:
    """Why a header lacking the wanted columns isn't in the delimiter and encoding read, when that is visible."""
    if any("\x00" in name for name in header):
        return (
            "it is full of NUL bytes, as UTF-16 text without a byte order mark is. Fix: save the file as UTF-8 "
            "(in Excel: Save As > 'CSV UTF-8 (Comma delimited)'), or name its encoding with --encoding (e.g. "
            "utf-16-le)"
        )
    if len(header) == 1:
        expected = _called(rules.delimiter)
        for separator, (called, flag) in _SEPARATORS.items():
            if separator != rules.delimiter and separator in header[0]:
                return (
                    f"its values are separated by {called}, not {expected}. Fix: name the delimiter with "
                    f"--delimiter {flag} (or `delimiter:` in the config file), or save it as comma-separated "
                    "values (in Excel: Save As > 'CSV UTF-8 (Comma delimited)')"
                )
    if any("\n" in name or "\r" in name for name in header):
        return f"a quote in it is probably never closed, so it runs on past line 1. Fix: {_QUOTING}"
    return None


def _read_header(reader: Iterator[list[str]], name: str) -> list[str]:
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise ManifestError(f"{name}: the header row can't be read ({exc}): check its quotes") from exc
    if header is None:
        raise ManifestError(
            f"{name} is empty: it needs a header row (user_id,user_created_at,image_path) and one row per user"
        )
    if not any(name.strip() for name in header):
        raise ManifestError(
            f"{name}: line 1 is blank; the header row (e.g. user_id,user_created_at,image_path) must be line 1"
        )
    return header


def _positions(header: list[str], rules: ManifestRules, called: str) -> tuple[int, int, int]:
    """Where the user_id, user_created_at and image_path columns are, or a ManifestError saying what to fix."""
    wanted = (
        ("user_id", rules.user_id_column),
        ("user_created_at", rules.user_created_at_column),
        ("image_path", rules.image_path_column),
    )
    missing = [(role, name) for role, name in wanted if name not in header]
    if missing:
        found = ", ".join(repr(h) for h in header)
        # "Rename the column" is the wrong fix when the header isn't in the delimiter and encoding read at all.
        problem = _header_problem(header, rules)
        if problem is not None:
            raise ManifestError(f"{called} doesn't read as a CSV header row ({found[:200]}): {problem}")
        parts = []
        guesses: dict[str, str | None] = {}
        for role, name in missing:
            near = difflib.get_close_matches(name, header, n=1, cutoff=0.6)
            near += [h for h in header if h.strip().casefold() == name.casefold() and h not in near]
            guess = f" (did you mean {near[0]!r}?)" if near else ""
            parts.append(f"{name!r} for {role}{guess}" if name != role else f"{name!r}{guess}")
            guesses[role] = near[0] if near else None
        example = _columns_example(guesses, header, [name for _, name in wanted])
        flags = " ".join(f"--column {shlex.quote(f'{role}={name}')}" for role, name in example.items())
        yaml = ", ".join(
            f"{role}: {_yaml_text(name) if name != _ITS_COLUMN else name}" for role, name in example.items()
        )
        raise ManifestError(
            f"{called} is missing the column{'s' if len(parts) > 1 else ''} {', '.join(parts)}. Columns found: "
            f"{found}. Fix: rename the column in the file, or map your column names with {flags} (or in the "
            f"config YAML, e.g. columns: {{{yaml}}})"
        )
    repeated = [name for _, name in wanted if header.count(name) > 1]
    if repeated:
        raise ManifestError(
            f"{called} has more than one column named {repeated[0]!r}: there is no telling which one to use; "
            "rename or delete the extra column"
        )
    uid, created, image = (header.index(name) for _, name in wanted)
    return uid, created, image


_ITS_COLUMN = "<its column>"


def _columns_example(guesses: dict[str, str | None], header: list[str], wanted: list[str]) -> dict[str, str]:
    """{role: column} for the roles missing: each with its near miss in the header, or the one column nobody
    claims when a single role is left over, else a placeholder."""
    claimed = {*wanted, *(g for g in guesses.values() if g is not None)}
    unclaimed = [h for h in header if h not in claimed and h.strip()]
    open_roles = [role for role, guess in guesses.items() if guess is None]
    if len(open_roles) == 1 and len(unclaimed) == 1:
        guesses[open_roles[0]] = unclaimed[0]
    return {role: g if g is not None else _ITS_COLUMN for role, g in guesses.items()}


def _yaml_text(name: str) -> str:
    """`name` as a YAML value: bare when YAML reads it back as that same text, else double-quoted."""
    bare = re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", name) and name.lower() not in _YAML_WORDS
    return name if bare else json.dumps(name)


def _prescan(
    snapshot: _Snapshot, reader: Iterator[list[str]], width: int, uid_at: int, rules: ManifestRules
) -> _Prescan:
    """Counts rows, hashes every user_id, finds the rows with extra fields; `reader` is past the header."""
    hashes = _Hashes()
    bad_lines: list[int] = []
    bad_fields: list[int] = []
    total = 0
    name = snapshot.name
    for frame in _frames(snapshot, [uid_at], rules):
        try:
            rows = list(islice(reader, len(frame)))
        except csv.Error as exc:
            raise ManifestError(
                f"{name}: a row after line {total + 1} can't be read ({exc}). Fix: {_QUOTING}"
            ) from exc
        uids = [r[uid_at] if len(r) > uid_at else "" for r in rows]
        if uids != frame.iloc[:, 0].tolist():
            _disagreement(name, total, uids, frame.iloc[:, 0].tolist())
        for i in np.flatnonzero(np.fromiter(map(len, rows), dtype=np.int64, count=len(rows)) > width):
            row = rows[i]
            if any(value.strip() for value in row[width:]):
                bad_lines.append(total + 2 + int(i))
                bad_fields.append(len(row))
        hashes.add(uids)
        total += len(rows)
    try:
        leftover = next(reader, None)
    except csv.Error:
        leftover = []
    if leftover is not None:
        _disagreement(name, total, [""], [])
    return _Prescan(
        total,
        hashes.repeated(),
        np.array(bad_lines, dtype=np.int64),
        np.array(bad_fields, dtype=np.int64),
    )


def _disagreement(name: str, before: int, ours: list[str], theirs: list[str]) -> NoReturn:
    at = next(
        (i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs))
    )
    raise ManifestError(
        f"{name}: the rows around line {before + at + 2} can't be split unambiguously. Fix: {_QUOTING}"
    )


class _Duplicates(NamedTuple):
    conflicts: dict[str, tuple[int, list[int]]]  # {user_id: (count, its first lines)}: lines that differ
    copies: dict[str, int]  # {user_id: the line sent}: every line of the id has the same values


def _confirm_duplicates(
    reading: _Reading,
    positions: tuple[int, int, int],
    candidates: npt.NDArray[np.int64],
    pattern: re.Pattern[str],
) -> _Duplicates:
    """The ids that really occur more than once, split into exact copies and conflicts."""
    # Blank and invalid ids are left out: every row with one is rejected for that reason first anyway.
    if not candidates.size:
        return _Duplicates({}, {})
    order = sorted(set(positions))
    uid_at, created_at, image_at = (order.index(p) for p in positions)
    seen: dict[str, tuple[int, list[int]]] = {}
    firsts: dict[str, tuple[str, str] | None] = {}  # the first line's values; None once a line differed
    line = reading.first_line
    for frame in reading.frames(order):
        uids = frame.iloc[:, uid_at].tolist()
        hashes = np.fromiter(map(hash, uids), dtype=np.int64, count=len(uids))
        hits = np.flatnonzero(np.isin(hashes, candidates)).tolist()
        if hits:
            dates, images = frame.iloc[:, created_at].tolist(), frame.iloc[:, image_at].tolist()
        for i in hits:
            uid = uids[i]
            count, lines = seen.get(uid, (0, []))
            if len(lines) < _DUPLICATE_LINES_SHOWN:
                lines.append(line + i)
            seen[uid] = (count + 1, lines)
            values = (dates[i], images[i])
            if count == 0:
                firsts[uid] = values
            elif firsts[uid] != values:
                firsts[uid] = None
        line += len(uids)
    conflicts: dict[str, tuple[int, list[int]]] = {}
    copies: dict[str, int] = {}
    for uid, entry in seen.items():
        if entry[0] > 1 and uid.isascii() and "\x00" not in uid and pattern.fullmatch(uid) is not None:
            if firsts[uid] is None:
                conflicts[uid] = entry
            else:
                copies[uid] = entry[1][0]
    return _Duplicates(conflicts, copies)


def _frames(snapshot: _Snapshot, usecols: list[int], rules: ManifestRules) -> Iterator[pd.DataFrame]:
    """The file's rows, `chunk_rows` at a time, as DataFrames of str; read errors become ManifestErrors."""
    name = snapshot.name
    with _decoding_errors(snapshot, rules), snapshot.stream() as stream:
        try:
            # Every value a str exactly as written: no "NA"/"null" to NaN, no "00123" to 123. No compression
            # guessed from the file name either: the csv module must see the same bytes.
            reader = pd.read_csv(
                stream,
                usecols=usecols,
                chunksize=rules.chunk_rows,
                dtype=str,
                keep_default_na=False,
                na_filter=False,
                skip_blank_lines=False,
                index_col=False,
                header=0,
                engine="c",
                encoding=rules.codec,
                sep=rules.delimiter,
                compression=None,
            )
            with reader:
                yield from reader
        except pd.errors.ParserError as exc:
            # The C parser counts rows from 0 at the header: its row N is spreadsheet line N + 1.
            unclosed = re.search(r"EOF inside string starting at row (\d+)", str(exc))
            problem = (
                f"the quote opened on line {int(unclosed[1]) + 1} is never closed"
                if unclosed
                else f"it can't be parsed as CSV ({str(exc).strip()})"
            )
            raise ManifestError(f"{name}: {problem}. Fix: {_QUOTING}") from exc
        except pd.errors.EmptyDataError as exc:
            raise ManifestError(f"{name} is empty: it needs a header row and one row per user") from exc


@contextmanager
def _decoding_errors(
    snapshot: _Snapshot, rules: ManifestRules, kind: ManifestFormat = ManifestFormat.CSV
) -> Iterator[None]:
    """Turns a UnicodeError or OSError while reading the manifest into a ManifestError that says where."""
    try:
        yield
    except UnicodeError as exc:  # a codec like idna raises its own UnicodeError, not a UnicodeDecodeError
        raise _encoding_error(snapshot, rules, kind) from exc
    except OSError as exc:
        raise ManifestError(f"{snapshot.name} can't be read: {exc.strerror or exc}") from exc


def _encoding_error(
    snapshot: _Snapshot, rules: ManifestRules, kind: ManifestFormat = ManifestFormat.CSV
) -> ManifestError:
    """Finds the first byte that isn't in the encoding read: the parser's own offsets are relative to its buffer."""
    # Excel's advice only for a CSV: JSON lines come from code, whose writer can be told its encoding.
    excel = (
        "(in Excel: Save As > 'CSV UTF-8 (Comma delimited)')"
        if kind is ManifestFormat.CSV
        else "(as JSON lines are meant to be: open the file with encoding='utf-8' where it is written)"
    )
    named = "UTF-8" if rules.utf8 else rules.encoding
    fix = (
        f"Fix: save the file as UTF-8 {excel}, or name the encoding it is in with --encoding (e.g. cp1252)"
        if rules.utf8
        else f"Fix: name the encoding the file is in with --encoding (or `encoding:` in the config file), or save "
        f"it as UTF-8 {excel} and leave encoding out"
    )
    with snapshot.path.open("rb") as raw:
        start = raw.read(4)
        # Byte order marks say what a file is only when it isn't read as the encoding that has one.
        if rules.utf8 and start.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):  # UTF-16's start too
            return ManifestError(f"{snapshot.name} is UTF-32 text, not UTF-8. {fix}")
        if rules.utf8 and start.startswith((b"\xff\xfe", b"\xfe\xff")):
            return ManifestError(f"{snapshot.name} is UTF-16 text, not UTF-8. {fix}")
        if start.startswith(b"\x1f\x8b"):
            plain = ".csv" if kind is ManifestFormat.CSV else ".jsonl"
            return ManifestError(
                f"{snapshot.name} is gzip-compressed: decompress it and give the {plain} file"
            )
        if start.startswith(b"PK\x03\x04"):
            what = "CSV" if kind is ManifestFormat.CSV else "JSON lines"
            return ManifestError(f"{snapshot.name} is a ZIP file or an Excel workbook, not {what}. {fix}")
        raw.seek(0)
        decoder = codecs.getincrementaldecoder(rules.encoding)()
        offset, newlines = 0, 0
        while block := raw.read(1 << 20):
            pending = len(decoder.getstate()[0])  # a character split across blocks, already counted
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                line = newlines + exc.object[: exc.start].count(b"\n") + 1
                return ManifestError(
                    f"{snapshot.name} is not {named}: byte 0x{exc.object[exc.start]:02X} at offset "
                    f"{offset - pending + exc.start} (line {line}) can't be decoded. {fix}"
                )
            except UnicodeError:
                break  # a codec that says no without saying where: the message below
            offset += len(block)
            newlines += block.count(b"\n")
        else:
            try:
                decoder.decode(b"", final=True)
            except UnicodeError:
                return ManifestError(
                    f"{snapshot.name} is not {named}: it ends in the middle of a character. {fix}"
                )
    return ManifestError(f"{snapshot.name} is not {named}. {fix}")


def _nul(values: list[str]) -> npt.NDArray[np.bool_]:
    """Where a value holds a NUL; a chunk without any (nearly every one) is told by one scan of its text."""
    if "\x00" not in "".join(values):
        return np.zeros(len(values), dtype=bool)
    return np.fromiter(("\x00" in v for v in values), dtype=bool, count=len(values))


def _blank(values: pd.Series[str]) -> npt.NDArray[np.bool_]:
    return values.str.strip().eq("").to_numpy(dtype=bool)


def _mark(codes: npt.NDArray[np.int8], failed: npt.NDArray[np.bool_], code: int) -> None:
    """Records `code` where a row fails and has no earlier failure: the first failure wins."""
    codes[failed & (codes == 0)] = code


def _label(column: str, role: str) -> str:
    return role if column == role else f"{column!r} ({role})"


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _hint(value: str) -> str:
    """What is wrong with a user_created_at that isn't ISO 8601 extended format, when it can be told."""
    if _ISO.fullmatch(value.strip()):
        return " without the spaces around it"
    if not value.isascii():
        return f" ({_non_ascii(value)}; use ASCII digits)"  # fullwidth digits look almost right
    if _BASIC.fullmatch(value):
        return (
            " (the basic format without - and : isn't accepted: 2021-05-18T15:14:43Z, not 20210518T151443Z)"
        )
    spaced = _SPACED_ZONE.fullmatch(value)
    if spaced and _ISO.fullmatch(spaced["time"]):
        if spaced["tz"] in ("UTC", "GMT"):
            return f" (for {spaced['tz']} write Z or +00:00 right after the time)"
        return " (remove the space before the time zone)"
    return ""


def _zone(text: str) -> timezone:
    """The UTC offset of `Z`, `z`, `+05`, `+0530` or `+05:30`."""
    if text in ("Z", "z"):
        return UTC
    hours, minutes = int(text[1:3]), int(text[3:].lstrip(":") or 0)
    if hours > 23 or minutes > 59:
        raise ValueError(f"UTC offset {text} is out of range")
    offset = timedelta(hours=hours, minutes=minutes)
    return timezone(-offset if text[0] == "-" else offset)


def _non_ascii(value: str) -> str:
    """Names the first non-ASCII character of `value`, e.g. "character 1 is U+0430 CYRILLIC SMALL LETTER A"."""
    at, char = next((i, c) for i, c in enumerate(value) if not c.isascii())
    return f"character {at + 1} is U+{ord(char):04X} {unicodedata.name(char, 'with no name')}"

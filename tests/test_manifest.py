"""The manifest reader: every data row lands once, as a Row or as a Reject with the right reason."""

from __future__ import annotations

import csv
import gzip
import io
import os
import re
import tempfile
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backfill.errors import ManifestError
from backfill.manifest import ManifestRules, Reject, open_manifest

from .conftest import Valid as Row
from .conftest import full_batches, png_bytes, validate_manifest

HEADER = "user_id,user_created_at,image_path"
NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
SAMPLE = Path(__file__).resolve().parent.parent / "sample_data" / "manifest.csv"


def png(seed: int = 0) -> bytes:
    return png_bytes(seed, size=2)


def jpeg(size: int = 200, *, end: bool = True) -> bytes:
    """Exactly `size` bytes: a JPEG's start, one APP0 segment filling the middle, and (unless told not to) its end."""
    return (
        b"\xff\xd8\xff\xe0"
        + (size - 6).to_bytes(2, "big")
        + b"\x01" * (size - 8)
        + (b"\xff\xd9" if end else b"\x01\x01")
    )


def rules(**changes: Any) -> ManifestRules:
    return ManifestRules(now=NOW, **changes)


def write(folder: Path, text: str, name: str = "manifest.csv") -> Path:
    path = folder / name
    path.write_bytes(text.encode())
    return path


def image(folder: Path, name: str, data: bytes | None = None) -> str:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png() if data is None else data)
    return name


def manifest_of(folder: Path, rows: list[tuple[str, str, str]]) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(HEADER.split(","))
    writer.writerows(rows)
    return write(folder, buffer.getvalue())


def read(path: Path, given_rules: ManifestRules | None = None) -> tuple[list[Row], list[Reject]]:
    batches = list(full_batches(open_manifest(path, given_rules or rules())))
    return [r for b in batches for r in b.rows], [r for b in batches for r in b.rejects]


def reasons(path: Path, given_rules: ManifestRules | None = None) -> dict[int, str]:
    """{line: reason}, with "ok" for a valid row."""
    rows, rejects = read(path, given_rules)
    return {r.line: "ok" for r in rows} | {r.line: r.reason for r in rejects}


def only_reject(path: Path, given_rules: ManifestRules | None = None) -> Reject:
    rows, rejects = read(path, given_rules)
    assert not rows and len(rejects) == 1, (rows, rejects)
    return rejects[0]


def one_row(
    tmp_path: Path, user_id: str = "u1", created: str = "2021-08-12", path: str | None = None
) -> Path:
    if path is None:
        path = image(tmp_path, "images/u1.png")
    return manifest_of(tmp_path, [(user_id, created, path)])


# --- reading ---------------------------------------------------------------------------------------------


def test_values_come_back_exactly_as_written(tmp_path: Path) -> None:
    ids = ["00123", "NA", "null", "1e5", "nan", "True", "0x1F", "-0"]
    path = manifest_of(tmp_path, [(i, "2021-08-12", image(tmp_path, f"{i}.png")) for i in ids])
    rows, rejects = read(path)
    assert not rejects
    assert [r.user_id for r in rows] == ids
    assert [r.line for r in rows] == list(range(2, 2 + len(ids)))


def test_bom_and_crlf(tmp_path: Path) -> None:
    image(tmp_path, "a.png")
    path = tmp_path / "m.csv"
    path.write_bytes(b"\xef\xbb\xbf" + f"{HEADER}\r\nu1,2021-08-12,a.png\r\nu2,2021-08-13,a.png\r\n".encode())
    rows, rejects = read(path)
    assert not rejects and [(r.line, r.user_id, r.user_created_at) for r in rows] == [
        (2, "u1", "2021-08-12"),
        (3, "u2", "2021-08-13"),
    ]


def test_quoted_comma_and_newline_keep_spreadsheet_line_numbers(tmp_path: Path) -> None:
    image(tmp_path, "smith, john.png")
    path = write(
        tmp_path,
        "user_id,note,user_created_at,image_path\n"
        'u1,"two\nlines, and a comma",2021-08-12,"smith, john.png"\n'
        'u2,"",2021-08-12,"smith, john.png"\n',
    )
    rows, rejects = read(path)
    assert not rejects
    assert [(r.line, r.user_id, r.image_path.name) for r in rows] == [
        (2, "u1", "smith, john.png"),
        (3, "u2", "smith, john.png"),
    ]


def test_columns_are_mapped_and_extra_columns_ignored(tmp_path: Path) -> None:
    image(tmp_path, "a.png")
    path = write(tmp_path, "photo,name,ref,created\na.png,Ann,c-1,2021-08-12\n")
    mapped = rules(user_id_column="ref", user_created_at_column="created", image_path_column="photo")
    rows, rejects = read(path, mapped)
    assert not rejects and [(r.user_id, r.user_created_at) for r in rows] == [("c-1", "2021-08-12")]


def test_missing_column_names_it_the_columns_found_and_the_fix(tmp_path: Path) -> None:
    path = write(tmp_path, "userid,user_created_at,photo\nu1,2021-08-12,a.png\n")
    with pytest.raises(ManifestError) as caught:
        open_manifest(path, rules())
    message = str(caught.value)
    assert "'user_id'" in message and "'image_path'" in message
    assert "did you mean 'userid'" in message
    assert "'userid', 'user_created_at', 'photo'" in message
    assert "columns:" in message and "rename" in message


@pytest.mark.parametrize(
    ("header", "example"),
    [
        ("user_id,user_created_at,photo_file", "columns: {image_path: photo_file}"),  # the one column left
        ("userid,user_created_at,photo", "columns: {user_id: userid, image_path: photo}"),
        ("user_id,signup,image_path,notes", "columns: {user_created_at: <its column>}"),  # two candidates
        ("user_id,user_created_at,selfie path", 'columns: {image_path: "selfie path"}'),  # quoted for YAML
        ("user_id,user_created_at,no", 'columns: {image_path: "no"}'),  # YAML would read a bare no as false
    ],
)
def test_missing_column_fix_maps_the_role_that_is_missing(tmp_path: Path, header: str, example: str) -> None:
    with pytest.raises(ManifestError) as caught:
        open_manifest(write(tmp_path, header + "\n"), rules())
    assert example in str(caught.value) and "customer_ref" not in str(caught.value)


def test_header_names_must_match_exactly(tmp_path: Path) -> None:
    path = write(tmp_path, "user_id ,user_created_at,image_path\nu1,2021-08-12,a.png\n")
    with pytest.raises(ManifestError, match=r"did you mean 'user_id '"):
        open_manifest(path, rules())


def test_duplicate_header_name_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "user_id,user_created_at,image_path,user_id\nu1,2021-08-12,a.png,u2\n")
    with pytest.raises(ManifestError, match="more than one column named 'user_id'"):
        open_manifest(path, rules())


def test_undecodable_bytes_name_the_offset_line_and_fix(tmp_path: Path) -> None:
    data = f"{HEADER}\nu1,2021-08-12,a.png\n".encode()
    path = tmp_path / "latin1.csv"
    path.write_bytes(data + b"Jos\xe9,2021-08-12,a.png\n")
    with pytest.raises(ManifestError) as caught:
        open_manifest(path, rules())
    message = str(caught.value)
    assert str(path) in message and f"offset {len(data) + 3}" in message and "line 3" in message
    assert "0xE9" in message and "save the file as UTF-8" in message


@pytest.mark.parametrize(
    ("name", "data", "says"),
    [
        ("utf16.csv", f"{HEADER}\nu1,2021-08-12,a.png\n".encode("utf-16"), "UTF-16"),
        ("m.csv.gz", gzip.compress(f"{HEADER}\n".encode()), "gzip"),  # never decompressed behind our back
        ("m.xlsx", b"PK\x03\x04" + bytes(range(256)), "Excel"),
    ],
)
def test_other_formats_are_recognised(tmp_path: Path, name: str, data: bytes, says: str) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ManifestError, match=says):
        open_manifest(path, rules())


@pytest.mark.parametrize(
    "data", [b"", b"\xef\xbb\xbf", b"\n", b"\nuser_id\n"], ids=["empty", "bom", "nl", "blank1"]
)
def test_no_header_is_an_error(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes(data)
    with pytest.raises(ManifestError, match=r"empty|header"):
        open_manifest(path, rules())


def test_header_only(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + "\n")
    manifest = open_manifest(path, rules())
    assert (manifest.total_rows, manifest.duplicate_ids) == (0, 0)
    assert full_batches(manifest) == []
    assert validate_manifest(path, rules()) == (0, [])


def test_manifest_must_be_a_readable_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="doesn't exist"):
        open_manifest(tmp_path / "nope.csv", rules())
    with pytest.raises(ManifestError, match="a folder"):
        open_manifest(tmp_path, rules())
    os.mkfifo(tmp_path / "pipe.csv")
    with pytest.raises(ManifestError, match="FIFO"):
        open_manifest(tmp_path / "pipe.csv", rules())


def test_ragged_rows_are_rejected_not_lost(tmp_path: Path) -> None:
    image(tmp_path, "a.png")
    path = write(
        tmp_path,
        f"{HEADER}\n"
        "u1,2021-08-12,a.png,surprise\n"  # the first data row: pandas alone would silently drop "surprise"
        "u2,2021-08-12,a.png\n"
        "u3,2021-08-12,a.png,,\n"  # trailing commas: nothing is lost, the row is fine
        "u4,2021-08-12,a.png,, x\n"
        "Smith, John,2021-08-12,a.png\n"
        "u6,2021-08-12\n",  # too few fields: image_path is empty
    )
    _, rejects = read(path)
    assert reasons(path) == {
        2: "malformed_row",
        3: "ok",
        4: "ok",
        5: "malformed_row",
        6: "malformed_row",
        7: "empty_value",
    }
    first = next(r for r in rejects if r.line == 2)
    assert first.user_id == "u1" and "4 values" in first.message and "3 columns" in first.message
    assert "quote" in first.message
    assert "image_path" in next(r for r in rejects if r.line == 7).message


def test_blank_lines_are_rows_so_line_numbers_stay_true(tmp_path: Path) -> None:
    image(tmp_path, "a.png")
    path = write(tmp_path, f"{HEADER}\nu1,2021-08-12,a.png\n\n   \nu2,2021-08-12,a.png\n\n")
    assert reasons(path) == {2: "ok", 3: "empty_value", 4: "empty_value", 5: "ok", 6: "empty_value"}
    assert "blank" in {r.line: r for r in read(path)[1]}[3].message


def test_unclosed_quote_is_an_error_naming_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, f'{HEADER}\nu1,2021-08-12,a.png\nu2,"2021-08-12,a.png\nu3,2021-08-12,a.png\n')
    with pytest.raises(ManifestError, match="quote opened on line 3 is never closed"):
        open_manifest(path, rules())


def test_long_values_in_other_columns_are_fine(tmp_path: Path) -> None:
    image(tmp_path, "a.png")
    limit = csv.field_size_limit()
    path = write(tmp_path, f"{HEADER},notes\nu1,2021-08-12,a.png,{'x' * 300_000}\n")
    rows, rejects = read(path)
    assert len(rows) == 1 and not rejects
    assert csv.field_size_limit() == limit  # the process-wide limit is put back


def test_a_file_changed_after_open_is_refused(tmp_path: Path) -> None:
    path = one_row(tmp_path)
    manifest = open_manifest(path, rules())
    with path.open("a") as handle:
        handle.write("u2,2021-08-12,images/u1.png\n")
    with pytest.raises(ManifestError, match="changed"):
        full_batches(manifest)


# --- validation, rule by rule ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "named"),
    [
        (("", "2021-08-12", "images/u1.png"), "user_id"),
        (("  ", "2021-08-12", "images/u1.png"), "user_id"),
        (("u1", "", "images/u1.png"), "user_created_at"),
        (("u1", "2021-08-12", "\t"), "image_path"),
    ],
)
def test_empty_value(tmp_path: Path, row: tuple[str, str, str], named: str) -> None:
    image(tmp_path, "images/u1.png")
    reject = only_reject(manifest_of(tmp_path, [row]))
    assert reject.reason == "empty_value" and named in reject.message and reject.user_id == row[0]


def test_empty_value_names_the_mapped_column(tmp_path: Path) -> None:
    path = write(tmp_path, "ref,created,photo\nu1,,a.png\n")
    mapped = rules(user_id_column="ref", user_created_at_column="created", image_path_column="photo")
    assert "'created' (user_created_at)" in only_reject(path, mapped).message


@pytest.mark.parametrize(
    "user_id", ["bad id!", " user1", "user1 ", "us\u00e9r", "\uff55ser", "user.1", "user\n1", "a@b"]
)
def test_bad_user_id(tmp_path: Path, user_id: str) -> None:
    reject = only_reject(one_row(tmp_path, user_id))
    assert reject.reason == "bad_user_id" and reject.user_id == user_id
    assert repr(user_id) in reject.message and "[A-Za-z0-9_-]+" in reject.message
    assert "user_id_pattern" in reject.message


def test_user_id_pattern_is_configurable_but_ascii_only(tmp_path: Path) -> None:
    image(tmp_path, "a.png")
    path = manifest_of(tmp_path, [("a.b", "2021-08-12", "a.png"), ("\u00e9t\u00e9", "2021-08-12", "a.png")])
    assert reasons(path, rules(user_id_pattern=r"[\w.]+")) == {2: "ok", 3: "bad_user_id"}


def test_a_nul_is_refused_in_every_column_used_whatever_the_pattern(tmp_path: Path) -> None:
    # No API takes a NUL, and a fleet's PostgreSQL ledger can't store one, even in a reject's user_id.
    image(tmp_path, "a.png")
    path = manifest_of(
        tmp_path,
        [
            ("a\x00", "2021-08-12", "a.png"),
            ("b", "2021-08-12", "a\x00.png"),
            ("c", "2021-08-12\x00", "a.png"),
        ],
    )
    rows, rejects = read(path, rules(user_id_pattern=r"[^,]+"))  # a pattern that a NUL matches
    assert not rows
    assert [(r.line, r.reason, r.user_id) for r in rejects] == [
        (2, "bad_user_id", "a\u2400"),
        (3, "image_missing", "b"),
        (4, "bad_date", "c"),
    ]
    assert "'a\\x00' contains a NUL character (character 2)" in rejects[0].message
    assert "'a\\x00.png' contains a NUL character" in rejects[1].message
    assert not any("\x00" in r.user_id + r.message for r in rejects)


def test_every_occurrence_of_a_duplicate_is_rejected_across_chunks(tmp_path: Path) -> None:
    image(tmp_path, "a.png")
    ids = ["d1", "u1", "d2", "u2", "d1", "u3", "d2", "u4", "d1", "", "", "bad id", "bad id"]
    # Each line on another day: lines that differ (exact copies are duplicate_row, test_manifest_copies.py).
    path = manifest_of(tmp_path, [(i, f"2021-08-{n + 1:02d}", "a.png") for n, i in enumerate(ids)])
    manifest = open_manifest(path, rules(chunk_rows=2))
    assert manifest.duplicate_ids == 2  # blank and invalid ids are rejected for what they are, not counted
    found = {r.line: r for b in full_batches(manifest) for r in b.rejects}
    assert {line for line, r in found.items() if r.reason == "duplicate_user_id"} == {2, 4, 6, 8, 10}
    assert "appears 3 times" in found[2].message and "lines 2, 6, 10" in found[2].message
    assert "appears 2 times" in found[4].message and "lines 4, 8" in found[4].message


def test_duplicate_message_lists_the_first_lines_and_counts_the_rest(tmp_path: Path) -> None:
    image(tmp_path, "a.png")
    path = manifest_of(tmp_path, [("same", f"2021-08-{n + 1:02d}", "a.png") for n in range(25)])
    _, rejects = read(path)
    assert len(rejects) == 25 and "appears 25 times" in rejects[0].message
    assert "lines 2, 3, 4, 5, 6, 7, 8, 9, 10, 11 and 15 more" in rejects[0].message


@pytest.mark.parametrize(
    "created",
    [
        "2021-08-12",
        "2021-05-18 15:14:43-0700",
        "2021-05-18T15:14:43Z",
        "2021-05-18T15:14:43.123+01:00",
        "2021-05-18 15:14",
        "2020-02-29",
        "1900-01-01",
        "2030-01-01",  # today (NOW's date) is not the future
        "2030-01-01T12:00:00Z",  # exactly now
        "2030-01-01T13:00:00+02:00",  # 11:00 UTC
        "2021-05-18T15:14:43.123456789Z",
        # No zone: the partner's wall time. Only later than the latest clock on Earth (UTC+14) is the future.
        "2030-01-01 15:00:00",  # Nairobi (UTC+3) at NOW: a nightly export's last users
        "2030-01-02 02:00:00",  # exactly now at UTC+14
        "2030-01-02",  # today at UTC+14
        # As databases and languages write them (see test_dates_as_systems_write_them for more).
        "2021-05-18 15:14:43.924617+00",  # PostgreSQL timestamptz: an hour-only offset
        "2021-05-18 15:14:43.924617+05:30",
        "2021-05-18 15:14:43-0330",
        "2021-05-18T15:14:43.9246170Z",  # .NET "o"
        "2021-05-18T15:14:43.924Z",  # JavaScript toISOString()
        "2021-05-18 15:14:43,924",  # Python logging: ISO 8601's comma
        "2021-05-18t15:14:43z",  # RFC 3339 allows lower case
        "2021-08-12T15",  # isoformat(timespec="hours")
        "2021-08-12T15+05:00",
        "2016-12-31T23:59:60Z",  # a leap second
        "2021-05-18T15:14:43.12345678901234567890+01",  # a fraction of any length
    ],
)
def test_good_dates(tmp_path: Path, created: str) -> None:
    rows, rejects = read(one_row(tmp_path, created=created))
    assert not rejects and rows[0].user_created_at == created


@pytest.mark.parametrize(
    "created",
    [
        "12/08/2021",
        "2021-8-12",
        "20210812",
        " 2021-08-12",
        "2021-08-12 ",
        "2021-08-12T",
        "2021-08-12T1",
        "2021-13-01",
        "2021-02-30",
        "2021-05-18 24:00",
        "2021-05-18 15:60",
        "2021-05-18T15:14:43+2500",
        "2021-05-18T15:14:43+01:60",
        "2021-05-18T15:14:43 Z",
        "\uff12021-08-12",
        "1899-12-31",
        "0000-01-01",
        "NA",
        "20210518T151443Z",
        "2021-W20-2",
        "2021-138",
        "2021-05-18T15:14:43.",
        "2021-05-18T15:14:43+5",
        "2021-05-18T15:14:43+05:3",
        "2021-05-18T15:14:60Z",
        "9999-12-31T23:59:60",
        "2021-05-18T1514",
        "2021-05-18 15:14:43 UTC",
        "2021-05-18T15:14:43+05:30[Asia/Kolkata]",
    ],
)
def test_bad_dates(tmp_path: Path, created: str) -> None:
    reject = only_reject(one_row(tmp_path, created=created))
    assert reject.reason == "bad_date" and repr(created) in reject.message


def test_bad_date_messages_say_why(tmp_path: Path) -> None:
    assert "2021-08-12" in only_reject(one_row(tmp_path, created="12/08/2021")).message
    assert "spaces" in only_reject(one_row(tmp_path, created=" 2021-08-12")).message
    assert "plausible" in only_reject(one_row(tmp_path, created="1899-12-31")).message
    assert "not a real date" in only_reject(one_row(tmp_path, created="2021-02-30")).message
    basic = only_reject(one_row(tmp_path, created="20210518T151443Z")).message
    assert "2021-05-18T15:14:43Z, not 20210518T151443Z" in basic
    spaced = "2021-05-18 15:14:43.9246170 +05:30"  # SQL Server's datetimeoffset as text
    assert "remove the space before the time zone" in only_reject(one_row(tmp_path, created=spaced)).message
    utc = only_reject(one_row(tmp_path, created="2021-05-18 15:14:43 UTC")).message
    assert "write Z or +00:00" in utc


@pytest.mark.parametrize(
    "created",
    [
        "2030-01-03",
        "2030-01-01T12:00:01Z",
        "2030-01-01T12:30:00+00:15",
        "2099-01-01",
        "2030-01-02 02:00:01",  # one second past the present at UTC+14
        "2030-01-02T02:00:00.000001",
        "2030-01-02 03",
    ],
)
def test_future_dates(tmp_path: Path, created: str) -> None:
    reject = only_reject(one_row(tmp_path, created=created))
    assert reject.reason == "future_date" and "future" in reject.message


def test_now_defaults_to_the_time_of_opening(tmp_path: Path) -> None:
    path = one_row(tmp_path, created="2099-01-01")
    assert only_reject(path, ManifestRules()).reason == "future_date"
    rows, _ = read(one_row(tmp_path, created="2021-08-12"), ManifestRules())
    assert len(rows) == 1


def test_relative_paths_resolve_against_the_manifest_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    data = png(3)
    image(tmp_path, "images/a.png", data)
    absolute = tmp_path / "b.png"
    absolute.write_bytes(jpeg(300))
    path = manifest_of(tmp_path, [("u1", "2021-08-12", "images/a.png"), ("u2", "2021-08-12", str(absolute))])
    rows, rejects = read(path)
    assert not rejects
    assert rows[0].image_path == (tmp_path / "images/a.png").resolve() and rows[0].image_path.is_absolute()
    assert rows[0].image_size == len(data)
    assert rows[1].image_path == absolute.resolve()


def test_path_outside_root(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    image(root, "in.png")
    image(tmp_path, "out.png")
    (root / "link-out.png").symlink_to(tmp_path / "out.png")
    (root / "link-in.png").symlink_to(root / "in.png")
    (tmp_path / "photos-evil").mkdir()
    image(tmp_path, "photos-evil/x.png")
    path = manifest_of(
        tmp_path,
        [
            ("u1", "2021-08-12", "photos/in.png"),
            ("u2", "2021-08-12", "out.png"),
            ("u3", "2021-08-12", "photos/../out.png"),
            ("u4", "2021-08-12", "photos/link-out.png"),
            ("u5", "2021-08-12", "photos/link-in.png"),
            ("u6", "2021-08-12", "photos-evil/x.png"),  # a sibling whose name starts with the root's
            ("u7", "2021-08-12", "photos/missing.png"),
        ],
    )
    confined = rules(images_root=root)
    assert reasons(path, confined) == {
        2: "ok",
        3: "path_outside_root",
        4: "path_outside_root",
        5: "path_outside_root",
        6: "ok",
        7: "path_outside_root",
        8: "image_missing",
    }
    rows, rejects = read(path, confined)
    assert rows[1].image_path == (root / "in.png").resolve()  # a symbolic link counts where it points
    assert "images_root" in rejects[0].message
    assert all(r == "ok" for r in reasons(path).values() if r != "image_missing")  # no root: anything goes


def test_images_root_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="images_root"):
        open_manifest(one_row(tmp_path), rules(images_root=tmp_path / "nope"))


def test_missing_images(tmp_path: Path) -> None:
    image(tmp_path, "file.png")
    (tmp_path / "broken.png").symlink_to(tmp_path / "gone.png")
    (tmp_path / "loop1.png").symlink_to(tmp_path / "loop2.png")
    (tmp_path / "loop2.png").symlink_to(tmp_path / "loop1.png")
    names = ["nope.png", "broken.png", "loop1.png", "file.png/inside.png", "x" * 300 + ".png", "nope.png "]
    path = manifest_of(tmp_path, [(f"u{i}", "2021-08-12", n) for i, n in enumerate(names)])
    _, rejects = read(path)
    assert [r.reason for r in rejects] == ["image_missing"] * len(names)
    messages = [r.message for r in rejects]
    assert "doesn't exist" in messages[0] and "gone.png" in messages[1] and "loops" in messages[2]
    assert "spaces" in messages[5]


def test_not_a_file(tmp_path: Path) -> None:
    (tmp_path / "folder.png").mkdir()
    path = manifest_of(tmp_path, [("u1", "2021-08-12", "folder.png"), ("u2", "2021-08-12", "/dev/null")])
    _, rejects = read(path)
    assert [r.reason for r in rejects] == ["image_not_file", "image_not_file"]
    assert "folder" in rejects[0].message and "device" in rejects[1].message


def test_a_fifo_is_rejected_without_opening_it(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.jpg")
    path = manifest_of(tmp_path, [("u1", "2021-08-12", "pipe.jpg")])
    result: list[Reject] = []
    worker = threading.Thread(target=lambda: result.extend(validate_manifest(path, rules())[1]), daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "reading a FIFO hung"
    assert [r.reason for r in result] == ["image_not_file"] and "FIFO" in result[0].message


def test_unreadable_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image(tmp_path, "locked.png")
    real_open = os.open

    def refuse(path: str, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith("locked.png"):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)  # the image check opens with os.open; pandas and csv do not
    reject = only_reject(manifest_of(tmp_path, [("u1", "2021-08-12", "locked.png")]))
    assert reject.reason == "image_unreadable" and "permission denied" in reject.message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads everything")
def test_unreadable_image_for_real(tmp_path: Path) -> None:
    image(tmp_path, "locked.png")
    (tmp_path / "locked.png").chmod(0)
    (tmp_path / "closed").mkdir()
    image(tmp_path, "closed/a.png")
    (tmp_path / "closed").chmod(0)
    try:
        path = manifest_of(
            tmp_path, [("u1", "2021-08-12", "locked.png"), ("u2", "2021-08-12", "closed/a.png")]
        )
        assert set(reasons(path).values()) == {"image_unreadable"}
    finally:
        (tmp_path / "closed").chmod(0o700)


def test_empty_image(tmp_path: Path) -> None:
    image(tmp_path, "empty.jpg", b"")
    assert only_reject(manifest_of(tmp_path, [("u1", "2021-08-12", "empty.jpg")])).reason == "image_empty"


def test_size_limit_is_inclusive(tmp_path: Path) -> None:
    image(tmp_path, "exact.jpg", jpeg(5000))
    image(tmp_path, "over.jpg", jpeg(5001))
    path = manifest_of(tmp_path, [("u1", "2021-08-12", "exact.jpg"), ("u2", "2021-08-12", "over.jpg")])
    limited = rules(max_image_bytes=5000)
    assert reasons(path, limited) == {2: "ok", 3: "image_too_large"}
    message = read(path, limited)[1][0].message
    assert "5,001" in message and "5,000" in message


@pytest.mark.parametrize(
    ("data", "looks_like"),
    [
        (b"just some notes\n", "text"),
        (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00;", "GIF"),
        (b"RIFF\x10\x00\x00\x00WEBPVP8 ", "WebP"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00", "HEIC"),
        (b"<!DOCTYPE html><html>404</html>", "HTML"),
        (b"%PDF-1.7\n", "PDF"),
        (b"\x89PNX\r\n\x1a\n" + b"\x00" * 20, "bytes 89 50 4e 58"),
        (b"\xff\xd8\x00", "damaged"),
    ],
)
def test_not_jpeg_or_png(tmp_path: Path, data: bytes, looks_like: str) -> None:
    image(tmp_path, "photo.jpg", data)
    reject = only_reject(manifest_of(tmp_path, [("u1", "2021-08-12", "photo.jpg")]))
    assert reject.reason == "image_not_jpeg_or_png" and looks_like in reject.message


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (jpeg(300), "ok"),
        (jpeg(300, end=False), "image_truncated"),
        (jpeg(300) + b"\x00" * 900, "ok"),  # zero padding after the end marker is common
        (jpeg(300) + b"\x00" * 2000, "ok"),  # data after the end marker, however much, is not a cut
        (jpeg(20_000), "ok"),  # large enough to be read as head + tail
        (jpeg(20_000, end=False), "image_truncated"),
        (png(), "ok"),
        (png()[:-12], "image_truncated"),
        (png()[:-12] + b"\x00" * 5000, "image_truncated"),
        (png() + b"trailing junk", "ok"),
    ],
)
def test_truncated_images(tmp_path: Path, data: bytes, expected: str) -> None:
    image(tmp_path, "photo", data)
    assert reasons(manifest_of(tmp_path, [("u1", "2021-08-12", "photo")])) == {2: expected}


def test_first_failure_wins(tmp_path: Path) -> None:
    image(tmp_path, "a.png")
    path = manifest_of(
        tmp_path,
        [
            ("bad id", "", "missing.png"),  # empty beats bad id
            ("bad id", "nonsense", "missing.png"),  # bad id beats bad date
            ("dup", "nonsense", "missing.png"),  # duplicate beats bad date
            ("dup", "2021-08-12", "missing.png"),  # duplicate beats missing image
            ("u1", "2099-01-01", "missing.png"),  # future beats missing image
        ],
    )
    assert list(reasons(path).values()) == [
        "empty_value",
        "bad_user_id",
        "duplicate_user_id",
        "duplicate_user_id",
        "future_date",
    ]


def mixed_manifest(folder: Path) -> Path:
    image(folder, "ok.png")
    image(folder, "text.jpg", b"hello")
    rows = []
    for i in range(40):
        kind = i % 8
        rows.append(
            (
                f"u{i}" if kind != 1 else "bad id",
                "2021-08-12" if kind != 2 else "2021-02-30",
                "ok.png" if kind not in (3, 4) else ("missing.png" if kind == 3 else "text.jpg"),
            )
        )
    rows[7], rows[30] = ("twice", "2021-08-12", "ok.png"), ("twice", "2021-08-13", "ok.png")
    return manifest_of(folder, rows)


@pytest.mark.parametrize("chunk_rows", [1, 3, 7])
def test_small_chunks_give_the_same_answer_and_account_for_every_row(tmp_path: Path, chunk_rows: int) -> None:
    path = mixed_manifest(tmp_path)
    whole = open_manifest(path, rules(chunk_rows=10_000))
    assert whole.total_rows == 40 and whole.duplicate_ids == 1
    expected = full_batches(whole)
    assert len(expected) == 1
    chunked = open_manifest(path, rules(chunk_rows=chunk_rows))
    batches = full_batches(chunked)
    assert len(batches) == -(-40 // chunk_rows)
    assert [r for b in batches for r in b.rows] == expected[0].rows
    assert [r for b in batches for r in b.rejects] == expected[0].rejects
    lines = sorted([r.line for b in batches for r in b.rows] + [r.line for b in batches for r in b.rejects])
    assert lines == list(range(2, 42))
    for batch in batches:
        assert [r.line for r in batch.rows] == sorted(r.line for r in batch.rows)
        assert [r.line for r in batch.rejects] == sorted(r.line for r in batch.rejects)


def test_validate_manifest_counts_valid_rows_and_keeps_rejects(tmp_path: Path) -> None:
    path = mixed_manifest(tmp_path)
    valid, rejects = validate_manifest(path, rules(chunk_rows=4))
    rows, expected_rejects = read(path)
    assert valid == len(rows) and rejects == expected_rejects and valid + len(rejects) == 40


# --- generated manifests ---------------------------------------------------------------------------------

PATTERN = re.compile(r"[A-Za-z0-9_-]+")
GOOD_DATES = ["2021-08-12", "2021-05-18 15:14:43-0700", "2021-05-18T15:14:43Z", "2029-12-31T23:59:59.5+01:00"]
BAD_DATES = ["2021-02-30", "12/08/2021", "1800-01-01", "2021-08-12 ", "x"]
FUTURE_DATES = ["2031-01-01", "2030-01-01T12:00:01Z"]
# Image name -> the reason it gives (None: fine). Created once per example by `make_images`.
IMAGES: dict[str, str | None] = {
    "a.png": None,
    "b.jpg": None,
    "dir/c.jpg": None,
    "missing.png": "image_missing",
    "text.jpg": "image_not_jpeg_or_png",
    "cut.jpg": "image_truncated",
    "empty.png": "image_empty",
    "folder": "image_not_file",
}


def make_images(folder: Path) -> None:
    image(folder, "a.png")
    image(folder, "b.jpg", jpeg())
    image(folder, "dir/c.jpg", jpeg(500))
    image(folder, "text.jpg", b"text")
    image(folder, "cut.jpg", jpeg(end=False))
    image(folder, "empty.png", b"")
    (folder / "folder").mkdir()


ids = st.one_of(
    st.sampled_from(["u1", "u2", "u3", "00123", "NA", "null", "a-b_c"]),
    st.text(alphabet="abcXYZ019_-", min_size=1, max_size=6),
    st.text(st.characters(exclude_categories=["Cs"]), max_size=6),
)
rows_strategy = st.lists(
    st.tuples(
        ids,
        st.sampled_from(GOOD_DATES + BAD_DATES + FUTURE_DATES + ["", " "]),
        st.sampled_from([*IMAGES, ""]),
        st.sampled_from([None, None, None, "", "extra"]),  # an extra field: blank (fine) or not (malformed)
    ),
    max_size=25,
)


def expected_reason(
    row: tuple[str, str, str, str | None], counts: Counter[str], *, copy: bool, same: bool
) -> str:
    """An independent statement of the rules, for the finite pools above. `copy`: the row is a later line of an
    id whose lines all have the `same` date and photo."""
    user_id, created, name, extra = row
    if extra:
        return "malformed_row"
    if not user_id.strip() or not created.strip() or not name.strip():
        return "empty_value"
    if not (user_id.isascii() and PATTERN.fullmatch(user_id)):
        return "bad_user_id"
    if counts[user_id] > 1 and not same:
        return "duplicate_user_id"
    if copy:
        return "duplicate_row"
    if created in BAD_DATES:
        return "bad_date"
    if created in FUTURE_DATES:
        return "future_date"
    return IMAGES[name] or "ok"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=rows_strategy, chunk_rows=st.integers(min_value=1, max_value=8))
def test_generated_manifests(rows: list[tuple[str, str, str, str | None]], chunk_rows: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        make_images(base)
        buffer = io.StringIO()
        writer = csv.writer(buffer)  # "\r\n" line ends, so a lone "\r" or "\n" in a value gets quoted
        writer.writerow(HEADER.split(","))
        writer.writerows([u, c, n] if x is None else [u, c, n, x] for u, c, n, x in rows)
        path = write(base, buffer.getvalue())
        try:
            manifest = open_manifest(path, rules(chunk_rows=chunk_rows))
            batches = full_batches(manifest)
        except ManifestError:
            return  # allowed: the file as a whole is unusable (never expected with csv-written files)
        assert manifest.total_rows == len(rows)
        got = {r.line: "ok" for b in batches for r in b.rows} | {
            r.line: r.reason for b in batches for r in b.rejects
        }
        assert sorted(got) == list(range(2, len(rows) + 2)) and len(got) == sum(
            len(b.rows) + len(b.rejects) for b in batches
        )
        valid_ids = [r.user_id for b in batches for r in b.rows]
        assert len(valid_ids) == len(set(valid_ids)) and all(PATTERN.fullmatch(i) for i in valid_ids)
        counts = Counter(u for u, *_ in rows)
        values = {uid: {(c, n) for u, c, n, _ in rows if u == uid} for uid in counts}
        first = {uid: next(i for i, r in enumerate(rows) if r[0] == uid) for uid in counts}
        assert got == {
            i + 2: expected_reason(row, counts, copy=i != first[row[0]], same=len(values[row[0]]) == 1)
            for i, row in enumerate(rows)
        }


# --- dates as databases and languages write them -----------------------------------------------------------

# Whole-minute offsets from UTC-12 to UTC+14, the range of real zones.
offsets = st.one_of(st.none(), st.integers(-12 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m))))
moments = st.builds(
    lambda naive, zone: naive.replace(tzinfo=zone),
    st.datetimes(min_value=datetime(1900, 1, 2), max_value=datetime(2029, 12, 30)),
    offsets,
)


def _hours_offset(moment: datetime, *, colon: bool = True) -> str:
    """+05:30, or +00 when the minutes are zero, as PostgreSQL writes a timestamptz's offset."""
    text = moment.strftime("%z")  # +0530
    if text[3:] == "00":
        return text[:3]
    return f"{text[:3]}:{text[3:]}" if colon else text


def _fraction(moment: datetime, digits: int) -> str:
    return f"{moment.microsecond:06d}{'0' * max(0, digits - 6)}"[:digits]


def written_by_systems(moment: datetime) -> list[str]:
    """`moment` as Python, PostgreSQL, MySQL, JavaScript and .NET write it."""
    utc = moment.astimezone(UTC) if moment.tzinfo is not None else moment
    plain = moment.strftime("%Y-%m-%d %H:%M:%S")
    out = [
        moment.isoformat(sep=sep, timespec=spec)
        for sep in "T "
        for spec in ("auto", "hours", "minutes", "seconds", "milliseconds", "microseconds")
    ]
    out.append(moment.date().isoformat())
    # PostgreSQL: timestamp(tz) as text, trailing zeros of the fraction dropped, an hour-only offset when it can.
    pg = plain + (f".{moment.microsecond:06d}".rstrip("0").rstrip(".") if moment.microsecond else "")
    out.append(pg + (_hours_offset(moment) if moment.tzinfo is not None else ""))
    # MySQL: DATETIME, DATETIME(3), DATETIME(6).
    out += [plain, f"{plain}.{_fraction(moment, 3)}", f"{plain}.{_fraction(moment, 6)}"]
    # JavaScript: Date.prototype.toISOString(), always UTC with milliseconds.
    out.append(utc.strftime("%Y-%m-%dT%H:%M:%S.") + _fraction(utc, 3) + "Z")
    # .NET: DateTime.ToString("o"), 7 digits, "Z" for UTC, an offset for local, nothing for unspecified.
    dotnet = moment.strftime("%Y-%m-%dT%H:%M:%S.") + _fraction(moment, 7)
    out += [utc.strftime("%Y-%m-%dT%H:%M:%S.") + _fraction(utc, 7) + "Z"]
    out += [dotnet + (moment.strftime("%z")[:3] + ":" + moment.strftime("%z")[3:] if moment.tzinfo else "")]
    # Java Instant/OffsetDateTime.toString(), Go time.RFC3339, a basic "+0530" offset.
    if moment.tzinfo is not None:
        out += [moment.strftime("%Y-%m-%dT%H:%M:%S%z"), utc.strftime("%Y-%m-%dT%H:%M:%SZ").lower()]
    return out


@settings(max_examples=60, deadline=None)
@given(moment=moments)
def test_dates_as_systems_write_them(moment: datetime) -> None:
    values = written_by_systems(moment)
    with tempfile.TemporaryDirectory() as folder:
        path = manifest_of(Path(folder), [(f"u{i}", v, "a.png") for i, v in enumerate(values)])
        batches = list(open_manifest(path, rules()).batches())
    rejects = [r for b in batches for r in b.rejects]
    assert not rejects, rejects[0].message
    # Sent exactly as written.
    assert [c.user_created_at for b in batches for c in b.candidates] == values


def test_a_zoneless_time_is_the_partners_wall_time(tmp_path: Path) -> None:
    # Found by a partner in Nairobi (UTC+3): its 23:00 export, read as UTC, had three hours of "future" users.
    nairobi_now = NOW.astimezone(timezone(timedelta(hours=3))).replace(tzinfo=None)
    rows, rejects = read(one_row(tmp_path, created=nairobi_now.isoformat(sep=" ")))
    assert len(rows) == 1 and not rejects
    latest = (NOW + timedelta(hours=14)).replace(tzinfo=None)  # the present at UTC+14
    assert not read(one_row(tmp_path, created=latest.isoformat()))[1]
    later = only_reject(one_row(tmp_path, created=(latest + timedelta(seconds=1)).isoformat()))
    assert later.reason == "future_date" and "no time zone" in later.message and "UTC+14" in later.message
    # A date: the future only after today at UTC+14.
    assert not read(one_row(tmp_path, created=latest.date().isoformat()))[1]
    tomorrow = only_reject(one_row(tmp_path, created=(latest.date() + timedelta(days=1)).isoformat()))
    assert tomorrow.reason == "future_date" and "UTC+14" in tomorrow.message
    # With a zone, the instant is known: a second past now is the future.
    assert only_reject(one_row(tmp_path, created="2030-01-01T15:00:01+03:00")).reason == "future_date"


# --- the sample data -------------------------------------------------------------------------------------


def test_sample_data_counts() -> None:
    # From the rows written by sample_data/make_sample_data.py (see sample_data/README.md).
    expected = {
        "ok": 15,
        "duplicate_user_id": 2,
        "empty_value": 1,
        "future_date": 1,
        "bad_date": 1,
        "bad_user_id": 1,
        "image_missing": 1,
        "image_not_jpeg_or_png": 2,
    }
    got = reasons(SAMPLE, ManifestRules())
    assert Counter(got.values()) == expected
    assert open_manifest(SAMPLE, ManifestRules()).total_rows == 24
    rows, _ = read(SAMPLE, ManifestRules())
    assert "00123" in {r.user_id for r in rows}


@settings(max_examples=200, deadline=None)
@given(
    body=st.text(alphabet='a1,"\r\n \x00é-', max_size=60), chunk_rows=st.integers(min_value=1, max_value=4)
)
def test_arbitrary_text_is_read_or_refused_as_a_whole(body: str, chunk_rows: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = write(Path(folder), f"{HEADER}\n{body}")
        try:
            manifest = open_manifest(path, rules(chunk_rows=chunk_rows))
            batches = full_batches(manifest)
        except ManifestError:
            return
        lines = sorted(
            [r.line for b in batches for r in b.rows] + [r.line for b in batches for r in b.rejects]
        )
        assert lines == list(range(2, manifest.total_rows + 2))


@given(
    chunks=st.lists(
        st.lists(st.sampled_from(["a", "b", "c", "d", "e", "f", "g", "00123", "123"]), max_size=9)
    ),
    block=st.integers(min_value=1, max_value=5),
)
def test_the_prescan_finds_exactly_the_repeated_ids_across_its_blocks(
    chunks: list[list[str]], block: int
) -> None:
    # The pre-scan keeps its hashes in blocks (for its peak memory); a chunk may span several blocks, a block
    # several chunks, and the last block is partly used: whatever the cut, the repeated ids are the same.
    from backfill.manifest import _Hashes

    hashes = _Hashes(block)
    for chunk in chunks:
        hashes.add(chunk)
    counts = Counter(uid for chunk in chunks for uid in chunk)
    assert sorted(hashes.repeated().tolist()) == sorted(hash(uid) for uid, n in counts.items() if n > 1)

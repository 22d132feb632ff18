"""Manifests as JSON lines and Parquet: the same rows give the same outcomes as CSV, values stay text as written."""

from __future__ import annotations

import csv
import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from backfill import compose
from backfill.config import Settings
from backfill.errors import ManifestError
from backfill.manifest import Candidate, ManifestRules, Reject, format_of, open_manifest
from backfill.sandbox import RunningSandbox

from .conftest import cli, png_bytes, sandbox_ledger
from .storage_servers import StorageServer
from .test_storage_e2e import Bucket, store  # noqa: F401 (its fixture, used below)

Rows = list[tuple[str, str, str]]
COLUMNS = ["user_id", "user_created_at", "image_path"]


def write_csv(path: Path, rows: Rows) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: Rows) -> Path:
    path.write_text("".join(json.dumps(dict(zip(COLUMNS, row, strict=True))) + "\n" for row in rows))
    return path


def write_parquet(path: Path, rows: Rows, row_group_size: int = 1000, **types: pa.DataType) -> Path:
    columns = {
        name: pa.array([row[i] for row in rows], type=types.get(name, pa.string()))
        for i, name in enumerate(COLUMNS)
    }
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


WRITERS: dict[str, tuple[Callable[[Path, Rows], Path], str, int]] = {
    # format: (writer, file name, the number of the first data row)
    "csv": (write_csv, "m.csv", 2),
    "jsonl": (write_jsonl, "m.jsonl", 1),
    "parquet": (write_parquet, "m.parquet", 1),
}


def mixed_rows(n: int, seed: int = 7) -> Rows:
    """Every kind of row the text and image checks tell apart, shuffled."""
    rng = random.Random(seed)
    rows: Rows = []
    for i in range(n):
        kind = rng.randrange(10)
        if kind == 0 and rows:
            rows.append(rng.choice(rows))  # an exact copy (or, for an id already copied, more of it)
        elif kind == 1 and rows:
            uid = rng.choice(rows)[0]
            rows.append((uid, "2021-08-13", "images/b.png"))  # the same id, another line
        elif kind == 2:
            rows.append((rng.choice(["bad id", "", "é1", "00x!"]), "2021-08-12", "images/a.png"))
        elif kind == 3:
            rows.append(
                (f"d{i:05d}", rng.choice(["yesterday", "2099-01-01", "", "2021-13-01"]), "images/a.png")
            )
        elif kind == 4:
            rows.append((f"m{i:05d}", "2021-08-12", rng.choice(["images/missing.png", ""])))
        else:
            rows.append((f"{i:05d}", "2021-08-12T10:00:00Z", rng.choice(["images/a.png", "images/b.png"])))
    return rows


def images(folder: Path) -> None:
    (folder / "images").mkdir(exist_ok=True)
    for i, name in enumerate(("a.png", "b.png")):
        (folder / "images" / name).write_bytes(png_bytes(i))


def numbers_shifted(message: str, by: int) -> str:
    """`message` with the line numbers it names moved by `by` (the same rows, counted from another start), and
    without the present moment a future date's message names."""
    message = re.sub(r"\(it is now [^)]*\)", "", message)
    return re.sub(
        r"\b(lines?|rows?) ([0-9, ]+)",
        lambda m: "line " + re.sub(r"[0-9]+", lambda d: str(int(d[0]) + by), m[2]),
        message,
    )


def test_the_same_rows_as_csv_json_lines_and_parquet_validate_the_same(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    images(tmp_path)
    rows = mixed_rows(10_000)
    outcomes = {}
    for name, (write, file, first) in WRITERS.items():
        # Two photos for thousands of IDs: the shared-photo census (tests/test_shared_photos.py) is off here.
        settings = make_settings(chunk_rows=999, max_ids_per_photo=0)
        valid, rejects = compose.validate(settings, write(tmp_path / file, rows))
        outcomes[name] = (
            valid,
            [(r.line - first, r.user_id, r.reason, numbers_shifted(r.message, -first)) for r in rejects],
        )
    assert outcomes["csv"] == outcomes["jsonl"] == outcomes["parquet"]
    valid, rejects = outcomes["csv"]
    assert valid + len(rejects) == 10_000 and valid > 4000
    assert {r[2] for r in rejects} == {
        "bad_user_id",
        "empty_value",
        "duplicate_user_id",
        "duplicate_row",
        "bad_date",
        "future_date",
        "image_missing",
    }


def run_outputs(out: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    (folder,) = sorted(out.iterdir())[-1:]
    with (folder / "results.csv").open(newline="") as handle:
        results = sorted((r["user_id"], r["status"]) for r in csv.DictReader(handle))
    with (folder / "rejects.csv").open(newline="") as handle:
        rejects = sorted((r["line"], r["user_id"], r["reason"]) for r in csv.DictReader(handle))
    return results, rejects


def test_a_run_of_each_format_sends_the_same_and_resumes_sending_nothing(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    images(tmp_path)
    rows = [
        ("00123", "2021-08-12", "images/a.png"),
        ("twin", "2021-08-12", "images/b.png"),
        ("bad id", "2021-08-12", "images/a.png"),
        ("twin", "2021-08-12", "images/b.png"),
        ("NA", "2021-05-18 15:14:43-0700", "images/b.png"),
    ]
    seen = {}
    for name, (write, file, first) in WRITERS.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "images").symlink_to(tmp_path / "images")
        before = threaded_sandbox.state.total_requests
        # Each format its own ledger and its own ids: the same users would be skipped by one ledger.
        tagged = [(f"{uid}_{name}" if uid != "bad id" else uid, d, p) for uid, d, p in rows]
        manifest = write(folder / file, tagged)
        args = ["run", str(manifest), *sandbox_ledger(folder, threaded_sandbox), "--out", str(folder / "out")]
        # Two photos for five rows: the shared-photo census (tests/test_shared_photos.py) is off here.
        code, _, err = cli(*args, "--no-progress", env={"BACKFILL_MAX_IDS_PER_PHOTO": "0"})
        assert code == 1, err
        assert threaded_sandbox.state.total_requests - before == 3
        results, rejects = run_outputs(folder / "out")
        untag = [(uid.removesuffix(f"_{name}"), status) for uid, status in results]
        seen[name] = (
            untag,
            [(int(line) - first, uid.removesuffix(f"_{name}"), why) for line, uid, why in rejects],
        )
        code, out, err = cli(*args, "--no-progress")
        assert code == 1 and "3 skipped" in out, err
        assert threaded_sandbox.state.total_requests - before == 3  # the resume sent nothing
    assert seen["csv"] == seen["jsonl"] == seen["parquet"]
    assert seen["csv"] == (
        [("00123", "enrolled"), ("NA", "enrolled"), ("twin", "enrolled")],
        [(2, "bad id", "bad_user_id"), (3, "twin", "duplicate_row")],
    )


def outcomes(path: Path, **rules: object) -> list[Candidate | Reject]:
    manifest = open_manifest(path, ManifestRules(**rules))  # type: ignore[arg-type]
    found: list[Candidate | Reject] = []
    for batch in manifest.batches():
        found += batch.candidates
        found += batch.rejects
    return sorted(found, key=lambda o: o.line)


def test_json_lines_values_are_text_as_written_and_each_bad_line_says_why(tmp_path: Path) -> None:
    images(tmp_path)
    path = tmp_path / "m.ndjson"
    path.write_text(
        '{"user_id": "00123", "user_created_at": "2021-08-12", "image_path": "images/a.png", "note": 1}\n'
        '{"user_id": 123, "user_created_at": "2021-08-12", "image_path": "images/a.png"}\n'
        "\n"
        '{"user_id": "u2", "user_created_at": null, "image_path": "images/a.png"}\n'
        "[1, 2]\n"
        '{"user_id": "u3", "user_created_at": "2021-08-12", \n'
        '{"user_created_at": "2021-08-12", "image_path": "images/b.png", "user_id": "NA"}\r\n'
        '{"user_id": "u4", "image_path": "images/b.png"}'  # no user_created_at, and no final newline
    )
    found = outcomes(path)
    assert [(o.line, getattr(o, "reason", "ok")) for o in found] == [
        (1, "ok"),
        (2, "malformed_row"),
        (3, "empty_value"),
        (4, "empty_value"),
        (5, "malformed_row"),
        (6, "malformed_row"),
        (7, "ok"),
        (8, "empty_value"),
    ]
    assert [o.user_id for o in found if isinstance(o, Candidate)] == ["00123", "NA"]
    messages = {o.line: o.message for o in found if isinstance(o, Reject)}
    assert "JSON number 123, not a string" in messages[2] and "00123 would be 123" in messages[2]
    assert 'e.g. "123"' in messages[2]
    assert "a JSON list, not an object" in messages[5] and "isn't valid JSON" in messages[6]


def test_json_lines_missing_column_names_the_near_miss(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    write_jsonl(path, [("u1", "2021-08-12", "a.png")])
    path.write_text(path.read_text().replace('"user_id"', '"userid"'))
    with pytest.raises(ManifestError, match=r"missing the column 'user_id' \(did you mean 'userid'\?\)"):
        open_manifest(path, ManifestRules())
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ManifestError, match="is empty: it needs one JSON object per line"):
        open_manifest(tmp_path / "empty.jsonl", ManifestRules())


def test_parquet_reads_text_columns_exactly_and_nulls_as_empty(tmp_path: Path) -> None:
    images(tmp_path)
    rows = [(f"{i:05d}", "2021-08-12", "images/a.png") for i in range(50)]
    rows[7] = ("00007", "", "images/a.png")
    path = write_parquet(tmp_path / "m.parquet", rows, row_group_size=8)
    table = pq.read_table(path)
    nulls = table.set_column(
        1, "user_created_at", pa.array([None if i == 9 else r[1] for i, r in enumerate(rows)])
    )
    # Dictionary-encoded text (as pandas writes a categorical) is text too.
    coded = nulls.set_column(2, "image_path", nulls.column(2).dictionary_encode())
    pq.write_table(coded, path, row_group_size=8)
    found = outcomes(path, chunk_rows=5)
    assert [o.line for o in found] == list(range(1, 51))  # rows numbered from 1, across row groups and chunks
    assert {o.line: o.reason for o in found if isinstance(o, Reject)} == {8: "empty_value", 10: "empty_value"}
    assert [o.user_id for o in found if isinstance(o, Candidate)][:3] == ["00000", "00001", "00002"]


@pytest.mark.parametrize(
    ("column", "kind", "said"),
    [
        ("user_id", pa.int64(), r"'user_id' \(user_id\) is of type int64, not text \(an id like 00123 can't"),
        ("user_created_at", pa.timestamp("s"), r"is of type timestamp\[m?s\], not text.*ISO 8601 text"),
    ],
)
def test_a_parquet_column_that_cannot_hold_text_as_written_is_refused(
    tmp_path: Path, column: str, kind: pa.DataType, said: str
) -> None:
    values = {"user_id": ["1"], "user_created_at": ["2021-08-12"], "image_path": ["a.png"]}
    values[column] = [0]
    table = pa.table(
        {name: pa.array(values[name], type=kind if name == column else None) for name in COLUMNS}
    )
    pq.write_table(table, tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match=said):
        open_manifest(tmp_path / "m.parquet", ManifestRules())


def test_the_format_goes_by_the_extension_unless_named(tmp_path: Path) -> None:
    assert format_of("s3://bucket/exports/users.parquet") == "parquet"
    assert format_of("https://host/x/users.NDJSON?version=3") == "jsonl"
    assert format_of("/data/users.jsonl") == "jsonl"
    assert format_of("/data/users.txt") == format_of("/data/users") == "csv"
    assert format_of("/data/users.csv", "jsonl") == "jsonl"
    images(tmp_path)
    path = write_jsonl(tmp_path / "export.txt", [("u1", "2021-08-12", "images/a.png")])
    with pytest.raises(ManifestError):
        open_manifest(path, ManifestRules())  # read as CSV, it has no header
    assert [o.user_id for o in outcomes(path, manifest_format="jsonl")] == ["u1"]
    with pytest.raises(ValueError, match="xlsx"):
        ManifestRules(manifest_format="xlsx")


def test_the_format_setting_is_read_from_the_command_line(tmp_path: Path) -> None:
    images(tmp_path)
    path = write_jsonl(tmp_path / "export.txt", [("u1", "2021-08-12", "images/a.png")] * 2)
    code, out, err = cli("validate", str(path), "--manifest-format", "jsonl", "--out", str(tmp_path / "out"))
    assert code == 1, err
    assert "1 valid, 1 rejected" in out and "duplicate_row: 1" in out


@pytest.mark.parametrize("name", ["jsonl", "parquet"])
def test_a_manifest_changed_during_the_run_stops_it_and_a_renamed_one_is_read_as_opened(
    tmp_path: Path, name: str
) -> None:
    write, file, _ = WRITERS[name]
    rows = [(f"u{i}", "2021-08-12", "a.png") for i in range(30)]
    path = write(tmp_path / file, rows)
    manifest = open_manifest(path, ManifestRules(chunk_rows=10))
    other = write(tmp_path / f"other{file}", [(f"x{i}", "2021-08-12", "a.png") for i in range(40)])
    os.replace(other, path)  # replaced by rename: the run reads the file it opened
    assert [c.user_id for b in manifest.batches() for c in b.candidates] == [r[0] for r in rows]
    manifest = open_manifest(path, ManifestRules(chunk_rows=10))
    batches = manifest.batches()
    next(batches)
    with path.open("ab") as handle:
        handle.write(b"\n")  # grown in place: no later chunk is let through
    with pytest.raises(ManifestError, match="changed while being read"):
        next(batches)


def test_without_pyarrow_a_parquet_manifest_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_parquet(tmp_path / "m.parquet", [("u1", "2021-08-12", "a.png")])
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it weren't installed: importing it fails
    monkeypatch.delitem(sys.modules, "backfill.manifest.parquet", raising=False)
    with pytest.raises(ManifestError, match=r"pip install 'backfill\[parquet\]'"):
        open_manifest(path, ManifestRules())


@pytest.mark.parametrize("name", ["jsonl", "parquet"])
def test_a_manifest_in_a_bucket_is_read_in_its_format(
    tmp_path: Path,
    store: StorageServer,  # noqa: F811 (the fixture imported above): each object store in turn
    monkeypatch: pytest.MonkeyPatch,
    make_settings: Callable[..., Settings],
    name: str,
) -> None:
    for variable, value in store.env.items():  # in-process: the stores read os.environ
        monkeypatch.setenv(variable, value)
    monkeypatch.setenv("HOME", "/nonexistent")  # no shared config files of the machine's user
    write, file, first = WRITERS[name]
    bucket = Bucket(store, f"formats-{name}")
    bucket.put_many({"p/a.png": png_bytes(0), "p/b.png": png_bytes(1)})
    rows = [
        ("00123", "2021-08-12", "../p/a.png"),
        ("u2", "2021-08-12", "../p/b.png"),
        ("u2", "2021-08-12", "../p/b.png"),
    ]
    url = bucket.put(f"m/{file}", write(tmp_path / file, rows).read_bytes())
    valid, rejects = compose.validate(make_settings(), url)
    assert valid == 2
    assert [(r.line, r.user_id, r.reason) for r in rejects] == [(first + 2, "u2", "duplicate_row")]
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob("backfill-manifest-*"))  # the copy is gone


def test_the_formats_benchmark_runs_and_reads_every_row(tmp_path: Path) -> None:
    # As a user runs it (a process of its own), at two sizes: every child asserts it read all the rows.
    root = Path(__file__).resolve().parent.parent
    args = ["--rows", "300,600", "--data-dir", str(tmp_path), "--results-dir", str(tmp_path / "results")]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.manifests", *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (written,) = (tmp_path / "results").glob("manifests-*.json")
    figures = json.loads(written.read_text())
    formats = ("csv", "jsonl", "parquet")
    for size in ("300", "600"):
        at_size = figures["sizes"][size]
        assert all(at_size[name]["rows_per_s"] > 0 and at_size[name]["peak_rss_mb"] > 0 for name in formats)
        assert at_size["csv"]["wall_over_csv"] == 1.0
    assert figures["imports_peak_rss_mb"] > 0
    assert {name: figures["growth"][name]["rows"] for name in formats} == {
        name: [300, 600] for name in formats
    }
    assert all(figures["growth"][name]["peak_rss_ratio"] > 0 for name in formats)


def test_json_lines_not_in_utf_8_gets_advice_for_code_not_for_excel(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"user_id": "a1", "user_created_at": "2021-08-12", "image_path": "caf\xe9.png"}\n')
    with pytest.raises(ManifestError) as caught:
        open_manifest(path, ManifestRules())
    said = str(caught.value)
    assert "is not UTF-8: byte 0xE9 at offset 69 (line 1)" in said
    assert "encoding='utf-8'" in said and "Excel" not in said
    zipped = tmp_path / "z.jsonl"
    zipped.write_bytes(b"PK\x03\x04" + bytes([0xFF]) * 20)
    with pytest.raises(ManifestError, match="is a ZIP file or an Excel workbook, not JSON lines"):
        open_manifest(zipped, ManifestRules())
    gzipped = tmp_path / "g.jsonl"
    gzipped.write_bytes(b"\x1f\x8b" + bytes([0xFF]) * 20)
    with pytest.raises(ManifestError, match=r"gzip-compressed: decompress it and give the \.jsonl file"):
        open_manifest(gzipped, ManifestRules())

"""Exact copies of a line are one user: the first is sent, the others are `duplicate_row`; ids whose lines differ
stay `duplicate_user_id`, every line of them."""

from __future__ import annotations

import csv
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backfill.manifest import Candidate, ManifestRules, Reject, open_manifest
from backfill.sandbox import RunningSandbox

from .conftest import cli, png_bytes, sandbox_ledger

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def write(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["user_id", "user_created_at", "image_path"])
        writer.writerows(rows)
    return path


def outcomes(path: Path, chunk_rows: int = 10_000) -> list[Candidate | Reject]:
    manifest = open_manifest(path, ManifestRules(now=NOW, chunk_rows=chunk_rows))
    out: list[Candidate | Reject] = []
    for batch in manifest.batches():
        out += batch.candidates
        out += batch.rejects
    return sorted(out, key=lambda o: o.line)


rows = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c", "d", "e"]),
        st.sampled_from(["2021-08-12", "2021-08-13"]),
        st.sampled_from(["a.png", "b.png"]),
    ),
    max_size=30,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=rows, chunk_rows=st.integers(1, 7))
def test_every_line_lands_once_and_identical_lines_are_one_row(
    tmp_path: Path, rows: list[tuple[str, str, str]], chunk_rows: int
) -> None:
    out = outcomes(write(tmp_path / "m.csv", rows), chunk_rows)
    assert [o.line for o in out] == list(range(2, len(rows) + 2)), "a line lost or doubled"
    lines: dict[str, list[int]] = defaultdict(list)
    for line, (uid, _, _) in enumerate(rows, start=2):
        lines[uid].append(line)
    by_line = {o.line: o for o in out}
    for uid, found in lines.items():
        distinct = {rows[line - 2] for line in found}
        if len(found) == 1:
            assert isinstance(by_line[found[0]], Candidate)
        elif len(distinct) == 1:  # exact copies: the first is the one row, each copy names it
            first, *copies = found
            assert isinstance(by_line[first], Candidate)
            for line in copies:
                reject = by_line[line]
                assert isinstance(reject, Reject) and reject.reason == "duplicate_row"
                assert f"line {first}" in reject.message and repr(uid) in reject.message
        else:
            for line in found:
                reject = by_line[line]
                assert isinstance(reject, Reject) and reject.reason == "duplicate_user_id"


def test_two_copies_and_a_differing_line_are_all_duplicate_user_id(tmp_path: Path) -> None:
    # No telling which photo is right, so the copies are held back too, not sent as "the first".
    path = write(
        tmp_path / "m.csv",
        [("x", "2021-08-12", "a.png"), ("x", "2021-08-12", "a.png"), ("x", "2021-08-12", "b.png")],
    )
    reasons = [(o.line, getattr(o, "reason", "ok")) for o in outcomes(path)]
    assert reasons == [(2, "duplicate_user_id"), (3, "duplicate_user_id"), (4, "duplicate_user_id")]


def test_values_are_compared_as_written(tmp_path: Path) -> None:
    # "2021-08-12" and "2021-08-12T00:00:00Z" may be the same day, but not the same line: the export disagrees.
    path = write(tmp_path / "m.csv", [("x", "2021-08-12", "a.png"), ("x", "2021-08-12T00:00:00Z", "a.png")])
    assert {getattr(o, "reason", "ok") for o in outcomes(path)} == {"duplicate_user_id"}


def test_a_copy_after_a_bad_first_line_names_it(tmp_path: Path) -> None:
    path = write(tmp_path / "m.csv", [("x", "2099-01-01", "a.png"), ("x", "2099-01-01", "a.png")])
    first, copy = outcomes(path)
    assert isinstance(first, Reject) and first.reason == "future_date"
    assert isinstance(copy, Reject) and copy.reason == "duplicate_row" and "line 2" in copy.message


def test_three_lines_two_identical_send_one_request(tmp_path: Path, threaded_sandbox: RunningSandbox) -> None:
    (tmp_path / "images").mkdir()
    for i, name in enumerate(("a.png", "b.png")):
        (tmp_path / "images" / name).write_bytes(png_bytes(i))
    manifest = write(
        tmp_path / "manifest.csv",
        [
            ("twin", "2021-08-12", "images/a.png"),
            ("solo", "2021-08-12", "images/b.png"),
            ("twin", "2021-08-12", "images/a.png"),
        ],
    )
    out = tmp_path / "out"
    args = ["run", str(manifest), *sandbox_ledger(tmp_path, threaded_sandbox), "--out", str(out)]
    code, stdout, err = cli(*args, "--no-progress")
    assert code == 1, err  # a reject: rows left for a person to look at
    assert threaded_sandbox.state.total_requests == 2  # twin once, solo once
    (folder,) = out.iterdir()
    with (folder / "results.csv").open(newline="") as handle:
        results = list(csv.DictReader(handle))
    with (folder / "rejects.csv").open(newline="") as handle:
        rejects = list(csv.DictReader(handle))
    assert sorted((r["user_id"], r["status"]) for r in results) == [
        ("solo", "enrolled"),
        ("twin", "enrolled"),
    ]
    assert [(r["line"], r["user_id"], r["reason"]) for r in rejects] == [("4", "twin", "duplicate_row")]
    assert "line 2" in rejects[0]["message"]
    assert len(results) + len(rejects) == 3
    assert "2 enrolled" in stdout and "1 rejected" in stdout
    code, _, err = cli(*args, "--no-progress")
    assert code == 1, err
    assert threaded_sandbox.state.total_requests == 2  # the resume sends nothing

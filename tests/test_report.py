"""report.html against run folders with known figures, and against a real run through the sandbox."""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from backfill import report
from backfill.config import Settings
from backfill.errors import OutputError
from backfill.outputs.files import REJECT_FIELDS, RESULT_FIELDS
from backfill.report import write_report
from backfill.run import engine as runner
from backfill.sandbox import Faults, start_sandbox

from .conftest import API_KEY, PARTNER_ID, Sleeps, simple_rows, write_manifest

HOSTILE = "<script>alert(1)</script>"
BASE_URL = "https://testapi.example.test/v1"
SECRET = "sk-live-do-not-print"


def result(user_id: str, status: str, **values: Any) -> dict[str, Any]:
    return {"user_id": user_id, "status": status, **values}


def write_run(
    folder: Path,
    rows: Sequence[dict[str, Any]],
    rejects: Sequence[tuple[int, str, str, str]] = (),
    *,
    not_reached: int = 0,
    **summary: Any,
) -> Path:
    """A run folder as RunOutput leaves it, with summary.json's figures derived from the rows unless given."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "results.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, RESULT_FIELDS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    with (folder / "rejects.csv").open("w", newline="", encoding="utf-8") as handle:
        out = csv.writer(handle)
        out.writerow(REJECT_FIELDS)
        out.writerows(rejects)
    counts = Counter(str(r["status"]) for r in rows)
    if rejects:
        counts["rejected"] = len(rejects)
    attempts = [int(r.get("attempts", 0)) for r in rows]
    figures: dict[str, Any] = {
        "run_id": "20250101T000000Z-abc123",
        "out_dir": str(folder),
        "manifest": "/data/users.csv",
        "env": "sandbox",
        "base_url": BASE_URL,
        "started_at": "2025-01-01T00:00:00.000Z",
        "finished_at": "2025-01-01T00:10:00.000Z",
        "duration_s": 600.0,
        "total_rows": sum(counts.values()) + not_reached,
        "counts": dict(sorted(counts.items())),
        "rejected": len(rejects),
        "sent": sum(1 for a in attempts if a > 0),
        "attempts": sum(attempts),
        "not_reached": not_reached,
        "rows_per_s": round(sum(counts.values()) / 600, 1),
        "exit_code": 1,
        "stop_reason": "",
        "dry_run": False,
        "settings": {"api_key": "***", "base_url": BASE_URL, "rate": 10.0, "columns": {"user_id": "uid"}},
    }
    figures.update(summary)
    (folder / "summary.json").write_text(json.dumps(figures, indent=2))
    return folder


def known_run(folder: Path) -> Path:
    def at(minute: int) -> str:
        return f"2025-01-01T00:{minute:02d}:30.000Z"

    rows = [
        *(result(f"ok_{i}", "enrolled", http_status=200, result_code="0840", attempts=1,
                 latency_ms=100 + i, finished_at=at(i % 10)) for i in range(20)),
        result("again_1", "already_enrolled", http_status=200, result_code="2209", attempts=2, latency_ms=150,
               finished_at=at(3)),
        result("skip_1", "skipped", result_code="0840", finished_at=at(0)),
        result("skip_2", "skipped", result_code="0840", finished_at=at(0)),
        result("dis_1", "failed", http_status=400, result_code="2207", error="HTTP 400 code 2207", attempts=1,
               latency_ms=90, finished_at=at(4)),
        result(HOSTILE, "failed", http_status=400, result_code="2207", error="HTTP 400 code 2207", attempts=1,
               latency_ms=95, finished_at=at(4)),
        result("dis_3", "failed", http_status=400, result_code="2207", error="HTTP 400 code 2207", attempts=1,
               latency_ms=97, finished_at=at(5)),
        result("bad_img", "failed", http_status=200, result_code="0001", error="result 0001: unusable",
               attempts=1, latency_ms=120, finished_at=at(6)),
        *(result(f"busy_{i}", "retry_exhausted", http_status=503, error="HTTP 503, not JSON", attempts=5,
                 latency_ms=30_000, finished_at=at(8)) for i in range(2)),
        result("lost_1", "unknown", error="timeout after 60s", attempts=3, latency_ms=60_000,
               finished_at=at(9)),
    ]  # fmt: skip
    rejects = [
        (4, "when_1", "bad_date", "user_created_at 'x' is not a date: correct it"),
        (7, "when_2", "bad_date", "user_created_at 'y' is not a date: correct it"),
        (9, "pic_1", "image_missing", "image 'a.png' doesn't exist: check the path"),
    ]
    return write_run(folder, rows, rejects, not_reached=2, new_rows=26)


def cells(page: str, status: str) -> list[str]:
    match = re.search(rf'<tr[^>]*data-status="{status}"[^>]*>(.*?)</tr>', page)
    assert match, f"no totals row for {status}"
    return re.findall(r'<td class="n">(.*?)</td>', match.group(1))


def kind_row(page: str, label: str) -> str:
    match = re.search(rf'<tr data-kind="{re.escape(label)}">(.*?)</tr>', page)
    assert match, f"no row for {label}"
    return match.group(1)


def assert_safe(page: str, base_url: str, secrets: Sequence[str]) -> None:
    assert "<script" not in page.lower()
    assert not re.search(r"https?://", page.replace(base_url, "")), "a URL other than the base_url"
    assert not re.search(r"<(link|img|iframe|object|embed)\b", page)
    assert "url(" not in page and "@import" not in page
    for secret in secrets:
        assert secret not in page


def test_figures_match_a_known_run(tmp_path: Path) -> None:
    folder = known_run(tmp_path / "run")
    summary = json.loads((folder / "summary.json").read_text())
    path = write_report(folder)
    assert path == folder / "report.html"
    assert path.stat().st_mode & 0o777 == 0o600
    page = path.read_text(encoding="utf-8")

    for status, n in summary["counts"].items():
        assert cells(page, status)[0] == f"{n:,}", status
    assert cells(page, "failed")[0] == "4" and cells(page, "enrolled")[0] == "20"
    assert cells(page, "not_reached")[0] == "2"
    assert cells(page, "total")[0] == str(summary["total_rows"]) == "35"
    assert cells(page, "id_conflict")[0] == "0"  # a status that didn't happen is still shown, as 0

    top = re.findall(r'<tr data-kind="([^"]*)">', page.split('id="errors"')[1].split("</section>")[0])
    assert top[0] == "2207"
    row = kind_row(page, "2207")
    assert '<td class="n">3</td>' in row and "dis_1" in row and "<td><code>failed</code></td>" in row
    assert '<td class="n">2</td>' in kind_row(page, "HTTP 503")
    assert "lost_1" in kind_row(page, "timeout after 60s")
    assert '<td class="n">2</td>' in kind_row(page, "bad_date") and "line 4: when_1" in kind_row(
        page, "bad_date"
    )

    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert_safe(page, BASE_URL, [])
    assert "MISMATCH" not in page and page.count("✓ OK") == 5

    retries = page.split('id="retries"')[1].split("</section>")[0]
    sent, attempts = summary["sent"], summary["attempts"]
    assert (sent, attempts) == (28, 39)
    assert f'Retries (attempts - rows sent)</th><td class="n">{attempts - sent}</td>' in retries
    assert 'more than one attempt</th><td class="n">4 (' in retries

    latency = page.split('id="latency"')[1].split("</section>")[0]
    assert '<tr data-figure="p50"><th>p50</th><td class="n">110 ms</td>' in latency
    assert '<tr data-figure="max"><th>max</th><td class="n">60 s</td>' in latency
    assert "<svg" in latency

    throughput = page.split('id="throughput"')[1].split("</section>")[0]
    assert "per 10&nbsp;s" in throughput and len(re.findall(r"<g><title>", throughput)) == 60

    assert "<th>New rows (not in the checkpoint before)</th><td>26</td>" in page
    for text in ("20250101T000000Z-abc123", "sandbox", "2025-01-01T00:10:00.000Z", "/data/users.csv"):
        assert text in page
    assert "<td><code>columns.user_id</code></td><td><code>uid</code></td>" in page
    assert "<td><code>api_key</code></td><td><code>***</code></td>" in page


def test_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    folder = known_run(tmp_path / "run")
    path = write_report(folder)
    first = path.read_text(encoding="utf-8")
    with pytest.raises(OutputError, match="already exists; pass overwrite=True"):
        write_report(folder)
    assert path.read_text(encoding="utf-8") == first

    summary = json.loads((folder / "summary.json").read_text())
    (folder / "summary.json").write_text(json.dumps({**summary, "stop_reason": "re-rendered"}))
    assert write_report(folder, overwrite=True) == path
    assert "re-rendered" in path.read_text(encoding="utf-8")
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in folder.iterdir()) == [
        "rejects.csv",
        "report.html",
        "results.csv",
        "summary.json",
    ]


def test_overwrite_replaces_a_symlink_instead_of_following_it(tmp_path: Path) -> None:
    folder = known_run(tmp_path / "run")
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    (folder / "report.html").symlink_to(victim)
    path = write_report(folder, overwrite=True)
    assert victim.read_text() == "untouched"
    assert not path.is_symlink() and path.stat().st_mode & 0o777 == 0o600


def test_header_only_results_say_no_rows_sent(tmp_path: Path) -> None:
    rejects = [(2, "a", "bad_date", "not a date"), (3, HOSTILE, "bad_user_id", f"id {HOSTILE!r} is bad")]
    folder = write_run(tmp_path / "run", [], rejects, duration_s=0.0, rows_per_s=0.0,
                       finished_at="2025-01-01T00:00:00.000Z")  # fmt: skip
    page = write_report(folder).read_text(encoding="utf-8")
    assert cells(page, "total")[0] == "2" and cells(page, "rejected")[0] == "2"
    assert cells(page, "enrolled") == ["0", "0.0%"]
    for section in ("throughput", "latency"):
        body = page.split(f'id="{section}"')[1].split("</section>")[0]
        assert "No rows sent" in body and "<svg" not in body
    assert "No errors" in page and "MISMATCH" not in page
    assert "&lt;script&gt;" in page
    assert_safe(page, BASE_URL, [])


def test_a_run_with_no_rows_at_all(tmp_path: Path) -> None:
    folder = write_run(tmp_path / "run", [], duration_s=0.0, exit_code=0, started_at="", finished_at="")
    page = write_report(folder).read_text(encoding="utf-8")
    assert cells(page, "total")[0] == "0" and cells(page, "enrolled")[1] == "n/a"
    assert "No rows sent" in page and "Complete: exit code 0" in page


def test_secrets_in_settings_are_never_shown(tmp_path: Path) -> None:
    settings = {
        "api_key": SECRET,  # as if an older version had not redacted it
        "api_key_file": f"/keys/{SECRET}",
        "empty_api_key": "",
        "auth": {"client_secret": SECRET, "Token": SECRET, "user": "alice"},
        "base_url": BASE_URL,
    }
    folder = write_run(tmp_path / "run", [result("u1", "enrolled", attempts=1)], settings=settings)
    page = write_report(folder).read_text(encoding="utf-8")
    assert SECRET not in page
    assert "<td><code>api_key</code></td><td><code>***</code></td>" in page
    assert "<td><code>auth.client_secret</code></td><td><code>***</code></td>" in page
    assert "<td><code>empty_api_key</code></td><td><code>(not set)</code></td>" in page
    assert "<td><code>auth.user</code></td><td><code>alice</code></td>" in page


def test_files_that_disagree_with_the_summary_are_flagged(tmp_path: Path) -> None:
    folder = write_run(tmp_path / "run", [result("u1", "enrolled", attempts=1)], counts={"enrolled": 2})
    page = write_report(folder).read_text(encoding="utf-8")
    assert page.count("✗ MISMATCH") == 2  # per-status counts, and rows accounted for vs total


def test_distinct_error_kinds_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report, "MAX_KINDS", 3)
    rows = [result(f"u{i}", "unknown", error=f"reset #{i}", attempts=1, latency_ms=5) for i in range(10)]
    page = write_report(write_run(tmp_path / "run", rows)).read_text(encoding="utf-8")
    assert "7 rows had kinds beyond the first 3 and are not itemised" in page
    assert "MISMATCH" not in page


def test_long_runs_get_at_most_60_bars(tmp_path: Path) -> None:
    rows = [
        result(f"u{h}", "enrolled", attempts=1, finished_at=f"2025-01-01T{h:02d}:59:00Z") for h in range(24)
    ]
    folder = write_run(tmp_path / "run", rows, finished_at="2025-01-02T00:00:00.000Z", duration_s=86400.0)
    page = write_report(folder).read_text(encoding="utf-8")
    throughput = page.split('id="throughput"')[1].split("</section>")[0]
    assert "per 30&nbsp;min" in throughput and len(re.findall(r"<g><title>", throughput)) == 48


def test_a_few_slow_rows_get_a_bar_of_their_own(tmp_path: Path) -> None:
    rows = [result(f"u{i}", "enrolled", attempts=1, latency_ms=100 + i) for i in range(200)]
    rows.append(result("slow", "enrolled", attempts=1, latency_ms=60_000))
    page = write_report(write_run(tmp_path / "run", rows)).read_text(encoding="utf-8")
    latency = page.split('id="latency"')[1].split("</section>")[0]
    assert "The last bar, shaded differently, holds everything from 300 ms up to the max" in latency
    assert '<td class="n">298 ms</td>' in latency and '<td class="n">60 s</td>' in latency
    assert len(re.findall(r"<g><title>", latency)) <= report.LATENCY_BINS + 1


@pytest.mark.parametrize("latencies", [[1203], [1203, 1207, 2950], [999, 1001, 45_678]])
def test_slow_answers_over_a_second_are_binned(tmp_path: Path, latencies: list[int]) -> None:
    # Found in review: rounded keys above 1 s sat below the exact minimum, and the bin index went negative.
    rows = [result(f"u{i}", "enrolled", attempts=1, latency_ms=ms) for i, ms in enumerate(latencies)]
    page = write_report(write_run(tmp_path / "run", rows)).read_text(encoding="utf-8")
    assert 'id="latency"' in page and "MISMATCH" not in page


def test_not_a_finished_run_folder(tmp_path: Path) -> None:
    folder = known_run(tmp_path / "run")
    (folder / "summary.json").unlink()
    with pytest.raises(OutputError, match=r"has no summary\.json"):
        write_report(folder)
    assert not (folder / "report.html").exists()


async def test_report_of_a_real_run_through_the_sandbox(
    tmp_path: Path, make_settings: Callable[..., Settings], sleeps: Sleeps
) -> None:
    script: dict[str, list[int | str]] = {
        "user_0001": [503, 503],
        "user_0002": ["2207"],
        "user_0003": ["2207"],
    }
    server = await start_sandbox(PARTNER_ID, API_KEY, faults=Faults(script=script))
    try:
        rows = [*simple_rows(12), (HOSTILE, "2021-01-01", "hostile.png"), ("user_0020", "never", "x.png")]
        manifest = write_manifest(tmp_path, rows)
        summary = await runner.Runner(make_settings(server), manifest, sleep=sleeps).run()
    finally:
        await server.stop()
    assert summary.counts == {"enrolled": 10, "failed": 2, "rejected": 2}

    path = write_report(Path(summary.out_dir))  # the CLI writes it after every run
    assert path.stat().st_mode & 0o777 == 0o600
    page = path.read_text(encoding="utf-8")
    for status, n in summary.counts.items():
        assert cells(page, status)[0] == str(n)
    assert cells(page, "total")[0] == str(summary.total_rows) == "14"
    row = kind_row(page, "2207")
    assert '<td class="n">2</td>' in row and ("user_0002" in row or "user_0003" in row)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # rejected as bad_user_id, shown as text
    assert summary.attempts - summary.sent == 2
    assert 'Retries (attempts - rows sent)</th><td class="n">2</td>' in page
    assert "MISMATCH" not in page and summary.run_id in page
    assert_safe(page, summary.base_url, [API_KEY])

"""report.html against run folders with known figures and hostile values, and against a real run through the
sandbox; its chart geometry, and its templates as installed."""

from __future__ import annotations

import csv
import html.parser
import io
import json
import logging
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from importlib import resources
from itertools import pairwise
from pathlib import Path
from typing import Any

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backfill import compose as runner
from backfill import redact
from backfill.config import Settings
from backfill.errors import OutputError
from backfill.outputs import report as report_package
from backfill.outputs.files import REJECT_FIELDS, RESULT_FIELDS, RunOutput
from backfill.outputs.report import data as report_data
from backfill.outputs.report import render, svg, write_report
from backfill.run.records import RejectRow, ResultRow, Summary
from backfill.sandbox import Faults, start_sandbox
from backfill.vocab import Reason, Status

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
        *(
            result(
                f"ok_{i}",
                "enrolled",
                http_status=200,
                result_code="0840",
                attempts=1,
                latency_ms=100 + i,
                finished_at=at(i % 10),
            )
            for i in range(20)
        ),
        result(
            "again_1",
            "already_enrolled",
            http_status=200,
            result_code="2209",
            attempts=2,
            latency_ms=150,
            finished_at=at(3),
        ),
        result("skip_1", "skipped", result_code="0840", finished_at=at(0)),
        result("skip_2", "skipped", result_code="0840", finished_at=at(0)),
        result(
            "dis_1",
            "failed",
            http_status=400,
            result_code="2207",
            error="HTTP 400 code 2207",
            attempts=1,
            latency_ms=90,
            finished_at=at(4),
        ),
        result(
            HOSTILE,
            "failed",
            http_status=400,
            result_code="2207",
            error="HTTP 400 code 2207",
            attempts=1,
            latency_ms=95,
            finished_at=at(4),
        ),
        result(
            "dis_3",
            "failed",
            http_status=400,
            result_code="2207",
            error="HTTP 400 code 2207",
            attempts=1,
            latency_ms=97,
            finished_at=at(5),
        ),
        result(
            "bad_img",
            "failed",
            http_status=200,
            result_code="0001",
            error="result 0001: unusable",
            attempts=1,
            latency_ms=120,
            finished_at=at(6),
        ),
        *(
            result(
                f"busy_{i}",
                "retry_exhausted",
                http_status=503,
                error="HTTP 503, not JSON",
                attempts=5,
                latency_ms=30_000,
                finished_at=at(8),
            )
            for i in range(2)
        ),
        result(
            "lost_1", "unknown", error="timeout after 60s", attempts=3, latency_ms=60_000, finished_at=at(9)
        ),
    ]
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

    assert "<th>New rows (not in the ledger before)</th><td>26</td>" in page
    for text in ("20250101T000000Z-abc123", "sandbox", "2025-01-01T00:10:00.000Z", "/data/users.csv"):
        assert text in page
    assert "<td><code>columns.user_id</code></td><td><code>uid</code></td>" in page
    assert "<td><code>api_key</code></td><td><code>***</code></td>" in page


def test_rewrites_its_own_report_but_refuses_another_file_unless_asked(tmp_path: Path) -> None:
    folder = known_run(tmp_path / "run")
    path = write_report(folder)
    summary = json.loads((folder / "summary.json").read_text())
    (folder / "summary.json").write_text(json.dumps({**summary, "stop_reason": "re-rendered"}))
    assert write_report(folder) == path  # its own page: rendered again from the run's files, nothing lost
    assert "re-rendered" in path.read_text(encoding="utf-8")

    path.write_text("<html>someone's notes</html>", encoding="utf-8")
    with pytest.raises(OutputError, match="is not a run report written by backfill; pass --overwrite"):
        write_report(folder)
    assert path.read_text(encoding="utf-8") == "<html>someone's notes</html>"
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
    folder = write_run(
        tmp_path / "run", [], rejects, duration_s=0.0, rows_per_s=0.0, finished_at="2025-01-01T00:00:00.000Z"
    )
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
    monkeypatch.setattr(report_data, "MAX_KINDS", 3)
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
    assert len(re.findall(r"<g><title>", latency)) <= report_data.LATENCY_BINS + 1


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
        summary = await runner.run(make_settings(server), manifest, sleep=sleeps)
    finally:
        await server.stop()
    assert summary.counts == {"enrolled": 10, "failed": 2, "rejected": 2}

    path = Path(summary.out_dir) / "report.html"  # written by the run itself, from what it tallied
    assert path.stat().st_mode & 0o777 == 0o600
    page = path.read_text(encoding="utf-8")
    again = write_report(Path(summary.out_dir)).read_text(encoding="utf-8")  # rendered from the files
    assert re.findall(r'<td class="n">(.*?)</td>', again) == re.findall(r'<td class="n">(.*?)</td>', page)
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


# --- hostile values ---

# Each tries another way out of text: an element, an attribute, a CDATA end, an entity read as markup.
HOSTILE_VALUES = (
    '"><img src=x onerror=alert(1)>',
    "' onmouseover='alert(1)",
    "]]><svg onload=alert(1)>",
    "&amp; &lt;b&gt; & <b>bold</b>",
)
PAGE_TAGS = {
    "html",
    "head",
    "meta",
    "title",
    "style",
    "body",
    "main",
    "header",
    "h1",
    "h2",
    "h3",
    "p",
    "table",
    "colgroup",
    "col",
    "thead",
    "tbody",
    "tr",
    "th",
    "td",
    "code",
    "br",
    "section",
    "ul",
    "li",
    "strong",
    "span",
    "figure",
    "svg",
    "line",
    "text",
    "g",
    "rect",
    "footer",
}
PAGE_ATTRIBUTES = {
    "lang",
    "charset",
    "http-equiv",
    "content",
    "name",
    "class",
    "id",
    "style",
    "colspan",
    "data-status",
    "data-kind",
    "data-figure",
    "viewbox",
    "role",
    "aria-label",
    "x",
    "y",
    "x1",
    "x2",
    "y1",
    "y2",
    "width",
    "height",
    "text-anchor",
}


class _Elements(html.parser.HTMLParser):
    """Every element and attribute the browser would build from the page, and its text, unescaped."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def elements(page: str) -> _Elements:
    parsed = _Elements()
    parsed.feed(page)
    parsed.close()
    return parsed


def test_hostile_values_stay_text(tmp_path: Path) -> None:
    one, two, three, four = HOSTILE_VALUES
    rows = [
        result(
            one,
            "failed",
            http_status=400,
            result_code=two,
            result_text=three,
            attempts=1,
            latency_ms=90,
            finished_at="2025-01-01T00:01:00Z",
        ),
        result(four, "unknown", error=one, attempts=2, latency_ms=150, finished_at="2025-01-01T00:02:00Z"),
        result(three, "failed", result_code=four, error=two, attempts=1, latency_ms=80),
        result("ok_1", "enrolled", attempts=1, latency_ms=100, finished_at="2025-01-01T00:03:00Z"),
    ]
    rejects = [(2, two, four, three), (3, three, one, two)]
    folder = write_run(tmp_path / "run", rows, rejects)
    summary = json.loads((folder / "summary.json").read_text())
    counts = {**summary["counts"], one: 0}  # a status this version doesn't know gets its own row
    folder.joinpath("summary.json").write_text(
        json.dumps(
            {
                **summary,
                "counts": counts,
                "run_id": two,
                "manifest": three,
                "env": four,
                "stop_reason": one,
                "settings": {"columns": {one: two}, four: three, "note": HOSTILE},
            }
        )
    )

    page = write_report(folder).read_text(encoding="utf-8")
    parsed = elements(page)
    tags = [tag for tag, _ in parsed.elements]
    assert set(tags) <= PAGE_TAGS and tags.count("svg") == 2 and tags.count("style") == 1
    for tag, attrs in parsed.elements:
        assert set(attrs) <= PAGE_ATTRIBUTES, (tag, attrs)
        if "style" in attrs:
            assert tag == "col" and re.fullmatch(r"width:\d+%", attrs["style"] or "")
    # Each value reads back whole, as the text or attribute value it was: nothing was cut out or run.
    text = "".join(parsed.text)
    for value in (*HOSTILE_VALUES, HOSTILE):
        assert value in text
    kinds = [attrs["data-kind"] for tag, attrs in parsed.elements if "data-kind" in attrs]
    assert {two, four, one} <= set(kinds)
    assert one in [attrs.get("data-status") for _, attrs in parsed.elements]
    assert "]]&gt;&lt;svg onload=alert(1)&gt;" in page
    assert "&amp;amp; &amp;lt;b&amp;gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in page
    assert_safe(page, BASE_URL, [])


def test_templates_escape_and_refuse_unknown_names() -> None:
    env = render._environment()
    assert (
        env.from_string("{{ v }}").render(v="<a href='x'>&</a>")
        == "&lt;a href=&#39;x&#39;&gt;&amp;&lt;/a&gt;"
    )
    with pytest.raises(jinja2.UndefinedError):
        env.from_string("{{ page.nothing }}").render(page=object())


# --- where the templates are ---


def test_templates_ship_in_the_package() -> None:
    folder = resources.files("backfill.outputs.report") / "templates"
    names = {entry.name for entry in folder.iterdir()}
    assert {"report.html.j2", "macros.html.j2", "charts.html.j2", "report.css.j2"} <= names
    assert all(name.endswith(".j2") for name in names)  # pyproject ships templates/*.j2, nothing else
    assert set(render._environment().list_templates()) >= names
    assert (folder / render.TEMPLATE).read_text(encoding="utf-8").lstrip().startswith("{#")


# --- chart geometry ---


def assert_inside(chart: svg.Chart) -> None:
    assert 0 <= chart.plot_left < chart.plot_right <= chart.width
    assert 0 <= chart.plot_top < chart.plot_bottom <= chart.height
    for bar in chart.bars:
        for rect in bar.rects:
            assert rect.width > 0 and rect.height >= 0
            assert chart.plot_left <= rect.x and rect.x + rect.width <= chart.plot_right + 1e-6
            assert chart.plot_top - 1e-6 <= rect.y and rect.y + rect.height <= chart.plot_bottom + 1e-6
    for label in (*chart.x_labels, chart.caption, *(t.label for t in chart.ticks)):
        assert 0 <= label.x <= chart.width and 0 <= label.y <= chart.height
    for mark in chart.marks:
        assert chart.plot_left <= mark.x <= chart.plot_right


def assert_axis(chart: svg.Chart, peak: int) -> None:
    values = [t.value for t in chart.ticks]
    ys = [t.y for t in chart.ticks]
    assert values[0] == 0 and ys[0] == chart.plot_bottom and values[-1] >= peak
    assert all(a < b for a, b in pairwise(values)), "values rise"
    assert all(a > b for a, b in pairwise(ys)), "gridlines climb"
    assert ys[-1] == pytest.approx(chart.plot_top)  # the top gridline is the axis maximum
    assert [t.label.text for t in chart.ticks] == [f"{v:,}" for v in values]


@given(
    st.lists(st.tuples(st.integers(0, 10**7), st.integers(0, 10**7)), max_size=report_data.MAX_BUCKETS),
    st.sampled_from([0.01, 1.0, 10.0, 1800.0, 86400.0]),
)
def test_throughput_bars_stay_in_the_chart(buckets: list[tuple[int, int]], bucket_s: float) -> None:
    chart = svg.throughput_chart(buckets, bucket_s)
    assert_inside(chart)
    assert_axis(chart, max((f + b for f, b in buckets), default=0))
    assert len(chart.bars) == len(buckets)
    for bar, (fine, bad) in zip(chart.bars, buckets, strict=True):
        assert [r.tone for r in bar.rects] == [t for t, n in (("fine", fine), ("bad", bad)) if n]
        if fine and bad:  # stacked: the other statuses sit on the rows that ended well
            low, high = bar.rects
            assert high.y + high.height == pytest.approx(low.y)


def test_throughput_of_an_empty_and_a_single_bucket_series() -> None:
    empty = svg.throughput_chart([], 10.0)
    assert_inside(empty)
    assert_axis(empty, 0)
    assert empty.bars == () and [x.text for x in empty.x_labels] == ["0"]

    single = svg.throughput_chart([(3, 1)], 10.0)
    assert_inside(single)
    assert_axis(single, 4)
    (bar,) = single.bars
    assert bar.title == "0 to 10s: 4 rows (1 in other statuses)"
    assert [x.text for x in single.x_labels] == ["0", "10s"]
    assert single.x_labels[-1].x == single.plot_right
    # A lone bar keeps a margin each side, so it reads as a bar rather than a filled plot.
    assert bar.rects[0].x > single.plot_left and bar.rects[0].x + bar.rects[0].width < single.plot_right


def test_throughput_labels_at_most_every_eighth_of_the_axis() -> None:
    chart = svg.throughput_chart([(1, 0)] * 60, 10.0)
    assert [x.text for x in chart.x_labels] == ["0", "1m20s", "2m40s", "4m", "5m20s", "6m40s", "8m", "9m20s"]
    xs = [x.x for x in chart.x_labels]
    assert xs == sorted(xs) and len(set(xs)) == len(xs)


def bins(counts: Sequence[int], width: int = 10, *, overflow: int | None = None) -> list[report_data.Bin]:
    out = [report_data.Bin(low=i * width, high=(i + 1) * width, count=n) for i, n in enumerate(counts)]
    if overflow is not None:
        edge = len(counts) * width
        out.append(report_data.Bin(low=edge, high=edge * 20, count=overflow, overflow=True))
    return out


def test_latency_histogram_geometry() -> None:
    chart = svg.latency_chart(bins([5, 40, 12, 0, 3], overflow=2), p50_ms=14, p99_ms=50)
    assert_inside(chart)
    assert_axis(chart, 40)
    assert [b.rects[0].tone for b in chart.bars] == ["fine"] * 5 + ["bad"]
    assert chart.bars[-1].title == "≥ 50 ms: 2 rows"
    assert chart.bars[3].rects[0].height == 0
    assert chart.x_labels[-1].text == "≥50 ms"
    p50, p99 = chart.marks
    assert (p50.label.text, p99.label.text) == ("p50", "p99")
    assert p50.x < p99.x and p50.label.y != p99.label.y  # two heights: both legible when close
    # p99 at the edge of the plain bins, not in the overflow bar's slot.
    assert p99.x == pytest.approx(chart.plot_left + 5 * (chart.plot_right - chart.plot_left) / 6)


def test_latency_of_no_bins_and_of_one_bin() -> None:
    empty = svg.latency_chart([], p50_ms=0, p99_ms=0)
    assert_inside(empty)
    assert_axis(empty, 0)
    assert empty.bars == () and empty.x_labels == () and empty.marks == ()

    single = svg.latency_chart(bins([7], width=1), p50_ms=0, p99_ms=0)
    assert_inside(single)
    assert_axis(single, 7)
    assert len(single.bars) == 1 and [x.text for x in single.x_labels] == ["0 ms"]
    assert [m.label.text for m in single.marks] == ["p50", "p99"]
    assert all(m.label.anchor == "start" for m in single.marks)


def test_a_mark_near_the_right_edge_is_labelled_on_its_left() -> None:
    chart = svg.latency_chart(bins([1] * 10), p50_ms=50, p99_ms=100)
    assert [(m.label.text, m.label.anchor) for m in chart.marks] == [("p50", "start"), ("p99", "end")]
    assert chart.marks[1].label.x < chart.marks[1].x


# --- RunOutput: the lines it writes and the figures it tallies as it writes them ---

TALLY_SECRET = "tally-secret-0042"
redact.register(TALLY_SECRET)
# Text as hostile as a file can carry: delimiters, quotes, line breaks, markup, a registered secret.
TEXT = st.text(
    st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=12
) | st.sampled_from(["", "a,b", 'say "hi"', "two\r\nlines", "\r", HOSTILE, f"key {TALLY_SECRET} leaked"])
MOMENTS = st.sampled_from(
    [
        "",
        "not a time",
        "2025-01-01T00:00:00.000Z",
        "2025-01-01T00:00:00.001Z",
        "2025-01-01T00:04:59.999Z",
        "2025-01-01T00:05:00.000Z",
        "2025-01-01T00:09:59.999Z",
        "2025-01-01T00:10:00.000Z",
        "2024-12-31T23:59:59.999Z",
        "2025-01-01T01:00:00.000Z",
        "2025-01-01T00:00:10.010+00:00",
    ]
)
RESULT_ROWS = st.builds(
    ResultRow,
    user_id=TEXT,
    status=st.sampled_from(Status),
    http_status=st.none() | st.integers(100, 599),
    result_code=TEXT,
    result_text=TEXT,
    attempts=st.integers(0, 150),
    error=TEXT,
    finished_at=MOMENTS,
    latency_ms=st.none() | st.integers(-1, 200_000),
    signature_ok=st.none() | st.booleans(),
)
REJECT_ROWS = st.builds(
    RejectRow, line=st.integers(0, 10**6), user_id=TEXT, reason=st.sampled_from(Reason), message=TEXT
)
SKIPPED = st.tuples(st.lists(st.tuples(TEXT, TEXT, TEXT, TEXT, TEXT), max_size=5), MOMENTS)
WRITES = st.lists(st.one_of(RESULT_ROWS, REJECT_ROWS, SKIPPED), max_size=40)


def a_summary(output: RunOutput, **values: Any) -> Summary:
    figures: dict[str, Any] = {
        "run_id": output.run_id,
        "out_dir": str(output.dir),
        "manifest": "/data/users.csv",
        "ledger": "ledger",
        "env": "sandbox",
        "base_url": BASE_URL,
        "started_at": "2025-01-01T00:00:00.000Z",
        "finished_at": "2025-01-01T00:10:00.000Z",
        "duration_s": 600.0,
        "total_rows": 0,
        "counts": {},
        "rejected": 0,
        "sent": 0,
        "attempts": 0,
        "new_rows": 0,
        "retries": 0,
        "not_reached": 0,
        "rows_per_s": 0.0,
        "exit_code": 0,
    }
    return Summary(**{**figures, **values})


def write(output: RunOutput, writes: Sequence[Any]) -> None:
    for item in writes:
        if isinstance(item, ResultRow):
            output.result(item)
        elif isinstance(item, RejectRow):
            output.reject(item)
        else:
            rows, finished_at = item
            output.skipped(rows, finished_at)


@settings(max_examples=60, deadline=None)  # each example writes and renders a run's report
@given(WRITES)
def test_the_figures_a_run_tallies_as_it_writes_are_those_its_files_give_back(writes: list[Any]) -> None:
    with tempfile.TemporaryDirectory() as root:
        output = RunOutput(Path(root))
        write(output, writes)
        output.close(a_summary(output))
        run = report_data.read_summary(output.dir / "summary.json")
        read = report_data.read_tally(output.dir / "results.csv", output.dir / "rejects.csv")
        assert output.tally.results(run) == read.results(run)
        assert output.tally.rejects() == read.rejects()
        assert TALLY_SECRET not in (output.dir / "report.html").read_text(encoding="utf-8")


def _skipped_both_ways(root: Path, batches: Sequence[tuple[Sequence[Any], str]]) -> tuple[bytes, bytes]:
    """results.csv as `skipped` writes these chunks, and as `result` writes their rows one by one."""
    fast, plain = RunOutput(root / "fast"), RunOutput(root / "plain")
    for rows, finished_at in batches:
        fast.skipped(rows, finished_at)
        for user_id, code, smile_job_id, job_id, message in rows:
            plain.result(
                ResultRow(
                    user_id=user_id,
                    status=Status.SKIPPED,
                    result_code=code,
                    smile_job_id=smile_job_id,
                    job_id=job_id,
                    error=message,
                    finished_at=finished_at,
                )
            )
    for out in (fast, plain):
        out.close_incomplete()
    return (fast.dir / "results.csv").read_bytes(), (plain.dir / "results.csv").read_bytes()


@settings(deadline=None)  # files on disk, on a machine whose cores are busy: no timing is asserted
@given(st.lists(SKIPPED, max_size=4))
def test_skipped_rows_are_written_as_result_rows_would_be_byte_for_byte(batches: list[Any]) -> None:
    """The fast writer formats most fields once a chunk and scrubs the chunk at once: still the csv writer's."""
    with tempfile.TemporaryDirectory() as root:
        fast_bytes, plain_bytes = _skipped_both_ways(Path(root), batches)
        assert fast_bytes == plain_bytes


def test_a_chunk_of_skipped_rows_alike_is_written_as_result_rows_would_be(tmp_path: Path) -> None:
    """A chunk whose rows share one result code and message and need no quotes is formatted at once, which
    random chunks seldom are; any other (another message or code, a value with a comma, quote or newline, an
    empty ID) row by row: either way, every line is the csv writer's, in the chunk's order."""
    said, other = (
        "enrolled earlier (the ledger says so); not sent again",
        "enrolled earlier, said, with a comma",
    )
    alike = [(f"u{i}", "0840", f"{i:010d}", f"job-{i}", said) for i in range(3)]
    odd = [
        ("u,9", "0840", "1", "j", said),
        ("u8", "0840", "1", "j", other),
        ("u7", "2209", "1", "j", said),
        ("", "0840", "1", "j", said),
        ("u6", "0840", 'a"b', "j", said),
        ("u5", "0840", "1", "x\ny", said),
        ("u4", "0840", "1", "x\ry", said),
    ]
    chunks = [alike, [], *([*alike[:2], row, alike[2]] for row in odd)]
    at = "2026-12-07T00:00:00.000Z"
    fast_bytes, plain_bytes = _skipped_both_ways(tmp_path, [(chunk, at) for chunk in chunks])
    assert fast_bytes == plain_bytes
    assert len(list(csv.DictReader(io.StringIO(fast_bytes.decode(), newline="")))) == sum(map(len, chunks))


def test_a_run_writes_its_report_without_reading_its_files_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_reading(*paths: Path) -> report_data.RunTally:
        raise AssertionError(f"read back: {paths}")

    monkeypatch.setattr(report_package, "read_tally", no_reading)
    output = RunOutput(tmp_path)
    write(
        output,
        [
            result_row("ok_1", Status.ENROLLED, attempts=1),
            (skipped_rows(3), "2025-01-01T00:00:01.000Z"),
            RejectRow(line=5, user_id="when_1", reason=Reason.BAD_DATE, message="not a date"),
        ],
    )
    output.close(
        a_summary(
            output,
            total_rows=5,
            counts={"enrolled": 1, "skipped": 3, "rejected": 1},
            rejected=1,
            sent=1,
            attempts=1,
        )
    )
    page = (output.dir / "report.html").read_text(encoding="utf-8")
    assert cells(page, "skipped")[0] == "3" and cells(page, "total")[0] == "5" and "MISMATCH" not in page
    assert "line 5: when_1" in kind_row(page, "bad_date")


def test_a_report_that_cant_be_written_is_logged_and_the_run_stands(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    output = RunOutput(tmp_path)
    write(output, [result_row("ok_1", Status.ENROLLED, attempts=1)])
    (output.dir / "report.html").mkdir()  # not a report of ours: never replaced unasked
    with caplog.at_level(logging.WARNING, logger="backfill"):
        summary = output.close(a_summary(output, total_rows=1, counts={"enrolled": 1}, sent=1, attempts=1))
    assert summary.exists() and (output.dir / "results.csv").exists()
    assert [getattr(r, "event", "") for r in caplog.records] == ["report_failed"]


def result_row(user_id: str, status: Status, **values: Any) -> ResultRow:
    return ResultRow(user_id=user_id, status=status, finished_at="2025-01-01T00:00:00.500Z", **values)


def skipped_rows(n: int) -> list[tuple[str, str, str, str, str]]:
    return [(f"skip_{i}", "0840", f"job-{i}", f"j-{i}", "enrolled earlier; not sent again") for i in range(n)]


def test_a_long_run_is_held_in_bounded_ticks_each_row_within_a_tick_of_its_bucket(tmp_path: Path) -> None:
    """A day of rows, one a second: far more moments than the tally holds apart, so ticks are merged; a row
    can then only be drawn in the bucket before its own, when it finished within a tick after the edge."""
    tally = report_data.RunTally()
    start = datetime(2025, 1, 1, tzinfo=UTC)
    for second in range(86_400):
        at = (start + timedelta(seconds=second)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        tally.result(
            user_id=f"u{second}",
            status="enrolled",
            attempts=1,
            finished_at=at,
            latency_ms=None,
            http_status="",
            result_code="",
            result_text="",
            error="",
        )
    folder = write_run(
        tmp_path / "run",
        [],
        finished_at="2025-01-02T00:00:00.000Z",
        duration_s=86400.0,
        started_at="2025-01-01T00:00:00.000Z",
    )
    throughput = tally.results(report_data.read_summary(folder / "summary.json")).throughput
    assert throughput is not None and throughput.bucket_s == 1800 and len(throughput.buckets) == 48
    fine = [f for f, _ in throughput.buckets]
    assert sum(fine) == 86_400
    tick_s = 1800 / 100
    assert all(abs(n - 1800) <= tick_s for n in fine), fine

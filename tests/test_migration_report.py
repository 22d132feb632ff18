"""`backfill report --checkpoint`: one report across every run of a ledger, and each run's manifest SHA-256."""

from __future__ import annotations

import hashlib
import html
import json
import re
import stat
from datetime import UTC, datetime
from pathlib import Path

from backfill.ledger import Binding, LedgerRow, LedgerStatus
from backfill.outputs.report.migration import LedgerView, build_migration
from backfill.outputs.report.render import render_migration
from backfill.sandbox import Faults
from backfill.vocab import State

from .conftest import ThreadedSandboxes, simple_rows, write_manifest
from .test_operate import cli, place, run_flags

HOSTILE = '<script>alert("x")</script>&'


def _state_counts(page: str) -> dict[str, int]:
    found = re.findall(
        r'<tr(?: class="zero")? data-state="([a-z_]+)"><td><code>[^<]*</code></td><td>[^<]*</td>'
        r'<td class="n">([\d,]+)</td>',
        page,
    )
    return {state: int(n.replace(",", "")) for state, n in found if int(n.replace(",", ""))}


def _open_ids(page: str, state: str) -> set[str]:
    section = page.split(f'<h3 id="open-{state}">', 1)[1].split("<h3 ", 1)[0].split("</section>", 1)[0]
    return {html.unescape(u) for u in re.findall(r'<tr data-user-id="([^"]*)">', section)}


def test_migration_report_across_two_runs_and_a_retry(
    tmp_path: Path, threaded_sandboxes: ThreadedSandboxes
) -> None:
    faults = Faults(
        script={"user_0001": ["2213"], "user_0002": [503, 503], HOSTILE: ["2213"]},
        foreign_ids=frozenset({"user_0003"}),
    )
    server = threaded_sandboxes.start(faults=faults)
    env = {"BACKFILL_USER_ID_PATTERN": ".+"}  # lets the hostile ID through to the ledger and the page
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = write_manifest(tmp_path / "a", [*simple_rows(5), (HOSTILE, "2021-01-01", "hostile.png")])
    second = write_manifest(tmp_path / "b", simple_rows(3, prefix="late_"), first_seed=1000)
    code, _, _ = cli("run", str(first), *run_flags(tmp_path, server), "--max-attempts", "2", env=env)
    assert code == 1
    code, _, _ = cli("run", str(second), *run_flags(tmp_path, server), env=env)
    assert code == 0
    code, out, _ = cli("retry", *run_flags(tmp_path, server), env=env)  # user_0002 enrolls now
    assert code == 0 and "1 enrolled" in out

    # Each run's summary.json names the manifest's SHA-256 as read and the ledger used.
    code, out, _ = cli("status", *place(tmp_path), "--json")
    status = json.loads(out)
    summaries = [json.loads(p.read_text()) for p in sorted((tmp_path / "out").glob("*/summary.json"))]
    assert len(summaries) == 3
    for summary in summaries:
        assert (
            summary["manifest_sha256"] == hashlib.sha256(Path(summary["manifest"]).read_bytes()).hexdigest()
        )
        assert summary["ledger"] == status["location"]
        assert summary["manifest_sha256"] in (Path(summary["out_dir"]) / "report.html").read_text()
    assert {s["manifest"] for s in summaries} >= {str(first), str(second)}

    code, out, err = cli("report", *place(tmp_path), "--out", str(tmp_path / "reports"))
    assert code == 0, err
    target = Path(out.strip())
    assert target.parent == tmp_path / "reports" and re.fullmatch(
        r"migration-report-\d{8}T\d{9}Z\.html", target.name
    )
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    page = target.read_text()

    assert _state_counts(page) == status["counts"] == {"enrolled": 6, "failed": 2, "id_conflict": 1}
    for summary in summaries:  # every run, with its manifest and the manifest's SHA-256
        row = page.split(f'<tr data-run="{summary["run_id"]}">', 1)[1].split("</tr>", 1)[0]
        assert html.escape(summary["manifest"]) in row and summary["manifest_sha256"] in row
    assert hashlib.sha256(first.read_bytes()).hexdigest() in page
    assert hashlib.sha256(second.read_bytes()).hexdigest() in page
    assert _open_ids(page, "failed") == {"user_0001", HOSTILE}
    assert _open_ids(page, "id_conflict") == {"user_0003"}
    assert _open_ids(page, "unknown") == set()
    assert "<script" not in page.lower() and "&lt;script&gt;alert(" in page
    assert status["location"] in page and status["binding"]["endpoint"] in page
    assert "Content-Security-Policy" in page and "@media print" in page

    # --output names the file; a migration report there is brought up to date, anything else replaced only
    # when asked.
    chosen = tmp_path / "signed" / "migration.html"
    assert cli("report", *place(tmp_path), "--output", str(chosen))[0] == 0 and chosen.exists()
    assert cli("report", *place(tmp_path), "--output", str(chosen))[0] == 0
    chosen.write_text("<html>signed on paper</html>")
    code, _, err = cli("report", *place(tmp_path), "--output", str(chosen))
    assert code == 2 and "--overwrite" in err and chosen.read_text() == "<html>signed on paper</html>"
    assert cli("report", *place(tmp_path), "--output", str(chosen), "--overwrite")[0] == 0


def test_a_run_folder_and_a_ledger_are_not_both_reported(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    code, _, err = cli("report", str(tmp_path / "run"), "--checkpoint", str(tmp_path / "cp.sqlite"))
    assert code == 2 and "RUN_DIR" in err and "--checkpoint" in err


def test_a_missing_ledger_is_an_error_not_an_empty_report(tmp_path: Path) -> None:
    code, _, err = cli("report", "--checkpoint", str(tmp_path / "none.sqlite"), "--out", str(tmp_path / "o"))
    assert code == 2 and "Traceback" not in err and not (tmp_path / "o").exists()


def _row(user_id: str, state: State) -> LedgerRow:
    return LedgerRow(
        user_id=user_id,
        state=state,
        attempts=1,
        doubt=False,
        photo_sha256=None,
        image_ref=None,
        image_size=None,
        image_version=None,
        user_created_at=None,
        result_code="2213",
    )


def test_open_items_are_capped_with_a_note_and_the_export_command() -> None:
    status = LedgerStatus(
        location="/l.sqlite",
        binding=Binding(partner_id="085", endpoint="https://h:443"),
        counts={"enrolled": 10, "failed": 500},
        waiting_for_retry=0,
        oldest_unfinished=None,
        runs=[],
    )
    view = LedgerView(
        status=status, open_rows={State.FAILED: (_row("u1", State.FAILED), _row("u2", State.FAILED))}
    )
    page = render_migration(build_migration(view, datetime(2026, 1, 1, tzinfo=UTC)))
    assert _open_ids(page, "failed") == {"u1", "u2"}
    assert "498 more not shown here" in page and "backfill export --status failed --out failed.csv" in page
    assert "500 user_ids need a person (500 failed)" in page
    assert "No run has written to this ledger." in page

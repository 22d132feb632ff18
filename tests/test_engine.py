"""The engine end to end against the real sandbox over HTTP: enroll, resume, 2209 both ways, retries, systemic stop."""

from __future__ import annotations

import asyncio
import csv
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from backfill import compose as runner
from backfill.api.client import Client
from backfill.cli.progress import TqdmProgress
from backfill.config import Settings
from backfill.errors import InternalError, LedgerError
from backfill.images import Fingerprint, ImageError, ImageProblem, Photo
from backfill.images.local import LocalImageSource
from backfill.redact import Secret
from backfill.run.rate import RETRY_AFTER_MAX_S
from backfill.run.records import Summary
from backfill.run.stops import Stops
from backfill.sandbox import Faults, RunningSandbox, start_sandbox
from backfill.vocab import Reason

from .conftest import API_KEY, PARTNER_ID, Sleeps, png_bytes, simple_rows, write_manifest


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def results(summary: Summary) -> dict[str, dict[str, str]]:
    return {r["user_id"]: r for r in read_csv(Path(summary.out_dir) / "results.csv")}


def rejects(summary: Summary) -> list[dict[str, str]]:
    return read_csv(Path(summary.out_dir) / "rejects.csv")


async def test_every_valid_row_enrolled_and_second_run_sends_nothing(
    tmp_path: Path, sandbox: RunningSandbox, make_settings: Callable[..., Settings]
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(30))
    first = await runner.run(make_settings(sandbox), manifest)
    assert first.exit_code == 0 and first.counts == {"enrolled": 30}
    assert set(sandbox.state.enrolled) == {f"user_{i:04d}" for i in range(30)}
    rows = results(first)
    assert all(
        r["signature_ok"] == "true" and r["smile_job_id"] and r["attempts"] == "1" for r in rows.values()
    )
    summary_file = json.loads((Path(first.out_dir) / "summary.json").read_text())
    assert summary_file["counts"] == {"enrolled": 30} and summary_file["total_rows"] == 30

    before = sandbox.state.total_requests
    second = await runner.run(make_settings(sandbox), manifest)
    assert sandbox.state.total_requests == before
    assert second.exit_code == 0 and second.counts == {"skipped": 30} and second.out_dir != first.out_dir


async def test_resume_after_a_stopped_run_sends_each_user_once(
    tmp_path: Path, sandbox: RunningSandbox, make_settings: Callable[..., Settings]
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(20))
    canary = await runner.run(make_settings(sandbox, limit=5, concurrency=1), manifest)
    assert canary.exit_code == 1 and canary.counts == {"enrolled": 5} and canary.not_reached == 15
    rest = await runner.run(make_settings(sandbox), manifest)
    assert rest.exit_code == 0 and rest.counts == {"enrolled": 15, "skipped": 5}
    assert all(n == 1 for n in sandbox.state.requests.values()) and len(sandbox.state.enrolled) == 20


async def test_crash_after_send_resumes_as_already_enrolled(
    tmp_path: Path, make_settings: Callable[..., Settings], sleeps: Sleeps
) -> None:
    # The first request for u1 is committed but its connection is reset: the client never sees the success.
    server = await start_sandbox(PARTNER_ID, API_KEY, faults=Faults(script={"user_0001": ["reset_after"]}))
    try:
        manifest = write_manifest(tmp_path, simple_rows(3))
        summary = await runner.run(make_settings(server), manifest, sleep=sleeps)
        row = results(summary)["user_0001"]
        assert row["status"] == "already_enrolled" and row["attempts"] == "2"
        assert summary.exit_code == 0 and server.state.requests["user_0001"] == 2
    finally:
        await server.stop()


async def test_attempt_recorded_before_a_kill_reads_2209_as_ours(
    tmp_path: Path, sandbox: RunningSandbox, make_settings: Callable[..., Settings]
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(2))
    settings = make_settings(sandbox)
    await runner.run(settings, manifest)
    # Emulate a kill between send and outcome: the checkpoint still says "sending".
    db = sqlite3.connect(settings.ledger_path())
    db.execute("UPDATE users SET state='sending', doubt=0 WHERE user_id='user_0000'")
    db.commit()
    db.close()
    again = await runner.run(make_settings(sandbox), manifest)
    assert results(again)["user_0000"]["status"] == "already_enrolled"
    assert again.exit_code == 0


async def test_2209_for_an_id_never_sent_is_a_conflict(
    tmp_path: Path, sandbox: RunningSandbox, make_settings: Callable[..., Settings]
) -> None:
    # Someone else enrolls user_0001 first, outside this tool.
    async with Client(
        sandbox.base_url, PARTNER_ID, Secret(API_KEY), timeout=5, connect_timeout=5, concurrency=1
    ) as c:
        import base64

        verdict = await c.send("user_0001", "2020-01-01", base64.b64encode(png_bytes(99)))
    assert verdict.result_code == "0840"
    manifest = write_manifest(tmp_path, simple_rows(3))
    summary = await runner.run(make_settings(sandbox), manifest)
    assert results(summary)["user_0001"]["status"] == "id_conflict"
    assert summary.exit_code == 1
    again = await runner.run(make_settings(sandbox), manifest)
    assert results(again)["user_0001"]["status"] == "id_conflict" and sandbox.state.requests["user_0001"] == 2


async def test_changed_photo_for_an_enrolled_id_is_rejected(
    tmp_path: Path, sandbox: RunningSandbox, make_settings: Callable[..., Settings]
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(3))
    await runner.run(make_settings(sandbox), manifest)
    (tmp_path / "images" / "user_0002.png").write_bytes(png_bytes(200))
    summary = await runner.run(make_settings(sandbox), manifest)
    assert [(r["user_id"], r["reason"]) for r in rejects(summary)] == [("user_0002", "user_id_reused")]
    assert summary.counts == {"rejected": 1, "skipped": 2} and summary.exit_code == 1
    assert sandbox.state.requests["user_0002"] == 1


async def test_touched_but_identical_photo_is_not_a_reuse(
    tmp_path: Path, sandbox: RunningSandbox, make_settings: Callable[..., Settings]
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(2))
    await runner.run(make_settings(sandbox), manifest)
    image = tmp_path / "images" / "user_0001.png"
    image.write_bytes(image.read_bytes())  # new mtime, same bytes: the hash decides
    summary = await runner.run(make_settings(sandbox), manifest)
    assert summary.counts == {"skipped": 2}


async def test_the_ledger_is_bound_to_the_endpoint_not_the_env_label(
    tmp_path: Path, sandbox: RunningSandbox, make_settings: Callable[..., Settings]
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(1))
    await runner.run(make_settings(sandbox), manifest)
    # A rehearsal against another server (here a second sandbox) must not read this one's rows as done.
    async with await start_sandbox(PARTNER_ID, API_KEY) as other:
        with pytest.raises(
            LedgerError, match="belongs to partner '085' on " + sandbox.base_url.removesuffix("/v1")
        ):
            await runner.run(make_settings(other), manifest)
        assert other.state.total_requests == 0
    # The same endpoint under another env label is the same ledger: nothing is sent again.
    again = await runner.run(make_settings(sandbox, env="sandbox", base_url=sandbox.base_url), manifest)
    assert again.counts == {"skipped": 1}


async def test_429_and_503_are_retried_until_enrolled(
    tmp_path: Path, make_settings: Callable[..., Settings], sleeps: Sleeps
) -> None:
    script = {"user_0000": [429, 503], "user_0001": [503, 503, 503]}
    server = await start_sandbox(PARTNER_ID, API_KEY, faults=Faults(script=script, retry_after_s=2))
    try:
        manifest = write_manifest(tmp_path, simple_rows(3))
        summary = await runner.run(make_settings(server), manifest, sleep=sleeps)
        rows = results(summary)
        assert summary.counts == {"enrolled": 3} and summary.exit_code == 0
        assert rows["user_0000"]["attempts"] == "3" and rows["user_0001"]["attempts"] == "4"
        assert 2.0 in sleeps.calls  # Retry-After honoured
    finally:
        await server.stop()


async def test_transient_errors_exhaust_into_retry_exhausted_then_resume(
    tmp_path: Path, make_settings: Callable[..., Settings], sleeps: Sleeps
) -> None:
    server = await start_sandbox(PARTNER_ID, API_KEY, faults=Faults(script={"user_0000": [503, 503, 503]}))
    try:
        manifest = write_manifest(tmp_path, simple_rows(2))
        summary = await runner.run(make_settings(server, max_attempts=2), manifest, sleep=sleeps)
        assert results(summary)["user_0000"]["status"] == "retry_exhausted" and summary.exit_code == 1
        again = await runner.run(make_settings(server, max_attempts=2), manifest, sleep=sleeps)
        assert results(again)["user_0000"]["status"] == "enrolled" and again.exit_code == 0
    finally:
        await server.stop()


async def test_bad_key_stops_the_run_early_without_failing_rows(
    tmp_path: Path, sandbox: RunningSandbox, make_settings: Callable[..., Settings]
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(200))
    summary = await runner.run(make_settings(sandbox, key="wrong-key", concurrency=2), manifest)
    assert summary.exit_code == 4 and "SMILE_API_KEY" in summary.stop_reason
    assert sandbox.state.total_requests <= 4 and not sandbox.state.enrolled
    assert "failed" not in summary.counts and summary.not_reached >= 190
    assert "wrong-key" not in json.dumps(summary.settings)


async def test_production_not_enabled_stops_with_exit_4_naming_the_cause(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    async with await start_sandbox(PARTNER_ID, API_KEY, faults=Faults(systemic_code="2220")) as server:
        manifest = write_manifest(tmp_path, simple_rows(100))
        summary = await runner.run(make_settings(server, concurrency=2), manifest)
        assert summary.exit_code == 4 and "production is not enabled" in summary.stop_reason
        assert server.state.total_requests <= 4 and summary.not_reached >= 90


async def test_dry_run_sends_nothing_and_writes_no_checkpoint(
    tmp_path: Path, sandbox: RunningSandbox, make_settings: Callable[..., Settings]
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(5))
    settings = make_settings(sandbox, dry_run=True)
    summary = await runner.run(settings, manifest)
    assert sandbox.state.total_requests == 0 and not settings.ledger_path().exists()
    assert summary.counts == {"dry_run": 5} and summary.exit_code == 0


async def test_every_manifest_row_lands_in_exactly_one_output(
    tmp_path: Path, sandbox: RunningSandbox, make_settings: Callable[..., Settings]
) -> None:
    rows = [
        *simple_rows(6),
        ("bad id!", "2021-01-01", "x.png"),
        ("user_0000", "2021-01-01", "dup.png"),
        ("user_0009", "not a date", "user_0009.png"),
        ("user_0010", "2021-01-01", "missing.png"),
    ]
    manifest = write_manifest(tmp_path, rows)
    (tmp_path / "images" / "missing.png").unlink()
    summary = await runner.run(make_settings(sandbox), manifest)
    sent = results(summary)
    rejected = rejects(summary)
    assert len(sent) + len(rejected) == len(rows) == summary.total_rows
    assert {r["reason"] for r in rejected} >= {
        "bad_user_id",
        "duplicate_user_id",
        "bad_date",
        "image_missing",
    }
    assert "user_0000" not in sent and summary.exit_code == 1


async def test_outputs_are_owner_only(
    tmp_path: Path, sandbox: RunningSandbox, make_settings: Callable[..., Settings]
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(1))
    summary = await runner.run(make_settings(sandbox), manifest)
    folder = Path(summary.out_dir)
    assert folder.stat().st_mode & 0o077 == 0
    assert all(p.stat().st_mode & 0o077 == 0 for p in folder.iterdir())


async def test_sandbox_sees_a_real_http_client(sandbox: RunningSandbox) -> None:
    async with aiohttp.ClientSession() as session, session.get(sandbox.base_url + "/_sandbox/state") as resp:
        assert resp.status == 200 and (await resp.json())["total_requests"] == 0


async def test_breaker_stops_a_run_where_most_rows_fail(
    tmp_path: Path, make_settings: Callable[..., Settings], sleeps: Sleeps
) -> None:
    server = await start_sandbox(PARTNER_ID, API_KEY, faults=Faults(error_rate=1.0))
    try:
        manifest = write_manifest(tmp_path, simple_rows(300))
        settings = make_settings(server, max_attempts=2, fail_threshold=0.5, concurrency=2)
        summary = await runner.run(settings, manifest, sleep=sleeps)
        assert summary.exit_code == 4 and "--fail-threshold" in summary.stop_reason
        assert summary.sent < 60 and summary.not_reached > 200
    finally:
        await server.stop()


async def test_malformed_answers_are_recorded_as_such_without_crashing(
    tmp_path: Path, make_settings: Callable[..., Settings], sleeps: Sleeps
) -> None:
    """A hostile or broken server: every answer shape ends as a result row that says what was wrong."""
    from aiohttp import web

    from backfill.api.signing import sign, utc_timestamp

    def success(user_id: str, *, key: str = API_KEY, echo: str | None = None) -> web.Response:
        stamp = utc_timestamp()
        return web.json_response(
            {
                "ResultCode": "0840",
                "ResultText": "Enrolled",
                "SmileJobID": "1",
                "timestamp": stamp,
                "signature": sign(stamp, PARTNER_ID, key),
                "PartnerParams": {"user_id": echo or user_id, "job_id": "j"},
            }
        )

    answers = {
        "html": lambda u: web.Response(status=502, text="<html><body>Bad gateway</body></html>"),
        "notjson": lambda u: web.Response(status=200, text="OK"),
        "forged": lambda u: success(u, key="someone-else"),
        "otheruser": lambda u: success(u, echo="somebody_else"),
        "nofields": lambda u: web.json_response({"ResultCode": "0840"}),
        "listbody": lambda u: web.json_response([1, 2, 3], status=400),
    }

    async def handler(request: web.Request) -> web.Response:
        user_id = (await request.json())["user_id"]
        return answers[user_id](user_id)

    app = web.Application(client_max_size=10 * 1024 * 1024)
    app.router.add_post("/v1/backfill_users", handler)
    app_runner = web.AppRunner(app)
    await app_runner.setup()
    site = web.TCPSite(app_runner, "127.0.0.1", 0)
    await site.start()
    port = app_runner.addresses[0][1]
    try:
        rows = [(name, "2021-08-12", f"{name}.png") for name in answers]
        manifest = write_manifest(tmp_path, rows)
        settings = make_settings(base_url=f"http://127.0.0.1:{port}/v1", max_attempts=2, fail_threshold=1.0)
        summary = await runner.run(settings, manifest, sleep=sleeps)
    finally:
        await app_runner.cleanup()
    got = results(summary)
    assert set(got) == set(answers) and not summary.stop_reason
    assert got["forged"]["status"] == "unknown" and got["forged"]["signature_ok"] == "false"
    assert "signature" in got["forged"]["error"]
    assert got["otheruser"]["status"] == "unknown" and "somebody_else" in got["otheruser"]["error"]
    assert got["html"]["status"] == "unknown" and "502" in got["html"]["error"]
    assert got["notjson"]["status"] == "unknown" and "not the API's JSON" in got["notjson"]["error"]
    assert got["nofields"]["status"] == "unknown" and got["nofields"]["signature_ok"] == "false"
    # A 4xx was refused before the API acted on it, whatever its body: not in doubt (found in review).
    assert got["listbody"]["status"] == "failed" and "400" in got["listbody"]["error"]


# --- found in review: each test below failed before its fix ---


async def test_a_retry_within_a_run_does_not_make_a_later_2209_ours(
    tmp_path: Path, make_settings: Callable[..., Settings], sleeps: Sleeps
) -> None:
    # Two refused attempts (503) then, next run, 2209: the ID is someone else's, not an answer we lost.
    async with await start_sandbox(
        PARTNER_ID, API_KEY, faults=Faults(script={"user_0000": [503, 503, "2209"]})
    ) as server:
        manifest = write_manifest(tmp_path, simple_rows(1))
        first = await runner.run(make_settings(server, max_attempts=2), manifest, sleep=sleeps)
        assert results(first)["user_0000"]["status"] == "retry_exhausted"
        second = await runner.run(make_settings(server, max_attempts=2), manifest, sleep=sleeps)
        assert results(second)["user_0000"]["status"] == "id_conflict"


async def test_retry_after_is_capped_and_a_stop_ends_the_wait(
    tmp_path: Path, make_settings: Callable[..., Settings], sleeps: Sleeps
) -> None:
    async with await start_sandbox(
        PARTNER_ID, API_KEY, faults=Faults(script={"user_0000": [429]}, retry_after_s=3600)
    ) as server:
        manifest = write_manifest(tmp_path, simple_rows(1))
        summary = await runner.run(make_settings(server), manifest, sleep=sleeps)
        assert summary.counts == {"enrolled": 1} and max(sleeps.calls) <= RETRY_AFTER_MAX_S
        # With the real clock: a 429 asking for an hour, then a --max-duration stop, ends the run promptly.
        manifest = write_manifest(tmp_path, simple_rows(1, prefix="other_"))
    async with await start_sandbox(
        PARTNER_ID, API_KEY, faults=Faults(script={"other_0000": [429, 429]}, retry_after_s=3600)
    ) as server:
        settings = make_settings(server, ledger=tmp_path / "cp2.sqlite", max_duration=0.3)
        summary = await asyncio.wait_for(runner.run(settings, manifest), 30)
        assert summary.counts == {"pending": 1} and "--max-duration" in summary.stop_reason


async def test_a_stop_during_a_retry_after_a_lost_answer_leaves_the_row_in_doubt_not_pending(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    """A timeout may hide an enrollment (the sandbox enrolls, then holds the answer past --timeout). A stop that
    comes while the row waits for its retry must say so: `unknown` in results.csv and the summary, never
    `pending` (the word for a row nothing of ours may have enrolled); a re-run settles it as ours. (A row stopped
    after 429s, which prove nothing was enrolled, stays `pending`: test_retry_after_is_capped_*.)"""
    engine: list[Any] = []

    async def stop_at_the_backoff(seconds: float) -> None:
        engine[0].stop(
            "--max-duration 1s reached; re-run to continue", 0
        )  # as the deadline does, mid-backoff
        await asyncio.sleep(0)

    async with await start_sandbox(
        PARTNER_ID, API_KEY, faults=Faults(script={"user_0000": ["slow"]}, slow_ms=60_000)
    ) as server:
        manifest = write_manifest(tmp_path, simple_rows(1))
        settings = make_settings(server, timeout=0.3)
        bar = TqdmProgress(enabled=False)
        first = await runner.run(
            settings, manifest, sleep=stop_at_the_backoff, engine_ready=engine.append, progress=bar
        )
        assert (first.counts, first.exit_code) == ({"unknown": 1}, 1)
        # The progress line tells doubt apart: not a failure, not done.
        assert bar._postfix.get("in_doubt") == 1 and "failed" not in bar._postfix
        assert "may have reached the server" in results(first)["user_0000"]["error"]
        second = await runner.run(settings, manifest)
        assert results(second)["user_0000"]["status"] == "already_enrolled"
        assert server.state.requests["user_0000"] == 2


class FlakyImages(LocalImageSource):
    """The real local source, except that chosen photos fail (or raise a bug) when read at send time."""

    def __init__(self, base: Path, *, unreadable: str = "", broken: bool = False) -> None:
        super().__init__(base=base, root=None, max_bytes=5 * 1024 * 1024)
        self.unreadable, self.broken = unreadable, broken

    async def read(self, fingerprint: Fingerprint) -> Photo:
        if self.broken:
            raise RuntimeError("boom")
        if self.unreadable and fingerprint.ref.endswith(self.unreadable):
            problem = ImageProblem(
                reason=Reason.IMAGE_UNREADABLE, message=f"{fingerprint.ref}: Permission denied"
            )
            raise ImageError(problem)
        return await super().read(fingerprint)


async def test_an_image_unreadable_at_send_time_is_a_reject_not_a_lost_row(
    tmp_path: Path, make_settings: Callable[..., Settings], sandbox: RunningSandbox
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(3))
    images = FlakyImages(tmp_path, unreadable="user_0001.png")
    summary = await runner.run(make_settings(sandbox), manifest, images=images)
    assert summary.counts == {"enrolled": 2, "rejected": 1} and summary.not_reached == 0
    (reject,) = rejects(summary)
    assert reject["reason"] == "image_unreadable" and "Permission denied" in reject["message"]
    assert "user_0001" not in sandbox.state.requests  # nothing was sent for it


async def test_a_bug_in_a_worker_stops_the_run_instead_of_hanging_it(
    tmp_path: Path, make_settings: Callable[..., Settings], sandbox: RunningSandbox
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(50))
    with pytest.raises(InternalError, match="boom"):
        await asyncio.wait_for(
            runner.run(
                make_settings(sandbox, concurrency=2), manifest, images=FlakyImages(tmp_path, broken=True)
            ),
            30,
        )
    assert sandbox.state.total_requests == 0


def test_a_failure_outranks_a_planned_stop() -> None:
    stops = Stops()
    stops.stop("--max-duration reached", 0)
    stops.stop("the API answered 2205", 4)
    assert (stops.code, stops.reason) == (4, "the API answered 2205")
    stops.stop("--limit", 0)
    assert stops.code == 4


async def test_dry_run_leaves_an_existing_checkpoint_untouched(
    tmp_path: Path, sandbox: RunningSandbox, make_settings: Callable[..., Settings]
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(3))
    await runner.run(make_settings(sandbox), manifest)
    checkpoint = tmp_path / "checkpoint.sqlite"
    with sqlite3.connect(checkpoint) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = checkpoint.read_bytes()
    summary = await runner.run(make_settings(sandbox, dry_run=True), manifest)
    assert summary.counts == {"skipped": 3} and checkpoint.read_bytes() == before


async def test_a_damaged_checkpoint_is_a_clear_error(
    tmp_path: Path, sandbox: RunningSandbox, make_settings: Callable[..., Settings]
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(400))
    await runner.run(make_settings(sandbox, concurrency=16), manifest)
    checkpoint = tmp_path / "checkpoint.sqlite"
    with sqlite3.connect(checkpoint) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = checkpoint.stat().st_size
    with checkpoint.open("r+b") as handle:  # scribble over the users pages, keep the meta page
        handle.seek(size // 2)
        handle.write(bytes(range(256)) * ((size // 2 - 4096) // 256))
    with pytest.raises(LedgerError, match="integrity_check"):
        await runner.run(make_settings(sandbox), manifest)

"""Defects a review found in the rebuilt core, each with the test that caught it."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from backfill.api.answers import Verdict
from backfill.api.client import Client
from backfill.config import Settings
from backfill.images import Fingerprint
from backfill.ledger import AttemptRequest, Binding, Outcome, Settled
from backfill.ledger.memory import MemoryStore
from backfill.ledger.sqlite import SqliteStore
from backfill.vocab import Kind, State

from .conftest import simple_rows, write_manifest
from .test_promise import CountingImages, run_by_hand

SENT: list[float] = []


class Throttled(Client):
    """The first request gets 429 with Retry-After 1.5 s; every later one is enrolled. No network."""

    async def send(self, user_id: str, user_created_at: str, photo_b64: bytes) -> Verdict:
        SENT.append(time.monotonic())
        first = len(SENT) == 1
        await asyncio.sleep(0.3)  # the answer takes a while, so other workers are queued for slots meanwhile
        if first:
            return Verdict(kind=Kind.TRANSIENT, may_have_enrolled=False, proves_not_enrolled=False,
                           http_status=429, error="HTTP 429", retry_after=1.5)  # fmt: skip
        return Verdict(
            kind=Kind.ENROLLED, may_have_enrolled=False, proves_not_enrolled=False, http_status=200
        )


async def test_a_429_pause_holds_the_workers_already_queued_for_a_slot(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    """Workers waiting in the limiter when a 429 arrived used to come out and send during its Retry-After."""
    SENT.clear()
    manifest = write_manifest(tmp_path, simple_rows(8))
    settings = make_settings(None, base_url="http://127.0.0.1:9/v1", rate=4, concurrency=8)
    store = MemoryStore(Binding(partner_id="085", endpoint=settings.endpoint))
    summary, _ = await run_by_hand(settings, manifest, store=store, images=CountingImages(tmp_path),
                                   client_class=Throttled)  # fmt: skip
    assert summary.counts == {"enrolled": 8}
    answered = SENT[0] + 0.3  # when the 429 came back
    inside = [round(t - answered, 2) for t in SENT[1:] if answered < t < answered + 1.45]
    assert not inside, f"{len(inside)} requests left during the pause, at {inside} s after the 429"


class Instant(Client):
    async def send(self, user_id: str, user_created_at: str, photo_b64: bytes) -> Verdict:
        return Verdict(
            kind=Kind.ENROLLED, may_have_enrolled=False, proves_not_enrolled=False, http_status=200
        )


async def test_a_stop_does_not_wait_for_every_queued_worker_to_get_a_rate_slot(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    """At --rate 0.05 six queued workers held a stop for two minutes; systemd would have SIGKILLed the run."""
    manifest = write_manifest(tmp_path, simple_rows(20))
    settings = make_settings(
        None, base_url="http://127.0.0.1:9/v1", rate=0.05, concurrency=6, max_duration=0.5
    )
    store = MemoryStore(Binding(partner_id="085", endpoint=settings.endpoint))
    summary, _ = await asyncio.wait_for(
        run_by_hand(settings, manifest, store=store, images=CountingImages(tmp_path), client_class=Instant),
        30,
    )
    assert "--max-duration" in summary.stop_reason and summary.not_reached > 0


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:99999/v1", "http://[::1/v1", "https:///v1", "https://ops:s3cret@proxy/v1"]
)
def test_a_bad_base_url_is_a_config_error_not_a_traceback(tmp_path: Path, url: str) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("user_id,user_created_at,image_path\n")
    env = {**os.environ, "SMILE_PARTNER_ID": "000", "SMILE_API_KEY": "local-sandbox-key"}
    done = subprocess.run(
        [sys.executable, "-m", "backfill", "run", str(manifest), "--env", "local", "--base-url", url,
         "--checkpoint", str(tmp_path / "l.sqlite"), "--out", str(tmp_path / "o"), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, (done.returncode, done.stderr[-300:])
    assert "s3cret" not in done.stderr and "base_url" in done.stderr


def test_the_log_file_and_error_lines_are_scrubbed_like_every_other_output(tmp_path: Path) -> None:
    key = "k3y-abcdefgh"
    folder = tmp_path / "data-k3y-abcdefgh"  # the key turns up in a path (or a user_id, an image path...)
    folder.mkdir()
    manifest = folder / "m.csv"
    manifest.write_text("user_id,user_created_at,image_path\n")
    env = {**os.environ, "SMILE_PARTNER_ID": "000", "SMILE_API_KEY": key}
    log = tmp_path / "log.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "backfill", "run", str(manifest), "--env", "local", "--base-url",
         "http://127.0.0.1:9/v1", "--checkpoint", str(tmp_path / "l.sqlite"), "--out", str(tmp_path / "o"),
         "--no-progress", "--log-file", str(log), "--log-format", "json"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    summary = next((tmp_path / "o").glob("*/summary.json")).read_text()
    assert key not in summary and key not in log.read_text() and key not in done.stderr + done.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "backfill", "run", str(folder / "nope.csv"), "--env", "local", "--base-url",
         "http://127.0.0.1:9/v1", "--checkpoint", str(tmp_path / "l.sqlite"), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert missing.returncode == 2 and key not in missing.stderr and "***" in missing.stderr


async def test_a_refused_outcome_queued_without_waiting_is_still_told(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLite answered QUEUED for an outcome its transitions then refused, and nobody heard of it."""
    binding = Binding(partner_id="085", endpoint="http://127.0.0.1:1")
    request = AttemptRequest(user_id="u1", photo_sha256="a" * 64, fingerprint=Fingerprint(ref="/x", size=1,
                             version="1"), user_created_at="2021-08-12", run_id="r", at="t")  # fmt: skip
    stale = Outcome(user_id="u1", attempt=1, state=State.ENROLLED, may_have_enrolled=False,
                    proves_not_enrolled=False, http_status=200, result_code="0840", result_text="", smile_job_id="",
                    job_id="", at="t")  # fmt: skip
    store = await SqliteStore.open(tmp_path / "l.sqlite", binding, writable=True)
    try:
        await store.begin_attempt(request)
        await store.begin_attempt(request)
        with caplog.at_level(logging.WARNING, logger="backfill"):
            assert await store.settle(stale) in (Settled.QUEUED, Settled.FENCED)
            await store.flush()
        assert (await store.lookup(["u1"]))["u1"].state is State.SENDING
        assert any(getattr(r, "event", "") == "outcome_fenced" for r in caplog.records)
    finally:
        await store.close()

"""A bounded stop: no request starts after a stop (a signal, --max-duration, a failure), and an attempt recorded
as the stop came is withdrawn, adding no doubt."""

from __future__ import annotations

import signal
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from backfill import compose
from backfill.config import Settings
from backfill.images import Fingerprint, Photo
from backfill.images.local import LocalImageSource
from backfill.ledger import AttemptRequest, Refused, Ticket
from backfill.ledger.sqlite import SqliteStore
from backfill.run.engine import Engine
from backfill.sandbox import Faults, start_sandbox

from .conftest import API_KEY, PARTNER_ID, simple_rows, write_manifest


class StopWhileRecording(SqliteStore):
    """A real SQLite ledger, and a stop that comes while its first attempt is being recorded."""

    stop: Callable[[], None] | None = None

    async def begin_attempt(self, request: AttemptRequest) -> Ticket | Refused:
        ticket = await super().begin_attempt(request)
        if self.stop is not None:
            self.stop()
            self.stop = None
        return ticket


class StopWhileReading(LocalImageSource):
    """The real local photos, and a stop that comes while the first one is read to be sent."""

    stop: Callable[[], None] | None = None

    async def read(self, fingerprint: Fingerprint) -> Photo:
        photo = await super().read(fingerprint)
        if self.stop is not None:
            self.stop()
            self.stop = None
        return photo


@pytest.mark.parametrize("during", ["the photo read", "the attempt recorded"])
async def test_no_request_starts_after_a_stop_and_an_attempt_never_sent_adds_no_doubt(
    tmp_path: Path, make_settings: Callable[..., Settings], during: str
) -> None:
    """The stop comes while the row's photo is read, or while its attempt is recorded: it is not sent. An attempt
    recorded and then withdrawn is settled as it stood, so a 2209 for the ID later is someone else's, rightly."""
    manifest = write_manifest(tmp_path, simple_rows(1))
    foreign = Faults(foreign_ids=frozenset({"user_0000"}))
    async with await start_sandbox(PARTNER_ID, API_KEY, faults=foreign) as server:
        settings = make_settings(server, concurrency=1)
        store = await StopWhileRecording.open(
            tmp_path / "checkpoint.sqlite", compose.binding(settings), writable=True
        )
        images = StopWhileReading(base=tmp_path, root=None, max_bytes=5 * 1024 * 1024)
        engines: list[Engine] = []

        def stop() -> None:
            engines[0].interrupt(signal.SIGTERM)

        if during == "the photo read":
            images.stop = stop
        else:
            store.stop = stop
        try:
            summary = await compose.run(
                settings, manifest, store=store, images=images, engine_ready=engines.append
            )
        finally:
            await store.close()
        assert server.state.total_requests == 0
        assert (summary.exit_code, summary.counts, summary.not_reached) == (143, {}, 1)
        with sqlite3.connect(tmp_path / "checkpoint.sqlite") as conn:
            rows = conn.execute("SELECT state, doubt FROM users").fetchall()
        # Read but not recorded: the ledger never heard of it. Recorded, then withdrawn: pending, not in doubt.
        assert rows == ([] if during == "the photo read" else [("pending", 0)])
        again = await compose.run(settings, manifest)
    assert again.counts == {"id_conflict": 1}  # someone else's: no request of ours ever reached the server

"""The promise at the engine's seams, in process: resume reads no photos, the pin holds, counts are honest."""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from backfill import compose
from backfill.api.client import Client
from backfill.config import Settings, load_settings
from backfill.errors import ConfigError, ManifestError, OutputError
from backfill.images import Fingerprint, ImageProblem, ImageSource, Photo, Pinned
from backfill.images.local import LocalImageSource
from backfill.ledger import Binding, Store
from backfill.ledger.memory import MemoryStore
from backfill.manifest import open_manifest
from backfill.outputs.files import RunOutput
from backfill.run.records import Summary
from backfill.sandbox import Faults, RunningSandbox, start_sandbox
from backfill.vocab import State

from .conftest import API_KEY, PARTNER_ID, Sleeps, png_bytes, simple_rows, write_manifest


def results(summary: Summary) -> dict[str, dict[str, str]]:
    with (Path(summary.out_dir) / "results.csv").open(newline="") as handle:
        return {r["user_id"]: r for r in csv.DictReader(handle)}


def rejects(summary: Summary) -> dict[str, dict[str, str]]:
    with (Path(summary.out_dir) / "rejects.csv").open(newline="") as handle:
        return {r["user_id"]: r for r in csv.DictReader(handle)}


async def run_by_hand(
    settings: Settings,
    manifest: Path,
    *,
    store: Store | None,
    images: ImageSource,
    client_class: type[Client] = Client,
) -> tuple[Summary, RunOutput]:
    """The engine built from collaborators of the test's choosing, as compose.run would build it."""
    output = RunOutput(settings.out)
    client = client_class(
        settings.base_url, settings.partner_id, settings.api_key, timeout=5, connect_timeout=5, concurrency=2
    )
    engine = compose.build_engine(
        settings,
        manifest=open_manifest(manifest, compose.manifest_rules(settings)),
        store=store,
        images=images,
        client=client,
        policy=compose.retry_policy(settings),
        sink=output,
        run_id=output.run_id,
        out_dir=str(output.dir),
    )
    async with client:
        summary = await engine.run()
    output.close(summary)
    return summary, output


class CountingImages(LocalImageSource):
    """The real local source, counting what it is asked; `on_read` may change a file just before a read."""

    def __init__(self, base: Path, on_read: Callable[[Fingerprint, int], None] | None = None) -> None:
        super().__init__(base=base, root=None, max_bytes=5 * 1024 * 1024)
        self.calls: Counter[str] = Counter()
        self.on_read = on_read

    async def fingerprint_many(self, raws: Sequence[str]) -> list[Fingerprint | ImageProblem]:
        self.calls["fingerprint"] += len(raws)
        return await super().fingerprint_many(raws)

    async def check_many(self, raws: Sequence[str]) -> list[Fingerprint | ImageProblem]:
        self.calls["check"] += len(raws)
        return await super().check_many(raws)

    async def unchanged_many(self, raws: Sequence[str], pinned: Sequence[Pinned]) -> list[bool]:
        self.calls["unchanged"] += len(raws)
        return await super().unchanged_many(raws, pinned)

    async def read(self, fingerprint: Fingerprint) -> Photo:
        self.calls["read"] += 1
        if self.on_read is not None:
            self.on_read(fingerprint, self.calls["read"])
        return await super().read(fingerprint)


async def test_resuming_a_finished_job_reads_no_photo(
    tmp_path: Path, sandbox: RunningSandbox, make_settings: Callable[..., Settings]
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(25))
    await compose.run(make_settings(sandbox), manifest)
    images = CountingImages(tmp_path)
    again = await compose.run(make_settings(sandbox), manifest, images=images)
    assert again.counts == {"skipped": 25}
    # One stat each (the quick check against the pinned facts), no content check, no read.
    assert images.calls == Counter({"unchanged": 25})


async def test_an_enrolled_user_whose_photo_is_gone_is_skipped_not_rejected(
    tmp_path: Path, sandbox: RunningSandbox, make_settings: Callable[..., Settings]
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(3))
    await compose.run(make_settings(sandbox), manifest)
    (tmp_path / "images" / "user_0001.png").unlink()
    again = await compose.run(make_settings(sandbox), manifest)
    assert again.exit_code == 0 and again.counts == {"skipped": 3}  # a nightly cron must not exit 1 for ever
    assert "no longer usable" in results(again)["user_0001"]["error"]


async def test_a_touched_but_identical_photo_is_still_skipped_and_another_photo_is_refused(
    tmp_path: Path, sandbox: RunningSandbox, make_settings: Callable[..., Settings]
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(2))
    await compose.run(make_settings(sandbox), manifest)
    same = tmp_path / "images" / "user_0000.png"
    os.utime(same, ns=(1, 1))  # mtime changed, bytes not: the quick check fails, the hash decides
    (tmp_path / "images" / "user_0001.png").write_bytes(png_bytes(99))  # another person's photo
    before = sandbox.state.total_requests
    again = await compose.run(make_settings(sandbox), manifest)
    assert results(again)["user_0000"]["status"] == "skipped"
    assert rejects(again)["user_0001"]["reason"] == "user_id_reused"
    assert sandbox.state.total_requests == before


async def test_a_photo_changed_between_two_attempts_is_never_sent(
    tmp_path: Path, make_settings: Callable[..., Settings], sleeps: Sleeps
) -> None:
    """Attempt 1 gets a 503; before attempt 2 the file's bytes change: attempt 2 must not go out with them."""
    manifest = write_manifest(tmp_path, simple_rows(2))
    target = tmp_path / "images" / "user_0000.png"
    original = hashlib.sha256(target.read_bytes()).hexdigest()

    def swap(fp: Fingerprint, n: int) -> None:
        first_went = "user_0000" in server.state.requests
        if fp.ref == str(target.resolve()) and target.read_bytes() == png_bytes(0) and first_went:
            target.write_bytes(png_bytes(42))

    async with await start_sandbox(PARTNER_ID, API_KEY, faults=Faults(script={"user_0000": [503]})) as server:
        images = CountingImages(tmp_path, on_read=swap)
        summary = await compose.run(make_settings(server), manifest, sleep=sleeps, images=images)
        assert server.state.requests["user_0000"] == 1  # the second attempt never left
        assert "user_0000" not in server.state.enrolled
        assert rejects(summary)["user_0000"]["reason"] == "user_id_reused"
        assert summary.counts == {"enrolled": 1, "rejected": 1}
        # Restoring the original photo lets the ID go again, with the pinned bytes.
        target.write_bytes(png_bytes(0))
        again = await compose.run(make_settings(server), manifest, sleep=sleeps)
        assert results(again)["user_0000"]["status"] == "enrolled"
        assert server.state.enrolled["user_0000"].photo_sha256 == original


async def test_the_engine_takes_an_injected_ledger(
    tmp_path: Path, sandbox: RunningSandbox, make_settings: Callable[..., Settings]
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(4))
    settings = make_settings(sandbox)
    store = MemoryStore(Binding(partner_id=PARTNER_ID, endpoint=settings.endpoint))
    summary = await compose.run(settings, manifest, store=store)
    assert summary.counts == {"enrolled": 4} and not settings.ledger_path().exists()
    assert {r.state for r in store.users.values()} == {State.ENROLLED} and not store.closed
    assert [r.exit_code for r in store.runs.values()] == [0]


async def test_new_rows_counts_rows_first_sent_in_this_run(
    tmp_path: Path, make_settings: Callable[..., Settings], sleeps: Sleeps
) -> None:
    async with await start_sandbox(
        PARTNER_ID, API_KEY, faults=Faults(script={"user_0000": [503, 503]})
    ) as server:
        manifest = write_manifest(tmp_path, simple_rows(10))
        canary = await compose.run(
            make_settings(server, limit=3, concurrency=1, max_attempts=2), manifest, sleep=sleeps
        )
        assert canary.new_rows == 3 and canary.sent == 3 and canary.not_reached == 7
        rest = await compose.run(make_settings(server), manifest, sleep=sleeps)
        # user_0000 was first sent by the canary (retry_exhausted): resent now, but not new.
        assert rest.new_rows == 7 and rest.sent == 8 and rest.counts == {"enrolled": 8, "skipped": 2}


async def test_a_manifest_that_grows_during_the_run_stops_it_before_unscanned_rows_go(
    tmp_path: Path, sandbox: RunningSandbox, make_settings: Callable[..., Settings]
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(6))

    class Appending(CountingImages):
        async def check_many(self, raws: Sequence[str]) -> list[Fingerprint | ImageProblem]:
            if not self.calls["check"]:  # while the first chunk is decided, someone appends a row
                with manifest.open("a") as handle:
                    handle.write("late_user,2021-08-12,images/user_0000.png\n")
            return await super().check_many(raws)

    settings = make_settings(sandbox, chunk_rows=2)
    with pytest.raises(ManifestError, match="changed while being read"):
        await compose.run(settings, manifest, images=Appending(tmp_path))
    assert "late_user" not in sandbox.state.requests and len(sandbox.state.requests) <= 2


def test_rows_appended_after_the_scan_are_never_read(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, simple_rows(3))
    opened = open_manifest(
        manifest, compose.manifest_rules(load_settings(None, {}, {}, need_credentials=False))
    )
    with manifest.open("a") as handle:
        handle.write("late_user,2021-08-12,images/user_0000.png\n")
    with pytest.raises(ManifestError, match="changed while being read"):
        list(opened.batches())


def test_a_replaced_manifest_is_read_as_the_one_opened(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, simple_rows(3))
    opened = open_manifest(
        manifest, compose.manifest_rules(load_settings(None, {}, {}, need_credentials=False))
    )
    other = tmp_path / "other.csv"
    other.write_text("user_id,user_created_at,image_path\nintruder,2021-08-12,images/user_0000.png\n")
    other.replace(manifest)  # rename over it, as editors and exports do
    ids = [c.user_id for b in opened.batches() for c in b.candidates]
    assert ids == ["user_0000", "user_0001", "user_0002"]


def test_a_full_disk_at_close_leaves_no_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    output = RunOutput(tmp_path / "out")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    summary = Summary(
        run_id=output.run_id,
        out_dir=str(output.dir),
        manifest="m",
        ledger="l",
        env="local",
        base_url="u",
        started_at="s",
        finished_at="f",
        duration_s=0,
        total_rows=0,
        counts={},
        rejected=0,
        sent=0,
        attempts=0,
        new_rows=0,
        retries=0,
        not_reached=0,
        rows_per_s=0,
        exit_code=0,
    )
    with pytest.raises(OutputError, match="No space left"):
        output.close(summary)
    # Whatever exists under a final name is whole; nothing half-written is left under any name.
    assert not (output.dir / "summary.json").exists()
    assert [p.name for p in output.dir.iterdir() if p.name.endswith(".part")] == []


def test_an_odd_api_key_is_a_config_error_that_never_shows_it() -> None:
    for bad in ("good-part\nsecond-line", "tab\there", "caf\u00e9-key-value", "bell\x07key"):
        with pytest.raises(ConfigError) as caught:
            load_settings(None, {"SMILE_PARTNER_ID": "085", "SMILE_API_KEY": bad}, {})
        message = str(caught.value)
        assert "SMILE_API_KEY" in message and bad.strip() not in message
        assert all(part not in message for part in bad.split() if len(part) > 3)


async def test_the_key_is_scrubbed_from_outputs_even_when_a_server_echoes_it(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    from aiohttp import web

    key = "an-echoed-secret-key-0123"

    async def handler(request: web.Request) -> web.Response:
        return web.json_response(
            {"code": "2213", "error": f"missing parameter; your key is {key}"}, status=400
        )

    app = web.Application(client_max_size=10 * 1024 * 1024)
    app.router.add_post("/v1/backfill_users", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        manifest = write_manifest(tmp_path, simple_rows(2))
        settings = make_settings(base_url=f"http://127.0.0.1:{port}/v1", key=key, fail_threshold=1.0)
        summary = await compose.run(settings, manifest)
    finally:
        await runner.cleanup()
    assert summary.counts == {"failed": 2}
    for path in Path(summary.out_dir).iterdir():
        assert key not in path.read_text(), path
    assert "***" in (Path(summary.out_dir) / "results.csv").read_text()


async def test_an_engine_built_by_hand_runs_with_a_fake_image_source(
    tmp_path: Path, sandbox: RunningSandbox, make_settings: Callable[..., Settings]
) -> None:
    """The collaborators are injected: here an image source that serves photos from memory."""

    class MemoryImages(LocalImageSource):
        async def fingerprint_many(self, raws: Sequence[str]) -> list[Fingerprint | ImageProblem]:
            return [Fingerprint(ref=r, size=100, version="1") for r in raws]

        async def check_many(self, raws: Sequence[str]) -> list[Fingerprint | ImageProblem]:
            return await self.fingerprint_many(raws)

        async def read(self, fingerprint: Fingerprint) -> Photo:
            data = png_bytes(sum(fingerprint.ref.encode()))  # each user's own photo: none is shared
            return Photo(data=data, sha256=hashlib.sha256(data).hexdigest(), fingerprint=fingerprint)

    manifest = write_manifest(tmp_path, simple_rows(3), images=False)
    settings = make_settings(sandbox)
    store = MemoryStore(Binding(partner_id=PARTNER_ID, endpoint=settings.endpoint))
    images = MemoryImages(base=tmp_path, root=None, max_bytes=1 << 20)
    summary, output = await run_by_hand(settings, manifest, store=store, images=images)
    assert summary.counts == {"enrolled": 3}
    assert json.loads((output.dir / "summary.json").read_text())["counts"] == {"enrolled": 3}
    assert {r.state for r in store.users.values()} == {State.ENROLLED}


async def test_a_dry_run_builds_the_exact_signed_request_and_sends_nothing(
    tmp_path: Path, sandbox: RunningSandbox, make_settings: Callable[..., Settings]
) -> None:
    import base64

    from backfill.api.signing import verify

    built: list[bytes] = []

    class Recording(Client):
        def photo_body(self, user_id: str, user_created_at: str, photo: bytes) -> bytes:
            body = super().photo_body(user_id, user_created_at, photo)
            built.append(body)
            return body

    manifest = write_manifest(tmp_path, simple_rows(2))
    settings = make_settings(sandbox, dry_run=True)
    images = LocalImageSource(base=tmp_path, root=None, max_bytes=1 << 20)
    summary, _ = await run_by_hand(settings, manifest, store=None, images=images, client_class=Recording)
    assert summary.counts == {"dry_run": 2} and sandbox.state.total_requests == 0
    for body in built:
        request = json.loads(body)
        photo = (tmp_path / "images" / f"{request['user_id']}.png").read_bytes()
        assert base64.b64decode(request["photo"], validate=True) == photo
        assert verify(request["signature"], request["timestamp"], PARTNER_ID, API_KEY)


async def test_a_dry_run_refuses_a_ledger_bound_elsewhere(
    tmp_path: Path, sandbox: RunningSandbox, make_settings: Callable[..., Settings]
) -> None:
    from backfill.errors import LedgerError

    manifest = write_manifest(tmp_path, simple_rows(2))
    await compose.run(make_settings(sandbox), manifest)
    async with await start_sandbox(PARTNER_ID, API_KEY) as other:
        # "What would be sent" read from another endpoint's ledger would be a lie: it is an error instead.
        with pytest.raises(LedgerError, match="belongs to partner"):
            await compose.run(make_settings(other, dry_run=True), manifest)
        assert other.state.total_requests == 0

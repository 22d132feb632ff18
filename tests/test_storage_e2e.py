"""End to end against real object-store servers: the CLI, the sandbox, resume, crashes, faults.

What every store must do alike (exact bytes at the sandbox, each reject's reason, a resume that sends nothing
and reads no photo, denied access and transient failures) runs on S3 (moto), GCS (fake-gcs-server) and Azure
Blob (Azurite), through `store` and `done_job`; the rest (a run killed mid-flight, objects swapped or a bucket
deleted under a run) tests the run's own logic, whatever the store, and runs on S3.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from backfill import compose
from backfill.config import Settings
from backfill.images import Fingerprint, ImageSource, Photo
from backfill.run.crash import CRASH_ENV
from backfill.sandbox import Faults, RunningSandbox
from backfill.vocab import Reason

from . import storage_servers
from .conftest import API_KEY, PARTNER_ID, ThreadedSandboxes, png_bytes
from .s3_server import ROOT, SECRET_KEY
from .storage_servers import SCHEMES, StorageServer
from .test_images import jpeg


@pytest.fixture
def s3() -> StorageServer:
    return storage_servers.server("s3")


@pytest.fixture(params=SCHEMES)
def store(request: pytest.FixtureRequest) -> StorageServer:
    """Each object store's server in turn."""
    return storage_servers.server(request.param)


@pytest.fixture
def aws_env(s3: StorageServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The S3 server's endpoint and credentials, for in-process runs (stores read os.environ)."""
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HOME", "/nonexistent")  # no shared config files of the machine's user
    return s3.env


class Bucket:
    """A bucket on a server, filled from test data; `objects` holds what each key was last set to."""

    def __init__(self, server: StorageServer, name: str) -> None:
        self.server, self.name = server, name
        server.create_bucket(name)
        self.objects: dict[str, bytes] = {}

    def url(self, key: str) -> str:
        return f"{self.server.scheme}://{self.name}/{key}"

    def put(self, key: str, data: bytes) -> str:
        self.server.put(self.name, key, data)
        self.objects[key] = data
        return self.url(key)

    def put_many(self, items: dict[str, bytes]) -> None:
        """Many objects at once, a few at a time (each server answers one request at a time per connection)."""
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda item: self.server.put(self.name, *item), items.items()))
        self.objects.update(items)

    def manifest(self, key: str, rows: list[tuple[str, str, str]]) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["user_id", "user_created_at", "image_path"])
        writer.writerows(rows)
        return self.put(key, out.getvalue().encode())

    def sha(self, key: str) -> str:
        return hashlib.sha256(self.objects[key]).hexdigest()

    def destroy(self) -> None:
        for key in list(self.objects):
            self.server.delete(self.name, key)
        self.server.delete_bucket(self.name)


def cli(
    tmp: Path, server: StorageServer, *args: str, extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        **server.env,
        "HOME": str(tmp),
        "SMILE_PARTNER_ID": PARTNER_ID,
        "SMILE_API_KEY": API_KEY,
        "BACKFILL_BACKOFF_INITIAL": "0.01",
        "BACKFILL_BACKOFF_MAX": "0.05",
        **(extra or {}),
        "PYTHONPATH": str(ROOT),
    }
    return subprocess.run(
        [sys.executable, "-m", "backfill", *args],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def run_args(tmp: Path, sandbox: RunningSandbox, manifest: str) -> list[str]:
    return [
        "run",
        manifest,
        "--env",
        "local",
        "--base-url",
        sandbox.base_url,
        "--checkpoint",
        str(tmp / "ledger.sqlite"),
        "--out",
        str(tmp / "out"),
        "--no-progress",
        "--rate",
        "2000",
        "--concurrency",
        "16",
    ]


def run_dir(done: subprocess.CompletedProcess[str]) -> Path:
    line = next(x for x in done.stdout.splitlines() if x.startswith("results: "))
    return Path(line.removeprefix("results: "))


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


# --- a run from a bucket ---


def test_a_run_from_a_bucket_sends_the_exact_bytes_and_rejects_each_bad_object_by_reason(
    tmp_path: Path, store: StorageServer, threaded_sandbox: RunningSandbox
) -> None:
    bucket = Bucket(store, "e2e-mixed")
    big = jpeg([os.urandom(40_000)])
    bucket.put_many(
        {
            "batches/b7/images/u0.png": png_bytes(0),
            "batches/b7/images/u1.jpg": big,
            "batches/b7/images/a b/ü é 1.png": png_bytes(1),
            "elsewhere/u3.png": png_bytes(3),
            "batches/b7/images/empty.png": b"",
            "batches/b7/images/cut.jpg": big[:-50],
            "batches/b7/images/page.png": b"<html>AccessDenied</html>",
            "batches/b7/images/huge.png": png_bytes(4) + bytes(5 * 1024 * 1024),
        }
    )
    local = tmp_path / "local.png"
    local.write_bytes(png_bytes(9))
    url = bucket.manifest(
        "batches/b7/manifest.csv",
        [
            ("u0", "2021-08-12", "images/u0.png"),
            ("u1", "2021-08-12", "images/u1.jpg"),
            ("u2", "2021-08-12", "images/a b/ü é 1.png"),
            ("u3", "2021-08-12", bucket.url("elsewhere/u3.png")),
            ("u4", "2021-08-12", str(local)),
            ("empty", "2021-08-12", "images/empty.png"),
            ("cut", "2021-08-12", "images/cut.jpg"),
            ("page", "2021-08-12", "images/page.png"),
            ("huge", "2021-08-12", "images/huge.png"),
            ("missing", "2021-08-12", "images/nope.png"),
            ("nobucket", "2021-08-12", f"{store.scheme}://e2e-no-such/x.png"),
        ],
    )
    done = cli(tmp_path, store, *run_args(tmp_path, threaded_sandbox, url))
    assert done.returncode == 1, done.stdout + done.stderr
    out = run_dir(done)
    rejects = {r["user_id"]: r for r in read_csv(out / "rejects.csv")}
    assert {uid: r["reason"] for uid, r in rejects.items()} == {
        "empty": "image_empty",
        "cut": "image_truncated",
        "page": "image_not_jpeg_or_png",
        "huge": "image_too_large",
        "missing": "image_missing",
        "nobucket": "image_missing",
    }
    assert bucket.url("batches/b7/images/nope.png") in rejects["missing"]["message"]
    results = {r["user_id"]: r["status"] for r in read_csv(out / "results.csv")}
    assert results == dict.fromkeys(["u0", "u1", "u2", "u3", "u4"], "enrolled")
    # The exact bytes at the sandbox: what the bucket (or the disk) holds.
    enrolled = threaded_sandbox.state.enrolled
    assert enrolled["u0"].photo_sha256 == bucket.sha("batches/b7/images/u0.png")
    assert enrolled["u1"].photo_sha256 == bucket.sha("batches/b7/images/u1.jpg")
    assert enrolled["u2"].photo_sha256 == bucket.sha("batches/b7/images/a b/ü é 1.png")
    assert enrolled["u3"].photo_sha256 == bucket.sha("elsewhere/u3.png")
    assert enrolled["u4"].photo_sha256 == hashlib.sha256(png_bytes(9)).hexdigest()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["manifest"] == url and (out / "report.html").exists()
    # No storage secret anywhere the tool wrote: outputs, ledger, the terminal.
    for path in [*out.iterdir(), tmp_path / "ledger.sqlite"]:
        assert SECRET_KEY.encode() not in path.read_bytes(), path
    assert SECRET_KEY not in done.stdout + done.stderr
    # The 5 MB object was never downloaded: its check read its first 64 KB.
    huge = [r for r in store.requests() if r["method"] == "GET" and r["path"].endswith("huge.png")]
    assert huge and all(r["range"] == "bytes=0-65535" for r in huge)


# --- resume: a done job is settled from listings, not from GETs or HEADs ---

ROWS = 300
# Objects not in the manifest after each row's, so that the rows' listing takes two pages of 1,000.
FILLERS = 3


DoneJob = tuple[StorageServer, Path, str, RunningSandbox]


@pytest.fixture(scope="module", params=SCHEMES)
def done_job(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DoneJob]:
    """A job run to its end from a bucket of each store, its ledger on disk."""
    server = storage_servers.server(request.param)
    tmp = tmp_path_factory.mktemp("done")
    bucket = Bucket(server, "e2e-done")
    photos = {f"photos/u{i:05d}.png": png_bytes(i, 4) for i in range(ROWS)}
    fillers = {f"{key}~{j}": b"not in the manifest" for key in photos for j in range(FILLERS)}
    bucket.put_many({**photos, **fillers})
    url = bucket.manifest(
        "manifest.csv", [(f"u{i:05d}", "2021-08-12", f"photos/u{i:05d}.png") for i in range(ROWS)]
    )
    sandboxes = ThreadedSandboxes()
    sandbox = sandboxes.start()
    first = cli(tmp, server, *run_args(tmp, sandbox, url))
    assert first.returncode == 0, first.stdout + first.stderr
    assert len(sandbox.state.enrolled) == ROWS
    yield server, tmp, url, sandbox
    sandboxes.close()


def test_a_resume_of_a_done_job_gets_no_photo_and_heads_none(done_job: DoneJob) -> None:
    server, tmp, url, sandbox = done_job
    server.reset()
    again = cli(tmp, server, *run_args(tmp, sandbox, url))
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{ROWS} rows: {ROWS} skipped" in again.stdout
    log = server.requests()
    assert server.photo_gets(log, "e2e-done") == ["manifest.csv"]  # the manifest only
    heads = [r for r in log if r["method"] == "HEAD"]
    if server.scheme == "gs":
        # fake-gcs-server ignores a listing's start-after, so its second page can't be asked for: the tool
        # sees that (rather than asking forever) and takes one HEAD a row instead, still no GET.
        assert len(heads) == ROWS and len(server.lists(log, "e2e-done")) == 2
    else:
        assert not heads
        assert len(server.lists(log, "e2e-done")) == 2  # pages of 1,000 entries, not a request per row
    assert sandbox.state.total_requests == ROWS  # nothing sent again


def test_a_refused_listing_falls_back_to_one_head_a_row_and_still_gets_no_photo(done_job: DoneJob) -> None:
    server, tmp, url, sandbox = done_job
    server.reset()
    server.faults(deny_list=["e2e-done"])
    try:
        again = cli(tmp, server, *run_args(tmp, sandbox, url))
    finally:
        server.faults()
    assert again.returncode == 0, again.stdout + again.stderr
    log = server.requests()
    assert len([r for r in log if r["method"] == "HEAD"]) == ROWS
    assert server.photo_gets(log, "e2e-done") == ["manifest.csv"]
    assert sandbox.state.total_requests == ROWS


def test_status_and_export_work_with_remote_paths(done_job: DoneJob) -> None:
    server, tmp, *_ = done_job
    ledger = ["--checkpoint", str(tmp / "ledger.sqlite")]
    status = cli(tmp, server, "status", *ledger, "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["counts"] == {"enrolled": ROWS}
    export = cli(tmp, server, "export", *ledger, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(export.stdout)))
    assert len(rows) == ROWS and rows[0]["image_path"].startswith(f"{server.scheme}://e2e-done/photos/")


# --- faults: access denied, transient errors ---


def test_access_denied_is_a_reject_naming_the_bucket_and_transient_errors_are_retried(
    tmp_path: Path, store: StorageServer
) -> None:
    bucket = Bucket(store, "e2e-faults")
    bucket.put_many({f"p/u{i}.png": png_bytes(i) for i in range(6)})
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "user_id,user_created_at,image_path\n"
        + "".join(f"u{i},2021-08-12,{bucket.url(f'p/u{i}.png')}\n" for i in range(6))
    )
    store.faults(fail=4, status=503, method="GET")  # the first GETs fail: each is tried again, never rejected
    try:
        ok = cli(tmp_path, store, "validate", str(manifest), "--out", str(tmp_path / "v1"))
    finally:
        store.faults()
    assert ok.returncode == 0 and "6 valid, 0 rejected" in ok.stdout, ok.stdout + ok.stderr
    dry = cli(
        tmp_path,
        store,
        "run",
        str(manifest),
        "--dry-run",
        "--env",
        "local",
        "--out",
        str(tmp_path / "dry"),
        "--checkpoint",
        str(tmp_path / "none.sqlite"),
        "--no-progress",
    )
    assert "6 rows: 6 dry_run" in dry.stdout, dry.stdout + dry.stderr
    store.faults(deny=["e2e-faults"])
    try:
        denied = cli(
            tmp_path,
            store,
            "validate",
            str(manifest),
            "--out",
            str(tmp_path / "v2"),
            "--read-concurrency",
            "2",
        )
    finally:
        store.faults()
    assert denied.returncode == 1
    (rejects,) = (tmp_path / "v2").glob("*/rejects.csv")
    rows = read_csv(rejects)
    assert len(rows) == 6 and {r["reason"] for r in rows} == {Reason.IMAGE_UNREADABLE.value}
    assert "access denied" in rows[0]["message"] and "'e2e-faults'" in rows[0]["message"]
    check = {"s3": "s3:GetObject", "gs": "storage.objects.get", "az": "read access"}[store.scheme]
    assert check in rows[0]["message"] and SECRET_KEY not in rows[0]["message"]


# --- a crash mid-run ---


def test_a_run_killed_mid_flight_then_resumed_loses_nothing_and_enrolls_each_once(
    tmp_path: Path, s3: StorageServer, threaded_sandboxes: ThreadedSandboxes
) -> None:
    sandbox = threaded_sandboxes.start(faults=Faults(latency_ms=60))
    bucket = Bucket(s3, "e2e-crash")
    rows = 40
    bucket.put_many({f"p/u{i:03d}.png": png_bytes(i) for i in range(rows)})
    url = bucket.manifest(
        "m/manifest.csv",
        [(f"u{i:03d}", "2021-08-12", f"../p/u{i:03d}.png") for i in range(rows)]
        + [("gone", "2021-08-12", "../p/gone.png")],
    )
    args = run_args(tmp_path, sandbox, url)
    killed = cli(tmp_path, s3, *args, extra={CRASH_ENV: "in_flight:12"})
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert 0 < len(sandbox.state.enrolled) < rows
    # `retry` re-sends what the ledger holds in doubt, reading each photo from its recorded s3:// URL...
    retried = cli(tmp_path, s3, "retry", *args[2:])
    assert retried.returncode == 0, retried.stdout + retried.stderr
    owned = {
        r["user_id"] for r in read_csv(run_dir(retried) / "results.csv") if r["status"] == "already_enrolled"
    }
    assert owned  # the request in flight at the kill had enrolled its user: the 2209 is read as ours
    # ...and the same run command finishes the rest.
    resumed = cli(tmp_path, s3, *args)
    assert resumed.returncode == 1, resumed.stdout + resumed.stderr  # 1: the missing photo's row
    out = run_dir(resumed)
    results = {r["user_id"]: r["status"] for r in read_csv(out / "results.csv")}
    rejects = {r["user_id"]: r["reason"] for r in read_csv(out / "rejects.csv")}
    assert set(results) | set(rejects) == {f"u{i:03d}" for i in range(rows)} | {"gone"}  # nothing lost
    assert rejects == {"gone": "image_missing"}
    assert set(results.values()) <= {"enrolled", "skipped", "already_enrolled"}
    enrolled = sandbox.state.enrolled
    assert len(enrolled) == rows
    for uid, user in enrolled.items():
        assert user.photo_sha256 == bucket.sha(f"p/{uid}.png")
    # A second request only for a row whose answer the kill lost, and it then read the 2209 as its own.
    assert {uid for uid, n in Counter(sandbox.state.requests).items() if n > 1} <= owned


# --- hostile: an object swapped before its send, a bucket deleted mid-run ---


class Meddling(ImageSource):
    """The real source, with something done to the bucket just before chosen reads."""

    def __init__(self, inner: ImageSource, before_read: Any) -> None:
        self.inner, self.before_read, self.reads = inner, before_read, 0

    async def fingerprint_many(self, raws: Any) -> Any:
        return await self.inner.fingerprint_many(raws)

    async def check_many(self, raws: Any) -> Any:
        return await self.inner.check_many(raws)

    async def read(self, fingerprint: Fingerprint) -> Photo:
        self.reads += 1
        self.before_read(self.reads, fingerprint)
        return await self.inner.read(fingerprint)

    async def close(self) -> None:
        await self.inner.close()


def settings_for(make_settings: Any, sandbox: RunningSandbox, tmp: Path) -> Settings:
    settings: Settings = make_settings(sandbox, concurrency=1, ledger=tmp / "ledger.sqlite", out=tmp / "out")
    return settings


async def test_an_object_swapped_after_its_check_is_checked_again_and_what_is_sent_is_pinned(
    tmp_path: Path, s3: StorageServer, aws_env: dict[str, str], sandbox: RunningSandbox, make_settings: Any
) -> None:
    bucket = Bucket(s3, "e2e-swap")
    bucket.put_many({"a.png": png_bytes(1), "b.png": png_bytes(2), "c.png": png_bytes(3)})
    url = bucket.manifest(
        "m.csv", [("a", "2021-08-12", "a.png"), ("b", "2021-08-12", "b.png"), ("c", "2021-08-12", "c.png")]
    )

    def swap(_: int, fingerprint: Fingerprint) -> None:
        if fingerprint.ref.endswith("/a.png"):
            bucket.put("a.png", png_bytes(7, 20)[:-30])  # cut short after its check
        elif fingerprint.ref.endswith("/b.png"):
            bucket.put("b.png", png_bytes(8))  # another complete photo

    settings = settings_for(make_settings, sandbox, tmp_path)
    images = Meddling(compose.image_source(settings, url, policy=compose.retry_policy(settings)), swap)
    summary = await compose.run(settings, url, images=images)
    assert summary.counts == {"enrolled": 2, "rejected": 1}
    (reject,) = read_csv(Path(summary.out_dir) / "rejects.csv")
    assert reject["user_id"] == "a" and reject["reason"] == "image_truncated"
    assert "at send time" in reject["message"] and "changed after it was checked" in reject["message"]
    assert "a" not in sandbox.state.enrolled
    # What went out for b is the bytes read at send time, and the ledger pinned exactly those.
    assert sandbox.state.enrolled["b"].photo_sha256 == hashlib.sha256(png_bytes(8)).hexdigest()
    store = await compose.open_store(settings, writable=False)
    try:
        known = await store.lookup(["b"])
    finally:
        await store.close()
    assert known["b"].photo_sha256 == store.photo_key.pin(hashlib.sha256(png_bytes(8)).hexdigest())


async def test_a_bucket_deleted_mid_run_rejects_the_rest_and_loses_no_row(
    tmp_path: Path, s3: StorageServer, aws_env: dict[str, str], sandbox: RunningSandbox, make_settings: Any
) -> None:
    bucket = Bucket(s3, "e2e-vanish")
    rows = 8
    bucket.put_many({f"u{i}.png": png_bytes(i) for i in range(rows)})
    manifest = tmp_path / "m.csv"  # a local manifest of remote photos: the bucket can go, the list stays
    manifest.write_text(
        "user_id,user_created_at,image_path\n"
        + "".join(f"u{i},2021-08-12,s3://e2e-vanish/u{i}.png\n" for i in range(rows))
    )

    def vanish(reads: int, _: Fingerprint) -> None:
        if reads == 4:
            bucket.destroy()

    settings = settings_for(make_settings, sandbox, tmp_path)
    images = Meddling(compose.image_source(settings, manifest, policy=compose.retry_policy(settings)), vanish)
    summary = await compose.run(settings, manifest, images=images)
    assert summary.counts == {"enrolled": 3, "rejected": rows - 3}
    rejects = read_csv(Path(summary.out_dir) / "rejects.csv")
    assert {r["reason"] for r in rejects} == {"image_missing"}
    assert all("no longer exists" in r["message"] for r in rejects)
    assert len(sandbox.state.enrolled) == 3

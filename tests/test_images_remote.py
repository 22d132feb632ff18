"""The remote ImageSource on obstore's in-memory store: every local rule, listing fingerprints, reads, routing."""

from __future__ import annotations

import csv
import hashlib
import io
import os
from pathlib import Path
from typing import Any

import obstore
import pytest
from obstore.exceptions import GenericError, PermissionDeniedError
from obstore.store import MemoryStore

from backfill import redact
from backfill.errors import ConfigError, ManifestError
from backfill.images import Fingerprint, ImageError, ImageProblem, ImageSource, Photo
from backfill.images.dispatch import DispatchingImageSource
from backfill.images.local import LocalImageSource
from backfill.images.remote import (
    RemoteImageSource,
    StoreOptions,
    aws_config,
    describe,
    make_store,
    transient,
    version_of,
)
from backfill.images.urls import ObjectUrl, is_url, join, parse, prefix_of
from backfill.manifest import ManifestRules
from backfill.remote_manifest import open_remote_manifest
from backfill.run.policy import RetryPolicy
from backfill.vocab import Reason

from .conftest import default_retry_policy, png_bytes
from .test_images import jpeg

LIMIT = 100_000


class Buckets:
    """One MemoryStore per bucket, and a count of the stores made (one per bucket is the rule)."""

    def __init__(self) -> None:
        self.stores: dict[str, MemoryStore] = {}
        self.made = 0

    def __call__(self, obj: ObjectUrl) -> MemoryStore:
        self.made += 1
        return self.stores.setdefault(obj.bucket, MemoryStore())

    def put(self, url: str, data: bytes) -> None:
        obj = parse(url)
        obstore.put(self.stores.setdefault(obj.bucket, MemoryStore()), obj.key, data)

    def delete(self, url: str) -> None:
        obj = parse(url)
        obstore.delete(self.stores[obj.bucket], obj.key)


@pytest.fixture
def buckets() -> Buckets:
    return Buckets()


@pytest.fixture
def source(buckets: Buckets) -> RemoteImageSource:
    async def no_sleep(_: float) -> None:
        return None

    return RemoteImageSource(
        max_bytes=LIMIT, read_concurrency=4, stores=buckets, retries=default_retry_policy(), sleep=no_sleep
    )


def reasons(results: list[Fingerprint | ImageProblem]) -> list[str]:
    return ["ok" if isinstance(r, Fingerprint) else r.reason.value for r in results]


# --- URLs ---


def test_urls_are_told_from_paths_and_resolve_like_paths() -> None:
    assert is_url("s3://b/k") and is_url("HTTPS://h/p") and not is_url("images/a.jpg")
    assert not is_url("file:///data/a.jpg") and not is_url("C:/x")
    base = prefix_of("s3://b/batches/b7/manifest.csv")
    assert base == "s3://b/batches/b7/"
    assert join(base, "images/a.jpg") == "s3://b/batches/b7/images/a.jpg"
    assert join(base, "./images/../a.jpg") == "s3://b/batches/b7/a.jpg"
    assert join(base, "a b/ü.jpg") == "s3://b/batches/b7/a b/ü.jpg"
    # Climbing out of the bucket, or an empty segment, is kept as written so that it is refused, not rewritten.
    assert join(base, "../../../x.jpg") == "s3://b/batches/b7/../../../x.jpg"
    assert join(base, "a//b.jpg") == "s3://b/batches/b7/a//b.jpg"
    assert parse("s3a://b/k.jpg").url == "s3://b/k.jpg"
    assert parse("https://h:8/p/a%20b.jpg").key == "p/a b.jpg"


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("ftp://h/a.jpg", "isn't supported"),
        ("s3://b/", "not an object"),
        ("s3:///a.jpg", "names no bucket"),
        ("s3://b/a//b.jpg", "empty, '.' or '..' segment"),
        ("https://h/a.jpg?X-Amz-Signature=abcdef123456", "presigned"),
    ],
)
async def test_bad_urls_are_rejected_with_the_fix(source: RemoteImageSource, url: str, words: str) -> None:
    (found,) = await source.check_many([url])
    assert isinstance(found, ImageProblem) and found.reason is Reason.IMAGE_MISSING
    assert words in found.message
    assert "abcdef123456" not in found.message  # a query (a signature, perhaps) is never repeated


# --- every local rule, with the same reasons ---


async def test_every_rule_holds_for_objects_with_the_same_reasons(
    source: RemoteImageSource, buckets: Buckets
) -> None:
    big_jpeg = jpeg([os.urandom(30_000)])
    objects = {
        "s3://b/p/small.png": png_bytes(1),
        "s3://b/p/big.jpg": big_jpeg,
        "s3://b/p/a b/ü é.png": png_bytes(2),
        "s3://b/p/empty.png": b"",
        "s3://b/p/huge.png": png_bytes(3, 300)[:-12] + os.urandom(LIMIT) + png_bytes(3)[-12:],
        "s3://b/p/cut.jpg": big_jpeg[:-100],
        "s3://b/p/cut.png": png_bytes(4, 100)[:-20],
        "s3://b/p/page.jpg": b"<html><body>Not Found</body></html>",
        "s3://b/p/motion.jpg": big_jpeg + os.urandom(50_000),  # data after the end marker is fine
    }
    for url, data in objects.items():
        buckets.put(url, data)
    urls = [*objects, "s3://b/p/missing.png", "s3://nobucket/p/x.png"]
    found = await source.check_many(urls)
    assert reasons(found) == [
        "ok",
        "ok",
        "ok",
        "image_empty",
        "image_too_large",
        "image_truncated",
        "image_truncated",
        "image_not_jpeg_or_png",
        "ok",
        "image_missing",
        "image_missing",
    ]
    assert "HTML" in found[7].message if isinstance(found[7], ImageProblem) else False
    ok = found[1]
    assert isinstance(ok, Fingerprint) and ok.ref == "s3://b/p/big.jpg" and ok.size == len(big_jpeg)
    assert buckets.made == 2  # one store per bucket, however many objects


async def test_a_limit_is_inclusive(buckets: Buckets) -> None:
    data = png_bytes(5)
    buckets.put("s3://b/exact.png", data)
    exact = RemoteImageSource(max_bytes=len(data), stores=buckets, retries=default_retry_policy())
    under = RemoteImageSource(max_bytes=len(data) - 1, stores=buckets, retries=default_retry_policy())
    assert reasons(await exact.check_many(["s3://b/exact.png"])) == ["ok"]
    assert reasons(await under.check_many(["s3://b/exact.png"])) == ["image_too_large"]


# --- fingerprints from listings ---


async def test_listing_fingerprints_equal_the_checked_ones(
    source: RemoteImageSource, buckets: Buckets
) -> None:
    urls = [f"s3://b/photos/{d}/u{i:05d}.png" for d in ("x", "y") for i in range(1500)]
    for i, url in enumerate(urls):
        buckets.put(url, png_bytes(i % 50))
    buckets.put("s3://b/photos/x/zz-not-in-the-manifest.png", png_bytes(1))
    wanted = [*urls[::7], "s3://b/photos/x/gone.png"]
    listed = await source.fingerprint_many(wanted)
    checked = await source.check_many(wanted)
    assert listed[:-1] == checked[:-1]
    assert isinstance(listed[-1], ImageProblem) and listed[-1].reason is Reason.IMAGE_MISSING


async def test_a_changed_object_has_another_fingerprint(source: RemoteImageSource, buckets: Buckets) -> None:
    buckets.put("s3://b/a.png", png_bytes(1))
    (before,) = await source.fingerprint_many(["s3://b/a.png"])
    buckets.put("s3://b/a.png", png_bytes(2))
    (after,) = await source.fingerprint_many(["s3://b/a.png"])
    assert isinstance(before, Fingerprint) and isinstance(after, Fingerprint)
    assert before.ref == after.ref and before.version != after.version


def test_versions_ignore_etag_quotes_and_sub_second_times() -> None:
    from datetime import UTC, datetime

    listed: Any = {"e_tag": "0x8D1", "last_modified": datetime(2026, 1, 2, 3, 4, 5, 123000, tzinfo=UTC)}
    headed: Any = {"e_tag": '"0x8D1"', "last_modified": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)}
    assert version_of(listed) == version_of(headed) == "0x8D1|2026-01-02T03:04:05Z"


# --- reads at send time ---


async def test_read_gives_the_exact_bytes_hashed_and_pinned(
    source: RemoteImageSource, buckets: Buckets
) -> None:
    data = jpeg([os.urandom(80_000)])  # hashed off the event loop: bigger than INLINE_HASH_MAX
    buckets.put("s3://b/a.jpg", data)
    (checked,) = await source.check_many(["s3://b/a.jpg"])
    assert isinstance(checked, Fingerprint)
    photo = await source.read(checked)
    assert photo.data == data and photo.sha256 == hashlib.sha256(data).hexdigest()
    assert photo.fingerprint == checked


async def test_an_object_changed_after_its_check_is_checked_again_on_the_bytes_read(
    source: RemoteImageSource, buckets: Buckets
) -> None:
    buckets.put("s3://b/a.png", png_bytes(1))
    (checked,) = await source.check_many(["s3://b/a.png"])
    assert isinstance(checked, Fingerprint)
    buckets.put("s3://b/a.png", png_bytes(2))  # another complete photo: it is what goes, with its own print
    photo = await source.read(checked)
    assert photo.data == png_bytes(2) and photo.fingerprint != checked
    buckets.put("s3://b/a.png", png_bytes(3)[:-20])  # now cut short: refused, nothing to send
    with pytest.raises(ImageError) as cut:
        await source.read(checked)
    assert cut.value.problem.reason is Reason.IMAGE_TRUNCATED
    assert "changed after it was checked" in str(cut.value)


@pytest.mark.parametrize(
    ("change", "reason"),
    [("delete", Reason.IMAGE_MISSING), ("empty", Reason.IMAGE_EMPTY), ("grow", Reason.IMAGE_TOO_LARGE)],
)
async def test_an_object_unusable_at_send_time_is_refused(
    source: RemoteImageSource, buckets: Buckets, change: str, reason: Reason
) -> None:
    buckets.put("s3://b/a.png", png_bytes(1))
    (checked,) = await source.check_many(["s3://b/a.png"])
    assert isinstance(checked, Fingerprint)
    if change == "delete":
        buckets.delete("s3://b/a.png")
    else:
        buckets.put("s3://b/a.png", b"" if change == "empty" else png_bytes(1) + bytes(LIMIT))
    with pytest.raises(ImageError) as refused:
        await source.read(checked)
    assert refused.value.problem.reason is reason


# --- transient failures, access denied, secrets ---


class Scripted:
    """A retry policy that answers a wait of attempts x 0.1 s, up to `tries` tries in all, and notes each ask."""

    def __init__(self, tries: int) -> None:
        self.tries = tries
        self.asked: list[int] = []

    def after_storage_failure(self, attempts: int) -> float | None:
        self.asked.append(attempts)
        return attempts * 0.1 if attempts < self.tries else None


async def test_transient_failures_are_retried_with_the_policy_backoff() -> None:
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    policy = Scripted(tries=4)
    source = RemoteImageSource(max_bytes=LIMIT, retries=policy, sleep=sleep)
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise GenericError(
                "Server returned non-2xx status code: 503 Service Unavailable: <Code>SlowDown</Code>"
            )
        return "ok"

    assert await source._retrying(flaky) == "ok"
    assert calls == 3 and waits == [0.1, 0.2] and policy.asked == [1, 2]

    async def denied() -> str:
        raise PermissionDeniedError("Server returned non-2xx status code: 403 Forbidden")

    with pytest.raises(PermissionDeniedError):
        await source._retrying(denied)  # never retried: it would be refused again
    assert len(waits) == 2 and policy.asked == [1, 2]


async def test_a_read_that_keeps_failing_ends_after_the_run_policy_s_max_attempts() -> None:
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    policy = RetryPolicy(max_attempts=3, backoff_initial=0.5, backoff_max=0.75)
    source = RemoteImageSource(max_bytes=LIMIT, retries=policy, sleep=sleep)
    calls = 0

    async def down() -> str:
        nonlocal calls
        calls += 1
        raise GenericError("Server returned non-2xx status code: 503 Service Unavailable")

    with pytest.raises(GenericError):
        await source._retrying(down)
    # Full-jitter backoff: the first wait is drawn from [0, 0.5], the second from [0, 1.0] capped at 0.75.
    assert calls == 3 and len(waits) == 2
    assert 0 <= waits[0] <= 0.5 and 0 <= waits[1] <= 0.75


def test_what_is_transient() -> None:
    assert transient(GenericError("status code: 503")) and transient(GenericError("connection reset"))
    assert transient(GenericError("status code: 429")) and transient(TimeoutError())
    assert not transient(GenericError("status code: 400")) and not transient(FileNotFoundError())
    assert not transient(PermissionDeniedError("status code: 403"))


def test_access_denied_names_the_bucket_and_what_to_check_and_never_a_secret() -> None:
    redact.register("sig=TOPSECRETSAS0123")
    exc = PermissionDeniedError(
        "Error performing GET https://acct.blob.core.windows.net/c/k?sig=TOPSECRETSAS0123: "
        "Server returned non-2xx status code: 403 Forbidden: <Code>AccessDenied</Code>"
    )
    found = describe(exc, parse("s3://partner-selfies/a.jpg"))
    assert found.reason is Reason.IMAGE_UNREADABLE
    assert "'partner-selfies'" in found.message and "s3:GetObject" in found.message
    assert "AccessDenied" in found.message
    assert "TOPSECRET" not in found.message


def test_storage_secrets_are_registered_when_a_store_is_made(monkeypatch: pytest.MonkeyPatch) -> None:
    secret, token = "aws-secret-3f9c2b7d", "aws-session-token-81ac"
    environ = {
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_SESSION_TOKEN": token,
        "AWS_REGION": "eu-west-1",
        "HOME": "/nonexistent",
    }
    make_store(parse("s3://b/k"), StoreOptions(environ=environ))
    assert redact.scrub(f"x {secret} y {token}") == "x *** y ***"


def test_a_profile_in_the_shared_files_gives_keys_region_and_endpoint(tmp_path: Path) -> None:
    (tmp_path / ".aws").mkdir()
    (tmp_path / ".aws" / "credentials").write_text(
        "[partner]\naws_access_key_id = AKIAPROFILE\naws_secret_access_key = profile-secret-77aa\n"
    )
    (tmp_path / ".aws" / "config").write_text(
        "[profile partner]\nregion = eu-central-1\nendpoint_url = http://127.0.0.1:9000\n"
    )
    config = aws_config({"AWS_PROFILE": "partner", "HOME": str(tmp_path)})
    assert config == {
        "access_key_id": "AKIAPROFILE",
        "secret_access_key": "profile-secret-77aa",
        "region": "eu-central-1",
        "endpoint": "http://127.0.0.1:9000",
    }
    assert redact.scrub("profile-secret-77aa") == "***"
    # The environment wins over the files, as in the SDKs.
    env = {"AWS_PROFILE": "partner", "HOME": str(tmp_path), "AWS_ACCESS_KEY_ID": "AKIAENV", "AWS_REGION": "x"}
    assert aws_config(env) == {"endpoint": "http://127.0.0.1:9000"}


def test_a_profile_that_needs_sso_or_does_not_exist_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / ".aws").mkdir()
    (tmp_path / ".aws" / "config").write_text("[profile sso]\nsso_session = corp\nregion = us-east-1\n")
    with pytest.raises(ConfigError, match="export-credentials --profile sso"):
        aws_config({"AWS_PROFILE": "sso", "HOME": str(tmp_path)})
    with pytest.raises(ConfigError, match="'nope' is in neither"):
        aws_config({"AWS_PROFILE": "nope", "HOME": str(tmp_path)})


# --- plain HTTP(S): no listing, so fingerprints come from HEADs ---


async def test_photos_by_http_url_are_checked_fingerprinted_and_read(tmp_path: Path) -> None:
    from aiohttp import web

    (tmp_path / "a b.png").write_bytes(png_bytes(1))
    (tmp_path / "cut.png").write_bytes(png_bytes(2, 50)[:-20])
    app = web.Application()
    app.router.add_static("/p/", tmp_path)  # serves ranges, as object stores do
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        source = RemoteImageSource(max_bytes=LIMIT, retries=default_retry_policy())
        urls = [
            f"http://127.0.0.1:{port}/p/a%20b.png",
            f"http://127.0.0.1:{port}/p/cut.png",
            f"http://127.0.0.1:{port}/p/nope.png",
        ]
        checked = await source.check_many(urls)
        assert reasons(checked) == ["ok", "image_truncated", "image_missing"]
        assert reasons(await source.fingerprint_many(urls)) == ["ok", "ok", "image_missing"]
        assert isinstance(checked[0], Fingerprint)
        assert (await source.read(checked[0])).data == png_bytes(1)
    finally:
        await runner.cleanup()


# --- routing: local paths and URLs in one manifest ---


class Counting(ImageSource):
    """A source that answers every photo with a fingerprint naming it, and counts its calls."""

    def __init__(self, tag: str) -> None:
        self.tag, self.calls = tag, 0

    async def fingerprint_many(self, raws: Any) -> list[Fingerprint | ImageProblem]:
        self.calls += 1
        return [Fingerprint(ref=f"{self.tag}:{r}", size=1, version="v") for r in raws]

    async def check_many(self, raws: Any) -> list[Fingerprint | ImageProblem]:
        return await self.fingerprint_many(raws)

    async def read(self, fingerprint: Fingerprint) -> Photo:
        return Photo(data=self.tag.encode(), sha256="", fingerprint=fingerprint)


async def test_dispatch_routes_each_row_and_keeps_the_order() -> None:
    local, remote = Counting("local"), Counting("remote")
    made: list[int] = []

    def make() -> ImageSource:
        made.append(1)
        return remote

    images = DispatchingImageSource(local=local, remote=make, base="s3://b/batch/")
    got = await images.check_many(["a.jpg", "/data/b.jpg", "s3://c/d.jpg", "file:///data/e.jpg", "f/g.png"])
    assert [f.ref for f in got if isinstance(f, Fingerprint)] == [
        "remote:s3://b/batch/a.jpg",
        "local:/data/b.jpg",
        "remote:s3://c/d.jpg",
        "local:/data/e.jpg",
        "remote:s3://b/batch/f/g.png",
    ]
    assert made == [1]
    assert (await images.read(Fingerprint(ref="s3://c/d.jpg", size=1, version="v"))).data == b"remote"
    assert (await images.read(Fingerprint(ref="/data/b.jpg", size=1, version="v"))).data == b"local"


async def test_a_local_manifest_never_makes_the_remote_source() -> None:
    local = Counting("local")

    def make() -> ImageSource:
        raise AssertionError("no URL, no object-storage client")

    images = DispatchingImageSource(local=local, remote=make, base=None)
    assert len(await images.check_many(["a.jpg", "b/c.jpg"])) == 2


async def test_with_images_root_set_a_url_is_outside_it(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(png_bytes(1))
    local = LocalImageSource(base=tmp_path, root=tmp_path, max_bytes=LIMIT)
    images = DispatchingImageSource(local=local, remote=lambda: Counting("remote"), root=str(tmp_path))
    got = await images.check_many(["a.png", "s3://b/a.png"])
    assert reasons(got) == ["ok", "path_outside_root"]


# --- a manifest in object storage ---


def manifest_bytes(rows: list[tuple[str, str, str]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["user_id", "user_created_at", "image_path"])
    writer.writerows(rows)
    return out.getvalue().encode()


async def test_a_manifest_at_a_url_is_read_like_a_local_one(
    source: RemoteImageSource, buckets: Buckets
) -> None:
    buckets.put(
        "s3://b/batches/b7/manifest.csv",
        manifest_bytes([("u1", "2021-08-12", "images/u1.png"), ("bad id", "2021-08-12", "x.png")]),
    )
    before = set(os.listdir(os.environ.get("TMPDIR", "/tmp")))
    manifest = await open_remote_manifest("s3://b/batches/b7/manifest.csv", ManifestRules(), source)
    assert manifest.name == "s3://b/batches/b7/manifest.csv" and manifest.total_rows == 2
    (batch,) = list(manifest.batches())
    assert [c.image for c in batch.candidates] == ["images/u1.png"]
    assert [r.reason for r in batch.rejects] == [Reason.BAD_USER_ID]
    # The private copy is gone as soon as it is open: a run leaves nothing in the temp folder.
    assert not {n for n in set(os.listdir(os.environ.get("TMPDIR", "/tmp"))) - before if "backfill" in n}


async def test_a_missing_or_unreadable_manifest_url_stops_with_its_name(
    source: RemoteImageSource, buckets: Buckets
) -> None:
    buckets.put("s3://b/other.csv", b"x")
    with pytest.raises(ManifestError, match=r"manifest 's3://b/nope.csv' doesn't exist"):
        await open_remote_manifest("s3://b/nope.csv", ManifestRules(), source)
    buckets.put("s3://b/bad.csv", b"user_id,when\n1,2\n")
    with pytest.raises(ManifestError) as bad:
        await open_remote_manifest("s3://b/bad.csv", ManifestRules(), source)
    assert "s3://b/bad.csv" in str(bad.value) and "backfill-manifest-" not in str(bad.value)

"""The HTTP exchange: the signed body, and every answer a real server can give read into a Verdict."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
import socket
import subprocess
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from backfill.api.answers import Kind, Verdict, classify_answer, classify_transport, parse_retry_after
from backfill.api.client import MAX_ANSWER_BYTES, Client
from backfill.api.signing import sign, verify
from backfill.redact import Secret
from backfill.sandbox.server import RunningSandbox

from .conftest import CREDENTIALS, enrolled

PARTNER = "085"
KEY = Secret("test-key")
STAMP = "2023-02-14T00:07:49.924Z"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def success(user_id: str, code: str = "0840") -> dict[str, object]:
    return {
        "ResultCode": code,
        "ResultText": "Enroll User",
        "SmileJobID": "0000021007",
        "PartnerParams": {"job_type": 4, "user_id": user_id, "job_id": "j-1"},
        "timestamp": STAMP,
        "signature": sign(STAMP, PARTNER, KEY.reveal()),
    }


@asynccontextmanager
async def serving(handler: Handler, *, path: str = "/v1/backfill_users") -> AsyncIterator[str]:
    """A real aiohttp server on 127.0.0.1 (an OS-assigned port) answering `path`; yields the base URL."""
    app = web.Application()
    app.router.add_route("*", path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def serving_raw(respond: bytes | RawHandler) -> AsyncIterator[str]:
    """A bare TCP server that reads the request and answers whatever bytes it is given, however broken."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        await reader.readexactly(length)
        try:
            if isinstance(respond, bytes):
                writer.write(respond)
                await writer.drain()
            else:
                await respond(reader, writer)
        except ConnectionError:
            pass  # the client hung up first: that's what some tests are for
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.close()
        await server.wait_closed()


async def send(base_url: str, *, timeout: float = 5, photo: bytes = b"hello") -> Verdict:
    async with Client(base_url, PARTNER, KEY, timeout=timeout, connect_timeout=2, concurrency=1) as client:
        return await client.send_photo("u1", "2021-08-12", photo)


# --- the request ----------------------------------------------------------------------------------


async def test_send_photo_encodes_once_and_signs_the_spliced_body() -> None:
    seen: list[bytes] = []
    headers: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(await request.read())
        headers.append(request.headers.get("Accept-Encoding", ""))
        return web.json_response(success("u1"), status=201)  # a 201 success is a success (found in review)

    photo = bytes(range(256)) * 40
    async with serving(handler) as base_url:
        verdict = await send(base_url, photo=photo)
        async with Client(base_url, PARTNER, KEY, timeout=5, connect_timeout=2, concurrency=1) as client:
            by_b64 = await client.send("u1", "2021-08-12", base64.b64encode(photo))
    assert verdict.kind is Kind.ENROLLED and by_b64.kind is Kind.ENROLLED and not verdict.may_have_enrolled
    document = json.loads(seen[0])
    assert document["photo"] == base64.b64encode(photo).decode() and document["user_id"] == "u1"
    assert verify(document["signature"], document["timestamp"], PARTNER, KEY.reveal())
    assert seen[0] == json.dumps(document, separators=(",", ":")).encode()
    assert headers[0] == "identity"  # a compressed answer could inflate far past what was sent


@given(
    user_id=st.text(min_size=1, max_size=30),
    created=st.text(max_size=30),
    photo=st.binary(max_size=300),
    partner_id=st.text(min_size=1, max_size=12),
    stamp=st.one_of(st.just(STAMP), st.text(min_size=1, max_size=30)),
)
def test_the_body_is_exactly_what_json_would_write(
    user_id: str, created: str, photo: bytes, partner_id: str, stamp: str
) -> None:
    """Written field by field with the photo spliced in, it is byte for byte json.dumps of the document."""
    client = Client("http://x/v1", partner_id, KEY, timeout=1, connect_timeout=1, concurrency=1)
    b64 = base64.b64encode(photo)
    document = {
        "partner_id": partner_id,
        "timestamp": stamp,
        "signature": sign(stamp, partner_id, KEY.reveal()),
        "user_id": user_id,
        "user_created_at": created,
        "photo": b64.decode(),
    }
    assert (
        client.body(user_id, created, b64, timestamp=stamp)
        == json.dumps(document, separators=(",", ":")).encode()
    )


@given(photo=st.binary(max_size=5000), user_id=st.text(min_size=1, max_size=30))
def test_the_photo_goes_as_the_standard_librarys_base64(photo: bytes, user_id: str) -> None:
    """The vectorised encoder writes standard base64 (the `+/` alphabet, `=` padding, no line breaks), byte
    for byte what `base64.b64encode` writes, at every length and alignment."""
    client = Client("http://x/v1", PARTNER, KEY, timeout=1, connect_timeout=1, concurrency=1)
    document = json.loads(client.photo_body(user_id, "2021-08-12", photo))
    assert document["photo"] == base64.b64encode(photo).decode("ascii")
    assert document["user_id"] == user_id


def test_each_attempt_is_signed_at_the_moment_it_is_built() -> None:
    client = Client("http://x/v1", PARTNER, KEY, timeout=1, connect_timeout=1, concurrency=1)
    before = datetime.now(UTC)
    document = json.loads(client.body("u1", "2021-08-12", b"QUJD"))
    after = datetime.now(UTC)
    stamp = datetime.fromisoformat(document["timestamp"])
    assert before.replace(microsecond=before.microsecond // 1000 * 1000) <= stamp <= after
    assert verify(document["signature"], document["timestamp"], PARTNER, KEY.reveal())


def test_the_names_callers_used_are_still_here() -> None:
    v = classify_answer(
        200, json.dumps(success("u1")).encode(), "1", user_id="u1", partner_id=PARTNER, api_key=KEY
    )
    assert v.kind is Kind.ENROLLED and v.may_have_enrolled is False and v.signature_ok is True
    assert parse_retry_after("2") == 2.0 and classify_transport.__module__ == "backfill.api.answers"


# --- transport failures ---------------------------------------------------------------------------


async def test_tls_is_verified_an_untrusted_certificate_is_refused_before_sending() -> None:
    """Against HTTPS with a certificate from a CA the machine doesn't trust, nothing is sent or trusted."""
    import ssl

    import trustme

    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(server_context)
    hits: list[int] = []

    async def handler(request: web.Request) -> web.Response:
        hits.append(1)
        return web.json_response(success("u1"))

    app = web.Application()
    app.router.add_post("/v1/backfill_users", handler)
    app_runner = web.AppRunner(app)
    await app_runner.setup()
    await web.TCPSite(app_runner, "127.0.0.1", 0, ssl_context=server_context).start()
    port = app_runner.addresses[0][1]
    try:
        verdict = await send(f"https://127.0.0.1:{port}/v1")
    finally:
        await app_runner.cleanup()
    assert verdict.kind is Kind.TRANSIENT and not verdict.may_have_enrolled
    assert "certificate" in verdict.error.lower() and not hits


async def test_nothing_listening_never_reached_and_credentials_in_the_url_stay_hidden() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    verdict = await send(f"http://me:hunter2@127.0.0.1:{port}/v1")
    assert verdict.kind is Kind.TRANSIENT and not verdict.may_have_enrolled and verdict.http_status is None
    assert "can't connect to http://127.0.0.1:" in verdict.error and "hunter2" not in verdict.error


async def test_a_redirect_is_not_followed_the_photo_stays_here() -> None:
    """Bug: a 307 re-sent the signed body and photo wherever Location pointed (aiohttp follows by default)."""
    elsewhere: list[bytes] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/elsewhere"):
            elsewhere.append(await request.read())
            return web.json_response(success("u1"))
        raise web.HTTPTemporaryRedirect("/v1/elsewhere")

    async with serving(handler, path="/v1/{tail}") as base_url:
        verdict = await send(base_url)
    assert not elsewhere
    assert verdict.kind is Kind.SYSTEMIC and verdict.http_status == 307 and not verdict.may_have_enrolled


# --- answers too large, endless, cut off or broken ------------------------------------------------

TEN_MB = 10 * 1024 * 1024


@pytest.mark.parametrize(
    ("status", "kind", "doubt"), [(200, Kind.TRANSIENT, True), (404, Kind.SYSTEMIC, False)]
)
async def test_a_10_mb_answer_is_judged_by_its_status_without_reading_it(
    status: int, kind: Kind, doubt: bool
) -> None:
    """Bug: the whole answer was read into memory, however large."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        return await stream(request, web.StreamResponse(status=status), total=TEN_MB)

    async with serving(handler) as base_url:
        verdict, peak = await measured(send(base_url))
    assert (verdict.kind, verdict.may_have_enrolled, verdict.http_status) == (kind, doubt, status)
    assert "too large" in verdict.error and peak < TEN_MB // 4, peak


async def test_an_endless_chunked_answer_stops_at_the_limit_not_the_timeout() -> None:
    """Bug: an answer without end was read until the timeout, growing all the while."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(status=200)
        response.enable_chunked_encoding()
        return await stream(request, response, total=None)

    async with serving(handler) as base_url:
        started = time.monotonic()
        verdict, peak = await measured(send(base_url, timeout=30))
    assert time.monotonic() - started < 10
    assert (verdict.kind, verdict.may_have_enrolled, verdict.http_status) == (Kind.TRANSIENT, True, 200)
    assert "too large" in verdict.error and peak < 6 * MAX_ANSWER_BYTES, peak


async def test_a_chunked_answer_that_never_ends_within_the_timeout() -> None:
    """Bug: the status that did arrive was lost; the Verdict said only 'timed out'."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(status=200)
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            while True:
                await response.write(b"{")
                await asyncio.sleep(0.05)
        except ConnectionError:
            pass
        return response

    async with serving(handler) as base_url:
        verdict = await send(base_url, timeout=0.5)
    assert (verdict.kind, verdict.may_have_enrolled, verdict.http_status) == (Kind.TRANSIENT, True, 200)
    assert "cut off" in verdict.error and "timed out" in verdict.error


async def test_a_compressed_answer_is_bounded_after_inflating() -> None:
    """A server that ignores Accept-Encoding: identity and sends a gzip bomb gets no further."""
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024), compresslevel=9)

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=200, body=bomb, headers={"Content-Encoding": "gzip"})

    async with serving(handler) as base_url:
        verdict, peak = await measured(send(base_url))
    assert verdict.kind is Kind.TRANSIENT and verdict.may_have_enrolled and "too large" in verdict.error
    assert peak < 16 * MAX_ANSWER_BYTES, peak


@pytest.mark.parametrize(("status", "doubt"), [(200, True), (400, False), (503, False)])
async def test_an_answer_cut_off_midway(status: int, doubt: bool) -> None:
    """The server closes the connection 100 bytes into a 1000-byte answer."""
    head = f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n".encode()
    async with serving_raw(head + b'{"ResultCode": "0840"' + b" " * 79) as base_url:
        verdict = await send(base_url)
    assert (verdict.kind, verdict.may_have_enrolled, verdict.http_status) == (Kind.TRANSIENT, doubt, status)
    assert "cut off" in verdict.error


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 OK\r\n\r\n",
        b"HTTP/1.1 2000 Too Much\r\nContent-Length: 0\r\n\r\n",
        b"garbage\r\n\r\n",
        b"\xff\xfe\x00\x01" * 100,
        b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 100_000 + b"\r\n\r\n",
        b"",  # closes without a word
    ],
)
async def test_a_broken_http_answer_is_a_verdict(answer: bytes) -> None:
    async with serving_raw(answer) as base_url:
        verdict = await send(base_url)
    assert (verdict.kind, verdict.may_have_enrolled, verdict.http_status) == (Kind.TRANSIENT, True, None)
    assert (
        verdict.error.startswith("connection failed")
        and len(verdict.error) < 200
        and "127.0.0.1" not in verdict.error
    )


@pytest.mark.parametrize(
    ("status_line", "kind"),
    [(b"HTTP/1.1 100 Continue", Kind.TRANSIENT), (b"HTTP/1.1 666 Beast", Kind.TRANSIENT)],
)
async def test_odd_statuses_from_a_real_server(status_line: bytes, kind: Kind) -> None:
    async with serving_raw(status_line + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi") as base_url:
        verdict = await send(base_url, timeout=1)
    assert verdict.kind is kind and verdict.may_have_enrolled


async def stream(
    request: web.Request, response: web.StreamResponse, *, total: int | None
) -> web.StreamResponse:
    """Write `total` bytes (None: without end) from one reused piece, so the server itself stays small."""
    piece = b"<html>" + b"y" * 65530
    if total is not None:
        response.content_length = total
    await response.prepare(request)
    sent = 0
    try:
        while total is None or sent < total:
            await response.write(piece)
            sent += len(piece)
    except ConnectionError:
        pass  # the client stopped reading and hung up, as it should
    return response


async def measured(work: Awaitable[Verdict]) -> tuple[Verdict, int]:
    """The Verdict, and the peak memory Python allocated (client and server both) while getting it."""
    tracemalloc.start()
    try:
        verdict = await work
        return verdict, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_run_that_sends_nothing_never_imports_aiohttp(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    """The resume of a finished job opens no session, so it never pays for importing aiohttp (its TLS contexts
    too): the session is opened by the first request. Checked in a fresh interpreter, as a user runs it."""
    where = enrolled(tmp_path, threaded_sandbox)
    code = (
        "import atexit, sys\n"
        "from backfill.cli import main\n"
        "atexit.register(lambda: print('aiohttp imported:', 'aiohttp' in sys.modules))\n"
        "sys.argv[0] = 'backfill'\n"
        "main()\n"
    )
    args = ["run", str(tmp_path / "manifest.csv"), *where, "--out", str(tmp_path / "again"), "--no-progress"]
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **CREDENTIALS},
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "2 skipped" in done.stdout
    assert done.stdout.rstrip().endswith("aiohttp imported: False")

"""The sandbox over real HTTP: a real aiohttp client against start_sandbox on an OS-assigned port."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from backfill.api.signing import sign, utc_timestamp, verify
from backfill.errors import ConfigError
from backfill.sandbox import (
    STATE_KEY,
    Faults,
    RunningSandbox,
    make_app,
    sandbox_state,
    start_sandbox,
)

from .conftest import png_bytes

PARTNER = "085"
KEY = "test-api-key"


def png(seed: int = 0) -> bytes:
    return png_bytes(seed, size=2)


JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 60
GIF = b"GIF89a" + b"\x00" * 30


def body(user_id: str = "user_1", image: bytes | None = None, **overrides: Any) -> dict[str, Any]:
    timestamp = overrides.pop("timestamp", None) or utc_timestamp()
    fields: dict[str, Any] = {
        "partner_id": PARTNER,
        "timestamp": timestamp,
        "signature": sign(timestamp, PARTNER, KEY),
        "user_id": user_id,
        "user_created_at": "2021-08-12",
        "photo": base64.b64encode(png() if image is None else image).decode(),
    }
    fields.update(overrides)
    return fields


async def post(
    session: aiohttp.ClientSession, server: RunningSandbox, payload: Any, **kwargs: Any
) -> tuple[int, Any, Mapping[str, str]]:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    async with session.post(server.base_url + "/backfill_users", data=data, **kwargs) as response:
        raw = await response.read()
        is_json = response.content_type == "application/json"
        return response.status, json.loads(raw) if is_json else raw.decode(), response.headers


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers={"Content-Type": "application/json"}) as client:
        yield client


@pytest.fixture
async def server() -> AsyncIterator[RunningSandbox]:
    async with await start_sandbox(PARTNER, KEY) as running:
        yield running


# -- success and its shape ---------------------------------------------------------------------------------


async def test_success_is_shaped_like_the_contract_and_signed(
    server: RunningSandbox, session: aiohttp.ClientSession
) -> None:
    assert server.base_url.startswith("http://127.0.0.1:") and server.base_url.endswith("/v1")
    assert not server.base_url.endswith(":0/v1")
    status, answer, _ = await post(
        session, server, body("user_1", user_created_at="2021-05-18 15:14:43-0700")
    )
    assert status == 200
    assert set(answer) == {
        "Actions", "ConfidenceValue", "PartnerParams", "ResultCode", "ResultText", "Source", "SmileJobID",
        "signature", "timestamp",
    }  # fmt: skip
    actions = answer["Actions"]
    assert (actions["Register_Selfie"], actions["Selfie_Check"], actions["Selfie_Provided"]) == (
        "Approved", "Passed", "Passed",
    )  # fmt: skip
    assert len(actions) == 14
    others = {
        k: v for k, v in actions.items() if k not in {"Register_Selfie", "Selfie_Check", "Selfie_Provided"}
    }
    assert set(others.values()) == {"Not Applicable"}
    assert answer["ConfidenceValue"] == "99"
    params = answer["PartnerParams"]
    assert params["job_type"] == 4 and params["user_id"] == "user_1"
    assert params["user_created_at"] == "2021-05-18 15:14:43-0700"
    assert uuid.UUID(params["job_id"]).version == 4
    assert (answer["ResultCode"], answer["ResultText"], answer["Source"]) == (
        "0840",
        "Enroll User",
        "Rest API",
    )
    assert answer["SmileJobID"] == "0000000001"
    assert verify(answer["signature"], answer["timestamp"], PARTNER, KEY)
    assert not verify(answer["signature"], answer["timestamp"], "85", KEY)
    record = server.state.enrolled["user_1"]
    assert record.job_id == params["job_id"] and record.smile_job_id == "0000000001"
    assert record.photo_sha256 == __import__("hashlib").sha256(png()).hexdigest()
    assert server.state.requests == {"user_1": 1} and server.state.total_requests == 1


async def test_job_ids_replay_with_the_seed(session: aiohttp.ClientSession) -> None:
    job_ids = []
    for seed in (7, 7, 8):
        async with await start_sandbox(PARTNER, KEY, seed=seed) as running:
            _, answer, _ = await post(session, running, body("u"))
            job_ids.append(answer["PartnerParams"]["job_id"])
    assert job_ids[0] == job_ids[1] != job_ids[2]


async def test_jpeg_is_accepted_and_smile_job_ids_count_up(
    server: RunningSandbox, session: aiohttp.ClientSession
) -> None:
    first = await post(session, server, body("a", JPEG))
    second = await post(session, server, body("b", JPEG))
    assert [first[1]["SmileJobID"], second[1]["SmileJobID"]] == ["0000000001", "0000000002"]


@pytest.mark.parametrize("created", ["2021-08-12", "2021-05-18 15:14:43-0700", "2021-05-18T15:14:43Z"])
async def test_user_created_at_forms_accepted(
    server: RunningSandbox, session: aiohttp.ClientSession, created: str
) -> None:
    status, answer, _ = await post(session, server, body("u", user_created_at=created))
    assert (status, answer["ResultCode"]) == (200, "0840")


async def test_second_enrollment_is_2209(server: RunningSandbox, session: aiohttp.ClientSession) -> None:
    first = await post(session, server, body("user_1"))
    second = await post(session, server, body("user_1", png(5)))
    assert first[0] == 200
    assert (second[0], second[1]) == (
        400,
        {"code": "2209", "error": "This user is already enrolled with user_id"},
    )
    assert server.state.enroll_attempts_after_enrolled == {"user_1": 1}
    assert server.state.requests["user_1"] == 2
    assert server.state.enrolled["user_1"].job_id == first[1]["PartnerParams"]["job_id"]


async def test_concurrent_requests_for_one_user_enroll_once(
    server: RunningSandbox, session: aiohttp.ClientSession
) -> None:
    answers = await asyncio.gather(*(post(session, server, body("same")) for _ in range(20)))
    codes = sorted(a[1].get("ResultCode") or a[1]["code"] for a in answers)
    assert codes == ["0840"] + ["2209"] * 19


# -- refusals ------------------------------------------------------------------------------------------------


def _skewed(minutes: float) -> str:
    return (datetime.now(UTC) + timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@pytest.mark.parametrize(
    "overrides",
    [
        {"signature": sign("2023-02-14T00:07:49.924Z", PARTNER, KEY)},
        {"signature": "not base64 at all"},
        {"partner_id": "85"},
        {"timestamp": _skewed(-10)},
        {"timestamp": _skewed(+10)},
        {"timestamp": "yesterday", "signature": sign("yesterday", PARTNER, KEY)},
    ],
    ids=["other-timestamp", "garbage", "partner-85", "stale", "future", "unparseable"],
)
async def test_not_authorized_is_2205(
    server: RunningSandbox, session: aiohttp.ClientSession, overrides: dict[str, Any]
) -> None:
    payload = body("u")
    if "timestamp" in overrides and "signature" not in overrides:
        overrides["signature"] = sign(overrides["timestamp"], PARTNER, KEY)
    payload.update(overrides)
    status, answer, _ = await post(session, server, payload)
    assert (status, answer) == (401, {"code": "2205", "error": "You are not authorized to do that"})
    assert not server.state.enrolled


async def test_wrong_key_is_2205(server: RunningSandbox, session: aiohttp.ClientSession) -> None:
    payload = body("u")
    payload["signature"] = sign(payload["timestamp"], PARTNER, "another-key")
    assert (await post(session, server, payload))[1]["code"] == "2205"


@pytest.mark.parametrize(
    "name", ["partner_id", "timestamp", "signature", "user_id", "user_created_at", "photo"]
)
@pytest.mark.parametrize("how", ["absent", "empty", "null"])
async def test_missing_parameter_is_2213(
    server: RunningSandbox, session: aiohttp.ClientSession, name: str, how: str
) -> None:
    payload = body("u")
    if how == "absent":
        del payload[name]
    else:
        payload[name] = "" if how == "empty" else None
    status, answer, _ = await post(session, server, payload)
    assert (status, answer) == (400, {"code": "2213", "error": f"Missing parameter: {name}"})


async def test_partner_id_as_a_number_is_2204(server: RunningSandbox, session: aiohttp.ClientSession) -> None:
    status, answer, _ = await post(session, server, body("u", partner_id=85))
    assert (status, answer["code"]) == (400, "2204") and "partner_id" in answer["error"]


async def test_user_id_as_a_number_is_2204_and_not_counted(
    server: RunningSandbox, session: aiohttp.ClientSession
) -> None:
    status, answer, _ = await post(session, server, body(123))  # type: ignore[arg-type]
    assert (status, answer["code"]) == (400, "2204")
    assert not server.state.requests and server.state.total_requests == 1


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b""])
async def test_not_a_json_object_is_2203(
    server: RunningSandbox, session: aiohttp.ClientSession, raw: bytes
) -> None:
    status, answer, _ = await post(session, server, raw)
    assert (status, answer) == (400, {"code": "2203", "error": "Invalid JSON"})


async def test_data_uri_is_2204(server: RunningSandbox, session: aiohttp.ClientSession) -> None:
    photo = "data:image/png;base64," + base64.b64encode(png()).decode()
    status, answer, _ = await post(session, server, body("u", photo=photo))
    assert (status, answer) == (
        400,
        {"code": "2204", "error": "photo must be base64 without a data URI prefix"},
    )


@pytest.mark.parametrize(
    "photo", ["abc", "a b c d", base64.urlsafe_b64encode(b"\xfb\xff" * 9).decode(), "ü" * 4]
)
async def test_invalid_base64_is_2204(
    server: RunningSandbox, session: aiohttp.ClientSession, photo: str
) -> None:
    status, answer, _ = await post(session, server, body("u", photo=photo))
    assert (status, answer["code"]) == (400, "2204") and "base64" in answer["error"]


async def test_bad_user_created_at_is_2204(server: RunningSandbox, session: aiohttp.ClientSession) -> None:
    status, answer, _ = await post(session, server, body("u", user_created_at="12/08/2021"))
    assert (status, answer["code"]) == (400, "2204") and "user_created_at" in answer["error"]
    assert not server.state.enrolled


async def test_gif_is_unusable_and_not_enrolled(
    server: RunningSandbox, session: aiohttp.ClientSession
) -> None:
    status, answer, _ = await post(session, server, body("u", GIF))
    assert status == 200
    assert (answer["ResultCode"], answer["ResultText"]) == ("0001", "Selfie image unusable")
    assert answer["PartnerParams"]["user_id"] == "u"
    assert verify(answer["signature"], answer["timestamp"], PARTNER, KEY)
    assert not server.state.enrolled
    retry = await post(session, server, body("u", JPEG))
    assert retry[1]["ResultCode"] == "0840"


async def test_photo_size_limit_is_on_decoded_bytes(session: aiohttp.ClientSession) -> None:
    async with await start_sandbox(PARTNER, KEY, max_photo_bytes=1000) as running:
        at_limit = await post(session, running, body("a", JPEG + b"\x00" * (1000 - len(JPEG))))
        over = await post(session, running, body("b", JPEG + b"\x00" * (1001 - len(JPEG))))
        far_over = await post(session, running, body("c", JPEG * 100))
        assert at_limit[0] == 200
        assert (over[0], over[1]["code"]) == (400, "2204") and "1000 bytes" in over[1]["error"]
        assert (far_over[0], far_over[1]["code"]) == (400, "2204")
        assert set(running.state.enrolled) == {"a"}


# -- faults --------------------------------------------------------------------------------------------------


async def test_error_rate_answers_5xx_before_processing(session: aiohttp.ClientSession) -> None:
    async with await start_sandbox(PARTNER, KEY, faults=Faults(error_rate=1.0), seed=3) as running:
        seen: dict[int, Any] = {}
        for i in range(30):
            status, answer, headers = await post(session, running, body(f"u{i}"))
            seen[status] = (answer, headers["Content-Type"])
        assert set(seen) == {500, 502, 503}
        assert seen[500][0] == seen[503][0] == {"code": "2201", "error": "System error"}
        assert seen[502] == ("<html>Bad Gateway</html>", "text/html; charset=utf-8")
        assert not running.state.enrolled and running.state.total_requests == 30
        assert sum(running.state.requests.values()) == 30


async def test_reset_before_drops_the_connection_and_enrolls_nothing(
    session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    async with await start_sandbox(PARTNER, KEY, faults=Faults(reset_before_rate=1.0)) as running:
        with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
            await post(session, running, body("u"))
        assert not running.state.enrolled
        assert running.state.requests == {"u": 1} and running.state.answers == {"reset_before": 1}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_reset_after_enrolls_then_drops_and_a_retry_hears_2209(session: aiohttp.ClientSession) -> None:
    async with await start_sandbox(PARTNER, KEY, faults=Faults(reset_after_rate=1.0)) as running:
        with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
            await post(session, running, body("u"))
        assert set(running.state.enrolled) == {"u"}
        status, answer, _ = await post(session, running, body("u"))
        assert (status, answer["code"]) == (400, "2209")
        assert running.state.requests == {"u": 2}
        assert running.state.answers == {"reset_after": 1, "2209": 1}


async def test_slow_enrolls_then_outlasts_the_client_and_stops_promptly(
    session: aiohttp.ClientSession,
) -> None:
    running = await start_sandbox(PARTNER, KEY, faults=Faults(slow_rate=1.0, slow_ms=20_000))
    try:
        with pytest.raises(asyncio.TimeoutError):
            await post(session, running, body("u"), timeout=aiohttp.ClientTimeout(total=0.2))
        assert set(running.state.enrolled) == {"u"}
    finally:
        started = time.monotonic()
        await running.stop()
    assert time.monotonic() - started < 1  # the held answer is woken, not waited out


async def test_rate_limit_answers_429_with_retry_after(session: aiohttp.ClientSession) -> None:
    async with await start_sandbox(PARTNER, KEY, faults=Faults(rate_limit=2.0)) as running:
        answers = [await post(session, running, body(f"u{i}")) for i in range(4)]
        assert [a[0] for a in answers] == [200, 200, 429, 429]
        _, answer, headers = answers[2]
        assert answer["code"] == "429"
        assert 0 < float(headers["Retry-After"]) <= 0.5
        assert set(running.state.enrolled) == {"u0", "u1"}
        await asyncio.sleep(float(answers[3][2]["Retry-After"]))
        assert (await post(session, running, body("u3")))[0] == 200


async def test_script_runs_per_user_id_then_processes_normally(session: aiohttp.ClientSession) -> None:
    script: dict[str, list[int | str]] = {"u1": [429, 503, 502, "reset_before", "reset_after", "2207"]}
    async with await start_sandbox(PARTNER, KEY, faults=Faults(script=script, retry_after_s=2)) as running:
        other = await post(session, running, body("u2"))
        assert other[0] == 200
        rate_limited = await post(session, running, body("u1"))
        assert (rate_limited[0], rate_limited[1]["code"], rate_limited[2]["Retry-After"]) == (429, "429", "2")
        unavailable = await post(session, running, body("u1"))
        assert (unavailable[0], unavailable[1]) == (503, {"code": "2201", "error": "System error"})
        assert (await post(session, running, body("u1")))[0] == 502
        with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
            await post(session, running, body("u1"))
        assert "u1" not in running.state.enrolled
        with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
            await post(session, running, body("u1"))
        assert "u1" in running.state.enrolled
        disabled = await post(session, running, body("u1"))
        assert (disabled[0], disabled[1]["code"]) == (400, "2207")
        after_script = await post(session, running, body("u1"))
        assert after_script[1]["code"] == "2209"
        assert running.state.requests == {"u1": 7, "u2": 1}


async def test_scripted_slow_enrolls_and_times_the_client_out(session: aiohttp.ClientSession) -> None:
    faults = Faults(script={"u": ["slow"]}, slow_ms=10_000)
    async with await start_sandbox(PARTNER, KEY, faults=faults) as running:
        with pytest.raises(asyncio.TimeoutError):
            await post(session, running, body("u"), timeout=aiohttp.ClientTimeout(total=0.2))
        assert "u" in running.state.enrolled


@pytest.mark.parametrize(("code", "status"), [("2205", 401), ("2220", 400)])
async def test_systemic_code_answers_every_request(
    session: aiohttp.ClientSession, code: str, status: int
) -> None:
    async with await start_sandbox(PARTNER, KEY, faults=Faults(systemic_code=code)) as running:
        for user_id in ("a", "b"):
            answer = await post(session, running, body(user_id))
            assert (answer[0], answer[1]["code"]) == (status, code)
        assert not running.state.enrolled


async def test_latency_is_added(session: aiohttp.ClientSession) -> None:
    async with await start_sandbox(PARTNER, KEY, faults=Faults(latency_ms=150)) as running:
        started = time.monotonic()
        status, _, _ = await post(session, running, {"bad": "request"})
        assert status == 400 and time.monotonic() - started >= 0.15


@pytest.mark.parametrize(
    "faults",
    [
        {"error_rate": 1.5},
        {"latency_ms": -1},
        {"rate_limit": 0},
        {"script": {"u": ["explode"]}},
        {"script": {"u": [200]}},
        {"systemic_code": ""},
    ],
)
def test_bad_faults_are_refused(faults: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        Faults(**faults)


def test_faults_script_is_a_frozen_copy() -> None:
    script = {"u": [503]}
    faults = Faults(script=script)
    script["u"].append(429)
    assert faults.script == {"u": (503,)}


# -- state: file, restart, inspection -----------------------------------------------------------------------


async def test_state_file_survives_a_restart(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    path = tmp_path / "state.jsonl"
    async with await start_sandbox(PARTNER, KEY, state_file=path) as first:
        assert (await post(session, first, body("u1")))[0] == 200
    lines = path.read_text().splitlines()
    assert [json.loads(line)["user_id"] for line in lines] == ["u1"]
    with path.open("a") as handle:
        handle.write('{"user_id": "half-writ')  # a crash mid-append: never acknowledged
    async with await start_sandbox(PARTNER, KEY, state_file=path, seed=1) as second:
        assert set(second.state.enrolled) == {"u1"}
        status, answer, _ = await post(session, second, body("u1"))
        assert (status, answer["code"]) == (400, "2209")
        status, answer, _ = await post(session, second, body("half-writ"))
        assert (status, answer["SmileJobID"]) == (200, "0000000002")
    assert [json.loads(line)["user_id"] for line in path.read_text().splitlines()] == ["u1", "half-writ"]


async def test_request_log_has_arrival_and_answer_lines(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    log = tmp_path / "requests.jsonl"
    async with await start_sandbox(PARTNER, KEY, request_log=log) as running:
        await post(session, running, body("user_1"))
        await post(session, running, body("user_1"))
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines == [
        {"user_id": "user_1", "event": "request"}, {"user_id": "user_1", "event": "answer", "answer": "0840"},
        {"user_id": "user_1", "event": "request"}, {"user_id": "user_1", "event": "answer", "answer": "2209"},
    ]  # fmt: skip


def test_corrupt_state_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "state.jsonl"
    path.write_text("not json\n")
    with pytest.raises(ConfigError, match="line 1"):
        make_app(PARTNER, KEY, state_file=path)


async def test_state_endpoint_reports_the_records(
    server: RunningSandbox, session: aiohttp.ClientSession
) -> None:
    await post(session, server, body("b"))
    await post(session, server, body("a"))
    await post(session, server, body("a"))
    await post(session, server, b"garbage")
    async with session.get(server.base_url + "/_sandbox/state") as response:
        assert response.status == 200
        report = await response.json()
    assert report == {
        "enrolled": ["a", "b"],
        "requests": {"a": 2, "b": 1},
        "conflicts_answered": {"a": 1},
        "total_requests": 4,
    }
    assert sandbox_state(server.app) is server.app[STATE_KEY] is server.state


def test_serve_runs_until_sigterm_and_prints_nothing(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = f"from backfill.sandbox import serve; serve({PARTNER!r}, {KEY!r}, host='127.0.0.1', port={port})"
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ}
    )
    try:
        deadline = time.monotonic() + 10
        report = None
        while report is None and time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                    conn.sendall(b"GET /v1/_sandbox/state HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    report = b"".join(iter(lambda: conn.recv(4096), b""))
            except OSError:
                time.sleep(0.05)
        assert report is not None and b'"total_requests": 0' in report
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert (process.returncode, out, err) == (0, b"", b"")


async def test_port_in_use_is_a_config_error(server: RunningSandbox) -> None:
    port = int(server.base_url.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(ConfigError, match="port"):
        await start_sandbox(PARTNER, KEY, port=port)


async def test_timestamp_within_the_window_is_accepted(session: aiohttp.ClientSession) -> None:
    async with await start_sandbox(PARTNER, KEY, timestamp_window_s=180) as running:
        inside = await post(session, running, body("a", timestamp=_skewed(-2)))
        outside = await post(session, running, body("b", timestamp=_skewed(-4)))
        assert (inside[0], outside[0]) == (200, 401)

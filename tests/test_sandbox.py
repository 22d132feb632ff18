"""The sandbox over real HTTP: a real aiohttp client against start_sandbox on an OS-assigned port."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from backfill.api.signing import sign, utc_timestamp, verify
from backfill.errors import ConfigError
from backfill.sandbox import (
    STATE_KEY,
    Faults,
    OptionKeywords,
    RunningSandbox,
    SandboxOptions,
    foreign_draw,
    make_app,
    read_foreign_ids,
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
        "Actions",
        "ConfidenceValue",
        "PartnerParams",
        "ResultCode",
        "ResultText",
        "Source",
        "SmileJobID",
        "signature",
        "timestamp",
    }
    actions = answer["Actions"]
    assert (actions["Register_Selfie"], actions["Selfie_Check"], actions["Selfie_Provided"]) == (
        "Approved",
        "Passed",
        "Passed",
    )
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
        {"timestamp": -10.0},  # minutes from now, taken when the test runs, not when it is collected
        {"timestamp": +10.0},
        {"timestamp": "yesterday", "signature": sign("yesterday", PARTNER, KEY)},
    ],
    ids=["other-timestamp", "garbage", "partner-85", "stale", "future", "unparseable"],
)
async def test_not_authorized_is_2205(
    server: RunningSandbox, session: aiohttp.ClientSession, overrides: dict[str, Any]
) -> None:
    payload = body("u")
    if isinstance(overrides.get("timestamp"), float):
        overrides = {**overrides, "timestamp": _skewed(overrides["timestamp"])}
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
    assert time.monotonic() - started < 10  # the held answer (20 s) is woken, not waited out


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
    # Arrivals carry their wall-clock time (a fleet's rate is audited from these) and the photo's digest.
    times = [line.pop("t") for line in lines if line["event"] == "request"]
    assert len(times) == 2 and times[0] <= times[1]
    photo = hashlib.sha256(body("user_1")["photo"].encode()).hexdigest()[:16]
    assert lines == [
        {"user_id": "user_1", "event": "request", "photo": photo},
        {"user_id": "user_1", "event": "answer", "answer": "0840"},
        {"user_id": "user_1", "event": "request", "photo": photo},
        {"user_id": "user_1", "event": "answer", "answer": "2209"},
    ]


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
        "foreign_requested": [],
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


# -- options: one record, two call forms -------------------------------------------------------------------


async def test_options_record_and_keyword_forms_agree(session: aiohttp.ClientSession) -> None:
    options = SandboxOptions(partner_id=PARTNER, api_key=KEY, seed=7, faults=Faults(latency_ms=1))
    job_ids = []
    async with await start_sandbox(options=options) as by_record:
        job_ids.append((await post(session, by_record, body("u")))[1]["PartnerParams"]["job_id"])
    async with await start_sandbox(PARTNER, KEY, seed=7, faults=Faults(latency_ms=1)) as by_keywords:
        job_ids.append((await post(session, by_keywords, body("u")))[1]["PartnerParams"]["job_id"])
    assert job_ids[0] == job_ids[1]
    assert sandbox_state(make_app(options=options)).total_requests == 0


def test_option_keywords_match_the_record() -> None:
    # The keyword form is spelled twice (the dataclass and the TypedDict): this keeps the two in step.
    record = {f.name for f in fields(SandboxOptions)} - {"partner_id", "api_key"}
    assert set(OptionKeywords.__optional_keys__) == record


@pytest.mark.parametrize(
    "call",
    [
        lambda options: make_app(PARTNER, KEY, options=options),  # type: ignore[call-overload]
        lambda options: make_app(options=options, seed=3),  # type: ignore[call-overload]
        lambda options: make_app(),  # type: ignore[call-overload]
        lambda options: make_app(PARTNER),  # type: ignore[call-overload]
    ],
    ids=["credentials-and-options", "options-and-keywords", "nothing", "no-api-key"],
)
def test_options_and_keywords_do_not_mix(call: Any) -> None:
    with pytest.raises(TypeError, match="make_app"):
        call(SandboxOptions(partner_id=PARTNER, api_key=KEY))


@pytest.mark.parametrize(
    "options",
    [{"partner_id": ""}, {"api_key": ""}, {"max_photo_bytes": 0}, {"timestamp_window_s": -1}],
)
def test_bad_options_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="SandboxOptions"):
        SandboxOptions(**{"partner_id": PARTNER, "api_key": KEY, **options})


# -- foreign IDs: held by another partner user from the start ---------------------------------------------


def _photo() -> str:
    return base64.b64encode(png()).decode()


async def _post_many(
    session: aiohttp.ClientSession, server: RunningSandbox, user_ids: Iterable[str]
) -> dict[str, str]:
    """Each user_id's answer code (ResultCode or error code), sent 32 at a time with one signature."""
    timestamp = utc_timestamp()
    common = {
        "partner_id": PARTNER,
        "timestamp": timestamp,
        "signature": sign(timestamp, PARTNER, KEY),
        "user_created_at": "2021-08-12",
        "photo": _photo(),
    }
    gate = asyncio.Semaphore(32)

    async def one(user_id: str) -> tuple[str, str]:
        async with gate:
            _, answer, _ = await post(session, server, {**common, "user_id": user_id})
        return user_id, answer.get("ResultCode") or answer["code"]

    return dict(await asyncio.gather(*(one(user_id) for user_id in user_ids)))


async def test_a_foreign_id_answers_2209_from_the_first_request_and_is_never_enrolled(
    session: aiohttp.ClientSession,
) -> None:
    faults = Faults(foreign_ids=frozenset({"theirs"}))
    async with await start_sandbox(PARTNER, KEY, faults=faults) as running:
        answers = [await post(session, running, body("theirs")) for _ in range(3)]
        assert [(status, answer) for status, answer, _ in answers] == [
            (400, {"code": "2209", "error": "This user is already enrolled with user_id"})
        ] * 3
        assert (await post(session, running, body("ours")))[1]["ResultCode"] == "0840"
        state = running.state
        assert set(state.enrolled) == {"ours"} and state.foreign_requested == {"theirs"}
        assert state.requests == {"theirs": 3, "ours": 1}
        # Not one of our conflicts: those count 2209s for IDs this sandbox enrolled.
        assert not state.enroll_attempts_after_enrolled
        assert state.answers == {"2209": 3, "0840": 1}


async def test_a_foreign_id_answers_2209_under_every_rate_fault_that_lets_it_through(
    session: aiohttp.ClientSession,
) -> None:
    # Random lost and slow answers follow commits only, and a foreign ID never commits.
    faults = Faults(foreign_ids=frozenset({"theirs"}), reset_after_rate=1.0, slow_rate=1.0, slow_ms=20_000)
    async with await start_sandbox(PARTNER, KEY, faults=faults) as running:
        status, answer, _ = await post(
            session, running, body("theirs"), timeout=aiohttp.ClientTimeout(total=5)
        )
        assert (status, answer["code"]) == (400, "2209") and not running.state.enrolled


async def test_a_scripted_fault_comes_before_the_foreign_2209(session: aiohttp.ClientSession) -> None:
    faults = Faults(foreign_ids=frozenset({"theirs"}), script={"theirs": [503]})
    async with await start_sandbox(PARTNER, KEY, faults=faults) as running:
        assert (await post(session, running, body("theirs")))[0] == 503
        assert (await post(session, running, body("theirs")))[1]["code"] == "2209"
        assert running.state.foreign_requested == {"theirs"} and not running.state.enrolled


async def test_a_foreign_id_still_needs_a_valid_request(session: aiohttp.ClientSession) -> None:
    faults = Faults(foreign_ids=frozenset({"theirs"}))
    async with await start_sandbox(PARTNER, KEY, faults=faults) as running:
        payload = body("theirs")
        payload["signature"] = sign(payload["timestamp"], PARTNER, "another-key")
        assert (await post(session, running, payload))[1]["code"] == "2205"
        assert running.state.foreign_requested == {"theirs"}


async def test_foreign_rate_is_a_seeded_fraction_of_user_ids(session: aiohttp.ClientSession) -> None:
    user_ids = [f"user_{i:05d}" for i in range(2000)]
    picked: list[set[str]] = []
    for seed in (11, 11, 12):
        faults = Faults(foreign_rate=0.25)
        async with await start_sandbox(PARTNER, KEY, faults=faults, seed=seed) as running:
            codes = await _post_many(session, running, user_ids)
            foreign = {user_id for user_id, code in codes.items() if code == "2209"}
            assert set(codes.values()) == {"0840", "2209"}
            assert running.state.foreign_requested == foreign
            assert set(running.state.enrolled) == set(user_ids) - foreign
            picked.append(foreign)
    assert picked[0] == picked[1] != picked[2]
    assert all(400 <= len(foreign) <= 600 for foreign in picked)  # 500 expected; 5 standard deviations is 97
    options = SandboxOptions(partner_id=PARTNER, api_key=KEY, seed=11, faults=Faults(foreign_rate=0.25))
    assert picked[0] == {user_id for user_id in user_ids if options.is_foreign(user_id)}


def test_foreign_draw_is_fixed_by_seed_and_user_id_only() -> None:
    # Pinned: a change to the hash would silently move every recorded rehearsal's foreign IDs.
    assert (foreign_draw(7, "user_1"), foreign_draw(8, "user_1")) == (0.18501170172687756, 0.0396960042502402)
    assert 0 <= foreign_draw(7, "\ud800") < 1  # a lone surrogate, which JSON can carry, still hashes
    extremes = [
        SandboxOptions(partner_id=PARTNER, api_key=KEY, faults=Faults(foreign_rate=rate)) for rate in (0, 1)
    ]
    assert [options.is_foreign("anyone") for options in extremes] == [False, True]


async def test_foreign_rate_agrees_across_a_restart_and_the_state_file_never_holds_them(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    path = tmp_path / "state.jsonl"
    user_ids = [f"u{i}" for i in range(200)]
    faults = Faults(foreign_rate=0.3)
    async with await start_sandbox(PARTNER, KEY, faults=faults, seed=5, state_file=path) as first:
        before = await _post_many(session, first, user_ids)
        foreign = set(first.state.foreign_requested)
    assert foreign and {json.loads(line)["user_id"] for line in path.read_text().splitlines()} == (
        set(user_ids) - foreign
    )
    async with await start_sandbox(PARTNER, KEY, faults=faults, seed=5, state_file=path) as second:
        after = await _post_many(session, second, user_ids)
        assert second.state.foreign_requested == foreign
        assert set(second.state.enroll_attempts_after_enrolled) == set(user_ids) - foreign
    assert {u for u, code in before.items() if code == "2209"} == foreign
    assert set(after.values()) == {"2209"}


def test_a_state_file_enrolling_a_now_foreign_id_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "state.jsonl"
    record = {
        "user_id": "u1",
        "job_id": "j",
        "smile_job_id": "0000000001",
        "photo_sha256": "x",
        "user_created_at": "2021-08-12",
        "enrolled_at": "2021-08-12T00:00:00.000Z",
    }
    path.write_text(json.dumps(record) + "\n")
    make_app(PARTNER, KEY, state_file=path)  # ours, as written
    with pytest.raises(ConfigError, match=r"line 1 enrolls 'u1'.*foreign"):
        make_app(PARTNER, KEY, state_file=path, faults=Faults(foreign_ids=frozenset({"u1"})))


async def test_request_log_and_snapshot_show_foreign_ids(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    log = tmp_path / "requests.jsonl"
    faults = Faults(foreign_ids=frozenset({"theirs", "never-sent"}))
    async with await start_sandbox(PARTNER, KEY, faults=faults, request_log=log) as running:
        await post(session, running, body("theirs"))
        await post(session, running, body("ours"))
        async with session.get(running.base_url + "/_sandbox/state") as response:
            report = await response.json()
    assert report == {
        "enrolled": ["ours"],
        "requests": {"theirs": 1, "ours": 1},
        "conflicts_answered": {},
        "total_requests": 2,
        "foreign_requested": ["theirs"],
    }
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    for line in lines:
        if line["event"] == "request":
            del line["t"], line["photo"]  # see test_request_log_has_arrival_and_answer_lines
    assert lines == [
        {"user_id": "theirs", "event": "request", "foreign": True},
        {"user_id": "theirs", "event": "answer", "answer": "2209", "foreign": True},
        {"user_id": "ours", "event": "request"},
        {"user_id": "ours", "event": "answer", "answer": "0840"},
    ]


@pytest.mark.parametrize(
    "faults",
    [
        {"foreign_rate": 1.5},
        {"foreign_rate": -0.1},
        {"foreign_rate": float("nan")},
        {"foreign_ids": "user_1"},
        {"foreign_ids": frozenset({""})},
        {"foreign_ids": frozenset({7})},
    ],
)
def test_bad_foreign_faults_are_refused(faults: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"faults\.foreign_"):
        Faults(**faults)


def test_foreign_ids_are_a_frozen_copy() -> None:
    ids = {"a"}
    faults = Faults(foreign_ids=ids)  # type: ignore[arg-type]
    ids.add("b")
    assert faults.foreign_ids == frozenset({"a"}) and isinstance(faults.foreign_ids, frozenset)


def test_read_foreign_ids_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "foreign.txt"
    path.write_bytes("\ufeffuser_1\r\n\n  user_2  \n   \nuser_3".encode())
    assert read_foreign_ids(path) == {"user_1", "user_2", "user_3"}
    path.write_bytes(b"\xff\xfe bad")
    with pytest.raises(ConfigError, match="foreign_ids"):
        read_foreign_ids(path)


# -- the `backfill sandbox` command -------------------------------------------------------------------------


def _invoke(*args: str) -> tuple[int, str, str]:
    # Imported here: the CLI package pulls in the whole tool, which the emulator's own tests need not.
    from backfill.cli.sandbox import sandbox as sandbox_command

    result = CliRunner().invoke(sandbox_command, list(args), env={"SMILE_PARTNER_ID": PARTNER})
    return result.exit_code, result.stdout, result.stderr


def test_cli_help_names_the_foreign_options() -> None:
    code, out, _ = _invoke("--help")
    assert code == 0
    text = " ".join(out.split())
    assert "--foreign-ids FILE" in text and "--foreign-rate FLOAT" in text
    assert "answers 2209 from its first request" in text and "picked from --seed" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--foreign-rate", "1.5"], "faults.foreign_rate (from Faults): 1.5 is not a fraction"),
        (["--foreign-ids", "missing.txt"], "foreign_ids (from missing.txt): can't be read"),
    ],
    ids=["bad-rate", "missing-file"],
)
def test_cli_bad_foreign_options_are_one_line_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = _invoke(*args, "--port", "0")
    assert code == 2 and out == ""
    assert err.startswith("backfill: config error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_cli_passes_the_foreign_options_to_serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    served: dict[str, Any] = {}
    monkeypatch.setattr("backfill.sandbox.serve", lambda **kwargs: served.update(kwargs))
    path = tmp_path / "foreign.txt"
    path.write_text("a\n\nb\n")
    code, _, err = _invoke("--foreign-ids", str(path), "--foreign-rate", "0.1", "--seed", "4", "--port", "0")
    assert (code, err) == (0, "")
    options = served["options"]
    assert isinstance(options, SandboxOptions) and (served["host"], served["port"]) == ("127.0.0.1", 0)
    assert options.faults.foreign_ids == {"a", "b"} and options.faults.foreign_rate == 0.1
    assert (options.seed, options.partner_id) == (4, PARTNER)


def test_cli_sandbox_process_answers_2209_for_a_foreign_id(tmp_path: Path) -> None:
    """The real command in its own process, as the crash rig runs it."""
    foreign, log = tmp_path / "foreign.txt", tmp_path / "requests.jsonl"
    foreign.write_text("theirs\n")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "backfill",
            "sandbox",
            "--port",
            "0",
            "--foreign-ids",
            str(foreign),
            "--request-log",
            str(log),
        ],
        env={**os.environ, "SMILE_PARTNER_ID": PARTNER, "SMILE_API_KEY": KEY},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stderr is not None
        line = process.stderr.readline().decode()
        assert line.startswith("sandbox on http://127.0.0.1:"), line
        base_url = line.split()[2]

        async def go() -> tuple[int, Any, Any]:
            async with aiohttp.ClientSession(headers={"Content-Type": "application/json"}) as client:
                url = base_url + "/backfill_users"
                async with client.post(url, data=json.dumps(body("theirs")).encode()) as response:
                    answer = response.status, await response.json()
                async with client.get(base_url + "/_sandbox/state") as response:
                    return *answer, await response.json()

        status, answer, report = asyncio.run(go())
        assert (status, answer["code"]) == (400, "2209")
        assert report["foreign_requested"] == ["theirs"] and report["enrolled"] == []
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
    assert json.loads(log.read_text().splitlines()[-1]) == {
        "user_id": "theirs",
        "event": "answer",
        "answer": "2209",
        "foreign": True,
    }

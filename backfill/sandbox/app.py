"""The emulator's aiohttp app: POST /v1/backfill_users with its faults, and GET /v1/_sandbox/state."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import math
import random
import uuid
from datetime import UTC, datetime
from typing import Any, Final, Unpack, overload

from aiohttp import web

from ..api.signing import utc_timestamp, verify
from .answers import error_answer, fault_answer, result_answer
from .options import OptionKeywords, SandboxOptions, resolve_options
from .state import STATE_KEY, EnrolledUser, RequestLog, SandboxState, StateFile

REQUIRED_FIELDS: Final = ("partner_id", "timestamp", "signature", "user_id", "user_created_at", "photo")

_JPEG_MAGIC: Final = b"\xff\xd8\xff"
_PNG_MAGIC: Final = b"\x89PNG\r\n\x1a\n"
_ERROR_STATUSES: Final = (500, 502, 503)
_USER_ID: Final = web.RequestKey[str | None]("backfill_sandbox_user_id")
_FOREIGN: Final = web.RequestKey[bool]("backfill_sandbox_foreign")
WAKE_KEY: Final = web.AppKey("backfill_sandbox_wake_held", asyncio.Event)


class _Sandbox:
    def __init__(self, options: SandboxOptions) -> None:
        self.options = options
        self.faults = options.faults
        self.state = SandboxState()
        self.rng = random.Random(options.seed)
        # Longer base64 can't decode within the limit: refuse it before spending time decoding it.
        self.max_photo_chars = 4 * math.ceil(options.max_photo_bytes / 3)
        # Set at shutdown, or by a test that held answers on purpose: slow answers and latency sleeps end now.
        self.wake_held = asyncio.Event()
        self.tokens = max(1.0, self.faults.rate_limit or 1.0)
        self.refilled_at: float | None = None
        self.state_file: StateFile | None = None
        if options.state_file is not None:
            self.state_file = StateFile(options.state_file)
            self.state_file.load(self.state, options.is_foreign)
        self.request_log = RequestLog(options.request_log) if options.request_log is not None else None

    # -- the endpoint --------------------------------------------------------------------------------------

    async def enroll(self, request: web.Request) -> web.StreamResponse:
        state, faults = self.state, self.faults
        state.total_requests += 1
        payload = _json_object(await request.read())
        user_id = payload.get("user_id") if payload is not None else None
        foreign = False
        if not isinstance(user_id, str):
            user_id = None
        else:
            state.requests[user_id] += 1
            foreign = self.options.is_foreign(user_id)
            if foreign:
                state.foreign_requested.add(user_id)
        request[_USER_ID] = user_id
        request[_FOREIGN] = foreign
        if self.request_log is not None:
            photo = payload.get("photo") if payload is not None else None
            digest = hashlib.sha256(photo.encode()).hexdigest()[:16] if isinstance(photo, str) else None
            self.request_log.write(user_id, None, foreign=foreign, photo=digest)

        after: str | None = None
        step = self._scripted(user_id)
        if isinstance(step, int):
            return await self._answer(request, fault_answer(step, faults.retry_after_s), str(step))
        if step == "reset_before":
            return self._reset(request, "reset_before")
        if step in ("reset_after", "slow"):
            after = step
        elif step is not None:
            return await self._answer(request, error_answer(step), step)

        if faults.systemic_code is not None:
            return await self._answer(request, error_answer(faults.systemic_code), faults.systemic_code)
        wait = self._rate_limited(asyncio.get_running_loop().time())
        if wait is not None:
            return await self._answer(request, fault_answer(429, math.ceil(wait * 1000) / 1000), "429")
        if faults.reset_before_rate and self.rng.random() < faults.reset_before_rate:
            return self._reset(request, "reset_before")
        if faults.error_rate and self.rng.random() < faults.error_rate:
            status = self.rng.choice(_ERROR_STATUSES)
            return await self._answer(request, fault_answer(status, 0), str(status))

        response, label = await self._process(payload, foreign=foreign)
        committed = label == "0840"
        # Random lost answers only follow a commit, so a retry under reset_after_rate=1.0 still hears 2209;
        # a scripted one loses whatever answer this request produced.
        if after is None and committed:
            if faults.reset_after_rate and self.rng.random() < faults.reset_after_rate:
                after = "reset_after"
            elif faults.slow_rate and self.rng.random() < faults.slow_rate:
                after = "slow"
        if after == "reset_after":
            return self._reset(request, "reset_after")
        if after == "slow":
            await self._pause(faults.slow_ms / 1000)
        return await self._answer(request, response, label)

    async def report(self, request: web.Request) -> web.Response:
        return web.json_response(self.state.snapshot())

    async def shutdown(self, app: web.Application) -> None:
        # Wakes slow answers and latency sleeps so stopping never waits out slow_ms.
        self.wake_held.set()
        if self.request_log is not None:
            self.request_log.close()

    # -- stages ----------------------------------------------------------------------------------------------

    def _scripted(self, user_id: str | None) -> int | str | None:
        if user_id is None:
            return None
        steps = self.faults.script.get(user_id)
        used = self.state.script_used[user_id]
        if not steps or used >= len(steps):
            return None
        self.state.script_used[user_id] = used + 1
        return steps[used]

    def _rate_limited(self, now: float) -> float | None:
        """None when a token is free (and takes it), else the seconds until one will be."""
        rate = self.faults.rate_limit
        if rate is None:
            return None
        burst = max(1.0, rate)
        if self.refilled_at is not None:
            self.tokens = min(burst, self.tokens + (now - self.refilled_at) * rate)
        self.refilled_at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return None
        return max(0.001, (1.0 - self.tokens) / rate)

    async def _process(self, payload: dict[str, Any] | None, *, foreign: bool) -> tuple[web.Response, str]:
        """Validate, then enroll; with the answer's code, which is "0840" only when this request enrolled."""
        if payload is None:
            return error_answer("2203", "Invalid JSON"), "2203"
        values: dict[str, str] = {}
        for name in REQUIRED_FIELDS:
            value = payload.get(name)
            if value is None or (isinstance(value, str) and not value.strip()):
                return error_answer("2213", f"Missing parameter: {name}"), "2213"
            if not isinstance(value, str):
                return error_answer("2204", f"Wrong data type: {name} must be a string"), "2204"
            values[name] = value

        options = self.options
        if (
            values["partner_id"] != options.partner_id
            or not verify(values["signature"], values["timestamp"], options.partner_id, options.api_key)
            or not self._fresh(values["timestamp"])
        ):
            return error_answer("2205"), "2205"

        photo = values["photo"]
        too_large = f"photo is larger than {options.max_photo_bytes} bytes"
        if photo.startswith("data:"):
            return error_answer("2204", "photo must be base64 without a data URI prefix"), "2204"
        if len(photo) > self.max_photo_chars:
            return error_answer("2204", too_large), "2204"
        try:
            image = base64.b64decode(photo, validate=True)
        except (binascii.Error, ValueError):
            return error_answer("2204", "photo is not valid standard base64"), "2204"
        if len(image) > options.max_photo_bytes:
            return error_answer("2204", too_large), "2204"
        created = values["user_created_at"]
        if not _is_iso_moment(created):
            return error_answer("2204", "user_created_at must be an ISO 8601 date or date-time"), "2204"

        user_id = values["user_id"]
        if not image.startswith((_JPEG_MAGIC, _PNG_MAGIC)):
            job_id, smile_job_id = self._new_job()
            return self._result(user_id, created, job_id, smile_job_id, unusable=True), "0001"
        # A foreign ID answers exactly as one enrolled here would, so a client can only tell the two apart
        # from its own attempt records; it is never ours, so nothing is committed or counted as our conflict.
        if foreign:
            return error_answer("2209"), "2209"
        if user_id in self.state.enrolled:
            self.state.enroll_attempts_after_enrolled[user_id] += 1
            return error_answer("2209"), "2209"

        job_id, smile_job_id = self._new_job()
        user = EnrolledUser(
            user_id=user_id,
            job_id=job_id,
            smile_job_id=smile_job_id,
            photo_sha256=hashlib.sha256(image).hexdigest(),
            user_created_at=created,
            enrolled_at=utc_timestamp(),
        )
        # Committed before the first await, so concurrent requests for one user_id see it at once.
        self.state.enrolled[user_id] = user
        if self.state.keep_photos:
            self.state.photos[user_id] = image
        if self.state_file is not None:
            try:
                await self.state_file.append(user)
            except OSError:
                del self.state.enrolled[user_id]
                self.state.photos.pop(user_id, None)
                return error_answer("2201"), "2201"
        return self._result(user_id, created, job_id, smile_job_id, unusable=False), "0840"

    def _fresh(self, timestamp: str) -> bool:
        try:
            moment = datetime.fromisoformat(timestamp)
        except ValueError:
            return False
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return abs((datetime.now(UTC) - moment).total_seconds()) <= self.options.timestamp_window_s

    def _new_job(self) -> tuple[str, str]:
        self.state.last_smile_job_id += 1
        job_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        return job_id, f"{self.state.last_smile_job_id:010d}"

    def _result(
        self, user_id: str, created: str, job_id: str, smile_job_id: str, *, unusable: bool
    ) -> web.Response:
        return result_answer(
            partner_id=self.options.partner_id,
            api_key=self.options.api_key,
            user_id=user_id,
            created=created,
            job_id=job_id,
            smile_job_id=smile_job_id,
            unusable=unusable,
        )

    # -- answering -------------------------------------------------------------------------------------------

    def _log(self, request: web.Request, label: str | None) -> None:
        if self.request_log is not None:
            self.request_log.write(request.get(_USER_ID), label, foreign=request.get(_FOREIGN, False))

    async def _answer(self, request: web.Request, response: web.Response, label: str) -> web.Response:
        faults = self.faults
        delay = faults.latency_ms
        if faults.jitter_ms:
            delay += self.rng.uniform(-faults.jitter_ms, faults.jitter_ms)
        await self._pause(delay / 1000)
        self.state.answers[label] += 1
        self._log(request, label)
        return response

    def _reset(self, request: web.Request, label: str) -> web.Response:
        self.state.answers[label] += 1
        self._log(request, label)
        if request.transport is not None:
            request.transport.abort()
        # Never written: aiohttp quietly drops a response to a closed transport, which is the point.
        return web.Response(status=500)

    async def _pause(self, seconds: float) -> None:
        if seconds <= 0 or self.wake_held.is_set():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.wake_held.wait()


@overload
def make_app(*, options: SandboxOptions) -> web.Application: ...
@overload
def make_app(partner_id: str, api_key: str, **keywords: Unpack[OptionKeywords]) -> web.Application: ...
def make_app(
    partner_id: str | None = None,
    api_key: str | None = None,
    *,
    options: SandboxOptions | None = None,
    **keywords: Unpack[OptionKeywords],
) -> web.Application:
    """The emulator as an aiohttp app: POST /v1/backfill_users and GET /v1/_sandbox/state.

    Takes `options=SandboxOptions(...)`, or the credentials and SandboxOptions' other fields as keywords.
    """
    chosen = resolve_options("make_app", partner_id, api_key, options, keywords)
    sandbox = _Sandbox(chosen)
    # Room for a photo somewhat over the limit, so it earns the API's 2204 rather than aiohttp's bare 413.
    app = web.Application(client_max_size=2 * chosen.max_photo_bytes + 1024 * 1024)
    app[STATE_KEY] = sandbox.state
    app[WAKE_KEY] = sandbox.wake_held
    app.router.add_post("/v1/backfill_users", sandbox.enroll)
    app.router.add_get("/v1/_sandbox/state", sandbox.report)
    app.on_shutdown.append(sandbox.shutdown)
    return app


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return payload if isinstance(payload, dict) else None


def _is_iso_moment(text: str) -> bool:
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return True

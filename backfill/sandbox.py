"""A local emulator of Smile ID's POST /v1/backfill_users, with injectable faults, for tests and rehearsals."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import math
import os
import random
import signal
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any, Final

from aiohttp import web

from .api.signing import sign, utc_timestamp, verify
from .errors import ConfigError

REQUIRED_FIELDS: Final = ("partner_id", "timestamp", "signature", "user_id", "user_created_at", "photo")
SCRIPT_FAULTS: Final = frozenset({"reset_before", "reset_after", "slow"})

_SCRIPT_FIX: Final = "use an HTTP status 400-599, an error code string, or " + ", ".join(
    sorted(SCRIPT_FAULTS)
)
_JPEG_MAGIC: Final = b"\xff\xd8\xff"
_PNG_MAGIC: Final = b"\x89PNG\r\n\x1a\n"
_ERROR_STATUSES: Final = (500, 502, 503)
_MESSAGES: Final = {
    "2201": "System error",
    "2203": "Invalid JSON",
    "2204": "Wrong data type",
    "2205": "You are not authorized to do that",
    "2207": "This user has been disabled",
    "2208": "This user has been deleted",
    "2209": "This user is already enrolled with user_id",
    "2211": "User must complete re-enrollment",
    "2213": "Missing parameter",
    "2220": "Production is not enabled for this partner",
    "2405": "You are not authorized to do that",
}
# Only 429 is a documented status; these follow the SDK test doubles (400 for the rest) plus the obvious ones.
_STATUS_FOR_CODE: Final = {"2201": 500, "2301": 500, "2401": 500, "2205": 401, "2405": 401}
_PASSED_ACTIONS: Final = {
    "Register_Selfie": "Approved",
    "Selfie_Check": "Passed",
    "Selfie_Provided": "Passed",
}
# Inference: the contract only documents the success answer; an unusable selfie plausibly fails these.
_UNUSABLE_ACTIONS: Final = {
    "Register_Selfie": "Rejected",
    "Selfie_Check": "Failed",
    "Selfie_Provided": "Passed",
}
_NOT_APPLICABLE: Final = (
    "Human_Review_Compare",
    "Human_Review_Liveness_Check",
    "Human_Review_Selfie_Check",
    "Human_Review_Update_Selfie",
    "Liveness_Check",
    "Return_Personal_Info",
    "Selfie_To_ID_Authority_Compare",
    "Selfie_To_ID_Card_Compare",
    "Selfie_To_Registered_Selfie_Compare",
    "Update_Registered_Selfie_On_File",
    "Verify_ID_Number",
)


@dataclass(frozen=True)
class Faults:
    """What goes wrong, and how often. Rates are fractions of requests, drawn from the sandbox's seeded rng."""

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    error_rate: float = 0.0
    rate_limit: float | None = None
    reset_before_rate: float = 0.0
    reset_after_rate: float = 0.0
    slow_rate: float = 0.0
    slow_ms: float = 30_000.0
    systemic_code: str | None = None
    # Per user_id, answers for its first requests: an HTTP status (429, 500, 502, 503...), an API error code
    # string ("2207"), or one of SCRIPT_FAULTS.
    script: Mapping[str, Sequence[int | str]] = field(default_factory=dict)
    retry_after_s: float = 1.0

    def __post_init__(self) -> None:
        for name in ("latency_ms", "jitter_ms", "slow_ms", "retry_after_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise _fault_error(name, f"{value!r} is not a finite number >= 0", "use 0 or more")
        for name in ("error_rate", "reset_before_rate", "reset_after_rate", "slow_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise _fault_error(name, f"{value!r} is not a fraction", "use a number from 0 to 1")
        if self.rate_limit is not None and not (math.isfinite(self.rate_limit) and self.rate_limit > 0):
            raise _fault_error(
                "rate_limit", f"{self.rate_limit!r} is not > 0", "use requests/second, or None"
            )
        if self.systemic_code is not None and not self.systemic_code:
            raise _fault_error("systemic_code", "it is empty", 'use a code such as "2205", or None')
        for user_id, steps in self.script.items():
            for step in steps:
                if not _valid_step(step):
                    problem = f"step {step!r} for user_id {user_id!r} is unknown"
                    raise _fault_error("script", problem, _SCRIPT_FIX)
        # A frozen copy: a caller mutating its dict later must not change a running sandbox.
        frozen = MappingProxyType({user_id: tuple(steps) for user_id, steps in self.script.items()})
        object.__setattr__(self, "script", frozen)


NO_FAULTS: Final = Faults()


@dataclass(frozen=True)
class EnrolledUser:
    """One enrollment as the sandbox committed it; also one line of the state file."""

    user_id: str
    job_id: str
    smile_job_id: str
    photo_sha256: str
    user_created_at: str
    enrolled_at: str


@dataclass
class SandboxState:
    """Everything the sandbox has seen and done; tests read it directly."""

    enrolled: dict[str, EnrolledUser] = field(default_factory=dict)
    requests: Counter[str] = field(default_factory=Counter)
    enroll_attempts_after_enrolled: Counter[str] = field(default_factory=Counter)
    total_requests: int = 0
    # What each POST got: a ResultCode, an error code, an HTTP status for faults, or the reset fault's name.
    answers: Counter[str] = field(default_factory=Counter)
    script_used: Counter[str] = field(default_factory=Counter)
    last_smile_job_id: int = 0

    def snapshot(self) -> dict[str, Any]:
        """The JSON served at {root}/_sandbox/state, for tests that drive the sandbox from another process."""
        return {
            "enrolled": sorted(self.enrolled),
            "requests": dict(self.requests),
            "conflicts_answered": dict(self.enroll_attempts_after_enrolled),
            "total_requests": self.total_requests,
        }


STATE_KEY: Final = web.AppKey("backfill_sandbox_state", SandboxState)
_USER_ID: Final = web.RequestKey[str | None]("backfill_sandbox_user_id")


def sandbox_state(app: web.Application) -> SandboxState:
    """The state of an app built by make_app."""
    return app[STATE_KEY]


class _Sandbox:
    def __init__(
        self,
        partner_id: str,
        api_key: str,
        faults: Faults,
        seed: int,
        state_file: Path | None,
        max_photo_bytes: int,
        timestamp_window_s: float,
        request_log: Path | None = None,
    ) -> None:
        self.partner_id = partner_id
        self.api_key = api_key
        self.faults = faults
        self.state = SandboxState()
        self.rng = random.Random(seed)
        self.state_file = state_file
        self.max_photo_bytes = max_photo_bytes
        # Longer base64 can't decode within the limit: refuse it before spending time decoding it.
        self.max_photo_chars = 4 * math.ceil(max_photo_bytes / 3)
        self.window_s = timestamp_window_s
        self.closing = asyncio.Event()
        self.file_lock = asyncio.Lock()
        self.tokens = max(1.0, faults.rate_limit or 1.0)
        self.refilled_at: float | None = None
        if state_file is not None:
            self._load(state_file)
        self.request_log: IO[str] | None = None
        if request_log is not None:
            try:
                # Line-buffered, not fsynced: a SIGKILL of this process keeps what write() handed the kernel,
                # which is what a crash test that kills the sandbox needs.
                self.request_log = request_log.open("a", encoding="utf-8", buffering=1)
            except OSError as error:
                raise ConfigError("request_log", str(request_log), f"can't be opened ({error})",
                                  "choose a writable path") from error  # fmt: skip

    # -- the endpoint --------------------------------------------------------------------------------------

    async def enroll(self, request: web.Request) -> web.StreamResponse:
        state, faults = self.state, self.faults
        state.total_requests += 1
        payload = _json_object(await request.read())
        user_id = payload.get("user_id") if payload is not None else None
        if not isinstance(user_id, str):
            user_id = None
        else:
            state.requests[user_id] += 1
        request[_USER_ID] = user_id
        self._log(request, None)

        after: str | None = None
        step = self._scripted(user_id)
        if isinstance(step, int):
            return await self._answer(request, _fault_status(step, faults.retry_after_s), str(step))
        if step == "reset_before":
            return self._reset(request, "reset_before")
        if step in ("reset_after", "slow"):
            after = step
        elif step is not None:
            return await self._answer(request, _error(step), step)

        if faults.systemic_code is not None:
            return await self._answer(request, _error(faults.systemic_code), faults.systemic_code)
        wait = self._rate_limited(asyncio.get_running_loop().time())
        if wait is not None:
            return await self._answer(request, _fault_status(429, math.ceil(wait * 1000) / 1000), "429")
        if faults.reset_before_rate and self.rng.random() < faults.reset_before_rate:
            return self._reset(request, "reset_before")
        if faults.error_rate and self.rng.random() < faults.error_rate:
            status = self.rng.choice(_ERROR_STATUSES)
            return await self._answer(request, _fault_status(status, 0), str(status))

        response, label = await self._process(payload)
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
        self.closing.set()
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

    async def _process(self, payload: dict[str, Any] | None) -> tuple[web.Response, str]:
        """Validate, then enroll; with the answer's code, which is "0840" only when this request enrolled."""
        if payload is None:
            return _error("2203", "Invalid JSON"), "2203"
        values: dict[str, str] = {}
        for name in REQUIRED_FIELDS:
            value = payload.get(name)
            if value is None or (isinstance(value, str) and not value.strip()):
                return _error("2213", f"Missing parameter: {name}"), "2213"
            if not isinstance(value, str):
                return _error("2204", f"Wrong data type: {name} must be a string"), "2204"
            values[name] = value

        if (
            values["partner_id"] != self.partner_id
            or not verify(values["signature"], values["timestamp"], self.partner_id, self.api_key)
            or not self._fresh(values["timestamp"])
        ):
            return _error("2205"), "2205"

        photo = values["photo"]
        if photo.startswith("data:"):
            return _error("2204", "photo must be base64 without a data URI prefix"), "2204"
        if len(photo) > self.max_photo_chars:
            return _error("2204", f"photo is larger than {self.max_photo_bytes} bytes"), "2204"
        try:
            image = base64.b64decode(photo, validate=True)
        except (binascii.Error, ValueError):
            return _error("2204", "photo is not valid standard base64"), "2204"
        if len(image) > self.max_photo_bytes:
            return _error("2204", f"photo is larger than {self.max_photo_bytes} bytes"), "2204"
        created = values["user_created_at"]
        if not _is_iso_moment(created):
            return _error("2204", "user_created_at must be an ISO 8601 date or date-time"), "2204"

        user_id = values["user_id"]
        if not image.startswith((_JPEG_MAGIC, _PNG_MAGIC)):
            job_id, smile_job_id = self._new_job()
            return self._result(user_id, created, job_id, smile_job_id, unusable=True), "0001"
        if user_id in self.state.enrolled:
            self.state.enroll_attempts_after_enrolled[user_id] += 1
            return _error("2209"), "2209"

        job_id, smile_job_id = self._new_job()
        user = EnrolledUser(
            user_id, job_id, smile_job_id, hashlib.sha256(image).hexdigest(), created, utc_timestamp()
        )
        # Committed before the first await, so concurrent requests for one user_id see it at once.
        self.state.enrolled[user_id] = user
        if self.state_file is not None:
            try:
                await self._persist(self.state_file, user)
            except OSError:
                del self.state.enrolled[user_id]
                return _error("2201"), "2201"
        return self._result(user_id, created, job_id, smile_job_id, unusable=False), "0840"

    def _fresh(self, timestamp: str) -> bool:
        try:
            moment = datetime.fromisoformat(timestamp)
        except ValueError:
            return False
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return abs((datetime.now(UTC) - moment).total_seconds()) <= self.window_s

    def _new_job(self) -> tuple[str, str]:
        self.state.last_smile_job_id += 1
        job_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        return job_id, f"{self.state.last_smile_job_id:010d}"

    def _result(
        self, user_id: str, created: str, job_id: str, smile_job_id: str, *, unusable: bool
    ) -> web.Response:
        timestamp = utc_timestamp()
        actions = dict.fromkeys(_NOT_APPLICABLE, "Not Applicable")
        actions.update(_UNUSABLE_ACTIONS if unusable else _PASSED_ACTIONS)
        body = {
            "Actions": dict(sorted(actions.items())),
            "ConfidenceValue": "0" if unusable else "99",
            "PartnerParams": {
                "job_type": 4,
                "user_id": user_id,
                "job_id": job_id,
                "user_created_at": created,
            },
            "ResultCode": "0001" if unusable else "0840",
            "ResultText": "Selfie image unusable" if unusable else "Enroll User",
            "Source": "Rest API",
            "SmileJobID": smile_job_id,
            "signature": sign(timestamp, self.partner_id, self.api_key),
            "timestamp": timestamp,
        }
        return web.json_response(body)

    # -- answering -------------------------------------------------------------------------------------------

    def _log(self, request: web.Request, label: str | None) -> None:
        """One line when a request arrives and one when it is answered: a slow answer can come much later."""
        if self.request_log is not None:
            record = {"user_id": request.get(_USER_ID), "event": "answer" if label else "request"}
            if label:
                record["answer"] = label
            self.request_log.write(json.dumps(record) + "\n")

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
        if seconds <= 0 or self.closing.is_set():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.closing.wait()

    # -- the state file ---------------------------------------------------------------------------------------

    def _load(self, path: Path) -> None:
        fix = "delete the file to start with no enrollments, or point state_file elsewhere"
        try:
            # Opening for append creates it now, so a bad path fails here and not on the first enrollment.
            with path.open("ab"):
                pass
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                # A line cut short by a crash was never acknowledged: drop it so the next append starts clean.
                data = data[: data.rfind(b"\n") + 1]
                with path.open("r+b") as handle:
                    handle.truncate(len(data))
        except OSError as error:
            raise ConfigError("state_file", str(path), f"can't be used ({error})", fix) from error
        for number, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                user = EnrolledUser(**{name: str(record[name]) for name in EnrolledUser.__dataclass_fields__})
                sequence = int(user.smile_job_id)
            except (ValueError, TypeError, KeyError) as error:
                problem = f"line {number} is not an enrollment record ({error})"
                raise ConfigError("state_file", str(path), problem, fix) from error
            self.state.enrolled[user.user_id] = user
            self.state.last_smile_job_id = max(self.state.last_smile_job_id, sequence)

    async def _persist(self, path: Path, user: EnrolledUser) -> None:
        line = json.dumps(asdict(user), separators=(",", ":")) + "\n"
        async with self.file_lock:
            await asyncio.to_thread(_append_synced, path, line)


def make_app(
    partner_id: str,
    api_key: str,
    *,
    faults: Faults = NO_FAULTS,
    seed: int = 0,
    state_file: Path | None = None,
    max_photo_bytes: int = 5 * 1024 * 1024,
    timestamp_window_s: float = 300.0,
    request_log: Path | None = None,
) -> web.Application:
    """The emulator as an aiohttp app: POST /v1/backfill_users and GET /v1/_sandbox/state."""
    if not partner_id or not api_key:
        name = "partner_id" if not partner_id else "api_key"
        raise ConfigError(name, "make_app", "it is empty", "pass the credentials the client will sign with")
    if max_photo_bytes <= 0:
        raise ConfigError("max_photo_bytes", "make_app", f"{max_photo_bytes} is not > 0", "use a byte count")
    if not timestamp_window_s >= 0:
        raise ConfigError(
            "timestamp_window_s", "make_app", f"{timestamp_window_s} is < 0", "use seconds >= 0"
        )
    sandbox = _Sandbox(
        partner_id, api_key, faults, seed, Path(state_file) if state_file else None, max_photo_bytes,
        timestamp_window_s, request_log,
    )  # fmt: skip
    # Room for a photo somewhat over the limit, so it earns the API's 2204 rather than aiohttp's bare 413.
    app = web.Application(client_max_size=2 * max_photo_bytes + 1024 * 1024)
    app[STATE_KEY] = sandbox.state
    app.router.add_post("/v1/backfill_users", sandbox.enroll)
    app.router.add_get("/v1/_sandbox/state", sandbox.report)
    app.on_shutdown.append(sandbox.shutdown)
    return app


class RunningSandbox:
    """A sandbox serving on a real socket; `base_url` is the API root to give a client."""

    def __init__(self, base_url: str, app: web.Application, runner: web.AppRunner) -> None:
        self.base_url = base_url
        self.app = app
        self.state = app[STATE_KEY]
        self._runner = runner
        self._stopped = False

    async def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            await self._runner.cleanup()

    async def __aenter__(self) -> RunningSandbox:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


async def start_sandbox(
    partner_id: str,
    api_key: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    faults: Faults = NO_FAULTS,
    seed: int = 0,
    state_file: Path | None = None,
    max_photo_bytes: int = 5 * 1024 * 1024,
    timestamp_window_s: float = 300.0,
    request_log: Path | None = None,
) -> RunningSandbox:
    """Serve a new sandbox on host:port (0 = any free port) in the running loop."""
    app = make_app(
        partner_id, api_key, faults=faults, seed=seed, state_file=state_file, max_photo_bytes=max_photo_bytes,
        timestamp_window_s=timestamp_window_s, request_log=request_log,
    )  # fmt: skip
    # Held-open slow answers are woken on shutdown; the timeout only bounds a handler stuck elsewhere.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as error:
        await runner.cleanup()
        fix = "choose another port, or stop whatever is listening there"
        raise ConfigError(
            "port", f"{host}:{port}", f"can't listen ({error.strerror or error})", fix
        ) from error
    real_port = runner.addresses[0][1]
    shown_host = f"[{host}]" if ":" in host else host
    return RunningSandbox(f"http://{shown_host}:{real_port}/v1", app, runner)


def serve(
    partner_id: str,
    api_key: str,
    *,
    host: str,
    port: int,
    faults: Faults = NO_FAULTS,
    seed: int = 0,
    state_file: Path | None = None,
    max_photo_bytes: int = 5 * 1024 * 1024,
    timestamp_window_s: float = 300.0,
    request_log: Path | None = None,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM, then stop cleanly. Prints nothing; `ready` hears the base URL."""

    async def main() -> None:
        server = await start_sandbox(
            partner_id, api_key, host=host, port=port, faults=faults, seed=seed, state_file=state_file,
            max_photo_bytes=max_photo_bytes, timestamp_window_s=timestamp_window_s, request_log=request_log,
        )  # fmt: skip
        if ready is not None:
            ready(server.base_url)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        installed = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            # Not available on Windows: there Ctrl-C arrives as KeyboardInterrupt, which the CLI handles.
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, stop.set)
                installed.append(signum)
        try:
            await stop.wait()
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)
            await server.stop()

    asyncio.run(main())


def _fault_error(name: str, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"faults.{name}", "Faults", problem, fix)


def _valid_step(step: object) -> bool:
    if isinstance(step, bool):
        return False
    if isinstance(step, int):
        return 400 <= step <= 599
    return isinstance(step, str) and (step in SCRIPT_FAULTS or (step.isdigit() and step.isascii()))


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


def _error(code: str, message: str | None = None) -> web.Response:
    body = {"code": code, "error": message or _MESSAGES.get(code, f"Error {code}")}
    return web.json_response(body, status=_STATUS_FOR_CODE.get(code, 400))


def _fault_status(status: int, retry_after: float) -> web.Response:
    if status == 429:
        headers = {"Retry-After": _seconds(retry_after)}
        return web.json_response({"code": "429", "error": "Too many requests"}, status=429, headers=headers)
    if status == 502:
        # What a proxy in front of the API sends: not JSON at all.
        return web.Response(status=502, text="<html>Bad Gateway</html>", content_type="text/html")
    return web.json_response({"code": "2201", "error": "System error"}, status=status)


def _seconds(value: float) -> str:
    value = float(value)  # callers pass ints too (retry_after_s=2), and int.is_integer is 3.12+
    return str(int(value)) if value.is_integer() else f"{value:.3f}".rstrip("0")


def _append_synced(path: Path, line: str) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())

"""The HTTP side: sign and POST one enrollment, and classify every answer, in one place, into a Verdict."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import Enum
from pathlib import Path
from typing import Any

import aiohttp

from ..config import Secret
from ..errors import TransportError
from .signing import sign, utc_timestamp, verify


class Kind(Enum):
    ENROLLED = "enrolled"  # 200 with ResultCode 0840, signature and user_id check out
    ALREADY = "already"  # 2209: the runner decides between already_enrolled and id_conflict
    PERMANENT = "permanent"  # this row will get the same answer again
    TRANSIENT = "transient"  # try again later
    UNVERIFIED = "unverified"  # looked like success but can't be trusted; the user may be enrolled
    SYSTEMIC = "systemic"  # every row would get this answer: stop the run


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: Kind
    # True when the server may have enrolled the user on this attempt without us seeing it (answer lost).
    in_doubt: bool
    http_status: int | None = None
    result_code: str = ""
    result_text: str = ""
    smile_job_id: str = ""
    job_id: str = ""
    signature_ok: bool | None = None
    error: str = ""
    retry_after: float | None = None


_TRANSIENT_CODES = {"2201", "2301", "2401"}
_SYSTEMIC_CODES = {
    "2205": "not authorized: check SMILE_API_KEY belongs to this environment (sandbox keys only work on "
    "testapi, production keys on api), that partner_id is right, and that this machine's clock is in sync",
    "2405": "not authorized: check the API key, partner_id, environment and this machine's clock",
    "2220": "production is not enabled for this partner: ask Smile ID to enable it, or use --env sandbox",
}
# Gateway and server errors can arrive after the upstream committed the enrollment; 503 and 429 say the
# request was not taken on.
_IN_DOUBT_STATUSES = {500, 502, 504}
_NOT_TAKEN_STATUSES = {408, 429, 503}
_TRANSIENT_STATUSES = {408, 429, 500, 502, 503, 504}


def classify_answer(
    status: int, body: bytes, retry_after: str | None, *, user_id: str, partner_id: str, api_key: Secret
) -> Verdict:
    """Turn one HTTP answer into a Verdict. The only place that decides transient/permanent/systemic."""
    payload = _json_object(body)
    code = str(payload.get("code") or payload.get("ResultCode") or "") if payload is not None else ""
    text = str(payload.get("error") or payload.get("ResultText") or "") if payload is not None else ""
    pause = parse_retry_after(retry_after)

    if status == 200 and payload is not None and "ResultCode" in payload:
        return _classify_result(payload, status, user_id=user_id, partner_id=partner_id, api_key=api_key)
    if payload is None or (200 <= status < 300 and not code):
        return _unreadable(status, body, pause)
    if code in _SYSTEMIC_CODES:
        return Verdict(Kind.SYSTEMIC, False, status, code, text, error=_SYSTEMIC_CODES[code])
    if code == "2209":
        return Verdict(Kind.ALREADY, False, status, code, text)
    if code in _TRANSIENT_CODES or status in _TRANSIENT_STATUSES:
        # A system-error code can follow a commit, unless the status itself says the request was refused.
        in_doubt = status in _IN_DOUBT_STATUSES or (
            code in _TRANSIENT_CODES and status not in _NOT_TAKEN_STATUSES
        )
        error = f"HTTP {status}" + (f" code {code}" if code else "") + ("" if payload else _snippet(body))
        return Verdict(Kind.TRANSIENT, in_doubt, status, code, text, error=error, retry_after=pause)
    return Verdict(
        Kind.PERMANENT, False, status, code, text, error=f"HTTP {status}" + (f" code {code}" if code else "")
    )


def _unreadable(status: int, body: bytes, pause: float | None) -> Verdict:
    """An answer that isn't the API's JSON: a proxy's page, a wrong URL, a success without a result."""
    error = f"HTTP {status}, not the API's JSON answer{_snippet(body)}"
    if status in _TRANSIENT_STATUSES or status >= 500:
        return Verdict(
            Kind.TRANSIENT, status not in _NOT_TAKEN_STATUSES, status, error=error, retry_after=pause
        )
    if status in (401, 403, 404, 405):
        # Every row would get the same: a wrong --base-url (it must end in /v1) or a proxy refusing us.
        why = "check --base-url (the API root, ending in /v1) and any proxy between here and the API"
        return Verdict(Kind.SYSTEMIC, False, status, error=f"{error}; {why}")
    if 400 <= status < 500:
        return Verdict(Kind.PERMANENT, False, status, error=error)  # refused before the API acted on it
    # A 2xx (or 1xx/3xx) we can't read: the server may have acted on it.
    return Verdict(Kind.TRANSIENT, True, status, error=error)


def _classify_result(
    payload: dict[str, Any], status: int, *, user_id: str, partner_id: str, api_key: Secret
) -> Verdict:
    code = str(payload.get("ResultCode", ""))
    text = str(payload.get("ResultText", ""))
    raw_params = payload.get("PartnerParams")
    params: dict[str, Any] = raw_params if isinstance(raw_params, dict) else {}
    signature_ok = verify(payload.get("signature"), payload.get("timestamp"), partner_id, api_key.reveal())
    base = Verdict(
        Kind.PERMANENT, False, status, code, text, str(payload.get("SmileJobID") or ""),
        str(params.get("job_id") or ""), signature_ok=signature_ok,
    )  # fmt: skip
    if not signature_ok:
        error = "the response's signature did not verify; not trusted as an enrollment"
        return replace(base, kind=Kind.UNVERIFIED, in_doubt=True, error=error)
    if params.get("user_id") != user_id:
        error = f"the response names user_id {params.get('user_id')!r}, not the one sent; not trusted"
        return replace(base, kind=Kind.UNVERIFIED, in_doubt=True, error=error)
    if code == "0840":
        return replace(base, kind=Kind.ENROLLED)
    return replace(base, error=f"result {code}: {text}")


def classify_transport(error: TransportError) -> Verdict:
    return Verdict(Kind.TRANSIENT, error.may_have_reached, None, error=error.reason)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None if absent or junk."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return max(0.0, (when - datetime.now(UTC)).total_seconds())
    except (TypeError, ValueError, OverflowError):
        return None  # a date past what datetime can hold (found in review: an absurd zone offset)


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _snippet(body: bytes) -> str:
    text = body[:80].decode("utf-8", "replace").replace("\n", " ").strip()
    return f": {text!r}" if text else ""


@dataclass(frozen=True, slots=True)
class Photo:
    b64: bytes  # ASCII base64, spliced into the request body as it is
    sha256: str


def read_photo(path: Path) -> Photo:
    """The image as the API wants it (plain base64, no data URI) and its hash for the checkpoint."""
    data = path.read_bytes()
    return Photo(base64.b64encode(data), hashlib.sha256(data).hexdigest())


class Client:
    """One keep-alive aiohttp session for the whole run; `send` is one signed attempt."""

    def __init__(
        self,
        base_url: str,
        partner_id: str,
        api_key: Secret,
        *,
        timeout: float,
        connect_timeout: float,
        concurrency: int,
    ) -> None:
        self.url = base_url.rstrip("/") + "/backfill_users"
        self._partner_id = partner_id
        self._api_key = api_key
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout)
        self._concurrency = concurrency
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        # TLS verification stays on (aiohttp's default); there is deliberately no switch to turn it off.
        connector = aiohttp.TCPConnector(limit=self._concurrency, limit_per_host=self._concurrency)
        self._session = aiohttp.ClientSession(
            timeout=self._timeout, connector=connector, headers={"Content-Type": "application/json"}
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    def body(
        self, user_id: str, user_created_at: str, photo_b64: bytes, timestamp: str | None = None
    ) -> bytes:
        """The signed JSON body for one attempt; each attempt gets a fresh timestamp and signature."""
        stamp = timestamp or utc_timestamp()
        document = {
            "partner_id": self._partner_id,
            "timestamp": stamp,
            "signature": sign(stamp, self._partner_id, self._api_key.reveal()),
            "user_id": user_id,
            "user_created_at": user_created_at,
        }
        head = json.dumps(document, separators=(",", ":")).encode()
        # Spliced, not JSON-encoded: base64 never needs escaping, and encoding megabytes of it was the
        # client's biggest cost after the request itself (benchmarks/README.md). Same bytes as json.dumps.
        return b"".join((head[:-1], b',"photo":"', photo_b64, b'"}'))

    async def send(self, user_id: str, user_created_at: str, photo_b64: bytes) -> Verdict:
        body = self.body(user_id, user_created_at, photo_b64)
        try:
            status, answer, retry_after = await self._post(body)
        except TransportError as exc:
            return classify_transport(exc)
        return classify_answer(
            status, answer, retry_after, user_id=user_id, partner_id=self._partner_id, api_key=self._api_key
        )

    async def _post(self, body: bytes) -> tuple[int, bytes, str | None]:
        assert self._session is not None, "use Client as an async context manager"
        try:
            async with self._session.post(self.url, data=body) as response:
                return response.status, await response.read(), response.headers.get("Retry-After")
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            # The connection was never made: the request can't have reached the server.
            raise TransportError(f"can't connect to {self.url}: {exc}", may_have_reached=False) from exc
        except TimeoutError as exc:
            raise TransportError("timed out waiting for the answer", may_have_reached=True) from exc
        except aiohttp.ClientError as exc:
            raise TransportError(f"connection failed: {type(exc).__name__}", may_have_reached=True) from exc

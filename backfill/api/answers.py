"""What one answer from the API means: every HTTP answer or failed exchange, classified into a Verdict."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

from ..redact import Secret
from ..vocab import ALREADY_CODE, Kind
from .signing import verify

__all__ = [
    "ENROLLED_CODE",
    "SHOWN_MAX",
    "Kind",
    "Verdict",
    "classify_answer",
    "classify_cut_off",
    "classify_transport",
    "parse_retry_after",
    "printable",
    "proxy_fix",
    "proxy_refused",
    "unreachable_from_the_start",
    "url_for_messages",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """What one attempt's answer means for its row, and what the answer said."""

    # What to do with the row: done, 2209, give up, try again, can't trust it, or stop the run.
    kind: Kind
    # This attempt may have enrolled the user without our seeing it (answer lost, timed out, reset after
    # sending, a 500/502/504, a 2xx we can't verify). The 2209 rule reads a later 2209 as ours only if set.
    may_have_enrolled: bool
    # A verified answer that the user is not enrolled: a 2xx whose signature verifies, whose PartnerParams
    # echo our user_id, and whose ResultCode is a result other than 0840 (e.g. 0001 "image unusable").
    # The only answer that may release the photo pinned to the ID; unsigned error bodies (2207, 2213...)
    # and 2209 never do.
    proves_not_enrolled: bool
    # The answer's HTTP status; None when no answer arrived.
    http_status: int | None = None
    # The API's ResultCode or error `code`, as the API spells it; "" when the answer had none we could read.
    result_code: str = ""
    # The API's ResultText or error text, bounded and printable.
    result_text: str = ""
    # Smile's job number for a result (SmileJobID), "" if none.
    smile_job_id: str = ""
    # The server-generated PartnerParams.job_id of a result, "" if none.
    job_id: str = ""
    # Whether the response's signature verified; None when the answer carried no result to verify.
    signature_ok: bool | None = None
    # What went wrong, for a person, readable on its own; "" for an enrollment.
    error: str = ""
    # Seconds the server asked us to wait (Retry-After), finite and >= 0; None if it didn't ask.
    retry_after: float | None = None
    # No connection could be made at all (refused, no such host, TLS refused): the request never left.
    unreachable: bool = False

    def __post_init__(self) -> None:
        if self.may_have_enrolled and self.proves_not_enrolled:
            raise ValueError("a Verdict can't both doubt and disprove an enrollment")
        if self.proves_not_enrolled and (self.kind is not Kind.PERMANENT or self.signature_ok is not True):
            raise ValueError("only a verified permanent result proves a user is not enrolled")


ENROLLED_CODE = "0840"
# The API's result codes are four ASCII digits; anything else in a ResultCode can't be read as a result.
_RESULT_CODE = re.compile(r"[0-9]{4}")
_TRANSIENT_CODES = frozenset({"2201", "2301", "2401"})
_SYSTEMIC_CODES = {
    "2205": "not authorized: check SMILE_API_KEY belongs to this environment (sandbox keys only work on "
    "testapi, production keys on api), that partner_id is right, and that this machine's clock is in sync",
    "2405": "not authorized: check the API key, partner_id, environment and this machine's clock",
    "2220": "production is not enabled for this partner: ask Smile ID to enable it, or use --env sandbox",
}
# Codes the API documents as errors. Inside a signed result they still aren't a verdict on the enrollment
# (2207 and 2208 even say the user *is* enrolled), so they never prove the user is not enrolled.
_ERROR_CODES = (
    _TRANSIENT_CODES
    | _SYSTEMIC_CODES.keys()
    | {
        ALREADY_CODE,
        "2203",
        "2204",
        "2207",
        "2208",
        "2211",
        "2213",
        "2413",
    }
)
# Gateway and server errors can arrive after the upstream committed the enrollment; 503 and 429 say the
# request was not taken on.
_IN_DOUBT_STATUSES = frozenset({500, 502, 504})
_NOT_TAKEN_STATUSES = frozenset({408, 429, 503})
_TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# Every row would get the same: a wrong --base-url (it must end in /v1) or a proxy refusing us.
_WRONG_PLACE_STATUSES = frozenset({401, 403, 404, 405})
_CHECK_BASE_URL = "check --base-url (the API root, ending in /v1) and any proxy between here and the API"

# Body-derived text is shown at most this long: enough to recognise a proxy's page, too short to flood a log.
SHOWN_MAX = 80
# Long base64 runs (signatures, an echoed photo; `\/` is JSON's escaped slash) are never shown.
_BASE64_RUN = re.compile(r"(?:[A-Za-z0-9+/]|\\/){40,}={0,2}")
# Control characters (newlines, terminal escapes) and unpaired surrogates, which no UTF-8 file can hold.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]+")
# A real timestamp is 24 characters and a signature 44; longer ones aren't genuine, nor worth hashing.
_STAMP_MAX = 64
# Retry-After is delta-seconds (RFC 9110: digits; we also take a decimal point) or an HTTP date.
_DELTA_SECONDS = re.compile(r"[0-9]{1,12}(?:\.[0-9]{0,9})?")
_RETRY_AFTER_MAX_CHARS = 64


def classify_answer(
    status: int,
    body: bytes,
    retry_after: str | None,
    *,
    user_id: str,
    partner_id: str,
    api_key: Secret,
    url: str = "",
    complete: bool = True,
) -> Verdict:
    """Turn one HTTP answer into a Verdict; the only place that decides what an answer means. Never raises.

    `url` is where the request went (only its scheme, host and path are ever shown); `complete` is False when
    `body` is only the head of an answer too large to read.
    """
    secret = api_key.reveal()
    pause = parse_retry_after(retry_after)
    payload = _json_object(body) if complete else None
    if payload is None:
        return _unreadable(status, body, pause, url, secret, oversized=not complete)
    if 200 <= status < 300 and "ResultCode" in payload:
        return _classify_result(payload, status, user_id=user_id, partner_id=partner_id, secret=secret)
    code = _error_code(payload.get("code"), secret) or _error_code(payload.get("ResultCode"), secret)
    text = _text(payload.get("error"), secret) or _text(payload.get("ResultText"), secret)
    if not code:
        # The API's own error bodies always carry a code; JSON without one came from something else.
        return _unreadable(status, body, pause, url, secret, oversized=False)
    said = f"HTTP {status} code {code}" + (f": {text}" if text else "")
    decided = _by_error_code(code, status, text, pause, said)
    if decided is not None:
        return decided
    if status in _TRANSIENT_STATUSES:
        return _transient(status, code, text, pause, said, may_have_enrolled=status in _IN_DOUBT_STATUSES)
    return Verdict(
        kind=Kind.PERMANENT,
        may_have_enrolled=False,
        proves_not_enrolled=False,
        http_status=status,
        result_code=code,
        result_text=text,
        error=said,
    )


def classify_cut_off(status: int, retry_after: str | None, reason: str, *, url: str = "") -> Verdict:
    """An answer whose status arrived but whose body didn't (cut off, or too slow): try again.

    The status line is the server's own word: a 4xx or a not-taken status says it didn't act on the request.
    """
    where = url_for_messages(url)
    refused = 400 <= status < 500 or status in _NOT_TAKEN_STATUSES
    error = f"HTTP {status}" + (f" from {where}" if where else "") + f", but the answer was cut off: {reason}"
    return Verdict(
        kind=Kind.TRANSIENT,
        may_have_enrolled=not refused,
        proves_not_enrolled=False,
        http_status=status,
        error=printable(error, limit=4 * SHOWN_MAX),
        retry_after=parse_retry_after(retry_after),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class NoAnswer:
    """A request that got no usable HTTP answer. `may_have_reached`: the server may have acted on it."""

    reason: str
    may_have_reached: bool


def classify_transport(error: NoAnswer, *, unreachable: bool = False) -> Verdict:
    """No HTTP answer at all; the request may have reached the server only if the connection was made.

    `unreachable`: no connection could be made (refused, DNS): a blip mid-run, retried like any transport
    failure, unless nothing has answered yet (see `unreachable_from_the_start`).
    """
    return Verdict(
        kind=Kind.TRANSIENT,
        may_have_enrolled=error.may_have_reached and not unreachable,
        proves_not_enrolled=False,
        error=error.reason,
        unreachable=unreachable,
    )


def unreachable_from_the_start(verdict: Verdict) -> Verdict:
    """An `unreachable` verdict before any answer of this run: the URL or the network is wrong, not the row.

    Every row would get the same, so the run stops at once (systemic) rather than trying each row in turn.
    """
    return replace(
        verdict,
        kind=Kind.SYSTEMIC,
        may_have_enrolled=False,
        error=f"{verdict.error}; nothing of this run has reached the API yet: check --base-url / --env (the URL "
        "above), that the API is reachable from this machine (DNS, firewall, VPN), the proxy if it is reached "
        "through one (HTTPS_PROXY, NO_PROXY), and, if the API or a proxy re-signing TLS has a private CA, give "
        "its bundle with --ca-bundle PATH or SSL_CERT_FILE; `backfill check` tests each",
    )


def proxy_refused(status: int, reason: str, through: str, *, tunnel: bool) -> Verdict:
    """The proxy's own refusal (`through` names it): the request never reached the API.

    `tunnel`: it answered CONNECT (an https:// API), so whatever the status, nothing went further. A 5xx there is
    the proxy failing to reach the API, a blip like any "can't connect"; anything else is its policy or our
    credentials, which every row would meet alike: the run stops. Without a tunnel only a 407 is surely the
    proxy's, and only that comes here.
    """
    said = f"HTTP {status}" + (f" {printable(reason, limit=60)}" if reason else "")
    what = "open a tunnel to the API" if tunnel else "forward the request to the API"
    error = f"the proxy refused to {what} ({said}); requests go {through}"
    if tunnel and status >= 500:
        return Verdict(
            kind=Kind.TRANSIENT,
            may_have_enrolled=False,
            proves_not_enrolled=False,
            error=f"{error}: it couldn't reach the API",
            unreachable=True,
        )
    return Verdict(
        kind=Kind.SYSTEMIC,
        may_have_enrolled=False,
        proves_not_enrolled=False,
        error=f"{error}: {proxy_fix(status)}",
    )


def proxy_fix(status: int) -> str:
    """What to do about a proxy that answered `status` instead of passing the request on."""
    if status == 407:
        return (
            "give the proxy's user and password in its URL (http://user:password@proxy.example:3128, with any "
            "@ : / in them percent-encoded)"
        )
    return (
        "ask the proxy's administrators to allow the API's host and port, or set NO_PROXY to the API's host if "
        "it is reachable without the proxy"
    )


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After (delta-seconds or an HTTP date), finite and >= 0; None if junk."""
    if not value or len(value) > _RETRY_AFTER_MAX_CHARS:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        return float(value)
    if not value.isascii():
        return None  # an HTTP date is ASCII; this also keeps surrogates away from the date parser
    try:
        when = parsedate_to_datetime(value)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        wait = (when - datetime.now(UTC)).total_seconds()
    except (TypeError, ValueError, OverflowError, IndexError):
        return None  # not a date, or one past what datetime can hold (an absurd year or zone offset)
    return max(0.0, wait) if math.isfinite(wait) else None


def printable(text: str, *, secret: str = "", limit: int = SHOWN_MAX) -> str:
    """`text` made safe to show: never `secret` or a signature-like run, one line, at most `limit` chars."""
    # The API's own codes, IDs and texts are short and clean: every answer pays for what follows, so skip it.
    short = len(text) < min(limit, 40)
    if short and text.isprintable() and " ".join(text.split()) == text and not (secret and secret in text):
        return text
    # Hidden spans are found in a window long enough to hold any that starts inside what is shown, and marked
    # by position, so neither a cut nor an overlap between a secret and a base64 run can leave part of one.
    window = text[: limit + len(secret) + 64]
    spans = [match.span() for match in _BASE64_RUN.finditer(window)]
    start = window.find(secret) if secret else -1
    while start >= 0:
        spans.append((start, start + len(secret)))
        start = window.find(secret, start + 1)
    if spans:
        hidden = [False] * len(window)
        for begin, end in spans:
            hidden[begin:end] = [True] * (end - begin)
        kept = window[:limit]
        kept = "".join(
            ("***" if i == 0 or not hidden[i - 1] else "") if hidden[i] else char
            for i, char in enumerate(kept)
        )
    else:
        kept = window[:limit]
    shown = " ".join(_UNPRINTABLE.sub(" ", kept).split())  # one line, one space at a time
    if len(text) > limit or len(shown) > limit:
        shown = shown[: limit - 1].rstrip() + "…"
    return shown


def url_for_messages(url: str) -> str:
    """Scheme, host and path of `url`: no credentials, query string or fragment ever reach a message."""
    if not url:
        return ""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "the configured URL"
    host = parts.netloc.rpartition("@")[2]
    shown = f"{parts.scheme}://{host}{parts.path}" if parts.scheme else parts.path
    return printable(shown, limit=2 * SHOWN_MAX)


def _classify_result(
    payload: dict[str, Any], status: int, *, user_id: str, partner_id: str, secret: str
) -> Verdict:
    """A 2xx carrying a ResultCode: trusted only if signed, about our user, and a well-formed code."""
    raw_code = payload.get("ResultCode")
    raw_params = payload.get("PartnerParams")
    params: dict[str, Any] = raw_params if isinstance(raw_params, dict) else {}
    code = raw_code if isinstance(raw_code, str) and _RESULT_CODE.fullmatch(raw_code) else ""
    text = _text(payload.get("ResultText"), secret)
    signature_ok = _verified(payload.get("signature"), payload.get("timestamp"), partner_id, secret)
    smile_job_id = _ident(payload.get("SmileJobID"), secret)
    job_id = _ident(params.get("job_id"), secret)
    echoed = params.get("user_id")
    if signature_ok and echoed == user_id and code == ENROLLED_CODE:
        # The answer nearly every row gets, built without the detours the others take.
        return Verdict(
            kind=Kind.ENROLLED,
            may_have_enrolled=False,
            proves_not_enrolled=False,
            http_status=status,
            result_code=code,
            result_text=text,
            smile_job_id=smile_job_id,
            job_id=job_id,
            signature_ok=True,
        )
    fields: dict[str, Any] = {
        "http_status": status,
        "result_code": code,
        "result_text": text,
        "smile_job_id": smile_job_id,
        "job_id": job_id,
        "signature_ok": signature_ok,
    }
    if not signature_ok:
        why = "the response's signature did not verify; not trusted as an answer"
    elif echoed != user_id:
        named = (
            repr(printable(echoed, secret=secret)) if isinstance(echoed, str) else _describe(echoed, secret)
        )
        why = f"the response names user_id {named}, not the one sent; not trusted"
    elif not code:
        why = f"the response's ResultCode is {_describe(raw_code, secret)}, not a result code; not trusted"
    else:
        said = f"result {code}" + (f": {text}" if text else "")
        decided = _by_error_code(code, status, text, None, said)
        if decided is not None:
            return replace(decided, **fields)
        return Verdict(
            kind=Kind.PERMANENT,
            may_have_enrolled=False,
            proves_not_enrolled=code not in _ERROR_CODES,
            error=said,
            **fields,
        )
    return Verdict(
        kind=Kind.UNVERIFIED, may_have_enrolled=True, proves_not_enrolled=False, error=why, **fields
    )


def _by_error_code(code: str, status: int, text: str, pause: float | None, said: str) -> Verdict | None:
    """The codes whose meaning doesn't depend on the status: systemic, 2209, and system errors."""
    if code in _SYSTEMIC_CODES:
        return Verdict(
            kind=Kind.SYSTEMIC,
            may_have_enrolled=False,
            proves_not_enrolled=False,
            http_status=status,
            result_code=code,
            result_text=text,
            error=f"{said}; {_SYSTEMIC_CODES[code]}",
        )
    if code == ALREADY_CODE:
        # Whose enrollment it is, the classifier can't know: the 2209 rule (`vocab.state_of_2209`) reads the
        # ledger's doubt. This attempt was refused, so it neither may have enrolled the user nor proves it isn't.
        return Verdict(
            kind=Kind.ALREADY,
            may_have_enrolled=False,
            proves_not_enrolled=False,
            http_status=status,
            result_code=code,
            result_text=text,
            error=said,
        )
    if code in _TRANSIENT_CODES:
        # A system error can follow a commit, unless the status itself says the request was refused.
        return _transient(
            status, code, text, pause, said, may_have_enrolled=status not in _NOT_TAKEN_STATUSES
        )
    return None


def _transient(
    status: int, code: str, text: str, pause: float | None, said: str, *, may_have_enrolled: bool
) -> Verdict:
    return Verdict(
        kind=Kind.TRANSIENT,
        may_have_enrolled=may_have_enrolled,
        proves_not_enrolled=False,
        http_status=status,
        result_code=code,
        result_text=text,
        error=said,
        retry_after=pause,
    )


def _unreadable(
    status: int, body: bytes, pause: float | None, url: str, secret: str, *, oversized: bool
) -> Verdict:
    """An answer that isn't the API's JSON: a proxy's page, a wrong URL, a success without a result."""
    where = url_for_messages(url)
    said = f"HTTP {status}" + (f" from {where}" if where else "")
    said += ", an answer too large to read" if oversized else ", not the API's JSON answer"
    snippet = _snippet(body, secret)
    seen = f" (it began: {snippet!r})" if snippet else ""

    def verdict(kind: Kind, may_have_enrolled: bool, error: str, retry_after: float | None = None) -> Verdict:
        return Verdict(
            kind=kind,
            may_have_enrolled=may_have_enrolled,
            proves_not_enrolled=False,
            http_status=status,
            error=error,
            retry_after=retry_after,
        )

    if status in _TRANSIENT_STATUSES or status >= 500:
        return verdict(Kind.TRANSIENT, status not in _NOT_TAKEN_STATUSES, said + seen, pause)
    if status in _WRONG_PLACE_STATUSES:
        return verdict(Kind.SYSTEMIC, False, f"{said}; {_CHECK_BASE_URL}{seen}")
    if 300 <= status < 400:
        # The API never redirects, and redirects aren't followed (that would send the photo elsewhere): every
        # row would get the same. Only 303 ("see other") says the request was acted on.
        moved = f"HTTP {status} from {where}" if where else f"HTTP {status}"
        why = "a redirect, which the API never sends; check --base-url (https://, the API root, ending /v1)"
        error = f"{moved}: {why} and any proxy between here and the API{seen}"
        return verdict(Kind.SYSTEMIC, status == 303, error)
    if 400 <= status < 500:
        return verdict(Kind.PERMANENT, False, said + seen)  # refused before the API acted on it
    # A 2xx (or 1xx) we can't read: the server may have acted on it.
    return verdict(Kind.TRANSIENT, True, said + seen)


def _verified(signature: object, timestamp: object, partner_id: str, secret: str) -> bool:
    # Only a short ASCII pair can be genuine, and checking first keeps verify() off text it can't encode.
    if not isinstance(signature, str) or not isinstance(timestamp, str):
        return False
    if not (signature.isascii() and timestamp.isascii()) or max(len(signature), len(timestamp)) > _STAMP_MAX:
        return False
    return verify(signature, timestamp, partner_id, secret)


class _Duplicate(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # With a key given twice, which one counts depends on the parser: such an answer can't be trusted.
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _Duplicate
    return result


# The standard library's parser, not orjson (measured: ~7 us a success answer faster): orjson keeps the last of
# a duplicated key where this one lets us refuse the answer, and it reads other JSON than this (it refuses NaN,
# 1e400 and lone surrogates, and turns integers past 64 bits into floats), which would change what malformed
# answers mean; keeping both would take a hand-written key count around it, costing most of what it saves.
_decode: Callable[[str], Any] = json.JSONDecoder(object_pairs_hook=_unique_keys).decode


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        text = body.decode()  # what "utf-8-sig" reads, at a fifth of its cost: a leading BOM is dropped below
        value = _decode(text[1:] if text.startswith("\ufeff") else text)
    except (ValueError, RecursionError):  # UnicodeDecodeError and too-long integers are ValueErrors
        return None
    return value if isinstance(value, dict) else None


def _error_code(value: object, secret: str) -> str:
    """An error `code` as text: a string, or an integer (as today's test doubles may send); else none."""
    if isinstance(value, str):
        return printable(value, secret=secret, limit=16)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**6:
        return str(value)
    return ""


def _text(value: object, secret: str) -> str:
    return printable(value, secret=secret) if isinstance(value, str) else ""


def _ident(value: object, secret: str) -> str:
    """A job ID as text: the API sends strings, but a number is as good an ID."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 10**30:
        return str(value)
    return _text(value, secret)


def _describe(value: object, secret: str) -> str:
    """A short, safe description of a JSON value of any type, for messages."""
    if isinstance(value, str):
        return repr(printable(value, secret=secret, limit=16))
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int) and abs(value) < 10**16:
        return f"the number {value}"
    return f"a JSON {type(value).__name__}" if isinstance(value, (list, dict)) else "a number"


def _snippet(body: bytes, secret: str) -> str:
    window = body[: 4 * (SHOWN_MAX + len(secret) + 64)]  # UTF-8 is at most 4 bytes a character
    return printable(window.decode("utf-8", "replace"), secret=secret)

"""Sending one enrollment: the signed body and the HTTP exchange; `answers.py` says what the answer means."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from pybase64 import b64encode

from ..redact import Secret
from ..vocab import Kind
from .answers import (
    NoAnswer,
    Verdict,
    classify_answer,
    classify_cut_off,
    classify_transport,
    printable,
    proxy_refused,
    url_for_messages,
)
from .network import Route
from .signing import sign, utc_timestamp

if TYPE_CHECKING:
    import aiohttp

# aiohttp is imported where a request is made, never with this module: a run that sends nothing (the resume of a
# finished job) would pay ~0.15-0.3 s of start-up for it, building its TLS contexts included (docs/performance.md).

# A JSON string as json.dumps writes one (ASCII, escaped): the body's fields, one at a time.
_dumps: Callable[[str], str] = json.JSONEncoder().encode

# The API's answers are a few KB of JSON. Reading more than this is never needed to classify one, and an
# answer with no end (a misrouted download, a broken proxy, a hostile server) must not fill this process's
# memory, concurrency times over: beyond it the answer is judged by its status alone.
MAX_ANSWER_BYTES = 1024 * 1024


def request_url(base_url: str) -> str:
    """Where every enrollment is POSTed."""
    return base_url.rstrip("/") + "/backfill_users"


class Client:
    """One keep-alive aiohttp session for the whole run; `send_photo` (or `send`) is one signed attempt."""

    def __init__(
        self,
        base_url: str,
        partner_id: str,
        api_key: Secret,
        *,
        timeout: float,
        connect_timeout: float,
        concurrency: int,
        route: Route | None = None,
    ) -> None:
        self.url = request_url(base_url)
        # How requests travel (network.route): None is direct, trusting this machine's CAs.
        self._route = route
        self._proxy = route.proxy.url if route is not None and route.proxy is not None else None
        self._where = url_for_messages(self.url)  # what messages may show: no credentials or query string
        self._partner_id = partner_id
        self._head_start = f'{{"partner_id":{_dumps(partner_id)},"timestamp":'
        self._api_key = api_key
        self._timeout, self._connect_timeout = timeout, connect_timeout
        self._concurrency = concurrency
        self._entered = False
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        self._entered = True  # the session itself is opened by the first request (`_opened`)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._entered = False
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _opened(self) -> aiohttp.ClientSession:
        """The run's one session, opened by its first request: one that sends nothing never imports aiohttp."""
        assert self._entered, "use Client as an async context manager"
        if self._session is None:
            import aiohttp

            # TLS verification stays on (aiohttp's default, or a context trusting ca_bundle's CAs); there is
            # deliberately no switch to turn it off.
            connector = aiohttp.TCPConnector(
                limit=self._concurrency,
                limit_per_host=self._concurrency,
                ssl=self._route.tls if self._route is not None else True,
            )
            # identity: answers are small, and a compressed one could inflate far past what was sent.
            headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
            timeout = aiohttp.ClientTimeout(total=self._timeout, sock_connect=self._connect_timeout)
            self._session = aiohttp.ClientSession(timeout=timeout, connector=connector, headers=headers)
        return self._session

    def body(
        self, user_id: str, user_created_at: str, photo_b64: bytes, timestamp: str | None = None
    ) -> bytes:
        """The signed JSON body for one attempt; each attempt gets a fresh timestamp and signature.

        The bytes `json.dumps` writes for {partner_id, timestamp, signature, user_id, user_created_at, photo}
        with separators (",", ":"), written field by field: the partner's part is encoded once, and the photo
        is spliced, not JSON-encoded (base64 never needs escaping, and encoding megabytes of it was the client's
        biggest cost after the request itself: benchmarks/README.md).
        """
        stamp = timestamp or utc_timestamp()
        signature = sign(stamp, self._partner_id, self._api_key.reveal())
        head = (
            f'{self._head_start}{_dumps(stamp)},"signature":{_dumps(signature)},"user_id":{_dumps(user_id)},'
            f'"user_created_at":{_dumps(user_created_at)},"photo":"'
        )
        return b"".join((head.encode(), photo_b64, b'"}'))

    def photo_body(self, user_id: str, user_created_at: str, photo: bytes) -> bytes:
        """The signed body for the image's raw bytes: what a dry run builds, and what send_photo posts."""
        return self.body(user_id, user_created_at, b64encode(photo))

    async def send_photo(self, user_id: str, user_created_at: str, photo: bytes) -> Verdict:
        """One signed attempt with the image's raw bytes, base64-encoded here once.

        Standard base64, the very bytes the standard library writes, by pybase64's vectorised encoder: 1 us for
        a 20 KB photo where the standard library's takes 23 (of a request's ~300 us of CPU), 0.2 ms for 2 MB
        where it takes 3.5 (docs/performance.md, client overhead).
        """
        return await self.send(user_id, user_created_at, b64encode(photo))

    async def send(self, user_id: str, user_created_at: str, photo_b64: bytes) -> Verdict:
        """One signed attempt with the image already in base64. Always a Verdict, whatever comes back."""
        import aiohttp  # imported by `_opened` already: this names it for the except clauses

        session = self._opened()
        body = self.body(user_id, user_created_at, photo_b64)
        try:
            # Redirects aren't followed: a 307 would re-send the signed body and photo to wherever it points.
            async with session.post(
                self.url, data=body, allow_redirects=False, proxy=self._proxy
            ) as response:
                status, retry_after = response.status, response.headers.get("Retry-After")
                if status == 407:
                    # The proxy's own answer (an http:// API is asked through it): the API never saw the request.
                    return proxy_refused(status, response.reason or "", self._through(), tunnel=False)
                try:
                    answer, complete = await _read_bounded(response)
                except (TimeoutError, aiohttp.ClientError) as exc:
                    return classify_cut_off(status, retry_after, _failure(exc), url=self.url)
        except aiohttp.ClientHttpProxyError as exc:
            # The proxy answered CONNECT with something other than 200: no tunnel, so nothing reached the API.
            return proxy_refused(exc.status, str(exc.message or ""), self._through(), tunnel=True)
        except aiohttp.ClientConnectorError as exc:
            # Refused, no such host, TLS refused: the request never left. The sender decides if that is systemic.
            reason = self._cant_connect(exc)
            return classify_transport(NoAnswer(reason=reason, may_have_reached=False), unreachable=True)
        except aiohttp.ConnectionTimeoutError as exc:
            # The connection was never made: the request can't have reached the server.
            via = f" ({self._through()})" if self._proxy is not None else ""
            reason = f"can't connect to {self._where}{via}: {printable(str(exc), limit=200)}"
            return classify_transport(NoAnswer(reason=reason, may_have_reached=False))
        except TimeoutError:
            reason = "timed out waiting for the answer"
            return classify_transport(NoAnswer(reason=reason, may_have_reached=True))
        except aiohttp.ClientError as exc:
            reason = f"connection failed: {_failure(exc)}"
            return classify_transport(NoAnswer(reason=reason, may_have_reached=True))
        verdict = classify_answer(
            status,
            answer,
            retry_after,
            user_id=user_id,
            partner_id=self._partner_id,
            api_key=self._api_key,
            url=self.url,
            complete=complete,
        )
        if verdict.kind is Kind.SYSTEMIC and self._proxy is not None:
            # A 403 or a wrong-place answer may be the proxy's: say which one stood between.
            return replace(verdict, error=f"{verdict.error} (requests go {self._through()})")
        return verdict

    def _through(self) -> str:
        return self._route.via if self._route is not None else "directly"

    def _cant_connect(self, exc: aiohttp.ClientConnectorError) -> str:
        """Why no connection was made, naming the proxy or the CAs when they are the reason, never credentials."""
        import aiohttp

        why = printable(exc.strerror or type(exc.os_error).__name__, limit=200)
        route = self._route
        proxy = route.proxy if route is not None else None
        # A proxy's name that doesn't resolve fails as a DNS error about its host, not as a proxy error.
        if proxy is not None and (
            isinstance(exc, aiohttp.ClientProxyConnectionError) or exc.host == proxy.host
        ):
            return f"can't connect to {proxy}, through which {self._where} is reached: {why}"
        if isinstance(exc, aiohttp.ClientConnectorCertificateError):
            trusted = route.trusts if route is not None else "this machine's default CAs"
            said = printable(str(getattr(exc.certificate_error, "verify_message", "") or why), limit=200)
            via = f" (reached {route.via})" if route is not None and route.proxy else ""
            return f"the certificate of {self._where}{via} doesn't verify against {trusted}: {said}"
        return f"can't connect to {self._where}: {why}"


async def _read_bounded(response: aiohttp.ClientResponse) -> tuple[bytes, bool]:
    """At most MAX_ANSWER_BYTES of the answer, and whether that was all of it."""
    declared = response.content_length
    if declared is not None and declared > MAX_ANSWER_BYTES:
        head = await response.content.read(4096)  # enough for a message; the rest is never read
        response.close()
        return head, False
    chunks: list[bytes] = []
    size = 0
    while size <= MAX_ANSWER_BYTES:
        chunk = await response.content.read(MAX_ANSWER_BYTES + 1 - size)
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)
        size += len(chunk)
        if size == declared:
            # All the Content-Length said, which aiohttp never reads past: the end, without a read to see it.
            return b"".join(chunks), True
    response.close()  # drop the connection rather than drain an answer that may never end
    return b"".join(chunks)[:MAX_ANSWER_BYTES], False


def _failure(exc: BaseException) -> str:
    """The failure's kind, and for a malformed answer what was wrong; never the URL aiohttp's str() shows."""
    import aiohttp

    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientResponseError) and exc.message:
        return f"{type(exc).__name__}: {printable(str(exc.message), limit=120)}"
    return type(exc).__name__

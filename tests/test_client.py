"""Classification of every kind of answer, in the one place that decides it."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backfill.api.client import Client, Kind, classify_answer, parse_retry_after
from backfill.api.signing import sign
from backfill.config import Secret

KEY = Secret("test-key")


def classify(status: int, body: object, retry_after: str | None = None, user_id: str = "u1"):  # type: ignore[no-untyped-def]
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return classify_answer(status, raw, retry_after, user_id=user_id, partner_id="085", api_key=KEY)


def success(user_id: str = "u1", code: str = "0840", key: str = "test-key") -> dict[str, object]:
    stamp = "2023-02-14T00:07:49.924Z"
    return {
        "ResultCode": code, "ResultText": "Enroll User", "SmileJobID": "0000021007",
        "PartnerParams": {"job_type": 4, "user_id": user_id, "job_id": "j-1"},
        "timestamp": stamp, "signature": sign(stamp, "085", key),
    }  # fmt: skip


def test_verified_success() -> None:
    v = classify(200, success())
    assert (v.kind, v.signature_ok, v.smile_job_id, v.job_id, v.in_doubt) == (
        Kind.ENROLLED, True, "0000021007", "j-1", False,
    )  # fmt: skip


def test_success_with_bad_signature_or_other_user_is_not_trusted() -> None:
    forged = classify(200, success(key="other-key"))
    assert forged.kind is Kind.UNVERIFIED and forged.signature_ok is False and forged.in_doubt
    other = classify(200, success(user_id="someone-else"))
    assert other.kind is Kind.UNVERIFIED and "someone-else" in other.error


def test_other_result_code_is_permanent() -> None:
    v = classify(200, success(code="0001"))
    assert v.kind is Kind.PERMANENT and v.result_code == "0001"


@pytest.mark.parametrize(
    ("status", "code", "kind"),
    [
        (401, "2205", Kind.SYSTEMIC), (400, "2405", Kind.SYSTEMIC), (400, "2220", Kind.SYSTEMIC),
        (400, "2209", Kind.ALREADY), (400, "2203", Kind.PERMANENT), (400, "2204", Kind.PERMANENT),
        (400, "2207", Kind.PERMANENT), (400, "2213", Kind.PERMANENT), (500, "2201", Kind.TRANSIENT),
        (400, "2301", Kind.TRANSIENT), (429, "", Kind.TRANSIENT), (503, "", Kind.TRANSIENT),
        (408, "", Kind.TRANSIENT),
    ],
)  # fmt: skip
def test_error_codes(status: int, code: str, kind: Kind) -> None:
    body = {"code": code, "error": "x"} if code else {"error": "x"}
    assert classify(status, body).kind is kind


def test_429_carries_retry_after_and_is_not_in_doubt() -> None:
    v = classify(429, {"error": "slow down"}, "3")
    assert v.retry_after == 3.0 and not v.in_doubt


def test_gateway_errors_may_have_committed_but_503_did_not() -> None:
    assert classify(502, b"<html>Bad Gateway</html>").in_doubt
    assert classify(504, b"").in_doubt
    assert not classify(503, {"error": "busy"}).in_doubt
    # A refusal status outranks the system-error code it carries (the sandbox's 503s say 2201).
    assert not classify(503, {"code": "2201", "error": "busy"}).in_doubt
    assert classify(500, {"code": "2201", "error": "boom"}).in_doubt


def test_html_page_with_200_is_transient_and_in_doubt() -> None:
    v = classify(200, b"<html>maintenance</html>")
    assert v.kind is Kind.TRANSIENT and v.in_doubt and "not the API's JSON" in v.error


def test_retry_after_forms() -> None:
    assert parse_retry_after("2.5") == 2.5
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


@given(status=st.integers(100, 599), body=st.one_of(st.binary(max_size=200), st.builds(
    lambda d: json.dumps(d).encode(),
    st.dictionaries(st.sampled_from(["code", "error", "ResultCode", "PartnerParams", "signature", "timestamp"]),
                    st.one_of(st.none(), st.integers(), st.text(max_size=10), st.lists(st.integers(), max_size=2))),
)), retry_after=st.one_of(st.none(), st.text(max_size=12)))  # fmt: skip
def test_classification_never_raises(status: int, body: bytes, retry_after: str | None) -> None:
    v = classify_answer(status, body, retry_after, user_id="u1", partner_id="085", api_key=KEY)
    assert isinstance(v.kind, Kind)
    assert v.kind is not Kind.ENROLLED  # nothing random can pass the signature check


async def test_tls_is_verified_an_untrusted_certificate_is_refused_before_sending() -> None:
    """Against HTTPS with a certificate from a CA the machine doesn't trust, nothing is sent or trusted."""
    import ssl

    import trustme
    from aiohttp import web

    from backfill.sandbox import make_app, sandbox_state

    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(server_context)
    app = make_app("085", "k")
    app_runner = web.AppRunner(app)
    await app_runner.setup()
    await web.TCPSite(app_runner, "127.0.0.1", 0, ssl_context=server_context).start()
    port = app_runner.addresses[0][1]
    try:
        client = Client(
            f"https://127.0.0.1:{port}/v1", "085", Secret("k"), timeout=5, connect_timeout=5, concurrency=1
        )
        async with client:
            verdict = await client.send("user_1", "2021-08-12", b"aGVsbG8=")
    finally:
        await app_runner.cleanup()
    assert verdict.kind is Kind.TRANSIENT and not verdict.in_doubt and "certificate" in verdict.error.lower()
    assert sandbox_state(app).total_requests == 0


def test_unreadable_answers_by_status() -> None:
    """Found in review: a plain-text 404 (a --base-url without /v1) was 'in doubt', so a later 2209 read as ours."""
    wrong_url = classify(404, b"404: Not Found")
    assert wrong_url.kind is Kind.SYSTEMIC and not wrong_url.in_doubt and "--base-url" in wrong_url.error
    assert classify(413, b"<html>Request Entity Too Large</html>").kind is Kind.PERMANENT
    assert not classify(413, b"<html>Request Entity Too Large</html>").in_doubt
    no_result = classify(200, {"status": "ok"})  # JSON, but no ResultCode: a success we can't read
    assert no_result.kind is Kind.TRANSIENT and no_result.in_doubt
    throttled = classify(429, b"<html>slow down</html>", "2")
    assert throttled.kind is Kind.TRANSIENT and not throttled.in_doubt and throttled.retry_after == 2.0


def test_retry_after_past_the_calendar_is_ignored() -> None:
    assert parse_retry_after("Mon, 01 Jan 2024 00:00:00 +99999999999999") is None


@given(
    user_id=st.text(min_size=1, max_size=30),
    created=st.text(max_size=30),
    photo=st.binary(max_size=300),
)
def test_spliced_body_is_exactly_what_json_would_write(user_id: str, created: str, photo: bytes) -> None:
    import base64

    client = Client("http://x/v1", "085", KEY, timeout=1, connect_timeout=1, concurrency=1)
    b64 = base64.b64encode(photo)
    body = client.body(user_id, created, b64, timestamp="2023-02-14T00:07:49.924Z")
    document = json.loads(body)
    assert document["photo"] == b64.decode() and document["user_id"] == user_id
    assert body == json.dumps(document, separators=(",", ":")).encode()

"""What every answer the API (or anything posing as it) can send means: api/answers.py's classification."""

from __future__ import annotations

import json
import math
from datetime import UTC
from email.utils import format_datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backfill.api.answers import (
    SHOWN_MAX,
    Kind,
    NoAnswer,
    Verdict,
    classify_answer,
    classify_cut_off,
    classify_transport,
    parse_retry_after,
    printable,
)
from backfill.api.signing import sign
from backfill.redact import Secret

KEY = "test-key-0123456789"
SECRET = Secret(KEY)
STAMP = "2023-02-14T00:07:49.924Z"
URL = "https://testapi.example/v1/backfill_users"


def classify(
    status: int, body: object, retry_after: str | None = None, user_id: str = "u1", url: str = URL
) -> Verdict:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return classify_answer(
        status, raw, retry_after, user_id=user_id, partner_id="085", api_key=SECRET, url=url
    )


def result(
    code: object = "0840", user_id: object = "u1", key: str = KEY, **extra: object
) -> dict[str, object]:
    """A result body, signed with `key` (the right one by default)."""
    body: dict[str, object] = {
        "ResultCode": code,
        "ResultText": "Enroll User",
        "SmileJobID": "0000021007",
        "PartnerParams": {"job_type": 4, "user_id": user_id, "job_id": "j-1"},
        "timestamp": STAMP,
        "signature": sign(STAMP, "085", key),
    }
    body.update(extra)
    return body


def bounded(v: Verdict) -> None:
    """What every Verdict promises about the text it carries."""
    assert isinstance(v.kind, Kind)
    assert not (v.may_have_enrolled and v.proves_not_enrolled)
    for text in (v.result_code, v.result_text, v.smile_job_id, v.job_id):
        assert len(text) <= SHOWN_MAX
        text.encode("utf-8")  # no lone surrogates: it must fit a UTF-8 results file
    assert len(v.error) <= 600 and KEY not in v.error
    v.error.encode("utf-8")
    assert "\n" not in v.error and "\x1b" not in v.error
    assert v.retry_after is None or (math.isfinite(v.retry_after) and v.retry_after >= 0)


# --- successes, and 2xx answers that only look like one -------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 202, 203, 204, 206, 299])
def test_a_verified_0840_is_enrolled_on_any_2xx(status: int) -> None:
    """Bug: only 200 was read as a result; a 201 success was recorded as a permanent failure."""
    v = classify(status, result())
    assert (v.kind, v.may_have_enrolled, v.proves_not_enrolled) == (Kind.ENROLLED, False, False)
    assert (v.signature_ok, v.smile_job_id, v.job_id, v.result_code) == (True, "0000021007", "j-1", "0840")


@pytest.mark.parametrize("status", [200, 201, 202])
@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (result(key="other-key"), Kind.UNVERIFIED),  # forged
        (result(user_id="someone-else"), Kind.UNVERIFIED),
        (result(user_id=None), Kind.UNVERIFIED),
        (result(user_id=["u1"]), Kind.UNVERIFIED),
        (result(PartnerParams=["u1"]), Kind.UNVERIFIED),
        (result(PartnerParams=None), Kind.UNVERIFIED),
        (result(code=840), Kind.UNVERIFIED),  # a number: the leading zero is gone, so is our certainty
        (result(code=840.0), Kind.UNVERIFIED),
        (result(code=None), Kind.UNVERIFIED),
        (result(code=True), Kind.UNVERIFIED),
        (result(code=["0840"]), Kind.UNVERIFIED),
        (result(code={"0840": 1}), Kind.UNVERIFIED),
        (result(code=""), Kind.UNVERIFIED),
        (result(code=" 0840"), Kind.UNVERIFIED),
        (result(code="0840\n"), Kind.UNVERIFIED),
        (result(code="٠٨٤٠"), Kind.UNVERIFIED),  # Arabic-Indic digits: str.isdigit() says yes
        (result(signature=None), Kind.UNVERIFIED),
        (result(signature=12345), Kind.UNVERIFIED),
        (result(timestamp=["x"]), Kind.UNVERIFIED),
        (result(timestamp="2023-02-14T00:07:49.924Zé"), Kind.UNVERIFIED),
        (result(signature="é" * 44), Kind.UNVERIFIED),
        ({"status": "ok"}, Kind.TRANSIENT),  # JSON, but no result
        ({}, Kind.TRANSIENT),
        (b"", Kind.TRANSIENT),
        (b"<html>maintenance</html>", Kind.TRANSIENT),
        (b"[1, 2]", Kind.TRANSIENT),
        (b"\xff\xfe\x00garbage", Kind.TRANSIENT),
        ({"code": ["2209"]}, Kind.TRANSIENT),  # a code that isn't one
        ({"code": None, "error": "x"}, Kind.TRANSIENT),
    ],
)
def test_any_other_2xx_is_in_doubt(status: int, body: object, kind: Kind) -> None:
    """Bug: a 201/202 with a forged or unreadable result was a permanent failure, not in doubt; so was a
    verified ResultCode 840 (a number), which then even looked like proof the user wasn't enrolled."""
    v = classify(status, body)
    assert v.kind is kind and v.may_have_enrolled and not v.proves_not_enrolled, v
    bounded(v)


def test_in_doubt_is_an_alias_of_may_have_enrolled() -> None:
    assert classify(502, b"").may_have_enrolled is True and classify(200, result()).may_have_enrolled is False


def test_wrong_user_id_is_named_but_bounded() -> None:
    assert "someone-else" in classify(200, result(user_id="someone-else")).error
    huge = classify(200, result(user_id="x" * 100_000))
    nested = classify(200, result(user_id=json.loads("[" * 500 + "]" * 500)))
    for v in (huge, nested):
        assert v.kind is Kind.UNVERIFIED and len(v.error) < 200  # was the whole value's repr
    assert "a JSON list" in nested.error


# --- what proves a user is not enrolled -----------------------------------------------------------


def test_only_a_verified_result_proves_not_enrolled() -> None:
    v = classify(200, result(code="0001", ResultText="Selfie image unusable"))
    assert (v.kind, v.proves_not_enrolled, v.may_have_enrolled) == (Kind.PERMANENT, True, False)
    assert v.result_code == "0001" and v.error == "result 0001: Selfie image unusable"
    assert classify(201, result(code="0001")).proves_not_enrolled
    for unproven in (
        classify(200, result(code="0001", key="other-key")),  # forged
        classify(200, result(code="0001", user_id="u2")),  # about someone else
        classify(400, {"code": "2207", "error": "disabled"}),  # error bodies aren't signed
        classify(400, {"code": "2208", "error": "deleted"}),
        classify(400, {"code": "2213", "error": "missing"}),
        classify(400, {"code": "2209", "error": "already enrolled"}),
        classify(400, result(code="0001")),  # a result under an error status
        classify(200, result(code="2207")),  # signed, but an error code (2207 says the user *is* enrolled)
        classify(200, result(code="2209")),
    ):
        assert not unproven.proves_not_enrolled, unproven


def test_2209_is_already_never_proof_and_never_doubt() -> None:
    for v in (classify(400, {"code": "2209", "error": "x"}), classify(200, {"code": "2209"})):
        assert (v.kind, v.may_have_enrolled, v.proves_not_enrolled) == (Kind.ALREADY, False, False)


def test_a_signed_2209_result_is_already_not_a_failure() -> None:
    """Bug: a 200 whose signed ResultCode was 2209 was a permanent failure; it says the ID is taken."""
    v = classify(200, result(code="2209", ResultText="already enrolled"))
    assert (v.kind, v.may_have_enrolled, v.proves_not_enrolled, v.signature_ok) == (
        Kind.ALREADY,
        False,
        False,
        True,
    )
    assert classify(200, result(code="2205")).kind is Kind.SYSTEMIC
    transient = classify(200, result(code="2201"))
    assert transient.kind is Kind.TRANSIENT and transient.may_have_enrolled


def test_a_verdict_cant_doubt_and_disprove_at_once() -> None:
    with pytest.raises(ValueError):
        Verdict(kind=Kind.PERMANENT, may_have_enrolled=True, proves_not_enrolled=True, signature_ok=True)
    with pytest.raises(ValueError):
        Verdict(kind=Kind.TRANSIENT, may_have_enrolled=False, proves_not_enrolled=True, signature_ok=True)
    with pytest.raises(TypeError):
        Verdict(Kind.TRANSIENT, False)  # type: ignore[call-arg]  # keyword-only: bools are easy to swap


# --- the rules kept from before the split ---------------------------------------------------------


SYSTEMIC, ALREADY, PERMANENT, TRANSIENT = Kind.SYSTEMIC, Kind.ALREADY, Kind.PERMANENT, Kind.TRANSIENT


@pytest.mark.parametrize(
    ("status", "code", "kind", "doubt"),
    [
        (401, "2205", SYSTEMIC, False),
        (400, "2405", SYSTEMIC, False),
        (400, "2220", SYSTEMIC, False),
        (400, "2209", ALREADY, False),
        (400, "2203", PERMANENT, False),
        (400, "2204", PERMANENT, False),
        (400, "2207", PERMANENT, False),
        (400, "2213", PERMANENT, False),
        (500, "2201", TRANSIENT, True),
        (400, "2301", TRANSIENT, True),
        (400, "2401", TRANSIENT, True),
        (503, "2201", TRANSIENT, False),
        (429, "2201", TRANSIENT, False),
        (429, "", TRANSIENT, False),
        (503, "", TRANSIENT, False),
        (408, "", TRANSIENT, False),
        (500, "", TRANSIENT, True),
        (502, "", TRANSIENT, True),
        (504, "", TRANSIENT, True),
        (500, "9999", TRANSIENT, True),
        (503, "9999", TRANSIENT, False),
        (400, "9999", PERMANENT, False),
        (400, "", PERMANENT, False),
    ],
)
def test_error_codes_and_statuses(status: int, code: str, kind: Kind, doubt: bool) -> None:
    body = {"code": code, "error": "x"} if code else {"error": "x"}
    v = classify(status, body)
    assert (v.kind, v.may_have_enrolled, v.proves_not_enrolled) == (kind, doubt, False)
    assert v.result_code == code and v.http_status == status


def test_codes_as_numbers_are_read_as_before_but_not_bools() -> None:
    assert classify(401, {"code": 2205}).kind is Kind.SYSTEMIC
    assert classify(400, {"code": 2209}).kind is Kind.ALREADY
    assert classify(400, {"code": True, "error": "x"}).result_code == ""


def test_unreadable_answers_by_status() -> None:
    assert classify(502, b"<html>Bad Gateway</html>").may_have_enrolled
    assert classify(504, b"").may_have_enrolled
    assert not classify(503, {"error": "busy"}).may_have_enrolled
    too_big = classify(413, b"<html>Request Entity Too Large</html>")
    assert too_big.kind is Kind.PERMANENT and not too_big.may_have_enrolled
    throttled = classify(429, b"<html>slow down</html>", "2")
    assert (
        throttled.kind is Kind.TRANSIENT and not throttled.may_have_enrolled and throttled.retry_after == 2.0
    )
    for status in (401, 403, 404, 405):
        v = classify(status, b"Not Found")
        assert v.kind is Kind.SYSTEMIC and not v.may_have_enrolled and "--base-url" in v.error


@pytest.mark.parametrize("status", [401, 403, 404, 405])
def test_codeless_json_from_the_wrong_place_is_systemic(status: int) -> None:
    """Bug: a gateway's JSON 404 ({"error": "not found"}) failed every row one by one instead of stopping."""
    v = classify(status, {"error": "Not Found", "status": status})
    assert v.kind is Kind.SYSTEMIC and "--base-url" in v.error


def test_a_wrong_base_url_reads_well_on_its_own_and_hides_the_query_and_credentials() -> None:
    """Bug: the 404 message had no URL, and the run's stop message read "the API answered : HTTP 404"."""
    v = classify(404, b"404: Not Found", url="https://me:hunter2@api.example/backfill_users?token=abc#frag")
    assert v.error.startswith(
        "HTTP 404 from https://api.example/backfill_users, not the API's JSON answer; check --base-url "
        "(the API root, ending in /v1)"
    ), v.error
    assert "404: Not Found" in v.error
    for leak in ("hunter2", "me:", "token", "abc", "frag"):
        assert leak not in v.error


@pytest.mark.parametrize("status", [300, 301, 302, 304, 307, 308])
def test_redirects_are_systemic(status: int) -> None:
    """Bug: a 3xx (redirects are no longer followed) was 'in doubt', so every row went unknown one by one."""
    v = classify(status, b"")
    assert v.kind is Kind.SYSTEMIC and not v.may_have_enrolled and "https://" in v.error


def test_303_see_other_says_the_request_was_acted_on() -> None:
    assert classify(303, b"").may_have_enrolled


@pytest.mark.parametrize("status", [100, 101, 199, 600, 799, 999])
def test_odd_statuses_are_transient_and_in_doubt(status: int) -> None:
    v = classify(status, b"?")
    assert v.kind is Kind.TRANSIENT and v.may_have_enrolled


def test_cut_off_and_transport_failures() -> None:
    cut = classify_cut_off(200, None, "ClientPayloadError", url=URL)
    assert (cut.kind, cut.may_have_enrolled, cut.http_status) == (Kind.TRANSIENT, True, 200)
    assert "cut off" in cut.error and URL in cut.error
    refused = classify_cut_off(429, "5", "timed out")
    assert not refused.may_have_enrolled and refused.retry_after == 5.0
    assert not classify_cut_off(404, None, "x").may_have_enrolled
    lost = classify_transport(NoAnswer(reason="timed out", may_have_reached=True))
    assert (lost.kind, lost.may_have_enrolled, lost.http_status) == (Kind.TRANSIENT, True, None)
    never = classify_transport(NoAnswer(reason="refused", may_have_reached=False))
    assert not never.may_have_enrolled


# --- malformed, hostile and enormous answers ------------------------------------------------------

DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    "body",
    [
        DEEP,  # Bug: RecursionError escaped json.loads
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        b'{"code": ' + DEEP + b"}",
        b'{"code": "2205", "x": ' + b"9" * 10_000 + b"}",  # past Python's int-to-str digit limit
        b'{"code": NaN, "error": Infinity, "ResultCode": -Infinity}',
        b'{"code": 1e400}',
        b'{"code": 123456789012345678901234567890}',
        b'{"code": {"a": [1, {"b": null}]}, "error": ["x"], "ResultText": {"y": 1}}',
        b'{"error": "\\ud800\\udfff\\ud800 lone surrogates"}',
        b'{"code": "\\ud800"}',
        b"\xc3\x28 not utf-8",
        b"\xef\xbb\xbf" + b'{"code": "2209"}',  # a UTF-8 BOM
        b"\x00" * 1000,
        b"{" * 10 + b"\xff" * 10,
        b"x" * 5_000_000,
    ],
)
@pytest.mark.parametrize("status", [200, 201, 400, 404, 500, 503])
def test_malformed_answers_become_verdicts(status: int, body: bytes) -> None:
    bounded(classify(status, body))


@pytest.mark.parametrize(
    "extra",
    [
        {"timestamp": "\ud800"},  # Bug: sign() raised UnicodeEncodeError on the response's own timestamp
        {"signature": "\ud800", "timestamp": "\udfff"},
        {"timestamp": "t" * 1_000_000},
        {"SmileJobID": json.loads("[" * 900 + "]" * 900)},  # Bug: str() of it was unbounded
        {"SmileJobID": 21007},
        {"ResultText": ["not", "text"]},
        {"ResultText": "x" * 10_000},  # Bug: stored whole in the ledger
        {"PartnerParams": {"user_id": "u1", "job_id": {"deep": [1] * 10_000}}},
    ],
)
def test_hostile_result_fields_become_verdicts(extra: dict[str, object]) -> None:
    v = classify(200, {**result(), **extra})
    bounded(v)
    assert v.kind in (Kind.ENROLLED, Kind.UNVERIFIED)


def test_duplicate_keys_are_not_trusted() -> None:
    """Bug: with "ResultCode" twice, the last one won; another parser (or a proxy) may read the first."""
    good = json.dumps(result())[1:-1]
    raw = ("{" + '"ResultCode": "0001", ' + good + "}").encode()
    v = classify(200, raw)
    assert v.kind is Kind.TRANSIENT and v.may_have_enrolled
    nested = json.dumps(result()).replace('"user_id": "u1"', '"user_id": "u2", "user_id": "u1"').encode()
    assert classify(200, nested).kind is not Kind.ENROLLED


@given(st.permutations(sorted(result(code="0001").items())))
def test_key_order_doesnt_matter(items: list[tuple[str, Any]]) -> None:
    assert classify(200, dict(items)) == classify(200, result(code="0001"))


def test_text_from_the_body_is_bounded_and_never_shows_the_key_or_a_signature() -> None:
    """Bug: an error page echoing the request showed its signature (and the key, if echoed) in the message;
    result_text was stored whole, newlines and terminal escapes included."""
    signature = sign(STAMP, "085", KEY)
    echo = (
        f'<html>bad request {KEY} {{"signature":"{signature}","x":"{signature.replace("/", chr(92) + "/")}"}}'
    )
    for v in (
        classify(400, echo.encode()),
        classify(200, echo.encode()),
        classify(400, {"code": "2204", "error": echo}),
        classify(400, {"code": "2204", "error": f"key {KEY[:5]}" + " " * 70 + KEY}),  # the key at the cut
    ):
        bounded(v)
        assert signature not in v.error and signature not in v.result_text
        assert KEY not in v.result_text and KEY[:8] not in v.error + v.result_text
    long = classify(400, {"code": "2213", "error": "\x1b[31mred\nline " + "y" * 10_000})
    assert (
        len(long.result_text) <= SHOWN_MAX and "\x1b" not in long.result_text and "\n" not in long.result_text
    )


@given(
    before=st.text("ab +/=\n", max_size=200),
    after=st.text("ab +/=\n", max_size=200),
    limit=st.integers(1, 120),
)
def test_printable_never_shows_any_part_of_the_secret(before: str, after: str, limit: int) -> None:
    """Found in review: redacting, then cutting, let a hidden base64 run's shrinking pull the prefix of a
    secret cut off at the window's end into view. No character of this secret occurs in the text around it."""
    secret = "XYZ-789_XYZ-789"
    shown = printable(before + secret + after, secret=secret, limit=limit)
    assert not set(shown) & set(secret) and len(shown) <= max(limit, 3)


def test_printable() -> None:
    assert printable("a\nb\x1b[0m c") == "a b [0m c"
    assert len(printable("word " * 200)) == SHOWN_MAX and printable("word " * 200).endswith("…")
    assert printable("sig " + "A" * 43 + "= end") == "sig *** end"  # a signature's shape is never shown
    assert printable("pre SECRET post", secret="SECRET") == "pre *** post"
    assert printable("a" * 100 + " " * 34 + "XYZ-789", secret="XYZ-789", limit=60) == "***…"


# --- Retry-After ----------------------------------------------------------------------------------


def test_retry_after_forms() -> None:
    assert parse_retry_after("2.5") == 2.5 and parse_retry_after(" 3 ") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert 0 < (parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT") or 0) < 1e12


@pytest.mark.parametrize(
    "value",
    [
        "1e400",
        "inf",
        "Infinity",
        "-inf",
        "nan",
        "NaN",
        "-5",
        "-0.5",
        "1_000",
        "٣",
        "9" * 400,
        "0x10",
        "Mon, 01 Jan 2024 00:00:00 +99999999999999",
        "Wed, 21 Oct 99999 07:28:00 GMT",
        "\ud800",
        "Wed, 21 Oct 2015 07:28:00 \udcff",
        "",
        " ",
        "Wed, 32 Foo 2015",
    ],
)
def test_retry_after_junk_is_none(value: str) -> None:
    """Bug: "1e400" and "inf" gave an infinite wait, "nan" a NaN one; float() also took "1_000" and "٣"."""
    assert parse_retry_after(value) is None


@given(
    st.one_of(
        st.none(),
        st.text(),
        st.from_regex(
            r"\s*[-+]?(inf|nan|infinity|[0-9_]{0,500}(\.[0-9]*)?([eE][-+]?[0-9]{1,4})?)\s*", fullmatch=True
        ),
        st.datetimes(timezones=st.just(UTC)).map(lambda when: format_datetime(when, usegmt=True)),
        st.from_regex(
            r"(Mon|Wed), [0-9]{1,3} (Jan|Oct) [0-9]{1,8} [0-9]{2}:[0-9]{2}:[0-9]{2} [-+][0-9]{1,16}"
        ),
    )
)
def test_retry_after_is_none_or_finite_and_not_negative(value: str | None) -> None:
    wait = parse_retry_after(value)
    assert wait is None or (isinstance(wait, float) and math.isfinite(wait) and wait >= 0)


# --- the properties -------------------------------------------------------------------------------

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(["0840", "0001", "2209", "2205", "2201", "u1", STAMP, KEY, "\ud800", "é" * 44]),
    st.text(st.characters(codec=None), max_size=10),  # lone surrogates too: JSON can spell them
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.one_of(st.text(max_size=8), st.sampled_from(["user_id", "job_id", "code", "ResultCode"])),
            inner,
            max_size=4,
        ),
    ),
    max_leaves=20,
)
FIELDS = st.sampled_from(
    ["code", "error", "ResultCode", "ResultText", "PartnerParams", "SmileJobID", "signature", "timestamp"]
)
OBJECTS = st.dictionaries(st.one_of(FIELDS, st.text(max_size=8)), JSON_VALUES, max_size=8)
BODIES = st.one_of(
    st.binary(max_size=300),
    st.integers(1, 200_000).map(lambda depth: b"[" * depth + b"]" * depth),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    OBJECTS.map(lambda v: json.dumps(v).encode()),
    # A signed result with any field swapped for anything: the signature check is passed, what's next?
    st.builds(
        lambda over: json.dumps({**result(), **over}).encode(),
        st.dictionaries(FIELDS, JSON_VALUES, max_size=3),
    ),
)
HEADERS = st.one_of(st.none(), st.text(max_size=40), st.from_regex(r"[0-9.eE+\-]{1,12}", fullmatch=True))


@settings(max_examples=500)
@given(status=st.integers(100, 999), body=BODIES, retry_after=HEADERS, complete=st.booleans())
def test_classification_never_raises(
    status: int, body: bytes, retry_after: str | None, complete: bool
) -> None:
    v = classify_answer(
        status, body, retry_after, user_id="u1", partner_id="085", api_key=SECRET, url=URL, complete=complete
    )
    assert isinstance(v, Verdict)
    bounded(v)
    if v.kind is Kind.ENROLLED or v.proves_not_enrolled:
        # Only a signed result about our user, read whole, can settle the question either way.
        assert 200 <= status < 300 and complete and v.signature_ok is True
        document = json.loads(body)
        assert document["PartnerParams"]["user_id"] == "u1"
        assert (document["ResultCode"] == "0840") is (v.kind is Kind.ENROLLED)
    if 200 <= status < 300 and v.kind in (Kind.TRANSIENT, Kind.UNVERIFIED):
        assert v.may_have_enrolled


@given(code=JSON_VALUES, user_id=JSON_VALUES, status=st.integers(200, 299))
def test_a_signed_2xx_is_enrolled_exactly_when_it_says_0840_about_us(
    code: Any, user_id: Any, status: int
) -> None:
    v = classify(status, result(code=code, user_id=user_id))
    enrolled = code == "0840" and isinstance(code, str) and user_id == "u1" and isinstance(user_id, str)
    assert (v.kind is Kind.ENROLLED) is enrolled
    if (
        not enrolled
        and not v.proves_not_enrolled
        and v.kind is not Kind.ALREADY
        and v.kind is not Kind.SYSTEMIC
    ):
        assert v.may_have_enrolled

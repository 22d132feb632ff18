"""Signing: the contract's known-answer vectors, and properties that any correct HMAC scheme must have."""

from __future__ import annotations

import re
import sys
import threading
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backfill.api.signing import sign, utc_timestamp, verify

VECTORS = [
    ("2023-03-09T21:35:00.279Z", "partner", "apikey", "+S/hVtmFwynoroXQQbjOQ3/l+a5zshNldrQh/iBdxRQ="),
    ("2023-02-13T15:07:42.214Z", "partner", "apiKey", "XxThLHZy2ij1WINkqNEPgzVs9RvUDHWlebDYzprqS74="),
    ("2023-02-14T00:07:49.924Z", "085", "test-api-key", "Z4Y5zmSTo/OoYxk7zPpWz31JcQzMH4qBqq05BisfvWU="),
    ("2023-02-14T00:07:49.924Z", "85", "test-api-key", "gUQ17MXesSy5b8zEaw7L4n8hjPm0qJKUL2B9Ybv0L/s="),
]


@pytest.mark.parametrize(("timestamp", "partner_id", "api_key", "expected"), VECTORS)
def test_known_answer_vectors(timestamp: str, partner_id: str, api_key: str, expected: str) -> None:
    assert sign(timestamp, partner_id, api_key) == expected
    assert verify(expected, timestamp, partner_id, api_key)


def test_partner_id_is_a_string_not_a_number() -> None:
    assert sign("2023-02-14T00:07:49.924Z", "085", "k") != sign("2023-02-14T00:07:49.924Z", "85", "k")


texts = st.text(min_size=1, max_size=40)


@given(timestamp=texts, partner_id=texts, api_key=texts)
def test_signature_verifies_and_is_standard_base64(timestamp: str, partner_id: str, api_key: str) -> None:
    signature = sign(timestamp, partner_id, api_key)
    assert re.fullmatch(r"[A-Za-z0-9+/]{43}=", signature)
    assert verify(signature, timestamp, partner_id, api_key)


@given(timestamp=texts, other=texts, partner_id=texts, api_key=texts)
def test_any_change_breaks_verification(timestamp: str, other: str, partner_id: str, api_key: str) -> None:
    signature = sign(timestamp, partner_id, api_key)
    if other != timestamp:
        assert not verify(signature, other, partner_id, api_key)
    if other != api_key:
        assert not verify(signature, timestamp, partner_id, other)


@given(junk=st.one_of(st.none(), st.integers(), st.text(max_size=60)))
def test_verify_never_raises_on_junk(junk: object) -> None:
    assert verify(junk, "2023-02-14T00:07:49.924Z", "085", "k") in (True, False)
    assert verify("x", junk, "085", "k") is False


@given(moment=st.datetimes(min_value=datetime(1970, 1, 2), timezones=st.just(UTC)))
def test_timestamp_is_utc_millis_z(moment: datetime) -> None:
    stamp = utc_timestamp(lambda: moment)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp)
    assert datetime.fromisoformat(stamp).replace(microsecond=0) == moment.replace(microsecond=0)


def test_signing_keeps_the_gil() -> None:
    """A signature is a few microseconds under the GIL: letting go of it (as the one-shot hmac.digest does)
    hands the event loop's thread to any other thread that wants it, and the loop waits to get it back.

    Told without timing: with the switch interval far away, a thread made ready to run can only get the GIL
    when this one lets go of it of its own accord; if signing never does, that thread has not run after it.
    """
    ready, ran = threading.Event(), threading.Event()
    interval = sys.getswitchinterval()

    def other() -> None:
        ready.wait()
        ran.set()

    thread = threading.Thread(target=other)
    thread.start()
    sys.setswitchinterval(1000)
    try:
        ready.set()  # the other thread wakes, and waits for the GIL from here on
        for n in range(200):
            sign(f"2023-02-14T00:07:49.{n:03d}Z", "085", "test-api-key")  # each a new one: no cached answer
        let_go = ran.is_set()
    finally:
        sys.setswitchinterval(interval)
        thread.join()
    assert not let_go

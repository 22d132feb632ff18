"""The 2209 rule as one table: whose an "already enrolled" is, after each history of earlier attempts.

Every row runs the real parts the rule passes through: the ledger's transitions (begin, settle) record the
history, `classify_answer` reads the 2209, `final_status` names the row's status, and `transitions.settle`
accepts the state the rule names and refuses the other one. `vocab.state_of_2209` is their one home.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from backfill.api.answers import NoAnswer, Verdict, classify_answer, classify_transport
from backfill.api.signing import sign
from backfill.images import Fingerprint
from backfill.ledger import AttemptRequest, LedgerRow, Outcome, transitions
from backfill.redact import Secret
from backfill.run.status import final_status, ledger_state
from backfill.vocab import State, Status, state_of_2209

KEY, PARTNER, USER = "test-key-0123456789", "085", "u1"
STAMP = "2023-02-14T00:07:49.924Z"
OURS, THEIRS = State.ALREADY_ENROLLED, State.ID_CONFLICT


def answer(status: int, body: dict[str, object]) -> Verdict:
    return classify_answer(
        status, json.dumps(body).encode(), None, user_id=USER, partner_id=PARTNER, api_key=Secret(KEY)
    )


def signed(code: str, signature: str | None = None) -> Verdict:
    return answer(
        200,
        {
            "ResultCode": code,
            "ResultText": "x",
            "PartnerParams": {"user_id": USER, "job_id": "j"},
            "timestamp": STAMP,
            "signature": signature or sign(STAMP, PARTNER, KEY),
        },
    )


def lost(*, reached: bool) -> Verdict:
    return classify_transport(NoAnswer(reason="no answer", may_have_reached=reached))


CRASHED = None  # an attempt recorded, then the process died before its outcome: the row is left SENDING

# (history of earlier attempts' answers, whose the next 2209 is)
TABLE: list[tuple[str, list[Callable[[], Verdict | None]], State]] = [
    ("never sent: someone else holds the ID", [], THEIRS),
    ("timed out waiting for the answer", [lambda: lost(reached=True)], OURS),
    ("connection refused: never left", [lambda: lost(reached=False)], THEIRS),
    ("killed after recording, before the answer", [lambda: CRASHED], OURS),
    ("HTTP 500 (may follow a commit)", [lambda: answer(500, {"code": "2201", "error": "x"})], OURS),
    ("HTTP 502 with no JSON", [lambda: answer(502, {})], OURS),
    ("HTTP 429: not taken on", [lambda: answer(429, {"code": "2201", "error": "x"})], THEIRS),
    ("HTTP 503: not taken on", [lambda: answer(503, {"code": "2201", "error": "x"})], THEIRS),
    ("a 2xx whose signature fails", [lambda: signed("0840", signature="forged")], OURS),
    ("refused: 2213 missing parameter", [lambda: answer(400, {"code": "2213", "error": "x"})], THEIRS),
    (
        "in doubt, then verifiably not enrolled (0001)",
        [lambda: lost(reached=True), lambda: signed("0001")],
        THEIRS,
    ),
    ("verifiably not enrolled, then in doubt", [lambda: signed("0001"), lambda: lost(reached=True)], OURS),
    ("in doubt, then refused: doubt stays", [lambda: lost(reached=True), lambda: answer(429, {})], OURS),
]


def request(n: int) -> AttemptRequest:
    fp = Fingerprint(ref="/p/u1.png", size=10, version="1")
    return AttemptRequest(
        user_id=USER,
        photo_sha256="0" * 64,
        fingerprint=fp,
        user_created_at="2021-08-12",
        run_id="r",
        at=f"2026-12-07T10:00:0{n}.000Z",
    )


def outcome(verdict: Verdict, attempt: int, status: Status) -> Outcome:
    return Outcome(
        user_id=USER,
        attempt=attempt,
        state=ledger_state(status),
        may_have_enrolled=verdict.may_have_enrolled,
        proves_not_enrolled=verdict.proves_not_enrolled,
        http_status=verdict.http_status,
        result_code=verdict.result_code,
        result_text=verdict.result_text,
        smile_job_id=verdict.smile_job_id,
        job_id=verdict.job_id,
        at="2026-12-07T10:00:09.000Z",
    )


def begin(row: LedgerRow | None, n: int) -> tuple[LedgerRow, bool]:
    begun = transitions.begin(row, request(n))
    assert isinstance(begun, tuple)
    row, ticket = begun
    return row, ticket.doubt_before


@pytest.mark.parametrize("history, expected", [pytest.param(h, e, id=name) for name, h, e in TABLE])
@pytest.mark.parametrize(
    "already",
    [lambda: answer(400, {"code": "2209", "error": "already enrolled"}), lambda: signed("2209")],
    ids=["2209 error body", "signed 2209 result"],
)
def test_whose_a_2209_is_after_each_history(
    history: list[Callable[[], Verdict | None]], expected: State, already: Callable[[], Verdict]
) -> None:
    row: LedgerRow | None = None
    for n, earlier in enumerate(history, start=1):
        row, doubt_before = begin(row, n)
        verdict = earlier()
        if verdict is None:
            continue  # never settled: the row stays SENDING
        status = final_status(verdict, doubt_before=doubt_before, stopped=False)
        settled = transitions.settle(row, outcome(verdict, n, status))
        assert settled is not None
        row = settled
    attempt = len(history) + 1
    row, doubt_before = begin(row, attempt)
    verdict = already()

    assert state_of_2209(doubt_before=doubt_before) is expected
    status = final_status(verdict, doubt_before=doubt_before, stopped=False)
    assert status == expected
    done = transitions.settle(row, outcome(verdict, attempt, status))
    assert done is not None and done.state is expected
    # The ledger holds the rule too: the other reading of the same 2209 is refused, whoever asks.
    other = THEIRS if expected is OURS else OURS
    assert transitions.settle(row, outcome(verdict, attempt, Status(other.value))) is None
    # A 2209 neither raises nor lowers the doubt it is read by, and never releases the photo's pin.
    assert not verdict.may_have_enrolled and not verdict.proves_not_enrolled
    assert done.doubt is row.doubt and done.photo_sha256 == row.photo_sha256


def test_the_rule_itself() -> None:
    assert state_of_2209(doubt_before=True) is State.ALREADY_ENROLLED
    assert state_of_2209(doubt_before=False) is State.ID_CONFLICT

"""The retry policy's one decision: whether a row gets another attempt, and how long it waits for it."""

from __future__ import annotations

import csv
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import tenacity
from hypothesis import given, settings
from hypothesis import strategies as st

from backfill import compose
from backfill.api.answers import Verdict
from backfill.config import Settings
from backfill.run.policy import RetryPolicy, is_throttled
from backfill.sandbox import Faults, start_sandbox
from backfill.vocab import Kind

from .conftest import API_KEY, PARTNER_ID, Sleeps, default_retry_policy, simple_rows, write_manifest


def answer(
    kind: Kind = Kind.TRANSIENT, status: int | None = 503, retry_after: float | None = None
) -> Verdict:
    return Verdict(
        kind=kind,
        may_have_enrolled=False,
        proves_not_enrolled=False,
        http_status=status,
        retry_after=retry_after,
    )


THROTTLED = answer(status=429)
BUSY = answer(status=503)
POLICY = RetryPolicy(
    max_attempts=3, backoff_initial=0.5, backoff_max=4.0, retry_after_max=60.0, max_throttled=4
)

# (what came back, attempts so far with it, of them 429s, stopping) -> the wait, or None: no next attempt.
# "backoff" means any wait the full-jitter backoff may draw after that many attempts.
TABLE = [
    pytest.param(BUSY, 1, 0, False, "backoff", id="a 503 is tried again"),
    pytest.param(BUSY, 2, 0, False, "backoff", id="while max_attempts lasts"),
    pytest.param(BUSY, 3, 0, False, None, id="the 3rd 503 of max_attempts=3 ends it"),
    pytest.param(BUSY, 4, 2, False, "backoff", id="429s don't spend max_attempts"),
    pytest.param(BUSY, 6, 3, False, None, id="3 non-429 attempts end it whatever the 429s"),
    pytest.param(THROTTLED, 1, 1, False, "backoff", id="a 429 is tried again"),
    pytest.param(THROTTLED, 3, 3, False, "backoff", id="while max_throttled lasts"),
    pytest.param(THROTTLED, 4, 4, False, None, id="the 4th 429 of max_throttled=4 ends it"),
    pytest.param(THROTTLED, 4, 1, False, "backoff", id="a 429 is tried again after max_attempts others"),
    pytest.param(answer(status=429, retry_after=7), 1, 1, False, 7.0, id="Retry-After is honoured"),
    pytest.param(answer(status=503, retry_after=2.5), 1, 0, False, 2.5, id="on a 503 too"),
    pytest.param(answer(status=429, retry_after=3600), 1, 1, False, 60.0, id="Retry-After is capped"),
    pytest.param(answer(status=429, retry_after=0), 1, 1, False, 0.0, id="Retry-After 0 means at once"),
    pytest.param(answer(status=429, retry_after=7), 4, 4, False, None, id="Retry-After never lifts a budget"),
    pytest.param(BUSY, 1, 0, True, None, id="a stop never waits"),
    pytest.param(answer(status=429, retry_after=7), 1, 1, True, None, id="nor on a Retry-After"),
    pytest.param(answer(Kind.ENROLLED, status=200), 1, 0, False, None, id="an enrollment is final"),
    pytest.param(answer(Kind.PERMANENT, status=400), 1, 0, False, None, id="a permanent answer is final"),
    pytest.param(answer(Kind.SYSTEMIC, status=401), 1, 0, False, None, id="a systemic one stops the run"),
    pytest.param(answer(Kind.ALREADY, status=200), 1, 0, False, None, id="a 2209 is settled"),
    pytest.param(answer(Kind.SYSTEMIC, status=429), 1, 1, False, None, id="only transient 429s retry"),
]


@pytest.mark.parametrize(("verdict", "attempts", "throttled", "stopping", "expected"), TABLE)
def test_the_decision(
    verdict: Verdict, attempts: int, throttled: int, stopping: bool, expected: float | str | None
) -> None:
    wait = POLICY.decide(verdict, attempts=attempts, throttled=throttled, stopping=stopping)
    if expected == "backoff":
        assert wait is not None and 0.0 <= wait <= backoff_bound(POLICY, attempts)
    else:
        assert wait == expected


def backoff_bound(policy: RetryPolicy, attempts: int) -> float:
    """Full jitter: the wait after the n-th attempt is drawn from [0, min(max, initial * 2**(n - 1))]."""
    return min(policy.backoff_max, policy.backoff_initial * 2 ** (attempts - 1))


def test_the_backoff_widens_exponentially_up_to_its_max() -> None:
    policy = RetryPolicy(max_attempts=100, backoff_initial=0.5, backoff_max=30.0)
    for attempts in range(1, 40):
        waits = [policy.decide(BUSY, attempts=attempts) for _ in range(200)]
        bound = backoff_bound(policy, attempts)
        assert all(w is not None and 0.0 <= w <= bound for w in waits)
        assert max(w for w in waits if w is not None) > bound / 2  # drawn over the window, not near its floor


class CountedRetrying:
    """Counts the tenacity retry objects made while it is in place: a per-row one cost ~93 µs a row."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.made = 0
        init = tenacity.BaseRetrying.__init__

        def counting(retrying: tenacity.BaseRetrying, *args: object, **kwargs: object) -> None:
            self.made += 1
            init(retrying, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(tenacity.BaseRetrying, "__init__", counting)


def test_the_backoff_is_built_once_and_no_retry_object_is_made_per_decision(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    counted = CountedRetrying(monkeypatch)
    policy = default_retry_policy()
    backoff = policy.backoff
    for attempts in range(1, 5):
        assert policy.decide(BUSY, attempts=attempts) is not None
        assert policy.decide(THROTTLED, attempts=attempts, throttled=1) is not None
    assert counted.made == 0 and policy.backoff is backoff
    # Settings' values reach the strategy, and a policy copied with other values gets its own.
    defaults = Settings()
    assert (backoff.multiplier, backoff.max) == (defaults.backoff_initial, defaults.backoff_max)
    shorter = dataclasses.replace(policy, backoff_max=2.0)
    assert shorter.backoff.max == 2.0 and policy.backoff.max == 30.0


def test_a_storage_read_spends_max_attempts_with_the_same_backoff() -> None:
    waits = [POLICY.after_storage_failure(n) for n in range(1, 6)]
    assert waits[2:] == [None, None, None]  # max_attempts=3: two waits, then the failure is the answer
    assert all(w is not None and 0.0 <= w <= backoff_bound(POLICY, n) for n, w in enumerate(waits[:2], 1))


KINDS = st.sampled_from([Kind.TRANSIENT, Kind.TRANSIENT, Kind.TRANSIENT, Kind.PERMANENT, Kind.ENROLLED])
VERDICTS = st.builds(
    answer,
    kind=KINDS,
    status=st.sampled_from([429, 429, 503, 500, None]),
    retry_after=st.none() | st.floats(min_value=0.0, max_value=10_000.0),
)


@settings(max_examples=300, deadline=None)
@given(
    answers=st.lists(VERDICTS, min_size=1, max_size=200),
    max_attempts=st.integers(1, 6),
    max_throttled=st.integers(1, 8),
    stop_at=st.none() | st.integers(0, 40),
)
def test_any_sequence_of_answers_ends_within_the_budgets(
    answers: list[Verdict], max_attempts: int, max_throttled: int, stop_at: int | None
) -> None:
    """A row's attempts as the sender makes them, each answer taken from the list (its last one repeated):
    the row always ends, 429s spend only their own budget, every wait is the server's (capped) or the
    backoff's, and once a stop has come nothing more waits."""
    policy = RetryPolicy(
        max_attempts=max_attempts,
        max_throttled=max_throttled,
        backoff_initial=0.5,
        backoff_max=30.0,
        retry_after_max=300.0,
    )
    attempts = throttled = 0
    while True:
        verdict = answers[min(attempts, len(answers) - 1)]
        attempts += 1
        throttled += is_throttled(verdict)
        stopping = stop_at is not None and attempts > stop_at
        wait = policy.decide(verdict, attempts=attempts, throttled=throttled, stopping=stopping)
        assert attempts <= max_attempts + max_throttled
        assert attempts - throttled <= max_attempts and throttled <= max_throttled
        if wait is None:
            break
        assert not stopping and verdict.kind is Kind.TRANSIENT
        if verdict.retry_after is not None:
            assert wait == min(verdict.retry_after, policy.retry_after_max)
        else:
            assert 0.0 <= wait <= backoff_bound(policy, attempts)
    # Why it ended: the answer is final, a stop came, or the budget that answer spends is used up.
    if verdict.kind is Kind.TRANSIENT and not stopping:
        assert throttled == max_throttled if is_throttled(verdict) else attempts - throttled == max_attempts


async def test_a_run_retries_on_the_one_decision_with_no_retry_object_per_row(
    tmp_path: Path,
    make_settings: Callable[..., Settings],
    sleeps: Sleeps,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """503, 429, 503 with max_attempts=2: the 429 spends nothing of the budget, so the row gets a third
    attempt, whose 503 is its second and last; what the ledger and results.csv say agrees with the loop."""
    counted = CountedRetrying(monkeypatch)
    script = {"user_0000": [503, 429, 503]}
    async with await start_sandbox(
        PARTNER_ID, API_KEY, faults=Faults(script=script, retry_after_s=0.01)
    ) as server:
        manifest = write_manifest(tmp_path, simple_rows(2))
        with caplog.at_level(logging.INFO, logger="backfill"):
            summary = await compose.run(make_settings(server, max_attempts=2), manifest, sleep=sleeps)
        assert server.state.requests["user_0000"] == 3
    assert summary.counts == {"enrolled": 1, "retry_exhausted": 1} and counted.made == 0
    with (Path(summary.out_dir) / "results.csv").open(newline="") as handle:
        row = {r["user_id"]: r for r in csv.DictReader(handle)}["user_0000"]
    assert (row["status"], row["attempts"], row["http_status"]) == ("retry_exhausted", "3", "503")
    scheduled = [r.fields for r in caplog.records if getattr(r, "event", "") == "retry_scheduled"]  # type: ignore[attr-defined]
    assert [(f["user_id"], f["attempt"]) for f in scheduled] == [("user_0000", 1), ("user_0000", 2)]
    assert scheduled[1]["wait_s"] == 0.01 and 0.01 in sleeps.calls  # the 429's Retry-After, as asked

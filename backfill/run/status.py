"""The final status of a row from its last answer, and what a row whose attempts aren't over is called."""

from __future__ import annotations

from ..api.answers import Verdict
from ..vocab import Kind, State, Status, state_of_2209


def final_status(verdict: Verdict, *, doubt_before: bool, stopped: bool) -> Status:
    """`doubt_before`: the ledger's word that an earlier attempt of ours may have enrolled this user."""
    doubt_after = doubt_before or verdict.may_have_enrolled
    if verdict.kind is Kind.ENROLLED:
        return Status.ENROLLED
    if verdict.kind is Kind.ALREADY:
        return Status(state_of_2209(doubt_before=doubt_before).value)
    if verdict.kind is Kind.PERMANENT:
        return Status.FAILED
    if verdict.kind is Kind.UNVERIFIED or doubt_after:
        return Status.UNKNOWN
    if verdict.kind is Kind.SYSTEMIC or stopped:
        return unfinished_status(doubt=False)
    return Status.RETRY_EXHAUSTED


def unfinished_status(*, doubt: bool) -> Status:
    """A row whose attempts aren't over (a retry is planned, or a stop cut them short): in doubt (UNKNOWN) when a
    request of ours for it may have reached the server, PENDING only when nothing sent for it can have enrolled
    anyone. The ledger and results.csv say the same, so a crash or a stop mid-backoff never hides doubt."""
    return Status.UNKNOWN if doubt else Status.PENDING


def ledger_state(status: Status) -> State:
    """The ledger state a sent row's status is recorded as (a run-only status never reaches the ledger)."""
    return _LEDGER_STATES[status]


# Looked up once a row rather than converted through the enum's call, which costs several times as much.
_LEDGER_STATES = {s: State(s.value) for s in Status if s.value in {state.value for state in State}}

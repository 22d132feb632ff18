"""The ledger's allowed state changes: the one table every backend applies, as pure functions on rows.

    (new) ──begin──▶ SENDING ──settle(attempt n)──▶ PENDING | FAILED | RETRY_EXHAUSTED | UNKNOWN ──begin──▶ SENDING
                        │                        └▶ ENROLLED | ALREADY_ENROLLED | ID_CONFLICT   (terminal)
                        └─begin (a crashed attempt, never settled: counts as doubt)──▶ SENDING

Rules, each enforced here rather than by callers:
- A terminal row never changes again; `begin` on it is refused.
- `settle` applies only to the row's current attempt while it is SENDING: an outcome arriving late (a lost
  lease, a duplicate) can never overwrite a newer attempt or a settled one.
- The photo pin: the first attempt's SHA-256 is the ID's photo; `begin` with another photo is refused. With
  --normalize it is the source photo's, so bytes an encoder made otherwise (`sent_sha256`) are no reuse. Only an
  outcome that *proves* the user is not enrolled (a verified non-0840 answer) releases it.
- Forgetting (an erasure request) turns a row into a Tombstone: the keyed hash of its ID, its state, doubt and
  dates. A tombstone never changes and `begin` on its ID is refused, whatever the row was: not sending is always
  safe for the promise. A row SENDING is not forgotten: its attempt may be on the wire, and the outcome and
  doubt it will bring are what the promise needs (a retry settles it; then it can be forgotten).
- Doubt is earned: it grows only from attempts that were recorded before leaving and whose answer may hide an
  enrollment; an attempt left SENDING by a crash counts. ALREADY_ENROLLED and ID_CONFLICT must be the state the
  2209 rule (`vocab.state_of_2209`) names for the doubt the row held before the attempt.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

from ..vocab import FINISHED_STATES, TERMINAL_STATES, State, state_of_2209
from . import AttemptRequest, Forgetting, Holder, LedgerRow, Outcome, Refusal, Refused, Ticket, Tombstone
from . import evolve as replace  # dataclasses.replace, faster

# What a settled attempt may leave a row in.
OUTCOME_STATES = frozenset(State) - {State.SENDING}
# States an attempt may begin from (None: an ID the ledger has never seen).
BEGIN_FROM = frozenset(State) - TERMINAL_STATES
# The states the 2209 rule chooses between.
_STATES_OF_2209 = frozenset({State.ALREADY_ENROLLED, State.ID_CONFLICT})


def begin(
    row: LedgerRow | None, request: AttemptRequest, tombstone: Tombstone | None = None
) -> tuple[LedgerRow, Ticket] | Refused:
    """The row after recording `request`, and the ticket to send it; or why it must not be sent.

    `tombstone`: the ID's, when it was forgotten (a forgotten ID has no row).
    """
    fp = request.fingerprint
    if row is None and tombstone is not None:
        return Refused(user_id=request.user_id, why=Refusal.FORGOTTEN, row=gone(request.user_id, tombstone))
    if row is None:
        new = LedgerRow(
            user_id=request.user_id,
            state=State.SENDING,
            attempts=1,
            doubt=False,
            photo_sha256=request.photo_sha256,
            image_ref=fp.ref,
            image_size=fp.size,
            image_version=fp.version,
            user_created_at=request.user_created_at,
            first_attempt_at=request.at,
            last_attempt_at=request.at,
            run_id=request.run_id,
            sent_sha256=request.sent_sha256,
            transform=request.transform,
            photo_sample=fp.sample or None,
        )
        return new, Ticket(user_id=request.user_id, number=1, doubt_before=False)
    if row.state not in BEGIN_FROM:
        return Refused(user_id=row.user_id, why=Refusal.TERMINAL, row=row)
    if row.photo_sha256 is not None and row.photo_sha256 != request.photo_sha256:
        return Refused(user_id=row.user_id, why=Refusal.PHOTO_PINNED, row=row)
    # A row still SENDING was never settled (a crash, a killed process): that attempt may be on the server.
    doubt = row.in_doubt
    number = row.attempts + 1
    new = replace(
        row,
        state=State.SENDING,
        attempts=number,
        doubt=doubt,
        photo_sha256=request.photo_sha256,
        image_ref=fp.ref,
        image_size=fp.size,
        image_version=fp.version,
        user_created_at=request.user_created_at,
        first_attempt_at=row.first_attempt_at or request.at,
        last_attempt_at=request.at,
        run_id=request.run_id,
        sent_sha256=request.sent_sha256,
        transform=request.transform,
        # The pinned photo's, unless this read of it took none (kept), or the pin was released (another photo).
        photo_sample=fp.sample or (row.photo_sample if row.photo_sha256 is not None else None),
    )
    return new, Ticket(user_id=row.user_id, number=number, doubt_before=doubt)


def settle(row: LedgerRow | None, outcome: Outcome) -> LedgerRow | None:
    """The row after `outcome`, or None when it must not be applied (fenced, or a change not allowed)."""
    if row is None or row.state is not State.SENDING or outcome.attempt != row.attempts:
        return None
    if outcome.state not in OUTCOME_STATES:
        return None
    if outcome.state in _STATES_OF_2209 and outcome.state is not state_of_2209(doubt_before=row.doubt):
        return None  # not what the 2209 rule names for the doubt this row holds: no caller overrules it
    if outcome.proves_not_enrolled and outcome.state is State.FAILED:
        doubt, pin = False, None  # the server says, verifiably, that the user is not enrolled
    else:
        doubt, pin = row.doubt or outcome.may_have_enrolled, row.photo_sha256
    return replace(
        row,
        state=outcome.state,
        doubt=doubt,
        photo_sha256=pin,
        photo_sample=row.photo_sample if pin is not None else None,  # it goes with the pin
        http_status=outcome.http_status,
        result_code=outcome.result_code,
        result_text=outcome.result_text,
        smile_job_id=outcome.smile_job_id or row.smile_job_id,
        job_id=outcome.job_id or row.job_id,
        finished_at=outcome.at,
    )


def holder(row: LedgerRow) -> Holder | None:
    """What `row` tells the shared-photo census (`Store.holders`): its ID holds the photo it is pinned to, by
    size and keyed sample; None when it holds none (its pin released) or its photo was never sampled. The SQL
    backends ask the same of their columns: a pin, a size and a sample, all set."""
    if row.photo_sha256 is None or row.image_size is None or row.photo_sample is None:
        return None
    return Holder(user_id=row.user_id, size=row.image_size, sample=row.photo_sample, pin=row.photo_sha256)


def holders_order(holder: Holder) -> tuple[int, int, str]:
    """The order `Store.holders` answers in, a page at a time: the index's own, (size, sample, user_id)."""
    return holder.size, holder.sample, holder.user_id


def must_be_durable(outcome: Outcome) -> bool:
    """Whether `settle` must wait for the disk: when losing the outcome in a crash would overstate doubt.

    A lost outcome leaves its row SENDING, which reads as "may have enrolled". That is the truth for an answer
    that may hide an enrollment, and harmless for a success (a resend's 2209 then reads as ours, rightly). An
    outcome saying the attempt did *not* enroll (a refusal, a 2209 for someone else's ID) must not be lost, or
    a later 2209 for someone else's ID would be called ours.
    """
    return not outcome.may_have_enrolled and outcome.state not in (State.ENROLLED, State.ALREADY_ENROLLED)


def forget(row: LedgerRow, *, user_key: str, at: str, by: str) -> Tombstone | None:
    """The tombstone `row` leaves when forgotten, or None when it must be kept whole (an attempt is in flight)."""
    if row.state is State.SENDING:
        return None
    return Tombstone(
        user_key=user_key,
        state=row.state,
        doubt=row.in_doubt,
        first_attempt_at=row.first_attempt_at,
        finished_at=row.finished_at,
        forgotten_at=at,
        forgotten_by=by,
    )


def forget_all(
    rows: Iterable[LedgerRow],
    user_key: Callable[[str], str],
    *,
    at: str,
    by: str,
    already: int = 0,
    unknown: int = 0,
) -> tuple[list[tuple[str, Tombstone]], Forgetting]:
    """(user_id, tombstone) of each row that may be forgotten (`forget`), and what forgetting them does, with the
    counts the backend found of IDs it holds no row for (`already` a tombstone, `unknown` nothing)."""
    gone: list[tuple[str, Tombstone]] = []
    refused: list[str] = []
    counts: Counter[str] = Counter()
    for row in rows:
        tombstone = forget(row, user_key=user_key(row.user_id), at=at, by=by)
        if tombstone is None:
            refused.append(row.user_id)
            continue
        gone.append((row.user_id, tombstone))
        counts[row.state.value] += 1
    done = Forgetting(
        forgotten=dict(sorted(counts.items())), refused=tuple(refused), already=already, unknown=unknown
    )
    return gone, done


def purged(row: LedgerRow, before: str) -> bool:
    """Whether `backfill purge --before` forgets `row`: finished (FINISHED_STATES) before `before`."""
    return row.state in FINISHED_STATES and row.finished_at is not None and row.finished_at < before


def gone(user_id: str, tombstone: Tombstone) -> LedgerRow:
    """What a refusal shows of a forgotten ID: its state and dates, no personal data (there is none left)."""
    return LedgerRow(
        user_id=user_id,
        state=tombstone.state,
        attempts=0,
        doubt=tombstone.doubt,
        photo_sha256=None,
        image_ref=None,
        image_size=None,
        image_version=None,
        user_created_at=None,
        first_attempt_at=tombstone.first_attempt_at,
        finished_at=tombstone.finished_at,
    )

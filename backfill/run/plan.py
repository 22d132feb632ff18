"""The resume decision: for each candidate row, send it, settle it from the ledger, or reject it, and why.

The ledger is asked first, so a row already done with an unchanged photo costs one stat and no read: resuming
a finished million-row job reads no image. Only rows that may be sent get the full image checks.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from ..images import Fingerprint, ImageError, ImageProblem, ImageSource, Pinned, unchanged
from ..ledger import DoneRow, LedgerRow, Store
from ..manifest import Candidate
from ..vocab import DONE_STATES, Reason, State, Status


@dataclass(frozen=True, slots=True, kw_only=True)
class ToSend:
    """A row to send: its checked photo's fingerprint, and what the ledger knew of it (None: a new ID)."""

    line: int
    user_id: str
    user_created_at: str
    image: str
    fingerprint: Fingerprint
    known: LedgerRow | None


@dataclass(frozen=True, slots=True, kw_only=True)
class NotSent:
    """A row decided without sending: a status (or a reject's reason) and a message saying why."""

    line: int
    user_id: str
    status: Status  # REJECTED with `reason` set, or a status for results.csv
    message: str
    reason: Reason | None = None
    known: LedgerRow | None = None


Decision = ToSend | NotSent

# `Store.done`, or what stands in for it (`DoneOnce`): the done rows among these IDs.
DoneOf = Callable[[list[str]], Awaitable[Mapping[str, DoneRow]]]


class DoneOnce:
    """`Store.done` asked once for a chunk that two stages ask about in turn: the shared-photo rows (is every row
    done, so no census is needed?) and then the planner (which rows to skip). At a resume's million rows the
    second query was a sixth of its CPU.

    The answer is kept for the next ask alone, and given only if that ask names the same IDs, in the same order.
    An answer kept a while is still sound: a done row never leaves its state (only a forget removes it, and the
    planner asks for tombstones afresh, before it uses this), and a row done since is looked up with the rest.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._kept: tuple[list[str], Mapping[str, DoneRow]] | None = None

    async def __call__(self, user_ids: list[str]) -> Mapping[str, DoneRow]:
        kept, self._kept = self._kept, None
        if kept is not None and kept[0] == user_ids:
            return kept[1]
        found = await self._store.done(user_ids)
        self._kept = (user_ids, found)
        return found


class Skipped(NamedTuple):
    """A done row whose photo passed the quick check: settled as skipped from the ledger's brief alone, as the
    sink writes it (`records.SkippedRow`)."""

    user_id: str
    result_code: str
    smile_job_id: str
    job_id: str
    message: str  # NOT_SENT_AGAIN of its state


async def decide_batch(
    candidates: Sequence[Candidate],
    store: Store | None,
    images: ImageSource,
    *,
    resend_failed: bool = False,
    done_of: DoneOf | None = None,
) -> tuple[list[Skipped], list[Decision]]:
    """A chunk's rows: those done with an unchanged photo (one narrow ledger query and one stat each, no
    row object nor fingerprint built: `ImageSource.unchanged_many`), then a decision for every other row, as
    `decide` makes them, in order.

    Why a done row still costs a stat, though it is never sent again whatever its photo: the ledger can't say
    which file the row belongs in. If the manifest now names another photo for the ID (another person given
    a used user_id), that is reported: the row goes to rejects.csv as user_id_reused and the run exits 1,
    instead of to results.csv as skipped. Comparing the manifest's path with the pinned one, with no stat,
    would see only a photo named by another path; exports that name each photo after its user_id (as the
    bundled sample does) keep the path when an ID goes to another person, and only the file's size and mtime
    tell. So the stat can't be dropped, nor deferred past the row's line; it is the cheapest check that
    notices (the quick check, `unchanged`), batched into one thread hop a chunk.
    Listing each folder instead (os.scandir) costs no less on Linux, where an entry's size and mtime take
    an lstat each. Rows the ledger settles alone (an ID conflict) take no stat; new rows take the full check.
    `done_of`: where the done rows are asked for (`store.done` if None; a `DoneOnce` shared with the stage
    that asked before).
    """
    if store is None or not candidates:
        return [], await decide(candidates, {}, images, resend_failed=resend_failed)
    # A forgotten ID is told as such and nothing else is done for it: no stat, no photo read, no lookup.
    gone = await store.forgotten([c.user_id for c in candidates])
    told: list[Decision] = []
    if gone:
        told = [
            NotSent(line=c.line, user_id=c.user_id, status=Status.FORGOTTEN, message=FORGOTTEN_MESSAGE)
            for c in candidates
            if c.user_id in gone
        ]
        candidates = [c for c in candidates if c.user_id not in gone]
        if not candidates:
            return [], told
    skipped, decisions = await _decide_known(
        candidates, store, images, resend_failed=resend_failed, done_of=done_of or store.done
    )
    if told:
        decisions = sorted([*told, *decisions], key=lambda d: d.line)
    return skipped, decisions


FORGOTTEN_MESSAGE = "forgotten on request (backfill forget or purge): this ID is never sent again"


async def _decide_known(
    candidates: Sequence[Candidate],
    store: Store,
    images: ImageSource,
    *,
    resend_failed: bool,
    done_of: DoneOf,
) -> tuple[list[Skipped], list[Decision]]:
    ids = [c.user_id for c in candidates]
    done = await done_of(ids)
    skipped: list[Skipped] = []
    rest: list[Candidate] = []
    if done:
        quick: Sequence[Candidate]
        if len(done) == len(ids):  # every row done (so no ID twice): a finished job's resume, no filtering
            quick, rows = candidates, list(map(done.__getitem__, ids))
        else:
            quick = [c for c in candidates if c.user_id in done]
            rows = [done[c.user_id] for c in quick]
        pinned: list[Pinned] = [r[1:4] for r in rows]  # image_ref, image_size, image_version: one C slice
        same = await images.unchanged_many([c.image for c in quick], pinned)
        make = tuple.__new__  # the NamedTuple built in C, not by its generated __new__
        said = NOT_SENT_AGAIN
        changed: set[str] = set()
        for c, row, kept in zip(quick, rows, same, strict=True):
            if kept:
                skipped.append(
                    make(Skipped, (c.user_id, row.result_code, row.smile_job_id, row.job_id, said[row.state]))
                )
            else:
                changed.add(c.user_id)
        if len(skipped) == len(candidates):
            return skipped, []  # a finished job's resume: every row of the chunk
        rest = [c for c in candidates if c.user_id not in done or c.user_id in changed]
    else:
        rest = list(candidates)
    if not rest:
        return skipped, []
    known = await store.lookup([c.user_id for c in rest])
    return skipped, await decide(rest, known, images, resend_failed=resend_failed)


# The message of a row the ledger holds as done (skipped here, or refused by the ledger at send time), by state.
NOT_SENT_AGAIN = {
    State.ENROLLED: "enrolled earlier (the ledger says so); not sent again",
    State.ALREADY_ENROLLED: "enrolled earlier by an attempt whose answer was lost (the ledger says so); not sent again",
}


async def decide(
    candidates: Sequence[Candidate],
    known: Mapping[str, LedgerRow],
    images: ImageSource,
    *,
    resend_failed: bool = False,
) -> list[Decision]:
    """One decision per candidate, in order. `resend_failed`: `retry --status failed`, send even unchanged."""
    decisions: list[Decision | None] = [None] * len(candidates)
    to_check: list[int] = []
    to_compare: list[int] = []
    for i, c in enumerate(candidates):
        k = known.get(c.user_id)
        if k is None or k.state not in (*DONE_STATES, State.ID_CONFLICT, State.FAILED):
            to_check.append(i)
        elif k.state is State.ID_CONFLICT:
            message = "the ID is held by another user on Smile ID; not sent again. A person must look"
            decisions[i] = NotSent(
                line=c.line, user_id=c.user_id, status=Status.ID_CONFLICT, message=message, known=k
            )
        elif k.state is State.FAILED and resend_failed:
            to_check.append(i)  # named for a resend: the partner fixed what failed
        else:
            to_compare.append(i)  # done or failed: is the manifest's photo still the one sent?

    if to_compare:
        prints = await images.fingerprint_many([candidates[i].image for i in to_compare])
        for i, found in zip(to_compare, prints, strict=True):
            c = candidates[i]
            decision = await _compare(c, known[c.user_id], found, images)
            if decision is None:
                to_check.append(i)
            else:
                decisions[i] = decision
    if to_check:
        to_check.sort()
        checked = await images.check_many([candidates[i].image for i in to_check])
        for i, found in zip(to_check, checked, strict=True):
            c = candidates[i]
            k = known.get(c.user_id)
            if isinstance(found, ImageProblem):
                decisions[i] = NotSent(
                    line=c.line,
                    user_id=c.user_id,
                    status=Status.REJECTED,
                    message=found.message,
                    reason=found.reason,
                    known=k,
                )
            else:
                decisions[i] = ToSend(
                    line=c.line,
                    user_id=c.user_id,
                    user_created_at=c.user_created_at,
                    image=c.image,
                    fingerprint=found,
                    known=k,
                )
    return [d for d in decisions if d is not None]


async def _compare(
    c: Candidate, k: LedgerRow, found: Fingerprint | ImageProblem, images: ImageSource
) -> Decision | None:
    """A done or failed row: settle it if its photo is the one pinned; None to check and send it after all."""
    done = k.state in DONE_STATES
    if isinstance(found, ImageProblem):
        if done:
            # Nothing is sent for an enrolled user, so its photo may be gone: a nightly cron must not fail on it.
            message = f"{NOT_SENT_AGAIN[k.state]} (its photo is no longer usable: {found.reason})"
            return NotSent(line=c.line, user_id=c.user_id, status=Status.SKIPPED, message=message, known=k)
        return NotSent(
            line=c.line,
            user_id=c.user_id,
            status=Status.REJECTED,
            message=found.message,
            reason=found.reason,
            known=k,
        )
    same = unchanged(found, k.image_ref, k.image_size, k.image_version)
    if not same and k.photo_sha256 is None:
        return None  # a verified "not enrolled" released the pin: a fixed photo may be sent for this ID
    if not same:
        # Changed by the quick check: only the bytes can say whether it is another photo.
        try:
            same = (await images.read_source(found)).sha256 == k.photo_sha256
        except ImageError as exc:
            if done:
                message = f"{NOT_SENT_AGAIN[k.state]} ({exc.problem.reason})"
                return NotSent(
                    line=c.line, user_id=c.user_id, status=Status.SKIPPED, message=message, known=k
                )
            return NotSent(
                line=c.line,
                user_id=c.user_id,
                status=Status.REJECTED,
                message=exc.problem.message,
                reason=exc.problem.reason,
                known=k,
            )
    if not same:
        return NotSent(
            line=c.line,
            user_id=c.user_id,
            status=Status.REJECTED,
            reason=Reason.USER_ID_REUSED,
            message=reused_message(c.user_id, k),
            known=k,
        )
    if done:
        return NotSent(
            line=c.line, user_id=c.user_id, status=Status.SKIPPED, message=NOT_SENT_AGAIN[k.state], known=k
        )
    message = f"failed permanently earlier ({k.result_code or 'no code'}); fix the image or use another ID"
    return NotSent(line=c.line, user_id=c.user_id, status=Status.FAILED, message=message, known=k)


SENT_BYTES_DIFFER = (
    " (the bytes about to be sent differ)"  # after reused_message, when the ledger refused the bytes
)


def reused_message(user_id: str, k: LedgerRow) -> str:
    return (
        f"user_id {user_id!r} was already sent with a different photo ({k.image_ref}); an ID is never reused "
        "for another user. Give this user a new user_id, or restore the original image"
    )

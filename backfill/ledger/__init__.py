"""The Store contract: the durable record of every attempt and outcome, keyed by user_id, that resuming trusts.

Every backend (SQLite, the embedded default; PostgreSQL, for fleets) implements `Store`, and one contract suite
(`tests/test_ledger_contract.py`) checks each. What the promise needs is enforced *here*, not by callers:

- transitions: `transitions.py` is the one table of allowed changes; both `begin_attempt` and `settle` go
  through it, so a late or duplicated write can never overwrite a newer state or a terminal one;
- fencing: every attempt has a number, and an outcome is applied only for the attempt it belongs to;
- the photo pin: the SHA-256 of an ID's first attempt is that ID's photo; an attempt with other bytes is
  refused before anything is sent, and only a verified "not enrolled" answer releases the pin;
- earned doubt: an attempt is recorded (durably) immediately before its bytes leave, so only what may really be
  on the wire is ever in doubt; an outcome that lowers doubt is durable before `settle` returns;
- one writer and a binding: a writable SQLite store is held by one run at a time, whatever path named it; a
  PostgreSQL one is shared by a fleet, each row held by one process at a time through `Fleet`'s claims. Either
  belongs to one partner and one API endpoint.
"""

from __future__ import annotations

import operator
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any, NamedTuple, TypeVar

from ..images import Fingerprint, PhotoKey
from ..manifest import Batch
from ..vocab import DONE_STATES, TRANSIENT_STATES, State


@dataclass(frozen=True, slots=True, kw_only=True)
class Binding:
    """Whose ledger this is: one partner on one API endpoint (scheme://host:port), whatever the env label."""

    partner_id: str
    endpoint: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerRow:
    """Everything the ledger holds for one user_id."""

    user_id: str
    state: State
    attempts: int  # attempts begun; the number of the latest one
    # A settled attempt may have enrolled the user without our seeing it (its answer was lost or untrusted).
    # An attempt still SENDING counts too: see `in_doubt`.
    doubt: bool
    photo_sha256: str | None  # the pin: the photo this ID was (or is being) sent from; None when released
    image_ref: str | None  # the photo's fingerprint as last sent: where it really is,
    image_size: int | None  # its size,
    image_version: str | None  # and its store's change marker (mtime_ns, ETag...)
    user_created_at: str | None
    http_status: int | None = None
    result_code: str = ""
    result_text: str = ""
    smile_job_id: str = ""
    job_id: str = ""
    first_attempt_at: str | None = None
    last_attempt_at: str | None = None
    finished_at: str | None = None
    run_id: str | None = None
    # With --normalize, beside the pin (the source photo's): the keyed digest of the bytes the latest attempt
    # sent (None: the photo as read), and what was done to them ("converted from HEIC; ...").
    sent_sha256: str | None = None
    transform: str = ""
    # The pinned photo's `Fingerprint.sample`, keyed (`PhotoKey.sample`): with `image_size`, how a later run's
    # shared-photo census finds IDs sent with a photo like one it may send, without reading theirs (`holders`).
    # None where none was taken (a row sent before schema 5, or a photo that changed after its check).
    photo_sample: int | None = None

    @property
    def in_doubt(self) -> bool:
        """Whether some attempt of ours may have enrolled this user: the 2209 rule reads this."""
        return self.doubt or self.state is State.SENDING

    @property
    def fingerprint(self) -> Fingerprint | None:
        if self.image_ref is None or self.image_size is None or self.image_version is None:
            return None
        return Fingerprint(ref=self.image_ref, size=self.image_size, version=self.image_version)


class DoneRow(NamedTuple):
    """What a resume reads of a done row first: enough to settle it as skipped when its photo is unchanged."""

    state: State  # one of DONE_STATES
    image_ref: str | None  # the fingerprint of the photo it was sent with
    image_size: int | None
    image_version: str | None
    result_code: str
    smile_job_id: str  # what results.csv says of a skipped row, as of the attempt that enrolled it
    job_id: str


_FIELDS = tuple(f.name for f in fields(LedgerRow))
_FIELD_AT = {name: i for i, name in enumerate(_FIELDS)}
_GET_ALL = operator.attrgetter(*_FIELDS)
_SET_SLOT = tuple(getattr(LedgerRow, name).__set__ for name in _FIELDS)


def row_values(row: LedgerRow) -> list[Any]:
    """Every field of `row`, in declaration order."""
    return list(_GET_ALL(row))


def row_of(values: Sequence[Any]) -> LedgerRow:
    """A LedgerRow from every field's value in declaration order, already of the right types.

    The slots are set directly: `LedgerRow(**dict(zip(...)))` cost ~6.5 us (a dict, 18 keyword arguments, a
    frozen __setattr__ each), this ~2.5 us, for the same frozen object. A resume builds one per manifest row.
    """
    row: LedgerRow = object.__new__(LedgerRow)
    for set_slot, value in zip(_SET_SLOT, values, strict=True):
        set_slot(row, value)
    return row


def evolve(row: LedgerRow, **changes: Any) -> LedgerRow:
    """dataclasses.replace(row, **changes) at half its cost (no __init__ round trip); same checks of names."""
    values = list(_GET_ALL(row))
    for name, value in changes.items():
        values[_FIELD_AT[name]] = value  # KeyError for a field that doesn't exist, as replace's TypeError
    return row_of(values)


HOLDERS_PAGE = 10_000  # rows `Store.holders` answers at most at a time


class Holder(NamedTuple):
    """An ID the ledger pins to a photo of some size and keyed sample (`Store.holders`), and that pin."""

    user_id: str
    size: int
    sample: int  # keyed: `PhotoKey.sample`
    pin: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptRequest:
    """An attempt about to leave: recorded durably, after its rate slot is taken and its photo read."""

    user_id: str
    photo_sha256: str  # of the photo as read (with --normalize, its source: the pin follows the user's photo)
    fingerprint: Fingerprint  # of the photo those bytes were read from
    user_created_at: str
    run_id: str
    at: str
    # With --normalize: the keyed digest of the bytes sent (None: the photo as read) and what was done to them.
    sent_sha256: str | None = None
    transform: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Ticket:
    """Leave to send one attempt: its number fences the outcome; `doubt_before` feeds the 2209 rule."""

    user_id: str
    number: int
    doubt_before: bool  # an earlier attempt of ours may have enrolled the user


class Refusal(StrEnum):
    """Why the ledger refused to begin an attempt: nothing may be sent."""

    PHOTO_PINNED = "photo_pinned"  # the ID is pinned to other bytes: sending these would reuse the ID
    TERMINAL = "terminal"  # the ID is enrolled (by us or someone else): it is never sent again
    CLAIM_LOST = "claim_lost"  # a fleet's row whose claim this process no longer holds: another one sends it
    # Another live process has an attempt of this ID on the wire now (an overlapping manifest, a retry): this
    # one must not send it at the same time. The claim goes back to the queue, to be taken again shortly.
    SENT_ELSEWHERE = "sent_elsewhere"
    FORGOTTEN = "forgotten"  # the ID was forgotten on request (`backfill forget`): never sent again


@dataclass(frozen=True, slots=True, kw_only=True)
class Refused:
    user_id: str
    why: Refusal
    row: LedgerRow  # what the ledger holds, for the message


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """What one attempt ended in; `state` is the row's state after it (PENDING when it will be tried again)."""

    user_id: str
    attempt: int  # the Ticket's number: an outcome for any other attempt is not applied
    state: State
    may_have_enrolled: bool  # this attempt may have enrolled the user unseen (answer lost or untrusted)
    proves_not_enrolled: bool  # a verified answer that the user is not enrolled: releases the photo pin
    http_status: int | None
    result_code: str
    result_text: str
    smile_job_id: str
    job_id: str
    at: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Tombstone:
    """All a ledger keeps of a forgotten user: enough to keep the promise, nothing that says who it was.

    `user_key` is the keyed hash `log_user_ids: hashed` names the user by (`PhotoKey.user`), so `backfill
    find-user ID` finds it, and no one without the ledger's secret can tell which ID it is.
    """

    user_key: str
    state: State  # the row's state when it was forgotten
    doubt: bool  # whether an attempt of ours may have enrolled it: the ID is never sent again either way
    first_attempt_at: str | None
    finished_at: str | None
    forgotten_at: str
    forgotten_by: (
        str  # the run_id of the `forget` or `purge` that made it, in the runs table (the audit trail)
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Forgetting:
    """What a `forget` or `purge` did (or, a dry run, would do)."""

    forgotten: dict[str, int]  # rows forgotten, by the state they were in
    refused: tuple[str, ...] = ()  # named IDs with an attempt in flight (SENDING): kept whole, not forgotten
    already: int = 0  # named IDs forgotten before: nothing more to remove
    unknown: int = 0  # named IDs the ledger never held: nothing to remove (no tombstone is made for them)

    @property
    def count(self) -> int:
        return sum(self.forgotten.values())


class Settled(StrEnum):
    APPLIED = "applied"  # on disk
    QUEUED = "queued"  # will be on disk with the next commit; losing it in a crash loses no promise
    FENCED = "fenced"  # not applied: the attempt is not the row's current one, or the change isn't allowed


@dataclass(frozen=True, slots=True, kw_only=True)
class RunRecord:
    run_id: str
    started_at: str
    manifest: str
    manifest_sha256: str | None = None
    pid: int | None = None
    host: str | None = None
    finished_at: str | None = None
    rows: int | None = None
    exit_code: int | None = None
    # What the run says about itself for `status`, e.g. that its workers, not the rate, are the limit.
    note: str | None = None
    # The audit trail: who ran it (BACKFILL_OPERATOR, else the OS user), with which version of the tool and
    # which API key (signing.key_id: checkable against a key, revealing nothing of it).
    operator: str | None = None
    version: str | None = None
    api_key_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Audit:
    """Who ran a run, from where, with what: recorded in the ledger's runs and in summary.json."""

    operator: str
    host: str
    version: str
    api_key_id: str
    partner_id: str
    endpoint: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerStatus:
    """What `backfill status` shows: counts per state, recent runs, and what is left to do."""

    location: str
    binding: Binding
    counts: dict[str, int]
    waiting_for_retry: int
    oldest_unfinished: LedgerRow | None
    runs: list[RunRecord]
    # Whether a live process holds the writer's lock now: a run not finished while this is False has died.
    writer_alive: bool = False
    # A shared ledger's fleet: the processes alive now, and the one rate they share (None: not a fleet's).
    processes: list[Process] = field(default_factory=list)
    fleet_rate: float | None = None
    fleet_ceiling: float | None = None
    queues: list[QueueState] = field(default_factory=list)  # the manifests loaded last, newest first
    forgotten: int = 0  # users forgotten on request: tombstones, in no state's count


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueState:
    """How far a fleet is through one manifest: rows never attempted are counted here, not in the states."""

    manifest_sha256: str
    path: str
    rows: int
    finished: int
    claimed: int  # held by a live claim now
    loaded_at: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Process:
    """One live process of a fleet, as `status` shows it."""

    run_id: str
    host: str
    pid: int
    started_at: str
    claimed: int  # rows it holds claims on now
    heartbeat_age_s: float  # since it last renewed its claims


@dataclass(frozen=True, slots=True, kw_only=True)
class RateState:
    """The fleet's one rate limit, as the ledger keeps it; times are the database server's, in epoch seconds.

    `run/rate.py` owns what these mean (a GCRA with AIMD); the ledger only keeps them, changed atomically.
    """

    ceiling: float
    rate: float
    tat: float  # the theoretical arrival time of the next slot
    paused_until: float  # a Retry-After every process waits out
    generation: int  # bumped by each decrease: a 429 to an older slot doesn't lower the rate again
    grown_at: float  # when the rate last grew (or dropped)


T = TypeVar("T")
RateChange = Callable[[RateState | None, float], tuple[RateState, T]]


class Fleet(ABC):
    """What a ledger shared by many processes adds to Store: it is their work queue and their rate limit.

    A manifest is loaded once; then every process claims rows in batches. A claim carries a lease its owner
    renews while it lives; `begin_attempt` on a claimed row is refused unless this process still holds the
    claim (so a process that lost its lease can't start an attempt another process may be making), and the
    attempt number fences every outcome. A dead process's claims expire and are claimed again: those whose
    attempt was recorded are SENDING, so in doubt, and go through the 2209 rule; those never begun sent
    nothing and are not in doubt.
    """

    lease_s: float

    @abstractmethod
    async def load(self, manifest_sha256: str, path: str, rows: AsyncIterator[Batch]) -> bool:
        """Load the manifest's rows into the queue once: True if this process loaded it.

        Every row is queued, the ones its text rules rejected too: a reject is claimed and written to rejects.csv
        like any other row, so a loader killed before its outputs were written loses no row.

        False when it was loaded already (`rows` is then never read). A manifest every row of which is done
        starts a new pass, as a re-run on SQLite does: done rows are skipped again, transient ones retried.
        """

    @abstractmethod
    async def claim(self, manifest_sha256: str, n: int) -> Batch:
        """Up to `n` rows of the manifest that no live process holds, claimed by this one, in line order."""

    @abstractmethod
    async def unfinished(self, manifest_sha256: str) -> int:
        """Rows of the manifest not yet finished by any process (claimed or not)."""

    @abstractmethod
    async def finish(self, manifest_sha256: str, lines: Sequence[int]) -> None:
        """These claimed rows are finished (in this run's results or rejects): not claimed again, unless this run
        dies before its outputs are written (see `outputs_written`)."""

    @abstractmethod
    async def outputs_written(self) -> None:
        """This run's results.csv and rejects.csv are on disk: the rows it finished are told for good.

        Until then a finished row counts as finished only while this run lives: if it dies first, its finished
        rows are claimed again by another process (and skipped, when the ledger holds them done), so that every
        row ends in some output that exists.
        """

    @abstractmethod
    async def give_back(self, manifest_sha256: str, lines: Sequence[int]) -> None:
        """Give these claimed rows back unfinished (another process tells them now): claimable again at once."""

    @abstractmethod
    async def release(self) -> None:
        """Give back every claim this process holds on unfinished rows (a clean stop): others take them now."""

    @abstractmethod
    async def change_rate(self, change: RateChange[T]) -> T:
        """Apply `change(current, server_now)` to the shared rate atomically; what it returns beside the state."""


class Store(ABC):
    """A ledger backend. Writable stores are opened by one run at a time; readers never write."""

    binding: Binding
    location: str  # for messages: a path, or a URL without its password
    # The ledger's secret, made with it and kept in it: every photo_sha256 it holds is `photo_key.pin` of a
    # photo's SHA-256, never the plain digest (see PhotoKey). Lose it and no pin can be checked again.
    photo_key: PhotoKey

    @abstractmethod
    async def lookup(self, user_ids: Sequence[str]) -> dict[str, LedgerRow]:
        """The rows the ledger holds for these IDs (absent IDs are simply missing)."""

    async def done(self, user_ids: Sequence[str]) -> dict[str, DoneRow]:
        """For those of these IDs the ledger holds as done (DONE_STATES): their quick-check facts.

        A resume settles most rows from this alone, so a backend should answer it without building whole rows;
        this default derives it from `lookup`.
        """
        rows = await self.lookup(user_ids)
        return {
            uid: DoneRow(
                r.state, r.image_ref, r.image_size, r.image_version, r.result_code, r.smile_job_id, r.job_id
            )
            for uid, r in rows.items()
            if r.state in DONE_STATES
        }

    @abstractmethod
    async def holders(
        self, photos: Sequence[tuple[int, int]], after: Holder | None = None, limit: int = HOLDERS_PAGE
    ) -> list[Holder]:
        """The IDs the ledger pins to a photo of one of these (size, keyed sample) pairs, whichever manifest
        named them: what the shared-photo census asks so that photos sent earlier count too. A released pin
        holds nothing, nor does a forgotten ID (it has no row); nor a row sent before samples were kept.

        At most `limit` of them, in (size, sample, user_id) order, from the one after `after`: a photo may be
        pinned to a million IDs, and the caller holds one page at a time."""

    @abstractmethod
    async def keep_samples(self, samples: Sequence[tuple[str, str, int]]) -> None:
        """Keep each (user_id, pin, keyed sample)'s sample where its row still holds that pin and no sample yet:
        for rows sent before the ledger kept samples (`backfill sample-photos`), durably once it returns."""

    @abstractmethod
    async def begin_attempt(self, request: AttemptRequest) -> Ticket | Refused:
        """Record an attempt, durably, before its bytes leave; or refuse it (pinned to other bytes, terminal)."""

    @abstractmethod
    async def settle(self, outcome: Outcome) -> Settled:
        """Apply an attempt's outcome if it is the row's current attempt and the change is allowed.

        Waits until the outcome is on disk when losing it would overstate doubt (see transitions.py).
        """

    @abstractmethod
    async def flush(self) -> None:
        """Wait until every write so far is on disk."""

    @abstractmethod
    async def start_run(self, record: RunRecord) -> None: ...

    @abstractmethod
    async def finish_run(self, run_id: str, *, finished_at: str, rows: int, exit_code: int) -> None: ...

    @abstractmethod
    async def note_run(self, run_id: str, note: str | None) -> None:
        """Set (or clear, None) the run's note; nobody waits for it to be on disk."""

    @abstractmethod
    async def status(self, *, last_runs: int = 10) -> LedgerStatus: ...

    @abstractmethod
    def rows(self, states: Collection[State] | None = None) -> AsyncIterator[LedgerRow]:
        """Every row (or those in `states`), in user_id order, streamed."""

    @abstractmethod
    async def close(self) -> None:
        """Flush, release the writer's hold, and close."""

    @abstractmethod
    async def forgotten(self, user_ids: Sequence[str]) -> dict[str, Tombstone]:
        """The tombstones of those of these IDs that were forgotten, by the ID given."""

    @abstractmethod
    async def forget(self, user_ids: Sequence[str], *, at: str, by: str, dry_run: bool = False) -> Forgetting:
        """Remove these users' personal data, leaving a tombstone each (`transitions.forget` decides), durably.

        A row SENDING is refused (kept whole): an attempt of it may be on the wire now, and its outcome and doubt
        are facts the promise needs. Every byte removed is gone from the backend's files, not only unlinked.
        """

    @abstractmethod
    async def purge(self, before: str, *, at: str, by: str, dry_run: bool = False) -> Forgetting:
        """`forget` every row in FINISHED_STATES whose last attempt finished before `before` (ISO 8601)."""


__all__ = [
    "HOLDERS_PAGE",
    "TRANSIENT_STATES",
    "AttemptRequest",
    "Binding",
    "DoneRow",
    "Fleet",
    "Forgetting",
    "Holder",
    "LedgerRow",
    "LedgerStatus",
    "Outcome",
    "Process",
    "QueueState",
    "RateChange",
    "RateState",
    "Refusal",
    "Refused",
    "RunRecord",
    "Settled",
    "Store",
    "Ticket",
    "Tombstone",
]

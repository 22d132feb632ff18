"""Sending one row: its attempts, each taking a rate slot, reading the photo, being recorded, then posted."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..api.answers import NoAnswer, Verdict, classify_transport, unreachable_from_the_start
from ..api.client import Client
from ..clock import now_iso
from ..images import ImageError, ImageSource
from ..ledger import AttemptRequest, Outcome, Refusal, Refused, Settled, Store, Ticket
from ..vocab import Kind, Reason, State, Status
from .crash import Boundary, CrashPoints
from .observe import NO_OBSERVER, Observer
from .plan import FORGOTTEN_MESSAGE, NOT_SENT_AGAIN, SENT_BYTES_DIFFER, ToSend, reused_message
from .policy import RetryPolicy, is_throttled
from .rate import Gate
from .status import final_status, ledger_state, unfinished_status
from .stops import Stops
from .workers import Workers

log = logging.getLogger("backfill")
T = TypeVar("T")


@dataclass(slots=True, kw_only=True)
class RowEnd:
    """How one row ended: a status (REJECTED with a reason when nothing could be sent) and its last answer."""

    status: Status
    verdict: Verdict | None = None
    attempts: int = 0  # made in this run
    first_ever: bool = False  # this run made the ID's very first attempt
    latency_ms: int | None = None
    normalized: str = ""  # what --normalize did to the photo the last attempt sent
    reason: Reason | None = None
    message: str = ""
    # A fleet's row that another process holds now (its claim passed, or it is sending the ID itself): that
    # process tells it; this one writes nothing for it.
    elsewhere: bool = False
    # A stop came before the row's next attempt: whatever its status says, its attempts are not over.
    cut_short: bool = False
    # Without a verdict (the ledger refused the attempt as done): what the ledger knows of the row.
    result_code: str = ""
    smile_job_id: str = ""
    job_id: str = ""


@dataclass(slots=True)
class _Row:
    send: ToSend
    attempts: int = 0
    throttled: int = 0  # of `attempts`, those answered 429: they don't spend the row's retry budget
    first_ever: bool = False
    latency_ms: int | None = None
    last: RowEnd | None = None  # set when an attempt ended the row without an answer to return
    # A request of ours for this ID may have reached the server (this run's or an earlier one's, as the ledger
    # said at the last attempt): a stop before the next attempt leaves the row in doubt, not merely pending.
    doubt: bool = False
    verdict: Verdict | None = None  # the last attempt's answer: a row a stop ends still tells it
    normalized: str = ""  # what --normalize did to the photo the last attempt sent


class _Ended(Exception):
    """An attempt that ended its row before anything was sent (a pinned photo, an unreadable image, a stop)."""


class Sender:
    """Everything one row's sending needs, injected; `send` is the whole of a row's attempts."""

    def __init__(
        self,
        *,
        store: Store,
        images: ImageSource,
        client: Client,
        gate: Gate,
        policy: RetryPolicy,
        crash: CrashPoints,
        run_id: str,
        stops: Stops,
        on_systemic: Callable[[Verdict], None],
        event: Callable[..., None],
        observer: Observer = NO_OBSERVER,
        fleet: bool = False,
        workers: Workers | None = None,
    ) -> None:
        self._store, self._images, self._client, self._gate = store, images, client, gate
        self._fleet = fleet  # the ledger is shared: a fenced outcome means another process owns the row now
        self._policy, self._crash, self._run_id = policy, crash, run_id
        self._stops, self._on_systemic, self._event = stops, on_systemic, event
        self._observer = observer
        self._workers = workers if workers is not None else Workers()
        self.attempts = 0  # in this run, every row
        self.in_flight = 0  # requests sent whose answer hasn't come: what a stop still waits for
        # Workers in a step that may be cut off (a photo being read, a request on the wire), and those cut off:
        # a stop's wait for answers is bounded (`abandon`). A ledger write is never cut off half-way.
        self._cuttable: set[asyncio.Task[Any]] = set()
        self._cut: set[asyncio.Task[Any]] = set()
        self._abandoned: str | None = None  # why the requests on the wire were cut off, once they were
        # Some request of this run got an HTTP answer: from then on "can't connect" is a blip, retried.
        self.connected = False

    def _stopping(self) -> bool:
        return self._stops.stopping

    def abandon(self, reason: str) -> int:
        """Stop waiting for answers (a stop's time is up): every request on the wire is cut off and its row left
        in doubt, since the ledger holds its attempt as sent; photos being read are dropped, their rows unsent.
        Returns how many requests were cut off."""
        self._abandoned = reason
        for task in self._cuttable:
            self._cut.add(task)
            task.cancel()
        return self.in_flight

    async def _unless_cut(self, step: Awaitable[T]) -> T | None:
        """`step`'s result, or None when `abandon` cut it off."""
        task = asyncio.current_task()
        assert task is not None
        self._cuttable.add(task)
        try:
            result = await step
        except asyncio.CancelledError:
            if not self._was_cut(task):
                raise
            return None
        finally:
            self._cuttable.discard(task)
        # Cut off as it ended, the cancellation swallowed inside it (a timeout made of it): the cut still holds.
        return None if self._was_cut(task) else result

    def _was_cut(self, task: asyncio.Task[Any]) -> bool:
        """Whether `abandon` cut `task` off; if so its cancellation is taken back, unless its caller's came too."""
        if task not in self._cut:
            return False
        self._cut.discard(task)
        return task.uncancel() == 0

    async def send(self, row: ToSend) -> RowEnd | None:
        """The row's end, or None when a stop came before its first attempt left (it was not reached).

        A plain loop: each attempt returns the policy's one decision, its answer and the wait before the next
        attempt (the attempt was settled in the ledger as still unfinished), or None (the row ended, `work.last`).
        """
        work = _Row(row)
        try:
            while (again := await self._attempt(work)) is not None:
                verdict, wait = again
                if self._stopping():
                    # Settled as "to be tried again", then a stop came before the retry.
                    return self._stopped(work, verdict)
                self._retrying(work, verdict, wait)
                await self._stops.nap(wait)  # a stop wakes it: the next attempt then ends the row, unsent
        except _Ended:
            pass
        return work.last

    async def _attempt(self, work: _Row) -> tuple[Verdict, float] | None:
        # The rate slot first, then the photo, then the record: a row that waits holds nothing in doubt.
        generation = await self._gate.wait_turn(self._stops)
        if self._stopping():
            work.last = self._not_sent(work)
            raise _Ended
        # Busy from the slot to the outcome: the time a worker holds a row that the rate doesn't account for.
        self._workers.started()
        try:
            return await self._granted(work, generation)
        finally:
            self._workers.ended()

    async def _granted(self, work: _Row, generation: int) -> tuple[Verdict, float] | None:
        """One attempt once its rate slot is granted: photo, record, POST, outcome; then its answer and the
        wait before the next attempt, or None when there is none."""
        row = work.send
        try:
            photo = await self._unless_cut(self._images.read(row.fingerprint))
        except ImageError as exc:
            work.last = self._reject(work, exc.problem.reason, f"at send time: {exc.problem.message}")
            raise _Ended from None
        if photo is None or self._stopping():
            # A stop came while the photo was read: no request starts after a stop.
            work.last = self._not_sent(work)
            raise _Ended
        self._crash.reached(Boundary.WAITING)
        ticket = await self._store.begin_attempt(
            AttemptRequest(
                user_id=row.user_id,
                photo_sha256=photo.sha256,
                sent_sha256=photo.sent_sha256,
                transform=photo.note,
                fingerprint=photo.fingerprint,
                user_created_at=row.user_created_at,
                run_id=self._run_id,
                at=now_iso(),
            )
        )
        if isinstance(ticket, Refused):
            work.last = self._refused(work, ticket)
            raise _Ended
        self._crash.reached(Boundary.AFTER_ATTEMPT)
        if self._stopping():
            # A stop came while the attempt was being recorded: no request starts after a stop.
            work.last = await self._withdraw(work, ticket)
            raise _Ended
        work.attempts += 1
        work.normalized = photo.note
        work.first_ever = work.first_ever or ticket.number == 1
        self.attempts += 1
        self._crash.reached(Boundary.IN_FLIGHT)
        sent_at = time.perf_counter()
        self.in_flight += 1
        try:
            answer = await self._unless_cut(
                self._client.send_photo(row.user_id, row.user_created_at, photo.data)
            )
        finally:
            self.in_flight -= 1
        # Cut off by a stop whose time was up: the request may have reached the server, so the row is in doubt.
        verdict = answer if answer is not None else self._cut_off()
        took = time.perf_counter() - sent_at
        work.latency_ms = round(took * 1000)
        work.doubt, work.verdict = ticket.doubt_before or verdict.may_have_enrolled, verdict
        del photo
        if verdict.unreachable and not self.connected:
            # Refused or no such host before anything answered: a wrong URL or network, not this row.
            verdict = unreachable_from_the_start(verdict)
        elif verdict.http_status is not None:
            self.connected = True
        self._observer.attempt(verdict.kind, took)
        if is_throttled(verdict):
            work.throttled += 1
            self._observer.throttled()
            self._slow_down(verdict, generation)
        elif verdict.http_status is not None:
            self._gate.answered()
        if verdict.kind is Kind.SYSTEMIC:
            self._on_systemic(verdict)
        # The one retry decision: it chooses both the state recorded below and whether `send` loops.
        wait = self._policy.decide(
            verdict, attempts=work.attempts, throttled=work.throttled, stopping=self._stopping()
        )
        status = (
            unfinished_status(doubt=work.doubt)
            if wait is not None
            else final_status(verdict, doubt_before=ticket.doubt_before, stopped=self._stopping())
        )
        self._crash.reached(Boundary.BEFORE_OUTCOME)
        settled = await self._store.settle(
            Outcome(
                user_id=row.user_id,
                attempt=ticket.number,
                state=ledger_state(status),
                may_have_enrolled=verdict.may_have_enrolled,
                proves_not_enrolled=verdict.proves_not_enrolled,
                http_status=verdict.http_status,
                result_code=verdict.result_code,
                result_text=verdict.result_text,
                smile_job_id=verdict.smile_job_id,
                job_id=verdict.job_id,
                at=now_iso(),
            )
        )
        if settled is Settled.FENCED:
            self._event(
                logging.WARNING,
                "outcome_fenced",
                f"{row.user_id}: the ledger refused attempt {ticket.number}'s outcome {status}",
                user_id=row.user_id,
                attempt=ticket.number,
                status=status,
            )
            if self._fleet:
                # A newer attempt by another process superseded this one: its verdict, not ours, is the row's.
                work.last = self._elsewhere(work)
                raise _Ended
        if wait is None:
            work.last = RowEnd(
                status=status,
                verdict=verdict,
                attempts=work.attempts,
                first_ever=work.first_ever,
                latency_ms=work.latency_ms,
                normalized=work.normalized,
                cut_short=answer is None,  # a fleet's other processes may settle it now
            )
            return None
        return verdict, wait

    def _slow_down(self, verdict: Verdict, generation: int) -> None:
        """A 429: the shared rate drops (once per generation), and everyone pauses for its Retry-After."""
        lowered = self._gate.throttled(generation)
        paused = self._gate.pause(verdict.retry_after) if verdict.retry_after is not None else None
        if lowered is None and paused is None:
            return
        rate, ceiling = self._gate.rate, self._gate.ceiling
        said = f"the API asked us to slow down (429): {rate:.3g} requests/s now (--rate {ceiling:g})"
        if paused is not None:
            said += f"; all requests pause for {paused:g}s"
        self._event(
            logging.WARNING, "rate_lowered", said, pause_s=paused, rate=round(rate, 3), http_status=429
        )

    def _cut_off(self) -> Verdict:
        """A request `abandon` cut off: no answer, and it may have reached the server."""
        return classify_transport(NoAnswer(reason=self._abandoned or "abandoned", may_have_reached=True))

    async def _withdraw(self, work: _Row, ticket: Ticket) -> RowEnd | None:
        """An attempt recorded but never sent: settled unfinished with no new doubt, so that the ledger never
        holds as maybe sent a request that never left (a 2209 later is someone else's unless earlier doubt says)."""
        status = unfinished_status(doubt=ticket.doubt_before)
        await self._store.settle(
            Outcome(
                user_id=work.send.user_id,
                attempt=ticket.number,
                state=ledger_state(status),
                may_have_enrolled=False,
                proves_not_enrolled=False,
                http_status=None,
                result_code="",
                result_text="",
                smile_job_id="",
                job_id="",
                at=now_iso(),
            )
        )
        return self._not_sent(work)

    def _not_sent(self, work: _Row) -> RowEnd | None:
        """A stop before this attempt left: nothing more of the row goes; it stays as the ledger has it."""
        if work.attempts == 0:
            return None
        return work.last or self._stopped(work, work.verdict)

    def _stopped(self, work: _Row, verdict: Verdict | None) -> RowEnd:
        """A row whose retry a stop cancelled: in doubt if an attempt of ours may have enrolled it, else pending."""
        status = unfinished_status(doubt=work.doubt)
        said = "stopped before the next attempt"
        if status is Status.UNKNOWN:
            said += "; an earlier request may have reached the server: a re-run settles it"
        return RowEnd(
            status=status,
            verdict=verdict,
            attempts=work.attempts,
            first_ever=work.first_ever,
            latency_ms=work.latency_ms,
            normalized=work.normalized,
            message=said,
            cut_short=True,
        )

    def _reject(self, work: _Row, reason: Reason, message: str) -> RowEnd:
        """Nothing can be sent now: the row goes to rejects.csv with the reason, whatever went out before it."""
        return RowEnd(
            status=Status.REJECTED,
            reason=reason,
            message=message,
            attempts=work.attempts,
            first_ever=work.first_ever,
        )

    def _elsewhere(self, work: _Row) -> RowEnd:
        return RowEnd(
            status=Status.PENDING, attempts=work.attempts, first_ever=work.first_ever, elsewhere=True
        )

    def _refused(self, work: _Row, refused: Refused) -> RowEnd | None:
        if refused.why in (Refusal.CLAIM_LOST, Refusal.SENT_ELSEWHERE):
            # Its lease ended (this process stalled, or lost the database for longer), or another live process
            # is sending the ID right now: the row is another process's to tell. Nothing was sent for it here.
            said = (
                "its claim passed to another process"
                if refused.why is Refusal.CLAIM_LOST
                else "another process is sending this ID now; given back to the queue"
            )
            self._event(
                logging.WARNING,
                str(refused.why),
                f"{refused.user_id}: {said}; not sent from here",
                user_id=refused.user_id,
            )
            return self._elsewhere(work)
        if refused.why is Refusal.PHOTO_PINNED:
            message = reused_message(refused.user_id, refused.row) + SENT_BYTES_DIFFER
            return self._reject(work, Reason.USER_ID_REUSED, message)
        if refused.why is Refusal.FORGOTTEN:  # forgotten since the plan looked
            return RowEnd(
                status=Status.FORGOTTEN,
                attempts=work.attempts,
                first_ever=work.first_ever,
                message=FORGOTTEN_MESSAGE,
            )
        # The ledger holds the ID as done (another run finished it meanwhile): said as a skip in the plan is.
        k = refused.row
        if k.state is State.ID_CONFLICT:
            status, message = Status.ID_CONFLICT, "held by someone else (id_conflict in the ledger); not sent"
        else:
            status, message = Status.SKIPPED, NOT_SENT_AGAIN[k.state]
        return RowEnd(
            status=status,
            attempts=work.attempts,
            first_ever=work.first_ever,
            message=message,
            result_code=k.result_code,
            smile_job_id=k.smile_job_id,
            job_id=k.job_id,
        )

    def _retrying(self, work: _Row, verdict: Verdict, wait: float) -> None:
        self._observer.retry(retry_reason(verdict))
        self._event(
            logging.INFO,
            "retry_scheduled",
            f"{work.send.user_id}: attempt {work.attempts} got {describe(verdict)}; retrying in {wait:.2f}s",
            user_id=work.send.user_id,
            attempt=work.attempts,
            wait_s=round(wait, 3),
            reason=describe(verdict),
        )


def retry_reason(verdict: Verdict) -> str:
    """A retry's cause as a metric label: few distinct values (a code, an HTTP status), never free text."""
    if verdict.result_code:
        # The API's codes are short and digits; anything else a broken server sent is one label, not many.
        code = verdict.result_code
        return code if code.isdigit() and len(code) <= 6 else "other"
    return f"http_{verdict.http_status}" if verdict.http_status else "no_answer"


def describe(verdict: Verdict) -> str:
    if verdict.result_code:
        return f"{verdict.result_code} {verdict.result_text or verdict.error}".strip()
    if verdict.http_status:
        return f"HTTP {verdict.http_status}"
    return verdict.error or "no answer"

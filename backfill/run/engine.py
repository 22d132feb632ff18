"""The run itself: candidates from the manifest, decided against the ledger, sent by a pool of workers.

    manifest ─▶ plan (ledger first) ─▶ queue ─▶ workers: rate slot ─▶ photo ─▶ attempt recorded ─▶ POST ─▶ settle
        │             │                                                                              │
        └ rejects ────┴──────────────────────────── sink (results.csv / rejects.csv) ◀────────────────┘

Every collaborator is built by `backfill/compose.py` and handed in: one process's or a fleet's row source, rate
gate and sink; the sender, or a dry run's stand-in; the crash points of the crash suite. The engine runs what it
is given and never asks which variant it is. It never prints and never writes a file itself: it tells the sink
about every row, the progress object about every status, and logs events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from ..api.answers import Verdict
from ..clock import now_iso
from ..errors import BackfillError, InternalError
from ..images import ImageSource
from ..ledger import Audit, RunRecord, Store
from ..manifest import Batch, Manifest
from ..vocab import FINE_STATUSES, ExitCode, Status
from . import plan
from .events import Events
from .observe import NO_OBSERVER, Observer
from .rate import Gate
from .records import RejectRow, ResultRow, Sink, Summary
from .rows import Rows
from .send import RowEnd, describe
from .stats import Tally, exit_code
from .stops import Leaving, Stops
from .workers import Workers, note, workers_are_the_limit

Sleep = Callable[[float], Awaitable[None]]
# Told what a second signal leaves behind, just before the process exits: the caller's to show.
OnLeave = Callable[[Leaving], None]


class Progress(Protocol):
    """What the engine tells whoever shows progress; the library itself never prints.

    Optional: a `rate(current: float) -> None` method is told the adaptive rate limit each time it changes, and
    a `limited(note: str | None) -> None` method is told when the workers become (a note naming the setting to
    raise) or stop being (None) what holds the run back.
    """

    def start(self, total: int | None) -> None: ...  # None: not known (a fleet's process)
    def advance(self, status: str, n: int = 1) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class RunOptions:
    """What the engine reads of the run's settings; compose.py fills it in."""

    concurrency: int  # workers: rows on the wire at once, at most
    status_every: float  # seconds between one-line status events
    max_duration: float | None  # seconds: the run stops cleanly (exit 0) once this long
    stop_timeout: float  # seconds a stop waits for answers in flight before abandoning them, in doubt
    limit: int | None  # rows queued to send, at most
    fail_threshold: float  # share of the last rows failing that stops the run as systemic
    resend_failed: bool = False  # `retry --status failed`: send even unchanged photos again
    log_rows: bool = False  # an event for every row, not only for the ones that went wrong
    # What the run is, for its log and summary.json: said, never decided on.
    audit: Audit | None = None  # who ran it, from where, with what (recorded in the ledger's runs too)
    env: str
    base_url: str
    dry_run: bool = False
    settings: dict[str, object]  # redacted


class Sending(Protocol):
    """A row's attempts: the `Sender`, or a dry run's stand-in (run/dryrun.py) that sends nothing."""

    attempts: int  # in this run, every row
    in_flight: int  # sent, not yet answered

    async def send(self, row: plan.ToSend) -> RowEnd | None: ...

    def abandon(self, reason: str) -> int:
        """Stop waiting: every request on the wire is cut off, its row in doubt (`reason` says why); how many."""
        ...


class Journal(Protocol):
    """The ledger's record of runs (a `Store` is one); a dry run keeps none (`UNRECORDED`)."""

    async def start_run(self, record: RunRecord) -> None: ...
    async def finish_run(self, run_id: str, *, finished_at: str, rows: int, exit_code: int) -> None: ...
    async def note_run(self, run_id: str, note: str | None) -> None: ...


class Unrecorded:
    """A dry run's journal: it tells the ledger nothing."""

    async def start_run(self, record: RunRecord) -> None:
        pass

    async def finish_run(self, run_id: str, *, finished_at: str, rows: int, exit_code: int) -> None:
        pass

    async def note_run(self, run_id: str, note: str | None) -> None:
        pass


UNRECORDED = Unrecorded()


@dataclass(frozen=True, slots=True, kw_only=True)
class Collaborators:
    """What one run is made of; `compose.py` builds every one of them, for one process or a fleet's, real or dry.

    The engine only runs them: it never looks at which variant it was given.
    """

    manifest: Manifest  # what the run reads, for its log and summary
    rows: Rows  # where rows come from: the manifest, or a fleet's claims
    store: Store | None  # what resume decisions are looked up in; None: a dry run with no ledger yet
    images: ImageSource
    sending: Sending  # a row's attempts, or a dry run's stand-in
    gate: Gate  # the rate limit, this process's own or a fleet's share
    journal: Journal  # the ledger's runs table, or nothing for a dry run
    sink: Sink  # results.csv and rejects.csv (telling a fleet's claims too)
    stops: Stops
    workers: Workers
    events: Events
    run_id: str
    out_dir: str
    observer: Observer = NO_OBSERVER  # metrics, when --metrics-addr is set
    done_of: plan.DoneOf | None = None  # where the planner asks for done rows, if not `store.done` itself


class Engine:
    def __init__(
        self, options: RunOptions, parts: Collaborators, *, progress: Progress | None = None
    ) -> None:
        self.options = options
        self.parts = parts
        self.progress = progress
        self._stops = parts.stops
        self._event = parts.events
        self._limit_note = ""
        self._fatal: BackfillError | None = None
        self._tally = Tally()
        self._shown_rate = parts.gate.rate  # the adaptive rate the progress bar last showed
        self._limited: str | None = None  # the note the progress object was last told
        self._noted: str | None = None  # the note the ledger's runs table holds for this run
        self._queue: asyncio.Queue[plan.ToSend | None] | None = None
        self._in_hand: set[str] = set()  # rows a worker holds: being sent, or about to be
        self._abandon_at: float | None = None  # on the loop's clock: when a stop stops waiting for answers

    # --- stopping ---

    @property
    def stopping(self) -> bool:
        return self._stops.stopping

    def stop(self, reason: str, code: int) -> None:
        self._stops.stop(reason, code)

    def interrupt(self, signum: int) -> None:
        self._stops.interrupt(signum)

    @property
    def in_flight(self) -> int:
        """Requests on the wire now (sent, not yet answered): what a stop waits for, up to `stop_wait`."""
        return self.parts.sending.in_flight

    @property
    def stop_wait(self) -> float:
        """Seconds a stop made now still waits for answers in flight: --stop-timeout, or what is left of it."""
        if self._abandon_at is None:
            return self.options.stop_timeout
        return max(0.0, self._abandon_at - asyncio.get_running_loop().time())

    def _fail(self, error: BackfillError) -> None:
        """A local failure (disk full, ledger unwritable): stop cleanly, then raise it once the run ends."""
        if self._fatal is None:
            self._fatal = error
        self.stop(str(error), error.exit_code)

    # --- what the run tells while it runs ---

    async def _status_every(self, total: int) -> None:
        """A one-line status now and then, for logs where no progress bar is shown (cron, CI, files)."""
        o, gate = self.options, self.parts.gate
        while True:
            await asyncio.sleep(o.status_every)
            t = self._tally
            elapsed = t.elapsed()
            rate = t.done / elapsed if elapsed > 0 else 0.0
            allowed = gate.rate
            window = self.parts.workers.window()
            # A fleet's rate is shared by every process, so one process's unused share says nothing of its
            # workers: told only where the rate is this process's own.
            limited = not gate.shared and workers_are_the_limit(
                window, concurrency=o.concurrency, rate=allowed
            )
            said = note(window, concurrency=o.concurrency, rate=allowed) if limited else None
            # A fleet's process handles a share of the manifest, whose size is not its own total.
            known = self.parts.rows.total is not None
            done = f"{t.done}/{total} rows" if known else f"{t.done} rows (of a fleet's {total})"
            doubt = t.counts[
                Status.UNKNOWN
            ]  # may be enrolled: told apart from the failures, never hidden in them
            self._event(
                logging.INFO,
                "progress",
                f"{done}, {rate:.1f} rows/s, {t.failures - doubt} failed, {doubt} in doubt, rate limit "
                f"{allowed:.3g}/s" + (f"; {said}" if said else ""),
                done=t.done,
                total=total,
                rows_per_s=round(rate, 1),
                failed=t.failures - doubt,
                in_doubt=doubt,
                effective_rate=round(allowed, 3),
                workers_busy=round(window.busy, 2),
                limited_by="workers" if limited else None,
            )
            self._tell_limited(said)
            await self._note_run(said)

    def _tell_limited(self, said: str | None) -> None:
        show = getattr(self.progress, "limited", None)  # optional, as `rate` is
        if show is not None and said != self._limited:
            self._limited = said
            show(said)

    async def _note_run(self, said: str | None) -> None:
        """Keep the run's note in the ledger, for `backfill status` while it runs and after it ends.

        Cleared only while rows wait for a worker: idle workers at the run's end (or while the next chunk is
        planned) say nothing about whether more of them would have helped.
        """
        waiting = self._queue is not None and self._queue.qsize() > 0
        if said == self._noted or (said is None and not waiting):
            return
        try:
            await self.parts.journal.note_run(self.parts.run_id, said)
        except BackfillError as error:
            # A ledger that fails fails the sends too, which stop the run and say so; a note is not worth more.
            self._event(logging.DEBUG, "run_note_unsaid", f"the run's note isn't recorded: {error}")
            return
        self._noted = said

    # --- the run ---

    async def run(self) -> Summary:
        parts = self.parts
        started = now_iso()
        ticker: asyncio.Task[None] | None = None
        bound: asyncio.Task[None] | None = None
        deadline: asyncio.TimerHandle | None = None
        try:
            await parts.journal.start_run(
                RunRecord(
                    run_id=parts.run_id,
                    started_at=started,
                    manifest=parts.manifest.name,
                    manifest_sha256=parts.manifest.sha256,
                    operator=a.operator if (a := self.options.audit) else None,
                    host=a.host if a else None,
                    version=a.version if a else None,
                    api_key_id=a.api_key_id if a else None,
                )
            )
            self._started()
            ticker = asyncio.create_task(self._status_every(parts.manifest.total_rows))
            bound = asyncio.create_task(self._bounded_stop())
            deadline = self._deadline()
            await self._send_all()
            for quiet in (ticker, bound):
                quiet.cancel()  # before run_finished, which must be the run's last event
            summary = self._summary(started)
            await self._finished(summary)
        finally:
            for pending in (ticker, bound, deadline):
                if pending is not None:
                    pending.cancel()  # a library caller's loop lives on after the run
        if self._fatal is not None:
            # No summary.json will be written: its absence says this run's outputs are not whole. The ledger is.
            raise self._fatal
        return summary

    def _started(self) -> None:
        o, parts, manifest = self.options, self.parts, self.parts.manifest
        if self.progress is not None:
            self.progress.start(parts.rows.total)
        # Read from the exporter's thread at each scrape: plain ints and floats, never a dict iterated.
        parts.observer.watch(
            remaining=lambda: max(0, manifest.total_rows - self._tally.done),
            in_flight=lambda: self.in_flight,
            rate=lambda: parts.gate.rate,
        )
        self._event(
            logging.INFO,
            "run_started",
            f"run {parts.run_id}: {manifest.total_rows} rows from {manifest.name} to {o.base_url} ({o.env}); "
            f"outputs in {parts.out_dir}",
            manifest=manifest.name,
            total_rows=manifest.total_rows,
            env=o.env,
            base_url=o.base_url,
            out_dir=parts.out_dir,
            ledger=parts.store.location if parts.store else "",
            settings=o.settings,
        )

    async def _bounded_stop(self) -> None:
        """What a stop (a signal, --max-duration, a failure) does besides ending the reading of rows.

        At once, every row taken and not in a worker's hands goes back (a fleet's claims: other processes take
        them now). Answers in flight are waited for `stop_timeout` seconds at most; then the requests still on
        the wire are abandoned, their rows in doubt (the ledger holds each attempt as sent), so that the process
        can write its outputs and exit within an orchestrator's grace period, whatever the API does.
        """
        stops = self._stops
        if not stops.stopping:
            await stops.event.wait()
        self.parts.rows.give_back_unsent(self._in_hand)
        seconds = self.options.stop_timeout
        loop = asyncio.get_running_loop()
        self._abandon_at = loop.time() + seconds
        await asyncio.sleep(seconds)
        cut = self.parts.sending.abandon(
            f"no answer {seconds:g}s after the stop (--stop-timeout): abandoned, in doubt until a re-run settles it"
        )
        if cut:
            self._event(
                logging.WARNING,
                "requests_abandoned",
                f"{cut} request{'' if cut == 1 else 's'} still unanswered {seconds:g}s after the stop "
                "(--stop-timeout): abandoned, their rows in doubt until a re-run settles them",
                abandoned=cut,
                stop_timeout_s=seconds,
            )

    def _deadline(self) -> asyncio.TimerHandle | None:
        seconds = self.options.max_duration
        if seconds is None:
            return None
        reason = f"--max-duration {seconds:g}s reached; re-run to continue"
        return asyncio.get_running_loop().call_later(seconds, self.stop, reason, 0)

    async def _send_all(self) -> None:
        """Every row planned and sent (or told), then the row source closed: a stop ends it early."""
        queue: asyncio.Queue[plan.ToSend | None] = asyncio.Queue(maxsize=self.options.concurrency * 4)
        self._queue = queue
        workers = [asyncio.create_task(self._worker(queue)) for _ in range(self.options.concurrency)]
        try:
            await self._produce(queue)
        except BackfillError as error:
            self._fail(error)
        finally:
            self._queue = None  # no row will wait for a worker again: what is queued now are the stops
            for _ in workers:
                await queue.put(None)
            await asyncio.gather(*workers)
        try:
            # A fleet's process: every finished row told; the rest given back to the fleet.
            await self.parts.rows.close()
        except BackfillError as error:
            self._fail(error)

    async def _finished(self, summary: Summary) -> None:
        parts = self.parts
        # A fatal error (the ledger gone, the disk full) is what the process exits with: say that code.
        code = self._fatal.exit_code if self._fatal is not None else summary.exit_code
        if self._stops.reason:
            reason = self._stops.reason
            self._event(logging.WARNING, "run_stopped", f"stopped: {reason}", reason=reason)
        try:
            await parts.journal.finish_run(
                parts.run_id, finished_at=summary.finished_at, rows=summary.total_rows, exit_code=code
            )
        except BackfillError as error:
            # The ledger failed at the very end, or is why the run stops: the run's row stays unfinished, which
            # `status` calls died; the rows themselves are recorded.
            self._event(logging.WARNING, "run_not_recorded", f"the run's end isn't recorded: {error}")
            if self._fatal is None:
                self._fatal, code = error, error.exit_code
        self._event(
            logging.INFO,
            "run_finished",
            f"run {parts.run_id} finished in {summary.duration_s:g}s with exit code {code}: "
            + (", ".join(f"{n} {k}" for k, n in summary.counts.items()) or "nothing to do"),
            counts=summary.counts,
            new_rows=summary.new_rows,
            not_reached=summary.not_reached,
            exit_code=code,
            duration_s=summary.duration_s,
            rows_per_s=summary.rows_per_s,
        )

    async def _plan(self) -> tuple[Batch, list[plan.Skipped], list[plan.Decision]] | None:
        """The next chunk and its decisions: read off the event loop, looked up, its photos stat'ed or checked."""
        batch = await self.parts.rows.next_batch()
        if batch is None:
            return None
        skipped, decisions = await plan.decide_batch(
            batch.candidates,
            self.parts.store,
            self.parts.images,
            resend_failed=self.options.resend_failed,
            done_of=self.parts.done_of,
        )
        return batch, skipped, decisions

    async def _produce(self, queue: asyncio.Queue[plan.ToSend | None]) -> None:
        limit = self.options.limit
        queued = 0
        # One chunk planned ahead: its reading, lookup and photo checks overlap with this chunk's rows being
        # queued (workers never wait at a chunk's end). A chunk planned but never used sent nothing: not reached.
        ahead = asyncio.ensure_future(self._plan())
        try:
            while not self.stopping:
                planned = await ahead
                if planned is None:
                    return
                ahead = asyncio.ensure_future(self._plan())
                batch, skipped, decisions = planned
                for reject in batch.rejects:
                    self._reject(
                        RejectRow(
                            line=reject.line,
                            user_id=reject.user_id,
                            reason=reject.reason,
                            message=reject.message,
                        )
                    )
                # The batch was settled at once: one timestamp for its settled rows, not a clock read per row.
                settled_at = now_iso()
                if skipped:
                    self.parts.sink.skipped(skipped, settled_at)
                    self._advance_many(Status.SKIPPED, len(skipped))
                    await asyncio.sleep(0)  # let the next chunk's planning take its next step
                for n, decision in enumerate(decisions, 1):
                    if isinstance(decision, plan.ToSend):
                        if self.stopping:
                            return
                        if limit is not None and queued >= limit:
                            # Not a stop: rows already queued still go out; only reading more ends here.
                            self._limit_note = f"--limit {limit} reached"
                            return
                        queued += 1
                        await queue.put(decision)
                        continue
                    if decision.status is Status.REJECTED and decision.reason is not None:
                        self._reject(
                            RejectRow(
                                line=decision.line,
                                user_id=decision.user_id,
                                reason=decision.reason,
                                message=decision.message,
                            )
                        )
                    else:
                        k = decision.known
                        self._result(
                            ResultRow(
                                user_id=decision.user_id,
                                status=decision.status,
                                result_code=k.result_code if k else "",
                                smile_job_id=k.smile_job_id if k else "",
                                job_id=k.job_id if k else "",
                                error=decision.message,
                                finished_at=settled_at,
                            )
                        )
                    if not n % 1024:
                        await asyncio.sleep(0)  # let the next chunk's planning take its next step
        finally:
            if not ahead.done():
                ahead.cancel()
            with contextlib.suppress(asyncio.CancelledError, BackfillError):
                await ahead  # its error, if any, belongs to a chunk that was never used

    async def _worker(self, queue: asyncio.Queue[plan.ToSend | None]) -> None:
        sending, rows, hand = self.parts.sending, self.parts.rows, self._in_hand
        while (row := await queue.get()) is not None:
            if self.stopping:
                continue  # dequeued but never sent: counted as not reached
            hand.add(row.user_id)
            try:
                sent = await sending.send(row)
                if sent is not None:
                    self._finish(row, sent)
            except BackfillError as error:
                # The row stays as the ledger last recorded it (at worst SENDING): resume reconciles it.
                self._fail(error)
            except Exception as error:
                # A bug must not kill this worker silently: with every worker gone the producer would wait on a
                # full queue for ever. Stop the run as on any local failure, and say what happened.
                self._fail(InternalError(f"internal error while sending {row.user_id!r}: {error!r}"))
            finally:
                hand.discard(row.user_id)
            if self.stopping:
                # This row too, unless it finished: the stop ended it unsent, or between two attempts.
                rows.give_back_unsent(hand)

    def _finish(self, row: plan.ToSend, sent: RowEnd) -> None:
        if sent.elsewhere:
            self.parts.rows.handed_back(
                row.user_id
            )  # another process tells this row; not this one's to count
            return
        if sent.attempts:
            self._tally.sent += 1
            self._tally.new += int(sent.first_ever)
        if sent.status is Status.REJECTED and sent.reason is not None:
            self._reject(
                RejectRow(line=row.line, user_id=row.user_id, reason=sent.reason, message=sent.message)
            )
            return
        v = sent.verdict
        result = ResultRow(
            user_id=row.user_id,
            status=sent.status,
            http_status=v.http_status if v else None,
            result_code=v.result_code if v else sent.result_code,
            result_text=v.result_text if v else "",
            smile_job_id=v.smile_job_id if v else sent.smile_job_id,
            job_id=v.job_id if v else sent.job_id,
            attempts=sent.attempts,
            signature_ok=v.signature_ok if v else None,
            error="; ".join(filter(None, (v.error if v else "", sent.message))),
            finished_at=now_iso(),
            latency_ms=sent.latency_ms,
            normalized=sent.normalized,
            unfinished=sent.cut_short or sent.status is Status.PENDING,
        )
        self._result(result)
        ok = sent.status in FINE_STATUSES
        # A record per good row costs measurable throughput (benchmarks/); only build one where it is kept.
        if not ok or self.options.log_rows or self._event.enabled(logging.DEBUG):
            self._event(
                logging.INFO if ok else logging.WARNING,
                "row_finished",
                f"{row.user_id}: {sent.status}" + ("" if ok or v is None else f" ({describe(v)})"),
                user_id=row.user_id,
                status=sent.status,
                attempts=sent.attempts,
                http_status=result.http_status,
                result_code=result.result_code,
                latency_ms=sent.latency_ms,
                error=result.error,
            )
        if sent.attempts and not self.stopping:
            self._breaker(sent.status, v)

    def _breaker(self, status: Status, v: Verdict | None) -> None:
        """Stop the run as systemic once too many of the latest rows failed: something is wrong for every row."""
        threshold = self.options.fail_threshold
        failed = self._tally.breaker_tripped(status, threshold)
        if failed is None:
            return
        last = (v.result_code or (f"HTTP {v.http_status}" if v.http_status else v.error)) if v else ""
        self.stop(
            f"{failed} of the last {len(self._tally.recent)} rows failed (--fail-threshold {threshold}); the "
            f"latest: {last}. Check the images and the API's status, then re-run to resume",
            ExitCode.SYSTEMIC,
        )

    def _result(self, row: ResultRow) -> None:
        self.parts.sink.result(row)
        self._advance(row.status)

    def _reject(self, row: RejectRow) -> None:
        self.parts.sink.reject(row)
        self._advance(Status.REJECTED)

    def _advance_many(self, status: Status, n: int) -> None:
        """`_advance(status)` n times over, told once to each listener."""
        self._tally.add_many(status, n)
        self.parts.observer.row_settled(status, n)
        if self.progress is not None:
            self.progress.advance(status, n)

    def _advance(self, status: Status) -> None:
        self._tally.add(status)
        self.parts.observer.row_settled(status)
        if self.progress is not None:
            self.progress.advance(status)
            # Optional: a Progress that shows the adaptive rate has `rate(current)`; told only of changes.
            show_rate = getattr(self.progress, "rate", None)
            rate = self.parts.gate.rate
            if show_rate is not None and rate != self._shown_rate:
                self._shown_rate = rate
                show_rate(rate)

    def _summary(self, started: str) -> Summary:
        t, o, parts = self._tally, self.options, self.parts
        duration = t.elapsed()
        total = parts.rows.responsible
        accounted = sum(t.counts.values())
        not_reached = max(0, total - accounted)
        attempts = parts.sending.attempts
        return Summary(
            run_id=parts.run_id,
            out_dir=parts.out_dir,
            manifest=parts.manifest.name,
            manifest_sha256=parts.manifest.sha256,
            ledger=parts.store.location if parts.store is not None else "",
            env=o.env,
            base_url=o.base_url,
            started_at=started,
            finished_at=now_iso(),
            duration_s=round(duration, 3),
            total_rows=total,
            counts={str(k): n for k, n in sorted(t.counts.items())},
            rejected=t.counts.get(Status.REJECTED, 0),
            sent=t.sent,
            attempts=attempts,
            new_rows=t.new,
            retries=attempts - t.sent,
            not_reached=not_reached,
            rows_per_s=round(accounted / duration, 1) if duration > 0 else 0.0,
            exit_code=exit_code(t.counts, not_reached=not_reached, stop_code=self._stops.code),
            stop_reason=self._stops.reason or self._limit_note,
            dry_run=o.dry_run,
            settings=o.settings,
            audit=o.audit,
            effective_rate_min=round(parts.gate.rate_min, 3),
            effective_rate_final=round(parts.gate.rate, 3),
        )

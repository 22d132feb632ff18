"""The run itself: candidates from the manifest, decided against the ledger, sent by a pool of workers.

    manifest ─▶ plan (ledger first) ─▶ queue ─▶ workers: rate slot ─▶ photo ─▶ attempt recorded ─▶ POST ─▶ settle
        │             │                                                                              │
        └ rejects ────┴──────────────────────────── sink (results.csv / rejects.csv) ◀────────────────┘

Every collaborator is handed in (see `backfill/compose.py`), so a test can give the engine an in-memory ledger,
a fake image source or a client aimed at the sandbox. The engine never prints and never writes a file itself:
it tells the sink about every row, the progress object about every status, and logs events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from ..api.answers import Verdict
from ..api.client import Client
from ..clock import now_iso
from ..config import Settings
from ..errors import BackfillError, InternalError
from ..images import ImageError, ImageSource
from ..ledger import Fleet, RunRecord, Store
from ..manifest import Batch, Manifest
from ..vocab import OK_STATUSES, ExitCode, Status
from . import plan
from .claims import Claims, FinishingSink
from .crash import CRASH_ENV, CrashPoints
from .observe import NO_OBSERVER, Observer
from .policy import RetryPolicy
from .rate import FleetGate, Gate, RateGate
from .records import RejectRow, ResultRow, Sink, Summary
from .send import Sender, Sent, describe
from .stats import Tally, exit_code
from .stops import Leaving, Stops
from .workers import Workers, note, workers_are_the_limit

Sleep = Callable[[float], Awaitable[None]]
# Told what a second signal leaves behind, just before the process exits: the caller's to show.
OnLeave = Callable[[Leaving], None]
log = logging.getLogger("backfill")


class Progress(Protocol):
    """What the engine tells whoever shows progress; the library itself never prints.

    Optional: a `rate(current: float) -> None` method is told the adaptive rate limit each time it changes, and
    a `limited(note: str | None) -> None` method is told when the workers become (a note naming the setting to
    raise) or stop being (None) what holds the run back.
    """

    def start(self, total: int | None) -> None: ...  # None: not known (a fleet's process)
    def advance(self, status: str, n: int = 1) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Collaborators:
    """What one run is built from; `compose.py` makes them from Settings, tests may hand in their own."""

    manifest: Manifest
    store: Store | None  # None: a dry run with no ledger yet
    images: ImageSource
    client: Client
    policy: RetryPolicy  # the run's one retry policy, shared with the object-storage source
    sink: Sink
    run_id: str
    out_dir: str
    observer: Observer = NO_OBSERVER  # metrics, when --metrics-addr is set


class Engine:
    def __init__(
        self,
        settings: Settings,
        parts: Collaborators,
        *,
        progress: Progress | None = None,
        sleep: Sleep = asyncio.sleep,
        resend_failed: bool = False,
        on_leave: OnLeave | None = None,
    ) -> None:
        self.settings = settings
        self.parts = parts
        self.progress = progress
        self.resend_failed = resend_failed  # `retry --status failed`: send even unchanged photos again
        self._on_leave = on_leave
        self._stops = Stops(sleep, leaving=self._leaving if on_leave is not None else None)
        self._limit_note = ""
        self._fatal: BackfillError | None = None
        self._crash = CrashPoints(os.environ.get(CRASH_ENV))
        self._tally = Tally()
        self._gate: Gate = RateGate(settings.rate)
        self._claims: Claims | None = None  # a fleet's process: its rows come from claims, not the manifest
        self._sink: Sink = parts.sink
        self._shown_rate = settings.rate  # the adaptive rate the progress bar last showed
        self._workers = Workers()
        self._limited: str | None = None  # the note the progress object was last told
        self._noted: str | None = None  # the note the ledger's runs table holds for this run
        self._queue: asyncio.Queue[plan.Send | None] | None = None
        self._policy = parts.policy
        self._sender: Sender | None = None

    # --- stopping ---

    @property
    def stopping(self) -> bool:
        return self._stops.stopping

    def stop(self, reason: str, code: int) -> None:
        self._stops.stop(reason, code)

    def interrupt(self, signum: int) -> None:
        self._stops.interrupt(signum)

    def _leaving(self, signum: int) -> None:
        assert self._on_leave is not None
        self._on_leave(Leaving(signum=signum, in_flight=self.in_flight, out_dir=self.parts.out_dir))

    @property
    def in_flight(self) -> int:
        """Requests on the wire now (sent, not yet answered): what a stop waits for, up to --timeout."""
        return self._sender.in_flight if self._sender is not None else 0

    def _fail(self, error: BackfillError) -> None:
        """A local failure (disk full, ledger unwritable): stop cleanly, then raise it once the run ends."""
        if self._fatal is None:
            self._fatal = error
        self.stop(str(error), error.exit_code)

    def _systemic(self, verdict: Verdict) -> None:
        # No answer at all (the API unreachable from the start): the error says so itself.
        said = verdict.error if verdict.http_status is None else f"the API answered {verdict.error}"
        self.stop(said, ExitCode.SYSTEMIC)

    # --- the log: stable event names, one run_id, never a secret or photo bytes ---

    def _event(self, level: int, event: str, message: str, **fields: object) -> None:
        if log.isEnabledFor(level):
            log.log(level, message, extra={"event": event, "run_id": self.parts.run_id, "fields": fields})

    async def _status_every(self, total: int) -> None:
        """A one-line status now and then, for logs where no progress bar is shown (cron, CI, files)."""
        while True:
            await asyncio.sleep(self.settings.status_every)
            t = self._tally
            elapsed = t.elapsed()
            rate = t.done / elapsed if elapsed > 0 else 0.0
            allowed = self._gate.rate
            window = self._workers.window()
            # A fleet's rate is shared by every process, so one process's unused share says nothing of its
            # workers: told only where the rate is this process's own.
            limited = self._claims is None and workers_are_the_limit(
                window, concurrency=self.settings.concurrency, rate=allowed
            )
            said = note(window, concurrency=self.settings.concurrency, rate=allowed) if limited else None
            # A fleet's process handles a share of the manifest, whose size is not its own total.
            done = (
                f"{t.done}/{total} rows" if self._claims is None else f"{t.done} rows (of a fleet's {total})"
            )
            doubt = t.counts[
                Status.UNKNOWN
            ]  # may be enrolled: told apart from the failures, never hidden in them
            self._event(
                logging.INFO, "progress", f"{done}, {rate:.1f} rows/s, {t.failures - doubt} failed, {doubt} in "
                f"doubt, rate limit {allowed:.3g}/s" + (f"; {said}" if said else ""), done=t.done, total=total,
                rows_per_s=round(rate, 1), failed=t.failures - doubt, in_doubt=doubt, effective_rate=round(allowed, 3),
                workers_busy=round(window.busy, 2), limited_by="workers" if limited else None,
            )  # fmt: skip
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
        store = self.parts.store
        waiting = self._queue is not None and self._queue.qsize() > 0
        if store is None or self.settings.dry_run or said == self._noted or (said is None and not waiting):
            return
        try:
            await store.note_run(self.parts.run_id, said)
        except BackfillError as error:
            # A ledger that fails fails the sends too, which stop the run and say so; a note is not worth more.
            self._event(logging.DEBUG, "run_note_unsaid", f"the run's note isn't recorded: {error}")
            return
        self._noted = said

    # --- the run ---

    async def run(self) -> Summary:
        s, parts = self.settings, self.parts
        manifest, store = parts.manifest, parts.store
        started = now_iso()
        ticker: asyncio.Task[None] | None = None
        deadline: asyncio.TimerHandle | None = None
        try:
            if store is not None and not s.dry_run:
                await store.start_run(
                    RunRecord(
                        run_id=parts.run_id,
                        started_at=started,
                        manifest=str(manifest.path),
                        manifest_sha256=manifest.sha256,
                    )
                )
            if isinstance(store, Fleet) and not s.dry_run:
                self._join(store)
            if self.progress is not None:
                self.progress.start(None if self._claims is not None else manifest.total_rows)
            # Read from the exporter's thread at each scrape: plain ints and floats, never a dict iterated.
            parts.observer.watch(remaining=lambda: max(0, manifest.total_rows - self._tally.done),
                                 in_flight=lambda: self.in_flight, rate=lambda: self._gate.rate)  # fmt: skip
            self._event(
                logging.INFO, "run_started", f"run {parts.run_id}: {manifest.total_rows} rows from "
                f"{manifest.path} to {s.base_url} ({s.env}); outputs in {parts.out_dir}",
                manifest=str(manifest.path), total_rows=manifest.total_rows, env=s.env,
                base_url=s.base_url, out_dir=parts.out_dir, ledger=store.location if store else "",
                settings=s.redacted(),
            )  # fmt: skip
            ticker = asyncio.create_task(self._status_every(manifest.total_rows))
            if s.max_duration is not None:
                deadline = asyncio.get_running_loop().call_later(
                    s.max_duration,
                    self.stop,
                    f"--max-duration {s.max_duration:g}s reached; re-run to continue",
                    0,
                )
            if store is not None and not s.dry_run:
                self._sender = Sender(
                    store=store, images=parts.images, client=parts.client, gate=self._gate, policy=self._policy,
                    crash=self._crash, run_id=parts.run_id, stops=self._stops,
                    on_systemic=self._systemic, event=self._event, observer=parts.observer,
                    fleet=self._claims is not None, workers=self._workers,
                )  # fmt: skip
            queue: asyncio.Queue[plan.Send | None] = asyncio.Queue(maxsize=s.concurrency * 4)
            self._queue = queue
            workers = [asyncio.create_task(self._worker(queue)) for _ in range(s.concurrency)]
            try:
                await self._produce(queue)
            except BackfillError as error:
                self._fail(error)
            finally:
                self._queue = None  # no row will wait for a worker again: what is queued now are the stops
                for _ in workers:
                    await queue.put(None)
                await asyncio.gather(*workers)
            if self._claims is not None:
                try:
                    await self._claims.close()  # every finished row told; the rest given back to the fleet
                except BackfillError as error:
                    self._fail(error)
            ticker.cancel()  # before run_finished, which must be the run's last event
            summary = self._summary(started)
            # A fatal error (the ledger gone, the disk full) is what the process exits with: say that code.
            code = self._fatal.exit_code if self._fatal is not None else summary.exit_code
            if self._stops.reason:
                self._event(logging.WARNING, "run_stopped", f"stopped: {self._stops.reason}",
                            reason=self._stops.reason)  # fmt: skip
            if store is not None and not s.dry_run:
                try:
                    await store.finish_run(parts.run_id, finished_at=summary.finished_at,
                                           rows=summary.total_rows, exit_code=code)  # fmt: skip
                except BackfillError as error:
                    # The ledger failed at the very end, or is why the run stops: the run's row stays unfinished,
                    # which `status` calls died; the rows themselves are recorded.
                    self._event(logging.WARNING, "run_not_recorded", f"the run's end isn't recorded: {error}")
                    if self._fatal is None:
                        self._fatal, code = error, error.exit_code
            self._event(
                logging.INFO, "run_finished",
                f"run {parts.run_id} finished in {summary.duration_s:g}s with exit code {code}: "
                + (", ".join(f"{n} {k}" for k, n in summary.counts.items()) or "nothing to do"),
                counts=summary.counts, new_rows=summary.new_rows, not_reached=summary.not_reached,
                exit_code=code, duration_s=summary.duration_s, rows_per_s=summary.rows_per_s,
            )  # fmt: skip
        finally:
            for pending in (ticker, deadline):
                if pending is not None:
                    pending.cancel()  # a library caller's loop lives on after the run
        if self._fatal is not None:
            # No summary.json will be written: its absence says this run's outputs are not whole. The ledger is.
            raise self._fatal
        return summary

    def _join(self, fleet: Fleet) -> None:
        """A process of a fleet: rows are claimed from the shared ledger, and the rate is the fleet's."""
        s = self.settings

        def told(error: BaseException) -> None:
            self._event(logging.WARNING, "fleet_rate_unsaid", f"can't tell the fleet's rate limit: {error}")

        self._claims = Claims(
            fleet, self.parts.manifest, batch=max(16, min(s.chunk_rows, s.concurrency * 4)),
            stopping=lambda: self.stopping, nap=self._stops.nap,
        )  # fmt: skip
        self._sink = FinishingSink(self.parts.sink, self._claims)
        self._gate = FleetGate(fleet, s.rate, on_error=told)

    async def _plan(
        self, next_batch: Callable[[], Awaitable[Batch | None]]
    ) -> tuple[Batch, list[plan.Skipped], list[plan.Decision]] | None:
        """The next chunk and its decisions: read off the event loop, looked up, its photos stat'ed or checked."""
        batch = await next_batch()
        if batch is None:
            return None
        skipped, decisions = await plan.decide_batch(batch.candidates, self.parts.store, self.parts.images,
                                                     resend_failed=self.resend_failed)  # fmt: skip
        return batch, skipped, decisions

    async def _produce(self, queue: asyncio.Queue[plan.Send | None]) -> None:
        s = self.settings
        queued = 0
        if self._claims is not None:
            next_batch: Callable[[], Awaitable[Batch | None]] = self._claims.next_batch
        else:
            batches: Iterator[Batch] = self.parts.manifest.batches()

            def next_batch() -> Awaitable[Batch | None]:
                # Reading a chunk parses thousands of rows: off the event loop, so sends keep flowing.
                return asyncio.to_thread(next, batches, None)

        # One chunk planned ahead: its reading, lookup and photo checks overlap with this chunk's rows being
        # queued (workers never wait at a chunk's end). A chunk planned but never used sent nothing: not reached.
        ahead = asyncio.ensure_future(self._plan(next_batch))
        try:
            while not self.stopping:
                planned = await ahead
                if planned is None:
                    return
                ahead = asyncio.ensure_future(self._plan(next_batch))
                batch, skipped, decisions = planned
                for reject in batch.rejects:
                    self._reject(RejectRow(line=reject.line, user_id=reject.user_id, reason=reject.reason,
                                           message=reject.message))  # fmt: skip
                # The batch was settled at once: one timestamp for its settled rows, not a clock read per row.
                settled_at = now_iso()
                if skipped:
                    message = plan.NOT_SENT_AGAIN
                    self._sink.skipped([(r.user_id, r.result_code, r.smile_job_id, r.job_id, message[r.state])
                                        for r in skipped],
                                            settled_at)  # fmt: skip
                    self._advance_many(Status.SKIPPED, len(skipped))
                    await asyncio.sleep(0)  # let the next chunk's planning take its next step
                for n, decision in enumerate(decisions, 1):
                    if isinstance(decision, plan.Send):
                        if self.stopping:
                            return
                        if s.limit is not None and queued >= s.limit:
                            # Not a stop: rows already queued still go out; only reading more ends here.
                            self._limit_note = f"--limit {s.limit} reached"
                            return
                        queued += 1
                        await queue.put(decision)
                        continue
                    if decision.status is Status.REJECTED and decision.reason is not None:
                        self._reject(RejectRow(line=decision.line, user_id=decision.user_id,
                                               reason=decision.reason, message=decision.message))  # fmt: skip
                    else:
                        k = decision.known
                        self._result(ResultRow(user_id=decision.user_id, status=decision.status,
                                               result_code=k.result_code if k else "",
                                               smile_job_id=k.smile_job_id if k else "",
                                               job_id=k.job_id if k else "", error=decision.message,
                                               finished_at=settled_at))  # fmt: skip
                    if not n % 1024:
                        await asyncio.sleep(0)  # let the next chunk's planning take its next step
        finally:
            if not ahead.done():
                ahead.cancel()
            with contextlib.suppress(asyncio.CancelledError, BackfillError):
                await ahead  # its error, if any, belongs to a chunk that was never used

    async def _worker(self, queue: asyncio.Queue[plan.Send | None]) -> None:
        while (row := await queue.get()) is not None:
            if self.stopping:
                continue  # dequeued but never sent: counted as not reached
            try:
                if self._sender is None:
                    await self._dry_run(row)
                    continue
                sent = await self._sender.send(row)
                if sent is not None:
                    self._finish(row, sent)
            except BackfillError as error:
                # The row stays as the ledger last recorded it (at worst SENDING): resume reconciles it.
                self._fail(error)
            except Exception as error:
                # A bug must not kill this worker silently: with every worker gone the producer would wait on a
                # full queue for ever. Stop the run as on any local failure, and say what happened.
                self._fail(InternalError(f"internal error while sending {row.user_id!r}: {error!r}"))

    def _finish(self, row: plan.Send, sent: Sent) -> None:
        if sent.elsewhere and self._claims is not None:
            self._claims.handed_back(row.user_id)  # another process tells this row; not this one's to count
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
            user_id=row.user_id, status=sent.status, http_status=v.http_status if v else None,
            result_code=v.result_code if v else sent.result_code, result_text=v.result_text if v else "",
            smile_job_id=v.smile_job_id if v else sent.smile_job_id, job_id=v.job_id if v else sent.job_id,
            attempts=sent.attempts,
            signature_ok=v.signature_ok if v else None,
            error="; ".join(filter(None, (v.error if v else "", sent.message))),
            finished_at=now_iso(), latency_ms=sent.latency_ms,
            unfinished=sent.cut_short or sent.status is Status.PENDING,
        )  # fmt: skip
        self._result(result)
        ok = sent.status in OK_STATUSES
        # A record per good row costs measurable throughput (benchmarks/); only build one where it is kept.
        if not ok or self.settings.log_file is not None or log.isEnabledFor(logging.DEBUG):
            self._event(
                logging.INFO if ok else logging.WARNING, "row_finished",
                f"{row.user_id}: {sent.status}" + ("" if ok or v is None else f" ({describe(v)})"),
                user_id=row.user_id, status=sent.status, attempts=sent.attempts, http_status=result.http_status,
                result_code=result.result_code, latency_ms=sent.latency_ms, error=result.error,
            )  # fmt: skip
        if sent.attempts and not self.stopping:
            failed = self._tally.breaker_tripped(sent.status, self.settings.fail_threshold)
            if failed is not None:
                last = (v.result_code or (f"HTTP {v.http_status}" if v.http_status else v.error)) if v else ""
                self.stop(
                    f"{failed} of the last {len(self._tally.recent)} rows failed (--fail-threshold "
                    f"{self.settings.fail_threshold}); the latest: {last}. Check the images and the API's status, "
                    "then re-run to resume",
                    ExitCode.SYSTEMIC,
                )

    async def _dry_run(self, row: plan.Send) -> None:
        try:
            photo = await self.parts.images.read(row.fingerprint)
        except ImageError as exc:
            self._reject(RejectRow(line=row.line, user_id=row.user_id, reason=exc.problem.reason,
                                   message=f"at send time: {exc.problem.message}"))  # fmt: skip
            return
        self.parts.client.photo_body(row.user_id, row.user_created_at, photo.data)
        self._result(ResultRow(user_id=row.user_id, status=Status.DRY_RUN, error="would be sent",
                               finished_at=now_iso()))  # fmt: skip

    def _result(self, row: ResultRow) -> None:
        self._sink.result(row)
        self._advance(row.status)

    def _reject(self, row: RejectRow) -> None:
        self._sink.reject(row)
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
            if show_rate is not None and self._gate.rate != self._shown_rate:
                self._shown_rate = self._gate.rate
                show_rate(self._shown_rate)

    def _summary(self, started: str) -> Summary:
        t, s, parts = self._tally, self.settings, self.parts
        duration = t.elapsed()
        total = self._claims.responsible if self._claims is not None else parts.manifest.total_rows
        accounted = sum(t.counts.values())
        not_reached = max(0, total - accounted)
        attempts = self._sender.attempts if self._sender is not None else 0
        return Summary(
            run_id=parts.run_id, out_dir=parts.out_dir, manifest=str(parts.manifest.path),
            manifest_sha256=parts.manifest.sha256,
            ledger=parts.store.location if parts.store is not None else "", env=s.env, base_url=s.base_url,
            started_at=started, finished_at=now_iso(), duration_s=round(duration, 3), total_rows=total,
            counts={str(k): n for k, n in sorted(t.counts.items())}, rejected=t.counts.get(Status.REJECTED, 0),
            sent=t.sent, attempts=attempts, new_rows=t.new, retries=attempts - t.sent, not_reached=not_reached,
            rows_per_s=round(accounted / duration, 1) if duration > 0 else 0.0,
            exit_code=exit_code(t.counts, not_reached=not_reached, stop_code=self._stops.code),
            stop_reason=self._stops.reason or self._limit_note, dry_run=s.dry_run, settings=s.redacted(),
            effective_rate_min=round(self._gate.rate_min, 3), effective_rate_final=round(self._gate.rate, 3),
        )  # fmt: skip

"""The backfill itself: validated rows, filtered by the checkpoint, sent by a rate-limited worker pool."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

from aiolimiter import AsyncLimiter
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_result,
    stop_after_attempt,
    wait_random_exponential,
)

from ..api.client import Client, Kind, Verdict, read_photo
from ..config import Settings
from ..errors import BackfillError, ConfigError, InternalError
from ..ledger import sqlite as cp
from ..ledger.sqlite import Attempt, Known, Outcome, SqliteStore, Store, now_iso
from ..manifest import Batch, ManifestRules, Row, open_manifest
from ..outputs import files as rs

Sleep = Callable[[float], Awaitable[None]]
log = logging.getLogger("backfill")
# The circuit breaker looks at the last BREAKER_WINDOW rows sent, once at least BREAKER_MIN_ROWS are in it.
BREAKER_WINDOW = 100
BREAKER_MIN_ROWS = 20
_FAILURES = frozenset({rs.FAILED, rs.RETRY_EXHAUSTED, rs.UNKNOWN})
# A Retry-After is honoured up to this: a server asking for an hour is broken, and the run would look hung.
RETRY_AFTER_MAX_S = 300.0
# What _attempt answers when a stop came before the request left: nothing was sent.
# Images up to this size are read on the event loop: a thread hop costs more than reading 256 KB from a
# local disk (measured in benchmarks/). Larger ones go to a thread so a slow disk doesn't stall sends.
INLINE_READ_MAX = 256 * 1024
_NOT_SENT = Verdict(Kind.TRANSIENT, False, error="stopped before this attempt was sent")


# The crash suite's supported test mode: "BOUNDARY:N" kills this process with SIGKILL the Nth time a boundary
# is reached, so tests can stop a real run exactly where a crash would hurt most.
CRASH_ENV = "BACKFILL_TEST_CRASH_AT"
CRASH_BOUNDARIES = ("after_attempt", "in_flight", "before_outcome")


class _CrashPoints:
    def __init__(self, spec: str | None) -> None:
        self._boundary, self._left = "", 0
        if spec:
            boundary, _, count = spec.partition(":")
            if boundary not in CRASH_BOUNDARIES or not count.isdigit():
                fix = f"use one of {', '.join(CRASH_BOUNDARIES)} and a count, e.g. in_flight:3, or unset it"
                raise ConfigError(CRASH_ENV, "environment", f"{spec!r} is not a crash point", fix)
            self._boundary, self._left = boundary, int(count)

    def reached(self, boundary: str) -> None:
        if boundary != self._boundary:
            return
        self._left -= 1
        if self._left > 0:
            return
        if boundary == "in_flight":
            # Soon after the request leaves, while the answer is still on its way (the server must be slower).
            asyncio.get_running_loop().call_later(0.02, os.kill, os.getpid(), signal.SIGKILL)
        else:
            os.kill(os.getpid(), signal.SIGKILL)


class Progress(Protocol):
    """What the runner tells whoever shows progress; the library itself never prints."""

    def start(self, total: int) -> None: ...
    def advance(self, status: str) -> None: ...


@dataclass(slots=True)
class _Work:
    row: Row
    in_doubt: bool  # an earlier attempt (this run or before) may have enrolled the user unseen
    attempts: int = 0
    latency_ms: int | None = None


class _Settled(NamedTuple):
    """A row settled without sending: a status, why, and for a reject its reason code."""

    status: str
    message: str
    reason: str = ""


def manifest_rules(settings: Settings) -> ManifestRules:
    return ManifestRules(
        user_id_column=settings.columns["user_id"],
        user_created_at_column=settings.columns["user_created_at"],
        image_path_column=settings.columns["image_path"],
        user_id_pattern=settings.user_id_pattern,
        max_image_bytes=settings.max_image_bytes,
        images_root=settings.images_root,
        chunk_rows=settings.chunk_rows,
    )


def _status_for(verdict: Verdict, work: _Work, stopped: bool) -> str:
    """The row's final status from its last verdict; the 2209 rule lives here."""
    if verdict.kind is Kind.ENROLLED:
        return rs.ENROLLED
    if verdict.kind is Kind.ALREADY:
        # Ours only if an earlier attempt may have reached the server; otherwise someone else holds the ID.
        return rs.ALREADY_ENROLLED if work.in_doubt else rs.ID_CONFLICT
    if verdict.kind is Kind.PERMANENT:
        return rs.FAILED
    if verdict.kind is Kind.SYSTEMIC:
        return rs.UNKNOWN if work.in_doubt else rs.PENDING
    if work.in_doubt or verdict.kind is Kind.UNVERIFIED:
        return rs.UNKNOWN
    return rs.PENDING if stopped else rs.RETRY_EXHAUSTED


def _same_photo(known: Known, row: Row) -> bool:
    """Whether the manifest's image is the one the checkpoint recorded, cheaply when the file is unchanged."""
    if known.photo_sha256 is None:
        return True
    if (known.image_path, known.image_size, known.image_mtime_ns) == (
        str(row.image_path),
        row.image_size,
        row.image_mtime_ns,
    ):
        return True  # same file, same size and mtime: the rsync quick check, so resume reads no images
    digest = hashlib.sha256()
    with row.image_path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest() == known.photo_sha256


class Runner:
    def __init__(
        self,
        settings: Settings,
        manifest_path: Path,
        *,
        progress: Progress | None = None,
        sleep: Sleep = asyncio.sleep,
        resend_failed: bool = False,
    ) -> None:
        self.settings = settings
        # `backfill retry --status failed`: the partner fixed what failed, so send even unchanged photos again.
        self.resend_failed = resend_failed
        self.manifest_path = manifest_path
        self.progress = progress
        self._sleep = sleep
        self._stop_reason = ""
        self._stop_code = 0
        self._limit_note = ""
        self._signals = 0
        self._stopped = asyncio.Event()
        self._fatal: BackfillError | None = None
        self._crash = _CrashPoints(os.environ.get(CRASH_ENV))
        self._resume_at = 0.0
        self._sent = 0
        self._new = 0
        self._done = 0
        self._failures = 0
        self._attempts = 0
        self._run_id = ""
        self._recent: collections.deque[str] = collections.deque(maxlen=BREAKER_WINDOW)
        burst = max(1.0, settings.rate * 0.05)
        # A small bucket: a 1-second bucket would let `rate` requests out at once, which a server that
        # measures over shorter windows reads as a burst over the limit.
        self._limiter = AsyncLimiter(burst, burst / settings.rate)

    # --- stopping ---

    @property
    def stopping(self) -> bool:
        return bool(self._stop_reason)

    def stop(self, reason: str, exit_code: int) -> None:
        """Stop taking new rows; in-flight requests finish and are recorded.

        The first reason wins, except that a failure (a systemic answer, a full disk) outranks a planned stop
        (--max-duration): the exit code must still tell cron something is wrong.
        """
        if not self._stop_reason or (self._stop_code == 0 and exit_code != 0):
            self._stop_reason, self._stop_code = reason, exit_code
        self._stopped.set()

    async def _nap(self, seconds: float) -> None:
        """Sleep, but wake at once on a stop: a long backoff or Retry-After must not hold up a shutdown."""
        if self.stopping:
            return
        nap = asyncio.ensure_future(self._sleep(seconds))
        stop = asyncio.ensure_future(self._stopped.wait())
        try:
            await asyncio.wait({nap, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (nap, stop):
                task.cancel()

    def interrupt(self, signum: int) -> None:
        code = 128 + signum
        self._signals += 1
        if self._signals > 1:
            # Second signal: leave now. Every attempt is already recorded; resume reconciles the rest.
            os._exit(code)
        # A signal outranks an earlier stop's reason: the operator asked, and the exit code should say so.
        self._stop_reason, self._stop_code = f"interrupted by {signal.Signals(signum).name}", code
        self._stopped.set()

    def _fail(self, error: BackfillError) -> None:
        """A local failure (disk full, checkpoint unwritable): stop cleanly, then raise it once the run ends."""
        if self._fatal is None:
            self._fatal = error
        self.stop(str(error), error.exit_code)

    # --- the log: stable event names, one run_id, never a secret or photo bytes ---

    def _event(self, level: int, event: str, message: str, **fields: object) -> None:
        if log.isEnabledFor(level):
            log.log(level, message, extra={"event": event, "run_id": self._run_id, "fields": fields})

    async def _status_every(self, total: int, t0: float) -> None:
        """A one-line status now and then, for logs where no progress bar is shown (cron, CI, files)."""
        while True:
            await asyncio.sleep(self.settings.status_every)
            elapsed = time.monotonic() - t0
            rate = self._done / elapsed if elapsed > 0 else 0.0
            self._event(
                logging.INFO, "progress", f"{self._done}/{total} rows, {rate:.1f} rows/s, {self._failures} failed",
                done=self._done, total=total, rows_per_s=round(rate, 1), failed=self._failures,
            )  # fmt: skip

    # --- the run ---

    async def run(self) -> rs.Summary:
        s = self.settings
        started, t0 = now_iso(), time.monotonic()
        manifest = open_manifest(self.manifest_path, manifest_rules(s))
        store = await self._open_store()  # before the output folder: a locked checkpoint leaves no litter
        ticker: asyncio.Task[None] | None = None
        deadline: asyncio.TimerHandle | None = None
        try:
            output = rs.RunOutput(s.out)
            self._run_id = output.run_id
            if store is not None and not s.dry_run:
                await store.start_run(output.run_id, str(self.manifest_path), started)
            if self.progress is not None:
                self.progress.start(manifest.total_rows)
            self._event(
                logging.INFO, "run_started", f"run {output.run_id}: {manifest.total_rows} rows from "
                f"{self.manifest_path} to {s.base_url} ({s.env}); outputs in {output.dir}",
                manifest=str(self.manifest_path), total_rows=manifest.total_rows, env=s.env,
                base_url=s.base_url, out_dir=str(output.dir), settings=s.redacted(),
            )  # fmt: skip
            ticker = asyncio.create_task(self._status_every(manifest.total_rows, t0))
            if s.max_duration is not None:
                deadline = asyncio.get_running_loop().call_later(
                    s.max_duration,
                    self.stop,
                    f"--max-duration {s.max_duration:g}s reached; re-run to continue",
                    0,
                )
            client = Client(
                s.base_url,
                s.partner_id,
                s.api_key,
                timeout=s.timeout,
                connect_timeout=s.connect_timeout,
                concurrency=s.concurrency,
            )
            queue: asyncio.Queue[_Work | None] = asyncio.Queue(maxsize=s.concurrency * 4)
            async with client:
                workers = [
                    asyncio.create_task(self._worker(queue, client, store, output))
                    for _ in range(s.concurrency)
                ]
                try:
                    await self._produce(manifest.batches(), queue, store, output)
                except BackfillError as error:
                    self._fail(error)
                finally:
                    for _ in workers:
                        await queue.put(None)
                    await asyncio.gather(*workers)
            ticker.cancel()  # before run_finished, which must be the run's last event
            summary = self._summary(output, manifest.total_rows, started, t0)
            if self._stop_reason:
                self._event(
                    logging.WARNING, "run_stopped", f"stopped: {self._stop_reason}", reason=self._stop_reason
                )
            self._event(
                logging.INFO, "run_finished",
                f"run {output.run_id} finished in {summary.duration_s:g}s with exit code {summary.exit_code}: "
                + (", ".join(f"{n} {k}" for k, n in summary.counts.items()) or "nothing to do"),
                counts=summary.counts, new_rows=summary.new_rows, not_reached=summary.not_reached,
                exit_code=summary.exit_code, duration_s=summary.duration_s, rows_per_s=summary.rows_per_s,
            )  # fmt: skip
            if store is not None and not s.dry_run:
                await store.finish_run(
                    output.run_id, summary.finished_at, manifest.total_rows, summary.exit_code
                )
        finally:
            for pending in (ticker, deadline):
                if pending is not None:
                    pending.cancel()  # a library caller's loop lives on after the run
            if store is not None:
                await store.close()
        if self._fatal is not None:
            # No summary.json: its absence says this run's outputs are not whole. The checkpoint is.
            raise self._fatal
        output.close(summary)
        return summary

    async def _open_store(self) -> SqliteStore | None:
        s = self.settings
        path = s.checkpoint_path()
        if s.dry_run:
            # A dry run reads the checkpoint to show what would be skipped, and never creates or writes one.
            if not path.exists():
                return None
            return await SqliteStore.open(path, s.partner_id, s.env, create=False)
        return await SqliteStore.open(path, s.partner_id, s.env)

    async def _produce(
        self,
        batches: Iterator[Batch],
        queue: asyncio.Queue[_Work | None],
        store: Store | None,
        output: rs.RunOutput,
    ) -> None:
        queued = 0
        limit = self.settings.limit
        while not self.stopping:
            # Reading a chunk stats thousands of files: off the event loop, so sends keep flowing.
            batch = await asyncio.to_thread(next, batches, None)
            if batch is None:
                return
            for reject in batch.rejects:
                output.reject(reject.line, reject.user_id, reject.reason, reject.message)
                self._advance(rs.REJECTED)
            known = await store.lookup([r.user_id for r in batch.rows]) if store is not None else {}
            decisions = await asyncio.to_thread(self._decide, batch.rows, known)
            for row, decision in zip(batch.rows, decisions, strict=True):
                if isinstance(decision, _Work):
                    if self.stopping:
                        return
                    if limit is not None and queued >= limit:
                        # Not a stop: rows already queued still go out; only reading more ends here.
                        self._limit_note = f"--limit {limit} reached"
                        return
                    queued += 1
                    await queue.put(decision)
                elif decision.status == rs.REJECTED:
                    output.reject(row.line, row.user_id, decision.reason, decision.message)
                    self._advance(rs.REJECTED)
                else:
                    k = known[row.user_id]
                    output.result(
                        rs.ResultRow(
                            row.user_id, decision.status, result_code=k.result_code or "", attempts=0,
                            error=decision.message, finished_at=now_iso(),
                        )
                    )  # fmt: skip
                    self._advance(decision.status)

    def _decide(self, rows: list[Row], known: dict[str, Known]) -> list[_Work | _Settled]:
        """For each row: work to send, or (status, message) for a row settled without sending."""
        out: list[_Work | _Settled] = []
        for row in rows:
            k = known.get(row.user_id)
            if k is None:
                out.append(_Work(row, in_doubt=False))
                self._new += 1
                continue
            try:
                same = _same_photo(k, row)
            except OSError as exc:
                message = f"can't be read to compare with the photo sent earlier: {exc}"
                out.append(_Settled(rs.REJECTED, message, "image_unreadable"))
                continue
            if not same and (k.state in cp.DONE_STATES or k.in_doubt or k.state in (cp.SENDING, cp.UNKNOWN)):
                out.append(_Settled(rs.REJECTED, _reused_message(row, k), "user_id_reused"))
            elif k.state in cp.DONE_STATES:
                out.append(_Settled(rs.SKIPPED, f"already {k.state} in the checkpoint; not sent again"))
            elif k.state == cp.ID_CONFLICT:
                out.append(
                    _Settled(rs.ID_CONFLICT, "the ID is held by another user on Smile ID; not sent again")
                )
            elif k.state == cp.FAILED and same and not self.resend_failed:
                message = f"failed permanently earlier ({k.result_code}); fix the image or use another ID"
                out.append(_Settled(rs.FAILED, message))
            else:
                in_doubt = k.in_doubt or k.state in (cp.SENDING, cp.UNKNOWN)
                out.append(_Work(row, in_doubt=in_doubt))
        return out

    async def _worker(
        self, queue: asyncio.Queue[_Work | None], client: Client, store: Store | None, output: rs.RunOutput
    ) -> None:
        s = self.settings
        retrying = AsyncRetrying(
            stop=stop_after_attempt(s.max_attempts),
            wait=self._wait,
            retry=retry_if_result(lambda v: v.kind is Kind.TRANSIENT and not self.stopping),
            sleep=self._nap,
            retry_error_callback=lambda state: state.outcome.result() if state.outcome else None,
            before_sleep=self._retry_scheduled,
        )
        while (work := await queue.get()) is not None:
            if self.stopping:
                continue  # dequeued but never sent: counted as not reached
            try:
                if s.dry_run:
                    self._dry_run(work, client, output)
                    continue
                verdict: Verdict = await retrying(self._attempt, work, client, store)
                if verdict is _NOT_SENT and work.attempts == 0:
                    continue  # stopped before its first attempt went out: not reached
                status = self._finish(work, verdict, store, output)
                if status == rs.ID_CONFLICT and store is not None:
                    # On disk before anything else: lost in a crash, the row would stay SENDING and a
                    # resend's 2209 would then read as ours.
                    await store.flush()
            except BackfillError as error:
                # The row stays as the checkpoint last recorded it (at worst SENDING): resume reconciles it.
                self._fail(error)
            except Exception as error:
                # A bug must not kill this worker silently: with every worker gone the producer would wait
                # on a full queue for ever. Stop the run as on any local failure, and say what happened.
                self._fail(InternalError(f"internal error while sending {work.row.user_id!r}: {error!r}"))

    def _retry_scheduled(self, state: RetryCallState) -> None:
        verdict = state.outcome.result() if state.outcome else None
        work = state.args[0] if state.args else None
        if isinstance(verdict, Verdict) and isinstance(work, _Work):
            wait = state.upcoming_sleep
            self._event(
                logging.INFO, "retry_scheduled",
                f"{work.row.user_id}: attempt {work.attempts} got {_describe(verdict)}; retrying in {wait:.2f}s",
                user_id=work.row.user_id, attempt=work.attempts, wait_s=round(wait, 3), reason=_describe(verdict),
            )  # fmt: skip

    def _wait(self, state: RetryCallState) -> float:
        verdict = state.outcome.result() if state.outcome else None
        if isinstance(verdict, Verdict) and verdict.retry_after is not None:
            return min(verdict.retry_after, RETRY_AFTER_MAX_S)
        backoff = wait_random_exponential(
            multiplier=self.settings.backoff_initial, max=self.settings.backoff_max
        )
        return float(backoff(state))

    async def _attempt(self, work: _Work, client: Client, store: Store | None) -> Verdict:
        loop = asyncio.get_running_loop()
        pause = self._resume_at - loop.time()
        if pause > 0:
            await self._nap(pause)  # someone got a 429: everyone slows down, not just that row
        if self.stopping:
            return _NOT_SENT
        try:
            if work.row.image_size <= INLINE_READ_MAX:
                photo = read_photo(work.row.image_path)
            else:
                photo = await asyncio.to_thread(read_photo, work.row.image_path)
        except OSError as exc:
            return Verdict(Kind.PERMANENT, False, error=f"image can't be read now: {exc.strerror}")
        assert store is not None
        await store.record_attempt(
            Attempt(
                work.row.user_id, work.in_doubt, photo.sha256, str(work.row.image_path), work.row.image_size,
                work.row.image_mtime_ns, work.row.user_created_at, now_iso(), self._run_id,
            )
        )  # fmt: skip
        self._crash.reached("after_attempt")
        # The rate is enforced where the request leaves, after the commit's variable wait, so the server sees
        # an even rate. Recorded means sent: a stop arriving now still lets this request go.
        await self._limiter.acquire()
        work.attempts += 1
        self._attempts += 1
        if work.attempts == 1:
            self._sent += 1
        self._crash.reached("in_flight")
        sent_at = time.perf_counter()
        verdict = await client.send(work.row.user_id, work.row.user_created_at, photo.b64)
        work.latency_ms = round((time.perf_counter() - sent_at) * 1000)
        del photo
        if verdict.retry_after is not None and verdict.http_status == 429:
            until = loop.time() + min(verdict.retry_after, RETRY_AFTER_MAX_S)
            if until > self._resume_at + 0.05:
                self._event(
                    logging.WARNING, "rate_lowered",
                    f"the API asked us to slow down (429): all requests pause for {verdict.retry_after:g}s",
                    pause_s=verdict.retry_after, http_status=429,
                )  # fmt: skip
            self._resume_at = max(self._resume_at, until)
        if verdict.kind is Kind.SYSTEMIC:
            self.stop(f"the API answered {verdict.result_code}: {verdict.error}", 4)
        if verdict.kind is Kind.ALREADY:
            return verdict  # decided against in_doubt as it stood before this attempt
        work.in_doubt = work.in_doubt or verdict.in_doubt
        return verdict

    def _finish(self, work: _Work, verdict: Verdict, store: Store | None, output: rs.RunOutput) -> str:
        self._crash.reached("before_outcome")
        status = _status_for(verdict, work, self.stopping)
        at = now_iso()
        if store is not None and work.attempts > 0:
            state = cp.PENDING if status == rs.PENDING else status
            store.record_outcome(
                Outcome(
                    work.row.user_id, state, work.in_doubt, verdict.http_status, verdict.result_code,
                    verdict.result_text, verdict.smile_job_id, verdict.job_id, at,
                )
            )  # fmt: skip
        output.result(
            rs.ResultRow(
                work.row.user_id, status, verdict.http_status, verdict.result_code, verdict.result_text,
                verdict.smile_job_id, verdict.job_id, work.attempts, verdict.signature_ok, verdict.error, at,
                work.latency_ms,
            )
        )  # fmt: skip
        self._advance(status)
        ok = status in rs.OK_STATUSES
        # A record per good row costs measurable throughput (benchmarks/); only build one where it is kept.
        if ok and self.settings.log_file is None and not log.isEnabledFor(logging.DEBUG):
            self._trip_breaker(status, verdict)
            return status
        self._event(
            logging.INFO if ok else logging.WARNING, "row_finished",
            f"{work.row.user_id}: {status}" + ("" if ok else f" ({_describe(verdict)})"),
            user_id=work.row.user_id, status=status, attempts=work.attempts, http_status=verdict.http_status,
            result_code=verdict.result_code, latency_ms=work.latency_ms, error=verdict.error,
        )  # fmt: skip
        self._trip_breaker(status, verdict)
        return status

    def _trip_breaker(self, status: str, verdict: Verdict) -> None:
        """Stop when most recent rows fail: a broken image store or an API outage, not bad luck."""
        self._recent.append(status)
        if len(self._recent) < BREAKER_MIN_ROWS or self.stopping:
            return
        failed = sum(1 for s in self._recent if s in _FAILURES)
        if failed / len(self._recent) >= self.settings.fail_threshold:
            last = verdict.result_code or (
                f"HTTP {verdict.http_status}" if verdict.http_status else verdict.error
            )
            self.stop(
                f"{failed} of the last {len(self._recent)} rows failed (--fail-threshold "
                f"{self.settings.fail_threshold}); the latest: {last}. Check the images and the API's status, "
                "then re-run to resume",
                4,
            )

    def _dry_run(self, work: _Work, client: Client, output: rs.RunOutput) -> None:
        try:
            client.body(work.row.user_id, work.row.user_created_at, read_photo(work.row.image_path).b64)
        except OSError as exc:
            output.result(
                rs.ResultRow(work.row.user_id, rs.FAILED, error=f"image can't be read: {exc.strerror}")
            )
            self._advance(rs.FAILED)
            return
        output.result(
            rs.ResultRow(work.row.user_id, rs.DRY_RUN, error="would be sent", finished_at=now_iso())
        )
        self._advance(rs.DRY_RUN)

    def _advance(self, status: str) -> None:
        self._done += 1
        if status not in rs.OK_STATUSES and status != rs.DRY_RUN:
            self._failures += 1
        if self.progress is not None:
            self.progress.advance(status)

    def _summary(self, output: rs.RunOutput, total: int, started: str, t0: float) -> rs.Summary:
        duration = time.monotonic() - t0
        counts = dict(sorted(output.counts.items()))
        accounted = sum(counts.values())
        not_reached = max(0, total - accounted)
        settled = {status for status, n in counts.items() if n}
        ok = settled <= (rs.OK_STATUSES | {rs.DRY_RUN}) and not not_reached
        # A stop on a systemic error or a signal outranks the rows' statuses; a --limit stop does not.
        exit_code = self._stop_code if self._stop_code in (4, 130, 143) else (0 if ok else 1)
        return rs.Summary(
            run_id=output.run_id,
            out_dir=str(output.dir),
            manifest=str(self.manifest_path),
            env=self.settings.env,
            base_url=self.settings.base_url,
            started_at=started,
            finished_at=now_iso(),
            duration_s=round(duration, 3),
            total_rows=total,
            counts=counts,
            rejected=counts.get(rs.REJECTED, 0),
            sent=self._sent,
            new_rows=self._new,
            retries=self._attempts - self._sent,
            attempts=self._attempts,
            not_reached=not_reached,
            rows_per_s=round(accounted / duration, 1) if duration > 0 else 0.0,
            exit_code=exit_code,
            stop_reason=self._stop_reason or self._limit_note,
            dry_run=self.settings.dry_run,
            settings=self.settings.redacted(),
        )


def _describe(verdict: Verdict) -> str:
    if verdict.result_code:
        return f"{verdict.result_code} {verdict.result_text or verdict.error}".strip()
    if verdict.http_status:
        return f"HTTP {verdict.http_status}"
    return verdict.error or "no answer"


def _reused_message(row: Row, k: Known) -> str:
    return (
        f"user_id {row.user_id!r} was already sent with a different photo ({k.image_path}); an ID is never "
        "reused for another user. Give this user a new user_id, or restore the original image"
    )


async def run(
    settings: Settings,
    manifest_path: Path,
    *,
    progress: Progress | None = None,
    sleep: Sleep = asyncio.sleep,
    resend_failed: bool = False,
) -> rs.Summary:
    """Run one backfill in the current event loop."""
    return await Runner(
        settings, manifest_path, progress=progress, sleep=sleep, resend_failed=resend_failed
    ).run()


def run_blocking(
    settings: Settings, manifest_path: Path, *, progress: Progress | None = None, resend_failed: bool = False
) -> rs.Summary:
    """Run one backfill in a new event loop, with SIGINT/SIGTERM stopping it cleanly (exit 130/143)."""

    async def main() -> rs.Summary:
        runner = Runner(settings, manifest_path, progress=progress, resend_failed=resend_failed)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, runner.interrupt, signum)
        return await runner.run()

    return asyncio.run(main())


def prepare_retry(settings: Settings, states: Iterable[str]) -> Path:
    """The manifest `backfill retry` runs: every checkpoint row in `states`, with its recorded image and date."""
    chosen = set(states)
    unknown = chosen - cp.RETRYABLE_STATES
    if unknown or not chosen:
        raise ConfigError(
            "--status", "the command line", f"{', '.join(sorted(unknown)) or 'nothing'} can't be retried",
            f"name some of {', '.join(sorted(cp.RETRYABLE_STATES))}",
        )  # fmt: skip
    rows = cp.iter_rows(settings.checkpoint_path(), chosen)
    return rs.write_retry_manifest(settings.out, settings.columns, rows)

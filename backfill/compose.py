"""The composition root: builds every collaborator of a run from frozen Settings, wires them, and runs it.

The CLI makes one call here per command. Tests call the same functions, or build an `Engine` with collaborators
of their own (an in-memory ledger, a fake image source).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import getpass
import logging
import os
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .api import network, signing
from .api.client import Client, request_url
from .clock import now_iso
from .config import DERIVED_LEDGER, ENVIRONMENTS, Settings, endpoint_of
from .errors import BackfillError, ConfigError, Declined, LedgerAbsent, LedgerError
from .images import Fingerprint, ImageProblem, ImageSource, PhotoKey
from .images.dispatch import DispatchingImageSource
from .images.keyed import KeyedImageSource
from .images.local import LocalImageSource
from .images.urls import is_url, prefix_of
from .ledger import Audit, Binding, Fleet, Forgetting, LedgerRow, LedgerStatus, RunRecord, Store, Tombstone
from .ledger.sqlite import FoundLedger, SqliteStore, find_ledgers
from .manifest import Manifest, ManifestRules, open_manifest
from .outputs.files import RunOutput, write_retry_manifest
from .outputs.private import make_private_dirs
from .run import plan
from .run.claims import Claims, FinishingSink
from .run.crash import CRASH_ENV, CrashPoints
from .run.dryrun import DryRun
from .run.engine import UNRECORDED, Collaborators, Engine, Journal, OnLeave, Progress, RunOptions, Sleep
from .run.events import Events, name_users
from .run.observe import NO_OBSERVER, Observer
from .run.policy import RetryPolicy
from .run.rate import FleetGate, Gate, RateGate
from .run.records import RejectRow, Sink, Summary
from .run.rows import ManifestRows, Rows
from .run.send import Sender
from .run.shared import Census, Sampled, Shared, SharedGroup, SharedPhotoRows, sample_pinned, take_census
from .run.stops import Leaving, Stops, on_systemic
from .run.workers import Workers
from .version import __version__
from .vocab import RETRYABLE_STATES, ExitCode, State, UserIds, parse_states

if TYPE_CHECKING:
    from .images.remote import RemoteImageSource
    from .outputs.metrics import RunMetrics


@dataclass(frozen=True, slots=True, kw_only=True)
class Outbound:
    """What a run is about to send, told before anything is sent or written: for a caller that asks first."""

    rows: int
    source: str  # where the rows come from (the manifest, or the ledger's rows being retried), as said
    partner_id: str
    url: str  # where every request goes
    ledger: str
    limit: int | None


# Asked with what a run is about to send; False stops it (Declined) before its first request or ledger write.
Confirm = Callable[[Outbound], bool]


def _ask(confirm: Confirm, settings: Settings, *, rows: int, source: str) -> None:
    ledger = settings.ledger_location() or str(settings.ledger_path())
    outbound = Outbound(
        rows=rows,
        source=source,
        partner_id=settings.partner_id,
        url=request_url(settings.base_url),
        ledger=ledger,
        limit=settings.limit,
    )
    if not confirm(outbound):
        raise Declined(
            "nothing sent, and the ledger untouched: the answer was not yes. Answer y to send, or "
            "pass --yes to send without being asked"
        )


RETRY_MANIFEST = "the retry manifest backfill wrote"
EXTRA_PIP = "pip install 'backfill[images]'"  # what --normalize needs


def manifest_rules(settings: Settings) -> ManifestRules:
    return ManifestRules(
        user_id_column=settings.columns["user_id"],
        user_created_at_column=settings.columns["user_created_at"],
        image_path_column=settings.columns["image_path"],
        user_id_pattern=settings.user_id_pattern,
        max_image_bytes=settings.max_image_bytes,
        images_root=settings.images_root,
        chunk_rows=settings.chunk_rows,
        delimiter=settings.delimiter,
        encoding=settings.encoding,
        manifest_format=settings.manifest_format,
    )


def binding(settings: Settings) -> Binding:
    return Binding(partner_id=settings.partner_id, endpoint=settings.endpoint)


def retry_policy(settings: Settings) -> RetryPolicy:
    """The run's one retry policy, made once per run here and handed to the sender and to object storage."""
    return RetryPolicy(
        max_attempts=settings.max_attempts,
        backoff_initial=settings.backoff_initial,
        backoff_max=settings.backoff_max,
    )


def api_route(settings: Settings) -> network.Route:
    """How requests reach the API: the environment's proxy for its URL, trusting ca_bundle's CAs or the machine's.
    A proxy variable or a bundle that can't be used is a ConfigError, before anything is opened or sent."""
    return network.route(
        settings.base_url,
        ca_bundle=settings.ca_bundle,
        ca_source=settings.sources.get("ca_bundle", "default"),
    )


def image_source(
    settings: Settings,
    manifest_path: Path | str,
    *,
    policy: RetryPolicy,
    remote: RemoteImageSource | None = None,
) -> ImageSource:
    """Photos resolve against the manifest's own folder (or URL prefix), as relative paths in a CSV naturally
    do; each is read from where it is named, local or object storage (`remote`, else one made on first use
    with the run's retry `policy`)."""
    where = str(manifest_path)
    remote_base = prefix_of(where) if is_url(where) else None
    base = Path.cwd() if remote_base is not None else Path(manifest_path).absolute().parent
    local = LocalImageSource(
        base=base, root=settings.images_root, max_bytes=read_limit(settings), convert=settings.normalize
    )
    found = DispatchingImageSource(
        local=local,
        remote=lambda: remote or remote_image_source(settings, policy),
        base=remote_base,
        root=str(settings.images_root) if settings.images_root is not None else None,
    )
    return normalizing(settings, found) if settings.normalize else found


def read_limit(settings: Settings) -> int:
    """The largest photo read: the API's limit, or with --normalize the larger one of a photo it scales down."""
    if settings.normalize:
        return max(settings.max_source_bytes, settings.max_image_bytes)
    return settings.max_image_bytes


def normalizing(settings: Settings, inner: ImageSource) -> ImageSource:
    """`inner`'s photos normalised on read (Pillow and pillow-heif are loaded only here, only when asked for)."""
    check_normalizer(settings)
    from .images.normalize import NormalizingImageSource

    return NormalizingImageSource(inner, max_bytes=settings.max_image_bytes)


async def trial_reads(images: ImageSource, fingerprints: Sequence[Fingerprint]) -> list[ImageProblem | None]:
    """With --normalize: what a send's read of each photo would refuse (images/normalize.py's `trial`)."""
    from .images.normalize import trial

    return await trial(images, fingerprints)


def check_normalizer(settings: Settings) -> None:
    """With normalize on, a ConfigError unless Pillow and pillow-heif load: asked before a run opens (or makes)
    its ledger or output folder, so the mistake leaves nothing behind."""
    if not settings.normalize:
        return
    try:
        from .images.normalize import load

        load()
    except ImportError as exc:
        raise ConfigError(
            "normalize",
            settings.sources.get("normalize", "default"),
            f"normalising photos needs Pillow and pillow-heif ({exc.name} is missing)",
            f"install them with {EXTRA_PIP}, or turn normalize off",
        ) from exc


def remote_image_source(settings: Settings, policy: RetryPolicy) -> RemoteImageSource:
    """Photos in object storage, with the run's timeouts, retried as the run's retry `policy` says."""
    from .images.remote import RemoteImageSource, StoreOptions  # obstore is loaded only when a URL is used

    return RemoteImageSource(
        max_bytes=read_limit(settings),
        convert=settings.normalize,
        read_concurrency=settings.read_concurrency,
        options=StoreOptions(timeout=settings.timeout, connect_timeout=settings.connect_timeout),
        retries=policy,
    )


async def load_manifest(
    settings: Settings, manifest_path: Path | str, *, policy: RetryPolicy
) -> tuple[Manifest, RemoteImageSource | None]:
    """The manifest, opened and pre-scanned, from a local path or an object URL; for a URL, the source it was
    fetched through (retried as `policy` says), so that its photos reuse the same store per bucket."""
    if isinstance(manifest_path, str) and is_url(manifest_path):
        from .remote_manifest import open_remote_manifest

        remote = remote_image_source(settings, policy)
        return await open_remote_manifest(manifest_path, manifest_rules(settings), remote), remote
    return open_manifest(Path(manifest_path), manifest_rules(settings)), None


async def open_store(settings: Settings, *, writable: bool, bound: bool = True) -> Store:
    """The ledger the settings name. `bound`: refuse one that belongs to another partner or endpoint."""
    if settings.ledger_url is not None:
        return await open_postgres(settings, writable=writable, bound=bound)
    legacy = {env: endpoint_of(url) for env, url in ENVIRONMENTS.items()}
    if writable:  # a new ledger's folder (the default ledgers/ one too) and its missing parents, owner-only
        try:
            make_private_dirs(settings.ledger_path().parent)
        except OSError as exc:
            raise LedgerError(f"can't create the folder {exc.filename}: {exc.strerror}") from exc
    return await SqliteStore.open(
        settings.ledger_path(),
        binding(settings) if bound else None,
        writable=writable,
        legacy_endpoints=legacy,
    )


async def open_postgres(settings: Settings, *, writable: bool, bound: bool = True) -> Store:
    """A fleet's shared ledger (psycopg is loaded only when one is named)."""
    url = settings.ledger_url
    assert url is not None
    try:
        from .ledger.postgres import PostgresStore
    except ImportError as exc:
        raise LedgerError(
            f"a PostgreSQL ledger needs psycopg ({exc.name} is missing). Install it with "
            "pip install 'backfill[postgres]'"
        ) from exc
    return await PostgresStore.open(
        url,
        binding(settings) if bound else None,
        writable=writable,
        pool_size=settings.concurrency + 4,
        lease_s=settings.lease,
        outage_s=settings.ledger_outage,
        retries=retry_policy(settings),
    )


async def run(
    settings: Settings,
    manifest_path: Path | str,
    *,
    progress: Progress | None = None,
    sleep: Sleep = asyncio.sleep,
    resend_failed: bool = False,
    store: Store | None = None,
    images: ImageSource | None = None,
    engine_ready: Any = None,
    confirm: Confirm | None = None,
    on_leave: OnLeave | None = None,
) -> Summary:
    """One backfill in the current event loop. `store`/`images` replace the ones the settings would build.

    `confirm`: asked once the manifest is read, before the ledger is opened (or made) and anything is sent.
    """
    with _fewer_collections():
        return await _run(
            settings,
            manifest_path,
            progress=progress,
            sleep=sleep,
            resend_failed=resend_failed,
            store=store,
            images=images,
            engine_ready=engine_ready,
            confirm=confirm,
            on_leave=on_leave,
        )


@contextlib.contextmanager
def _fewer_collections() -> Iterator[None]:
    """A run allocates a few short-lived objects per row by the million; with the default threshold (700) the
    collector ran every couple of rows, and ~1 in 100 of its runs walked the whole heap (pandas' and every
    module's objects). Young objects are collected 70x less often during the run, and the threshold is put
    back when it ends. Cycles are still collected. (Not gc.freeze: objects alive before the run and dropped
    during it would then be finalized only after it, e.g. a transport whose event loop is gone by then.)"""
    before = gc.get_threshold()
    gc.set_threshold(50_000, 50, 100)
    try:
        yield
    finally:
        gc.set_threshold(*before)


async def _run(
    settings: Settings,
    manifest_path: Path | str,
    *,
    progress: Progress | None,
    sleep: Sleep,
    resend_failed: bool,
    store: Store | None,
    images: ImageSource | None,
    engine_ready: Any,
    confirm: Confirm | None,
    on_leave: OnLeave | None,
) -> Summary:
    check_normalizer(settings)
    policy = retry_policy(settings)
    route = api_route(settings)
    manifest, remote = await load_manifest(settings, manifest_path, policy=policy)
    if confirm is not None:
        # The manifest is read for its row count first: a question without the number is not worth answering.
        _ask(
            confirm,
            settings,
            rows=manifest.total_rows,
            source=f"the manifest {manifest_path}; those the ledger holds as done are skipped",
        )
    own_store = store is None
    if store is None:
        # Before the output folder: a locked ledger leaves no litter. A dry run only reads, and may find none.
        if settings.dry_run:
            # What would be skipped needs the ledger; one bound to another partner or endpoint is an error.
            if settings.ledger_url is not None:
                with contextlib.suppress(LedgerAbsent):  # no ledger yet: nothing would be skipped
                    store = await open_store(settings, writable=False)
            elif settings.ledger_path().exists():
                store = await open_store(settings, writable=False)
        else:
            store = await open_store(settings, writable=True)
    images = images or image_source(settings, manifest.name, policy=policy, remote=remote)
    # Every line the run logs names its users as log_user_ids says (keyed by this ledger's secret if hashed).
    unname_users = name_users(user_naming(settings, store))
    metrics: RunMetrics | None = None
    try:
        # Before the output folder: a port already taken leaves no litter.
        metrics = serve_metrics(settings)
        output = RunOutput(settings.out)
        if metrics is not None:
            metrics.describe(run_id=output.run_id, env=settings.env)
        client = Client(
            settings.base_url,
            settings.partner_id,
            settings.api_key,
            timeout=settings.timeout,
            connect_timeout=settings.connect_timeout,
            concurrency=settings.concurrency,
            route=route,
        )
        engine = build_engine(
            settings,
            manifest=manifest,
            store=store,
            images=images,
            client=client,
            policy=policy,
            sink=output,
            run_id=output.run_id,
            out_dir=str(output.dir),
            observer=metrics,
            progress=progress,
            sleep=sleep,
            resend_failed=resend_failed,
            on_leave=on_leave,
        )
        if engine_ready is not None:
            engine_ready(engine)
        try:
            async with client:
                summary = await engine.run()
        except BaseException:
            if output.close_incomplete():
                # Best effort: if the ledger can't hear it, this run's rows are claimed again later, and skipped.
                with contextlib.suppress(BackfillError):
                    await _outputs_written(store, settings)
            raise
        output.close(summary)
        await _outputs_written(store, settings)
        return summary
    finally:
        unname_users()
        if metrics is not None:
            await asyncio.to_thread(metrics.close)  # waits for the listener's thread: off the event loop
        await images.close()
        if own_store and store is not None:
            await store.close()


def user_naming(settings: Settings, store: Store | None) -> Callable[[str], str] | None:
    """How the run's log lines name a user; None: by the user_id itself (the default)."""
    mode = UserIds(settings.log_user_ids)
    if mode is UserIds.PLAIN:
        return None
    if mode is UserIds.OMIT:
        return lambda _: OMITTED
    # A dry run with no ledger yet: a key of the moment, so nothing said can name a user.
    key = store.photo_key if store is not None else PhotoKey.new()
    return key.user


OMITTED = "(user)"  # a user_id in a log line when log_user_ids is omit


def run_options(settings: Settings, *, resend_failed: bool = False) -> RunOptions:
    """What the engine reads of the settings."""
    return RunOptions(
        concurrency=settings.concurrency,
        status_every=settings.status_every,
        max_duration=settings.max_duration,
        stop_timeout=settings.stop_timeout,
        limit=settings.limit,
        fail_threshold=settings.fail_threshold,
        resend_failed=resend_failed,
        log_rows=settings.log_file is not None,
        env=settings.env,
        base_url=settings.base_url,
        dry_run=settings.dry_run,
        settings=settings.redacted(),
        audit=audit(settings),
    )


def audit(settings: Settings) -> Audit:
    """Who runs this, from where, with what: the operator (BACKFILL_OPERATOR, else the OS user), the host, the
    tool's version and the API key's key_id (never the key)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a bare container): its number says who
        user = f"uid {os.getuid()}"
    return Audit(
        operator=settings.operator or user,
        host=socket.gethostname(),
        version=__version__,
        api_key_id=signing.key_id(settings.api_key.reveal()) if settings.api_key else "",
        partner_id=settings.partner_id,
        endpoint=settings.endpoint,
    )


def build_engine(
    settings: Settings,
    *,
    manifest: Manifest,
    store: Store | None,
    images: ImageSource,
    client: Client,
    policy: RetryPolicy,
    sink: Sink,
    run_id: str,
    out_dir: str,
    observer: Observer | None = None,
    progress: Progress | None = None,
    sleep: Sleep = asyncio.sleep,
    resend_failed: bool = False,
    on_leave: OnLeave | None = None,
    crash: CrashPoints | None = None,
) -> Engine:
    """The engine of one run, with every collaborator chosen here: one process's or a fleet's row source, rate
    gate and sink, the sender or a dry run's stand-in, and the crash points (from the environment, by default).
    """
    events = Events(run_id)
    sending: Sender | DryRun | None = None

    def leaving(signum: int) -> None:
        assert on_leave is not None
        in_flight = sending.in_flight if sending is not None else 0
        on_leave(Leaving(signum=signum, in_flight=in_flight, out_dir=out_dir))

    stops = Stops(sleep, leaving=leaving if on_leave is not None else None)
    workers = Workers()
    watcher = observer if observer is not None else NO_OBSERVER
    rows: Rows = ManifestRows(manifest)
    done_of: plan.DoneOf | None = None
    gate: Gate = RateGate(settings.rate)
    fleet = _fleet_of(store, settings)
    if fleet is not None:
        # A process of a fleet: rows are claimed from the shared ledger, and the rate is the fleet's.
        claims = Claims(
            fleet,
            manifest,
            batch=max(16, min(settings.chunk_rows, settings.concurrency * 4)),
            stopping=lambda: stops.stopping,
            nap=stops.nap,
        )

        def unsaid(error: BaseException) -> None:
            events(logging.WARNING, "fleet_rate_unsaid", f"can't tell the fleet's rate limit: {error}")

        rows, sink = claims, FinishingSink(sink, claims)
        gate = FleetGate(fleet, settings.rate, on_error=unsaid)
    if store is not None:
        # Every pin the run makes or compares is keyed by the ledger's own secret, whatever source it was given.
        images = KeyedImageSource(images, store.photo_key)
    if settings.max_ids_per_photo:
        keyed, limit = images, settings.max_ids_per_photo

        async def census() -> Shared | None:
            shared = await take_census(
                manifest, keyed, max_ids=limit, store=store, stopping=lambda: stops.stopping
            )
            if shared is not None:
                said = (
                    f"{shared.groups} photo(s) named by more than {limit} user_id(s) (max_ids_per_photo): "
                    f"their {shared.rejected} rows not enrolled yet are rejected as shared_photo"
                    if shared.groups
                    else f"none named by more than {limit} user_id(s) (max_ids_per_photo)"
                )
                if shared.unread:
                    said += (
                        f"; {shared.unread} row(s) whose photo couldn't be read whole to be counted are held back "
                        "(rejects.csv says why; run again to send them)"
                    )
                events(
                    logging.WARNING if shared.groups or shared.unread else logging.INFO,
                    "photos_counted",
                    f"photos counted: {shared.photos} still to be sent, {shared.read_whole} of them read whole; "
                    + said,
                    photos=shared.photos,
                    read_whole=shared.read_whole,
                    shared_photos=shared.groups,
                    rejected=shared.rejected,
                )
            return shared

        if store is not None:
            # Asked by the shared-photo rows of each chunk (all done: no census), then by the planner: one query.
            done_of = plan.DoneOnce(store)
        rows = SharedPhotoRows(rows, census, done=done_of)
    journal: Journal = UNRECORDED
    if store is None or settings.dry_run:
        sending = DryRun(images=images, client=client)
    else:
        journal = store
        sending = Sender(
            store=store,
            images=images,
            client=client,
            gate=gate,
            policy=policy,
            crash=crash if crash is not None else CrashPoints(os.environ.get(CRASH_ENV)),
            run_id=run_id,
            stops=stops,
            on_systemic=on_systemic(stops),
            event=events,
            observer=watcher,
            fleet=fleet is not None,
            workers=workers,
        )
    parts = Collaborators(
        manifest=manifest,
        rows=rows,
        store=store,
        images=images,
        sending=sending,
        gate=gate,
        journal=journal,
        sink=sink,
        stops=stops,
        workers=workers,
        events=events,
        run_id=run_id,
        out_dir=out_dir,
        observer=watcher,
        done_of=done_of,
    )
    return Engine(run_options(settings, resend_failed=resend_failed), parts, progress=progress)


def _fleet_of(store: Store | None, settings: Settings) -> Fleet | None:
    """The fleet this run is a process of: a shared ledger, unless the run is dry (which claims nothing)."""
    return store if isinstance(store, Fleet) and not settings.dry_run else None


async def _outputs_written(store: Store | None, settings: Settings) -> None:
    """A fleet's run tells the ledger its outputs are whole: only then are the rows it finished safe."""
    fleet = _fleet_of(store, settings)
    if fleet is not None:
        await fleet.outputs_written()


def serve_metrics(settings: Settings) -> RunMetrics | None:
    """The run's Prometheus listener when `metrics_addr` is set (prometheus_client is loaded only then)."""
    if settings.metrics_addr is None:
        return None
    from .outputs.metrics import RunMetrics

    metrics = RunMetrics()
    metrics.serve(settings.metrics_addr, source=settings.sources.get("metrics_addr", "flag --metrics-addr"))
    return metrics


def run_blocking(
    settings: Settings,
    manifest_path: Path | str,
    *,
    progress: Progress | None = None,
    resend_failed: bool = False,
    on_interrupt: OnInterrupt | None = None,
    confirm: Confirm | None = None,
    on_leave: OnLeave | None = None,
) -> Summary:
    """One backfill in a new event loop, with SIGINT/SIGTERM stopping it cleanly (exit 130/143).

    `on_interrupt(signum, in_flight, wait_s)` hears the first signal at once, before the rows in flight finish
    (they are waited for `wait_s` seconds at most);
    `on_leave(leaving)` hears what a second one leaves behind, just before the process exits.
    """

    def ready(engine: Engine) -> None:
        _stop_on_signals(engine, on_interrupt)

    return asyncio.run(
        run(
            settings,
            manifest_path,
            progress=progress,
            resend_failed=resend_failed,
            engine_ready=ready,
            confirm=confirm,
            on_leave=on_leave,
        )
    )


# The first SIGINT/SIGTERM of a run, how many requests it still waits for, and for how many seconds at most: the
# caller's to show.
OnInterrupt = Callable[[int, int, float], None]


def _stop_on_signals(engine: Engine, on_interrupt: OnInterrupt | None) -> None:
    """SIGINT/SIGTERM stop the run cleanly, waiting for answers in flight --stop-timeout at most; a second one
    leaves at once (see run/stops.py)."""
    loop = asyncio.get_running_loop()
    heard = 0

    def handle(signum: int) -> None:
        nonlocal heard
        heard += 1
        if heard == 1 and on_interrupt is not None:
            # Told before the engine stops: a stop can wait up to --stop-timeout for answers, in silence otherwise.
            on_interrupt(signum, engine.in_flight, engine.stop_wait)
        engine.interrupt(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, handle, signum)


def validate(settings: Settings, manifest_path: Path | str) -> tuple[int, list[RejectRow]]:
    """(number of valid rows, every reject): every rule, text and image, with no ledger and nothing sent."""
    found = validation(settings, manifest_path)
    return found.valid, found.rejects


@dataclass(frozen=True, slots=True, kw_only=True)
class Validation:
    """What `backfill validate` finds: the valid rows, every reject, and the photos shared by several IDs."""

    valid: int
    rejects: list[RejectRow]
    shared: list[SharedGroup]  # the largest SHOWN_GROUPS shared photos
    shared_photos: int  # photos named by more IDs than max_ids_per_photo allows
    read_whole: int  # photos read whole to tell them apart (the candidates; the others only head and tail)


SHOWN_GROUPS = 20


def validation(settings: Settings, manifest_path: Path | str) -> Validation:
    """Every rule, text and image, and the shared-photo census (unless max_ids_per_photo is 0); no ledger, so
    nothing is known done and the digests are plain SHA-256, held in memory only."""

    async def go() -> Validation:
        policy = retry_policy(settings)
        manifest, remote = await load_manifest(settings, manifest_path, policy=policy)
        images = image_source(settings, manifest.name, policy=policy, remote=remote)
        # Its samples keyed by a key of its own: validate has no ledger, and keeps nothing past its end.
        census = Census(settings.max_ids_per_photo, PhotoKey.new()) if settings.max_ids_per_photo else None
        valid, rejects = 0, []
        try:
            for batch in manifest.batches():
                rejects += [
                    RejectRow(line=r.line, user_id=r.user_id, reason=r.reason, message=r.message)
                    for r in batch.rejects
                ]
                sendable = []
                for d in await plan.decide(batch.candidates, {}, images):
                    if isinstance(d, plan.ToSend):
                        valid += 1
                        sendable.append(d)
                    elif d.reason is not None:
                        rejects.append(
                            RejectRow(line=d.line, user_id=d.user_id, reason=d.reason, message=d.message)
                        )
                if settings.normalize and sendable:
                    # A damaged HEIC passes a check of its head and tail: only decoding it, as a send does, tells.
                    tried = await trial_reads(images, [d.fingerprint for d in sendable])
                    for d, problem in zip(sendable, tried, strict=True):
                        if problem is not None:
                            valid -= 1
                            rejects.append(
                                RejectRow(
                                    line=d.line,
                                    user_id=d.user_id,
                                    reason=problem.reason,
                                    message=problem.message,
                                )
                            )
                    sendable = [d for d, problem in zip(sendable, tried, strict=True) if problem is None]
                if census is not None:
                    census.add((d.line, d.user_id, d.fingerprint) for d in sendable)
            groups: list[SharedGroup] = []
            shared_photos = read_whole = 0
            if census is not None:
                shared = await census.settle(images)
                for r in shared.every_reject():
                    valid -= 1
                    rejects.append(
                        RejectRow(line=r.line, user_id=r.user_id, reason=r.reason, message=r.message)
                    )
                groups = shared.listing(SHOWN_GROUPS)
                shared_photos, read_whole = shared.groups, shared.read_whole
        finally:
            if census is not None:
                census.close()
            await images.close()
        rejects.sort(key=lambda r: r.line)
        return Validation(
            valid=valid,
            rejects=rejects,
            shared=groups,
            shared_photos=shared_photos,
            read_whole=read_whole,
        )

    return asyncio.run(go())


def ledgers(settings: Settings) -> list[FoundLedger]:
    """`backfill ledgers`: every SQLite ledger in the default folder, each read without writing."""
    return find_ledgers(settings.ledger_folder)


# How many ledgers an error names before it points at `backfill ledgers` for the rest.
NAMED_AT_MOST = 5


def default_or_only(settings: Settings, *, sending: bool) -> tuple[Settings, FoundLedger | None]:
    """The settings a command that reads (or retries) a ledger uses, and the ledger found in their place, if any.

    Unless --ledger, --env or --base-url is given (anywhere: flag, environment, file), a command reads the default
    ledger of the default API. When that one doesn't exist but others do (a rehearsal with --env local), it reads
    the only one bound to this partner instead, and says so (None: the settings as they are). `sending` (retry):
    only one for an API whose URL an --env names and that isn't production, which is only ever used when asked
    for. Several, or none for this partner: LedgerAbsent naming them.
    """
    if _picks_a_ledger(settings) or settings.ledger_path().exists():
        return settings, None
    found = [f for f in ledgers(settings) if f.binding is not None and not f.problem]
    if not found:
        return settings, None  # no ledger anywhere: as it always was (nothing yet to read or retry)
    mine = [
        f for f in found if settings.partner_id and f.binding and f.binding.partner_id == settings.partner_id
    ]
    if len(mine) == 1 and mine[0].binding is not None:
        only, endpoint = mine[0], mine[0].binding.endpoint
        said = f"the only ledger for partner {settings.partner_id} in {settings.ledger_folder}"
        sources = {**settings.sources, "ledger": said}
        if not sending:
            return dataclasses.replace(settings, ledger=Path(only.path), sources=sources), only
        env = next((e for e, url in ENVIRONMENTS.items() if endpoint_of(url) == endpoint), None)
        if env is not None and env != "production":
            chosen = dataclasses.replace(
                settings,
                env=env,
                base_url=ENVIRONMENTS[env],
                ledger=Path(only.path),
                sources={**sources, "env": said, "base_url": f"env={env}"},
            )
            return chosen, only
    raise LedgerAbsent(_which_ledger(settings, mine or found, sending=sending))


def _picks_a_ledger(settings: Settings) -> bool:
    """Whether --ledger, --env or --base-url was given anywhere, rather than each left to its default."""
    s = settings.sources
    derived = s.get("ledger", "").startswith(DERIVED_LEDGER) and s.get("base_url", "").startswith("env=")
    return not (derived and s.get("env") == "default")


def _which_ledger(settings: Settings, found: list[FoundLedger], *, sending: bool) -> str:
    """Why no ledger was read, naming those there are (with the --env that picks each, where one does)."""
    named = []
    for f in found[:NAMED_AT_MOST]:
        assert f.binding is not None
        env = next((e for e, url in ENVIRONMENTS.items() if endpoint_of(url) == f.binding.endpoint), None)
        rows = f"{f.rows:,} row{'' if f.rows == 1 else 's'}"
        picks = f"; --env {env} picks it" if env is not None else ""
        named.append(f"{f.path} (partner {f.binding.partner_id}, {f.binding.endpoint}, {rows}{picks})")
    more = f"; and {len(found) - NAMED_AT_MOST} more" if len(found) > NAMED_AT_MOST else ""
    partner = f"partner {settings.partner_id}" if settings.partner_id else "no partner ID set"
    how = (
        "Name its API with --env, or with --base-url and --ledger PATH: a retry sends, so it picks a ledger itself "
        "only when an --env other than production names its API"
        if sending
        else "Name one with --ledger PATH, or with the --env or --base-url of its API"
    )
    return (
        f"no ledger at {settings.ledger_path()} ({partner}, {settings.endpoint}, the default --env "
        f"{settings.env}). The ledgers in {settings.ledger_folder}: {'; '.join(named)}{more}. {how} "
        "(backfill ledgers lists them all)"
    )


def status(settings: Settings) -> LedgerStatus:
    async def go() -> LedgerStatus:
        store = await open_store(settings, writable=False, bound=False)
        try:
            return await store.status()
        finally:
            await store.close()

    return asyncio.run(go())


def find_users(settings: Settings, user_ids: Sequence[str]) -> list[tuple[str, str, Tombstone | None]]:
    """`backfill find-user`: each user_id with the name log lines give it under log_user_ids: hashed, which is
    also its tombstone's key, and that tombstone when it was forgotten (`backfill forget`)."""

    async def go() -> list[tuple[str, str, Tombstone | None]]:
        store = await open_store(settings, writable=False, bound=False)
        try:
            gone = await store.forgotten(user_ids)
            return [(uid, store.photo_key.user(uid), gone.get(uid)) for uid in user_ids]
        finally:
            await store.close()

    return asyncio.run(go())


def sample_photos(settings: Settings) -> Sampled:
    """`backfill sample-photos`: the samples of the photos the ledger pinned before it kept them, taken from
    where each was sent (run/shared.py's `sample_pinned`), so that later runs' censuses count those IDs."""

    async def go() -> Sampled:
        store = await open_store(settings, writable=True, bound=False)
        try:
            # Refs are absolute paths or URLs: the folder photos resolve against doesn't matter.
            images = image_source(settings, Path.cwd() / "ledger", policy=retry_policy(settings))
            try:
                return await sample_pinned(store, images)
            finally:
                await images.close()
        finally:
            await store.close()

    return asyncio.run(go())


def migration_report(settings: Settings, output: Path | None, *, overwrite: bool = False) -> Path:
    """`backfill report --ledger`: one report across the whole ledger the settings name; its path."""
    from .outputs.report import write_migration_report
    from .outputs.report.migration import read_ledger

    async def go() -> Path:
        store = await open_store(settings, writable=False, bound=False)
        try:
            view = await read_ledger(store)
        finally:
            await store.close()
        return write_migration_report(view, out_dir=settings.out, output=output, overwrite=overwrite)

    return asyncio.run(go())


EXPORT_FIELDS = (
    "user_id",
    "user_created_at",
    "image_path",
    "state",
    "in_doubt",
    "attempts",
    "http_status",
    "result_code",
    "result_text",
    "smile_job_id",
    "job_id",
    "photo_sha256",
    "first_attempt_at",
    "last_attempt_at",
    "finished_at",
    "run_id",
    "sent_sha256",
    "transform",
)


def export_fields(settings: Settings) -> tuple[str, ...]:
    """The export's columns: the manifest's three under the names `run` with the same settings reads."""
    names = {
        "user_id": settings.columns["user_id"],
        "user_created_at": settings.columns["user_created_at"],
        "image_path": settings.columns["image_path"],
    }
    return tuple(names.get(f, f) for f in EXPORT_FIELDS)


def _export_row(row: LedgerRow, fields: tuple[str, ...]) -> dict[str, Any]:
    values = (
        row.user_id,
        row.user_created_at,
        row.image_ref,
        row.state.value,
        row.in_doubt,
        row.attempts,
        row.http_status,
        row.result_code,
        row.result_text,
        row.smile_job_id,
        row.job_id,
        row.photo_sha256,
        row.first_attempt_at,
        row.last_attempt_at,
        row.finished_at,
        row.run_id,
        row.sent_sha256,
        row.transform,
    )
    return dict(zip(fields, values, strict=True))


def parse_status_names(
    raw: str, *, allowed: frozenset[State] = frozenset(State), what: str = "exported"
) -> list[State]:
    try:
        return parse_states(raw, allowed=allowed, what=what)
    except ValueError as exc:
        raise ConfigError("--status", "the command line", str(exc), "correct the state names") from None


def export_rows(settings: Settings, states: Collection[State] | None) -> Iterator[dict[str, Any]]:
    """Every ledger row (or those in `states`), streamed, as export dicts. Opens the ledger before yielding."""
    fields = export_fields(settings)
    loop = asyncio.new_event_loop()
    store = loop.run_until_complete(open_store(settings, writable=False, bound=False))

    def rows() -> Iterator[dict[str, Any]]:
        source: AsyncIterator[LedgerRow] = store.rows(states)
        try:
            while True:
                try:
                    row = loop.run_until_complete(anext(source))
                except StopAsyncIteration:
                    return
                yield _export_row(row, fields)
        finally:
            loop.run_until_complete(store.close())
            loop.close()

    return rows()


def retry(
    settings: Settings,
    states: Collection[State],
    *,
    progress: Progress | None = None,
    on_interrupt: OnInterrupt | None = None,
    confirm: Confirm | None = None,
    on_leave: OnLeave | None = None,
) -> Summary | None:
    """`backfill retry`: re-send ledger rows in `states` through a run, with every guarantee of `run`.

    The ledger is locked first, so a retry refused as "in use" leaves no record of a send that never happened;
    with nothing to retry, no run folder is made (None). `confirm` is asked before the ledger is opened to
    write, from a reader's count of the rows (nothing to retry: nothing is asked).
    """
    wrong = set(states) - RETRYABLE_STATES
    if wrong or not states:
        raise _bad_states(wrong)
    check_normalizer(settings)

    async def go() -> Summary | None:
        if confirm is not None:
            rows = await _count_rows(settings, states)
            if not rows:
                return None
            _ask(confirm, settings, rows=rows, source=f"the ledger, in {', '.join(sorted(states))}")
        store = await open_store(settings, writable=True)
        try:
            chosen = [r async for r in store.rows(states)]
            if not chosen:
                return None
            path = write_retry_manifest(
                settings.out,
                settings.columns,
                ([r.user_id, r.user_created_at or "", r.image_ref or ""] for r in chosen),
            )

            def ready(engine: Engine) -> None:
                _stop_on_signals(engine, on_interrupt)

            # The retry manifest is the tool's own CSV (comma, UTF-8), whatever the partner's manifests are in.
            own = dataclasses.replace(
                settings,
                delimiter=Settings.delimiter,
                encoding=Settings.encoding,
                manifest_format="csv",
                sources={
                    **settings.sources,
                    "delimiter": RETRY_MANIFEST,
                    "encoding": RETRY_MANIFEST,
                    "manifest_format": RETRY_MANIFEST,
                },
            )
            return await run(
                own,
                path,
                progress=progress,
                resend_failed=State.FAILED in states,
                store=store,
                engine_ready=ready,
                on_leave=on_leave,
            )
        finally:
            await store.close()

    return asyncio.run(go())


async def _count_rows(settings: Settings, states: Collection[State]) -> int:
    """The ledger's rows in `states`, read without writing (none when there is no ledger yet)."""
    if settings.ledger_url is None and not settings.ledger_path().exists():
        return 0
    try:
        store = await open_store(settings, writable=False)
    except LedgerAbsent:
        return 0
    try:
        counts = (await store.status()).counts
    finally:
        await store.close()
    return sum(counts.get(state.value, 0) for state in states)


def _bad_states(wrong: Collection[State]) -> Exception:
    return ConfigError(
        "--status",
        "the command line",
        f"{', '.join(sorted(wrong)) or 'nothing'} can't be retried",
        f"name some of {', '.join(sorted(RETRYABLE_STATES))}",
    )


def stop_on_signals(engine: Engine) -> Callable[[], None]:
    """For a library caller that asks for it: SIGINT and SIGTERM stop `engine`'s run as they stop the CLI's
    (`_stop_on_signals`). The function returned takes the handlers away again and puts back those before, so that
    the caller's process is left as it was found."""
    loop = asyncio.get_running_loop()
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    _stop_on_signals(engine, None)

    def undo() -> None:
        for signum, handler in before.items():
            loop.remove_signal_handler(signum)
            if handler is not None:  # None: set from outside Python, which can't be put back from here
                signal.signal(signum, handler)

    return undo


@dataclass(frozen=True, slots=True, kw_only=True)
class Erasure:
    """What `forget` or `purge` is about to remove, told before anything is: for the caller that asks first."""

    command: str  # as the audit trail records it: "backfill forget" or "backfill purge --before DATE"
    ledger: str
    found: Forgetting  # what it would do, as a dry run found it


# Asked before an erasure, which can't be undone; False stops it (Declined) before anything is removed.
ConfirmErasure = Callable[[Erasure], bool]


@dataclass(frozen=True, slots=True, kw_only=True)
class Erased:
    """What a `forget` or `purge` did (`dry_run`: would do), and its record in the runs table."""

    run_id: str | None  # None for a dry run: nothing was done, so nothing is recorded
    done: Forgetting
    ledger: str
    dry_run: bool
    # The first of the named IDs the ledger never held (nothing to forget): shown to whoever named them, since a
    # mistyped or mangled ID would otherwise pass for an erasure done. Never written to the audit trail.
    never_held: tuple[str, ...] = ()

    @property
    def exit_code(self) -> int:
        # A row refused (an attempt in flight) is still held whole: the erasure is not done.
        return ExitCode.ROWS_LEFT if self.done.refused else ExitCode.OK


def forget(
    settings: Settings,
    user_ids: Sequence[str],
    *,
    dry_run: bool = False,
    confirm: ConfirmErasure | None = None,
) -> Erased:
    """`backfill forget`: remove these users' personal data from the ledger, each leaving a tombstone."""
    ids = list(dict.fromkeys(user_ids))
    what = f"backfill forget ({len(ids):,} user_id{'' if len(ids) == 1 else 's'} named)"
    never: list[str] = []

    async def work(store: Store, by: str, dry: bool) -> Forgetting:
        found = await store.forget(ids, at=now_iso(), by=by, dry_run=dry)
        if dry and found.unknown and not never:  # the first pass is always a dry one: the ledger as it was
            never.extend(await _never_held(store, ids))
        return found

    erased = asyncio.run(_erase(settings, what, work, dry_run=dry_run, confirm=confirm))
    return dataclasses.replace(erased, never_held=tuple(never))


NEVER_HELD_SHOWN = 20


async def _never_held(store: Store, ids: list[str]) -> list[str]:
    """The first NEVER_HELD_SHOWN of `ids` that the ledger holds neither as a row nor as a tombstone."""
    never: list[str] = []
    for start in range(0, len(ids), 1000):
        part = ids[start : start + 1000]
        held, gone = await store.lookup(part), await store.forgotten(part)
        never += [uid for uid in part if uid not in held and uid not in gone]
        if len(never) >= NEVER_HELD_SHOWN:
            break
    return never[:NEVER_HELD_SHOWN]


def purge(
    settings: Settings, before: str, *, dry_run: bool = False, confirm: ConfirmErasure | None = None
) -> Erased:
    """`backfill purge --before DATE`: forget every row finished (FINISHED_STATES) before DATE."""

    async def work(store: Store, by: str, dry: bool) -> Forgetting:
        return await store.purge(before, at=now_iso(), by=by, dry_run=dry)

    return asyncio.run(
        _erase(settings, f"backfill purge --before {before}", work, dry_run=dry_run, confirm=confirm)
    )


async def _erase(
    settings: Settings,
    command: str,
    work: Callable[[Store, str, bool], Awaitable[Forgetting]],
    *,
    dry_run: bool,
    confirm: ConfirmErasure | None,
) -> Erased:
    if settings.ledger_url is None and not settings.ledger_path().is_file():
        raise LedgerAbsent(f"no ledger at {settings.ledger_path()}: nothing to forget. Name it with --ledger")
    store = await open_store(settings, writable=True, bound=False)
    try:
        found = await work(store, "", True)
        if dry_run:
            return Erased(run_id=None, done=found, ledger=store.location, dry_run=True)
        # Recorded even when it removes nothing (every ID unknown, or forgotten before; a purge with nothing old
        # enough): the audit trail shows that the request was carried out. Asked only when something goes.
        asked = Erasure(command=command, ledger=store.location, found=found)
        if confirm is not None and found.count > 0 and not confirm(asked):
            raise Declined(
                "nothing forgotten: the answer was not yes. Answer y, or pass --yes to forget unasked"
            )
        who = audit(settings)
        run_id = (
            f"{now_iso().replace('-', '').replace(':', '').replace('.', '')}-forget-{uuid.uuid4().hex[:6]}"
        )
        await store.start_run(
            RunRecord(
                run_id=run_id,
                started_at=now_iso(),
                manifest=command,
                pid=os.getpid(),
                host=who.host,
                operator=who.operator,
                version=who.version,
                api_key_id=who.api_key_id or None,
            )
        )
        done = await work(store, run_id, False)
        code = ExitCode.ROWS_LEFT if done.refused else ExitCode.OK
        await store.note_run(run_id, erasure_note(done))
        await store.finish_run(run_id, finished_at=now_iso(), rows=done.count, exit_code=code)
        await store.flush()
        return Erased(run_id=run_id, done=done, ledger=store.location, dry_run=False)
    finally:
        await store.close()


def erasure_note(done: Forgetting, *, dry: bool = False) -> str:
    """What the audit trail says an erasure did (`dry`: what it would do): counts only, never a user_id."""
    states = ", ".join(f"{n:,} {state}" for state, n in done.forgotten.items()) or "none"
    said = f"{'forget' if dry else 'forgot'} {done.count:,} row{'' if done.count == 1 else 's'} ({states})"
    if done.already:
        said += f"; {done.already:,} forgotten before"
    if done.unknown:
        said += f"; {done.unknown:,} never in the ledger"
    if done.refused:
        said += f"; {len(done.refused):,} refused (an attempt in flight: retry them first)"
    return said

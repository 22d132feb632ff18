"""`backfill check`: everything a production run needs, tested without sending anything that could enroll anyone."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import ssl
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from . import compose
from .api.answers import printable, proxy_fix, url_for_messages
from .api.network import Route
from .clock import now_iso
from .config import Settings
from .errors import BackfillError, ConfigError, LedgerAbsent
from .images import Fingerprint, ImageError, ImageProblem, ImageSource, PhotoKey
from .images.keyed import KeyedImageSource
from .ledger import AttemptRequest, LedgerRow, Refusal, Refused, Store, transitions
from .ledger.sqlite import writer_alive
from .manifest import Candidate, Manifest
from .run import plan
from .run.plan import SENT_BYTES_DIFFER
from .run.shared import take_census
from .vocab import DONE_STATES, ExitCode, Reason

SAMPLE = 20  # photos checked from the head of the manifest, and as many again drawn at random
MAX_SKEW_S = 60.0  # the server checks each signature's timestamp; no tolerance is documented (API.md)
_SHOWN_SETTINGS = ("env", "base_url", "partner_id", "api_key", "ledger", "rate", "concurrency")


@dataclass(frozen=True, slots=True, kw_only=True)
class Check:
    """One line of the preflight: `severity` is the exit code a failure of it means (2 local, 3, 4 systemic)."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    severity: ExitCode = ExitCode.LOCAL


def exit_code(checks: list[Check]) -> int:
    """As for `run`: 0 when all is well, else the gravest failure's code (a systemic one outranks a local one)."""
    return max((int(c.severity) for c in checks if not c.ok), default=int(ExitCode.OK))


def run_checks(settings: Settings, manifest: Path | str) -> list[Check]:
    """Every check, in the order an operator fixes things; nothing is POSTed and the ledger is never written."""
    return asyncio.run(_checks(settings, manifest))


async def _checks(settings: Settings, manifest_path: Path | str) -> list[Check]:
    checks = [_settings_check(settings), *_credentials_checks(settings)]
    manifest: Manifest | None = None
    policy = compose.retry_policy(settings)  # object storage's, for the manifest's and the photos' reads
    try:
        manifest, remote = await compose.load_manifest(settings, manifest_path, policy=policy)
    except BackfillError as exc:
        checks.append(Check(name="manifest", ok=False, detail=str(exc), fix="fix what the message names"))
        remote = None
    sample: list[Candidate] = []
    ids: list[str] | None = None
    if manifest is not None:
        rows, rejected, sample, ids = _scan(manifest)
        checks.append(
            Check(
                name="manifest",
                ok=True,
                detail=f"{manifest.name}: {rows} rows, {len(ids)} pass the text rules, {rejected} don't"
                + (" (`backfill validate` lists them)" if rejected else ""),
            )
        )
    ledger, known, forgotten, key = await _ledger_checks(settings, ids, sample)
    checks += ledger
    # As a run does: a forgotten ID's photo is never read, and a done row's photo is compared with its pin
    # (below), not checked as one to be sent.
    to_send = [
        c
        for c in sample
        if c.user_id not in forgotten and not (c.user_id in known and known[c.user_id].state in DONE_STATES)
    ]
    checks += await _api_checks(settings)
    if manifest is not None:
        images = compose.image_source(settings, manifest.name, policy=policy, remote=remote)
        if key is not None:  # pins compared as the run compares them: keyed by the ledger's secret
            images = KeyedImageSource(images, key)
        try:
            checks.append(await _images_check(to_send, images, decode=settings.normalize))
            if known:
                checks.append(await _pins_check(sample, known, images))
            if settings.max_ids_per_photo:
                checks.append(await _shared_check(settings, manifest, images, ledger=key is not None))
        finally:
            await images.close()
    return checks


SHOWN_GROUPS = 5


async def _shared_check(
    settings: Settings, manifest: Manifest, images: ImageSource, *, ledger: bool
) -> Check:
    """The census `run` takes before its first row (run/shared.py), on every photo's head and tail: the photos
    named by more user_ids than max_ids_per_photo allows. `ledger`: one opened, so its done rows count as a
    run counts them (by their pin; never rejected)."""
    store = None
    if ledger:
        with contextlib.suppress(BackfillError):  # the ledger's own check has said why
            store = await compose.open_store(settings, writable=False)
    try:
        shared = await take_census(manifest, images, max_ids=settings.max_ids_per_photo, store=store)
    finally:
        if store is not None:
            await store.close()
    assert shared is not None  # nothing stops a check
    try:
        allowed = settings.max_ids_per_photo
        ids = "user_id" if allowed == 1 else "user_ids"
        unread = (
            f"; {shared.unread} row(s) whose photo is alike in size, head and tail to another's couldn't be read "
            "whole to be counted: `run` holds them back unless they read then"
            if shared.unread
            else ""
        )
        if not shared.groups and not shared.unread:
            return Check(
                name="shared photos",
                ok=True,
                detail=f"{shared.photos} photos still to be sent, none named by more than {allowed} {ids} "
                f"(max_ids_per_photo; {shared.read_whole} alike in size, head and tail read whole)",
            )
        if not shared.groups:
            return Check(
                name="shared photos",
                ok=False,
                detail=f"{shared.photos} photos still to be sent, none named by more than {allowed} {ids} as far "
                f"as could be read{unread}",
                fix="make the photos readable (the image lines above, and `backfill validate`, say what is wrong)",
            )
        largest = "; ".join(g.described() for g in shared.listing(SHOWN_GROUPS))
        more = f" (and {shared.groups - SHOWN_GROUPS} more)" if shared.groups > SHOWN_GROUPS else ""
        return Check(
            name="shared photos",
            ok=False,
            detail=f"{shared.groups} photo(s) named by more than {allowed} {ids} (max_ids_per_photo): `run` "
            f"rejects their {shared.rejected} rows not yet enrolled as {Reason.SHARED_PHOTO}; largest: "
            f"{largest}{more}{unread}",
            fix="give each user their own photo (`backfill validate` lists every row of each group in rejects.csv; "
            "it reads no ledger, so it lists IDs enrolled earlier too, which a run never rejects), or raise "
            "max_ids_per_photo (the config file's key, or BACKFILL_MAX_IDS_PER_PHOTO) if those IDs really are "
            "one person",
        )
    finally:
        shared.close()


def _settings_check(settings: Settings) -> Check:
    shown = settings.redacted()
    parts = [
        f"{k}={_shown_setting(settings, k, shown[k])} (from {settings.sources.get(k, 'default')})"
        for k in _SHOWN_SETTINGS
    ]
    return Check(name="settings", ok=True, detail="; ".join(parts))


def _shown_setting(settings: Settings, key: str, value: object) -> str:
    if key != "ledger":
        return str(value) if value != "" else "(not set)"
    return settings.ledger_location() or "(named after the partner ID, which is not set)"


def _credentials_checks(settings: Settings) -> list[Check]:
    """One line per credential problem, all of them: fixing one and re-running to learn of the next wastes a
    round trip per credential."""
    src = settings.sources
    where_id, where_key = src.get("partner_id", "default"), src.get("api_key", "default")
    given = {"api_key" if e.key == "api_key_file" else e.key: e for e in settings.credential_problems}
    checks = []
    if "partner_id" in given:
        checks.append(_refused(given["partner_id"]))
    elif not settings.partner_id:
        checks.append(
            Check(
                name="credentials",
                ok=False,
                detail="no partner ID is set",
                fix="export SMILE_PARTNER_ID (as a string, e.g. 085)",
            )
        )
    elif not settings.partner_id.isdigit():
        checks.append(
            Check(
                name="credentials",
                ok=False,
                detail=f"partner ID {printable(settings.partner_id, limit=40)!r} (from {where_id}) is "
                "not digits",
                fix="set SMILE_PARTNER_ID to the partner ID Smile ID gave you, e.g. 085",
            )
        )
    if "api_key" in given:
        checks.append(_refused(given["api_key"]))
    elif not settings.api_key:
        checks.append(
            Check(
                name="credentials",
                ok=False,
                detail="no API key is set",
                fix="export SMILE_API_KEY, or name a file holding it with `api_key_file:` in the config",
            )
        )
    if checks:
        return checks
    # Printable and on one line was checked as the settings resolved; only the API can say the key is right.
    return [
        Check(
            name="credentials",
            ok=True,
            detail=f"partner {settings.partner_id} (from {where_id}); API key set (from {where_key}), one "
            "printable line; whether the API accepts it is seen on the first row sent",
        )
    ]


def _refused(error: ConfigError) -> Check:
    return Check(
        name="credentials",
        ok=False,
        detail=f"{error.key} (from {error.source}): {error.problem}",
        fix=error.fix,
    )


def _scan(manifest: Manifest) -> tuple[int, int, list[Candidate], list[str]]:
    """(rows, rows rejected by the text rules, the photo sample, every candidate's user_id), in one pass."""
    head: list[Candidate] = []
    drawn: list[Candidate] = []
    ids: list[str] = []
    rejected = 0
    draw = random.Random()
    for batch in manifest.batches():
        rejected += len(batch.rejects)
        for candidate in batch.candidates:
            ids.append(candidate.user_id)
            if len(head) < SAMPLE:
                head.append(candidate)
                continue
            # A reservoir over the rest: a uniform draw without knowing the length in advance.
            seen = len(ids) - SAMPLE
            if len(drawn) < SAMPLE:
                drawn.append(candidate)
            elif (slot := draw.randrange(seen)) < SAMPLE:
                drawn[slot] = candidate
    return manifest.total_rows, rejected, head + drawn, ids


# The ledger's checks, its rows for the sampled IDs (what `run` would decide those rows from), the sampled IDs it
# holds as forgotten, and its PhotoKey.
LedgerChecks = tuple[list[Check], dict[str, LedgerRow], set[str], PhotoKey | None]


async def _sampled(store: Store, sample: list[Candidate]) -> tuple[dict[str, LedgerRow], set[str]]:
    ids = [c.user_id for c in sample]
    return await store.lookup(ids), set(await store.forgotten(ids))


async def _shared_ledger_checks(
    settings: Settings, ids: list[str] | None, sample: list[Candidate]
) -> LedgerChecks:
    """A PostgreSQL ledger: it connects and is bound to this partner; other live runs are a fleet, not a lock."""
    try:
        store = await compose.open_store(settings, writable=False)
    except LedgerAbsent as exc:
        return [Check(name="ledger", ok=True, detail=f"{exc}; the first run creates it")], {}, set(), None
    except BackfillError as exc:
        return (
            [Check(name="ledger", ok=False, detail=str(exc), fix="fix what the message names")],
            {},
            set(),
            None,
        )
    try:
        status = await store.status()
        checks = [
            Check(
                name="ledger",
                ok=True,
                detail=f"{store.location} opens; bound to partner {store.binding.partner_id} on "
                f"{store.binding.endpoint}; {len(status.processes)} run(s) of a fleet live now",
            )
        ]
        if ids is not None:
            checks.append(await _held(store, ids))
        known, forgotten = await _sampled(store, sample)
        return checks, known, forgotten, store.photo_key
    finally:
        await store.close()


async def _ledger_checks(settings: Settings, ids: list[str] | None, sample: list[Candidate]) -> LedgerChecks:
    if settings.ledger_url is not None:
        return await _shared_ledger_checks(settings, ids, sample)
    where = settings.ledger_location()  # a file's path here: the URL case is above
    if where is None:
        return (
            [
                Check(
                    name="ledger",
                    ok=False,
                    detail="the default ledger is named after the partner ID, so it can't be named until the "
                    "partner ID is known: whether it exists, and what it holds, is not checked",
                    fix="set SMILE_PARTNER_ID (see credentials), or name the ledger with --ledger",
                )
            ],
            {},
            set(),
            None,
        )
    path = Path(where)
    if not path.exists():
        folder = next((p for p in (path.parent, *path.parents) if p.exists()), path.parent)
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            what = "is not writable" if folder.is_dir() else "is not a folder"
            return (
                [
                    Check(
                        name="ledger",
                        ok=False,
                        detail=f"no ledger at {path}, and {folder} {what}",
                        fix="make the folder writable, or name another ledger with --ledger",
                    )
                ],
                {},
                set(),
                None,
            )
        bound = (
            f"bound to partner {settings.partner_id} on {settings.endpoint}"
            if settings.partner_id
            else f"bound to {settings.endpoint} and to the partner ID the run is given: no partner ID is "
            "set yet"
        )
        return (
            [
                Check(
                    name="ledger",
                    ok=True,
                    detail=f"no ledger yet at {path}: the first run creates it ({bound})",
                )
            ],
            {},
            set(),
            None,
        )
    if not os.access(path, os.R_OK | os.W_OK) or not os.access(path.parent, os.W_OK | os.X_OK):
        return (
            [
                Check(
                    name="ledger",
                    ok=False,
                    detail=f"the ledger {path} (or its folder) is not writable",
                    fix="fix its permissions (runs record every attempt there), or name another with --ledger",
                )
            ],
            {},
            set(),
            None,
        )
    try:
        store = await compose.open_store(settings, writable=False)
    except BackfillError as exc:
        return (
            [Check(name="ledger", ok=False, detail=str(exc), fix="fix what the message names")],
            {},
            set(),
            None,
        )
    try:
        checks = [
            Check(
                name="ledger",
                ok=True,
                detail=f"{store.location} opens; bound to partner {store.binding.partner_id} on "
                f"{store.binding.endpoint}",
            )
        ]
        if writer_alive(Path(store.location)):
            checks.append(
                Check(
                    name="ledger lock",
                    ok=False,
                    severity=ExitCode.LOCKED,
                    detail=f"another run is writing {store.location} now",
                    fix="wait for it to finish, or stop it (`backfill status` shows its run)",
                )
            )
        if ids is not None:
            checks.append(await _held(store, ids))
        known, forgotten = await _sampled(store, sample)
        return checks, known, forgotten, store.photo_key
    except BackfillError as exc:
        return (
            [Check(name="ledger", ok=False, detail=str(exc), fix="fix what the message names")],
            {},
            set(),
            None,
        )
    finally:
        await store.close()


async def _held(store: Store, ids: list[str]) -> Check:
    """What the ledger already holds for this manifest's IDs, per state: what a run will skip or resume."""
    counts: Counter[str] = Counter()
    for start in range(0, len(ids), 1000):
        part = ids[start : start + 1000]
        found = await store.lookup(part)
        counts.update(row.state.value for row in found.values())
        counts["forgotten on request"] += len(await store.forgotten(part))
    counts = +counts  # no zero counts
    new = len(ids) - sum(counts.values())
    held = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    return Check(
        name="ledger holds",
        ok=True,
        detail=f"of this manifest's {len(ids)} IDs: {held or 'none'}; {new} not in the ledger",
    )


async def _api_checks(settings: Settings) -> list[Check]:
    """The way to the API (proxy, CAs), then DNS, connection, TLS and the clock, from one GET of the API root: a
    GET enrolls nobody."""
    parts = urlsplit(settings.base_url)
    where = url_for_messages(settings.base_url)
    try:
        route = compose.api_route(settings)
    except ConfigError as exc:
        return [
            Check(
                name="api route",
                ok=False,
                detail=f"{exc.key} (from {exc.source}): {exc.problem}",
                fix=exc.fix,
            )
        ]
    tls = parts.scheme == "https"
    trusted = f"; its certificate must chain to {route.trusts}" if tls else ""
    checks = [Check(name="api route", ok=True, detail=f"{where} is reached {route.via}{trusted}")]
    host, port = parts.hostname or "", parts.port or (443 if tls else 80)
    if route.proxy is not None:
        # Behind a proxy the machine often can't resolve outside names at all, and needn't: the proxy does.
        checks.append(Check(name="api host", ok=True, detail=f"{host} is resolved by the proxy, not here"))
    else:
        try:
            found = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            checks.append(
                Check(
                    name="api host",
                    ok=False,
                    severity=ExitCode.SYSTEMIC,
                    detail=f"{host} (from {where}) doesn't resolve: {exc}",
                    fix="check base_url / --env and this machine's DNS, or set HTTPS_PROXY if the API is "
                    "reached through a proxy",
                )
            )
            return checks
        addresses = sorted({str(a[4][0]) for a in found})
        checks.append(
            Check(name="api host", ok=True, detail=f"{host} resolves to {', '.join(addresses[:4])}")
        )
    timeout = aiohttp.ClientTimeout(total=settings.timeout, sock_connect=settings.connect_timeout)
    proxy = route.proxy.url if route.proxy is not None else None
    before = time.time()
    try:
        # TLS verification and the proxy as the run has them (network.route); redirects not followed.
        async with (
            aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(ssl=route.tls)) as session,
            session.get(settings.base_url, allow_redirects=False, proxy=proxy) as response,
        ):
            status, date, reason = response.status, response.headers.get("Date"), response.reason or ""
    except aiohttp.ClientConnectorCertificateError as exc:
        said = getattr(exc.certificate_error, "verify_message", "") or type(exc.certificate_error).__name__
        checks.append(
            Check(
                name="api tls",
                ok=False,
                severity=ExitCode.SYSTEMIC,
                detail=f"{where}: the certificate doesn't verify against {route.trusts}: "
                f"{printable(str(said), limit=200)}",
                fix="if the API, or a proxy that re-signs TLS, uses a private CA, give its CA bundle with "
                "--ca-bundle PATH (or `ca_bundle:` in the file, or SSL_CERT_FILE)",
            )
        )
        return checks
    except (aiohttp.ClientSSLError, ssl.SSLError) as exc:
        checks.append(
            Check(
                name="api tls",
                ok=False,
                severity=ExitCode.SYSTEMIC,
                detail=f"{where}: the TLS handshake failed: {_why(exc)}",
                fix="check that base_url's port speaks https, and any proxy between here and the API",
            )
        )
        return checks
    except aiohttp.ClientProxyConnectionError as exc:
        checks.append(
            Check(
                name="api proxy",
                ok=False,
                severity=ExitCode.SYSTEMIC,
                detail=f"can't connect to {route.proxy}: {_why(exc)}",
                fix="correct the proxy's host and port, or unset it (or set NO_PROXY to the API's host) if the "
                "API is reachable without it",
            )
        )
        return checks
    except aiohttp.ClientHttpProxyError as exc:
        checks.append(_proxy_refused(route, exc.status, str(exc.message or "")))
        return checks
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        via = f" ({route.via})" if route.proxy is not None else ""
        checks.append(
            Check(
                name="api connects",
                ok=False,
                severity=ExitCode.SYSTEMIC,
                detail=f"can't reach {where}{via}: {_why(exc)}",
                fix="check base_url / --env, the port, firewalls and proxies",
            )
        )
        return checks
    after = time.time()
    if status == 407:  # the proxy's own answer: an http:// API asked through it
        checks.append(_proxy_refused(route, status, reason))
        return checks
    checks.append(Check(name="api connects", ok=True, detail=f"GET {where} answered HTTP {status}"))
    checks.append(
        Check(
            name="api tls",
            ok=True,
            detail=f"the certificate verifies against {route.trusts}"
            if tls
            else "plain http (no TLS): fine for a local sandbox only",
        )
    )
    checks.append(_clock_check(date, (before + after) / 2))
    return checks


def _proxy_refused(route: Route, status: int, reason: str) -> Check:
    said = f"HTTP {status}" + (f" {printable(reason, limit=60)}" if reason else "")
    return Check(
        name="api proxy",
        ok=False,
        severity=ExitCode.SYSTEMIC,
        detail=f"{route.proxy or 'a proxy'} refused to pass a request on to the API: {said}",
        fix=proxy_fix(status),
    )


def _why(exc: BaseException) -> str:
    """What went wrong, without the URL or the TLS context aiohttp's own text shows."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return printable(exc.strerror or type(exc.os_error).__name__, limit=200)
    return printable(str(exc) or type(exc).__name__, limit=200)


def _clock_check(date: str | None, local: float) -> Check:
    if not date:
        return Check(
            name="clock",
            ok=False,
            severity=ExitCode.SYSTEMIC,
            detail="the API sent no Date header",
            fix="compare this machine's clock with an NTP source by hand",
        )
    try:
        server = parsedate_to_datetime(date)
    except (TypeError, ValueError):
        return Check(
            name="clock",
            ok=False,
            severity=ExitCode.SYSTEMIC,
            detail=f"the API's Date header {printable(date, limit=60)!r} can't be read",
            fix="compare this machine's clock with an NTP source by hand",
        )
    if server.tzinfo is None:
        server = server.replace(tzinfo=UTC)
    skew = local - server.timestamp()  # Date has whole seconds: up to 1 s of this is rounding
    said = f"this machine's clock is {abs(skew):.1f}s {'ahead of' if skew > 0 else 'behind'} the API's"
    if abs(skew) >= MAX_SKEW_S:
        return Check(
            name="clock",
            ok=False,
            severity=ExitCode.SYSTEMIC,
            detail=f"{said} (at {datetime.fromtimestamp(local, UTC):%H:%M:%S}Z): the API refuses "
            "signatures with a stale timestamp (2205)",
            fix="sync the clock (chrony / systemd-timesyncd / ntpd)",
        )
    return Check(name="clock", ok=True, detail=f"{said}, within {MAX_SKEW_S:g}s")


async def _images_check(sample: list[Candidate], images: ImageSource, *, decode: bool) -> Check:
    """The sampled photos checked as a run checks them; with `decode` (--normalize) also read whole and
    normalised as a send would, since a photo damaged inside passes a check of its head and tail."""
    if not sample:
        return Check(name="images", ok=True, detail="no row passes the text rules: no photo to check")
    results: list[Fingerprint | ImageProblem] = list(await images.check_many([c.image for c in sample]))
    if decode:
        passed = [(i, r) for i, r in enumerate(results) if isinstance(r, Fingerprint)]
        tried = await compose.trial_reads(images, [r for _, r in passed])
        for (i, _), problem in zip(passed, tried, strict=True):
            if problem is not None:
                results[i] = problem
    bad = [(c, r) for c, r in zip(sample, results, strict=True) if isinstance(r, ImageProblem)]
    if bad:
        said = "; ".join(f"line {c.line} ({c.user_id}): {r.reason}: {r.message}" for c, r in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        return Check(
            name="images",
            ok=False,
            detail=f"{len(bad)} of {len(sample)} sampled photos can't be used: {said}{more}",
            fix="fix those photos (`backfill validate` checks every one)",
        )
    return Check(
        name="images",
        ok=True,
        detail=f"{len(sample)} photos (the first {min(SAMPLE, len(sample))} and a random draw) are "
        + (
            "readable, and decode and normalise as a send would (--normalize)"
            if decode
            else "readable, complete JPEG/PNG within the size limit"
        ),
    )


async def _pins_check(sample: list[Candidate], known: dict[str, LedgerRow], images: ImageSource) -> Check:
    """The sampled rows the ledger already holds, decided by the run's own code, which only reads: `plan.decide`
    for done and failed rows, and for a row still to be sent (pending, unknown, ...) the ledger's own rule at
    its next attempt (`transitions.begin`) on the photo's bytes. An ID pinned to another photo is refused by
    `run` either way, so it is a problem here too."""
    held = [c for c in sample if c.user_id in known]
    decisions = await plan.decide(held, known, images)
    reused = [
        (d.line, d.user_id, d.message)
        for d in decisions
        if isinstance(d, plan.NotSent) and d.reason is Reason.USER_ID_REUSED
    ]
    for d in decisions:
        k = known[d.user_id]
        if not isinstance(d, plan.ToSend) or k.photo_sha256 is None:
            continue
        try:
            photo = await images.read(d.fingerprint)
        except ImageError:
            continue  # the image check says what is wrong with it
        attempt = AttemptRequest(
            user_id=d.user_id,
            photo_sha256=photo.sha256,
            fingerprint=photo.fingerprint,
            user_created_at=d.user_created_at,
            run_id="check",
            at=now_iso(),
        )
        refused = transitions.begin(k, attempt)
        if isinstance(refused, Refused) and refused.why is Refusal.PHOTO_PINNED:
            reused.append((d.line, d.user_id, plan.reused_message(d.user_id, k) + SENT_BYTES_DIFFER))
    if not reused:
        return Check(
            name="ledger pins",
            ok=True,
            detail=f"{len(held)} sampled rows the ledger already holds: none names another photo than "
            "the one its user_id was sent with",
        )
    said = "; ".join(
        f"line {line} ({uid}): {Reason.USER_ID_REUSED}: {message}" for line, uid, message in reused[:5]
    )
    more = f" (and {len(reused) - 5} more)" if len(reused) > 5 else ""
    return Check(
        name="ledger pins",
        ok=False,
        detail=f"{len(reused)} of {len(held)} sampled rows the ledger already holds name another photo "
        f"than the one sent for their user_id, and `run` rejects them: {said}{more}",
        fix="give each of those users a new user_id, or restore the photo first sent for it",
    )

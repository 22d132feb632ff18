"""The promise at its sharp edges, one guarantee per test, each failing without it, with real processes."""

from __future__ import annotations

import base64
import binascii
import contextlib
import csv
import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from backfill import compose
from backfill.config import Settings
from backfill.images import Fingerprint, ImageProblem, ImageSource, Photo, PhotoKey
from backfill.images.local import LocalImageSource
from backfill.ledger import LedgerRow
from backfill.ledger.sqlite import acquire_lock
from backfill.run.crash import CRASH_ENV
from backfill.sandbox import STATE_KEY, Faults, SandboxState, make_app
from backfill.vocab import State

from .conftest import API_KEY, PARTNER_ID, ThreadedSandboxes, png_bytes, simple_rows, write_manifest
from .crash_rig import Chaos, CrashRig

# A sandbox that answers at once and never fails: whatever goes wrong below is the kills', never the network's.
CALM = Chaos(
    latency_ms=0,
    jitter_ms=0,
    error_rate=0,
    reset_before_rate=0,
    reset_after_rate=0,
    slow_rate=0,
    sandbox_kill_rate=0,
    timeout_s=5.0,
)


# --- a. killed while rows wait on the rate limiter ------------------------------------------------------


def test_a_kill_while_rows_wait_on_the_rate_limit_never_makes_a_foreign_id_ours(tmp_path: Path) -> None:
    """Guards backfill/run/send.py `Sender._attempt`'s order: `await self._gate.wait_turn(...)`, then
    `self._images.read(...)`, then `self._store.begin_attempt(...)` ("the rate slot first, then the photo,
    then the record"). Record before the slot and a kill leaves every waiting worker's row SENDING though
    nothing left; the resume then reads those rows as in doubt, and a foreign ID's 2209 as ours (settle.py's
    2209 rule, `ALREADY_ENROLLED if doubt_before`). Tried: with `begin_attempt` moved above `wait_turn` (a
    Sender rewritten by a sitecustomize outside the repo), the first waiting:N kill leaves 8 rows recorded
    and never sent; with the 2209 rule dropped instead, verify() names the foreign IDs read as ours.
    """
    # 5 requests/s with 8 workers: at any moment ~7 workers wait on the limiter, one slot every 200 ms.
    rig = CrashRig(tmp_path, rows=16, chaos=dataclasses.replace(CALM, rate=5.0), seed=11, foreign=6)
    rig.start_sandbox()
    try:
        for n in (2, 3, 4):
            before = rig.ledger_rows()
            rig.cycle(crash_at=f"waiting:{n}")
            assert rig.last_kill == "waiting", f"waiting:{n} did not kill the run: {rig.last_output[-500:]}"
            # Nothing recorded that never left, but for at most the one other row that may be between its record
            # and its arrival when the kill lands (on a loaded machine its send can take longer than the 200 ms
            # to the next slot: CI caught one). Recording before the slot would leave ~7 (every waiting worker).
            unsent = rig.recorded_not_received(before, rig.last_log_start)
            assert len(unsent) <= 1, f"recorded as sending, never received by the sandbox: {sorted(unsent)}"
            # The row killed at `waiting` held its slot and photo, not a record: no foreign ID is in doubt but
            # that one in flight.
            sending = rig.states_in_checkpoint({State.SENDING})
            assert sending & rig.foreign_ids <= unsent, (
                f"foreign IDs left sending: {sorted(sending & rig.foreign_ids)}"
            )
        for _ in range(2):
            before = rig.ledger_rows()
            # Within 0.6 s of the first request: at least 6 rows (1.2 s of slots) are still to go, so it lands.
            rig.cycle(signals=[(rig.rng.uniform(0.05, 0.6), signal.SIGKILL)])
            # At one slot per 200 ms, at most the one row between its record and its send can be caught there.
            assert len(rig.recorded_not_received(before, rig.last_log_start)) <= 1
        summary = rig.resume_until_done()
    finally:
        rig.kill_sandbox()
    figures = rig.verify(summary)
    assert rig.audit.boundary_kills["waiting"] == 3 and rig.audit.kills == 5
    assert figures["foreign_answer_lost_per_sandbox"] == 0  # no faults: every request was answered 2209
    # Only a random SIGKILL landing in the few ms between a foreign ID's record and its outcome may make it
    # ours (the ledger then rightly can't tell); otherwise every foreign ID is someone else's.
    ours = {u for u in rig.foreign_ids if rig.ledger_rows()[u]["state"] == State.ALREADY_ENROLLED}
    assert ours <= rig.audit.foreign_left_sending_by_kill
    assert figures["foreign_id_conflict"] == 6 - len(ours)


# --- b. the photo swapped between the decision and the send ---------------------------------------------


class SwappingImages(ImageSource):
    """The local photos, except that a file is rewritten just before its Nth read: a swap nobody announced."""

    def __init__(self, inner: ImageSource, swaps: dict[str, tuple[int, bytes]]) -> None:
        self.inner = inner
        self.swaps = swaps  # real path -> (which read of it, the bytes written just before that read)
        self.reads: Counter[str] = Counter()

    async def fingerprint_many(self, raws: Sequence[str]) -> list[Fingerprint | ImageProblem]:
        return await self.inner.fingerprint_many(raws)

    async def check_many(self, raws: Sequence[str]) -> list[Fingerprint | ImageProblem]:
        return await self.inner.check_many(raws)

    async def read(self, fingerprint: Fingerprint) -> Photo:
        self.reads[fingerprint.ref] += 1
        swap = self.swaps.get(fingerprint.ref)
        if swap is not None and swap[0] == self.reads[fingerprint.ref]:
            Path(fingerprint.ref).write_bytes(swap[1])
        return await self.inner.read(fingerprint)

    async def close(self) -> None:
        await self.inner.close()


def photo_recorder(seen: defaultdict[str, set[str]]) -> Middleware:
    """Middleware: the SHA-256 of the photo in every request, per user_id, as the server received it."""

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            payload = json.loads(await request.read())  # aiohttp keeps the body for the handler's read()
            photo = base64.b64decode(payload["photo"], validate=True)
            seen[str(payload["user_id"])].add(hashlib.sha256(photo).hexdigest())
        except (ValueError, KeyError, TypeError, binascii.Error):
            pass
        return await handler(request)

    return record


@contextlib.asynccontextmanager
async def recording_sandbox(
    faults: Faults, seen: defaultdict[str, set[str]]
) -> AsyncIterator[tuple[str, SandboxState]]:
    """The sandbox on a free port, with every request's photo hash recorded into `seen`."""
    app = make_app(PARTNER_ID, API_KEY, faults=faults)
    app.middlewares.append(photo_recorder(seen))
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1", app[STATE_KEY]
    finally:
        await runner.cleanup()


def read_outputs(out_dir: Path) -> tuple[dict[str, str], dict[str, str]]:
    """The run's results.csv as user_id -> status, and rejects.csv as user_id -> reason."""
    with (out_dir / "results.csv").open() as handle:
        results = {row["user_id"]: row["status"] for row in csv.DictReader(handle)}
    with (out_dir / "rejects.csv").open() as handle:
        rejects = {row["user_id"]: row["reason"] for row in csv.DictReader(handle)}
    return results, rejects


RETRIED = "user_0003"  # sent, answered 503 (not taken), then swapped before its retry
UNSENT = "user_0010"  # swapped after the run decided to send it, before its first read


@dataclass
class SwapSetup:
    """A manifest, settings for runs of it against a sandbox that records every photo it receives, and that
    sandbox's state."""

    manifest: Path
    settings: Settings
    seen: defaultdict[str, set[str]]  # user_id -> SHA-256 of every photo the server received for it
    state: SandboxState

    def image(self, user_id: str) -> Path:
        return self.manifest.parent / "images" / f"{user_id}.png"

    def ref(self, user_id: str) -> str:
        """The photo's path as the image source names it (symbolic links resolved)."""
        return os.path.realpath(self.image(user_id))

    def images(self, swaps: dict[str, tuple[int, bytes]]) -> SwappingImages:
        """The manifest's photos, with `swaps` by user_id: (which read, the bytes written just before it)."""
        inner = LocalImageSource(
            base=self.manifest.parent, root=None, max_bytes=self.settings.max_image_bytes
        )
        return SwappingImages(inner, {self.ref(u): swap for u, swap in swaps.items()})


@pytest.fixture
async def swap_setup(tmp_path: Path, make_settings: Callable[..., Settings]) -> AsyncIterator[SwapSetup]:
    """40 rows; RETRIED is answered 503 twice (its first attempt leaves, unfinished); photos recorded."""
    seen: defaultdict[str, set[str]] = defaultdict(set)
    async with recording_sandbox(Faults(script={RETRIED: [503, 503]}), seen) as (base_url, state):
        manifest = write_manifest(tmp_path, simple_rows(40))
        # One worker and 40 requests/s: rows queue, and each photo is read only when its turn comes.
        settings = make_settings(None, base_url=base_url, concurrency=1, rate=40, max_attempts=3)
        yield SwapSetup(manifest=manifest, settings=settings, seen=seen, state=state)


async def ledger_rows(settings: Settings) -> dict[str, LedgerRow]:
    return (await keyed_ledger_rows(settings))[0]


async def keyed_ledger_rows(settings: Settings) -> tuple[dict[str, LedgerRow], PhotoKey]:
    """Every row of the ledger, and its PhotoKey: what it pins is `key.pin` of the server's SHA-256."""
    store = await compose.open_store(settings, writable=False, bound=False)
    try:
        return {row.user_id: row async for row in store.rows()}, store.photo_key
    finally:
        await store.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_b_a_photo_swapped_before_a_retry_or_a_send_never_leaves_as_that_id(
    swap_setup: SwapSetup,
) -> None:
    """Guards the photo pin in backfill/ledger/transitions.py `begin`: `row.photo_sha256 != request.photo_sha256`
    -> `Refused(PHOTO_PINNED)`, checked against the hash of the bytes about to leave (send.py builds the
    AttemptRequest from the same `photo` it posts). Without the refusal, RETRIED's retry carries the new
    photo and the server sees two photos for one user_id. Resume side: plan.py `_compare` -> USER_ID_REUSED.
    Tried: with `begin` monkeypatched to ignore the pin, RETRIED reaches the sandbox with 2 distinct photos.
    """
    setup = swap_setup
    manifest, settings, seen, state = setup.manifest, setup.settings, setup.seen, setup.state
    swapped = {RETRIED: png_bytes(1000), UNSENT: png_bytes(1001)}
    original = setup.image(RETRIED).read_bytes()
    # RETRIED's file changes before its second read (its retry), UNSENT's before its first (its only send).
    images = setup.images({RETRIED: (2, swapped[RETRIED]), UNSENT: (1, swapped[UNSENT])})
    first = await compose.run(settings, manifest, images=images)
    # The swaps happened (a build without the pin reads RETRIED once more, for the retry that then leaves).
    assert images.reads[setup.ref(RETRIED)] >= 2 and images.reads[setup.ref(UNSENT)] >= 1

    # At the server: one photo per user_id, ever; RETRIED only with the bytes it was first sent with.
    assert {u: len(h) for u, h in seen.items() if len(h) != 1} == {}
    assert seen[RETRIED] == {sha(original)} and state.requests[RETRIED] == 1
    # UNSENT had never left: its first attempt is its photo, the one the server got and the ledger pins.
    assert seen[UNSENT] == {sha(swapped[UNSENT])}
    rows, key = await keyed_ledger_rows(settings)
    for user_id, user in state.enrolled.items():
        assert rows[user_id].photo_sha256 == key.pin(user.photo_sha256), (
            f"{user_id}: pinned bytes aren't the ones sent"
        )
    # The run that saw the swap says so (send.py `_refused` -> `_reject`, even after an attempt went out),
    # and every row is in exactly one of the two files: nothing lost.
    results, rejects = read_outputs(Path(first.out_dir))
    assert rejects == {RETRIED: "user_id_reused"} and set(results.values()) == {"enrolled"}
    assert len(results) + len(rejects) == 40 and not results.keys() & rejects.keys()
    assert rows[RETRIED].state is State.PENDING  # its pinned attempt wasn't enrolled: not done, not lost

    # A resume: the swapped photo is refused before anything is sent, and said so in rejects.csv.
    sent_before = state.total_requests
    second = await compose.run(settings, manifest)
    assert state.total_requests == sent_before
    results, rejects = read_outputs(Path(second.out_dir))
    assert rejects == {RETRIED: "user_id_reused"} and set(results.values()) == {"skipped"}

    # The photo restored, the ID goes out with it and ends enrolled: refused was never lost.
    setup.image(RETRIED).write_bytes(original)
    third = await compose.run(settings, manifest)
    results, rejects = read_outputs(Path(third.out_dir))
    assert results[RETRIED] == "enrolled" and not rejects
    assert seen[RETRIED] == {sha(original)} and state.enrolled[RETRIED].photo_sha256 == sha(original)


def test_b_a_photo_swapped_at_a_crash_point_is_refused_on_resume(tmp_path: Path) -> None:
    """The same pin across processes: SIGKILL after an answer arrived and before its outcome was recorded
    (before_outcome), swap that row's photo and a row not yet sent, resume. Guards transitions.py `begin`'s
    pin on a SENDING row and the resume decision (plan.py); the sandbox state file's photo_sha256 is the
    server's own record of the bytes it enrolled.
    """
    rig = CrashRig(tmp_path, rows=24, chaos=dataclasses.replace(CALM, rate=50.0), seed=5)
    rig.start_sandbox()
    try:
        rig.cycle(crash_at="before_outcome:3")
        assert rig.last_kill == "before_outcome"
        received = rig.requests_by_user()
        rows = rig.ledger_rows()
        answered = sorted(u for u, row in rows.items() if row["state"] == State.SENDING and received[u])
        untouched = sorted(u for u in rig.own_ids if u not in rows)
        assert answered and untouched
        sent_id, unsent_id = answered[0], untouched[0]
        sent_image, unsent_image = (rig.folder / "images" / f"{u}.png" for u in (sent_id, unsent_id))
        original = sent_image.read_bytes()
        sent_image.write_bytes(png_bytes(2000))
        unsent_image.write_bytes(png_bytes(2001))

        rig.cycle()
        results, rejects = read_outputs(rig.out / str(rig.last_summary()["run_id"]))
        assert rejects.get(sent_id) == "user_id_reused" and sent_id not in results
        assert rig.requests_by_user()[sent_id] == received[sent_id]  # nothing sent with the swapped photo
        assert results[unsent_id] == "enrolled"

        # Restored, it is sent again and the 2209 is ours (its answer was lost to the kill): nothing lost.
        sent_image.write_bytes(original)
        summary = rig.resume_until_done()
    finally:
        rig.kill_sandbox()
    enrolled = {
        line["user_id"]: line["photo_sha256"]
        for line in map(json.loads, rig.state_file.read_text().splitlines())
    }
    assert enrolled[sent_id] == sha(original)
    assert enrolled[unsent_id] == sha(png_bytes(2001))
    assert rig.ledger_rows()[sent_id]["state"] == State.ALREADY_ENROLLED
    rig.verify(summary)


# --- c and d: which ledger a run opens -----------------------------------------------------------------


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKFILL_", "XDG_"))}
    env.pop(CRASH_ENV, None)
    # HOME too: a ledger that wrongly fell back to ~/.local/share lands in the test's folder, not the user's.
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {**env, "SMILE_PARTNER_ID": PARTNER_ID, "SMILE_API_KEY": API_KEY, "HOME": str(home), **extra}


def run_command(manifest: Path, base_url: str, *flags: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "backfill",
        "run",
        str(manifest),
        "--env",
        "local",
        "--base-url",
        base_url,
        "--no-progress",
        *flags,
    ]


def test_c_the_ledger_named_another_way_is_still_locked(
    tmp_path: Path, threaded_sandboxes: ThreadedSandboxes
) -> None:
    """Guards backfill/ledger/sqlite.py `acquire_lock`: the flock is taken on the database file itself
    (`fcntl.flock(fd, ...)` on `os.open(path)`), so every name of that file meets it. A lock kept per name
    (a `<name>.lock` file, or a table of paths) lets the hard link through at least, and a second writer would
    send the rows the first hasn't finished. Tried: `acquire_lock` monkeypatched to flock `<path>.lk` instead;
    the symlink and hard-link runs then start and send. Also: exit 3 (errors.LedgerLocked) before any
    output folder is made (compose.run opens the store first).
    """
    rows = 30
    # The last row's answer is held until the refusals are seen: the first run holds the ledger for as long as
    # the test needs, on a busy machine too, and finishes when released (not after a wait).
    server = threaded_sandboxes.start(
        faults=Faults(script={f"user_{rows - 1:04d}": ["slow"]}, slow_ms=600_000)
    )
    state = server.state
    manifest = write_manifest(tmp_path, simple_rows(rows))
    (tmp_path / "dir").mkdir()
    (tmp_path / "x").mkdir()
    (tmp_path / "links").mkdir()
    (tmp_path / "elsewhere").mkdir()
    ledger = tmp_path / "dir" / "ledger.sqlite"
    env = cli_env(tmp_path)
    first = subprocess.Popen(
        run_command(
            manifest,
            server.base_url,
            "--checkpoint",
            str(ledger),
            "--timeout",
            "900",
            "--out",
            str(tmp_path / "out"),
        ),
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while state.total_requests == 0:  # the lock is held, the ledger exists, rows are going out
            assert first.poll() is None and time.monotonic() < deadline, "the first run never sent"
            time.sleep(0.02)
        (tmp_path / "links" / "sym.sqlite").symlink_to(ledger)
        names = {
            "symlink": (str(tmp_path / "links" / "sym.sqlite"), tmp_path),
            "dot-dot from another folder": ("../x/../dir/ledger.sqlite", tmp_path / "elsewhere"),
        }
        # All three at once, while the first run holds the ledger; each with its own --out, to see it left none.
        seconds = {
            how: subprocess.Popen(
                run_command(
                    manifest, server.base_url, "--checkpoint", name, "--out", str(tmp_path / f"out-{i}")
                ),
                env=env,
                cwd=cwd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i, (how, (name, cwd)) in enumerate(names.items())
        }
        for i, (how, process) in enumerate(seconds.items()):
            _, said = process.communicate(timeout=60)
            assert process.returncode == 3, f"{how}: exit {process.returncode}: {said[-800:]}"
            assert "is in use by" in said and f"pid {first.pid}" in said, f"{how}: {said[-800:]}"
            assert not (tmp_path / f"out-{i}").exists() or not any((tmp_path / f"out-{i}").iterdir())
        # A hard link is a name SQLite can't resolve to the same WAL: refused outright (exit 2), held or not.
        os.link(ledger, tmp_path / "links" / "hard.sqlite")
        hard = subprocess.run(
            run_command(
                manifest,
                server.base_url,
                "--checkpoint",
                str(tmp_path / "links" / "hard.sqlite"),
                "--out",
                str(tmp_path / "out-hard"),
            ),
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert hard.returncode == 2 and "hard links" in hard.stderr, hard.stderr[-800:]
        (tmp_path / "links" / "hard.sqlite").unlink()
        # Otherwise the refusals proved nothing: the first run must still have been holding the ledger.
        assert first.poll() is None, "the first run finished before the others were refused"
        threaded_sandboxes.loop.call_soon_threadsafe(server.release_held)
        _, first_said = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, first_said.decode()[-800:]
    # Nothing sent twice: with no faults, each user_id went out exactly once, from the first run alone.
    assert dict(state.requests) == {f"user_{i:04d}": 1 for i in range(rows)}
    assert len(state.enrolled) == rows and not state.enroll_attempts_after_enrolled

    # A resume, through one of the other names, finds every row done and sends nothing.
    again = subprocess.run(
        run_command(
            manifest,
            server.base_url,
            "--checkpoint",
            str(tmp_path / "links" / "sym.sqlite"),
            "--out",
            str(tmp_path / "out"),
        ),
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0, again.stderr[-800:]
    assert state.total_requests == rows
    latest = sorted((tmp_path / "out").glob("*/summary.json"))[-1]
    assert json.loads(latest.read_text())["counts"] == {"skipped": rows}


def test_c_a_ledger_with_a_hard_link_is_refused_while_held(tmp_path: Path) -> None:
    """A hard link is another name SQLite can't resolve (its WAL is named after the path used): refused with
    exit 2 and a message that says so, before any lock or request, even while another run holds the ledger."""
    server_url = "http://127.0.0.1:9/v1"  # never reached: the lock is refused before anything is sent
    manifest = write_manifest(tmp_path, simple_rows(2))
    ledger = tmp_path / "ledger.sqlite"
    held = acquire_lock(ledger)
    try:
        os.link(ledger, tmp_path / "hard.sqlite")
        refused = subprocess.run(
            run_command(
                manifest,
                server_url,
                "--checkpoint",
                str(tmp_path / "hard.sqlite"),
                "--out",
                str(tmp_path / "out"),
            ),
            env=cli_env(tmp_path),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        os.close(held)
    assert refused.returncode == 2, refused.stderr[-800:]
    assert "hard links" in refused.stderr and "Traceback" not in refused.stderr, refused.stderr[-800:]


@pytest.mark.parametrize(
    "link",
    [
        "symlink",
        "hard link",
    ],
)
def test_c_a_resume_through_another_name_after_a_kill_sees_what_the_killed_run_recorded(
    tmp_path: Path, link: str
) -> None:
    """The lock treats every name of the ledger file as one ledger; so must the data. A SIGKILL leaves the
    run's commits in `ledger.sqlite-wal` (the rig reads read-only so as not to fold them in), and a resume
    through a symlink finds them (SQLite resolves the link). Through a hard link it can't: the resume must then
    refuse the ledger (e.g. when st_nlink > 1), never start it afresh. Guards: nothing is sent for an ID the
    ledger holds as enrolled, and no 2209 for our own ID is called someone else's.
    """
    rig = CrashRig(tmp_path, rows=20, chaos=dataclasses.replace(CALM, rate=200.0), seed=3)
    rig.start_sandbox()
    try:
        rig.cycle(crash_at="before_outcome:8")
        assert rig.last_kill == "before_outcome"
        wal = Path(f"{rig.checkpoint}-wal")
        assert wal.exists() and wal.stat().st_size > 0, "the killed run's commits should still be in the WAL"
        other = tmp_path / "other-name.sqlite"
        if link == "symlink":
            other.symlink_to(rig.checkpoint)
        else:
            os.link(rig.checkpoint, other)
        rig.checkpoint_name = str(other)
        if link == "hard link":
            # Refused outright (exit 2) rather than read as an empty ledger: nothing is sent through it.
            before = rig.audit.requests
            code = rig.cycle(expect=(2,))
            assert code == 2 and "hard links" in rig.last_output and rig.audit.requests == before
            (other).unlink()
            rig.checkpoint_name = str(rig.checkpoint)
            code = rig.cycle()
        else:
            code = rig.cycle()
        assert not rig.audit.sent_after_enrolled, (
            f"re-sent though enrolled: {sorted(rig.audit.sent_after_enrolled)}"
        )
        assert code == 1 or code == 0
        summary = rig.resume_until_done()
    finally:
        rig.kill_sandbox()
    rig.verify(summary)


@dataclass
class TwoShells:
    """The same `backfill run` with no --checkpoint, from two folders one after another."""

    codes: list[int]
    said: list[str]  # each run's stderr
    requests: Counter[str]  # what the sandbox received, per user_id, from both
    second: dict[str, object] | None  # the second run's summary.json, if it wrote one
    ledgers: list[Path]  # every ledger file made under the test's folder


def run_from_two_shells(tmp_path: Path, threaded_sandboxes: ThreadedSandboxes, xdg: str) -> TwoShells:
    server = threaded_sandboxes.start()
    manifest = write_manifest(tmp_path, simple_rows(12))
    env = cli_env(tmp_path, XDG_DATA_HOME=xdg)
    codes, said, second = [], [], None
    for name in ("shell-a", "shell-b"):
        cwd = tmp_path / name
        cwd.mkdir()
        done = subprocess.run(
            run_command(manifest, server.base_url),
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )
        codes.append(done.returncode)
        said.append(done.stderr[-800:])
        summaries = list((cwd / "backfill-out").glob("*/summary.json"))
        second = json.loads(summaries[0].read_text()) if summaries else None
    ledgers = sorted(p for p in tmp_path.rglob("*.sqlite") if p.is_file())
    return TwoShells(
        codes=codes, said=said, requests=Counter(server.state.requests), second=second, ledgers=ledgers
    )


def test_d_the_default_ledger_does_not_depend_on_the_shell_folder(
    tmp_path: Path, threaded_sandboxes: ThreadedSandboxes
) -> None:
    """Guards backfill/config.py `Settings.ledger_path`: with no --checkpoint the ledger is
    `data_dir / "ledgers" / ...`, data_dir from $XDG_DATA_HOME, never a file named relative to the current
    folder. Were it (as the old `backfill-<partner>-<env>.sqlite` default was), the second run would start a
    new ledger and send all 12 again, their 2209s read as someone else's. Tried: ledger_path monkeypatched
    to a cwd-relative name; the second run sends 12 and ends with 12 id_conflict. Also guards that a first run
    on a fresh machine makes the ledgers folder (compose.open_store).
    """
    xdg = tmp_path / "xdg"
    shells = run_from_two_shells(tmp_path, threaded_sandboxes, str(xdg))
    assert shells.codes == [0, 0], shells.said
    assert shells.requests == Counter({f"user_{i:04d}": 1 for i in range(12)})  # the second run sent nothing
    assert shells.second is not None and shells.second["counts"] == {"skipped": 12}
    assert len(shells.ledgers) == 1 and shells.ledgers[0].parent == xdg / "backfill" / "ledgers", (
        shells.ledgers
    )


def test_d_a_relative_xdg_data_home_does_not_make_the_ledger_depend_on_the_shell_folder(
    tmp_path: Path, threaded_sandboxes: ThreadedSandboxes
) -> None:
    """XDG_DATA_HOME=xdg (relative) from two folders must still find one ledger: a relative value is ignored (as
    the XDG spec says), or each folder would get its own and the second run would re-send every user."""
    shells = run_from_two_shells(tmp_path, threaded_sandboxes, "xdg")
    assert shells.codes == [0, 0], shells.said
    assert shells.requests == Counter({f"user_{i:04d}": 1 for i in range(12)}), "the second run sent again"
    assert len(shells.ledgers) == 1, [str(p.relative_to(tmp_path)) for p in shells.ledgers]

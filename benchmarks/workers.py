"""What gets measured, each run in a fresh child process so one measurement's heap never skews the next."""

from __future__ import annotations

import asyncio
import base64
import csv
import json
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Any, TypeVar

import pybase64

from backfill import compose
from backfill.api.signing import sign, utc_timestamp
from backfill.clock import now_iso
from backfill.config import load_settings
from backfill.images import Fingerprint
from backfill.ledger import AttemptRequest, Binding, Outcome, RunRecord, transitions
from backfill.ledger.sqlite import _ROWS_PER_STATEMENT, _SCHEMA, _UPSERT, SqliteStore, _upsert_rows, _values
from backfill.vocab import State

from .servers import API_KEY, PARTNER_ID, ROOT

T = TypeVar("T")
Rows = list[tuple[str, str, str]]
ENV = {"SMILE_PARTNER_ID": PARTNER_ID, "SMILE_API_KEY": API_KEY}


def in_child(fn: Callable[..., T], *args: Any) -> T:
    """Run fn(*args) in a new spawned process and return its result: a clean heap, its own CPU clock."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _clock() -> tuple[float, float, float]:
    # process_time counts every thread of this process (the checkpoint's writer and to_thread reads too);
    # thread_time only the caller's, which runs the event loop: the one thread a row's Python can't leave.
    return time.perf_counter(), time.process_time(), time.thread_time()


def _since(start: tuple[float, float, float]) -> dict[str, float]:
    wall, cpu = time.perf_counter() - start[0], time.process_time() - start[1]
    return {"wall_s": wall, "cpu_s": cpu, "loop_cpu_s": time.thread_time() - start[2]}


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kilobytes


def cpu_stall_us() -> float | None:
    """Microseconds some runnable task on this machine has waited for a CPU (Linux PSI), or None if unknown.

    Sampled before and after a measurement: the fraction of its wall time spent stalled says whether the
    figure was taken on a quiet machine, or while something else (another job, another tenant) held the CPUs.
    """
    try:
        with open("/proc/pressure/cpu") as handle:
            some = handle.readline().split()
    except OSError:
        return None
    fields = dict(part.split("=", 1) for part in some[1:] if "=" in part)
    return float(fields["total"]) if "total" in fields else None


def stall_share(before: float | None, after: float | None, wall_s: float) -> float | None:
    """Fraction of `wall_s` during which some task waited for a CPU (0: quiet; near 1: contended throughout)."""
    if before is None or after is None or wall_s <= 0:
        return None
    return round((after - before) / 1e6 / wall_s, 3)


# --- the tool itself ------------------------------------------------------------------------------------


def settings_flags(base_url: str, work: Path, **flags: Any) -> dict[str, Any]:
    return {
        "env": "local",
        "base_url": base_url,
        "checkpoint": work / "checkpoint.sqlite",
        "out": work / "out",
        "progress": False,
        # The manifests these runs send cycle through a small pool of photos, which the shared-photo census
        # would reject (every photo named by many IDs): off, unless a benchmark says otherwise.
        "max_ids_per_photo": 0,
        **flags,
    }


def run_ours(manifest: str, flags: dict[str, Any], profile_to: str | None = None) -> dict[str, Any]:
    """One `backfill run` in this process through the library (no CLI start-up in the timing)."""
    settings = load_settings(None, environ=ENV, flags=flags)
    profiler = None
    if profile_to is not None:
        from pyinstrument import Profiler

        # Every 0.5 ms, the event loop's thread only: that is where the per-request Python runs.
        profiler = Profiler(interval=0.0005, async_mode="disabled")
        profiler.start()
    start = _clock()
    try:
        summary = asyncio.run(compose.run(settings, Path(manifest)))
    finally:
        if profiler is not None:
            profiler.stop()  # its sampling thread must not outlive a failed run into interpreter shutdown
    result: dict[str, Any] = _since(start)
    if profiler is not None and profile_to is not None:
        from .profiling import hotspots

        Path(profile_to).write_text(profiler.output_text(unicode=False, color=False, show_all=False))
        result["hotspots"] = hotspots(profiler.last_session, str(ROOT / "backfill"))
    result["summary"] = {
        k: v for k, v in asdict(summary).items() if k not in ("settings", "out_dir", "manifest", "base_url")
    }
    result["maxrss_mb"] = _maxrss_mb()
    return result


def cli_command(args: list[str]) -> list[str]:
    """The argv of `backfill ARGS` with this interpreter, whether or not the entry point is on PATH."""
    code = "import sys; from backfill.cli import main; sys.argv[0] = 'backfill'; main()"
    return [sys.executable, "-c", code, *args]


def run_cli(args: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    """`backfill ARGS` as a user runs it, in a child process reaped with os.wait4 for its exact peak RSS
    and CPU time (what /usr/bin/time -v reports), without polling."""
    started = time.perf_counter()
    stall0 = cpu_stall_us()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            cli_command(args),
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - started > timeout:
                proc.kill()  # reaped by the next wait4; the result then says it was killed
            time.sleep(0.05)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen never tries to reap it again
        out.seek(0)
        printed = out.read().decode(errors="replace")
    return {
        "wall_s": wall,
        "exit_code": proc.returncode,
        "maxrss_mb": usage.ru_maxrss / 1024,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "cpu_stall_share": stall_share(stall0, cpu_stall_us(), wall),
        "output": printed[-2000:],
    }


# --- baselines ------------------------------------------------------------------------------------------


def _signed_head(uid: str, created: str) -> dict[str, str]:
    stamp = utc_timestamp()
    return {
        "partner_id": PARTNER_ID,
        "timestamp": stamp,
        "signature": sign(stamp, PARTNER_ID, API_KEY),
        "user_id": uid,
        "user_created_at": created,
    }


def _body(uid: str, created: str, path: str) -> bytes:
    """The request as a script writes it: the whole document, base64 photo included, through json.dumps."""
    document = {
        **_signed_head(uid, created),
        "photo": base64.b64encode(Path(path).read_bytes()).decode("ascii"),
    }
    return json.dumps(document, separators=(",", ":")).encode()


def _spliced_body(uid: str, created: str, path: str) -> bytes:
    """The same bytes built as the tool builds them: a small JSON head, the base64 photo spliced in (base64
    never needs escaping), written by the tool's own encoder, so the baseline does no more work than the tool
    must, and no less."""
    head = json.dumps(_signed_head(uid, created), separators=(",", ":")).encode()
    return b"".join((head[:-1], b',"photo":"', pybase64.b64encode(Path(path).read_bytes()), b'"}'))


def _spliced_stdlib_body(uid: str, created: str, path: str) -> bytes:
    """The spliced body with the standard library's encoder, as the fair baseline was built before the tool
    took pybase64's: kept as a figure, since the tool's encoder is an advantage any script could take too."""
    head = json.dumps(_signed_head(uid, created), separators=(",", ":")).encode()
    return b"".join((head[:-1], b',"photo":"', base64.b64encode(Path(path).read_bytes()), b'"}'))


# How the bare loop builds each body: "spliced" is the fair floor the targets compare with; "spliced_stdlib"
# the same with the standard library's base64; "json" the loop as it was first written. The latter two are
# kept as figures.
BARE_BODIES: dict[str, Callable[[str, str, str], bytes]] = {
    "spliced": _spliced_body,
    "spliced_stdlib": _spliced_stdlib_body,
    "json": _body,
}


def bare_aiohttp(rows: Rows, base_url: str, concurrency: int, body: str = "spliced") -> dict[str, Any]:
    """The floor for any Python client: read, encode, sign, POST, read the answer; nothing else at all."""
    import aiohttp

    url = base_url + "/backfill_users"
    build = BARE_BODIES[body]
    ok = 0

    async def main() -> None:
        nonlocal ok
        connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
        headers = {"Content-Type": "application/json"}
        async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
            todo: Iterator[tuple[str, str, str]] = iter(rows)

            async def worker() -> None:
                nonlocal ok
                for uid, created, path in todo:
                    async with session.post(url, data=build(uid, created, path)) as response:
                        await response.read()
                        ok += response.status == 200

            await asyncio.gather(*(worker() for _ in range(concurrency)))

    start = _clock()
    asyncio.run(main())
    return {**_since(start), "requests": len(rows), "ok": ok, "maxrss_mb": _maxrss_mb()}


def adhoc_script(manifest: str, base_url: str) -> dict[str, Any]:
    """What the team ran before: read the CSV, POST each row in turn, look at the answer. No retries.

    `requests` with a Session (keep-alive), which flatters the script; stdlib http.client if requests is
    missing, so the smoke test runs on a bare dev install.
    """
    url = base_url + "/backfill_users"
    start = _clock()
    ok = 0
    try:
        import requests

        client = "requests"
        with requests.Session() as session, open(manifest, newline="") as handle:
            for row in csv.DictReader(handle):
                body = _body(row["user_id"], row["user_created_at"], row["image_path"])
                response = session.post(url, data=body, headers={"Content-Type": "application/json"})
                ok += response.status_code == 200 and response.json().get("ResultCode") == "0840"
    except ImportError:
        import http.client
        from urllib.parse import urlsplit

        client = "http.client"
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port)
        with open(manifest, newline="") as handle:
            for row in csv.DictReader(handle):
                body = _body(row["user_id"], row["user_created_at"], row["image_path"])
                conn.request("POST", parts.path, body, {"Content-Type": "application/json"})
                answer = conn.getresponse()
                ok += answer.status == 200 and json.loads(answer.read()).get("ResultCode") == "0840"
        conn.close()
    return {**_since(start), "ok": ok, "client": client}


# --- validation -----------------------------------------------------------------------------------------


def validate(manifest: str) -> dict[str, Any]:
    """`backfill validate` minus writing rejects.csv: the pre-scan, then every row's checks and file checks."""
    start = _clock()
    settings = load_settings(None, environ=ENV, flags={})
    valid, rejects = compose.validate(settings, Path(manifest))
    return {**_since(start), "valid": valid, "rejected": len(rejects), "maxrss_mb": _maxrss_mb()}


def stat_only_floor(manifest: str) -> dict[str, Any]:
    """The least a resume must do: parse the CSV and stat each file (an unchanged photo is one stat, no read)."""
    start = _clock()
    rows = 0
    with open(manifest, newline="") as handle:
        reader = csv.reader(handle)
        next(reader)
        for _, _, path in reader:
            os.stat(path)
            rows += 1
    return {**_since(start), "rows": rows}


def stat_floor(manifest: str) -> dict[str, Any]:
    """The least any validator with file checks must do: parse the CSV, stat and open-read each file once."""
    start = _clock()
    rows = 0
    with open(manifest, newline="") as handle:
        reader = csv.reader(handle)
        next(reader)
        for _, _, path in reader:
            os.stat(path)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.read(fd, 4096)
            finally:
                os.close(fd)
            rows += 1
    return {**_since(start), "rows": rows}


# --- ledger ---------------------------------------------------------------------------------------------


BINDING = Binding(partner_id=PARTNER_ID, endpoint="http://127.0.0.1:8080")


def _attempt(i: int) -> AttemptRequest:
    fp = Fingerprint(ref=f"/photos/u{i:07d}.png", size=20480, version="1")
    return AttemptRequest(
        user_id=f"u{i:07d}",
        photo_sha256="0" * 64,
        fingerprint=fp,
        user_created_at="2021-08-12",
        run_id="r",
        at=now_iso(),
    )


def _outcome(i: int) -> Outcome:
    return Outcome(
        user_id=f"u{i:07d}",
        attempt=1,
        state=State.ENROLLED,
        may_have_enrolled=False,
        proves_not_enrolled=False,
        http_status=200,
        result_code="0840",
        result_text="Enroll User",
        smile_job_id="0000021007",
        job_id="job",
        at=now_iso(),
    )


def _rows(i: int) -> tuple[tuple[object, ...], tuple[object, ...]]:
    """The two rows an enrolled user's attempt and outcome write, as the store's transitions make them."""
    begun = transitions.begin(None, _attempt(i))
    assert isinstance(begun, tuple)
    row, _ = begun
    done = transitions.settle(row, _outcome(i))
    assert done is not None
    return _values(row), _values(done)


def ledger_ours(path: str, users: int, concurrency: int) -> dict[str, Any]:
    """SqliteStore as the runner drives it: each of `concurrency` workers records an attempt (awaiting its
    group commit, as a send must) then its outcome (enrolled: queued, not awaited), user after user."""

    async def main() -> dict[str, float]:
        store = await SqliteStore.open(Path(path), BINDING, writable=True)
        await store.start_run(RunRecord(run_id="r", started_at=now_iso(), manifest="bench"))
        todo = iter(range(users))

        async def worker() -> None:
            for i in todo:
                await store.begin_attempt(_attempt(i))
                await store.settle(_outcome(i))

        start = _clock()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        await store.flush()  # outcomes are only counted once they are on disk
        result = _since(start)
        await store.close()
        return result

    return {**asyncio.run(main()), "users": users}


def _raw_store(path: str, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.executescript(_SCHEMA)
    return conn


def ledger_one_fsync_each(path: str, users: int) -> dict[str, Any]:
    """Durable without group commit: one fsync'd transaction per attempt and one per outcome."""
    conn = _raw_store(path, "FULL")
    start = _clock()
    for i in range(users):
        begun, done = _rows(i)
        conn.execute(_UPSERT, begun)  # autocommit: one fsync each
        conn.execute(_UPSERT, done)
    result = _since(start)
    conn.close()
    return {**result, "users": users}


def ledger_floor(path: str, users: int, concurrency: int) -> dict[str, Any]:
    """The store's writes with none of its machinery: the same rows (made by transitions.py, as the store must)
    and as many durable commits (synchronous=FULL) as its group commit makes, each writing a group's attempts and
    the outcomes of the group before (as they share a group in the store) in statements of as many rows as the
    store puts in one."""
    conn = _raw_store(path, "FULL")
    start = _clock()
    outcomes: list[tuple[object, ...]] = []
    for first in range(0, users, concurrency):
        pairs = [_rows(i) for i in range(first, min(first + concurrency, users))]
        conn.execute("BEGIN IMMEDIATE")
        _write_rows(conn, [begun for begun, _ in pairs] + outcomes)
        conn.execute("COMMIT")
        outcomes = [done for _, done in pairs]
    conn.execute("BEGIN IMMEDIATE")
    _write_rows(conn, outcomes)
    conn.execute("COMMIT")
    result = _since(start)
    conn.close()
    return {**result, "users": users}


def _write_rows(conn: sqlite3.Connection, rows: list[tuple[object, ...]]) -> None:
    for at in range(0, len(rows), _ROWS_PER_STATEMENT):
        chunk = rows[at : at + _ROWS_PER_STATEMENT]
        conn.execute(_upsert_rows(len(chunk)), [value for row in chunk for value in row])


def ledger_no_fsync(path: str, users: int) -> dict[str, Any]:
    """Not durable at all (synchronous=OFF, one transaction): what SQLite does with no fsync to wait for."""
    conn = _raw_store(path, "OFF")
    start = _clock()
    conn.execute("BEGIN")
    pairs = [_rows(i) for i in range(users)]
    _write_rows(conn, [begun for begun, _ in pairs])
    _write_rows(conn, [done for _, done in pairs])
    conn.execute("COMMIT")
    result = _since(start)
    conn.close()
    return {**result, "users": users}


# --- erasure --------------------------------------------------------------------------------------------


def _erasure_ledger(path: str, users: int) -> None:
    """A real ledger (its binding and secret made by SqliteStore) of `users` enrolled rows, each written twice
    (attempt, then outcome) as a run writes it, then closed."""

    async def make() -> None:
        store = await SqliteStore.open(Path(path), BINDING, writable=True)
        await store.close()

    asyncio.run(make())
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("BEGIN")
    pairs = [_rows(i) for i in range(users)]
    _write_rows(conn, [begun for begun, _ in pairs])
    _write_rows(conn, [done for _, done in pairs])
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def _forgotten_ids(users: int, every: int) -> list[str]:
    return [f"u{i:07d}" for i in range(0, users, every)]


def erasure_ours(path: str, users: int, every: int) -> dict[str, Any]:
    """`forget` of every `every`-th user through SqliteStore (secure_delete, VACUUM, the WAL truncated); then what
    a resume pays to look for tombstones, a chunk of 1,000 IDs at a time, against the done-rows query it already
    makes per chunk."""
    _erasure_ledger(path, users)
    ids = [f"u{i:07d}" for i in range(users)]
    gone = _forgotten_ids(users, every)

    async def main() -> dict[str, Any]:
        store = await SqliteStore.open(Path(path), BINDING, writable=True)
        try:
            start = _clock()
            done = await store.forget(gone, at=now_iso(), by="bench")
            forget = _since(start)
            assert done.count == len(gone)
            start = _clock()
            for at in range(0, users, 1000):
                await store.forgotten(ids[at : at + 1000])
            lookup = _since(start)
            start = _clock()
            for at in range(0, users, 1000):
                await store.done(ids[at : at + 1000])
            done_query = _since(start)
        finally:
            await store.close()
        return {
            "forget_s": forget["wall_s"],
            "tombstone_lookup_s": lookup["wall_s"],
            "done_query_s": done_query["wall_s"],
        }

    return {**asyncio.run(main()), "users": users, "forgotten": len(gone)}


def erasure_floor(path: str, users: int, every: int) -> dict[str, Any]:
    """The same rows deleted bare (one transaction, no secure_delete, no tombstone), which leaves their bytes in
    the file; then VACUUM of that file alone, the rewrite `forget` adds so that none is left."""
    _erasure_ledger(path, users)
    gone = _forgotten_ids(users, every)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    start = _clock()
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("DELETE FROM users WHERE user_id IN (SELECT value FROM json_each(?))", (json.dumps(gone),))
    conn.execute("COMMIT")
    delete = _since(start)
    start = _clock()
    conn.execute("VACUUM")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    vacuum = _since(start)
    conn.close()
    return {
        "delete_s": delete["wall_s"],
        "vacuum_s": vacuum["wall_s"],
        "users": users,
        "forgotten": len(gone),
    }

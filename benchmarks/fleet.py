"""`python -m benchmarks.fleet`: a fleet on one PostgreSQL ledger: scaling, the one rate, the ledger's cost.

Three measurements, each against a baseline measured in the same run:
- scaling: 1, 2 and 4 `backfill run` processes (concurrency 4 each) against a sandbox that answers in 250 ms,
  throughput as a ratio to one process (target >= 0.9 x N below the rate limit);
- rate fidelity: 4 processes under one --rate, joining one after another and one of them killed, the worst
  1-s window at the server as a ratio to --rate (target <= 1.1);
- the ledger's cost per row, in one process with 64 workers (--workers): begin + settle against PostgreSQL (its
  store path), and the fleet's path as a run takes it (the engine's claim stage, claims and finishes too), as
  ratios to SQLite's begin + settle (target for the fleet's path: >= 0.5), with the client's CPU per row and
  the PostgreSQL server's, from which follows how many rows per second one server holds, and (where the
  server has pg_stat_statements) the WAL bytes and blocks a row of PostgreSQL's statements, which other load on
  the machine doesn't move, in all and statement by statement.

The results file's `targets` says, for each target, the figure measured and whether it was met.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .suite import max_in_window
from .workers import cpu_stall_us, stall_share

ROOT = Path(__file__).resolve().parent.parent
PARTNER_ID, API_KEY = "085", "fleet-bench-key-5c1d"


def _manifest(folder: Path, rows: int) -> Path:
    from tests.conftest import png_bytes

    (folder / "images").mkdir(exist_ok=True)
    path = folder / "manifest.csv"
    with path.open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["user_id", "user_created_at", "image_path"])
        for i in range(rows):
            out.writerow([f"b{i:07d}", "2021-08-12", f"images/b{i:07d}.png"])
            (folder / "images" / f"b{i:07d}.png").write_bytes(png_bytes(i))
    return path


class Sandbox:
    def __init__(self, folder: Path, latency_ms: float) -> None:
        from tests.conftest import spawn_sandbox

        self.log = folder / "requests.jsonl"
        self.proc, self.base_url = spawn_sandbox(
            ["--latency-ms", str(latency_ms), "--request-log", str(self.log)], _env()
        )

    def arrivals(self) -> list[float]:
        from tests.conftest import request_log

        return sorted(float(r["t"]) for r in request_log(self.log) if r["event"] == "request")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _env() -> dict[str, str]:
    return {**os.environ, "SMILE_PARTNER_ID": PARTNER_ID, "SMILE_API_KEY": API_KEY}


def _run(manifest: Path, url: str, base_url: str, out: Path, *, rate: float, concurrency: int,
         env: dict[str, str]) -> subprocess.Popen[bytes]:  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-m", "backfill", "run", str(manifest), "--env", "local", "--base-url", base_url,
         "--checkpoint", url, "--out", str(out), "--no-progress", "--rate", str(rate), "--concurrency",
         str(concurrency), "--lease", "10"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def scaling(cluster: Any, folder: Path, *, per_process: int, latency_ms: float) -> dict[str, Any]:
    results: dict[str, Any] = {}
    env = {**_env(), **cluster.env()}
    for n in (1, 2, 4):
        work = folder / f"scale{n}"
        work.mkdir()
        manifest = _manifest(work, per_process * n)
        url = cluster.create_database(f"scale{n}")
        sandbox = Sandbox(work, latency_ms)
        try:
            procs = [_run(manifest, url, sandbox.base_url, work / "out", rate=10_000, concurrency=4, env=env)
                     for _ in range(n)]  # fmt: skip
            codes = [p.wait(timeout=600) for p in procs]
            times = sandbox.arrivals()
        finally:
            sandbox.close()
        span = times[-1] - times[0]
        results[str(n)] = {"rows": per_process * n, "exit_codes": codes, "requests": len(times),
                           "span_s": round(span, 2), "rows_per_s": round((len(times) - 1) / span, 2)}  # fmt: skip
    one = results["1"]["rows_per_s"]
    for n in ("2", "4"):
        results[n]["ratio_to_one"] = round(results[n]["rows_per_s"] / one, 2)
        results[n]["target"] = round(0.9 * int(n), 2)
    results["ideal_one_rows_per_s"] = round(4 / (latency_ms / 1000), 2)
    return results


def fidelity(cluster: Any, folder: Path, *, rate: float, rows: int, latency_ms: float) -> dict[str, Any]:
    work = folder / "fidelity"
    work.mkdir()
    manifest = _manifest(work, rows)
    url = cluster.create_database("fidelity")
    env = {**_env(), **cluster.env()}
    sandbox = Sandbox(work, latency_ms)
    try:
        procs = []
        for i in range(4):  # joining one after another
            procs.append(
                _run(manifest, url, sandbox.base_url, work / "out", rate=rate, concurrency=8, env=env)
            )
            time.sleep(1.0 if i < 3 else 2.0)
        procs[1].send_signal(signal.SIGKILL)  # one dies mid-run; its claims return after the lease
        for p in procs:
            p.wait(timeout=600)
        final = _run(manifest, url, sandbox.base_url, work / "out", rate=rate, concurrency=8, env=env)
        final.wait(timeout=600)
        times = sandbox.arrivals()
    finally:
        sandbox.close()
    worst = max_in_window(times)
    busy = [t for t in times if times[0] + 3 <= t <= times[-1] - 1]  # all four running, before the tail
    mean = (len(busy) - 1) / (busy[-1] - busy[0]) / rate if len(busy) > 2 else None
    return {
        "rate": rate, "rows": rows, "requests": len(times), "worst_1s_window": worst,
        "worst_ratio_to_rate": round(worst / rate, 3), "mean_ratio_to_rate_busy": mean and round(mean, 3),
    }  # fmt: skip


def _postgres_cpu() -> float:
    """CPU seconds used so far by every process named postgres (the cluster's server and its backends)."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if "(postgres)" not in stat:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _track_statements(cluster: Any) -> bool:
    """pg_stat_statements loaded into the cluster, for what the server does a row that no other load on the
    machine moves (the blocks its statements read or wrote, its WAL); False where the server has no such module."""
    if cluster.sql("SELECT count(*) FROM pg_available_extensions WHERE name = 'pg_stat_statements'") != "1":
        return False
    cluster.sql("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
    cluster.stop()
    cluster.start()
    cluster.sql("CREATE EXTENSION pg_stat_statements")  # its view shows every database's statements
    return True


def _statements(cluster: Any, database: str, *, reset: bool = False) -> list[dict[str, Any]]:
    """Every statement run in `database` since its reset that read or wrote anything, most blocks first: its
    text as pg_stat_statements keeps it (whitespace collapsed, cut at 100 characters), calls, execution ms, blocks
    (read or found in memory) and WAL bytes."""
    where = f"(SELECT oid FROM pg_database WHERE datname = '{database}')"
    if reset:
        cluster.sql(f"SELECT pg_stat_statements_reset(0, {where}, 0)")
        return []
    found = cluster.sql(
        "SELECT coalesce(json_agg(s ORDER BY s.blocks DESC, s.statement), '[]') FROM ("
        "SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 100) AS statement, calls, "
        "total_exec_time AS ms, shared_blks_hit + shared_blks_read AS blocks, wal_bytes::bigint AS wal "
        f"FROM pg_stat_statements WHERE dbid = {where} AND shared_blks_hit + shared_blks_read + wal_bytes > 0) s"
    )
    statements: list[dict[str, Any]] = json.loads(found)
    return statements


def _server_work(statements: list[dict[str, Any]], rows: int) -> dict[str, Any]:
    """The server's work a row, in all and statement by statement: which of a path's writes (attempts, outcomes,
    claims, finishes) it is made of."""
    return {
        "wal_bytes_per_row": round(sum(s["wal"] for s in statements) / rows),
        "blocks_per_row": round(sum(s["blocks"] for s in statements) / rows, 1),
        "statements": [
            {
                "statement": s["statement"],
                "calls": s["calls"],
                "exec_us_per_row": round(s["ms"] * 1e3 / rows, 1),
                "blocks_per_row": round(s["blocks"] / rows, 2),
                "wal_bytes_per_row": round(s["wal"] / rows, 1),
            }
            for s in statements
        ],
    }


def _request(user_id: str) -> Any:
    from backfill.images import Fingerprint
    from backfill.ledger import AttemptRequest

    fp = Fingerprint(ref=f"/img/{user_id}", size=1, version="1")
    return AttemptRequest(user_id=user_id, photo_sha256="a" * 64, fingerprint=fp, user_created_at="2021-01-01",
                          run_id="bench", at="2026-01-01T00:00:00.000Z")  # fmt: skip


def _outcome(user_id: str, attempt: int) -> Any:
    from backfill.ledger import Outcome
    from backfill.vocab import State

    return Outcome(user_id=user_id, attempt=attempt, state=State.ENROLLED, may_have_enrolled=False,
                   proves_not_enrolled=False, http_status=200, result_code="0840", result_text="ok",
                   smile_job_id="1", job_id="j", at="2026-01-01T00:00:01.000Z")  # fmt: skip


async def _one_row(store: Any, user_id: str) -> None:
    """What a worker asks of the ledger for one row: the attempt recorded, then its outcome."""
    from backfill.ledger import Ticket

    ticket = await store.begin_attempt(_request(user_id))
    assert isinstance(ticket, Ticket), ticket
    await store.settle(_outcome(user_id, ticket.number))


class _Rows:
    """The rows to send, handed to the workers the same way on every path (a deque, no wait while one is
    ready), so that what differs between the paths is the ledger's cost, not the benchmark's."""

    def __init__(self) -> None:
        self.ready: deque[str] = deque()
        self._ended = False
        self._more = asyncio.Event()
        self._low = asyncio.Event()
        self._low_at = -1

    def add(self, user_ids: Iterable[str]) -> None:
        self.ready.extend(user_ids)
        self._more.set()

    def end(self) -> None:
        self._ended = True
        self._more.set()

    async def next(self) -> str | None:
        """The next row for a worker, or None once every row is handed out."""
        while not self.ready:
            if self._ended:
                return None
            self._more.clear()
            await self._more.wait()
        if len(self.ready) <= self._low_at:
            self._low.set()
        return self.ready.popleft()

    async def down_to(self, n: int) -> None:
        """Wait until no more than `n` rows are ready."""
        while len(self.ready) > n:
            self._low_at = n
            self._low.clear()
            await self._low.wait()


async def _store_path(store: Any, rows: int, workers: int) -> tuple[float, float]:
    """`workers` workers, each recording and settling rows: seconds and client CPU seconds for `rows` rows."""
    from backfill.ledger import RunRecord

    await store.start_run(RunRecord(run_id="bench", started_at="2026-01-01T00:00:00Z", manifest="m.csv"))
    ready = _Rows()
    ready.add(f"c{i:07d}" for i in range(rows))
    ready.end()

    async def worker() -> None:
        while (uid := await ready.next()) is not None:
            await _one_row(store, uid)

    began, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(workers)))
    await store.flush()
    return time.perf_counter() - began, time.process_time() - cpu


async def _fleet_path(store: Any, rows: int, workers: int) -> tuple[float, float]:
    """The fleet's path as a run takes it, through the engine's own claim stage (`run/claims.py`): the
    manifest loaded, rows claimed in batches one ahead of `workers` workers that record and settle each, and
    finished rows told in groups. Seconds and client CPU seconds for `rows` rows."""
    from types import SimpleNamespace

    from backfill.ledger import RunRecord
    from backfill.manifest import Batch, Candidate
    from backfill.run.claims import Claims

    await store.start_run(RunRecord(run_id="bench", started_at="2026-01-01T00:00:00Z", manifest="m.csv"))
    candidates = [Candidate(line=i + 2, user_id=f"c{i:07d}", user_created_at="2021-01-01", image="x")
                  for i in range(rows)]  # fmt: skip
    manifest = SimpleNamespace(sha256="bench", name="m.csv",
                               batches=lambda: iter([Batch(candidates=candidates, rejects=[])]))  # fmt: skip
    # The engine's claim batch for this many workers: max(16, min(chunk_rows, concurrency * 4)).
    batch_rows = workers * 4
    claims = Claims(store, manifest, batch=batch_rows, stopping=lambda: False, nap=asyncio.sleep)  # type: ignore[arg-type]
    ready = _Rows()

    async def claimer() -> None:
        handed = 0
        # Until every row is handed out, not until the claim stage says the manifest is done: that waits for the
        # last rows to be finished, a nap of up to a second that is no cost of the rows.
        while handed < rows and (batch := await claims.next_batch()) is not None:
            ready.add(c.user_id for c in batch.candidates)
            handed += len(batch.candidates)
            await ready.down_to(batch_rows)  # one batch ahead of the workers
        ready.end()

    async def worker() -> None:
        while (uid := await ready.next()) is not None:
            await _one_row(store, uid)
            claims.finished((uid,))

    began, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(claimer(), *(worker() for _ in range(workers)))
    await claims.close()
    await store.flush()
    return time.perf_counter() - began, time.process_time() - cpu


KINDS = ("sqlite", "postgres", "postgres_with_claims")


def ledger_cost(
    cluster: Any, folder: Path, *, rows: int, workers: int, repeats: int, statements: bool
) -> dict[str, Any]:
    """The ledger alone, in this process: SQLite's store path (the baseline), PostgreSQL's store path and its
    fleet path, each with `workers` workers as a run at --concurrency `workers` has them.

    The three take turns, `repeats` times, each on a ledger of its own, and each one's best is kept: on a
    shared machine, a burst of someone else's work lands on one measurement, not on every turn of one kind.
    With `statements` (pg_stat_statements loaded), PostgreSQL's WAL bytes and blocks a row are reported too,
    in all and for each statement (`*_statements`)."""
    from backfill.ledger import Binding
    from backfill.ledger.postgres import PostgresStore
    from backfill.ledger.sqlite import SqliteStore

    binding = Binding(partner_id=PARTNER_ID, endpoint="http://127.0.0.1:1")
    os.environ.update(cluster.env())

    async def measure(kind: str, turn: int) -> dict[str, Any]:
        store: Any
        database = f"cost_{kind}_{turn}"
        if kind == "sqlite":
            store = await SqliteStore.open(folder / f"cost{turn}.sqlite", binding, writable=True)
        else:
            url = cluster.create_database(database)
            store = await PostgresStore.open(url, binding, writable=True, pool_size=workers + 4)
        tracked = statements and kind != "sqlite"
        if tracked:
            _statements(cluster, database, reset=True)
        try:
            server, stall = _postgres_cpu(), cpu_stall_us()
            took, cpu = await (_fleet_path if kind == "postgres_with_claims" else _store_path)(
                store, rows, workers
            )
            server_cpu, stalled = _postgres_cpu() - server, stall_share(stall, cpu_stall_us(), took)
        finally:
            await store.close()
        found = {"rows_per_s": round(rows / took), "client_cpu_us_per_row": round(cpu / rows * 1e6),
                 "server_cpu_us_per_row": round(server_cpu / rows * 1e6), "cpu_stall_share": stalled}  # fmt: skip
        if tracked:
            found.update(_server_work(_statements(cluster, database), rows))
        return found

    async def go() -> dict[str, Any]:
        runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
        for turn in range(repeats):
            for kind in KINDS:
                runs[kind].append(await measure(kind, turn))
        out: dict[str, Any] = {"rows": rows, "workers": workers, "repeats": repeats}
        for kind in KINDS:
            best = max(runs[kind], key=lambda r: r["rows_per_s"])
            out.update({f"{kind}_{name}": value for name, value in best.items()})
            out[f"{kind}_rows_per_s_each"] = [r["rows_per_s"] for r in runs[kind]]
            if kind != "sqlite":
                out[f"{kind}_ratio_to_sqlite"] = round(best["rows_per_s"] / out["sqlite_rows_per_s"], 2)
        del out["sqlite_server_cpu_us_per_row"]  # SQLite has no server: what moved was someone else's
        per_row = out["postgres_with_claims_server_cpu_us_per_row"] / 1e6
        out["estimate_rows_per_s_one_server_per_core"] = round(1 / per_row) if per_row else None
        out["cores_here"] = os.cpu_count() or 1
        return out

    return asyncio.run(go())


PARTS = ("scaling", "fidelity", "ledger_cost")


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets for the fleet, each with the figure this run measured and whether it met it."""
    found = []
    cost, scale = results.get("ledger_cost"), results.get("scaling")
    if cost is not None:
        ratio = cost["postgres_with_claims_ratio_to_sqlite"]
        found.append({"name": "PostgreSQL fleet path, one process, rows/s over SQLite's", "value": ratio,
                      "target": ">= 0.5", "met": ratio >= 0.5})  # fmt: skip
    if scale is not None:
        ratio = scale["4"]["ratio_to_one"]
        found.append({"name": "a fleet of 4 processes, rows/s over one process", "value": ratio,
                      "target": ">= 3.6", "met": ratio >= 3.6})  # fmt: skip
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fleet", description=__doc__.splitlines()[0])
    parser.add_argument("--per-process", type=int, default=128, help="rows per process in the scaling runs")
    parser.add_argument("--latency-ms", type=float, default=250.0)
    parser.add_argument("--rate", type=float, default=40.0)
    parser.add_argument("--cost-rows", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=64, help="workers in the ledger cost (--concurrency)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="turns of the ledger cost; each kind's best is kept"
    )
    parser.add_argument(
        "--only", default=",".join(PARTS), help=f"a comma-separated choice of {', '.join(PARTS)}"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that it runs")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    chosen = [p.strip() for p in args.only.split(",") if p.strip()]
    if unknown := sorted(set(chosen) - set(PARTS)):
        parser.error(f"--only: no such part {', '.join(unknown)}")
    sys.path.insert(0, str(ROOT))
    from tests.pg_server import PgCluster

    per_process, cost_rows = (16, 200) if args.smoke else (args.per_process, args.cost_rows)
    repeats = 1 if args.smoke else args.repeats
    cluster = PgCluster.create(fsync=True)  # durable commits, as a partner's server makes them
    results: dict[str, Any] = {}
    try:
        statements = "ledger_cost" in chosen and _track_statements(cluster)
        with tempfile.TemporaryDirectory(prefix="backfill-fleet-bench-") as scratch:
            folder = Path(scratch)
            os.chmod(folder, 0o755)
            if "scaling" in chosen:
                results["scaling"] = scaling(
                    cluster, folder, per_process=per_process, latency_ms=args.latency_ms
                )
            if "fidelity" in chosen:
                results["fidelity"] = fidelity(
                    cluster, folder, rate=args.rate, rows=per_process * 4, latency_ms=args.latency_ms
                )
            if "ledger_cost" in chosen:
                results["ledger_cost"] = ledger_cost(
                    cluster,
                    folder,
                    rows=cost_rows,
                    workers=args.workers,
                    repeats=repeats,
                    statements=statements,
                )
    finally:
        cluster.destroy()
    results["targets"] = targets(results)
    print(json.dumps(results, indent=2))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (args.results_dir / f"fleet-{stamp}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

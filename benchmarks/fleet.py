"""`python -m benchmarks.fleet`: a fleet on one PostgreSQL ledger: scaling, the one rate, the ledger's cost.

Three measurements, each against a baseline measured in the same run:
- scaling: 1, 2 and 4 `backfill run` processes (concurrency 4 each) against a sandbox that answers in 250 ms,
  throughput as a ratio to one process (target >= 0.9 x N below the rate limit);
- rate fidelity: 4 processes under one --rate, joining one after another and one of them killed, the worst
  1-s window at the server as a ratio to --rate (target <= 1.1);
- the ledger's cost per row: begin + settle (and claim + finish) against PostgreSQL, as a ratio to SQLite, with
  the PostgreSQL server's own CPU per row, from which follows how many rows per second one server holds.
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
from pathlib import Path
from typing import Any

from .suite import max_in_window

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


async def _ledger_cost(store: Any, rows: int, concurrency: int, *, claims: bool) -> float:
    from backfill.images import Fingerprint
    from backfill.ledger import AttemptRequest, Outcome, RunRecord
    from backfill.manifest import Batch, Candidate
    from backfill.vocab import State

    await store.start_run(RunRecord(run_id="bench", started_at="2026-01-01T00:00:00Z", manifest="m.csv"))
    ids = [f"c{i:07d}" for i in range(rows)]
    queue: asyncio.Queue[str] = asyncio.Queue()
    if claims:

        async def batches() -> Any:
            yield Batch(candidates=[Candidate(line=i + 2, user_id=u, user_created_at="2021-01-01", image="x")
                                    for i, u in enumerate(ids)], rejects=[])  # fmt: skip

        await store.load("bench", "m.csv", batches())
    else:
        for u in ids:
            queue.put_nowait(u)

    async def worker() -> None:
        while True:
            if claims:
                got = await store.claim("bench", 16)
                if not got.candidates:
                    return
                todo = [c.user_id for c in got.candidates]
            else:
                if queue.empty():
                    return
                todo = [queue.get_nowait()]
            for u in todo:
                fp = Fingerprint(ref=f"/img/{u}", size=1, version="1")
                ticket = await store.begin_attempt(AttemptRequest(
                    user_id=u, photo_sha256="a" * 64, fingerprint=fp, user_created_at="2021-01-01",
                    run_id="bench", at="2026-01-01T00:00:00.000Z"))  # fmt: skip
                await store.settle(Outcome(
                    user_id=u, attempt=ticket.number, state=State.ENROLLED, may_have_enrolled=False,
                    proves_not_enrolled=False, http_status=200, result_code="0840", result_text="ok",
                    smile_job_id="1", job_id="j", at="2026-01-01T00:00:01.000Z"))  # fmt: skip
            if claims:
                await store.finish("bench", [c.line for c in got.candidates])

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await store.flush()
    return time.perf_counter() - began


def ledger_cost(cluster: Any, folder: Path, *, rows: int, concurrency: int) -> dict[str, Any]:
    from backfill.ledger import Binding
    from backfill.ledger.postgres import PostgresStore
    from backfill.ledger.sqlite import SqliteStore

    binding = Binding(partner_id=PARTNER_ID, endpoint="http://127.0.0.1:1")
    os.environ.update(cluster.env())

    async def go() -> dict[str, Any]:
        sqlite = await SqliteStore.open(folder / "cost.sqlite", binding, writable=True)
        try:
            t_sqlite = await _ledger_cost(sqlite, rows, concurrency, claims=False)
        finally:
            await sqlite.close()
        out: dict[str, Any] = {"rows": rows, "concurrency": concurrency,
                               "sqlite_rows_per_s": round(rows / t_sqlite)}  # fmt: skip
        for claims in (False, True):
            url = cluster.create_database(f"cost_{int(claims)}")
            pg = await PostgresStore.open(url, binding, writable=True, pool_size=concurrency + 2)
            try:
                cpu = _postgres_cpu()
                took = await _ledger_cost(pg, rows, concurrency, claims=claims)
                server_cpu = _postgres_cpu() - cpu
            finally:
                await pg.close()
            key = "postgres_with_claims" if claims else "postgres"
            out[f"{key}_rows_per_s"] = round(rows / took)
            out[f"{key}_ratio_to_sqlite"] = round(t_sqlite / took, 2)
            out[f"{key}_server_cpu_us_per_row"] = round(server_cpu / rows * 1e6)
        per_row = out["postgres_with_claims_server_cpu_us_per_row"] / 1e6
        cores = os.cpu_count() or 1
        out["estimate_rows_per_s_one_server_per_core"] = round(1 / per_row) if per_row else None
        out["cores_here"] = cores
        return out

    return asyncio.run(go())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fleet", description=__doc__.splitlines()[0])
    parser.add_argument("--per-process", type=int, default=128, help="rows per process in the scaling runs")
    parser.add_argument("--latency-ms", type=float, default=250.0)
    parser.add_argument("--rate", type=float, default=40.0)
    parser.add_argument("--cost-rows", type=int, default=4000)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that it runs")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from tests.pg_server import PgCluster

    per_process, cost_rows = (16, 200) if args.smoke else (args.per_process, args.cost_rows)
    cluster = PgCluster.create(fsync=True)  # durable commits, as a partner's server makes them
    try:
        with tempfile.TemporaryDirectory(prefix="backfill-fleet-bench-") as scratch:
            folder = Path(scratch)
            os.chmod(folder, 0o755)
            results = {
                "scaling": scaling(cluster, folder, per_process=per_process, latency_ms=args.latency_ms),
                "fidelity": fidelity(
                    cluster, folder, rate=args.rate, rows=per_process * 4, latency_ms=args.latency_ms
                ),
                "ledger_cost": ledger_cost(cluster, folder, rows=cost_rows, concurrency=16),
            }
    finally:
        cluster.destroy()
    print(json.dumps(results, indent=2))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (args.results_dir / f"fleet-{stamp}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

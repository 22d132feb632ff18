"""Photos in object storage: validation and end-to-end rows/s and client CPU per row, S3 (moto) against local files.

    python -m benchmarks.remote                 # 10,000 photos of 20 KB (~6 min on 2 cores; moto is the limit)
    python -m benchmarks.remote --rows 2000     # quicker
    python -m benchmarks.remote --smoke         # 200 rows: proves it still runs

Every figure is a ratio against a baseline measured in the same run: the same bytes as local files, and a bare
obstore loop (the least any S3 client must do: one GET per photo, as many in flight as --read-concurrency).
Each measurement runs in a fresh spawned process; the S3 server (moto, behind the request-counting wrapper of
tests/s3_server.py) and the API server (benchmarks/servers.py `fast`) run in their own processes, so their CPU
is never the client's. Requests are counted where the S3 server receives them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from . import data
from .servers import ROOT, ServerProcess
from .workers import ENV, in_child, settings_flags

BUCKET = "bench-photos"
UNTHROTTLED = 1e9
POOL = 50  # distinct photos; rows cycle through them (every row still has its own object and file)


def _s3_env(port: int) -> dict[str, str]:
    from tests.s3_server import ACCESS_KEY, REGION, SECRET_KEY

    return {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def _store() -> Any:
    from backfill.images.remote import StoreOptions, make_store
    from backfill.images.urls import parse

    return make_store(parse(f"s3://{BUCKET}/x"), StoreOptions())


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float], rows: int) -> dict[str, float]:
    wall, cpu = time.perf_counter() - start[0], time.process_time() - start[1]
    return {
        "wall_s": round(wall, 3),
        "rows_per_s": round(rows / wall, 1),
        "cpu_us_per_row": round(cpu / rows * 1e6),
    }


# --- in children ------------------------------------------------------------------------------------------


def upload(photos: list[bytes], rows: int, concurrency: int) -> dict[str, Any]:
    import obstore

    store = _store()

    async def go() -> None:
        slots = asyncio.Semaphore(concurrency)

        async def put(i: int) -> None:
            async with slots:
                await obstore.put_async(
                    store, f"photos/{i // 1000:03d}/u{i:06d}.png", photos[i % len(photos)]
                )

        await asyncio.gather(*(put(i) for i in range(rows)))

    start = _clock()
    asyncio.run(go())
    return _since(start, rows)


def bare_loop(keys: list[str], concurrency: int, ranged: bool) -> dict[str, Any]:
    """A pool of `concurrency` tasks, each a GET after a GET (whole objects, or their first 8 KB) and nothing
    else: no parsing, no checks, no hashing."""
    import obstore

    store = _store()
    todo = iter(keys)
    got = 0

    async def worker() -> None:
        nonlocal got
        for key in todo:
            if ranged:
                got += len(await obstore.get_range_async(store, key, start=0, length=8192))
            else:
                got += len(await (await obstore.get_async(store, key)).bytes_async())

    async def go() -> None:
        await asyncio.gather(*(worker() for _ in range(concurrency)))

    start = _clock()
    asyncio.run(go())
    return {**_since(start, len(keys)), "bytes": got}


def validate(manifest: str, read_concurrency: int, profile: bool) -> dict[str, Any]:
    from backfill import compose
    from backfill.config import load_settings

    # Rows cycle through a pool of photos (POOL): the shared-photo census is off, as in the runs.
    flags = {"read_concurrency": read_concurrency, "max_ids_per_photo": 0}
    settings = load_settings(None, environ=ENV, flags=flags)
    profiler = None
    if profile:
        try:
            from pyinstrument import Profiler
        except ImportError:
            profiler = None
        else:
            profiler = Profiler(interval=0.001, async_mode="disabled")
            profiler.start()
    start = _clock()
    try:
        valid, rejects = compose.validate(settings, manifest if "://" in manifest else Path(manifest))
    finally:
        if profiler is not None:
            profiler.stop()
    result: dict[str, Any] = {**_since(start, valid + len(rejects)), "valid": valid, "rejected": len(rejects)}
    if profiler is not None:
        from .profiling import hotspots

        result["hotspots"] = hotspots(profiler.last_session, str(ROOT / "backfill"), top=6)
    return result


def run(manifest: str, flags: dict[str, Any]) -> dict[str, Any]:
    from backfill import compose
    from backfill.config import load_settings

    settings = load_settings(None, environ=ENV, flags=flags)
    start = _clock()
    summary = asyncio.run(compose.run(settings, manifest if "://" in manifest else Path(manifest)))
    return {**_since(start, summary.total_rows), "counts": summary.counts, "exit_code": summary.exit_code}


# --- the benchmark ----------------------------------------------------------------------------------------


def _requests(server: Any) -> Counter[str]:
    """What the S3 server received since its last reset, by kind: GET (ranged or whole), HEAD, LIST, PUT."""
    kinds: Counter[str] = Counter()
    for r in server.requests():
        if r["method"] == "GET" and "/" not in r["path"].lstrip("/"):
            kinds["LIST"] += 1
        elif r["method"] == "GET":
            kinds["GET ranged" if r["range"] else "GET whole"] += 1
        else:
            kinds[r["method"]] += 1
    server.reset()
    return kinds


def _server_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench(
    rows: int, photo_bytes: int, read_concurrency: int, concurrency: int, profile: bool
) -> dict[str, Any]:
    from tests.s3_server import S3Server

    work = Path(tempfile.mkdtemp(prefix="backfill-bench-remote-"))
    photos = [data.noisy_png(photo_bytes, seed) for seed in range(POOL)]
    keys = [f"photos/{i // 1000:03d}/u{i:06d}.png" for i in range(rows)]
    # The same bytes as local files: one real file per row (not hard links, which would share one warm inode).
    for i, key in enumerate(keys):
        path = work / "local" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(photos[i % POOL])
    local_manifest = data.write_manifest(
        work / "local" / "manifest.csv", ((data.user_id(i), "2021-08-12", key) for i, key in enumerate(keys))
    )
    remote_manifest = data.write_manifest(
        work / "remote.csv",
        ((data.user_id(i), "2021-08-12", f"s3://{BUCKET}/{key}") for i, key in enumerate(keys)),
    )
    s3 = S3Server.start()
    os.environ.update(_s3_env(s3.port))  # the spawned children inherit it
    results: dict[str, Any] = {
        "rows": rows,
        "photo_bytes": photo_bytes,
        "read_concurrency": read_concurrency,
        "concurrency": concurrency,
    }
    try:
        s3.client().create_bucket(Bucket=BUCKET)
        results["upload"] = in_child(upload, photos, rows, 32)
        _requests(s3)
        timed: dict[str, Any] = {}
        cpu0 = _server_cpu_s(s3.process.pid)
        timed["bare_get_whole"] = in_child(bare_loop, keys, read_concurrency, False)
        timed["bare_get_ranged"] = in_child(bare_loop, keys, read_concurrency, True)
        _requests(s3)
        for name, manifest in (("local", str(local_manifest)), ("remote", str(remote_manifest))):
            timed[f"validate_{name}"] = in_child(
                validate, manifest, read_concurrency, profile and name == "remote"
            )
            timed[f"validate_{name}"]["requests"] = dict(_requests(s3))
        with ServerProcess("fast") as api:
            for name, manifest in (("local", str(local_manifest)), ("remote", str(remote_manifest))):
                flags = settings_flags(
                    api.base_url,
                    work / name,
                    rate=UNTHROTTLED,
                    concurrency=concurrency,
                    read_concurrency=read_concurrency,
                )
                timed[f"run_{name}"] = in_child(run, manifest, flags)
                timed[f"run_{name}"]["requests"] = dict(_requests(s3))
            flags = settings_flags(
                api.base_url,
                work / "remote",
                rate=UNTHROTTLED,
                concurrency=concurrency,
                read_concurrency=read_concurrency,
            )
            timed["resume_remote"] = in_child(run, str(remote_manifest), flags)
            timed["resume_remote"]["requests"] = dict(_requests(s3))
        cpu = _server_cpu_s(s3.process.pid) - cpu0
        served = (
            sum(
                sum(timed[k]["requests"].values())
                for k in timed
                if isinstance(timed[k], dict) and "requests" in timed[k]
            )
            + 2 * rows
        )  # the bare loops' GETs
        timed["s3_server_cpu_us_per_request"] = round(cpu / served * 1e6)
        results.update(timed)
    finally:
        s3.stop()
    return results | {"ratios": ratios(results)}


def ratios(r: dict[str, Any]) -> dict[str, float]:
    def ratio(a: str, b: str, what: str) -> float:
        return round(r[a][what] / r[b][what], 3) if r[b][what] else 0.0

    speed, cpu = "rows_per_s", "cpu_us_per_row"
    return {
        "validate_remote_over_local_rows_per_s": ratio("validate_remote", "validate_local", speed),
        "validate_remote_over_bare_ranged_get_rows_per_s": ratio("validate_remote", "bare_get_ranged", speed),
        "run_remote_over_local_rows_per_s": ratio("run_remote", "run_local", speed),
        # A run reads each object twice (its check, then its bytes at send time): this ratio's ceiling is ~0.5.
        "run_remote_over_bare_get_rows_per_s": ratio("run_remote", "bare_get_whole", speed),
        "validate_cpu_remote_over_local": ratio("validate_remote", "validate_local", cpu),
        "validate_cpu_remote_over_bare_ranged_get": ratio("validate_remote", "bare_get_ranged", cpu),
        "run_cpu_remote_over_local": ratio("run_remote", "run_local", cpu),
        "run_cpu_remote_over_two_bare_gets": round(r["run_remote"][cpu] / (2 * r["bare_get_whole"][cpu]), 3),
    }


def table(r: dict[str, Any]) -> str:
    lines = [
        f"{r['rows']:,} photos of {r['photo_bytes']:,} bytes; read concurrency {r['read_concurrency']}, "
        f"send concurrency {r['concurrency']}",
        f"{'measurement':<22} {'rows/s':>9} {'CPU us/row':>11}  S3 requests",
    ]
    for name in (
        "bare_get_ranged",
        "bare_get_whole",
        "validate_local",
        "validate_remote",
        "run_local",
        "run_remote",
        "resume_remote",
    ):
        m = r[name]
        lines.append(
            f"{name:<22} {m['rows_per_s']:>9,.0f} {m['cpu_us_per_row']:>11,}  {m.get('requests', '')}"
        )
    lines.append(f"S3 server (moto) CPU per request: {r['s3_server_cpu_us_per_request']:,} us")
    lines += [f"{k}: {v}" for k, v in r["ratios"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.remote", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--photo-bytes", type=int, default=20_000)
    parser.add_argument("--read-concurrency", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--smoke", action="store_true", help="200 rows, no profile")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    rows = 200 if args.smoke else args.rows
    sys.path.insert(0, str(ROOT))  # tests/s3_server.py, the moto wrapper
    results = bench(
        rows,
        args.photo_bytes,
        args.read_concurrency,
        args.concurrency,
        profile=not (args.smoke or args.no_profile),
    )
    print(table(results))
    hot = results["validate_remote"].get("hotspots")
    if hot:
        print("remote validation, where the event loop's time goes (sampled):")
        print(json.dumps(hot, indent=1)[:3000])
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (args.results_dir / f"remote-{stamp}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

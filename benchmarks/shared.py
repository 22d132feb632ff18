"""`python -m benchmarks.shared`: what the shared-photo census costs validation, as a ratio to validation without it.

`backfill validate` of the same manifest with `max_ids_per_photo` 1 (the census: every checked photo into a
temporary SQLite table, the candidates read whole) and 0 (no census: validation as it was before), in turns,
each in a fresh spawned process, the best of each kept. Two manifests:
- clean: every row its own photo (distinct tiny PNGs), the common case: target after / before >= 0.9;
- shared: every photo named by 36 user_ids, the case the census exists for (every photo is a candidate and
  read whole): its ratio is reported, with no target.

Then what the census costs a run's resume of a completed job (every row done: the census reads no photo and asks
the ledger for no pin, but is one more pass over the manifest and the ledger's `done`): `run` of a finished job
of --resume-rows distinct photos against the fast fake API, with and without the census, in turns; reported,
with no target (docs/performance.md's resume target is the scale benchmark's).

Then what asking the ledger costs a run's census (`Store.holders`: IDs sent from other manifests count too): the
census of the clean manifest, as a run takes it, against a SQLite ledger holding --held IDs sent earlier (each
with a keyed sample, none of them this manifest's photos), with the ledger and without it, in turns; reported, with
no target.

Writes `shared-<UTC timestamp>.json` (figures, and `targets` with each target's figure and whether it was met)
to --results-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import data
from .workers import ENV, in_child, settings_flags

ROOT = Path(__file__).resolve().parent.parent
SHARED_BY = 36  # user_ids per photo in the shared manifest: what the reporter saw
TARGET = 0.9  # validation with the census, as a share of validation without it


def validate(manifest: str, max_ids: int, seeded_sample: bool = False) -> dict[str, Any]:
    """One `backfill validate` of `manifest` (minus writing rejects.csv), in this process. `seeded_sample`: with
    each photo's sample taken as it was before the ledger kept samples (Python's own hash of the bytes, seeded
    per process, which no other process can compare), to price the stable one it has now."""
    import resource

    from backfill import compose
    from backfill.config import load_settings
    from backfill.images import content

    if seeded_sample:
        content.sample_of = lambda first: hash(tuple(first)) or 1  # type: ignore[assignment]

    settings = load_settings(None, environ=ENV, flags={"max_ids_per_photo": max_ids})
    start = time.perf_counter()
    found = compose.validation(settings, Path(manifest))
    seconds = time.perf_counter() - start
    rows = found.valid + len(found.rejects)
    return {
        "seconds": seconds,
        "rows": rows,
        "rows_per_s": rows / seconds,
        "valid": found.valid,
        "shared_photos": found.shared_photos,
        "read_whole": found.read_whole,
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_once(manifest: str, flags: dict[str, Any]) -> dict[str, Any]:
    """One `backfill run` through the library, in this process."""
    import asyncio
    import resource

    from backfill import compose
    from backfill.config import load_settings

    settings = load_settings(None, environ=ENV, flags=flags)
    start = time.perf_counter()
    summary = asyncio.run(compose.run(settings, Path(manifest)))
    return {
        "seconds": time.perf_counter() - start,
        "counts": summary.counts,
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def measure_resume(manifest: Path, work: Path, repeats: int) -> dict[str, Any]:
    """A job run to its end once, then resumed with and without the census, in turns; the best of each."""
    from .servers import ServerProcess

    ledger = work / "resume-ledger.sqlite"
    ledger.unlink(missing_ok=True)
    with ServerProcess("fast") as server:

        def flags(max_ids: int) -> dict[str, Any]:
            common = settings_flags(server.base_url, work, rate=1e9, concurrency=64, checkpoint=ledger)
            return {**common, "max_ids_per_photo": max_ids}

        full = in_child(run_once, str(manifest), flags(1))
        runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
        for _ in range(repeats):
            runs["before"].append(in_child(run_once, str(manifest), flags(0)))
            runs["after"].append(in_child(run_once, str(manifest), flags(1)))
    best = {k: min(v, key=lambda r: r["seconds"]) for k, v in runs.items()}
    return {
        "full_run": full,
        "before": best["before"],
        "after": best["after"],
        "after_over_before_time": best["after"]["seconds"] / best["before"]["seconds"],
        "seconds_every_turn": {k: [round(r["seconds"], 2) for r in v] for k, v in runs.items()},
    }


def measure(manifest: Path, repeats: int) -> dict[str, Any]:
    """Before (no census), after (the census) and the census with the per-process sample it had before the
    ledger kept samples (`seeded`), in turns; the best of each, and after / before, after / seeded."""
    runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": [], "seeded": []}
    for _ in range(repeats):
        runs["before"].append(in_child(validate, str(manifest), 0))
        runs["after"].append(in_child(validate, str(manifest), 1))
        runs["seeded"].append(in_child(validate, str(manifest), 1, True))
    best = {k: max(v, key=lambda r: r["rows_per_s"]) for k, v in runs.items()}
    return {
        "rows": best["after"]["rows"],
        "before": best["before"],
        "after": best["after"],
        "seeded": best["seeded"],
        "after_over_before": best["after"]["rows_per_s"] / best["before"]["rows_per_s"],
        "after_over_seeded": best["after"]["rows_per_s"] / best["seeded"]["rows_per_s"],
        "rows_per_s_every_turn": {k: [round(r["rows_per_s"]) for r in v] for k, v in runs.items()},
    }


def census_once(manifest: str, ledger: str | None) -> dict[str, Any]:
    """The census a run takes of `manifest` (every row still to be sent), with the SQLite `ledger` or none."""
    import asyncio

    from backfill import compose
    from backfill.config import load_settings
    from backfill.images.keyed import KeyedImageSource
    from backfill.ledger.sqlite import SqliteStore
    from backfill.manifest import open_manifest
    from backfill.run.shared import take_census

    settings = load_settings(None, environ=ENV, flags={"env": "local"})

    async def go() -> dict[str, Any]:
        found = open_manifest(Path(manifest), compose.manifest_rules(settings))
        images = compose.image_source(settings, manifest, policy=compose.retry_policy(settings))
        store = None if ledger is None else await SqliteStore.open(Path(ledger), None, writable=False)
        try:
            if store is not None:
                images = KeyedImageSource(images, store.photo_key)
            start = time.perf_counter()
            shared = await take_census(found, images, max_ids=1, store=store)
            seconds = time.perf_counter() - start
            assert shared is not None
            shared.close()
            return {"seconds": seconds, "read_whole": shared.read_whole, "groups": shared.groups}
        finally:
            await images.close()
            if store is not None:
                await store.close()

    return asyncio.run(go())


def held_ledger(path: Path, held: int) -> Path:
    """A SQLite ledger holding `held` enrolled IDs sent earlier, each pinned with a size and keyed sample of a
    photo no manifest here names (made with the store's own schema, rows written directly: quick to build)."""
    import asyncio
    import random
    import sqlite3

    from backfill.ledger import Binding
    from backfill.ledger.sqlite import SqliteStore

    marker = path.with_suffix(f".held-{held}")
    if marker.exists():
        return path
    for old in path.parent.glob(path.name + "*"):
        old.unlink()
    binding = Binding(partner_id=ENV["SMILE_PARTNER_ID"], endpoint="http://127.0.0.1:1")

    async def make() -> None:
        await (await SqliteStore.open(path, binding, writable=True)).close()

    asyncio.run(make())
    rng = random.Random(7)
    conn = sqlite3.connect(path)
    try:
        conn.executemany(
            "INSERT INTO users (user_id, state, attempts, doubt, photo_sha256, image_ref, image_size, "
            "image_version, photo_sample) VALUES (?, 'enrolled', 1, 0, ?, ?, ?, '1', ?)",
            (
                (f"earlier{i:08d}", f"{i:064x}", f"/elsewhere/{i}.png", 69, rng.getrandbits(63) or 1)
                for i in range(held)
            ),
        )
        conn.commit()
    finally:
        conn.close()
    marker.touch()
    return path


def measure_ledger_census(manifest: Path, work: Path, held: int, repeats: int) -> dict[str, Any]:
    """The census of `manifest` with a ledger of `held` earlier IDs and without one, in turns; the best of each."""
    ledger = held_ledger(work / "held-ledger.sqlite", held)
    runs: dict[str, list[dict[str, Any]]] = {"without": [], "with": []}
    for _ in range(repeats):
        runs["without"].append(in_child(census_once, str(manifest), None))
        runs["with"].append(in_child(census_once, str(manifest), str(ledger)))
    best = {k: min(v, key=lambda r: r["seconds"]) for k, v in runs.items()}
    return {
        "held": held,
        "without": best["without"],
        "with": best["with"],
        "with_over_without_time": best["with"]["seconds"] / best["without"]["seconds"],
        "seconds_every_turn": {k: [round(r["seconds"], 2) for r in v] for k, v in runs.items()},
    }


def measure_sample(repeats: int, rows_per_s: float) -> dict[str, Any]:
    """The stable sample (`sample_of`) against the per-process one it replaced (Python's hash), over what the check
    of a photo past 8 KB reads first (a 4 KB head, a 1 KB tail), each on new bytes objects (a bytes object keeps
    its hash); and the difference as a share of a validated row's time (`rows_per_s`, the clean manifest's)."""
    import os
    import timeit

    from backfill.images.content import HEAD, TAIL, sample_of

    head, tail = os.urandom(HEAD), os.urandom(TAIL)
    number = 20_000

    def fresh() -> tuple[bytes, bytes]:
        return bytes(bytearray(head)), bytes(bytearray(tail))

    def per_call(work: Any) -> float:
        return min(timeit.repeat(work, number=number, repeat=max(repeats, 3))) / number * 1e6

    copy = per_call(fresh)
    stable = per_call(lambda: sample_of(fresh())) - copy
    seeded = per_call(lambda: hash(fresh())) - copy
    row_us = 1e6 / rows_per_s
    return {
        "stable_us": stable,
        "seeded_hash_us": seeded,
        "validated_row_us": row_us,
        "extra_share_of_a_row": (stable - seeded) / row_us,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.shared", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resume-rows", type=int, default=20_000, help="rows of the completed job resumed")
    parser.add_argument("--held", type=int, default=1_000_000, help="IDs sent earlier in the census's ledger")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that it runs")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / f"backfill-bench-{os.getuid()}",
        help="where the photos are made, and reused by later runs (the scale benchmark's too)",
    )
    parser.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    rows, repeats = (200, 1) if args.smoke else (args.rows, args.repeats)
    tree = data.tiny_tree(args.data_dir / f"tiny-{rows}", rows)
    work = args.data_dir / "shared"
    clean = data.tiny_manifest(work / f"clean-{rows}.csv", tree, rows)
    shared = data.write_manifest(
        work / f"shared-{rows}.csv",
        ((data.user_id(i), data.CREATED_AT, str(tree / data.tiny_path(i // SHARED_BY))) for i in range(rows)),
    )
    results: dict[str, Any] = {"clean": measure(clean, repeats), "shared": measure(shared, repeats)}
    results["sample"] = measure_sample(repeats, results["clean"]["after"]["rows_per_s"])
    held = 1000 if args.smoke else args.held
    results["ledger_census"] = measure_ledger_census(clean, work, held, repeats)
    resume_rows = 100 if args.smoke else min(args.resume_rows, rows)
    done = data.tiny_manifest(work / f"resume-{resume_rows}.csv", tree, resume_rows)
    results["resume"] = measure_resume(done, work, repeats)
    ratio = results["clean"]["after_over_before"]
    target = {
        "name": "validation with the census / without, every photo its own",
        "value": round(ratio, 3),
        "target": f">= {TARGET}",
        "met": ratio >= TARGET,
    }
    output = {
        "meta": {"mode": "smoke" if args.smoke else "full", "rows": rows, "repeats": repeats},
        "results": results,
        "targets": [target],
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.results_dir / f"shared-{stamp}.json"
    path.write_text(json.dumps(output, indent=2) + "\n")
    resume = results["resume"]
    print(
        f"resume of a completed job of {resume_rows} rows: {resume['before']['seconds']:.2f} s without the census, "
        f"{resume['after']['seconds']:.2f} s with it ({resume['after_over_before_time']:.2f} x the time)"
    )
    for name in ("clean", "shared"):
        r = results[name]
        print(
            f"{name}: {r['rows']} rows, {r['before']['rows_per_s']:,.0f} rows/s without the census, "
            f"{r['after']['rows_per_s']:,.0f} with it ({r['after_over_before']:.2f}; with a per-process sample "
            f"{r['seeded']['rows_per_s']:,.0f}, {r['after_over_seeded']:.2f}); "
            f"{r['after']['shared_photos']} shared photos, {r['after']['read_whole']} read whole"
        )
    census = results["ledger_census"]
    print(
        f"a run's census of the clean manifest: {census['without']['seconds']:.2f} s without a ledger, "
        f"{census['with']['seconds']:.2f} s against a ledger of {held:,} IDs sent earlier "
        f"({census['with_over_without_time']:.2f} x the time)"
    )
    sample = results["sample"]
    print(
        f"sample of a 4 KB head and 1 KB tail: stable {sample['stable_us']:.2f} us, the per-process hash it "
        f"replaced {sample['seeded_hash_us']:.2f} us: {sample['extra_share_of_a_row']:+.1%} of a validated row "
        f"({sample['validated_row_us']:.1f} us)"
    )
    print(f"target: {target['value']} {target['target']}: {'met' if target['met'] else 'NOT met'}")
    print(f"results: {path}")


if __name__ == "__main__":
    main()

"""`python -m benchmarks.manifests`: the text checks of one manifest as CSV, JSON lines and Parquet, each in its own
process: rows/s and peak RSS, as ratios to CSV's and to the process that only imports what reading needs."""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import resource
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .data import CREATED_AT, user_id

FORMATS = ("csv", "jsonl", "parquet")
BATCH = 100_000  # rows written at a time: the writer's memory stays small at any size


def write(folder: Path, rows: int, formats: tuple[str, ...] = FORMATS) -> dict[str, Path]:
    """The same rows (one in 1,000 an exact copy of the row before: the duplicate scan has candidates) in each format."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {name: folder / f"manifest-{rows}.{name}" for name in formats}
    columns = ["user_id", "user_created_at", "image_path"]
    schema = pa.schema([(name, pa.string()) for name in columns])
    with contextlib.ExitStack() as files:
        csv_file = files.enter_context(paths["csv"].open("w")) if "csv" in paths else None
        jsonl_file = files.enter_context(paths["jsonl"].open("w")) if "jsonl" in paths else None
        parquet = (
            files.enter_context(pq.ParquetWriter(paths["parquet"], schema)) if "parquet" in paths else None
        )
        if csv_file:
            csv_file.write(",".join(columns) + "\n")
        for start in range(0, rows, BATCH):
            ids = [user_id(i - 1 if i % 1000 == 999 else i) for i in range(start, min(rows, start + BATCH))]
            batch = [(uid, CREATED_AT, f"photos/{uid}.png") for uid in ids]
            if csv_file:
                csv_file.write("".join(f"{u},{c},{p}\n" for u, c, p in batch))
            if jsonl_file:
                jsonl_file.write(
                    "".join(
                        json.dumps({"user_id": u, "user_created_at": c, "image_path": p}) + "\n"
                        for u, c, p in batch
                    )
                )
            if parquet:
                parquet.write_table(
                    pa.table({name: [row[i] for row in batch] for i, name in enumerate(columns)})
                )
    return paths


def check_all(path: str, queue: Any) -> None:
    """In a child: open and read every row's text checks; wall time, rows and peak RSS."""
    from backfill.manifest import ManifestRules, open_manifest

    began = time.perf_counter()
    manifest = open_manifest(Path(path), ManifestRules(now=datetime(2030, 1, 1, tzinfo=UTC)))
    seen = sum(len(b.candidates) + len(b.rejects) for b in manifest.batches())
    queue.put({"wall_s": time.perf_counter() - began, "rows": seen, "peak_rss_mb": _peak_mb()})


def imports_only(path: str, queue: Any) -> None:
    """In a child: the floor, everything reading imports (pyarrow too) and nothing read."""
    import backfill.manifest
    import backfill.manifest.parquet  # noqa: F401

    queue.put({"wall_s": 0.0, "rows": 0, "peak_rss_mb": _peak_mb()})


def _peak_mb() -> float:
    # VmHWM, not ru_maxrss: that survives exec, so a spawned child would report the parent's (which wrote the
    # files with pyarrow) peak as its own.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; no /proc elsewhere


def in_child(work: Callable[[str, Any], None], path: str) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=work, args=(path, queue))
    child.start()
    figures: dict[str, Any] = queue.get()
    child.join()
    return figures


# The memory goal of docs/performance.md: ten times the rows may cost at most 1.5 times the peak RSS.
RSS_GROWTH_TARGET = 1.5


def measure(sizes: list[int], formats: tuple[str, ...], data_dir: Path | None) -> dict[str, Any]:
    """Each format at each size, in a fresh process; time against CSV's, peak RSS against the smallest size's."""
    floor = in_child(imports_only, "")
    figures: dict[str, Any] = {"imports_peak_rss_mb": round(floor["peak_rss_mb"], 1), "sizes": {}}
    for rows in sizes:
        # One size's files at a time: 10M rows in three formats would want a few GB of scratch.
        with tempfile.TemporaryDirectory(prefix="backfill-bench-manifests-", dir=data_dir) as scratch:
            paths = write(Path(scratch), rows, formats)
            at_size: dict[str, Any] = {}
            for name, path in paths.items():
                got = in_child(check_all, str(path))
                assert got["rows"] == rows, (name, got)
                at_size[name] = {
                    "bytes": path.stat().st_size,
                    "wall_s": round(got["wall_s"], 3),
                    "rows_per_s": round(rows / got["wall_s"]),
                    "peak_rss_mb": round(got["peak_rss_mb"], 1),
                    "rss_over_imports": round(got["peak_rss_mb"] / figures["imports_peak_rss_mb"], 2),
                }
        for f in at_size.values():
            if "csv" in at_size:
                f["wall_over_csv"] = round(f["wall_s"] / at_size["csv"]["wall_s"], 2)
        figures["sizes"][str(rows)] = at_size
    if len(sizes) > 1:
        small, big = str(min(sizes)), str(max(sizes))
        figures["growth"] = {
            name: {
                "rows": [int(small), int(big)],
                "peak_rss_ratio": round(
                    figures["sizes"][big][name]["peak_rss_mb"] / figures["sizes"][small][name]["peak_rss_mb"],
                    2,
                ),
            }
            for name in formats
        }
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.manifests", description=__doc__)
    parser.add_argument(
        "--rows",
        default="1000000",
        help="rows, or sizes separated by commas (e.g. 1000000,10000000): the "
        "peak RSS of the largest is then compared with the smallest's",
    )
    parser.add_argument("--formats", default=",".join(FORMATS), help="which of csv,jsonl,parquet to measure")
    parser.add_argument("--data-dir", type=Path, default=None, help="where the manifests are written")
    parser.add_argument("--results-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.rows.split(",")]
    formats = tuple(name for name in FORMATS if name in args.formats.split(","))
    if not formats or not sizes or min(sizes) < 1:
        parser.error("--formats names at least one of csv,jsonl,parquet, and --rows sizes above 0")
    figures = measure(sizes, formats, args.data_dir)
    figures["at"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    print(f"importing alone peaks at {figures['imports_peak_rss_mb']} MB")
    for rows, at_size in figures["sizes"].items():
        for name, f in at_size.items():
            against = f" ({f['wall_over_csv']}x CSV's time)" if "wall_over_csv" in f else ""
            print(
                f"{int(rows):>11,} rows {name:8} {f['rows_per_s']:>9,} rows/s{against}, peak RSS "
                f"{f['peak_rss_mb']} MB ({f['rss_over_imports']}x the imports')"
            )
    for name, g in figures.get("growth", {}).items():
        verdict = "met" if g["peak_rss_ratio"] <= RSS_GROWTH_TARGET else "MISSED"
        print(
            f"{name}: {g['rows'][1]:,} rows peak at {g['peak_rss_ratio']}x the RSS of {g['rows'][0]:,} "
            f"(target <= {RSS_GROWTH_TARGET}: {verdict})"
        )
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.results_dir / f"manifests-{stamp}.json"
    path.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

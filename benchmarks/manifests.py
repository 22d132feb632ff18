"""`python -m benchmarks.manifests`: the text checks of one manifest as CSV, JSON lines and Parquet, each in its own
process: rows/s and peak RSS, as ratios to CSV's and to the process that only imports what reading needs."""

from __future__ import annotations

import argparse
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


def write(folder: Path, rows: int) -> dict[str, Path]:
    """The same rows (one in 1,000 an exact copy of the row before: the duplicate scan has candidates) thrice."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {name: folder / f"manifest.{name}" for name in FORMATS}
    columns = ["user_id", "user_created_at", "image_path"]
    schema = pa.schema([(name, pa.string()) for name in columns])
    with (
        paths["csv"].open("w") as csv_file,
        paths["jsonl"].open("w") as jsonl_file,
        pq.ParquetWriter(paths["parquet"], schema) as parquet,
    ):
        csv_file.write(",".join(columns) + "\n")
        for start in range(0, rows, BATCH):
            ids = [user_id(i - 1 if i % 1000 == 999 else i) for i in range(start, min(rows, start + BATCH))]
            batch = [(uid, CREATED_AT, f"photos/{uid}.png") for uid in ids]
            csv_file.write("".join(f"{u},{c},{p}\n" for u, c, p in batch))
            jsonl_file.write(
                "".join(
                    json.dumps({"user_id": u, "user_created_at": c, "image_path": p}) + "\n"
                    for u, c, p in batch
                )
            )
            parquet.write_table(pa.table({name: [row[i] for row in batch] for i, name in enumerate(columns)}))
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


def measure(rows: int, data_dir: Path | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="backfill-bench-manifests-", dir=data_dir) as scratch:
        paths = write(Path(scratch), rows)
        floor = in_child(imports_only, "")
        figures: dict[str, Any] = {"rows": rows, "imports_peak_rss_mb": round(floor["peak_rss_mb"], 1)}
        for name, path in paths.items():
            got = in_child(check_all, str(path))
            assert got["rows"] == rows, (name, got)
            figures[name] = {
                "bytes": path.stat().st_size,
                "wall_s": round(got["wall_s"], 3),
                "rows_per_s": round(rows / got["wall_s"]),
                "peak_rss_mb": round(got["peak_rss_mb"], 1),
            }
    for name in FORMATS:
        figures[name]["wall_over_csv"] = round(figures[name]["wall_s"] / figures["csv"]["wall_s"], 2)
        figures[name]["rss_over_imports"] = round(
            figures[name]["peak_rss_mb"] / figures["imports_peak_rss_mb"], 2
        )
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.manifests", description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--data-dir", type=Path, default=None, help="where the three files are written")
    parser.add_argument("--results-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    figures = measure(args.rows, args.data_dir)
    figures["at"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    print(f"{args.rows:,} rows; importing alone peaks at {figures['imports_peak_rss_mb']} MB")
    for name in FORMATS:
        f = figures[name]
        print(
            f"{name:8} {f['rows_per_s']:>9,} rows/s ({f['wall_over_csv']}x CSV's time), peak RSS "
            f"{f['peak_rss_mb']} MB ({f['rss_over_imports']}x the imports')"
        )
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.results_dir / f"manifests-{stamp}.json"
    path.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

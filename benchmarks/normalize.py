"""`python -m benchmarks.normalize`: --normalize's throughput on phone photos, against Pillow alone.

The photos are what a phone archive holds: ~2 MB JPEGs, 4032x3024 (smaller with --smoke), with EXIF (camera, GPS)
and, for half of them, orientation 6 (stored on their side). Three measurements, each in a fresh child process,
each the best of --repeats:
- ours, one thread: `normalize` on each photo, as a photo's read hands it to a worker thread;
- ours, as a run reads: `NormalizingImageSource` over the local source, `--concurrency` reads at once (the
  decode and encode let go of the GIL, so a second core helps);
- the baseline, Pillow alone: what a script would write, open, `ImageOps.exif_transpose`, save as a JPEG at the
  same quality, one thread. It decodes and encodes every photo, where ours leaves pixels of an upright photo
  alone and only strips its metadata, so each half is also measured on its own: the upright photos (ours strips
  their metadata, Pillow decodes and encodes them) and those on their side (both decode, rotate and encode).

Figures: rows/s and CPU ms per photo of each, and ours as ratios to the baseline. Written to
`benchmarks/results/normalize-<UTC timestamp>.json` (`--results-dir`). No target is set: the figure to watch is
the ratio, which says what the tool's own work adds to Pillow's.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .workers import in_child

ROOT = Path(__file__).resolve().parent.parent
QUALITY = 90  # the normaliser's: the baseline encodes at the same quality
KINDS = ("pillow", "ours", "ours_run", "pillow_upright", "ours_upright", "pillow_rotated", "ours_rotated")


def make_photos(folder: Path, count: int, size: tuple[int, int], target_bytes: int) -> list[Path]:
    """`count` phone-like JPEGs near `target_bytes`: a gradient under grain (a photo's texture: neither flat,
    which compresses to nothing, nor pure noise), EXIF with a camera and a GPS position; every other one on its
    side (orientation 6)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    base = Image.linear_gradient("L").resize(size)
    paths = []
    sigma = 24.0
    for i in range(count):
        path = folder / f"phone_{i:04d}.jpg"
        paths.append(path)
        if path.exists():
            continue
        grain = [Image.effect_noise(size, sigma + i % 3) for _ in range(3)]
        bands = [Image.blend(base, g, 0.5) for g in grain]
        image = Image.merge("RGB", bands)
        exif = Image.Exif()
        exif[0x010F], exif[0x0110] = "Acme", "Phone 12"
        exif[0x0112] = 6 if i % 2 else 1
        gps = exif.get_ifd(0x8825)
        gps[1], gps[2], gps[3], gps[4] = "N", (51.0, 30.0, 1.5), "W", (0.0, 7.0, 39.0)
        data = _jpeg_near(image, exif, target_bytes)
        path.write_bytes(data)
    return paths


def _jpeg_near(image: Any, exif: Any, target: int) -> bytes:
    """The photo at the highest quality (of a few) whose file is at most `target` bytes, else the lowest."""
    data = b""
    for quality in (95, 92, 88, 84, 80, 75, 70):
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=quality, exif=exif)
        data = out.getvalue()
        if len(data) <= target:
            break
    return data


def _timed(fn: Any) -> dict[str, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    rows = fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"rows": rows, "wall_s": wall, "rows_per_s": rows / wall, "cpu_ms_per_row": 1000 * cpu / rows}


def ours_one_thread(paths: list[str]) -> dict[str, float]:
    from backfill.images.normalize import normalize

    photos = [Path(p).read_bytes() for p in paths]
    normalize(photos[0], "warm-up", 5 * 1024 * 1024)

    def go() -> int:
        for data in photos:
            normalize(data, "p", 5 * 1024 * 1024)
        return len(photos)

    return _timed(go)


def ours_as_a_run_reads(paths: list[str], concurrency: int) -> dict[str, float]:
    from backfill.images.local import LocalImageSource
    from backfill.images.normalize import NormalizingImageSource

    async def main() -> int:
        local = LocalImageSource(base=Path("/"), root=None, max_bytes=64 * 1024 * 1024, convert=True)
        source = NormalizingImageSource(local, max_bytes=5 * 1024 * 1024)
        prints = await source.check_many(paths)
        queue = list(prints)

        async def worker() -> None:
            while queue:
                fingerprint = queue.pop()
                assert not isinstance(fingerprint, Exception)
                photo = await source.read(fingerprint)  # type: ignore[arg-type]
                assert photo.data

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(prints)

    asyncio.run(_warm(paths[0]))
    return _timed(lambda: asyncio.run(main()))


async def _warm(path: str) -> None:
    from backfill.images.normalize import normalize

    normalize(Path(path).read_bytes(), "warm-up", 5 * 1024 * 1024)


def pillow_alone(paths: list[str]) -> dict[str, float]:
    from PIL import Image, ImageOps

    photos = [Path(p).read_bytes() for p in paths]
    with Image.open(io.BytesIO(photos[0])) as warm:  # as ours is: the plugins and codecs loaded first
        warm.load()

    def go() -> int:
        for data in photos:
            with Image.open(io.BytesIO(data)) as opened:
                image = ImageOps.exif_transpose(opened).convert("RGB")
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=QUALITY, optimize=True)
        return len(photos)

    return _timed(go)


def _best(runs: list[dict[str, float]]) -> dict[str, Any]:
    best = max(runs, key=lambda r: r["rows_per_s"])
    return {**best, "rows_per_s_each": [round(r["rows_per_s"], 2) for r in runs]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.normalize", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="a few small photos: proves it runs")
    parser.add_argument("--photos", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    size, target = ((4032, 3024), 2 * 1024 * 1024) if not args.smoke else ((400, 300), 60_000)
    count, repeats = (4, 1) if args.smoke else (args.photos, args.repeats)
    data_dir = args.data_dir or Path(os.environ.get("TMPDIR", "/tmp")) / f"backfill-bench-{os.getuid()}"
    folder = data_dir / f"normalize-{size[0]}x{size[1]}-{target}"
    paths = [str(p) for p in make_photos(folder, count, size, target)]
    parts = {"": paths, "_upright": paths[0::2], "_rotated": paths[1::2]}

    runs: dict[str, list[dict[str, float]]] = {name: [] for name in KINDS}
    for _ in range(repeats):  # interleaved: a burst of someone else's work lands on one turn, not on one kind
        for part, chosen in parts.items():
            runs["pillow" + part].append(in_child(pillow_alone, chosen))
            runs["ours" + part].append(in_child(ours_one_thread, chosen))
        runs["ours_run"].append(in_child(ours_as_a_run_reads, paths, args.concurrency))
    best = {name: _best(found) for name, found in runs.items()}
    sizes = [os.path.getsize(p) for p in paths]
    results = {
        "meta": {
            "mode": "smoke" if args.smoke else "full",
            "photos": count,
            "size": f"{size[0]}x{size[1]}",
            "mean_bytes": round(sum(sizes) / len(sizes)),
            "repeats": repeats,
            "concurrency": args.concurrency,
            "cpus": os.cpu_count(),
            "at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
        **best,
        "ratios": {
            "ours_over_pillow": best["ours"]["rows_per_s"] / best["pillow"]["rows_per_s"],
            "ours_run_over_pillow": best["ours_run"]["rows_per_s"] / best["pillow"]["rows_per_s"],
            "ours_upright_over_pillow_upright": best["ours_upright"]["rows_per_s"]
            / best["pillow_upright"]["rows_per_s"],
            "ours_rotated_over_pillow_rotated": best["ours_rotated"]["rows_per_s"]
            / best["pillow_rotated"]["rows_per_s"],
        },
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.results_dir / f"normalize-{stamp}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    for name in KINDS:
        r = best[name]
        print(f"{name:16} {r['rows_per_s']:8.2f} rows/s  {r['cpu_ms_per_row']:8.1f} CPU ms/row")
    for name, value in results["ratios"].items():
        print(f"{name:34} {value:.2f}")
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

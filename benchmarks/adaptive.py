"""`python -m benchmarks.adaptive`: --rate 20 against a server that allows 5/s; time, 429s, the rate's path."""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from backfill import compose
from backfill.config import load_settings
from backfill.sandbox import Faults, start_sandbox

from .data import CREATED_AT, tiny_png, user_id, write_manifest

PARTNER_ID, API_KEY = "000", "local-sandbox-key"
TARGET_RATIO = 2.5  # done within this many times the ideal (rows / the server's limit)


async def measure(*, rows: int, server_limit: float, rate: float, concurrency: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="backfill-adaptive-") as scratch:
        folder = Path(scratch)
        photo = folder / "photo.png"
        photo.write_bytes(tiny_png())
        manifest = write_manifest(
            folder / "manifest.csv", ((user_id(i), CREATED_AT, str(photo)) for i in range(rows))
        )
        async with await start_sandbox(PARTNER_ID, API_KEY, faults=Faults(rate_limit=server_limit)) as server:
            flags = {
                "base_url": server.base_url,
                "checkpoint": folder / "ledger.sqlite",
                "out": folder / "out",
                "rate": rate,
                "concurrency": concurrency,
                "progress": False,
                "max_ids_per_photo": 0,  # every row names the same tiny photo
            }
            settings = load_settings(None, {"SMILE_PARTNER_ID": PARTNER_ID, "SMILE_API_KEY": API_KEY}, flags)
            began = time.perf_counter()
            summary = await compose.run(settings, manifest)
            ours = time.perf_counter() - began
            answered_429 = server.state.answers["429"]
    # The server's bucket starts full (one second's worth), so the ideal is rows / limit at most.
    ideal = rows / server_limit
    return {
        "rows": rows,
        "server_limit_per_s": server_limit,
        "rate": rate,
        "concurrency": concurrency,
        "ideal_s": round(ideal, 3),
        "ours_s": round(ours, 3),
        "ratio": round(ours / ideal, 3),
        "target_ratio": TARGET_RATIO,
        "answers_429": answered_429,
        "attempts": summary.attempts,
        "counts": summary.counts,
        "retry_exhausted": summary.counts.get("retry_exhausted", 0),
        "effective_rate_min": summary.effective_rate_min,
        "effective_rate_final": summary.effective_rate_final,
        "ok": ours / ideal <= TARGET_RATIO
        and answered_429 < rows
        and not summary.counts.get("retry_exhausted"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.adaptive", description=__doc__)
    parser.add_argument("--rows", type=int, default=60)
    parser.add_argument("--server-limit", type=float, default=5.0)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--results-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    figures = asyncio.run(
        measure(rows=args.rows, server_limit=args.server_limit, rate=args.rate, concurrency=args.concurrency)
    )
    figures["at"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    print(
        f"adaptive rate: {figures['rows']} rows, --rate {figures['rate']:g} vs a server allowing "
        f"{figures['server_limit_per_s']:g}/s: ideal {figures['ideal_s']:.1f}s, ours {figures['ours_s']:.1f}s, "
        f"ratio {figures['ratio']:.2f} (target <= {TARGET_RATIO}); {figures['answers_429']} answers 429; "
        f"rate min {figures['effective_rate_min']:g}/s, final {figures['effective_rate_final']:g}/s; "
        f"retry_exhausted {figures['retry_exhausted']}; {'OK' if figures['ok'] else 'MISSED'}"
    )
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.results_dir / f"adaptive-{stamp}.json"
    path.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    print(f"wrote {path}")
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

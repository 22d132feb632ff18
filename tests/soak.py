"""The long soak: hundreds of kills over thousands of rows, with faults; prints its figures.

python -m tests.soak --rows 3000 --kills 300 [--seed 7] [--foreign 0.1] [--json soak.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from .crash_rig import Chaos, CrashRig


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--kills", type=int, default=300)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--foreign",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="Make this fraction of the valid IDs foreign: held by another partner user on the sandbox.",
    )
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    args = parser.parse_args()
    if not 0.0 <= args.foreign < 1.0:
        parser.error("--foreign is a fraction from 0 to below 1")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="backfill-soak-") as folder:
        # A rate slow enough that the job is still unfinished when the last planned kill comes, so every kill
        # lands on real work; kill moments spread from before the first send to well into a run.
        chaos = Chaos(max_kill_after_s=3.0, rate=max(5.0, args.rows / args.kills))
        foreign = round(args.rows * args.foreign)
        rig = CrashRig(Path(folder), rows=args.rows, chaos=chaos, seed=args.seed, foreign=foreign)
        summary = rig.until_done(kills=args.kills, max_runs=args.kills + 100)
        figures: dict[str, object] = dict(rig.verify(summary))
    figures["boundary_kills"] = dict(rig.audit.boundary_kills)
    figures["seed"] = args.seed
    figures["minutes"] = round((time.monotonic() - started) / 60, 1)
    width = max(map(len, figures))
    for name, value in figures.items():
        print(f"{name:>{width}}: {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()

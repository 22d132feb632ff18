"""The long soak: hundreds of kills over thousands of rows, with faults; prints its figures.

python -m tests.soak --rows 3000 --kills 300 [--seed 7] [--json soak.json]
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
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="backfill-soak-") as folder:
        # A rate slow enough that the job is still unfinished when the last planned kill comes, so every kill
        # lands on real work; kill moments spread from before the first send to well into a run.
        chaos = Chaos(max_kill_after_s=3.0, rate=max(5.0, args.rows / args.kills))
        rig = CrashRig(Path(folder), rows=args.rows, chaos=chaos, seed=args.seed)
        summary = rig.until_done(kills=args.kills, max_runs=args.kills + 100)
        figures: dict[str, object] = dict(rig.verify(summary))
    figures["boundary_kills"] = dict(rig.audit.boundary_kills)
    figures["seed"] = args.seed
    figures["minutes"] = round((time.monotonic() - started) / 60, 1)
    for name, value in figures.items():
        print(f"{name:>18}: {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()

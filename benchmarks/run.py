"""Run every benchmark: `python -m benchmarks [--quick|--smoke]`; prints a table, writes results JSON."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # `python benchmarks/run.py`: make the repository root importable, as `python -m benchmarks` does.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.suite import PLANS, WINDOW_TOLERANCE, Suite, log

ROOT = Path(__file__).resolve().parent.parent
# Resuming a completed 1M-row job: at most this long on the 2-core development VM, or at most this share of
# validating the same manifest in the same run (issue 19: on a VM whose cores are busy, the seconds say less
# than the ratio); the csv + stat floor of the same manifest is reported beside them.
RESUME_TARGET_S = 15.0
RESUME_OVER_VALIDATE = 0.5
# "Memory flat": the resume's peak RSS may grow this much from the smallest manifest to the largest.
RESUME_RSS_FLAT = 1.2
# Client overhead (issue 19): rows/s at least this share of the bare aiohttp loop's, at every photo size, and
# for 20 KB photos, where the per-request Python shows most, CPU per request at most this multiple of its.
OVERHEAD_THROUGHPUT = 0.85
OVERHEAD_CPU = 1.4
NAMES = (
    "rate_fidelity",
    "client_overhead",
    "vs_adhoc",
    "scale",
    "retry_storm",
    "ledger",
    "erasure",
    "profile",
)


def _get(results: dict[str, Any], path: str) -> Any:
    value: Any = results
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of issue #4 with the measured value and whether it is met (None: not measured)."""
    out: list[dict[str, Any]] = []

    def check(name: str, value: Any, target: str, test: Callable[[Any], bool]) -> None:
        met = None if value is None else bool(test(value))
        out.append({"name": name, "value": value, "target": target, "met": met})

    r = results.get("rate_fidelity", {})
    if r:
        check(
            "rate: achieved / configured", r.get("achieved_over_configured"), ">= 0.97", lambda v: v >= 0.97
        )
        check("rate: 429s from a 210/s limit", r.get("http_429"), "== 0", lambda v: v == 0)
        check(
            "rate control (20 KB only): worst 1-s window / configured",
            _get(r, "control_20KB.worst_1s_window_over_configured"),
            f"<= {WINDOW_TOLERANCE}",
            lambda v: v <= WINDOW_TOLERANCE,
        )
        check(
            "rate: worst 1-s window / configured",
            r.get("worst_1s_window_over_configured"),
            f"<= {WINDOW_TOLERANCE}",
            lambda v: v <= WINDOW_TOLERANCE,
        )
    for label, entry in (results.get("client_overhead") or {}).items():
        check(
            f"overhead {label}: throughput / bare aiohttp (spliced)",
            entry.get("throughput_ratio"),
            f">= {OVERHEAD_THROUGHPUT}",
            lambda v: v >= OVERHEAD_THROUGHPUT,
        )
        if label == "20KB":
            check(
                f"overhead {label}: CPU per request / bare aiohttp (spliced)",
                entry.get("cpu_per_request_ratio"),
                f"<= {OVERHEAD_CPU}",
                lambda v: v <= OVERHEAD_CPU,
            )
    a = results.get("vs_adhoc", {})
    if a:
        check("vs ad-hoc script: speed-up", a.get("speedup"), "> 1 (no number set)", lambda v: v > 1)
    s = results.get("scale", {})
    for key, entry in s.items():
        if not key.isdigit():
            continue
        n = int(key)
        check(
            f"scale {n:,}: validation rows/s",
            entry.get("validate_rows_per_s"),
            ">= 20,000",
            lambda v: v >= 20000,
        )
        if n == 1_000_000:
            check(
                "scale 1M: peak RSS of a full run (MB)",
                entry.get("run_maxrss_mb"),
                "<= 400",
                lambda v: v <= 400,
            )
            share = entry.get("resume_over_validate")
            check(
                "scale 1M: resume of a completed job (s)",
                entry.get("resume_s") if entry.get("resume_of_complete_job") else None,
                f"<= {RESUME_TARGET_S:g}, or <= {RESUME_OVER_VALIDATE:g} x validation: {share or 0:.3f} here",
                lambda v, share=share: (
                    v <= RESUME_TARGET_S or (share is not None and share <= RESUME_OVER_VALIDATE)
                ),
            )
    if "rss_large_over_small" in s:
        check("scale: peak RSS 1M / 100k", s.get("rss_large_over_small"), "<= 1.5", lambda v: v <= 1.5)
    if "resume_rss_large_over_small" in s:
        check(
            "scale: resume peak RSS, largest / smallest (flat)",
            s.get("resume_rss_large_over_small"),
            f"<= {RESUME_RSS_FLAT:g}",
            lambda v: v <= RESUME_RSS_FLAT,
        )
    st = results.get("retry_storm", {})
    for run in ("clean", "storm"):
        if run in st:
            check(
                f"retry storm ({run}): worst 1-s window / configured",
                st[run].get("worst_1s_window_over_configured"),
                f"<= {WINDOW_TOLERANCE}",
                lambda v: v <= WINDOW_TOLERANCE,
            )
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table_rows(results: dict[str, Any]) -> list[tuple[str, str, Any, Any, Any]]:
    """(benchmark, metric, ours, baseline, ratio) for the printed table."""
    rows: list[tuple[str, str, Any, Any, Any]] = []
    r = results.get("rate_fidelity")
    if r:
        rate = r["configured_rate"]
        rows += [
            (
                "1 rate",
                f"req/s at server (rate {rate:g}, {r['rows']} rows)",
                r["achieved_rate"],
                rate,
                r["achieved_over_configured"],
            ),
            (
                "1 rate",
                "worst 1-s window (requests)",
                r["worst_1s_window"],
                rate,
                r["worst_1s_window_over_configured"],
            ),
            ("1 rate", "429s from a 210/s limit", r["http_429"], 0, None),
            ("1 rate", "worst 5-s window / (5 x rate)", None, None, r["worst_5s_window_over_configured"]),
            (
                "1 rate",
                "control, 20 KB only: worst 1-s window",
                r["control_20KB"]["worst_1s_window"],
                rate,
                r["control_20KB"]["worst_1s_window_over_configured"],
            ),
            (
                "1 rate",
                "end-to-end rows/s (incl. validation)",
                r["end_to_end_rows_per_s"],
                rate,
                r["end_to_end_rows_per_s"] / rate,
            ),
        ]
    for label, e in (results.get("client_overhead") or {}).items():
        o, b, j, sb = e["ours"], e["baseline"], e["baseline_json"], e["baseline_stdlib"]
        rows += [
            (
                "2 overhead",
                f"{label}: rows/s end-to-end ({e['rows']} rows)",
                o["rows_per_s"],
                b["rows_per_s"],
                e["throughput_ratio"],
            ),
            (
                "2 overhead",
                f"{label}: req/s while sending",
                o["send_phase_rate"],
                b["send_phase_rate"],
                e["send_phase_ratio"],
            ),
            (
                "2 overhead",
                f"{label}: CPU us/request",
                o["cpu_us_per_request"],
                b["cpu_us_per_request"],
                e["cpu_per_request_ratio"],
            ),
            (
                "2 overhead",
                f"{label}: event loop's thread CPU us/request",
                o["loop_cpu_us_per_request"],
                b["loop_cpu_us_per_request"],
                e["loop_cpu_per_request_ratio"],
            ),
            (
                "2 overhead",
                f"{label}: event loop's thread busy (fraction of the wall time)",
                o["loop_busy"],
                b["loop_busy"],
                None,
            ),
            (
                "2 overhead",
                f"{label}: server busy (fraction of a core)",
                o["server_busy"],
                b["server_busy"],
                None,
            ),
            (
                "2 overhead",
                f"{label}: rows/s (baseline: bare loop, stdlib base64)",
                o["rows_per_s"],
                sb["rows_per_s"],
                e["throughput_ratio_stdlib"],
            ),
            (
                "2 overhead",
                f"{label}: CPU us/request (baseline: bare loop, stdlib base64)",
                o["cpu_us_per_request"],
                sb["cpu_us_per_request"],
                e["cpu_per_request_ratio_stdlib"],
            ),
            (
                "2 overhead",
                f"{label}: rows/s (baseline: bare loop, json.dumps body)",
                o["rows_per_s"],
                j["rows_per_s"],
                e["throughput_ratio_json"],
            ),
            (
                "2 overhead",
                f"{label}: CPU us/request (baseline: bare loop, json.dumps body)",
                o["cpu_us_per_request"],
                j["cpu_us_per_request"],
                e["cpu_per_request_ratio_json"],
            ),
        ]
    a = results.get("vs_adhoc")
    if a:
        rows.append(
            (
                "3 vs script",
                f"seconds for {a['rows']} rows (script: {a['script_client']})",
                a["ours_s"],
                a["script_s"],
                a["speedup"],
            )
        )
    s = results.get("scale") or {}
    for key, e in s.items():
        if not key.isdigit():
            continue
        n = f"{int(key):,}"
        rows += [
            (
                "4 scale",
                f"{n}: validation rows/s",
                e["validate_rows_per_s"],
                e["floor_rows_per_s"],
                e["validate_over_floor"],
            ),
            (
                "4 scale",
                f"{n}: first touch of the files, rows/s (cold-ish)",
                e["first_touch_rows_per_s"],
                None,
                None,
            ),
            ("4 scale", f"{n}: full run s (fast server)", e["run_s"], None, None),
            ("4 scale", f"{n}: full run rows/s", e["run_rows_per_s"], None, None),
            (
                "4 scale",
                f"{n}: peak RSS MB (baseline: CLI --version)",
                e["run_maxrss_mb"],
                s.get("cli_startup_rss_mb"),
                (e["run_maxrss_mb"] or 0) / (s.get("cli_startup_rss_mb") or 1),
            ),
            (
                "4 scale",
                f"{n}: resume of completed job s (baseline: validate)",
                e["resume_s"],
                e["validate_s"],
                e["resume_over_validate"],
            ),
            (
                "4 scale",
                f"{n}: resume of completed job s (baseline: csv + stat)",
                e["resume_s"],
                e.get("stat_floor_s"),
                e.get("resume_over_stat_floor"),
            ),
            (
                "4 scale",
                f"{n}: resume CPU s (baseline: resume wall s)",
                e.get("resume_cpu_s"),
                e["resume_s"],
                ratio(e.get("resume_cpu_s"), e["resume_s"]),
            ),
            (
                "4 scale",
                f"{n}: resume peak RSS MB (baseline: CLI --version)",
                e.get("resume_maxrss_mb"),
                s.get("cli_startup_rss_mb"),
                e.get("resume_rss_over_startup"),
            ),
            (
                "4 scale",
                f"{n}: machine short of CPU during resume (share of its wall time)",
                e.get("resume_cpu_stall_share"),
                None,
                None,
            ),
        ]
    if "rss_large_over_small" in s:
        rows.append(("4 scale", "peak RSS largest / smallest", None, None, s["rss_large_over_small"]))
    if "resume_rss_large_over_small" in s:
        rows.append(
            ("4 scale", "resume peak RSS largest / smallest", None, None, s["resume_rss_large_over_small"])
        )
    st = results.get("retry_storm")
    if st:
        rows += [
            (
                "5 storm",
                f"completion s ({st['rows']} rows, baseline: clean run)",
                st["storm"]["wall_s"],
                st["clean"]["wall_s"],
                st["completion_ratio"],
            ),
            (
                "5 storm",
                "server silent s (gaps >= 0.25 s; baseline: clean)",
                st["storm"]["silent_s"],
                st["clean"]["silent_s"],
                None,
            ),
            (
                "5 storm",
                "tail after 99% of requests s (baseline: clean)",
                st["storm"]["tail_after_99pct_s"],
                st["clean"]["tail_after_99pct_s"],
                None,
            ),
            (
                "5 storm",
                "attempts (baseline: clean run)",
                st["storm"]["attempts"],
                st["clean"]["attempts"],
                st["attempts_ratio"],
            ),
            (
                "5 storm",
                "worst 1-s window, storm (baseline: rate)",
                st["storm"]["worst_1s_window"],
                st["configured_rate"],
                st["storm"]["worst_1s_window_over_configured"],
            ),
            (
                "5 storm",
                "worst 1-s window, clean (baseline: rate)",
                st["clean"]["worst_1s_window"],
                st["configured_rate"],
                st["clean"]["worst_1s_window_over_configured"],
            ),
        ]
    led = results.get("ledger")
    if led:
        o, f = led["ours"], led["floor"]
        rows += [
            (
                "6 ledger",
                f"begin+settle rows/s ({led['users']} users; baseline: the bare writes, as durable)",
                o["rows_per_s"],
                f["rows_per_s"],
                led["over_floor"],
            ),
            (
                "6 ledger",
                "CPU us/row (baseline: the bare writes, as durable)",
                o["cpu_us_per_row"],
                f["cpu_us_per_row"],
                led["cpu_per_row_over_floor"],
            ),
            (
                "6 ledger",
                "rows/s (baseline: one fsync per write)",
                o["rows_per_s"],
                led["one_fsync_each_rows_per_s"],
                led["over_one_fsync_each"],
            ),
            (
                "6 ledger",
                "rows/s (baseline: no fsync at all)",
                o["rows_per_s"],
                led["no_fsync_rows_per_s"],
                led["over_no_fsync"],
            ),
        ]
    er = results.get("erasure")
    if er:
        o, f = er["ours"], er["floor"]
        rows += [
            (
                "7 erasure",
                f"forget s ({er['forgotten']} of {er['users']} rows; baseline: bare delete + VACUUM)",
                o["forget_s"],
                f["delete_s"] + f["vacuum_s"],
                er["forget_over_delete_and_vacuum"],
            ),
            (
                "7 erasure",
                "forget s (baseline: a bare delete, which leaves the bytes)",
                o["forget_s"],
                f["delete_s"],
                er["forget_over_bare_delete"],
            ),
            (
                "7 erasure",
                "resume: tombstone lookup s (baseline: the done-rows query)",
                o["tombstone_lookup_s"],
                o["done_query_s"],
                er["tombstone_lookup_over_done_query"],
            ),
        ]
    return rows


def ratio(value: Any, baseline: Any) -> float | None:
    if not isinstance(value, int | float) or not isinstance(baseline, int | float) or not baseline:
        return None
    return value / baseline


def render(results: dict[str, Any], checks: list[dict[str, Any]]) -> str:
    header = ("benchmark", "metric", "ours", "baseline", "ratio")
    body = [(b, m, _fmt(o), _fmt(base), _fmt(r)) for b, m, o, base, r in table_rows(results)]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), line]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in body]
    out += ["", "targets:"]
    for t in checks:
        mark = {True: "MET ", False: "MISS", None: "n/a "}[t["met"]]
        out.append(f"  [{mark}] {t['name']}: {_fmt(t['value'])} (target {t['target']})")
    return "\n".join(out)


def _git_rev() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer rows; scale at 10k only")
    size.add_argument("--smoke", action="store_true", help="a few dozen rows each: checks the benchmarks run")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(NAMES)}")
    parser.add_argument(
        "--no-profile", action="store_true", help="skip the profiles (py-spy or pyinstrument)"
    )
    parser.add_argument(
        "--scale-rows",
        default="",
        help="comma-separated manifest sizes for scale, e.g. 1000000 (default: the mode's)",
    )
    parser.add_argument(
        "--results-dir", type=Path, default=ROOT / "benchmarks" / "results", help="where the JSON goes"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / f"backfill-bench-{os.getuid()}",
        help="generated photos and tiny-file trees, kept between runs (the 1M tree takes a minute to make)",
    )
    args = parser.parse_args(argv)
    plan = PLANS["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.scale_rows:
        try:
            sizes = tuple(sorted({int(v.replace("_", "")) for v in args.scale_rows.split(",") if v.strip()}))
        except ValueError:
            parser.error(f"--scale-rows: {args.scale_rows!r} is not a list of row counts")
        if not sizes or min(sizes) < 1:
            parser.error("--scale-rows: give at least one positive row count")
        plan = replace(plan, scale_rows=sizes)
    chosen = [n.strip() for n in args.only.split(",") if n.strip()] or list(NAMES)
    unknown = set(chosen) - set(NAMES)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    if args.no_profile or not plan.profile:
        chosen = [n for n in chosen if n != "profile"]

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    args.data_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="work-", dir=args.data_dir))
    # The resume is profiled with the 20 KB send, when the profile benchmark is chosen (and can run).
    suite = Suite(
        plan,
        args.data_dir,
        work,
        results_dir=args.results_dir,
        stamp=stamp,
        profile_resume="profile" in chosen,
    )
    started = time.perf_counter()
    results: dict[str, Any] = {}
    failed: dict[str, str] = {}
    try:
        for name in chosen:
            t0 = time.perf_counter()
            try:
                if name == "profile":
                    results[name] = suite.profile(args.results_dir, stamp)
                else:
                    results[name] = getattr(suite, name)()
            except Exception as exc:
                # One broken benchmark must not cost the figures of the others: record it, go on, exit 1.
                failed[name] = f"{type(exc).__name__}: {exc}"
                log(f"{name} FAILED: {failed[name]}")
                traceback.print_exc()
                continue
            log(f"{name} done in {time.perf_counter() - t0:.1f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    checks = targets(results)
    document = {
        "meta": {
            "timestamp": stamp,
            "mode": plan.mode,
            "duration_s": time.perf_counter() - started,
            "git_rev": _git_rev(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "benchmarks": chosen,
        },
        "plan": asdict(plan),
        "results": results,
        "failed": failed,
        "targets": checks,
    }
    text = json.dumps(document, indent=2, sort_keys=False, default=str)
    path = args.results_dir / f"{stamp}.json"
    path.write_text(text + "\n")
    (args.results_dir / "latest.json").write_text(text + "\n")
    print(render(results, checks))
    for name, error in failed.items():
        print(f"FAILED {name}: {error}")
    print(f"\nresults: {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

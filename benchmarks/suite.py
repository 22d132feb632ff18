"""The six benchmarks and the profile; each returns its figures, its baselines and their ratios."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from . import data, workers
from .profiling import pyspy_hotspots
from .servers import ROOT, ServerProcess
from .workers import ENV, in_child, settings_flags

# The limiter lets `rate * 0.05` requests out at once on top of the steady rate, so a 1-second window can
# legitimately hold rate * 1.05; anything above that is the tool exceeding what it was told.
WINDOW_TOLERANCE = 1.05
UNTHROTTLED = 1e9  # --rate must be a finite number; this one never binds
# Benchmark 2's bare loops, by the name their figures have in the results: how each builds its body.
BARE_LOOPS = {"baseline": "spliced", "baseline_stdlib": "spliced_stdlib", "baseline_json": "json"}


@dataclass(frozen=True)
class Plan:
    """How big each benchmark is in a mode."""

    mode: str
    rate_rows: int
    overhead_rows: dict[str, int]
    repeats: int
    adhoc_rows: int
    scale_rows: tuple[int, ...]
    ledger_users: int
    naive_users: int
    storm_rows: int
    profile: bool
    ledger_repeats: int = 3  # each a fresh child; the median is reported
    erasure_users: int = 200_000  # the ledger's rows; `backfill forget` of 1 in ERASE_EVERY of them
    pool: int = 20  # distinct photos per size; rows cycle through them
    run_timeout_s: float = 3600.0
    notes: list[str] = field(default_factory=list)


PLANS = {
    "full": Plan(
        mode="full",
        rate_rows=5000,
        overhead_rows={"20KB": 20000, "200KB": 4000, "2MB": 400},
        repeats=2,
        adhoc_rows=300,
        scale_rows=(100_000, 1_000_000),
        ledger_users=20000,
        naive_users=500,
        storm_rows=2000,
        profile=True,
    ),
    "quick": Plan(
        mode="quick",
        rate_rows=1500,
        overhead_rows={"20KB": 5000, "200KB": 1000, "2MB": 100},
        repeats=1,
        adhoc_rows=200,
        scale_rows=(100_000,),
        ledger_users=5000,
        erasure_users=50_000,
        naive_users=300,
        storm_rows=600,
        profile=True,
    ),
    "smoke": Plan(
        mode="smoke",
        rate_rows=40,
        overhead_rows={"20KB": 40, "200KB": 12, "2MB": 4},
        repeats=1,
        adhoc_rows=12,
        scale_rows=(60,),
        ledger_users=60,
        erasure_users=300,
        naive_users=20,
        storm_rows=30,
        profile=False,
        ledger_repeats=1,
        pool=3,
        run_timeout_s=120,
    ),
}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def max_in_window(times: Sequence[float], width: float = 1.0) -> int:
    """The most requests that arrived within any `width`-second window (sliding, not aligned to seconds)."""
    ordered = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(ordered):
        while t - ordered[lo] >= width:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def steady_rate(times: Sequence[float]) -> float:
    """Requests per second between the first and the last arrival."""
    if len(times) < 2:
        return 0.0
    ordered = sorted(times)
    span = ordered[-1] - ordered[0]
    return (len(ordered) - 1) / span if span > 0 else 0.0


def ratio(value: float | None, baseline: float | None) -> float | None:
    if value is None or not baseline:
        return None
    return value / baseline


class Suite:
    def __init__(
        self,
        plan: Plan,
        data_dir: Path,
        work_dir: Path,
        *,
        results_dir: Path | None = None,
        stamp: str = "",
        profile_resume: bool = False,
    ) -> None:
        self.plan = plan
        self.data_dir = data_dir
        self.work = work_dir
        self.results_dir = results_dir
        self.stamp = stamp
        # With the profile benchmark chosen, the largest resume is also run once under py-spy (untimed).
        self.profile_resume = profile_resume
        self._photos: dict[str, list[Path]] = {}

    def photos(self, label: str) -> list[Path]:
        if label not in self._photos:
            self._photos[label] = data.photo_pool(self.data_dir / "photos", label, self.plan.pool)
        return self._photos[label]

    def mixed_manifest(self, name: str, n: int) -> Path:
        """`n` rows whose photos follow the realistic size mix (45% 20 KB, 45% 200 KB, 10% 2 MB)."""
        rows = []
        for i in range(n):
            pool = self.photos(data.MIX[i % len(data.MIX)])
            rows.append((data.user_id(i), data.CREATED_AT, str(pool[(i // len(data.MIX)) % len(pool)])))
        return data.write_manifest(self.work / name / "manifest.csv", rows)

    def _ours(self, manifest: Path, base_url: str, name: str, **flags: Any) -> dict[str, Any]:
        folder = self.work / name
        # A fresh checkpoint and output each time: a repeat must send every row again, not skip them.
        shutil.rmtree(folder / "out", ignore_errors=True)
        (folder / "checkpoint.sqlite").unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        return in_child(workers.run_ours, str(manifest), settings_flags(base_url, folder, **flags))

    # --- 1 ---------------------------------------------------------------------------------------------

    def rate_fidelity(self) -> dict[str, Any]:
        """rate=200 against the sandbox at 50 ms latency, limiting at 210/s: does the tool keep the rate?"""
        rate, limit, rows = 200.0, 210.0, self.plan.rate_rows
        manifest = self.mixed_manifest("rate", rows)
        log(f"rate fidelity: {rows} rows at rate {rate:g}, sandbox 50 ms, limit {limit:g}/s")
        with ServerProcess("sandbox", {"faults": {"latency_ms": 50, "rate_limit": limit}}) as server:
            ours = self._ours(manifest, server.base_url, "rate", rate=rate, concurrency=32)
            stats = server.stats()
        times, statuses = stats["times"], Counter(stats["statuses"])
        achieved = steady_rate(times)
        worst = max_in_window(times)
        # Control: the same run with 20 KB photos only. The sandbox stamps a request when its handler starts,
        # and decoding a 2 MB body holds its loop for ~10 ms, so arrivals bunch at the server; without big
        # bodies the server-side window shows what the limiter itself lets through.
        small = data.write_manifest(
            self.work / "rate-small" / "manifest.csv", data.pool_rows(rows, self.photos("20KB"))
        )
        log(f"rate fidelity control: {rows} rows of 20 KB photos only")
        with ServerProcess("sandbox", {"faults": {"latency_ms": 50, "rate_limit": limit}}) as server:
            self._ours(small, server.base_url, "rate-small", rate=rate, concurrency=32)
            control = server.stats()
        return {
            "rows": rows,
            "configured_rate": rate,
            "concurrency": 32,
            "sandbox_latency_ms": 50,
            "sandbox_rate_limit": limit,
            "requests": len(times),
            "achieved_rate": achieved,
            "achieved_over_configured": ratio(achieved, rate),
            "http_429": statuses.get(429, 0),
            "statuses": {str(k): v for k, v in statuses.items()},
            "worst_1s_window": worst,
            "worst_1s_window_over_configured": ratio(worst, rate),
            "worst_100ms_window": max_in_window(times, 0.1),
            "worst_5s_window_over_configured": ratio(max_in_window(times, 5.0), 5 * rate),
            "control_20KB": {
                "achieved_over_configured": ratio(steady_rate(control["times"]), rate),
                "worst_1s_window": max_in_window(control["times"]),
                "worst_1s_window_over_configured": ratio(max_in_window(control["times"]), rate),
                "http_429": Counter(control["statuses"]).get(429, 0),
            },
            "end_to_end_s": ours["wall_s"],
            "end_to_end_rows_per_s": rows / ours["wall_s"],
            "client_cpu_s": ours["cpu_s"],
            "counts": ours["summary"]["counts"],
            "exit_code": ours["summary"]["exit_code"],
        }

    # --- 2 ---------------------------------------------------------------------------------------------

    def client_overhead(self) -> dict[str, Any]:
        """Unthrottled against the fast server, vs a bare aiohttp loop at the same concurrency.

        The baseline builds each body as the tool does (the base64 photo, by the tool's encoder, spliced into a
        small JSON head). Measured beside it: the same loop with the standard library's base64
        (`baseline_stdlib`, the fair baseline before the tool took pybase64's encoder) and the loop that
        json.dumps the whole photo, as first written (`baseline_json`).
        """
        concurrency, out = 64, {}
        for label, rows_n in self.plan.overhead_rows.items():
            rows = data.pool_rows(rows_n, self.photos(label), prefix=f"o{label}-")
            manifest = data.write_manifest(self.work / f"overhead-{label}" / "manifest.csv", rows)
            best: dict[str, dict[str, Any]] = {}
            for attempt in range(self.plan.repeats):
                log(f"client overhead {label}: {rows_n} rows, run {attempt + 1}/{self.plan.repeats}")
                for who in ("baseline", "baseline_stdlib", "baseline_json", "ours"):
                    with ServerProcess("fast", {"record": True}) as server:
                        cpu0 = server.stats()["cpu_s"]
                        if who == "ours":
                            result = self._ours(
                                manifest,
                                server.base_url,
                                f"overhead-{label}",
                                rate=UNTHROTTLED,
                                concurrency=concurrency,
                            )
                            ok = result["summary"]["counts"].get("enrolled", 0)
                        else:
                            body = BARE_LOOPS[who]
                            result = in_child(workers.bare_aiohttp, rows, server.base_url, concurrency, body)
                            ok = result["ok"]
                        stats = server.stats()
                    measured = {
                        "wall_s": result["wall_s"],
                        "cpu_s": result["cpu_s"],
                        "requests": len(stats["times"]),
                        "ok": ok,
                        "rows_per_s": rows_n / result["wall_s"],
                        "send_phase_rate": steady_rate(stats["times"]),
                        "cpu_us_per_request": result["cpu_s"] / max(1, len(stats["times"])) * 1e6,
                        # The event loop's thread alone. Its busy share near 1.0 means rows/s is its CPU a row
                        # and nothing else: a wait moved off a row's path can't raise it, only less work on it.
                        "loop_cpu_us_per_request": result["loop_cpu_s"] / max(1, len(stats["times"])) * 1e6,
                        "loop_busy": result["loop_cpu_s"] / result["wall_s"],
                        # ~1.0 means the server was saturated, so the client was not what limited the rate.
                        "server_busy": (stats["cpu_s"] - cpu0) / result["wall_s"],
                        "maxrss_mb": result["maxrss_mb"],
                    }
                    if who not in best or measured["rows_per_s"] > best[who]["rows_per_s"]:
                        best[who] = measured
            ours, base, old = best["ours"], best["baseline"], best["baseline_json"]
            stdlib = best["baseline_stdlib"]
            out[label] = {
                "rows": rows_n,
                "concurrency": concurrency,
                "ours": ours,
                "baseline": base,
                "baseline_stdlib": stdlib,
                "baseline_json": old,
                "throughput_ratio": ratio(ours["rows_per_s"], base["rows_per_s"]),
                "send_phase_ratio": ratio(ours["send_phase_rate"], base["send_phase_rate"]),
                "cpu_per_request_ratio": ratio(ours["cpu_us_per_request"], base["cpu_us_per_request"]),
                "loop_cpu_per_request_ratio": ratio(
                    ours["loop_cpu_us_per_request"], base["loop_cpu_us_per_request"]
                ),
                "throughput_ratio_stdlib": ratio(ours["rows_per_s"], stdlib["rows_per_s"]),
                "cpu_per_request_ratio_stdlib": ratio(
                    ours["cpu_us_per_request"], stdlib["cpu_us_per_request"]
                ),
                "throughput_ratio_json": ratio(ours["rows_per_s"], old["rows_per_s"]),
                "cpu_per_request_ratio_json": ratio(ours["cpu_us_per_request"], old["cpu_us_per_request"]),
            }
        return out

    def profile(self, results_dir: Path, stamp: str) -> dict[str, Any]:
        """One client-overhead run (20 KB photos) under py-spy (every thread, CPU samples, exact lines), or
        under pyinstrument (the event loop's thread only) when py-spy isn't installed."""
        label = "20KB"
        rows_n = self.plan.overhead_rows[label]
        manifest = self.work / f"overhead-{label}" / "manifest.csv"
        if not manifest.exists():
            rows = data.pool_rows(rows_n, self.photos(label), prefix=f"o{label}-")
            data.write_manifest(manifest, rows)
        folder = self.work / "profile"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        package = str(ROOT / "backfill") + "/"
        spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
        with ServerProcess("fast") as server:
            if spy is not None:
                report = results_dir / f"profile-{stamp}.pyspy.txt"
                log(f"profile: {rows_n} rows of {label}, `backfill run` under py-spy -> {report}")
                args = [
                    "run",
                    str(manifest),
                    "--base-url",
                    server.base_url,
                    "--rate",
                    str(UNTHROTTLED),
                    "--concurrency",
                    "64",
                    "--checkpoint",
                    str(folder / "checkpoint.sqlite"),
                    "--out",
                    str(folder / "out"),
                    "--no-progress",
                ]
                # --gil: only the thread holding the GIL is sampled. The event loop's thread is the bottleneck,
                # and waiting threads (idle pool workers, fsync, SQLite without the GIL) are not its cost.
                spy_args = ["record", "--gil", "--format", "raw", "--full-filenames", "--rate", "250"]
                spy_args += ["-o", str(report)]
                started = time.perf_counter()
                subprocess.run(
                    [spy, *spy_args, "--", *workers.cli_command(args)],
                    env={**os.environ, **ENV, "BACKFILL_MAX_IDS_PER_PHOTO": "0"},  # a pool of photos, shared
                    cwd=ROOT,
                    capture_output=True,
                    check=True,
                    timeout=self.plan.run_timeout_s,
                )
                wall = time.perf_counter() - started
                spots = pyspy_hotspots(report.read_text(), package)
                tool = "py-spy"
            else:
                if importlib.util.find_spec("pyinstrument") is None:
                    log("profile: skipped, neither py-spy nor pyinstrument is installed")
                    return {"tool": None, "skipped": "neither py-spy nor pyinstrument is installed"}
                report = results_dir / f"profile-{stamp}.pyinstrument.txt"
                log(f"profile: {rows_n} rows of {label} under pyinstrument -> {report}")
                flags = settings_flags(server.base_url, folder, rate=UNTHROTTLED, concurrency=64)
                result = in_child(workers.run_ours, str(manifest), flags, str(report))
                wall, spots, tool = result["wall_s"], result["hotspots"], "pyinstrument"
        return {
            "tool": tool,
            "rows": rows_n,
            "photo": label,
            "report": str(report),
            "wall_s": wall,
            "hotspots": spots,
        }

    # --- 3 ---------------------------------------------------------------------------------------------

    def vs_adhoc(self) -> dict[str, Any]:
        """The sequential script vs `backfill run` (rate 200, concurrency 16), same rows, 50 ms latency."""
        rows = self.plan.adhoc_rows
        manifest = self.mixed_manifest("adhoc", rows)
        faults = {"faults": {"latency_ms": 50}}
        log(f"vs ad-hoc script: {rows} rows, sandbox 50 ms")
        # A fresh sandbox for each: it remembers enrollments, and a second upload would only hear 2209.
        with ServerProcess("sandbox", faults) as server:
            script = in_child(workers.adhoc_script, str(manifest), server.base_url)
        with ServerProcess("sandbox", faults) as server:
            ours = self._ours(manifest, server.base_url, "adhoc", rate=200, concurrency=16)
        return {
            "rows": rows,
            "script_client": script["client"],
            "script_s": script["wall_s"],
            "script_ok": script["ok"],
            "ours_s": ours["wall_s"],
            "ours_enrolled": ours["summary"]["counts"].get("enrolled", 0),
            "ours_rate": 200,
            "ours_concurrency": 16,
            "speedup": ratio(script["wall_s"], ours["wall_s"]),
        }

    # --- 4 ---------------------------------------------------------------------------------------------

    def scale(self) -> dict[str, Any]:
        sizes = self.plan.scale_rows
        tree_dir = self.data_dir / f"tiny-{max(sizes)}"
        log(f"scale: making {max(sizes):,} distinct tiny image files in {tree_dir} (once; reused later)")
        started = time.perf_counter()
        tree = data.tiny_tree(tree_dir, max(sizes))
        made_s = time.perf_counter() - started
        idle = workers.run_cli(["--version"], ENV, 60)
        per_size: dict[str, Any] = {"tree_s": made_s, "cli_startup_rss_mb": idle["maxrss_mb"]}
        for n in sizes:
            folder = self.work / f"scale-{n}"
            manifest = data.tiny_manifest(folder / "manifest.csv", tree, n)
            # Warm first: the files' inodes and pages may have been reclaimed since they were made (this VM
            # runs DAMON reclaim), and whichever of validator and baseline ran first would pay for it.
            log(f"scale {n:,}: first touch (warms the inode and page caches; reported, not compared)")
            first = in_child(workers.stat_floor, str(manifest))
            log(f"scale {n:,}: baselines (csv + stat + read of each file; csv + stat of each file)")
            floor = _child(workers.stat_floor, str(manifest))
            stat_only = _child(workers.stat_only_floor, str(manifest))
            log(f"scale {n:,}: validation")
            checked = _child(workers.validate, str(manifest))
            entry: dict[str, Any] = {
                "rows": n,
                "validate_s": checked["wall_s"],
                "validate_rows_per_s": n / checked["wall_s"],
                "validate_valid": checked["valid"],
                "validate_maxrss_mb": checked["maxrss_mb"],
                "validate_cpu_stall_share": checked["cpu_stall_share"],
                "first_touch_rows_per_s": n / first["wall_s"],
                "floor_s": floor["wall_s"],
                "floor_rows_per_s": n / floor["wall_s"],
                "validate_over_floor": ratio(n / checked["wall_s"], n / floor["wall_s"]),
                "stat_floor_s": stat_only["wall_s"],
                "stat_floor_rows_per_s": n / stat_only["wall_s"],
            }
            with ServerProcess("fast") as server:
                args = [
                    "run",
                    str(manifest),
                    "--base-url",
                    server.base_url,
                    "--rate",
                    str(UNTHROTTLED),
                    "--concurrency",
                    "64",
                    "--checkpoint",
                    str(folder / "checkpoint.sqlite"),
                    "--no-progress",
                ]
                log(f"scale {n:,}: full run against the fast server (CLI subprocess)")
                full = workers.run_cli(
                    [*args, "--out", str(folder / "out-run")], ENV, self.plan.run_timeout_s
                )
                # The job is now complete: every row enrolled in the checkpoint. Resuming it must settle every
                # row as skipped from the ledger and one stat of its photo; it sends nothing and writes nothing
                # to the users table, so each repeat resumes the very same completed job.
                resumes = []
                for attempt in range(self.plan.repeats):
                    log(f"scale {n:,}: resume of the completed job, run {attempt + 1}/{self.plan.repeats}")
                    out = folder / f"out-resume-{attempt}"
                    resume = workers.run_cli([*args, "--out", str(out)], ENV, self.plan.run_timeout_s)
                    resume["counts"] = _summary(out).get("counts")
                    resumes.append(resume)
                if self.profile_resume and n == max(sizes):
                    entry["resume_profile"] = self._profile_cli(
                        [*args, "--out", str(folder / "out-resume-profile")], f"resume-{n}", gil=False
                    )
            full_summary = _summary(folder / "out-run")
            complete = full["exit_code"] == 0 and full_summary.get("counts") == {"enrolled": n}
            best = min(resumes, key=lambda r: float(r["wall_s"]))
            entry.update(
                {
                    "run_s": full["wall_s"],
                    "run_exit_code": full["exit_code"],
                    "run_rows_per_s": n / full["wall_s"],
                    "run_counts": full_summary.get("counts"),
                    "run_maxrss_mb": full["maxrss_mb"],
                    "run_cpu_s": full["cpu_s"],
                    "run_cpu_stall_share": full["cpu_stall_share"],
                    # What the resume figures are of: a job the full run finished, every row enrolled.
                    "resume_of_complete_job": complete,
                    "resume_s": best["wall_s"],
                    "resume_runs_s": [r["wall_s"] for r in resumes],
                    "resume_cpu_s": best["cpu_s"],
                    "resume_cpu_stall_share": best["cpu_stall_share"],
                    "resume_exit_code": best["exit_code"],
                    "resume_counts": best["counts"],
                    "resume_maxrss_mb": max(r["maxrss_mb"] for r in resumes),
                    "resume_rows_per_s": n / best["wall_s"],
                    # Baselines from this run: the same manifest validated (every row checked, every photo's
                    # head and tail read; in-process, so it pays no CLI start-up), and parsed + stat'ed.
                    "resume_over_validate": ratio(best["wall_s"], checked["wall_s"]),
                    "resume_over_stat_floor": ratio(best["wall_s"], stat_only["wall_s"]),
                    "resume_rss_over_startup": ratio(max(r["maxrss_mb"] for r in resumes), idle["maxrss_mb"]),
                }
            )
            if full["exit_code"] != 0:
                entry["run_output"] = full["output"]
            if best["exit_code"] != 0:
                entry["resume_output"] = best["output"]
            per_size[str(n)] = entry
            for leftover in folder.glob("out-*"):
                shutil.rmtree(leftover, ignore_errors=True)
            (folder / "checkpoint.sqlite").unlink(missing_ok=True)
        if len(sizes) > 1:
            small, large = per_size[str(sizes[0])], per_size[str(sizes[-1])]
            per_size["rss_large_over_small"] = ratio(large["run_maxrss_mb"], small["run_maxrss_mb"])
            per_size["resume_rss_large_over_small"] = ratio(
                large["resume_maxrss_mb"], small["resume_maxrss_mb"]
            )
        return per_size

    def _profile_cli(self, args: list[str], name: str, *, gil: bool) -> dict[str, Any]:
        """`backfill ARGS` once under py-spy (untimed: sampling slows it); hot spots charged to backfill/ lines.

        gil=True samples only the thread holding the GIL (where a send-bound run's Python waits its turn);
        gil=False samples every thread that is on a CPU (a resume's stats and SQLite run in threads).
        """
        spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
        if spy is None or self.results_dir is None:
            return {"tool": None, "skipped": "py-spy is not installed"}
        report = self.results_dir / f"profile-{self.stamp}-{name}.pyspy.txt"
        log(f"profile: `backfill {args[0]}` ({name}) under py-spy -> {report}")
        spy_args = ["record", "--format", "raw", "--full-filenames", "--rate", "250", "-o", str(report)]
        if gil:
            spy_args.insert(1, "--gil")
        started = time.perf_counter()
        subprocess.run(
            [spy, *spy_args, "--", *workers.cli_command(args)],
            env={**os.environ, **ENV},
            cwd=ROOT,
            capture_output=True,
            check=True,
            timeout=self.plan.run_timeout_s,
        )
        return {
            "tool": "py-spy",
            "threads": "GIL holder" if gil else "all on CPU",
            "report": str(report),
            "wall_s": time.perf_counter() - started,
            "hotspots": pyspy_hotspots(report.read_text(), str(ROOT / "backfill") + "/"),
        }

    # --- 5 ---------------------------------------------------------------------------------------------

    def retry_storm(self) -> dict[str, Any]:
        """20% 5xx and scripted 429s with Retry-After vs a clean run, same rate; server-side windows."""
        rate, concurrency, rows = 200.0, 32, self.plan.storm_rows
        manifest = self.mixed_manifest("storm", rows)
        # 1 user in 100 gets a 429 with Retry-After: 1 on its first request, as a real limiter would say.
        script = {data.user_id(i): [429] for i in range(0, rows, 100)}
        storm_faults = {"latency_ms": 50, "error_rate": 0.2, "retry_after_s": 1.0, "script": script}
        runs: dict[str, dict[str, Any]] = {}
        for name, faults in (("clean", {"latency_ms": 50}), ("storm", storm_faults)):
            log(f"retry storm: {name} run, {rows} rows at rate {rate:g}")
            with ServerProcess("sandbox", {"faults": faults, "seed": 7}) as server:
                ours = self._ours(
                    manifest, server.base_url, f"storm-{name}", rate=rate, concurrency=concurrency
                )
                stats = server.stats()
            times = sorted(stats["times"])
            worst = max_in_window(times)
            gaps = [b - a for a, b in pairwise(times)]
            runs[name] = {
                "wall_s": ours["wall_s"],
                "requests": len(times),
                # Where the extra time goes: whole-pool pauses after a 429 show as silences at the server,
                # backoff of the last few rows as a long tail after 99% of the requests are in.
                "silent_s": sum(g for g in gaps if g >= 0.25),
                "tail_after_99pct_s": times[-1] - times[int(len(times) * 0.99)] if times else 0.0,
                "statuses": {str(k): v for k, v in Counter(stats["statuses"]).items()},
                "worst_1s_window": worst,
                "worst_1s_window_over_configured": ratio(worst, rate),
                "counts": ours["summary"]["counts"],
                "attempts": ours["summary"]["attempts"],
                "exit_code": ours["summary"]["exit_code"],
            }
        return {
            "rows": rows,
            "configured_rate": rate,
            "concurrency": concurrency,
            "error_rate": 0.2,
            "users_scripted_429": len(script),
            **runs,
            "completion_ratio": ratio(runs["storm"]["wall_s"], runs["clean"]["wall_s"]),
            "attempts_ratio": ratio(runs["storm"]["attempts"], runs["clean"]["attempts"]),
        }

    # --- 6 ---------------------------------------------------------------------------------------------

    def ledger(self) -> dict[str, Any]:
        """begin_attempt + settle through SqliteStore (durable, group commits) vs its writes done bare.

        Baselines from the same run: the same rows as raw multi-row INSERTs in as many durable commits (the floor
        of any durable store), one fsync'd transaction per write (no group commit), and no fsync at all.
        """
        users, naive_users, concurrency = self.plan.ledger_users, self.plan.naive_users, 64
        folder = self.work / "ledger"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        log(f"ledger: {users} users through SqliteStore and as bare writes, {self.plan.ledger_repeats}x")
        runs: dict[str, list[dict[str, Any]]] = {"ours": [], "floor": []}
        for n in range(self.plan.ledger_repeats):  # interleaved, so a busy spell on the machine hits both
            runs["ours"].append(
                in_child(workers.ledger_ours, str(folder / f"ours{n}.sqlite"), users, concurrency)
            )
            runs["floor"].append(
                in_child(workers.ledger_floor, str(folder / f"floor{n}.sqlite"), users, concurrency)
            )
        naive = in_child(workers.ledger_one_fsync_each, str(folder / "naive.sqlite"), naive_users)
        bare = in_child(workers.ledger_no_fsync, str(folder / "no_fsync.sqlite"), users)
        ours, floor = _per_row(runs["ours"]), _per_row(runs["floor"])
        naive_rate, bare_rate = naive_users / naive["wall_s"], users / bare["wall_s"]
        return {
            "users": users,
            "concurrency": concurrency,
            "repeats": self.plan.ledger_repeats,
            "ours": ours,
            "floor": floor,
            "one_fsync_each_rows_per_s": naive_rate,
            "no_fsync_rows_per_s": bare_rate,
            "no_fsync_cpu_us_per_row": bare["cpu_s"] / users * 1e6,
            "over_floor": ratio(ours["rows_per_s"], floor["rows_per_s"]),
            "cpu_per_row_over_floor": ratio(ours["cpu_us_per_row"], floor["cpu_us_per_row"]),
            "over_one_fsync_each": ratio(ours["rows_per_s"], naive_rate),
            "over_no_fsync": ratio(ours["rows_per_s"], bare_rate),
        }

    # --- 7 ---------------------------------------------------------------------------------------------

    def erasure(self) -> dict[str, Any]:
        """`backfill forget` of 1% of a ledger's rows vs the same rows deleted bare, and VACUUM alone.

        The bare delete leaves the rows' bytes in the file; `forget` adds tombstones, secure_delete and the rewrite
        (VACUUM) that leave none. Also: what a resume pays per ID to look for tombstones, against the done-rows
        query it makes already.
        """
        users = self.plan.erasure_users
        folder = self.work / "erasure"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        log(f"erasure: forget 1 in {ERASE_EVERY} of {users} rows, vs a bare delete and VACUUM alone")
        ours = in_child(workers.erasure_ours, str(folder / "ours.sqlite"), users, ERASE_EVERY)
        floor = in_child(workers.erasure_floor, str(folder / "floor.sqlite"), users, ERASE_EVERY)
        return {
            "users": users,
            "forgotten": ours["forgotten"],
            "ours": ours,
            "floor": floor,
            "forget_over_delete_and_vacuum": ratio(ours["forget_s"], floor["delete_s"] + floor["vacuum_s"]),
            "forget_over_bare_delete": ratio(ours["forget_s"], floor["delete_s"]),
            "tombstone_lookup_over_done_query": ratio(ours["tombstone_lookup_s"], ours["done_query_s"]),
            "tombstone_lookup_us_per_id": ours["tombstone_lookup_s"] / users * 1e6,
        }


ERASE_EVERY = 100


def _child(fn: Any, *args: Any) -> dict[str, Any]:
    """in_child(fn, *args), with the share of its wall time the machine spent short of CPU (see workers)."""
    before, started = workers.cpu_stall_us(), time.perf_counter()
    result: dict[str, Any] = in_child(fn, *args)
    # Over the window sampled (the child's start-up included), so the share stays a share.
    window = time.perf_counter() - started
    result["cpu_stall_share"] = workers.stall_share(before, workers.cpu_stall_us(), window)
    return result


def _per_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows/s and CPU us/row (all threads), the median of repeats; every repeat's CPU beside it."""
    cpu = [r["cpu_s"] / r["users"] * 1e6 for r in runs]
    return {
        "rows_per_s": statistics.median(r["users"] / r["wall_s"] for r in runs),
        "cpu_us_per_row": statistics.median(cpu),
        "cpu_us_per_row_runs": cpu,
    }


def _summary(out: Path) -> dict[str, Any]:
    """The summary.json of the one run written under `out`, or {} if the run wrote none."""
    found = list(out.glob("*/summary.json"))
    return json.loads(found[0].read_text()) if found else {}

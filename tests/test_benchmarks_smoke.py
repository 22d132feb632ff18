"""The benchmarks in their smallest mode, so they can't rot: they run, and write sane JSON. No timing targets."""

from __future__ import annotations

import base64
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _positive(value: Any) -> bool:
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


def run_benchmark(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`python -m MODULE --smoke ARGS` as a user runs it, from the checkout; fails the test on a non-zero exit."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, "-m", module, "--smoke", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("bench")
    results = base / "results"
    done = run_benchmark("benchmarks", "--results-dir", str(results), "--data-dir", str(base))
    written = sorted(p for p in results.glob("*.json") if p.name != "latest.json")
    assert len(written) == 1
    latest: dict[str, Any] = json.loads((results / "latest.json").read_text())
    assert json.loads(written[0].read_text()) == latest
    assert "targets:" in done.stdout  # the table was printed
    return latest


def test_every_benchmark_reported(smoke: dict[str, Any]) -> None:
    assert smoke["meta"]["mode"] == "smoke"
    assert set(smoke["results"]) == {
        "rate_fidelity",
        "client_overhead",
        "vs_adhoc",
        "scale",
        "retry_storm",
        "ledger",
        "erasure",
    }
    assert smoke["targets"] and all({"name", "value", "target", "met"} <= set(t) for t in smoke["targets"])


def test_rate_fidelity(smoke: dict[str, Any]) -> None:
    r = smoke["results"]["rate_fidelity"]
    assert r["requests"] == r["rows"]
    assert r["counts"] == {"enrolled": r["rows"]}
    assert _positive(r["achieved_over_configured"])
    assert _positive(r["worst_1s_window_over_configured"])
    assert r["http_429"] >= 0


def test_client_overhead(smoke: dict[str, Any]) -> None:
    sizes = smoke["results"]["client_overhead"]
    assert set(sizes) == {"20KB", "200KB", "2MB"}
    for entry in sizes.values():
        for who in ("ours", "baseline", "baseline_stdlib", "baseline_json"):
            assert entry[who]["ok"] == entry["rows"]  # every signed answer verified and counted
            assert _positive(entry[who]["cpu_us_per_request"])
        for name in (
            "throughput_ratio",
            "cpu_per_request_ratio",
            "throughput_ratio_stdlib",
            "cpu_per_request_ratio_stdlib",
            "throughput_ratio_json",
            "cpu_per_request_ratio_json",
        ):
            assert _positive(entry[name]), name
    named = {t["name"]: t for t in smoke["targets"]}
    assert (
        named["overhead 20KB: CPU per request / bare aiohttp (spliced)"]["value"]
        == (sizes["20KB"]["cpu_per_request_ratio"])
    )
    assert "overhead 2MB: CPU per request / bare aiohttp (spliced)" not in named


def test_the_fair_baseline_posts_the_bytes_the_old_one_did(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spliced bare loops do less work, not different work: the same body, byte for byte, whichever
    encoder writes the base64."""
    from benchmarks import workers

    monkeypatch.setattr(workers, "utc_timestamp", lambda: "2026-12-07T10:00:00.000Z")
    photo = tmp_path / "p.png"
    photo.write_bytes(bytes(range(256)) * 80)
    bodies = {name: build("u1", "2021-08-12", str(photo)) for name, build in workers.BARE_BODIES.items()}
    assert bodies["spliced"] == bodies["spliced_stdlib"] == bodies["json"]
    assert json.loads(bodies["spliced"])["photo"] == base64.b64encode(photo.read_bytes()).decode()


def test_vs_adhoc(smoke: dict[str, Any]) -> None:
    a = smoke["results"]["vs_adhoc"]
    assert a["script_ok"] == a["ours_enrolled"] == a["rows"]
    assert _positive(a["speedup"])


def test_scale(smoke: dict[str, Any]) -> None:
    s = smoke["results"]["scale"]
    sizes = [k for k in s if k.isdigit()]
    assert sizes
    for key in sizes:
        e = s[key]
        assert e["validate_valid"] == e["rows"]
        assert e["run_exit_code"] == 0 and e["run_counts"] == {"enrolled": e["rows"]}
        assert e["resume_exit_code"] == 0 and e["resume_counts"] == {"skipped": e["rows"]}
        # The resume measured is of a job the full run completed, against baselines from the same run.
        assert e["resume_of_complete_job"] is True
        assert len(e["resume_runs_s"]) >= 1 and min(e["resume_runs_s"]) == e["resume_s"]
        for name in (
            "validate_rows_per_s",
            "validate_over_floor",
            "run_maxrss_mb",
            "resume_over_validate",
            "stat_floor_s",
            "resume_over_stat_floor",
            "resume_cpu_s",
            "resume_maxrss_mb",
            "resume_rss_over_startup",
        ):
            assert _positive(e[name]), name
        share = e["resume_cpu_stall_share"]
        assert share is None or (isinstance(share, float) and share >= 0)
    names = {t["name"] for t in smoke["targets"]}
    assert any(n.startswith(f"scale {int(sizes[0]):,}: validation") for n in names)


def test_ledger(smoke: dict[str, Any]) -> None:
    led = smoke["results"]["ledger"]
    assert len(led["ours"]["cpu_us_per_row_runs"]) == led["repeats"]
    for name in ("rows_per_s", "cpu_us_per_row"):
        assert _positive(led["ours"][name]) and _positive(led["floor"][name]), name
    for name in ("over_floor", "cpu_per_row_over_floor", "over_one_fsync_each", "over_no_fsync"):
        assert _positive(led[name]), name


def test_retry_storm(smoke: dict[str, Any]) -> None:
    st = smoke["results"]["retry_storm"]
    assert st["clean"]["counts"] == {"enrolled": st["rows"]}
    assert st["storm"]["requests"] >= st["rows"]
    assert _positive(st["completion_ratio"])
    assert _positive(st["storm"]["worst_1s_window_over_configured"])


def test_resume_targets_read_the_figures_they_name() -> None:
    """The 1M resume target reads the resume of a *completed* job; memory flat compares the two resumes."""
    from benchmarks.run import RESUME_RSS_FLAT, RESUME_TARGET_S, targets

    def scale(resume_s: float, complete: bool, rss_ratio: float) -> dict[str, Any]:
        entry = {
            "validate_rows_per_s": 1.0,
            "run_maxrss_mb": 1.0,
            "resume_s": resume_s,
            "resume_of_complete_job": complete,
        }
        return {"scale": {"1000000": entry, "resume_rss_large_over_small": rss_ratio}}

    def met(results: dict[str, Any], prefix: str) -> bool | None:
        found = [t["met"] for t in targets(results) if t["name"].startswith(prefix)]
        assert len(found) == 1, prefix
        return found[0]

    assert met(scale(RESUME_TARGET_S, True, 1.0), "scale 1M: resume") is True
    assert met(scale(RESUME_TARGET_S + 1, True, 1.0), "scale 1M: resume") is False
    assert met(scale(1.0, False, 1.0), "scale 1M: resume") is None  # not a completed job: not measured
    assert met(scale(1.0, True, RESUME_RSS_FLAT + 0.1), "scale: resume peak RSS") is False


def test_the_fleet_benchmark_runs_and_writes_its_ratios(tmp_path: Path, pg_cluster: Any) -> None:
    """`python -m benchmarks.fleet --smoke`: tiny sizes, its own PostgreSQL; the figures exist and are sane."""
    run_benchmark("benchmarks.fleet", "--results-dir", str(tmp_path), timeout=600)
    (written,) = tmp_path.glob("fleet-*.json")
    results = json.loads(written.read_text())
    scaling, fidelity, cost = results["scaling"], results["fidelity"], results["ledger_cost"]
    assert all(scaling[n]["requests"] == scaling[n]["rows"] for n in ("1", "2", "4"))  # every row sent once
    assert all(_positive(scaling[n]["ratio_to_one"]) for n in ("2", "4"))
    assert _positive(fidelity["worst_ratio_to_rate"])
    assert all(
        _positive(cost[k])
        for k in ("sqlite_rows_per_s", "postgres_rows_per_s", "postgres_with_claims_rows_per_s")
    )
    # The server's work a row, by pg_stat_statements (Debian's server has it): every row writes WAL and blocks.
    assert all(
        _positive(cost[f"{kind}_{measure}"])
        for kind in ("postgres", "postgres_with_claims")
        for measure in ("wal_bytes_per_row", "blocks_per_row")
    )
    # Statement by statement: only the fleet's path writes to the queue, and its finishes are among them.
    queue = [s for s in cost["postgres_with_claims_statements"] if "backfill.queue" in s["statement"]]
    assert any(s["statement"].startswith("UPDATE backfill.queue q SET done") for s in queue)  # the finishes
    assert not any("backfill.queue" in s["statement"] for s in cost["postgres_statements"])


def test_the_normalize_benchmark_runs_and_writes_its_ratios(tmp_path: Path) -> None:
    """`python -m benchmarks.normalize --smoke`: a few small phone photos; the figures exist and are sane."""
    run_benchmark("benchmarks.normalize", "--results-dir", str(tmp_path), "--data-dir", str(tmp_path))
    (written,) = tmp_path.glob("normalize-*.json")
    results = json.loads(written.read_text())
    assert results["meta"]["mode"] == "smoke" and results["meta"]["photos"] == 4
    for name in (
        "pillow",
        "ours",
        "ours_run",
        "pillow_upright",
        "ours_upright",
        "pillow_rotated",
        "ours_rotated",
    ):
        assert results[name]["rows"] in (2, 4) and _positive(results[name]["rows_per_s"]), name
        assert _positive(results[name]["cpu_ms_per_row"]), name
    assert all(_positive(v) for v in results["ratios"].values())


def test_erasure(smoke: dict[str, Any]) -> None:
    e = smoke["results"]["erasure"]
    assert (
        e["forgotten"] == len(range(0, e["users"], 100)) and e["ours"]["forgotten"] == e["floor"]["forgotten"]
    )
    for name in (
        "forget_over_delete_and_vacuum",
        "forget_over_bare_delete",
        "tombstone_lookup_over_done_query",
        "tombstone_lookup_us_per_id",
    ):
        assert _positive(e[name]), name


def test_the_shared_photo_benchmark_runs_and_writes_its_ratios(tmp_path: Path) -> None:
    """`python -m benchmarks.shared --smoke`: validation with and without the shared-photo census, tiny."""
    where = ["--results-dir", str(tmp_path / "results"), "--data-dir", str(tmp_path / "data")]
    run_benchmark("benchmarks.shared", *where)
    (written,) = (tmp_path / "results").glob("shared-*.json")
    results = json.loads(written.read_text())
    clean, shared = results["results"]["clean"], results["results"]["shared"]
    assert all(_positive(r["after_over_before"]) for r in (clean, shared))
    assert (clean["after"]["shared_photos"], clean["after"]["read_whole"], clean["after"]["valid"]) == (
        0,
        0,
        200,
    )
    # 200 rows, 36 to a photo: 6 photos, every row rejected, every photo read whole.
    assert (shared["after"]["shared_photos"], shared["after"]["read_whole"], shared["after"]["valid"]) == (
        6,
        200,
        0,
    )
    assert shared["before"]["valid"] == 200  # without the census, all of them pass
    assert results["targets"][0]["name"].startswith("validation with the census")
    resume = results["results"]["resume"]
    assert resume["full_run"]["counts"] == {"enrolled": 100}
    assert resume["before"]["counts"] == resume["after"]["counts"] == {"skipped": 100}
    assert _positive(resume["after_over_before_time"])

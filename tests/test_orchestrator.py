"""deploy/dagster/nightly.py run for real, in-process, against the sandbox: each exit code becomes the step's
success, skip or failure (retried or not) that deploy/README.md's table says."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import dagster as dg
import pytest

from backfill.ledger.sqlite import acquire_lock
from backfill.sandbox import RunningSandbox
from backfill.vocab import ExitCode

from .conftest import API_KEY, PARTNER_ID, simple_rows, write_manifest

REPO = Path(__file__).resolve().parent.parent


def load_example() -> ModuleType:
    """The example as `dagster dev -f` loads it: a file, not a module of this repository."""
    spec = importlib.util.spec_from_file_location(
        "backfill_nightly", REPO / "deploy" / "dagster" / "nightly.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Dagster reads the config class's annotations through it
    spec.loader.exec_module(module)
    return module


nightly = load_example()
# The job as the example builds it, but a retry comes at once: the test sees that it comes, not the wait.
JOB = nightly.nightly.to_job(name="nightly_now", op_retry_policy=dg.RetryPolicy(max_retries=1, delay=0))


@pytest.fixture(autouse=True)
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """As the Dagster process would have them: in its environment."""
    monkeypatch.setenv("SMILE_PARTNER_ID", PARTNER_ID)
    monkeypatch.setenv("SMILE_API_KEY", API_KEY)


def execute(manifest: Path, **settings: Any) -> dg.ExecuteInProcessResult:
    config = {"ops": {"backfill_users": {"config": {"manifest": str(manifest), "settings": settings}}}}
    result: dg.ExecuteInProcessResult = JOB.execute_in_process(run_config=config, raise_on_error=False)
    return result


def steps(result: dg.ExecuteInProcessResult, step: str) -> list[str]:
    return [e.event_type_value for e in result.all_events if e.step_key == step and e.is_step_event]


@pytest.fixture
def run_settings(tmp_path: Path, threaded_sandbox: RunningSandbox) -> dict[str, Any]:
    return {
        "env": "local",
        "base_url": threaded_sandbox.base_url,
        "ledger": str(tmp_path / "ledger.sqlite"),
        "out": str(tmp_path / "out"),
        "rate": 1000,
    }


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    return write_manifest(tmp_path, simple_rows(4))


def test_a_run_with_rejected_rows_succeeds_with_its_counts_and_the_next_step_runs(
    tmp_path: Path, manifest: Path, run_settings: dict[str, Any]
) -> None:
    (tmp_path / "images" / "user_0003.png").unlink()  # rejected: exit 1, the run did its work
    result = execute(manifest, **run_settings)
    assert result.success
    assert result.output_for_node("report") == {"enrolled": 3, "rejected": 1}
    [output] = [e for e in result.all_events if e.is_successful_output and e.step_key == "backfill_users"]
    metadata = output.step_output_data.metadata
    assert metadata["exit_code"].value == ExitCode.ROWS_LEFT and metadata["enrolled"].value == 3
    assert "STEP_SUCCESS" in steps(result, "report")


def test_a_ledger_held_by_another_run_skips_the_step_and_the_ones_after_it(
    tmp_path: Path, manifest: Path, run_settings: dict[str, Any]
) -> None:
    held = acquire_lock(tmp_path / "ledger.sqlite")
    try:
        result = execute(manifest, **run_settings)
    finally:
        os.close(held)
    assert result.success  # exit 3: another run is doing this work; nothing failed
    assert "STEP_OUTPUT" not in steps(result, "backfill_users")
    assert steps(result, "report") == ["STEP_SKIPPED"]


@pytest.mark.parametrize("wrong", ["setting", "manifest"])
def test_a_failure_a_retry_cant_fix_fails_the_step_once(
    tmp_path: Path, manifest: Path, run_settings: dict[str, Any], wrong: str
) -> None:
    if wrong == "setting":
        result = execute(manifest, **(run_settings | {"rate": "fast"}))  # exit 2: ConfigError
    else:
        result = execute(tmp_path / "no-such.csv", **run_settings)  # exit 2: ManifestError
    assert not result.success
    assert steps(result, "backfill_users").count("STEP_START") == 1  # no try can get past it: none is made
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failure.step_failure_data.user_failure_data.metadata["exit_code"].value == ExitCode.LOCAL
    assert steps(result, "report") == []  # never reached


def test_a_systemic_stop_fails_the_step_and_is_tried_again(
    manifest: Path, run_settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMILE_API_KEY", "not-the-sandbox-key")  # every request answered 2205
    result = execute(manifest, **run_settings)
    assert not result.success
    assert steps(result, "backfill_users").count("STEP_UP_FOR_RETRY") == 1
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    metadata = failure.step_failure_data.user_failure_data.metadata
    assert metadata["exit_code"].value == ExitCode.SYSTEMIC and metadata["run_dir"].value


# Every exit code the tool has, and what the orchestrator makes of it.
DECIDED = {0: "success", 1: "success", 3: "skip"} | dict.fromkeys((2, 4, 70, 130, 141, 143), "fail")


@pytest.mark.parametrize(("code", "decided"), sorted(DECIDED.items()))
def test_the_mapping_is_the_one_the_readme_tables(code: int, decided: str) -> None:
    assert nightly.outcome(code) == decided
    table = (REPO / "deploy" / "README.md").read_text().split("\n## Dagster\n", 1)[1].splitlines()
    assert any(line.startswith(f"| {code} | {decided}") for line in table), code


def test_the_mapping_decides_every_exit_code_there_is() -> None:
    assert set(DECIDED) == {int(c) for c in ExitCode}

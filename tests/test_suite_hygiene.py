"""The suite itself: no test takes a moment in time when pytest collects it, so a slow run can't age it."""

from __future__ import annotations

import importlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _moments(value: Any, depth: int = 0) -> list[str]:
    """Texts in a parametrize value that read as a moment within a day of now: taken at collection."""
    if depth > 5:  # pytest.param's marks and ids are no place for a time
        return []
    if isinstance(value, dict):
        return [m for v in value.values() for m in _moments(v, depth + 1)]
    if isinstance(value, list | tuple):
        return [m for v in value for m in _moments(v, depth + 1)]
    if not isinstance(value, str):
        return []
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return []
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return [value] if abs(moment - datetime.now(UTC)) < timedelta(days=1) else []


def test_no_parametrized_value_is_a_moment_taken_at_collection() -> None:
    """A time built when the file is collected ages while the rest of the suite runs: on a busy machine a
    'ten minutes from now' became the past before its test ran (test_sandbox's 2205 case, once)."""
    found = []
    modules = sorted(p.stem for p in HERE.glob("test_*.py"))
    assert len(modules) > 20
    for name in modules:
        module = importlib.import_module(f"tests.{name}")
        for attr, obj in vars(module).items():
            for mark in getattr(obj, "pytestmark", []):
                if mark.name == "parametrize" and len(mark.args) > 1:
                    found += [f"{name}.{attr}: {m}" for m in _moments(list(mark.args[1]))]
    assert not found, found


def test_the_check_sees_a_moment_taken_at_collection() -> None:
    now = datetime.now(UTC)
    assert _moments([{"timestamp": (now + timedelta(minutes=10)).strftime("%Y-%m-%dT%H:%M:%S.000Z")}])
    assert not _moments([{"timestamp": "2023-02-14T00:07:49.924Z"}, "yesterday", 10.0])

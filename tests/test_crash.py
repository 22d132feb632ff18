"""The crash suite, short: real processes killed at each boundary and at random, then resumed until done."""

from __future__ import annotations

from pathlib import Path

import pytest

from backfill.run.crash import CRASH_BOUNDARIES

from .crash_rig import Chaos, CrashRig


@pytest.mark.parametrize("seed", [1, 2])
def test_kills_and_faults_never_enroll_twice_or_lose_a_row(tmp_path: Path, seed: int) -> None:
    # 8 of the 60 IDs are held by another partner user: verify() checks they are never enrolled and end
    # id_conflict unless an attempt of ours for them may have been lost in transit.
    rig = CrashRig(tmp_path, rows=60, chaos=Chaos(), seed=seed, foreign=8)
    summary = rig.until_done(kills=6)
    figures = rig.verify(summary)
    # Each boundary's kill lands (the random ones may come after a run already finished).
    assert set(rig.audit.boundary_kills) == set(CRASH_BOUNDARIES)
    assert figures["kills"] >= 3 and figures["duplicates"] == 0 and figures["lost"] == 0
    assert figures["foreign_id_conflict"] + figures["foreign_already_enrolled"] == 8


def test_every_answer_lost_after_commit_still_ends_enrolled_once(tmp_path: Path) -> None:
    # The hardest case for the 2209 rule: the server commits and the client never hears it, every time.
    chaos = Chaos(error_rate=0, reset_before_rate=0, reset_after_rate=1.0, slow_rate=0, sandbox_kill_rate=0)
    rig = CrashRig(tmp_path, rows=20, chaos=chaos, seed=3)
    summary = rig.until_done(kills=3)
    figures = rig.verify(summary)
    assert figures["answers_2209"] == 20  # every row learned of its enrollment from 2209, and owned it
    counts = dict(summary["counts"])  # type: ignore[call-overload]
    assert counts.pop("rejected") == 3 and set(counts) <= {"skipped", "already_enrolled"}
    assert sum(counts.values()) == 20

"""The one timestamp format: whatever the clock reads, in whatever order, the text is that moment's."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backfill import clock

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Moments a run may see: the same millisecond again, the next one, the next second, a clock stepped back.
STEPS = st.sampled_from([0, 1, 999, 1000, 1001, 59_999, 86_400_000, -1, -1000])


def expected(ms: int) -> str:
    moment = EPOCH + timedelta(milliseconds=ms)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@given(start=st.integers(min_value=0, max_value=4_000_000_000_000), steps=st.lists(STEPS, max_size=12))
def test_each_reading_is_formatted_as_its_own_millisecond(start: int, steps: list[int]) -> None:
    ms = start
    with pytest.MonkeyPatch.context() as patch:
        for step in [0, *steps]:
            ms = max(0, ms + step)
            now = ms * 1_000_000 + 999_999  # the millisecond's last nanosecond: truncated, never rounded
            patch.setattr(clock.time, "time_ns", lambda now=now: now)
            assert clock.now_iso() == expected(ms)

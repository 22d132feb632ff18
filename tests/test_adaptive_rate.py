"""The adaptive rate (429s slow everyone, good answers speed back up) and "can't connect" at the start."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from backfill import compose as runner
from backfill.api.answers import NoAnswer, Verdict, classify_transport, unreachable_from_the_start
from backfill.api.client import Client
from backfill.config import Settings
from backfill.ledger import Binding
from backfill.ledger.memory import MemoryStore
from backfill.run.policy import RetryPolicy
from backfill.run.rate import RateGate
from backfill.run.stops import Stops
from backfill.sandbox import Faults, start_sandbox
from backfill.vocab import Kind

from .conftest import API_KEY, PARTNER_ID, simple_rows, write_manifest
from .test_promise import CountingImages, run_by_hand


class FakeTime:
    """A clock that only moves when someone sleeps on it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)
        await asyncio.sleep(0)


def worst_window(times: list[float], width: float = 1.0) -> int:
    """The most slots in any half-open window [t, t + width) of fake time."""
    times = sorted(times)
    worst, start = 0, 0
    for end, t in enumerate(times):
        while times[start] <= t - width:
            start += 1
        worst = max(worst, end - start + 1)
    return worst


async def test_the_bucket_never_lets_more_than_rate_plus_its_burst_into_any_second() -> None:
    fake = FakeTime()
    gate = RateGate(200, clock=fake.clock, sleep=fake.sleep)
    rng = random.Random(7)
    taken: list[float] = []

    async def worker(n: int) -> None:
        for _ in range(n):
            await gate.take()
            taken.append(fake.now)

    for _ in range(20):
        # Idle gaps of every length refill the burst; then 32 workers at once drain it and queue.
        fake.now += rng.choice([0.0, 0.004, 0.02, 0.3, 2.0])
        await asyncio.gather(*(worker(rng.randint(1, 12)) for _ in range(32)))
    # Not slower than asked either: a queue that never empties runs at the rate.
    fake.now += 5.0
    began = len(taken)
    await asyncio.gather(*(worker(20) for _ in range(32)))
    busy = taken[began:]
    assert (len(busy) - 10) / (busy[-1] - busy[0]) == pytest.approx(200, rel=0.01)  # less the first burst
    assert len(taken) > 2000
    assert worst_window(taken) <= 200 * 1.05


async def test_a_429_halves_the_rate_once_per_generation_and_good_answers_climb_back() -> None:
    fake = FakeTime()
    gate = RateGate(20, clock=fake.clock, sleep=fake.sleep)
    stops = Stops(fake.sleep)
    first = await gate.wait_turn(stops)
    in_flight = await gate.wait_turn(stops)
    assert gate.throttled(first) == 10
    # Sent at the old rate with the first: one overload, one decrease.
    assert gate.throttled(in_flight) is None
    again = await gate.wait_turn(stops)
    assert gate.throttled(again) == 5 and gate.rate_min == 5
    for _ in range(10):
        fake.now += 1.0
        gate.answered()
    assert gate.rate == pytest.approx(15)  # +5% of --rate (1/s) per second of good answers
    for _ in range(100):
        fake.now += 1.0
        gate.answered()
    assert gate.rate == 20  # never above --rate
    while gate.throttled(gate.generation) is not None:
        pass
    assert gate.rate == pytest.approx(0.1)  # the floor


def test_429s_do_not_spend_the_retry_budget_but_have_a_cap_of_their_own() -> None:
    policy = RetryPolicy(max_attempts=2, max_throttled=3, backoff_initial=0.5, backoff_max=30.0)
    throttled = Verdict(
        kind=Kind.TRANSIENT, may_have_enrolled=False, proves_not_enrolled=False, http_status=429
    )
    busy = Verdict(kind=Kind.TRANSIENT, may_have_enrolled=True, proves_not_enrolled=False, http_status=503)
    # `attempts` counts every attempt of the row, its 429s (`throttled`) included.
    assert policy.decide(throttled, attempts=2, throttled=2) is not None
    assert policy.decide(throttled, attempts=3, throttled=3) is None
    assert policy.decide(busy, attempts=4, throttled=3) is not None
    assert policy.decide(busy, attempts=2, throttled=0) is None


async def test_a_server_limiting_at_5_per_s_with_rate_20_ends_every_row_with_fewer_429s_than_rows(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    # The same run is `python -m benchmarks.adaptive`, which also times it (tests never fail on time).
    async with await start_sandbox(PARTNER_ID, API_KEY, faults=Faults(rate_limit=5)) as server:
        manifest = write_manifest(tmp_path, simple_rows(60))
        summary = await runner.run(make_settings(server, rate=20, concurrency=8, max_attempts=3), manifest)
        assert summary.counts == {"enrolled": 60} and summary.exit_code == 0
        assert server.state.answers["429"] < 60
        assert summary.attempts == 60 + server.state.answers["429"]
        assert summary.effective_rate_min < 20
    written = json.loads((Path(summary.out_dir) / "summary.json").read_text())
    assert written["effective_rate_min"] == summary.effective_rate_min and "effective_rate_final" in written


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port  # closed now: connecting is refused


async def test_an_api_refusing_connections_from_the_start_stops_the_run_at_once(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    base_url = f"http://127.0.0.1:{closed_port()}/v1"
    manifest = write_manifest(tmp_path, simple_rows(50))
    summary = await runner.run(make_settings(base_url=base_url, concurrency=4), manifest)
    assert summary.exit_code == 4
    assert base_url.removesuffix("/v1") in summary.stop_reason
    assert "--base-url" in summary.stop_reason and "reachable from this machine" in summary.stop_reason
    assert (
        summary.attempts <= 4 and "failed" not in summary.counts and "retry_exhausted" not in summary.counts
    )
    assert set(summary.counts) <= {"pending"}


async def test_cant_connect_after_answers_is_a_blip_and_retried(
    tmp_path: Path, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Client.send_photo
    blips = {"user_0003": 2}

    async def flaky(self: Client, user_id: str, *args: Any) -> Verdict:
        if blips.get(user_id, 0):
            blips[user_id] -= 1
            return classify_transport(
                NoAnswer(reason="can't connect", may_have_reached=False), unreachable=True
            )
        return await real(self, user_id, *args)

    monkeypatch.setattr(Client, "send_photo", flaky)
    async with await start_sandbox(PARTNER_ID, API_KEY) as server:
        manifest = write_manifest(tmp_path, simple_rows(6))
        summary = await runner.run(make_settings(server, concurrency=1), manifest)
    assert summary.exit_code == 0 and summary.counts == {"enrolled": 6} and summary.retries == 2


def test_unreachable_is_transient_and_never_in_doubt_and_systemic_only_from_the_start() -> None:
    verdict = classify_transport(
        NoAnswer(reason="can't connect to x", may_have_reached=False), unreachable=True
    )
    assert verdict.kind is Kind.TRANSIENT and not verdict.may_have_enrolled and verdict.unreachable
    first = unreachable_from_the_start(verdict)
    assert first.kind is Kind.SYSTEMIC and not first.may_have_enrolled and "can't connect to x" in first.error


# --- the rate limit inside a run: a 429's pause, and a stop while workers wait for slots ---

SENT: list[float] = []


class Throttled(Client):
    """The first request gets 429 with Retry-After 1.5 s; every later one is enrolled. No network."""

    async def send(self, user_id: str, user_created_at: str, photo_b64: bytes) -> Verdict:
        SENT.append(time.monotonic())
        first = len(SENT) == 1
        await asyncio.sleep(0.3)  # the answer takes a while, so other workers are queued for slots meanwhile
        if first:
            return Verdict(
                kind=Kind.TRANSIENT,
                may_have_enrolled=False,
                proves_not_enrolled=False,
                http_status=429,
                error="HTTP 429",
                retry_after=1.5,
            )
        return Verdict(
            kind=Kind.ENROLLED, may_have_enrolled=False, proves_not_enrolled=False, http_status=200
        )


async def test_a_429_pause_holds_the_workers_already_queued_for_a_slot(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    """Workers waiting in the limiter when a 429 arrived used to come out and send during its Retry-After."""
    SENT.clear()
    manifest = write_manifest(tmp_path, simple_rows(8))
    settings = make_settings(None, base_url="http://127.0.0.1:9/v1", rate=4, concurrency=8)
    store = MemoryStore(Binding(partner_id="085", endpoint=settings.endpoint))
    summary, _ = await run_by_hand(
        settings, manifest, store=store, images=CountingImages(tmp_path), client_class=Throttled
    )
    assert summary.counts == {"enrolled": 8}
    answered = SENT[0] + 0.3  # when the 429 came back
    inside = [round(t - answered, 2) for t in SENT[1:] if answered < t < answered + 1.45]
    assert not inside, f"{len(inside)} requests left during the pause, at {inside} s after the 429"


class Instant(Client):
    async def send(self, user_id: str, user_created_at: str, photo_b64: bytes) -> Verdict:
        return Verdict(
            kind=Kind.ENROLLED, may_have_enrolled=False, proves_not_enrolled=False, http_status=200
        )


async def test_a_stop_does_not_wait_for_every_queued_worker_to_get_a_rate_slot(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    """At --rate 0.05 six queued workers held a stop for two minutes; systemd would have SIGKILLed the run."""
    manifest = write_manifest(tmp_path, simple_rows(20))
    settings = make_settings(
        None, base_url="http://127.0.0.1:9/v1", rate=0.05, concurrency=6, max_duration=0.5
    )
    store = MemoryStore(Binding(partner_id="085", endpoint=settings.endpoint))
    summary, _ = await asyncio.wait_for(
        run_by_hand(settings, manifest, store=store, images=CountingImages(tmp_path), client_class=Instant),
        30,
    )
    assert "--max-duration" in summary.stop_reason and summary.not_reached > 0

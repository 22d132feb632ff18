"""Prometheus metrics of one run, served on their own listener (`--metrics-addr`): the engine's Observer."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from ..config import listen_address
from ..errors import ConfigError
from ..version import __version__
from ..vocab import Kind, Status

# Seconds: from a fast sandbox answer to the client's --timeout (60 s by default).
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class RunMetrics:
    """One run's metrics in a registry of its own, so several runs (tests) in one process never collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._rows = Counter(
            "backfill_rows", "Rows settled in this run, by final status.", ["status"], registry=r
        )
        for status in Status:
            self._rows.labels(status=status)  # every status shows from the start, at 0: rate() needs a base
        self._duration = Histogram(
            "backfill_request_duration_seconds",
            "Round trip of each POST, by the kind of answer.",
            ["outcome"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        for kind in Kind:
            self._duration.labels(outcome=kind)
        self._retries = Counter(
            "backfill_retries", "Retries scheduled, by the answer that caused them.", ["reason"], registry=r
        )
        self._throttled = Counter("backfill_throttled", "Answers that were HTTP 429.", registry=r)
        self._remaining = Gauge("backfill_rows_remaining", "Manifest rows not yet settled.", registry=r)
        self._in_flight = Gauge("backfill_rows_in_flight", "Requests sent and not yet answered.", registry=r)
        self._rate = Gauge("backfill_effective_rate", "The adaptive rate limit now, requests/s.", registry=r)
        self._progress = Gauge(
            "backfill_last_progress_timestamp_seconds",
            "When a row last settled (unix seconds; the run's start before any).",
            registry=r,
        )
        self._progress.set_to_current_time()
        self._info = Info("backfill_run", "The run being exported.", registry=r)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    # --- the Observer protocol (backfill/run/observe.py) ---

    def watch(
        self, *, remaining: Callable[[], int], in_flight: Callable[[], int], rate: Callable[[], float]
    ) -> None:
        self._remaining.set_function(remaining)
        self._in_flight.set_function(in_flight)
        self._rate.set_function(rate)

    def row_settled(self, status: str, n: int = 1) -> None:
        self._rows.labels(status=status).inc(n)
        self._progress.set(time.time())

    def attempt(self, kind: str, seconds: float) -> None:
        self._duration.labels(outcome=kind).observe(seconds)

    def retry(self, reason: str) -> None:
        self._retries.labels(reason=reason).inc()

    def throttled(self) -> None:
        self._throttled.inc()

    # --- the listener ---

    def describe(self, *, run_id: str, env: str) -> None:
        self._info.info({"run_id": run_id, "env": env, "version": __version__})

    def serve(self, addr: str, *, source: str = "flag --metrics-addr") -> None:
        """Listen on HOST:PORT (or :PORT) in a thread of its own (a scrape never waits on the event loop, nor it on one)."""
        host, port = listen_address(addr)
        try:
            self._server, self._thread = start_http_server(port, host, registry=self.registry)
        except OSError as error:
            raise ConfigError(
                "metrics_addr",
                source,
                f"can't listen on {addr} ({error.strerror or error})",
                "choose another port, or stop whatever is listening there",
            ) from error

    def close(self) -> None:
        """Stop listening: the port is free again once the run returns."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

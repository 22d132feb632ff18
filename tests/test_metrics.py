"""`--metrics-addr`: Prometheus text scraped from a real run against the sandbox, and the listener closed after."""

from __future__ import annotations

import re
import socket
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from backfill import __version__, compose
from backfill.cli import main
from backfill.config import Settings, load_settings
from backfill.errors import ConfigError
from backfill.sandbox import Faults, start_sandbox

from .conftest import API_KEY, PARTNER_ID, free_port, simple_rows, write_manifest

CREDS = {"SMILE_PARTNER_ID": PARTNER_ID, "SMILE_API_KEY": API_KEY}


def value(text: str, sample: str) -> float:
    """The value of one sample line, e.g. `backfill_rows_total{status="enrolled"}`."""
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"{sample} not in:\n{text}"
    return float(match.group(1))


class ScrapeMidway:
    """A progress object that scrapes /metrics when the `at`-th row settles, while others are on the wire."""

    def __init__(self, url: str, at: int) -> None:
        self.url, self.at, self.seen = url, at, 0
        self.text = ""

    def start(self, total: int) -> None:
        pass

    def advance(self, status: str) -> None:
        self.seen += 1
        if self.seen == self.at:
            # Blocking the loop here is the point: the listener answers from its own thread, not the loop's.
            with urllib.request.urlopen(self.url, timeout=5) as answer:
                self.text = answer.read().decode()


async def test_metrics_are_scraped_during_a_run_and_the_listener_closes_after(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(12))
    port = free_port()
    async with await start_sandbox(PARTNER_ID, API_KEY, faults=Faults(latency_ms=200)) as server:
        settings = make_settings(server, metrics_addr=f"127.0.0.1:{port}", concurrency=4)
        scrape = ScrapeMidway(f"http://127.0.0.1:{port}/metrics", at=5)
        summary = await compose.run(settings, manifest, progress=scrape)
    assert summary.counts == {"enrolled": 12}
    text = scrape.text
    assert value(text, 'backfill_rows_total{status="enrolled"}') == 5  # scraped as the 5th row settled
    assert value(text, 'backfill_rows_total{status="failed"}') == 0
    assert value(text, "backfill_rows_remaining") == 7
    assert 0 <= value(text, "backfill_rows_in_flight") <= 4
    assert value(text, "backfill_effective_rate") == settings.rate
    assert value(text, 'backfill_request_duration_seconds_count{outcome="enrolled"}') >= 5
    assert value(text, 'backfill_request_duration_seconds_sum{outcome="enrolled"}') >= 5 * 0.2
    assert value(text, "backfill_throttled_total") == 0
    assert value(text, "backfill_last_progress_timestamp_seconds") > 1.7e9
    info = f'backfill_run_info{{env="local",run_id="{summary.run_id}",version="{__version__}"}}'
    assert value(text, info) == 1
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass  # the run is over: nothing listens any more


async def test_retries_and_429s_are_counted(tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    manifest = write_manifest(tmp_path, simple_rows(3))
    port = free_port()
    faults = Faults(script={"user_0001": [503], "user_0002": [429]})
    async with await start_sandbox(PARTNER_ID, API_KEY, faults=faults) as server:
        settings = make_settings(server, metrics_addr=f"127.0.0.1:{port}")
        scrape = ScrapeMidway(f"http://127.0.0.1:{port}/metrics", at=3)
        summary = await compose.run(settings, manifest, progress=scrape)
    assert summary.counts == {"enrolled": 3}
    text = scrape.text
    assert value(text, 'backfill_rows_total{status="enrolled"}') == 3
    assert value(text, "backfill_throttled_total") == 1
    assert sum(float(n) for n in re.findall(r"^backfill_retries_total\{[^}]*\} (\S+)$", text, re.M)) == 2
    assert value(text, 'backfill_request_duration_seconds_count{outcome="transient"}') == 2
    assert value(text, "backfill_rows_remaining") == 0


async def test_a_taken_port_is_a_config_error_before_any_output(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(1))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = make_settings(metrics_addr=f"127.0.0.1:{taken.getsockname()[1]}")
        with pytest.raises(ConfigError) as info:
            await compose.run(settings, manifest)
    assert info.value.key == "metrics_addr"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "bad", ["9464", "localhost", ":", "127.0.0.1:0", "127.0.0.1:70000", "::1:9464", "127.0.0.1:http"]
)
def test_a_bad_metrics_addr_is_a_config_error_naming_the_key(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, CREDS, {"metrics_addr": bad})
    assert info.value.key == "metrics_addr" and info.value.source == "flag --metrics-addr"
    assert "HOST:PORT" in str(info.value) or "brackets" in str(info.value)


@pytest.mark.parametrize("command", ["run", "retry"])
def test_the_cli_flag_is_checked_like_any_setting(tmp_path: Path, command: str) -> None:
    manifest = write_manifest(tmp_path, simple_rows(1))
    args = [command, *([str(manifest)] if command == "run" else []), "--metrics-addr", "nohost"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "out")], env=CREDS)
    assert result.exit_code == 2 and "metrics_addr (from flag --metrics-addr)" in result.stderr


def test_metrics_addr_is_off_by_default_and_read_from_the_environment() -> None:
    assert load_settings(None, CREDS).metrics_addr is None
    env = {**CREDS, "BACKFILL_METRICS_ADDR": "[::1]:9464"}
    assert load_settings(None, env).metrics_addr == "[::1]:9464"


# --- `:PORT` listens on every interface, as Prometheus exporters do ------------------------------------------


class ScrapeThrough:
    """A progress object that scrapes `url` when the first row settles, while the run's listener is up."""

    def __init__(self, url: str) -> None:
        self.url, self.text = url, ""

    def start(self, total: int) -> None:
        pass

    def advance(self, status: str) -> None:
        if not self.text:
            with urllib.request.urlopen(self.url, timeout=5) as answer:
                self.text = answer.read().decode()


async def test_metrics_on_no_host_answer_on_an_address_other_than_localhost(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(2))
    port = free_port()
    # 127.0.0.2 is this machine too, but only a listener on every interface (not 127.0.0.1 alone) answers it.
    scrape = ScrapeThrough(f"http://127.0.0.2:{port}/metrics")
    async with await start_sandbox(PARTNER_ID, API_KEY) as server:
        summary = await compose.run(make_settings(server, metrics_addr=f":{port}"), manifest, progress=scrape)
    assert summary.counts == {"enrolled": 2} and "backfill_rows_total" in scrape.text

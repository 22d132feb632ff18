"""`log_user_ids`: plain, hashed or omit, for every line on the terminal and in --log-file, and every metric label."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from backfill import compose
from backfill.config import Settings
from backfill.images import PhotoKey
from backfill.sandbox import Faults, start_sandbox

from .conftest import API_KEY, PARTNER_ID, ThreadedSandboxes, cli, free_port, simple_rows, write_manifest
from .test_metrics import ScrapeMidway

PREFIX = "cust-7f3a-"  # nothing else in a log line looks like it, so a grep for each ID finds only the ID
RETRIED, EMPTY = f"{PREFIX}0001", f"{PREFIX}0004"


def logged_runs(tmp_path: Path, sandboxes: ThreadedSandboxes, mode: str) -> tuple[list[str], str, list[str]]:
    """A run (a retried row, a rejected photo, every row's line in the log file) in text, then another in JSON
    (its own ledger and sandbox), then its resume, all with `--log-user-ids mode`: the manifest's IDs, the log
    file, and everything said on the terminal on the way."""
    rows = simple_rows(6, prefix=PREFIX)
    manifest = write_manifest(tmp_path, rows)
    (tmp_path / "images" / f"{EMPTY}.png").write_bytes(b"")
    log_file = tmp_path / "backfill.log"
    said = []
    for fmt in ("text", "json", "json"):
        if fmt == "text" or not said[2:]:
            server = sandboxes.start(faults=Faults(script={RETRIED: [503]}))
            where = [
                "--env",
                "local",
                "--base-url",
                server.base_url,
                "--checkpoint",
                str(tmp_path / f"{fmt}.sqlite"),
            ]
        code, out, err = cli(
            "run",
            str(manifest),
            *where,
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
            "--log-format",
            fmt,
            "--log-file",
            str(log_file),
            "--log-level",
            "debug",
            "--log-user-ids",
            mode,
            env={"BACKFILL_BACKOFF_INITIAL": "0.001", "BACKFILL_BACKOFF_MAX": "0.01"},
        )
        assert code == 1, err  # the empty photo is rejected, every other row enrolled (then skipped)
        assert server.state.requests[RETRIED] == 2  # its retry was logged, naming it
        said += [out, err]
    return [uid for uid, _, _ in rows], log_file.read_text(), said


@pytest.mark.parametrize("mode", ["omit", "hashed"])
def test_no_user_id_in_any_log_line_unless_plain(
    tmp_path: Path, threaded_sandboxes: ThreadedSandboxes, mode: str
) -> None:
    ids, logged, said = logged_runs(tmp_path, threaded_sandboxes, mode)
    everything = "\n".join([logged, *said])
    assert logged.count("retry_scheduled") == 2 and "row_finished" in logged
    assert [uid for uid in ids if uid in everything] == []
    assert PREFIX not in everything
    key = ledger_key(tmp_path / "json.sqlite")
    if mode == "omit":
        assert "(user)" in logged and not [uid for uid in ids if key.user(uid) in everything]
        return
    # Hashed: each row's lines name it by its keyed hash, which `find-user` computes from the ledger.
    assert [uid for uid in ids if uid != EMPTY and key.user(uid) not in logged] == []
    code, out, err = cli(
        "find-user", RETRIED, EMPTY, "--env", "local", "--checkpoint", str(tmp_path / "json.sqlite")
    )
    assert code == 0, err
    assert out.splitlines() == [f"{key.user(RETRIED)}\t{RETRIED}", f"{key.user(EMPTY)}\t{EMPTY}"]


def test_plain_is_the_default_and_names_every_row(
    tmp_path: Path, threaded_sandboxes: ThreadedSandboxes
) -> None:
    ids, logged, _ = logged_runs(tmp_path, threaded_sandboxes, "plain")
    assert [uid for uid in ids if uid not in logged] == [EMPTY]  # rejected before any attempt: not a log line


def test_a_users_keyed_hash_is_the_ledgers_own() -> None:
    one, two = PhotoKey.new(), PhotoKey.new()
    assert one.user("a") == PhotoKey(secret=one.secret).user("a") != two.user("a")
    assert one.user("a") != one.user("b") and re.fullmatch(r"u-[0-9a-f]{20}", one.user("a"))
    # Another label than a photo's pin: a user_id that happens to be a digest's hex is not its pin.
    assert one.user("ab" * 32)[2:] not in one.pin("ab" * 32)


async def test_no_metric_label_names_a_user(tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    manifest = write_manifest(tmp_path, simple_rows(4, prefix=PREFIX))
    port = free_port()
    async with await start_sandbox(
        PARTNER_ID, API_KEY, faults=Faults(script={RETRIED: [503, 429]})
    ) as server:
        settings = make_settings(server, metrics_addr=f"127.0.0.1:{port}", log_user_ids="omit")
        scrape = ScrapeMidway(f"http://127.0.0.1:{port}/metrics", at=4)
        summary = await compose.run(settings, manifest, progress=scrape)
    assert summary.counts == {"enrolled": 4} and "backfill_retries_total{" in scrape.text
    assert PREFIX not in scrape.text


def ledger_key(path: Path) -> PhotoKey:
    conn = sqlite3.connect(path)
    try:
        (secret,) = conn.execute("SELECT value FROM meta WHERE key = 'photo_key'").fetchone()
    finally:
        conn.close()
    return PhotoKey(secret=bytes.fromhex(secret))

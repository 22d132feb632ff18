"""`backfill check` against a real sandbox: every problem named with its fix, and nothing ever POSTed."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from aiohttp import web

from backfill.ledger import Binding
from backfill.ledger.sqlite import SqliteStore
from backfill.preflight import Check, exit_code
from backfill.sandbox import RunningSandbox, make_app
from backfill.vocab import ExitCode

from .conftest import API_KEY, PARTNER_ID, ThreadedSandboxes, simple_rows, write_manifest
from .test_cli import run_cli


def check(manifest: Path, base_url: str, checkpoint: Path) -> tuple[int, str]:
    code, out, err = run_cli(
        "check", str(manifest), "--env", "local", "--base-url", base_url, "--checkpoint", str(checkpoint)
    )
    assert "Traceback" not in out + err and API_KEY not in out + err
    return code, out


def line(out: str, name: str) -> str:
    return next(x for x in out.splitlines() if x.split(":")[0].split(maxsplit=1)[-1] == name)


def test_all_fine_exits_0_and_sends_nothing(tmp_path: Path, threaded_sandbox: RunningSandbox) -> None:
    manifest = write_manifest(tmp_path, simple_rows(60))
    code, out = check(manifest, threaded_sandbox.base_url, tmp_path / "cp.sqlite")
    assert code == 0 and "all checks passed" in out, out
    for name in (
        "settings",
        "credentials",
        "manifest",
        "ledger",
        "api host",
        "api connects",
        "api tls",
        "clock",
        "images",
    ):
        assert line(out, name).startswith("ok"), name
    assert "60 rows, 60 pass" in line(out, "manifest") and "40 photos" in line(out, "images")
    assert "base_url=" in line(out, "settings") and "(from flag --base-url)" in line(out, "settings")
    assert threaded_sandbox.state.total_requests == 0
    assert not (tmp_path / "cp.sqlite").exists()  # a preflight writes nothing, not even a new ledger


def test_reports_what_the_ledger_holds_for_this_manifest(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(12))
    code, _, _ = run_cli(
        "run",
        str(manifest),
        "--env",
        "local",
        "--base-url",
        threaded_sandbox.base_url,
        "--checkpoint",
        str(tmp_path / "cp.sqlite"),
        "--out",
        str(tmp_path / "out"),
        "--limit",
        "5",
        "--no-progress",
    )
    assert code == 1
    sent = threaded_sandbox.state.total_requests
    code, out = check(manifest, threaded_sandbox.base_url, tmp_path / "cp.sqlite")
    assert code == 0, out
    assert "of this manifest's 12 IDs: 5 enrolled; 7 not in the ledger" in line(out, "ledger holds")
    assert f"bound to partner {PARTNER_ID}" in line(out, "ledger")
    assert threaded_sandbox.state.total_requests == sent


def test_wrong_port_exits_4_naming_the_url(tmp_path: Path, threaded_sandbox: RunningSandbox) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    manifest = write_manifest(tmp_path, simple_rows(3))
    code, out = check(manifest, f"http://127.0.0.1:{port}/v1", tmp_path / "cp.sqlite")
    assert code == 4, out
    assert line(out, "api connects").startswith("problem") and f"http://127.0.0.1:{port}/v1" in out
    assert "fix:" in out and threaded_sandbox.state.total_requests == 0


def test_misbound_ledger_exits_2(tmp_path: Path, threaded_sandbox: RunningSandbox) -> None:
    checkpoint = tmp_path / "cp.sqlite"

    async def other_partners() -> None:
        store = await SqliteStore.open(
            checkpoint, Binding(partner_id="999", endpoint="http://127.0.0.1:1"), writable=True
        )
        await store.close()

    asyncio.run(other_partners())
    manifest = write_manifest(tmp_path, simple_rows(3))
    code, out = check(manifest, threaded_sandbox.base_url, checkpoint)
    assert code == 2, out
    assert line(out, "ledger").startswith("problem") and "belongs to partner '999'" in out
    assert threaded_sandbox.state.total_requests == 0


def test_unwritable_ledger_folder_exits_2(tmp_path: Path, threaded_sandbox: RunningSandbox) -> None:
    (tmp_path / "not-a-folder").write_text("")
    manifest = write_manifest(tmp_path, simple_rows(3))
    code, out = check(manifest, threaded_sandbox.base_url, tmp_path / "not-a-folder" / "cp.sqlite")
    assert code == 2 and "is not a folder" in line(out, "ledger"), out


def test_missing_image_fails_the_images_check_with_its_reason(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(5))
    (tmp_path / "images" / "user_0002.png").unlink()
    code, out = check(manifest, threaded_sandbox.base_url, tmp_path / "cp.sqlite")
    assert code == 2, out
    images = line(out, "images")
    assert images.startswith("problem") and "user_0002" in images and "image_missing" in images
    assert threaded_sandbox.state.total_requests == 0


@pytest.fixture
def untrusted_https(threaded_sandboxes: ThreadedSandboxes) -> Iterator[tuple[str, RunningSandbox]]:
    """The sandbox's own app over HTTPS, with a certificate from a CA this machine doesn't trust."""
    authority = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(context)
    app = make_app(PARTNER_ID, API_KEY)
    runner = web.AppRunner(app)

    async def start() -> int:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
        return int(runner.addresses[0][1])

    port = asyncio.run_coroutine_threadsafe(start(), threaded_sandboxes.loop).result(10)
    server = RunningSandbox(f"https://127.0.0.1:{port}/v1", app, runner)
    threaded_sandboxes.running.append(server)
    yield server.base_url, server


def test_untrusted_tls_certificate_exits_4(
    tmp_path: Path, untrusted_https: tuple[str, RunningSandbox]
) -> None:
    base_url, server = untrusted_https
    manifest = write_manifest(tmp_path, simple_rows(3))
    code, out = check(manifest, base_url, tmp_path / "cp.sqlite")
    assert code == 4, out
    tls = line(out, "api tls")
    assert tls.startswith("problem") and "certificate" in tls.lower() and base_url in tls
    assert server.state.total_requests == 0


def test_exit_code_is_the_gravest_failure() -> None:
    ok = Check(name="a", ok=True, detail="")
    local = Check(name="b", ok=False, detail="", severity=ExitCode.LOCAL)
    systemic = Check(name="c", ok=False, detail="", severity=ExitCode.SYSTEMIC)
    assert exit_code([ok]) == 0 and exit_code([ok, local]) == 2 and exit_code([local, systemic]) == 4

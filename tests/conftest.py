"""Shared fixtures: a real sandbox server on an OS-assigned port, manifests with real image files."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import zlib
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from backfill.cli import main
from backfill.compose import retry_policy
from backfill.config import Settings, load_settings
from backfill.images.local import LocalImageSource
from backfill.manifest import Manifest, ManifestRules, Reject, open_manifest
from backfill.run import plan
from backfill.run.policy import RetryPolicy
from backfill.sandbox import RunningSandbox, start_sandbox

PARTNER_ID = "085"
API_KEY = "test-api-key"

# The tool honours the proxy variables as curl does: a developer's or a CI runner's proxy would otherwise carry
# every test's requests for 127.0.0.1. Tests that want a proxy set one themselves (tests/test_proxy_tls.py).
for _variable in [name for name in os.environ if name.lower() in {"http_proxy", "https_proxy", "all_proxy"}]:
    del os.environ[_variable]


def default_retry_policy() -> RetryPolicy:
    """The policy a run gets from the settings' defaults, built as compose.py builds it."""
    return retry_policy(Settings())


def png_bytes(seed: int, size: int = 8) -> bytes:
    """A real, decodable PNG whose pixels depend on `seed`, so every user's photo differs."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + bytes((seed + x + y) % 256 for x in range(size * 3)) for y in range(size))
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    # Seeds 256 apart make the same pixels: a text chunk tells their photos apart (one photo named by several
    # user_ids is rejected as shared_photo). Seeds below 256 keep the bytes they always had.
    text = chunk(b"tEXt", b"seed\x00" + str(seed).encode()) if not 0 <= seed < 256 else b""
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + text
        + chunk(b"IEND", b"")
    )


def write_manifest(
    folder: Path, rows: list[tuple[str, str, str]], *, images: bool = True, first_seed: int = 0
) -> Path:
    """A manifest of (user_id, user_created_at, image file name); images are created unless told not to, row i's
    as png_bytes(first_seed + i). Two manifests written with the same first_seed name the same photos: for other
    users in one ledger, give the second another (a photo shared by two IDs is rejected as shared_photo)."""
    (folder / "images").mkdir(exist_ok=True)
    path = folder / "manifest.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["user_id", "user_created_at", "image_path"])
        for i, (user_id, created, image) in enumerate(rows):
            writer.writerow([user_id, created, f"images/{image}"])
            if images and not (folder / "images" / image).exists():
                (folder / "images" / image).write_bytes(png_bytes(first_seed + i))
    return path


def simple_rows(n: int, prefix: str = "user_") -> list[tuple[str, str, str]]:
    return [(f"{prefix}{i:04d}", "2021-08-12", f"{prefix}{i:04d}.png") for i in range(n)]


@pytest.fixture
async def sandbox() -> AsyncIterator[RunningSandbox]:
    server = await start_sandbox(PARTNER_ID, API_KEY)
    yield server
    await server.stop()


# --- the CLI as a user meets it (CliRunner, in this process) --------------------------------------------------

CREDENTIALS = {"SMILE_PARTNER_ID": PARTNER_ID, "SMILE_API_KEY": API_KEY}


def cli(*args: str, env: Mapping[str, str | None] | None = None) -> tuple[int, str, str]:
    """`backfill ARGS` with the test credentials (a None in `env` unsets a variable): exit code, stdout, stderr."""
    result = CliRunner().invoke(main, list(args), env={**CREDENTIALS, **(env or {})}, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def sandbox_ledger(tmp_path: Path, server: RunningSandbox) -> list[str]:
    """The flags that name the test's sandbox and a ledger of its own."""
    return ["--env", "local", "--base-url", server.base_url, "--checkpoint", str(tmp_path / "cp.sqlite")]


def enrolled(tmp_path: Path, server: RunningSandbox, rows: int = 2) -> list[str]:
    """`rows` rows run through the sandbox into tmp_path/out, every one enrolled: the flags that name the ledger."""
    manifest = write_manifest(tmp_path, simple_rows(rows))
    where = sandbox_ledger(tmp_path, server)
    code, _, err = cli("run", str(manifest), *where, "--out", str(tmp_path / "out"), "--no-progress")
    assert code == 0, err
    return where


def shown(out: str) -> dict[str, str]:
    """`config show`'s table as {setting: its whole line}."""
    return {line.split()[0]: line for line in out.splitlines()[2:]}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", 0))
        return int(probe.getsockname()[1])


MAPPED = "user_id=customer_ref,user_created_at=signup,image_path=selfie"
RENAMED = tuple(arg for pair in MAPPED.split(",") for arg in ("--column", pair))


def european_export(folder: Path, rows: int = 3) -> Path:
    """A spreadsheet's export as many European installs write it: semicolons, Windows-1252, its own headers,
    and photo names with accents (so only the right encoding finds the files)."""
    (folder / "images").mkdir(exist_ok=True)
    lines = ["customer_ref;signup;selfie"]
    for i in range(rows):
        name = f"josé_{i}.png"
        (folder / "images" / name).write_bytes(png_bytes(i))
        lines.append(f"user_{i:04d};2021-08-12;images/{name}")
    path = folder / "export.csv"
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode("cp1252"))
    return path


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    def make(server: RunningSandbox | None = None, *, key: str = API_KEY, **flags: Any) -> Settings:
        defaults: dict[str, Any] = {
            "env": "local",
            "ledger": tmp_path / "checkpoint.sqlite",
            "out": tmp_path / "out",
            "rate": 1000,
            "concurrency": 4,
            "backoff_initial": 0.001,
            "backoff_max": 0.01,
            "timeout": 5,
        }
        if server is not None:
            defaults["base_url"] = server.base_url
        environ = {"SMILE_PARTNER_ID": PARTNER_ID, "SMILE_API_KEY": key}
        return load_settings(None, environ, {**defaults, **flags})

    return make


class Sleeps:
    """An injected sleep: records what the tool asked to wait, waits not at all."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


class ThreadedSandboxes:
    """Sandboxes on their own loop in a thread, for code that runs its own event loop (the CLI)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.running: list[RunningSandbox] = []

    def start(self, **kwargs: Any) -> RunningSandbox:
        future = asyncio.run_coroutine_threadsafe(start_sandbox(PARTNER_ID, API_KEY, **kwargs), self.loop)
        server = future.result(10)
        self.running.append(server)
        return server

    def close(self) -> None:
        for server in self.running:
            asyncio.run_coroutine_threadsafe(server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def threaded_sandboxes() -> Iterator[ThreadedSandboxes]:
    sandboxes = ThreadedSandboxes()
    yield sandboxes
    sandboxes.close()


@pytest.fixture
def threaded_sandbox(threaded_sandboxes: ThreadedSandboxes) -> RunningSandbox:
    return threaded_sandboxes.start()


# --- validation as `backfill validate` does it: the manifest's text rules, then the image checks ---


@dataclass(frozen=True, slots=True, kw_only=True)
class Valid:
    """A row that passed every rule, as the tests look at it."""

    line: int
    user_id: str
    user_created_at: str
    image_path: Path
    image_size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class FullBatch:
    rows: list[Valid]
    rejects: list[Reject]


def full_batches(manifest: Manifest) -> list[FullBatch]:
    """Every batch of `manifest` with its image checks done, through the same plan stage a run uses."""
    rules = manifest._rules
    images = LocalImageSource(
        base=Path(manifest.name).parent, root=rules.images_root, max_bytes=rules.max_image_bytes
    )

    async def go() -> list[FullBatch]:
        out = []
        for batch in manifest.batches():
            rows, rejects = [], list(batch.rejects)
            for d in await plan.decide(batch.candidates, {}, images):
                if isinstance(d, plan.ToSend):
                    rows.append(
                        Valid(
                            line=d.line,
                            user_id=d.user_id,
                            user_created_at=d.user_created_at,
                            image_path=Path(d.fingerprint.ref),
                            image_size=d.fingerprint.size,
                        )
                    )
                else:
                    assert d.reason is not None
                    rejects.append(Reject(line=d.line, user_id=d.user_id, reason=d.reason, message=d.message))
            out.append(FullBatch(rows=rows, rejects=sorted(rejects, key=lambda r: r.line)))
        await images.close()
        return out

    return asyncio.run(go())


def validate_manifest(path: Path, rules: ManifestRules) -> tuple[int, list[Reject]]:
    batches = full_batches(open_manifest(path, rules))
    return sum(len(b.rows) for b in batches), [r for b in batches for r in b.rejects]


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Any]:
    """A throwaway PostgreSQL cluster (tests/pg_server.py), shared by the session; skipped where absent."""
    from .pg_server import shared_cluster

    cluster = shared_cluster()
    if cluster is None:
        pytest.skip("no PostgreSQL binaries on this machine (Debian: apt-get install postgresql)")
    yield cluster


@pytest.fixture
def pg_url(pg_cluster: Any) -> str:
    """An empty database of its own for each test."""
    from .pg_server import fresh_database

    return fresh_database()


def spawn_sandbox(options: Sequence[str], env: Mapping[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    """`backfill sandbox --port 0 OPTIONS` as a process of its own: the process, and the API root it printed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "backfill", "sandbox", "--port", "0", *options],
        env=dict(env),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline().decode()
    found = re.search(r"(http://127\.0\.0\.1:\d+/v1)", line)
    assert found, f"the sandbox did not start: {line!r}"
    return proc, found.group(1)


def request_log(path: Path) -> list[dict[str, Any]]:
    """The sandbox's --request-log: one record per arrival (with its time `t`) and per answer."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

"""Shared fixtures: a real sandbox server on an OS-assigned port, manifests with real image files."""

from __future__ import annotations

import asyncio
import csv
import struct
import threading
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from backfill.config import Settings, load_settings
from backfill.sandbox import RunningSandbox, start_sandbox

PARTNER_ID = "085"
API_KEY = "test-api-key"


def png_bytes(seed: int, size: int = 8) -> bytes:
    """A real, decodable PNG whose pixels depend on `seed`, so every user's photo differs."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + bytes((seed + x + y) % 256 for x in range(size * 3)) for y in range(size))
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def write_manifest(folder: Path, rows: list[tuple[str, str, str]], *, images: bool = True) -> Path:
    """A manifest of (user_id, user_created_at, image file name); images are created unless told not to."""
    (folder / "images").mkdir(exist_ok=True)
    path = folder / "manifest.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["user_id", "user_created_at", "image_path"])
        for i, (user_id, created, image) in enumerate(rows):
            writer.writerow([user_id, created, f"images/{image}"])
            if images and not (folder / "images" / image).exists():
                (folder / "images" / image).write_bytes(png_bytes(i))
    return path


def simple_rows(n: int, prefix: str = "user_") -> list[tuple[str, str, str]]:
    return [(f"{prefix}{i:04d}", "2021-08-12", f"{prefix}{i:04d}.png") for i in range(n)]


@pytest.fixture
async def sandbox() -> AsyncIterator[RunningSandbox]:
    server = await start_sandbox(PARTNER_ID, API_KEY)
    yield server
    await server.stop()


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    def make(server: RunningSandbox | None = None, *, key: str = API_KEY, **flags: Any) -> Settings:
        defaults: dict[str, Any] = {
            "env": "local",
            "checkpoint": tmp_path / "checkpoint.sqlite",
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

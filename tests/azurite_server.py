"""A real Azure Blob server for tests: Azurite (npm's `azurite`), in memory on an OS-assigned port, behind a
recording proxy (tests/storage_proxy.py) that the tool is pointed at.

The tool reaches it as a partner would reach Azurite: AZURE_STORAGE_USE_EMULATOR=true, with
AZURITE_BLOB_STORAGE_URL naming where it listens (both read by obstore itself), and Azurite's well-known
development account. `.ci/run` installs Azurite with npm (into CI_INSTALL) and names it in $AZURITE_BLOB; under CI
(REQUIRE_STORAGE_TESTS or CI set) a missing one fails the tests instead of skipping them.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import os
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import obstore
from obstore.store import AzureStore

from .storage_proxy import RecordingProxy

ACCOUNT = "devstoreaccount1"
# Azurite's published development key (the same in every install): not a secret.
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
_LISTENING = re.compile(rb"listens on (http://127\.0\.0\.1:\d+)")


# Where .ci/run installs it (keep the version the same in both).
CI_INSTALL = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "backfill-ci" / "azurite-3.37.0"
)


def binary() -> Path | None:
    """$AZURITE_BLOB, `azurite-blob` on PATH, or the one .ci/run installed on this machine."""
    named = os.environ.get("AZURITE_BLOB") or shutil.which("azurite-blob")
    found = Path(named) if named else CI_INSTALL / "node_modules" / ".bin" / "azurite-blob"
    return found if found.exists() else None


def _bucket_of(path: str) -> str:
    parts = path.split("/")
    return parts[2] if len(parts) > 2 and parts[1] == ACCOUNT else ""


def _is_listing(path: str, query: str) -> bool:
    return path.count("/") == 2 and "comp=list" in query


class AzuriteServer:
    """Azurite's blob service and its proxy; `env` is what a run needs to reach it."""

    scheme = "az"

    def __init__(self, process: subprocess.Popen[bytes], upstream: str) -> None:
        self.process, self.upstream = process, upstream
        self.proxy = RecordingProxy(upstream, _bucket_of, _is_listing)
        self.env = {"AZURE_STORAGE_USE_EMULATOR": "true", "AZURITE_BLOB_STORAGE_URL": self.proxy.url}
        self._writers: dict[str, AzureStore] = {}

    @classmethod
    def start(cls) -> AzuriteServer:
        found = binary()
        if found is None:
            raise FileNotFoundError("no azurite-blob (npm install azurite)")
        process = subprocess.Popen(
            [
                str(found),
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                "0",
                "--inMemoryPersistence",
                "--silent",
                "--loose",
                "--skipApiVersionCheck",
                "--disableProductStyleUrl",
                "--disableTelemetry",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert process.stdout is not None
        for line in process.stdout:  # it says where it listens once it does
            found_url = _LISTENING.search(line)
            if found_url:
                return cls(process, found_url.group(1).decode().removeprefix("http://"))
        process.wait()
        raise RuntimeError("Azurite did not start")

    def stop(self) -> None:
        self.proxy.stop()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()

    def _signed(self, method: str, container: str, query: dict[str, str]) -> None:
        """A request of the account's REST API signed with its shared key (for what obstore can't do)."""
        headers = {"x-ms-date": email.utils.formatdate(usegmt=True), "x-ms-version": "2021-08-06"}
        canonical = "".join(f"{k}:{v}\n" for k, v in sorted(headers.items()))
        resource = f"/{ACCOUNT}/{ACCOUNT}/{container}" + "".join(
            f"\n{k}:{v}" for k, v in sorted(query.items())
        )
        to_sign = (
            method + "\n" * 12 + canonical + resource
        )  # the 11 standard headers all empty (0 length too)
        signature = hmac.new(base64.b64decode(KEY), to_sign.encode(), hashlib.sha256).digest()
        headers["Authorization"] = f"SharedKey {ACCOUNT}:{base64.b64encode(signature).decode()}"
        if method == "PUT":
            headers["Content-Length"] = "0"
        url = f"http://{self.upstream}/{ACCOUNT}/{container}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(urllib.request.Request(url, method=method, headers=headers), timeout=30):
            pass

    def _writer(self, container: str) -> AzureStore:
        if container not in self._writers:
            self._writers[container] = AzureStore(
                container,
                account_name=ACCOUNT,
                account_key=KEY,
                endpoint=f"http://{self.upstream}/{ACCOUNT}",
                client_options={"allow_http": True},
            )
        return self._writers[container]

    def create_bucket(self, bucket: str) -> None:
        self._signed("PUT", bucket, {"restype": "container"})

    def put(self, bucket: str, key: str, data: bytes) -> None:
        obstore.put(self._writer(bucket), key, data)

    def delete(self, bucket: str, key: str) -> None:
        obstore.delete(self._writer(bucket), key)

    def delete_bucket(self, bucket: str) -> None:
        self._signed("DELETE", bucket, {"restype": "container"})

    # --- the request log ---

    def requests(self) -> list[dict[str, Any]]:
        return self.proxy.requests()

    def reset(self) -> None:
        self.proxy.reset()

    def faults(self, **faults: Any) -> None:
        self.proxy.faults(**faults)

    def photo_gets(self, log: list[dict[str, Any]], bucket: str) -> list[str]:
        """The keys of `bucket` read by GET (not its listings), in a request log."""
        prefix = f"/{ACCOUNT}/{bucket}/"
        return [
            r["path"][len(prefix) :] for r in log if r["method"] == "GET" and r["path"].startswith(prefix)
        ]

    def lists(self, log: list[dict[str, Any]], bucket: str) -> list[dict[str, Any]]:
        return [
            r
            for r in log
            if r["method"] == "GET" and _is_listing(r["path"], r["query"]) and _bucket_of(r["path"]) == bucket
        ]

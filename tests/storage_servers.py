"""Every object store the tool reads, as a real server for tests, behind one interface: S3 (moto), GCS
(fake-gcs-server) and Azure Blob (Azurite), each started once a test session, on first use.

A test parametrized over SCHEMES runs on each. A server whose program isn't installed skips its tests locally
and fails them under CI (REQUIRE_STORAGE_TESTS or CI set: `.ci/run` installs every one), as PostgreSQL's do.
"""

from __future__ import annotations

import atexit
import os
from typing import Any, Protocol

import obstore
import pytest
from obstore.store import S3Store

from . import azurite_server, gcs_server
from .s3_server import ACCESS_KEY, REGION, SECRET_KEY, S3Server

SCHEMES = ("s3", "gs", "az")


class StorageServer(Protocol):
    """What a test needs of a storage server: how a run reaches it, buckets and objects, and its request log."""

    scheme: str
    env: dict[str, str]

    def create_bucket(self, bucket: str) -> None: ...
    def put(self, bucket: str, key: str, data: bytes) -> None: ...
    def delete(self, bucket: str, key: str) -> None: ...
    def delete_bucket(self, bucket: str) -> None: ...
    def requests(self) -> list[dict[str, Any]]: ...
    def reset(self) -> None: ...
    def faults(self, **faults: Any) -> None: ...
    def photo_gets(self, log: list[dict[str, Any]], bucket: str) -> list[str]: ...
    def lists(self, log: list[dict[str, Any]], bucket: str) -> list[dict[str, Any]]: ...
    def stop(self) -> None: ...


class S3(S3Server):
    """moto's S3 server under the common interface."""

    scheme = "s3"

    def _writer(self, bucket: str) -> S3Store:
        return _S3_WRITERS.get(bucket) or _S3_WRITERS.setdefault(bucket, self._new_writer(bucket))

    def _new_writer(self, bucket: str) -> S3Store:
        return S3Store(
            bucket,
            endpoint=self.url,
            access_key_id=ACCESS_KEY,
            secret_access_key=SECRET_KEY,
            region=REGION,
            client_options={"allow_http": True},
        )

    def create_bucket(self, bucket: str) -> None:
        self.client().create_bucket(Bucket=bucket)

    def put(self, bucket: str, key: str, data: bytes) -> None:
        obstore.put(self._writer(bucket), key, data)

    def delete(self, bucket: str, key: str) -> None:
        obstore.delete(self._writer(bucket), key)

    def delete_bucket(self, bucket: str) -> None:
        self.client().delete_bucket(Bucket=bucket)

    def photo_gets(self, log: list[dict[str, Any]], bucket: str) -> list[str]:
        prefix = f"/{bucket}/"
        return [
            r["path"][len(prefix) :] for r in log if r["method"] == "GET" and r["path"].startswith(prefix)
        ]

    def lists(self, log: list[dict[str, Any]], bucket: str) -> list[dict[str, Any]]:
        return [r for r in log if r["method"] == "GET" and r["path"] == f"/{bucket}"]


_S3_WRITERS: dict[str, S3Store] = {}  # one connection pool a bucket
_started: dict[str, StorageServer] = {}


def required() -> bool:
    return bool(os.environ.get("REQUIRE_STORAGE_TESTS") or os.environ.get("CI"))


def server(scheme: str) -> StorageServer:
    """The session's server for `scheme`, started on first use; skips the test when its program is missing
    (fails it under CI)."""
    if scheme not in _started:
        missing = {"gs": gcs_server.binary, "az": azurite_server.binary}.get(scheme)
        if missing is not None and missing() is None:
            what = {"gs": "fake-gcs-server", "az": "Azurite"}[scheme]
            if required():
                raise RuntimeError(f"CI: {what} is missing; .ci/run should have installed it")
            pytest.skip(f"{what} is not installed (.ci/run installs it)")
        made: StorageServer
        if scheme == "s3":
            made = S3.start()  # type: ignore[assignment]
        elif scheme == "gs":
            made = gcs_server.GCSServer.start()
        else:
            made = azurite_server.AzuriteServer.start()
        _started[scheme] = made
        atexit.register(made.stop)
    return _started[scheme]

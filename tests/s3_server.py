"""A real S3 server for tests: moto's, in its own process on a free port, with a request log and faults to inject.

Run as `python -m tests.s3_server PORT`; tests use `S3Server.start()`. Control requests (never logged):
`GET /_test/requests` (every request so far: method, path, query, range), `POST /_test/reset`, and
`POST /_test/faults` with JSON `{"deny": [bucket, ...], "deny_list": [bucket, ...], "fail": N, "status": 503,
"method": "GET"}`: answer 403 AccessDenied for a bucket, 403 to its listings only, or `status` to the next N
requests (of `method`, if given).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ACCESS_KEY = "AKIATESTBACKFILL0001"
SECRET_KEY = "s3cr3t-backfill-test-key/Zq9XvR2mW7"  # registered with the scrubber: must never be written out
REGION = "us-east-1"

_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>'
)
_STATUS_TEXT = {403: "Forbidden", 500: "Internal Server Error", 503: "Service Unavailable"}


def serve(port: int) -> None:
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    moto = DomainDispatcherApplication(create_backend_app)
    lock = threading.Lock()
    log: list[dict[str, Any]] = []
    faults: dict[str, Any] = {}

    def answer(start_response: Callable[..., Any], status: int, code: str, message: str) -> list[bytes]:
        body = _XML.format(code=code, message=message).encode()
        start_response(
            f"{status} {_STATUS_TEXT.get(status, 'Error')}",
            [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))],
        )
        return [body]

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        query = environ.get("QUERY_STRING", "")
        if path.startswith("/_test/"):
            with lock:
                if path == "/_test/requests":
                    body = json.dumps(log).encode()
                elif path == "/_test/reset":
                    log.clear()
                    body = b"{}"
                else:
                    size = int(environ.get("CONTENT_LENGTH") or 0)
                    faults.clear()
                    faults.update(json.loads(environ["wsgi.input"].read(size) or b"{}"))
                    body = b"{}"
            start_response(
                "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
            )
            return [body]
        # PATH_INFO is the raw path decoded as latin-1 (WSGI's rule); as UTF-8 it is the key that was asked for.
        shown = path.encode("latin-1").decode("utf-8", "replace")
        bucket = shown.lstrip("/").split("/", 1)[0]
        entry = {"method": method, "path": shown, "query": query, "range": environ.get("HTTP_RANGE")}
        with lock:
            log.append(entry)
            if bucket in faults.get("deny", ()):
                return answer(start_response, 403, "AccessDenied", "Access Denied")
            is_list = method == "GET" and "/" not in shown.lstrip("/")
            if is_list and bucket in faults.get("deny_list", ()):
                return answer(start_response, 403, "AccessDenied", "Access Denied")
            if faults.get("fail", 0) > 0 and faults.get("method") in (None, method):
                faults["fail"] -= 1
                status = int(faults.get("status", 503))
                return answer(
                    start_response, status, "SlowDown" if status == 503 else "InternalError", "Try again"
                )
        return moto(environ, start_response)  # type: ignore[no-any-return]

    server = make_server("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print("ready", flush=True)
    server.serve_forever()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class S3Server:
    """A moto S3 server subprocess; `env` is what a client needs to reach it (a plain-http endpoint)."""

    port: int
    process: subprocess.Popen[bytes]
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def start(cls) -> S3Server:
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.s3_server", str(port)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert process.stdout is not None
        if process.stdout.readline().strip() != b"ready":
            process.kill()
            raise RuntimeError("the moto S3 server did not start")
        env = {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_ALLOW_HTTP": "true",
            "AWS_VIRTUAL_HOSTED_STYLE_REQUEST": "false",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        return cls(port=port, process=process, env=env)

    def stop(self) -> None:
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _control(self, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method="GET" if data is None else "POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def requests(self) -> list[dict[str, Any]]:
        """Every request the server has had since the last reset, in arrival order."""
        log: list[dict[str, Any]] = self._control("/_test/requests")
        return log

    def reset(self) -> None:
        self._control("/_test/reset", {})

    def faults(self, **faults: Any) -> None:
        self._control("/_test/faults", faults)

    def client(self) -> Any:
        """A boto3 client of the server, for setting buckets and objects up (moto brings boto3)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )


def photo_gets(log: Iterable[dict[str, Any]], bucket: str) -> list[dict[str, Any]]:
    """The GETs of objects in `bucket` (not its listings) in a request log."""
    return [r for r in log if r["method"] == "GET" and r["path"].startswith(f"/{bucket}/")]


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.02)


if __name__ == "__main__":
    serve(int(sys.argv[1]))

"""A recording proxy in front of a storage emulator: the request log and faults tests/s3_server.py has for moto.

The emulators (fake-gcs-server, Azurite) are other programs with no request log of their own to read, so the
tool is pointed at this proxy instead, in a thread of the test process on a free port. Its control API is the
S3 server's: `requests()`, `reset()`, and `faults(deny=[bucket, ...], deny_list=[bucket, ...], fail=N,
status=503, method="GET")`, which answers 403 to every request of a bucket, 403 to its listings only, or `status`
to the next N requests (of `method`, if given).
"""

from __future__ import annotations

import http.client
import threading
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade", "te", "host"}
)
_TEXT = {403: "Forbidden", 500: "Internal Server Error", 503: "Service Unavailable"}


class RecordingProxy:
    """Forwards every request to `upstream` (host:port), logging method, path (decoded), query and range.

    `bucket_of(path)` names the bucket a request is about and `is_listing(path, query)` tells a listing (each
    emulator lays its paths out its own way), for the faults.
    """

    def __init__(
        self, upstream: str, bucket_of: Callable[[str], str], is_listing: Callable[[str, str], bool]
    ) -> None:
        self.upstream, self.bucket_of, self.is_listing = upstream, bucket_of, is_listing
        self.lock = threading.Lock()
        self.log: list[dict[str, Any]] = []
        self.injected: dict[str, Any] = {}
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a client's pool expects

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _any(self) -> None:
                proxy.handle(self)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def requests(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.log)

    def reset(self) -> None:
        with self.lock:
            self.log.clear()

    def faults(self, **faults: Any) -> None:
        with self.lock:
            self.injected = dict(faults)

    def _fault(self, method: str, path: str, query: str) -> int | None:
        bucket = self.bucket_of(path)
        with self.lock:
            if bucket in self.injected.get("deny", ()):
                return 403
            listing = method == "GET" and self.is_listing(path, query)
            if listing and bucket in self.injected.get("deny_list", ()):
                return 403
            if self.injected.get("fail", 0) > 0 and self.injected.get("method") in (None, method):
                self.injected["fail"] -= 1
                return int(self.injected.get("status", 503))
        return None

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        method = request.command
        raw_path, _, query = request.path.partition("?")
        path = urllib.parse.unquote(raw_path)
        size = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(size) if size else b""
        with self.lock:
            self.log.append(
                {"method": method, "path": path, "query": query, "range": request.headers["Range"]}
            )
        status = self._fault(method, path, query)
        if status is not None:
            text = _TEXT.get(status, "Error")
            data = f"<?xml version='1.0'?><Error><Code>{text.replace(' ', '')}</Code></Error>".encode()
            request.send_response(status, text)
            request.send_header("Content-Type", "application/xml")
            request.send_header("Content-Length", str(len(data)))
            request.end_headers()
            request.wfile.write(data)
            return
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        headers["Host"] = self.upstream  # fake-gcs-server serves objects by path only on its own host name
        connection = http.client.HTTPConnection(self.upstream, timeout=60)
        try:
            connection.request(method, request.path, body=body or None, headers=headers)
            answer = connection.getresponse()
            data = answer.read()
            request.send_response(answer.status, answer.reason)
            for name, value in answer.getheaders():
                if name.lower() not in _HOP | {"content-length"}:
                    request.send_header(name, value)
            length = answer.getheader("Content-Length") if method == "HEAD" else str(len(data))
            if length is not None:
                request.send_header("Content-Length", length)
            request.end_headers()
            if method != "HEAD":
                request.wfile.write(data)
        finally:
            connection.close()

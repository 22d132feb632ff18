"""Servers in their own processes: a minimal fast API double and the sandbox wrapped to log every request.

Run as `python -m benchmarks.servers fast|sandbox CONFIG_JSON`: prints `PORT n`, serves until SIGTERM.
Each runs in a separate process so that its CPU is never counted as the client's, and it answers
`GET /v1/_bench/stats` with its request count, its own CPU time and, when asked, every POST's arrival
time and status (server-side timestamps are the only trustworthy measure of a client's request rate).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from array import array
from pathlib import Path
from types import TracebackType
from typing import Any

from backfill.api.signing import sign

PARTNER_ID = "085"
API_KEY = "bench-api-key"
ROOT = Path(__file__).resolve().parent.parent
STATS_PATH = "/v1/_bench/stats"

_ACTIONS = {
    "Human_Review_Compare": "Not Applicable",
    "Human_Review_Liveness_Check": "Not Applicable",
    "Human_Review_Selfie_Check": "Not Applicable",
    "Human_Review_Update_Selfie": "Not Applicable",
    "Liveness_Check": "Not Applicable",
    "Register_Selfie": "Approved",
    "Return_Personal_Info": "Not Applicable",
    "Selfie_Check": "Passed",
    "Selfie_Provided": "Passed",
    "Selfie_To_ID_Authority_Compare": "Not Applicable",
    "Selfie_To_ID_Card_Compare": "Not Applicable",
    "Selfie_To_Registered_Selfie_Compare": "Not Applicable",
    "Update_Registered_Selfie_On_File": "Not Applicable",
    "Verify_ID_Number": "Not Applicable",
}


def _success_template() -> list[bytes]:
    """The documented success body split around its four variable parts (uid, created, timestamp, sig)."""
    body = {
        "Actions": _ACTIONS,
        "ConfidenceValue": "99",
        "PartnerParams": {
            "job_type": 4,
            "user_id": "\x01",
            "job_id": "d9821b53-ada3-411c-8c5c-d6ea2a95915c",
            "user_created_at": "\x02",
        },
        "ResultCode": "0840",
        "ResultText": "Enroll User",
        "Source": "Rest API",
        "SmileJobID": "0000021007",
        "signature": "\x04",
        "timestamp": "\x03",
    }
    text = json.dumps(body, separators=(",", ":"))
    for marker in ("\\u0001", "\\u0002", "\\u0003", "\\u0004"):
        text = text.replace(marker, "\x00")
    return [part.encode() for part in text.split("\x00")]


class _Stamp:
    """A response timestamp and its signature, recomputed at most once per millisecond."""

    def __init__(self) -> None:
        self._ms = -1
        self._pair = (b"", b"")

    def now(self) -> tuple[bytes, bytes]:
        ms = int(time.time() * 1000)
        if ms != self._ms:
            self._ms = ms
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"
            self._pair = (stamp.encode(), sign(stamp, PARTNER_ID, API_KEY).encode())
        return self._pair


def _field(body: bytes | bytearray, name: bytes) -> bytes:
    """A string field's raw value from a compact JSON body; ids and dates need no unescaping."""
    start = body.find(b'"' + name + b'":"')
    if start < 0:
        return b""
    start += len(name) + 4
    return bytes(body[start : body.find(b'"', start)])


class FastServer:
    """HTTP/1.1 keep-alive on a bare asyncio Protocol: parse, echo user_id in a signed success, no more."""

    def __init__(self, record: bool) -> None:
        self.requests = 0
        self.record = record
        self.times = array("d")
        self.template = _success_template()
        self.stamp = _Stamp()

    def answer(self, head: bytes, body: bytes | bytearray) -> bytes:
        if head.startswith(b"GET"):
            stats = self.stats()
            return _response(b"200 OK", json.dumps(stats).encode())
        self.requests += 1
        if self.record:
            self.times.append(time.time())
        uid, created = _field(body, b"user_id"), _field(body, b"user_created_at")
        stamp, signature = self.stamp.now()
        t = self.template
        payload = b"".join((t[0], uid, t[1], created, t[2], signature, t[3], stamp, t[4]))
        return _response(b"200 OK", payload)

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "cpu_s": time.process_time(),
            "times": self.times.tolist(),
            "statuses": [200] * len(self.times),
        }


def _response(status: bytes, payload: bytes) -> bytes:
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(payload)).encode()
        + b"\r\n\r\n"
        + payload
    )


class _Connection(asyncio.Protocol):
    def __init__(self, server: FastServer) -> None:
        self.server = server
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.head_end = 0
        self.need = -1  # bytes the current request needs in the buffer, once its head is parsed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while True:
            if self.need < 0:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(buffer[:end]).lower()
                at = head.find(b"content-length:")
                stop = head.find(b"\r\n", at)
                length = int(head[at + 15 : stop if stop >= 0 else None]) if at >= 0 else 0
                self.head_end = end + 4
                self.need = self.head_end + length
            if len(buffer) < self.need:
                return
            head = bytes(buffer[: self.head_end])
            body = buffer[self.head_end : self.need]
            del buffer[: self.need]
            self.need = -1
            assert self.transport is not None
            self.transport.write(self.server.answer(head, body))


async def _serve_fast(config: dict[str, Any]) -> None:
    server = FastServer(bool(config.get("record")))
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(lambda: _Connection(server), "127.0.0.1", 0, backlog=1024)
    await _announce_and_wait(listener.sockets[0].getsockname()[1])
    listener.close()


async def _serve_sandbox(config: dict[str, Any]) -> None:
    from aiohttp import web

    from backfill.sandbox import Faults, make_app

    faults = config.get("faults", {})
    script = {uid: tuple(steps) for uid, steps in faults.pop("script", {}).items()}
    app = make_app(PARTNER_ID, API_KEY, faults=Faults(**faults, script=script), seed=config.get("seed", 0))
    times = array("d")
    statuses = array("i")

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        arrived = time.time()  # on arrival of the head: when the client sent it, give or take loopback
        response: web.StreamResponse = await handler(request)
        if request.method == "POST":
            times.append(arrived)
            statuses.append(response.status)
        return response

    async def stats(request: web.Request) -> web.Response:
        body = {
            "requests": len(times),
            "cpu_s": time.process_time(),
            "times": times.tolist(),
            "statuses": statuses.tolist(),
        }
        return web.json_response(body)

    app.middlewares.append(record)
    app.router.add_get(STATS_PATH, stats)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    await _announce_and_wait(runner.addresses[0][1])
    await runner.cleanup()


async def _announce_and_wait(port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"PORT {port}", flush=True)
    await stop.wait()


class ServerProcess:
    """A server started in a child process; `base_url` is the API root, `stats()` its request log."""

    def __init__(self, kind: str, config: dict[str, Any] | None = None) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.servers", kind, json.dumps(config or {})],
            stdout=subprocess.PIPE,
            cwd=ROOT,
            env=env,
            text=True,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line.startswith("PORT "):
            self._proc.kill()
            raise RuntimeError(f"the {kind} server did not start (printed {line!r})")
        self.port = int(line.split()[1])
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.pid = self._proc.pid

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{STATS_PATH}", timeout=60) as response:
            result: dict[str, Any] = json.load(response)
        return result

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: list[str]) -> None:
    kind, config = argv[0], json.loads(argv[1]) if len(argv) > 1 else {}
    serve = {"fast": _serve_fast, "sandbox": _serve_sandbox}[kind]
    asyncio.run(serve(config))


if __name__ == "__main__":
    main(sys.argv[1:])

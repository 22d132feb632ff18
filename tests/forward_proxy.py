"""A real forward proxy on 127.0.0.1 for tests: CONNECT tunnels for https, absolute-form requests for http.

It counts what it passes on, as a bank's egress proxy would log it, and can stand for the ways one refuses: a
password it wants (407), a destination it doesn't allow (403). Names in `hosts` resolve only here, as outside
names do only at a proxy on a network without outside DNS: a request for one arrived through the proxy or not at all.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

# Hop-by-hop headers: the proxy's own business, never passed on (RFC 9110 7.6.1).
_HOP = frozenset({"proxy-authorization", "proxy-connection", "connection", "keep-alive"})


@dataclass
class ForwardProxy:
    """Serve with `start` on the running loop; `tunnels` and `forwarded` say what went through, in order."""

    user: str = ""
    password: str = ""  # with `user`: a request without these credentials gets a 407
    deny: bool = False  # every request gets a 403, as for a destination the proxy's policy forbids
    hosts: Mapping[str, str] = field(default_factory=dict)  # a name only this proxy resolves → an address
    tls: ssl.SSLContext | None = None  # given: an https:// proxy, the client's TLS ending here
    tunnels: list[str] = field(default_factory=list)  # CONNECT targets, host:port
    forwarded: list[str] = field(default_factory=list)  # absolute-form targets passed on
    refused: list[int] = field(default_factory=list)  # the status of each refusal
    port: int = 0
    _server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        """The proxy's URL as HTTPS_PROXY gives it, with its credentials when it wants some."""
        credentials = f"{self.user}:{self.password}@" if self.user else ""
        return f"{'https' if self.tls else 'http'}://{credentials}127.0.0.1:{self.port}"

    async def start(self) -> ForwardProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._one(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a client gone mid-request: nothing to pass on
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        request_line, *lines = head.split("\r\n")
        method, target, version = request_line.split(" ", 2)
        headers = [(k.strip(), v.strip()) for k, _, v in (x.partition(":") for x in lines if x)]
        given = next((v for k, v in headers if k.lower() == "proxy-authorization"), "")
        wanted = "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        if self.user and given != wanted:
            return await self._refuse(writer, 407, "Proxy Authentication Required")
        if self.deny:
            return await self._refuse(writer, 403, "Forbidden")
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(
                    self.hosts.get(host, host), int(port)
                )
            except OSError:
                return await self._refuse(writer, 502, "Bad Gateway")  # as a proxy says it found no way there
            self.tunnels.append(target)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await _pipe_both(reader, writer, upstream_reader, upstream_writer)
            return
        url = urlsplit(target)
        if not url.scheme or not url.hostname:
            return await self._refuse(writer, 400, "Bad Request")
        length = int(next((v for k, v in headers if k.lower() == "content-length"), "0"))
        body = await reader.readexactly(length)
        upstream_reader, upstream_writer = await asyncio.open_connection(
            self.hosts.get(url.hostname, url.hostname), url.port or 80
        )
        self.forwarded.append(target)
        path = url.path + (f"?{url.query}" if url.query else "")
        kept = "".join(f"{k}: {v}\r\n" for k, v in headers if k.lower() not in _HOP)
        # One request a connection each way: the count is then exactly the requests passed on.
        upstream_writer.write(
            f"{method} {path} {version}\r\n{kept}Connection: close\r\n\r\n".encode("latin-1") + body
        )
        await upstream_writer.drain()
        answer = (await upstream_reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status_line, *answer_lines = answer.split("\r\n")
        answer_kept = "".join(
            f"{x}\r\n" for x in answer_lines if x and x.partition(":")[0].lower() not in _HOP
        )
        writer.write(f"{status_line}\r\n{answer_kept}Connection: close\r\n\r\n".encode("latin-1"))
        while chunk := await upstream_reader.read(65536):
            writer.write(chunk)
            await writer.drain()
        upstream_writer.close()

    async def _refuse(self, writer: asyncio.StreamWriter, status: int, reason: str) -> None:
        self.refused.append(status)
        challenge = 'Proxy-Authenticate: Basic realm="test"\r\n' if status == 407 else ""
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\n{challenge}Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()


async def _pipe_both(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    upstream_reader: asyncio.StreamReader,
    upstream_writer: asyncio.StreamWriter,
) -> None:
    async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while chunk := await source.read(65536):
                sink.write(chunk)
                await sink.drain()
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.close()

    await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

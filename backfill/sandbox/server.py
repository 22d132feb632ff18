"""Serving the emulator on a real socket: in a running loop (start_sandbox), or until a signal (serve)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable
from typing import Unpack, overload

from aiohttp import web

from ..errors import ConfigError
from .app import WAKE_KEY, make_app
from .options import OptionKeywords, SandboxOptions, resolve_options
from .state import STATE_KEY


class RunningSandbox:
    """A sandbox serving on a real socket; `base_url` is the API root to give a client."""

    def __init__(self, base_url: str, app: web.Application, runner: web.AppRunner) -> None:
        self.base_url = base_url
        self.app = app
        self.state = app[STATE_KEY]
        self._runner = runner
        self._stopped = False

    def release_held(self) -> None:
        """Answer every held (slow) answer now, and every later one at once: a test that held a run on purpose
        lets it finish at the moment it chooses, not after a wait. Call it on the sandbox's own loop."""
        self.app[WAKE_KEY].set()

    async def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            await self._runner.cleanup()

    async def __aenter__(self) -> RunningSandbox:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


@overload
async def start_sandbox(
    *, options: SandboxOptions, host: str = "127.0.0.1", port: int = 0
) -> RunningSandbox: ...
@overload
async def start_sandbox(
    partner_id: str,
    api_key: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    **keywords: Unpack[OptionKeywords],
) -> RunningSandbox: ...
async def start_sandbox(
    partner_id: str | None = None,
    api_key: str | None = None,
    *,
    options: SandboxOptions | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    **keywords: Unpack[OptionKeywords],
) -> RunningSandbox:
    """Serve a new sandbox on host:port (0 = any free port) in the running loop.

    Takes `options=SandboxOptions(...)`, or the credentials and SandboxOptions' other fields as keywords.
    """
    app = make_app(options=resolve_options("start_sandbox", partner_id, api_key, options, keywords))
    # Held-open slow answers are woken on shutdown; the timeout only bounds a handler stuck elsewhere.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as error:
        await runner.cleanup()
        fix = "choose another port, or stop whatever is listening there"
        raise ConfigError(
            "port", f"{host}:{port}", f"can't listen ({error.strerror or error})", fix
        ) from error
    real_port = runner.addresses[0][1]
    shown_host = f"[{host}]" if ":" in host else host
    return RunningSandbox(f"http://{shown_host}:{real_port}/v1", app, runner)


@overload
def serve(
    *, options: SandboxOptions, host: str, port: int, ready: Callable[[str], None] | None = None
) -> None: ...
@overload
def serve(
    partner_id: str,
    api_key: str,
    *,
    host: str,
    port: int,
    ready: Callable[[str], None] | None = None,
    **keywords: Unpack[OptionKeywords],
) -> None: ...
def serve(
    partner_id: str | None = None,
    api_key: str | None = None,
    *,
    options: SandboxOptions | None = None,
    host: str,
    port: int,
    ready: Callable[[str], None] | None = None,
    **keywords: Unpack[OptionKeywords],
) -> None:
    """Serve until SIGINT or SIGTERM, then stop cleanly. Prints nothing; `ready` hears the base URL.

    Takes `options=SandboxOptions(...)`, or the credentials and SandboxOptions' other fields as keywords.
    """
    # Resolved before the loop starts, so bad options fail as a ConfigError and not inside asyncio.run.
    chosen = resolve_options("serve", partner_id, api_key, options, keywords)

    async def main() -> None:
        server = await start_sandbox(options=chosen, host=host, port=port)
        if ready is not None:
            ready(server.base_url)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        installed = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            # Not available on Windows: there Ctrl-C arrives as KeyboardInterrupt, which the CLI handles.
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, stop.set)
                installed.append(signum)
        try:
            await stop.wait()
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)
            await server.stop()

    asyncio.run(main())

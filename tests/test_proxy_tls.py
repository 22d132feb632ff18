"""Behind a bank's egress proxy, with its private CA: a real forward proxy and a real TLS server on 127.0.0.1.

The proxy (tests/forward_proxy.py) counts what it passes on; names it alone resolves prove a request came through
it. The TLS server is the sandbox's own app behind a certificate from a CA made here (trustme), which this
machine doesn't trust until told to.
"""

from __future__ import annotations

import asyncio
import csv
import ssl
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import trustme
from aiohttp import web
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from backfill.api import network
from backfill.api.client import Client
from backfill.cli import main
from backfill.errors import ConfigError
from backfill.redact import Secret
from backfill.sandbox import RunningSandbox, make_app
from backfill.vocab import Kind

from .conftest import API_KEY, PARTNER_ID, ThreadedSandboxes, png_bytes, simple_rows, write_manifest
from .forward_proxy import ForwardProxy

# A name nothing resolves but the proxy: a request for it that succeeds went through the proxy.
HIDDEN_HOST = "api.smile.test"
PASSWORD = "pr0xy-s3cret-pw"
# Every variable that could steer a run's route, cleared for each CLI call unless the test sets it.
ROUTE_VARIABLES = (
    *(f"{scheme}_proxy" for scheme in ("http", "https", "all", "no")),
    *(f"{scheme.upper()}_PROXY" for scheme in ("http", "https", "all", "no")),
    "SSL_CERT_FILE",
    "REQUEST_METHOD",
)


def cli(*args: str, env: Mapping[str, str] | None = None) -> tuple[int, str, str]:
    """The CLI in this process, with only the proxy and CA variables `env` gives (None unsets one)."""
    environ: dict[str, str | None] = {name: None for name in ROUTE_VARIABLES}
    environ |= {"SMILE_PARTNER_ID": PARTNER_ID, "SMILE_API_KEY": API_KEY, **(env or {})}
    result = CliRunner().invoke(main, list(args), env=environ, catch_exceptions=False)
    assert "Traceback" not in result.stdout + result.stderr
    return result.exit_code, result.stdout, result.stderr


def run(
    manifest: Path, base_url: str, tmp_path: Path, *more: str, env: Mapping[str, str] | None = None
) -> tuple[int, str, str]:
    return cli(
        "run",
        str(manifest),
        "--env",
        "local",
        "--base-url",
        base_url,
        "--ledger",
        str(tmp_path / "l.sqlite"),
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
        *more,
        env=env,
    )


def statuses(tmp_path: Path) -> dict[str, str]:
    """user_id → status in the newest run's results.csv."""
    newest = max((tmp_path / "out").glob("*/results.csv"), key=lambda p: p.parent.name)
    with newest.open(newline="") as handle:
        return {row["user_id"]: row["status"] for row in csv.DictReader(handle)}


def written(tmp_path: Path) -> str:
    """Everything the runs wrote: the run folders' files and the ledger, as text."""
    files = [p for p in tmp_path.rglob("*") if p.is_file() and "images" not in p.parts]
    return "\n".join(p.read_bytes().decode("utf-8", "replace") for p in files)


@pytest.fixture
def proxies(threaded_sandboxes: ThreadedSandboxes) -> Iterator[list[ForwardProxy]]:
    """Proxies started with `start(proxies, threaded_sandboxes, ...)`, stopped after the test."""
    started: list[ForwardProxy] = []
    yield started
    for proxy in started:
        asyncio.run_coroutine_threadsafe(proxy.stop(), threaded_sandboxes.loop).result(10)


def start(started: list[ForwardProxy], sandboxes: ThreadedSandboxes, proxy: ForwardProxy) -> ForwardProxy:
    asyncio.run_coroutine_threadsafe(proxy.start(), sandboxes.loop).result(10)
    started.append(proxy)
    return proxy


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_pem(tmp_path: Path, authority: trustme.CA) -> Path:
    path = tmp_path / "private-ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def tls_sandbox(threaded_sandboxes: ThreadedSandboxes, authority: trustme.CA) -> RunningSandbox:
    """The sandbox's app over HTTPS, its certificate (for HIDDEN_HOST and 127.0.0.1) from the private CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert(HIDDEN_HOST, "127.0.0.1").configure_cert(context)
    app = make_app(PARTNER_ID, API_KEY)
    runner = web.AppRunner(app, access_log=None)

    async def serve() -> int:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
        return int(runner.addresses[0][1])

    port = asyncio.run_coroutine_threadsafe(serve(), threaded_sandboxes.loop).result(10)
    server = RunningSandbox(f"https://127.0.0.1:{port}/v1", app, runner)
    threaded_sandboxes.running.append(server)
    return server


def hidden_url(server: RunningSandbox) -> str:
    """The TLS sandbox's URL under the name only the proxy resolves."""
    return server.base_url.replace("127.0.0.1", HIDDEN_HOST)


# --- through the proxy, or not ---------------------------------------------------------------------------


def test_an_http_api_is_reached_only_through_the_proxy_with_its_password_never_shown(
    tmp_path: Path,
    threaded_sandbox: RunningSandbox,
    threaded_sandboxes: ThreadedSandboxes,
    proxies: list[ForwardProxy],
) -> None:
    proxy = start(proxies, threaded_sandboxes, ForwardProxy(user="ops", password=PASSWORD))
    manifest = write_manifest(tmp_path, simple_rows(6))
    code, out, err = run(manifest, threaded_sandbox.base_url, tmp_path, env={"http_proxy": proxy.url})
    assert code == 0 and "6 enrolled" in out, out + err
    # Absolute-form, one request a connection: the proxy saw every request the API got, and only those.
    assert len(proxy.forwarded) == threaded_sandbox.state.total_requests == 6 and not proxy.refused
    assert all(t.startswith(f"{threaded_sandbox.base_url}/backfill_users") for t in proxy.forwarded)
    assert PASSWORD not in out + err + written(tmp_path)


def test_an_https_api_is_reached_through_a_connect_tunnel_trusting_the_ca_bundle(
    tmp_path: Path,
    tls_sandbox: RunningSandbox,
    threaded_sandboxes: ThreadedSandboxes,
    proxies: list[ForwardProxy],
    ca_pem: Path,
) -> None:
    port = tls_sandbox.base_url.split(":")[2].split("/")[0]
    proxy = start(proxies, threaded_sandboxes, ForwardProxy(hosts={HIDDEN_HOST: "127.0.0.1"}))
    manifest = write_manifest(tmp_path, simple_rows(5))
    env = {"HTTPS_PROXY": proxy.url}
    code, out, err = run(manifest, hidden_url(tls_sandbox), tmp_path, "--ca-bundle", str(ca_pem), env=env)
    assert code == 0 and "5 enrolled" in out, out + err
    # Only the proxy can resolve the name: every request the API got came through a tunnel it opened.
    assert tls_sandbox.state.total_requests == 5
    assert proxy.tunnels and set(proxy.tunnels) == {f"{HIDDEN_HOST}:{port}"} and not proxy.forwarded


def test_no_proxy_covering_the_host_goes_direct(
    tmp_path: Path,
    tls_sandbox: RunningSandbox,
    threaded_sandboxes: ThreadedSandboxes,
    proxies: list[ForwardProxy],
    ca_pem: Path,
) -> None:
    proxy = start(proxies, threaded_sandboxes, ForwardProxy())
    manifest = write_manifest(tmp_path, simple_rows(4))
    env = {"HTTPS_PROXY": proxy.url, "no_proxy": "localhost,127.0.0.0/8", "SSL_CERT_FILE": str(ca_pem)}
    code, out, err = run(manifest, tls_sandbox.base_url, tmp_path, env=env)
    assert code == 0 and "4 enrolled" in out, out + err
    assert tls_sandbox.state.total_requests == 4 and not proxy.tunnels and not proxy.forwarded


# --- a private CA -----------------------------------------------------------------------------------------


def test_a_private_ca_is_trusted_from_ssl_cert_file_and_ca_bundle_wins_over_it(
    tmp_path: Path, tls_sandbox: RunningSandbox, ca_pem: Path
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(4))
    code, out, err = run(
        manifest, tls_sandbox.base_url, tmp_path, "--limit", "2", env={"SSL_CERT_FILE": str(ca_pem)}
    )
    assert code == 1 and "2 enrolled" in out, out + err
    system = (
        ssl.get_default_verify_paths().openssl_cafile
    )  # a bundle without the private CA (it may not exist)
    code, out, err = run(
        manifest, tls_sandbox.base_url, tmp_path, "--ca-bundle", str(ca_pem), env={"SSL_CERT_FILE": system}
    )
    assert code == 0 and "2 enrolled" in out and "2 skipped" in out, out + err
    assert tls_sandbox.state.total_requests == 4


def test_without_the_private_ca_the_run_stops_with_exit_4_naming_the_ca_and_no_row_failed(
    tmp_path: Path, tls_sandbox: RunningSandbox, ca_pem: Path
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(5))
    code, out, err = run(manifest, tls_sandbox.base_url, tmp_path)
    assert code == 4, out + err
    assert "doesn't verify against this machine's default CAs" in err and "--ca-bundle PATH" in err, err
    assert tls_sandbox.state.total_requests == 0
    assert not {"failed", "retry_exhausted", "unknown"} & set(statuses(tmp_path).values())
    # Nothing reached the API, so nothing is in doubt: with the CA, a re-run sends each row once.
    code, out, err = run(manifest, tls_sandbox.base_url, tmp_path, "--ca-bundle", str(ca_pem))
    assert code == 0 and "5 enrolled" in out, out + err
    assert tls_sandbox.state.total_requests == 5


@pytest.mark.parametrize("how", ["flag", "SSL_CERT_FILE"])
@pytest.mark.parametrize("what", ["missing", "not PEM"])
def test_a_bundle_that_cant_be_used_is_a_config_error_before_anything_is_sent(
    tmp_path: Path, tls_sandbox: RunningSandbox, how: str, what: str
) -> None:
    bundle = tmp_path / "bundle.pem"
    if what == "not PEM":
        bundle.write_text("not a certificate\n")
    manifest = write_manifest(tmp_path, simple_rows(2))
    given = ("--ca-bundle", str(bundle)) if how == "flag" else ()
    env = {"SSL_CERT_FILE": str(bundle)} if how == "SSL_CERT_FILE" else {}
    code, out, err = run(manifest, tls_sandbox.base_url, tmp_path, *given, env=env)
    source = "flag --ca-bundle" if how == "flag" else "environment SSL_CERT_FILE"
    assert code == 2 and f"ca_bundle (from {source})" in err and str(bundle) in err, out + err
    assert tls_sandbox.state.total_requests == 0 and not (tmp_path / "out").exists()


# --- a proxy that refuses ---------------------------------------------------------------------------------


def closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("refusal", ["connection refused", "407 to CONNECT", "403 to CONNECT", "407 to http"])
def test_a_refusing_proxy_stops_the_run_with_exit_4_naming_it_and_no_row_failed(
    tmp_path: Path,
    tls_sandbox: RunningSandbox,
    threaded_sandbox: RunningSandbox,
    threaded_sandboxes: ThreadedSandboxes,
    proxies: list[ForwardProxy],
    ca_pem: Path,
    refusal: str,
) -> None:
    if refusal == "connection refused":
        proxy_url, shown = f"http://ops:{PASSWORD}@127.0.0.1:{closed_port()}", "http://***@127.0.0.1:"
    else:
        wanting = (
            ForwardProxy(user="ops", password="the-right-one")
            if "407" in refusal
            else ForwardProxy(deny=True)
        )
        proxy = start(proxies, threaded_sandboxes, wanting)
        proxy_url, shown = (
            f"http://ops:{PASSWORD}@127.0.0.1:{proxy.port}",
            f"http://***@127.0.0.1:{proxy.port}",
        )
    server = threaded_sandbox if refusal == "407 to http" else tls_sandbox
    variable = "HTTP_PROXY" if server is threaded_sandbox else "HTTPS_PROXY"
    manifest = write_manifest(tmp_path, simple_rows(5))
    env = {variable: proxy_url, "SSL_CERT_FILE": str(ca_pem)}
    code, out, err = run(manifest, server.base_url, tmp_path, env=env)
    assert code == 4, out + err
    assert shown in err and f"(from environment {variable})" in err and "proxy" in err, err
    assert PASSWORD not in out + err + written(tmp_path)
    assert server.state.total_requests == 0
    assert not {"failed", "retry_exhausted", "unknown"} & set(statuses(tmp_path).values())
    # Those requests never reached the API: without the proxy, each row is sent once.
    code, out, err = run(manifest, server.base_url, tmp_path, env={"SSL_CERT_FILE": str(ca_pem)})
    assert code == 0 and "5 enrolled" in out, out + err
    assert server.state.total_requests == 5


async def test_a_proxy_that_cant_reach_the_api_is_a_blip_never_a_doubt() -> None:
    """A 502 to CONNECT: the proxy found no way to the API, so the request can't have reached it."""
    proxy = await ForwardProxy().start()
    url = f"https://127.0.0.1:{closed_port()}/v1"  # nothing listens there: the proxy's own connect fails
    route = network.route(url, environ={"https_proxy": proxy.url})
    try:
        async with Client(
            url, PARTNER_ID, Secret(API_KEY), timeout=5, connect_timeout=5, concurrency=1, route=route
        ) as client:
            verdict = await client.send_photo("u1", "2021-01-01", b"photo")
    finally:
        await proxy.stop()
    assert verdict.kind is Kind.TRANSIENT and verdict.unreachable and not verdict.may_have_enrolled
    assert "couldn't reach the API" in verdict.error and f"127.0.0.1:{proxy.port}" in verdict.error


async def test_an_https_proxy_is_verified_against_the_ca_bundle_too(
    sandbox: RunningSandbox, authority: trustme.CA, ca_pem: Path
) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(context)
    proxy = await ForwardProxy(tls=context).start()
    verdicts = []
    try:
        for bundle in (ca_pem, None):
            route = network.route(sandbox.base_url, ca_bundle=bundle, environ={"http_proxy": proxy.url})
            async with Client(
                sandbox.base_url,
                PARTNER_ID,
                Secret(API_KEY),
                timeout=5,
                connect_timeout=5,
                concurrency=1,
                route=route,
            ) as client:
                verdicts.append(await client.send_photo("u1", "2021-01-01", png_bytes(1)))
    finally:
        await proxy.stop()
    trusted, untrusted = verdicts
    assert trusted.kind is Kind.ENROLLED and len(proxy.forwarded) == sandbox.state.total_requests == 1
    assert untrusted.unreachable and not untrusted.may_have_enrolled
    assert f"can't connect to the proxy https://127.0.0.1:{proxy.port}" in untrusted.error
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted.error


# --- what check and config show say -----------------------------------------------------------------------


def test_check_and_config_show_name_the_proxy_and_the_ca_bundle_never_the_password(
    tmp_path: Path,
    tls_sandbox: RunningSandbox,
    threaded_sandboxes: ThreadedSandboxes,
    proxies: list[ForwardProxy],
    ca_pem: Path,
) -> None:
    proxy = start(
        proxies,
        threaded_sandboxes,
        ForwardProxy(user="ops", password=PASSWORD, hosts={HIDDEN_HOST: "127.0.0.1"}),
    )
    manifest = write_manifest(tmp_path, simple_rows(3))
    env = {"HTTPS_PROXY": proxy.url}
    code, out, err = cli(
        "check",
        str(manifest),
        "--env",
        "local",
        "--base-url",
        hidden_url(tls_sandbox),
        "--ca-bundle",
        str(ca_pem),
        "--ledger",
        str(tmp_path / "l.sqlite"),
        env=env,
    )
    assert code == 0, out + err
    route = next(line for line in out.splitlines() if "api route:" in line)
    assert f"through the proxy http://***@127.0.0.1:{proxy.port} (from environment HTTPS_PROXY)" in route
    assert f"the CA bundle {ca_pem} (from flag --ca-bundle)" in route
    assert "resolved by the proxy" in out and "the certificate verifies against" in out
    assert tls_sandbox.state.total_requests == 0 and proxy.tunnels  # one GET of the API root, through it
    code, out, err = cli(
        "config", "show", env={**env, "BACKFILL_BASE_URL": hidden_url(tls_sandbox), "BACKFILL_ENV": "local"}
    )
    assert code == 0 and f"http://***@127.0.0.1:{proxy.port}" in out and "environment HTTPS_PROXY" in out
    assert PASSWORD not in out + err


@pytest.mark.parametrize(
    ("proxy", "trust", "name", "says"),
    [
        ("refused", "ca", "api proxy", "can't connect to the proxy http://***@127.0.0.1:"),
        ("407", "ca", "api proxy", "HTTP 407"),
        ("none", "system", "api tls", "doesn't verify against this machine's default CAs"),
    ],
)
def test_check_names_a_refusing_proxy_or_an_untrusted_certificate_with_exit_4(
    tmp_path: Path,
    tls_sandbox: RunningSandbox,
    threaded_sandboxes: ThreadedSandboxes,
    proxies: list[ForwardProxy],
    ca_pem: Path,
    proxy: str,
    trust: str,
    name: str,
    says: str,
) -> None:
    env = {"SSL_CERT_FILE": str(ca_pem)} if trust == "ca" else {}
    if proxy == "refused":
        env["HTTPS_PROXY"] = f"http://ops:{PASSWORD}@127.0.0.1:{closed_port()}"
    elif proxy == "407":
        wanting = start(proxies, threaded_sandboxes, ForwardProxy(user="ops", password="the-right-one"))
        env["HTTPS_PROXY"] = f"http://ops:{PASSWORD}@127.0.0.1:{wanting.port}"
    manifest = write_manifest(tmp_path, simple_rows(2))
    code, out, err = cli(
        "check",
        str(manifest),
        "--env",
        "local",
        "--base-url",
        tls_sandbox.base_url,
        "--ledger",
        str(tmp_path / "l.sqlite"),
        env=env,
    )
    assert code == 4, out + err
    line = next(x for x in out.splitlines() if f"{name}:" in x)
    assert line.startswith("problem") and says in line, out
    assert PASSWORD not in out + err and tls_sandbox.state.total_requests == 0


# --- which proxy, as curl and requests choose it -----------------------------------------------------------

HTTPS_API = "https://api.example.com/v1"


@pytest.mark.parametrize(
    ("environ", "url", "proxy"),
    [
        ({}, HTTPS_API, None),
        ({"HTTPS_PROXY": "http://p:1"}, HTTPS_API, "http://p:1"),
        ({"https_proxy": "http://lower:1", "HTTPS_PROXY": "http://upper:1"}, HTTPS_API, "http://lower:1"),
        ({"https_proxy": "", "HTTPS_PROXY": "http://upper:1"}, HTTPS_API, None),  # set empty: none
        ({"HTTP_PROXY": "http://p:1"}, HTTPS_API, None),  # only https_proxy serves https
        ({"ALL_PROXY": "http://all:1"}, HTTPS_API, "http://all:1"),
        ({"ALL_PROXY": "http://all:1", "https_proxy": "http://p:1"}, HTTPS_API, "http://p:1"),
        ({"HTTP_PROXY": "http://p:1"}, "http://api.example.com/v1", "http://p:1"),
        ({"HTTP_PROXY": "http://p:1", "REQUEST_METHOD": "GET"}, "http://api.example.com/v1", None),  # httpoxy
        ({"http_proxy": "http://p:1", "REQUEST_METHOD": "GET"}, "http://api.example.com/v1", "http://p:1"),
        ({"HTTPS_PROXY": "proxy.corp:3128"}, HTTPS_API, "http://proxy.corp:3128"),  # no scheme: http
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "*"}, HTTPS_API, None),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "example.com"}, HTTPS_API, None),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": ".example.com"}, HTTPS_API, None),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "*.example.com"}, HTTPS_API, None),
        (
            {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "ample.com"},
            HTTPS_API,
            "http://p:1",
        ),  # a name, not a tail
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "other.org, api.example.com"}, HTTPS_API, None),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "api.example.com:443"}, HTTPS_API, None),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "api.example.com:8443"}, HTTPS_API, "http://p:1"),
        ({"HTTPS_PROXY": "http://p:1", "no_proxy": "", "NO_PROXY": "*"}, HTTPS_API, "http://p:1"),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "10.0.0.0/8"}, "https://10.1.2.3/v1", None),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "10.0.0.0/8"}, "https://11.1.2.3/v1", "http://p:1"),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "127.0.0.1:8443"}, "https://127.0.0.1:8443/v1", None),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "::1"}, "https://[::1]:8443/v1", None),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "[::1]:9999"}, "https://[::1]:8443/v1", "http://p:1"),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "fd00::/8"}, "https://[fd12::1]/v1", None),
        ({"ALL_PROXY": "socks5://p:1080", "NO_PROXY": "example.com"}, HTTPS_API, None),  # unused: not read
    ],
)
def test_the_proxy_is_chosen_as_curl_and_requests_choose_it(
    environ: dict[str, str], url: str, proxy: str | None
) -> None:
    chosen = network.route(url, environ=environ)
    assert (chosen.proxy.url if chosen.proxy else None) == proxy
    assert chosen.via.startswith("through the proxy" if proxy else "directly (")


@given(
    host=st.lists(st.sampled_from(["a", "b", "example", "com"]), min_size=1, max_size=3).map(".".join),
    port=st.sampled_from([443, 8443]),
    entries=st.lists(
        st.tuples(
            st.booleans(),
            st.lists(st.sampled_from(["a", "b", "example", "com"]), min_size=1, max_size=3).map(".".join),
            st.sampled_from(["", ":443", ":8443"]),
        ).map(lambda e: ("." if e[0] else "") + e[1] + e[2]),
        max_size=3,
    ),
)
def test_no_proxy_reads_names_ports_and_leading_dots_as_the_standard_library_does(
    host: str, port: int, entries: list[str]
) -> None:
    no_proxy = ",".join(entries)
    chosen = network.route(
        f"https://{host}:{port}/v1", environ={"https_proxy": "http://p:1", "no_proxy": no_proxy}
    )
    expected = urllib.request.proxy_bypass_environment(f"{host}:{port}", {"no": no_proxy})
    assert (chosen.proxy is None) == bool(expected)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("socks5://ops:hunter22@p:1080", "a socks5:// proxy is not supported"),
        ("http://ops:hunter22@p:port", "the port is not a number"),
        ("http://ops:hunter22@:3128", "names no host"),
    ],
)
def test_a_proxy_variable_that_names_no_usable_proxy_is_a_config_error_without_its_password(
    value: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        network.route(HTTPS_API, environ={"HTTPS_PROXY": value})
    assert caught.value.key == "HTTPS_PROXY" and problem in str(caught.value)
    assert "hunter22" not in str(caught.value) and "***@" in str(caught.value)

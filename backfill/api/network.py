"""How requests reach the API: the proxy the environment names for its URL, as curl and requests choose it, and
the CAs its certificate must chain to."""

from __future__ import annotations

import ipaddress
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .. import redact
from ..errors import ConfigError

__all__ = ["Proxy", "Route", "default_cas", "route"]

# SOCKS needs a library aiohttp doesn't bundle; curl and requests (without PySocks) refuse it too.
_PROXY_SCHEMES = ("http", "https")


@dataclass(frozen=True, slots=True, kw_only=True)
class Proxy:
    """A forward proxy. `url` is what the HTTP client is given, credentials and all; only `shown` is ever shown."""

    url: str
    shown: str  # the URL with any user and password replaced by ***
    source: str  # where it was named: "environment HTTPS_PROXY"

    @property
    def host(self) -> str:
        return (urlsplit(self.url).hostname or "").lower()

    def __str__(self) -> str:
        return f"the proxy {self.shown} (from {self.source})"


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """How requests to one URL travel: through `proxy` or direct, trusting the CAs `ssl` was made from."""

    proxy: Proxy | None
    direct: str  # why there is no proxy, for a person; "" when there is one
    ca_bundle: Path | None  # None: this machine's default CAs
    ca_source: str
    # What the HTTP client verifies certificates with: True is its own default context (the machine's CAs).
    tls: ssl.SSLContext | bool = True

    @property
    def via(self) -> str:
        """Which way requests go, and why: for `check`, `config show` and messages."""
        return f"through {self.proxy}" if self.proxy is not None else f"directly ({self.direct})"

    @property
    def trusts(self) -> str:
        """Which CAs the API's certificate (and an https:// proxy's) must chain to."""
        if self.ca_bundle is None:
            return f"this machine's default CAs ({default_cas()})"
        return f"the CA bundle {self.ca_bundle} (from {self.ca_source})"


def route(
    url: str,
    *,
    ca_bundle: Path | None = None,
    ca_source: str = "default",
    environ: Mapping[str, str] | None = None,
) -> Route:
    """How requests to `url` travel: the proxy from the environment (none when NO_PROXY covers its host), and a
    certificate check against `ca_bundle` (from `ca_source`) or, without one, this machine's CAs.

    A proxy variable that names no usable proxy, or a bundle that can't be read, is a ConfigError naming it: no
    request is made through a proxy or a trust that isn't the one meant.
    """
    environ = os.environ if environ is None else environ
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    port = parts.port or (443 if scheme == "https" else 80)
    named = _variable(environ, f"{scheme}_proxy") or _variable(environ, "all_proxy")
    exempt = _variable(environ, "no_proxy")
    proxy = None
    if named is None:
        direct = f"no proxy is set for {scheme} ({scheme.upper()}_PROXY, {scheme}_proxy or ALL_PROXY)"
    elif exempt is not None and _bypassed(host, port, exempt[1]):
        # Not even read: a variable meant for other tools (a SOCKS ALL_PROXY) can't stop a run it doesn't serve.
        direct = f"{exempt[0]} covers {host}, so {named[0]} is not used"
    else:
        proxy, direct = _proxy(*named), ""
    context: ssl.SSLContext | bool = True
    if ca_bundle is not None:
        # Loading a bundle takes a tenth of a second: done only where TLS is spoken, else the file is only opened.
        if scheme == "https" or (proxy is not None and proxy.url.lower().startswith("https:")):
            context = _context(ca_bundle, ca_source)
        else:
            _readable(ca_bundle, ca_source)
    return Route(proxy=proxy, direct=direct, ca_bundle=ca_bundle, ca_source=ca_source, tls=context)


def default_cas() -> str:
    """Where this machine's OpenSSL finds its CAs, as a person would look for them."""
    paths = ssl.get_default_verify_paths()
    return " and ".join(p for p in (paths.cafile, paths.capath) if p) or "OpenSSL's built-in paths"


def _variable(environ: Mapping[str, str], name: str) -> tuple[str, str] | None:
    """(variable, value) for one of the proxy variables, or None when it is not set.

    As requests (urllib) reads them: the lower-case name wins, set but empty it means none (even with the
    upper-case one set), and in a CGI request HTTP_PROXY is ignored, since a client can set it (httpoxy).
    """
    lower, upper = name.lower(), name.upper()
    for variable in (lower, upper):
        if variable == "HTTP_PROXY" and "REQUEST_METHOD" in environ:
            continue
        if variable in environ:
            value = environ[variable].strip()
            return (variable, value) if value else None
    return None


def _proxy(variable: str, value: str) -> Proxy:
    """The proxy `value` names, its credentials registered as secrets; scheme-less means http://, as in curl."""
    source = f"environment {variable}"
    url = value if "://" in value else f"http://{value}"
    parts = urlsplit(url)
    if parts.password:
        redact.register(parts.password)
        redact.register(unquote(parts.password))
    where = parts.netloc.rpartition("@")[2]
    credentials = "***@" if "@" in parts.netloc else ""
    shown = f"{parts.scheme}://{credentials}{where}"
    fix = (
        f"set {variable} to the proxy's URL, e.g. http://proxy.example:3128 (with its user and password, "
        "if it needs them: http://user:password@proxy.example:3128), or unset it"
    )
    if parts.scheme.lower() not in _PROXY_SCHEMES:
        problem = f"{shown}: a {parts.scheme}:// proxy is not supported, only http:// and https:// ones"
        raise ConfigError(variable, source, problem, fix)
    try:
        parts.port  # noqa: B018 - raises on a port that isn't a number from 0 to 65535
    except ValueError:
        raise ConfigError(
            variable, source, f"{shown}: the port is not a number from 1 to 65535", fix
        ) from None
    if not parts.hostname:
        raise ConfigError(variable, source, f"{shown} names no host", fix)
    return Proxy(url=url, shown=shown, source=source)


def _bypassed(host: str, port: int, no_proxy: str) -> bool:
    """Whether NO_PROXY covers host:port, as curl reads it: `*`; a name and every name under it (`example.com`,
    `.example.com` and `*.example.com` alike); an IP address or a CIDR range; each optionally `:port`."""
    address = _address(host)
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        name, only = _split_port(entry)
        if not name or (only is not None and only != port):
            continue
        if name == "*":
            return True
        if address is not None:
            try:
                if address in ipaddress.ip_network(name.strip("[]"), strict=False):
                    return True
            except ValueError:
                pass  # a name, never an address's
            continue
        suffix = name.removeprefix("*").lstrip(".")
        if host == suffix or host.endswith(f".{suffix}"):
            return True
    return False


def _split_port(entry: str) -> tuple[str, int | None]:
    """`name:port` → (name, port); a bare IPv6 address (more than one colon) has no port unless bracketed."""
    if entry.startswith("["):
        inside, _, rest = entry[1:].partition("]")
        port = rest.removeprefix(":")
        return inside, int(port) if port.isdigit() else None
    name, colon, port = entry.rpartition(":")
    if colon and ":" not in name and port.isdigit():
        return name, int(port)
    return entry, None


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _context(bundle: Path, source: str) -> ssl.SSLContext:
    """A verifying context that trusts the CAs in `bundle` alone, as curl's --cacert and requests' verify=."""
    try:
        return ssl.create_default_context(cafile=str(bundle))
    except ssl.SSLError as exc:
        problem = f"{bundle} holds no CA certificate OpenSSL can read ({exc.reason or exc.strerror})"
        raise ConfigError("ca_bundle", source, problem, _bundle_fix(source)) from None
    except OSError as exc:
        raise ConfigError(
            "ca_bundle", source, f"can't read {bundle} ({exc.strerror})", _bundle_fix(source)
        ) from None


def _readable(bundle: Path, source: str) -> None:
    """Plain http speaks no TLS, so the bundle is unused; one that can't even be opened is still a mistake."""
    try:
        with bundle.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(
            "ca_bundle", source, f"can't read {bundle} ({exc.strerror})", _bundle_fix(source)
        ) from None


def _bundle_fix(source: str) -> str:
    unset = ", or unset SSL_CERT_FILE" if source.endswith("SSL_CERT_FILE") else ""
    return (
        "give the path of a readable PEM file holding the CA certificates that the API's certificate (or that of "
        f"a proxy re-signing it) chains to{unset}"
    )

"""Which image values and manifest names are object-storage URLs, and how relative ones resolve against a base."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

# The schemes a photo or a manifest may be named by, each with the one it is recorded under: a ledger's
# fingerprint names `s3://`, whichever alias the manifest used, so changing the alias changes nothing.
SCHEMES = {
    "s3": "s3",
    "s3a": "s3",
    "gs": "gs",
    "gcs": "gs",
    "az": "az",
    "azure": "az",
    "http": "http",
    "https": "https",
}
SUPPORTED = "s3://bucket/key, gs://bucket/key, az://container/key, https://host/path or a local path"
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def scheme_of(raw: str) -> str | None:
    """The scheme `raw` starts with, lowercased ("s3", "ftp", ...), or None for a local path."""
    if "://" not in raw:  # the common case, decided at C speed: a local path
        return None
    found = _SCHEME.match(raw)
    return found.group(1).lower() if found else None


def is_url(raw: str) -> bool:
    """Whether `raw` names an object by URL (any scheme but file://, which is a local path)."""
    scheme = scheme_of(raw)
    return scheme is not None and scheme != "file"


def local_path_of(raw: str) -> str:
    """A file:// URL as the local path it names; any other value unchanged."""
    if scheme_of(raw) == "file":
        return unquote(urlsplit(raw).path)
    return raw


def prefix_of(url: str) -> str:
    """The "folder" of an object URL, ending in "/": what relative paths in a manifest there resolve against."""
    return url[: url.rindex("/") + 1]


def join(base: str, raw: str) -> str:
    """`raw` resolved against the URL prefix `base` ("s3://b/batch/"): `.` dropped and `..` applied, as for
    local paths. Empty segments are kept (a key may hold "//"), and so is a `..` that would climb above the
    bucket, so that checking the result refuses it rather than silently naming another object.
    """
    scheme_end = base.index("://") + 3
    root_end = base.find("/", scheme_end)
    root, folder = base[:root_end], base[root_end + 1 : -1]
    parts = folder.split("/") if folder else []
    for segment in raw.split("/"):
        if segment == ".":
            continue
        if segment == "..":
            if not parts:
                return base + raw
            parts.pop()
        else:
            parts.append(segment)
    return root + "/" + "/".join(parts)


@dataclass(frozen=True, slots=True, kw_only=True)
class ObjectUrl:
    """An object's URL taken apart: `scheme` canonical (s3, gs, az, http, https), `bucket` the bucket,
    container or host[:port], `key` the object's path within it (as stored: never percent-decoded, except
    for http(s), whose paths are URLs), and `url` the canonical form recorded in fingerprints."""

    scheme: str
    bucket: str
    key: str
    url: str


class BadUrl(ValueError):
    """Why a URL can't name an object; the message says what to write instead."""


def parse(raw: str) -> ObjectUrl:
    """The object `raw` names, or BadUrl."""
    written = scheme_of(raw)
    scheme = SCHEMES.get(written or "")
    if scheme is None:
        raise BadUrl(f"the scheme {written!r}:// isn't supported: use {SUPPORTED}")
    rest = raw[len(written or "") + 3 :]
    if scheme in ("http", "https"):
        parts = urlsplit(raw)
        if parts.query or parts.fragment:
            # A query is often a signature (a presigned URL): never repeat it, and never send it anywhere.
            raise BadUrl(
                "URLs with a query string or fragment (such as presigned URLs) aren't supported: "
                "give the object's plain URL and let the server's credentials apply"
            )
        bucket, key = parts.netloc, unquote(parts.path.lstrip("/"))
    else:
        bucket, _, key = rest.partition("/")
    if not bucket:
        raise BadUrl(
            f"it names no {'host' if scheme.startswith('http') else 'bucket'}: write it as {SUPPORTED}"
        )
    if not key or key.endswith("/"):
        raise BadUrl("it names a bucket or a folder (prefix), not an object: point to the photo itself")
    segments = key.split("/")
    if "" in segments or "." in segments or ".." in segments:
        raise BadUrl(
            "its key has an empty, '.' or '..' segment (such as '//' or '/../'), which object storage "
            "clients can't address reliably: copy the object to a plain key and name that"
        )
    if scheme in ("http", "https"):
        return ObjectUrl(scheme=scheme, bucket=bucket, key=key, url=raw)
    return ObjectUrl(scheme=scheme, bucket=bucket, key=key, url=f"{scheme}://{bucket}/{key}")

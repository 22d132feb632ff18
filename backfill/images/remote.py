"""Photos in object storage (S3, GCS, Azure, HTTP) through obstore: checked by ranged reads, fingerprinted by listing."""

from __future__ import annotations

import asyncio
import configparser
import hashlib
import os
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import obstore
from obstore.exceptions import (
    BaseError,
    GenericError,
    InvalidPathError,
    PermissionDeniedError,
    PreconditionError,
    UnauthenticatedError,
)
from obstore.store import AzureStore, GCSStore, HTTPStore, S3Store

from .. import redact
from ..errors import ConfigError
from ..vocab import Reason
from . import Fingerprint, ImageError, ImageProblem, ImageSource, Photo, size_problem
from .content import examine, examine_bytes, problem, run_async, sample_in
from .urls import BadUrl, ObjectUrl, parse

if TYPE_CHECKING:
    from obstore import GetOptions, GetResult, ObjectMeta
    from obstore.store import ClientConfig, GCSCredential, ObjectStore, RetryConfig, S3Config

_T = TypeVar("_T")

# How each check reads, and why:
# - The first request is a ranged GET of the first FIRST_READ bytes, not a HEAD: its answer carries the
#   object's size, ETag and last-modified time (from Content-Range and the headers) as well as the bytes the
#   content check starts from, so a photo of up to 64 KB is checked in one request and a bigger one in two
#   (its tail, fetched with If-Match so that both reads see one version). 64 KB rather than the check's 4 KB
#   head: on object storage a round trip costs tens of ms and 60 KB more of transfer about one, so a second
#   request saved is worth far more than the bytes. A 0-byte object can't be range-read (S3 answers 416):
#   only then does a HEAD follow.
# - Fingerprints for the resume decision come from listings, a page of up to 1,000 objects a request, never a
#   HEAD per row: the batch's keys are sorted and each listing starts just before the next key not yet seen
#   (S3's start-after), so a dense run of keys costs one request per thousand and a sparse one skips what lies
#   between. Listings of S3, GCS, Azure and the in-memory store come in key order, which is what lets a key
#   absent from a page that went past it count as missing. HTTP servers can't list: there, and where listing is
#   refused (no s3:ListBucket, say), fails on a key the client can't represent, or ignores the start offset,
#   it falls back to one HEAD per row.
# - obstore's own retries are off: a transient failure (5xx, 429, a timeout, a dropped connection) is retried
#   here with the run's retry policy (attempts and backoff from backfill.run.policy, injected), so storage
#   and the API back off alike and the attempts are counted in one place.
# - An ETag is compared without its quotes or W/ prefix, and a last-modified time to the second: a listing
#   gives Azure's ETag bare and S3's time in milliseconds where HEAD and GET give a quoted ETag and whole
#   seconds, and the fingerprint from either must be equal for a resume to skip a done row without a GET.

LIST_PAGE = 1000  # what S3, GCS and Azure return per list request at most
FIRST_READ = 64 * 1024
INLINE_HASH_MAX = 64 * 1024  # a bigger photo is hashed in a thread (hashlib releases the GIL on big inputs)
_CHANGED_RETRIES = 3  # a check that keeps seeing a new version of the object gives up after this many
_STATUS = re.compile(r"status code: (\d{3})")
_CODE = re.compile(r"<Code>([A-Za-z0-9.]{1,64})</Code>")
_NO_RETRIES: RetryConfig = {"max_retries": 0}
_PROVIDER = {
    "s3": "S3",
    "gs": "Google Cloud Storage",
    "az": "Azure Blob Storage",
    "http": "the HTTP server",
    "https": "the HTTP server",
}
_LISTABLE = frozenset({"s3", "gs", "az", "memory"})

# Environment variables whose values are secrets, registered with the scrubber as soon as a store is made, so
# that no message (obstore's own included: an Azure SAS token can appear in a request URL) can carry one.
SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "GOOGLE_SERVICE_ACCOUNT_KEY",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_STORAGE_MASTER_KEY",
    "AZURE_STORAGE_SAS_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_TOKEN",
    "AZURE_CLIENT_SECRET",
    "AZURE_STORAGE_CLIENT_SECRET",
    "AZURE_STORAGE_CONNECTION_STRING",
)

StoreFactory = Callable[[ObjectUrl], "ObjectStore"]
# What a failed storage call raises: obstore's errors, FileNotFoundError (a missing object) and other OSErrors
# (timeouts), and ValueError (a key it can't parse). Anything else is a bug and propagates.
_STORAGE_ERRORS = (BaseError, OSError, ValueError)


class _Changed(Exception):
    """The object's version changed between two reads of one check."""


# --- stores ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreOptions:
    """How stores are made: timeouts from the run's settings; `environ` is where credentials are looked for."""

    timeout: float = 60.0
    connect_timeout: float = 10.0
    environ: Mapping[str, str] | None = None  # None: os.environ


def register_secrets(environ: Mapping[str, str]) -> None:
    for name in SECRET_ENV:
        value = environ.get(name)
        if value:
            redact.register(value)


def make_store(obj: ObjectUrl, options: StoreOptions) -> ObjectStore:
    """A store for `obj`'s bucket (or host), configured from that cloud's standard environment and files.

    Credentials are never passed on argv: obstore reads AWS_*, GOOGLE_* and AZURE_* itself; what it doesn't
    read (AWS_PROFILE and the shared config files, AWS_ENDPOINT_URL_S3) is read here. May raise ConfigError.
    """
    environ = os.environ if options.environ is None else options.environ
    register_secrets(environ)
    client: ClientConfig = {
        "timeout": timedelta(seconds=options.timeout),
        "connect_timeout": timedelta(seconds=options.connect_timeout),
        "user_agent": "backfill",
    }
    try:
        if obj.scheme == "s3":
            config = aws_config(environ)
            if config.get("endpoint", environ.get("AWS_ENDPOINT_URL", "")).startswith("http://"):
                # A local MinIO or Ceph. TLS verification itself is never turned off.
                client["allow_http"] = True
            return S3Store(obj.bucket, config=config, client_options=client, retry_config=_NO_RETRIES)
        if obj.scheme == "gs":
            emulator = environ.get("STORAGE_EMULATOR_HOST", "").strip()
            if emulator:
                # Google's own variable for a local GCS emulator (fake-gcs-server): its SDKs send it no
                # credentials, and neither does this (obstore doesn't read the variable, so it is read here).
                if "://" not in emulator:
                    emulator = f"http://{emulator}"
                client["allow_http"] = emulator.startswith("http://")
                return GCSStore(
                    obj.bucket,
                    config={"base_url": emulator.rstrip("/")},
                    credential_provider=_emulator_token,
                    client_options=client,
                    retry_config=_NO_RETRIES,
                )
            return GCSStore(obj.bucket, client_options=client, retry_config=_NO_RETRIES)
        if obj.scheme == "az":
            if _truthy(environ.get("AZURE_STORAGE_USE_EMULATOR")):
                client["allow_http"] = True  # Azurite listens on plain http
            return AzureStore(obj.bucket, client_options=client, retry_config=_NO_RETRIES)
        client["allow_http"] = obj.scheme == "http"
        return HTTPStore.from_url(
            f"{obj.scheme}://{obj.bucket}", client_options=client, retry_config=_NO_RETRIES
        )
    except (ValueError, GenericError, UnauthenticatedError) as exc:
        # A configuration obstore refuses (an Azure container with no account name, say): nothing can be read.
        raise ConfigError(
            f"{obj.scheme}:// storage",
            "the environment",
            redact.scrub(_first_line(exc)),
            f"set {_PROVIDER[obj.scheme]}'s standard environment variables (see docs/storage.md, Photos in object storage)",
        ) from exc


def _emulator_token() -> GCSCredential:
    return {"token": "emulator", "expires_at": None}  # a GCS emulator accepts any bearer token


def aws_config(environ: Mapping[str, str]) -> S3Config:
    """What obstore doesn't read by itself: the shared credentials and config files for AWS_PROFILE (static
    keys, region, endpoint_url), and AWS_ENDPOINT_URL_S3. The environment wins over the files, as in the SDKs.
    """
    config: S3Config = {}
    endpoint = environ.get("AWS_ENDPOINT_URL_S3")
    if endpoint:
        config["endpoint"] = endpoint
    profile_named = environ.get("AWS_PROFILE") or environ.get("AWS_DEFAULT_PROFILE")
    profile = profile_named or "default"
    home = Path(environ.get("HOME") or os.path.expanduser("~"))
    creds = _ini(environ.get("AWS_SHARED_CREDENTIALS_FILE") or home / ".aws" / "credentials", profile)
    conf = _ini(
        environ.get("AWS_CONFIG_FILE") or home / ".aws" / "config",
        profile if profile == "default" else f"profile {profile}",
    )
    if profile_named and creds is None and conf is None:
        raise ConfigError(
            "AWS_PROFILE",
            "the environment",
            f"profile {profile!r} is in neither ~/.aws/credentials nor ~/.aws/config",
            "name a profile those files define, or unset "
            "AWS_PROFILE and export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
        )
    merged = {**(conf or {}), **(creds or {})}
    if not environ.get("AWS_ACCESS_KEY_ID"):
        key, secret = merged.get("aws_access_key_id"), merged.get("aws_secret_access_key")
        if key and secret:
            redact.register(secret)
            config["access_key_id"], config["secret_access_key"] = key, secret
            token = merged.get("aws_session_token")
            if token:
                redact.register(token)
                config["session_token"] = token
        elif profile_named and not environ.get("AWS_WEB_IDENTITY_TOKEN_FILE"):
            how = next(
                (
                    k
                    for k in ("sso_session", "sso_start_url", "credential_process", "role_arn")
                    if k in merged
                ),
                "no static keys",
            )
            raise ConfigError(
                "AWS_PROFILE",
                "the environment",
                f"profile {profile!r} gets its credentials by {how}, which backfill doesn't run",
                f'export them first: eval "$(aws configure '
                f'export-credentials --profile {profile} --format env)"',
            )
    if not (environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")) and merged.get("region"):
        config["region"] = merged["region"]
    if not (endpoint or environ.get("AWS_ENDPOINT_URL") or environ.get("AWS_ENDPOINT")) and merged.get(
        "endpoint_url"
    ):
        config["endpoint"] = merged["endpoint_url"]
    return config


def _ini(path: str | Path, section: str) -> dict[str, str] | None:
    parser = configparser.RawConfigParser()
    try:
        parser.read(os.path.expanduser(path), encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError, OSError):
        return None
    return dict(parser[section]) if parser.has_section(section) else None


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


# --- errors ---------------------------------------------------------------------------------------------


def _status(exc: BaseException) -> int | None:
    found = _STATUS.search(str(exc))
    return int(found.group(1)) if found else None


def transient(exc: BaseException) -> bool:
    """Worth another try: a 5xx, 408 or 429 answer, or no answer at all (a timeout, a dropped connection)."""
    if isinstance(exc, GenericError):
        status = _status(exc)
        return status is None or status >= 500 or status in (408, 429)
    return isinstance(exc, TimeoutError | ConnectionError)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def describe(exc: BaseException, obj: ObjectUrl, what: str = "image") -> ImageProblem:
    """The reject for a failed read of `obj`: a reason, and a message naming the object, the bucket and the fix.

    Never the raw error text (it may hold a request URL with a signature in it), only its status and code.
    """
    name, bucket, provider = repr(obj.url), repr(obj.bucket), _PROVIDER[obj.scheme]
    status, code = _status(exc), _CODE.search(str(exc))
    answered = f"HTTP {status}" + (f" {code.group(1)}" if code else "") if status else "no answer"
    if isinstance(exc, FileNotFoundError):
        if obj.scheme.startswith("http"):
            return ImageProblem(
                reason=Reason.IMAGE_MISSING,
                message=f"{what} {name} doesn't exist (the server answered 404): check the URL",
            )
        return ImageProblem(
            reason=Reason.IMAGE_MISSING,
            message=f"{what} {name} doesn't exist (no object {obj.key!r} in bucket {bucket}, or no "
            "such bucket): check the path and the bucket name",
        )
    if isinstance(exc, PermissionDeniedError | UnauthenticatedError):
        if obj.scheme == "s3":
            check = (
                "the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE), AWS_REGION, "
                f"and that they allow s3:GetObject on it and s3:ListBucket on bucket {bucket}"
            )
        elif obj.scheme == "gs":
            check = (
                f"the credentials (GOOGLE_APPLICATION_CREDENTIALS) and their storage.objects.get on {bucket}"
            )
        elif obj.scheme == "az":
            check = (
                f"AZURE_STORAGE_ACCOUNT_NAME and the key, SAS or identity, and their read access to {bucket}"
            )
        else:
            check = "that the server serves it without credentials"
        return ImageProblem(
            reason=Reason.IMAGE_UNREADABLE,
            message=f"{what} {name} can't be read: access denied by {provider} ({answered}); check {check}",
        )
    if isinstance(exc, BadUrl):
        return ImageProblem(reason=Reason.IMAGE_MISSING, message=f"{what} {name} can't be used: {exc}")
    if isinstance(exc, InvalidPathError | ValueError):
        return ImageProblem(
            reason=Reason.IMAGE_UNREADABLE,
            message=f"{what} {name} can't be addressed by the storage client "
            f"({redact.scrub(_first_line(exc))}): copy it to a plain key and name that",
        )
    if status in (301, 307, 400) and obj.scheme == "s3" and code and "Redirect" in code.group(1):
        return ImageProblem(
            reason=Reason.IMAGE_UNREADABLE,
            message=f"{what} {name} can't be read: bucket {bucket} is in another region "
            f"({answered}); set AWS_REGION to the bucket's region",
        )
    if transient(exc):
        return ImageProblem(
            reason=Reason.IMAGE_UNREADABLE,
            message=f"{what} {name} can't be read: {provider} kept failing ({answered}) on "
            "every attempt; check the endpoint and the network, then run again",
        )
    return ImageProblem(
        reason=Reason.IMAGE_UNREADABLE,
        message=f"{what} {name} can't be read: {provider} answered {answered}; check the bucket "
        f"{bucket} and the storage settings, then run again",
    )


def version_of(meta: ObjectMeta) -> str:
    """The object's change marker: its ETag (bare) and last-modified time (UTC, to the second)."""
    etag = (meta["e_tag"] or "").removeprefix("W/").strip('"')
    modified = meta["last_modified"].astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{etag}|{modified}"


# --- the source -----------------------------------------------------------------------------------------


class Retries(Protocol):
    """When a storage read is tried again: the run's retry policy (run/policy.py `RetryPolicy`) is one."""

    def after_storage_failure(self, attempts: int) -> float | None:
        """A read failed transiently on its `attempts`-th try: seconds before the next, or None: no more."""
        ...


class RemoteImageSource(ImageSource):
    """Photos named by object URLs (s3://, gs://, az://, http(s)://), read through obstore.

    One store per bucket (or host), made on first use by `stores`. At most `read_concurrency` objects are
    checked or listed at once. A transient failure is tried again as `retries` (the run's retry policy) says,
    waiting what it says between tries; `sleep` is injectable for tests.
    """

    def __init__(
        self,
        *,
        max_bytes: int,
        read_concurrency: int = 32,
        stores: StoreFactory | None = None,
        options: StoreOptions | None = None,
        retries: Retries,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        convert: bool = False,
    ) -> None:
        self._max_bytes = max_bytes
        self._convert = convert  # --normalize: as LocalImageSource's
        self._concurrency = read_concurrency
        self._slots = asyncio.Semaphore(read_concurrency)
        options = options or StoreOptions()
        self._make_store: StoreFactory = stores or (lambda obj: make_store(obj, options))
        self._stores: dict[tuple[str, str], ObjectStore] = {}
        self._unlistable: set[tuple[str, str]] = set()  # buckets whose listing was refused: HEAD instead
        self._retries = retries
        self._sleep = sleep

    # --- the contract ---

    async def fingerprint_many(self, raws: Sequence[str]) -> list[Fingerprint | ImageProblem]:
        out: list[Fingerprint | ImageProblem | None] = [None] * len(raws)
        groups: dict[tuple[str, str], list[tuple[int, ObjectUrl]]] = {}
        for i, raw in enumerate(raws):
            found = self._locate(raw)
            if isinstance(found, ImageProblem):
                out[i] = found
            else:
                self._store(found)  # as in check_many: a ConfigError before any request
                groups.setdefault((found.scheme, found.bucket), []).append((i, found))
        work: list[Awaitable[None]] = []
        heads: list[tuple[int, ObjectUrl]] = []
        for bucket, items in groups.items():
            if bucket[0] in _LISTABLE and bucket not in self._unlistable:
                work.append(self._fingerprint_listed(items, out))
            else:
                heads += items  # HTTP has no listing; this bucket refused one: HEAD each row
        if heads:
            work.append(self._fingerprint_headed(heads, out))
        await asyncio.gather(*work)
        return [r for r in out if r is not None]

    async def check_many(self, raws: Sequence[str]) -> list[Fingerprint | ImageProblem]:
        out: list[Fingerprint | ImageProblem] = [_PENDING] * len(raws)
        todo: list[tuple[int, ObjectUrl]] = []
        for i, raw in enumerate(raws):
            found = self._locate(raw)
            if isinstance(found, ImageProblem):
                out[i] = found
            else:
                self._store(found)  # every bucket's store first: a ConfigError stops before any request
                todo.append((i, found))

        async def one(item: tuple[int, ObjectUrl]) -> None:
            out[item[0]] = await self._check(item[1])

        await self._each(todo, one)
        return out

    async def read(self, fingerprint: Fingerprint) -> Photo:
        obj = self._locate(fingerprint.ref)
        if isinstance(obj, ImageProblem):
            raise ImageError(obj)
        store = self._store(obj)
        try:
            # Bounded by the range: an object that grew past the limit since its check sends no more than the
            # limit and a byte, and is refused by its size before its body is collected.
            result = await self._first_read(store, obj.key, (0, self._max_bytes + 1))
        except FileNotFoundError as exc:
            raise ImageError(
                ImageProblem(
                    reason=Reason.IMAGE_MISSING,
                    message=f"image {obj.url!r} no longer exists (it did when checked): "
                    "put it back, or correct the manifest, then run again",
                )
            ) from exc
        except _STORAGE_ERRORS as exc:
            raise ImageError(describe(exc, obj)) from exc
        meta, data = result
        wrong_size = size_problem(repr(obj.url), meta["size"], self._max_bytes, changed=True)
        if wrong_size is not None:
            raise ImageError(wrong_size)
        if len(data) != meta["size"]:
            raise ImageError(
                ImageProblem(
                    reason=Reason.IMAGE_UNREADABLE,
                    message=f"image {obj.url!r} came back with {len(data):,} of its "
                    f"{meta['size']:,} bytes: run again",
                )
            )
        # The sample of the bytes read, always (see local.py's read): the ledger keeps it beside their pin.
        sample = sample_in(data)
        found = Fingerprint(ref=obj.url, size=meta["size"], version=version_of(meta), sample=sample)
        if found == fingerprint:
            if sample == fingerprint.sample:
                found = fingerprint  # the version checked, with the sample its check took
        else:
            # Another version than the one checked: check these very bytes, which are what would go out.
            wrong = problem(examine_bytes(data), repr(obj.url), convert=self._convert)
            if wrong is not None:
                raise ImageError(
                    ImageProblem(
                        reason=wrong.reason, message=f"{wrong.message} (it changed after it was checked)"
                    )
                )
        if len(data) > INLINE_HASH_MAX:
            digest = await asyncio.to_thread(_sha256, data)
        else:
            digest = _sha256(data)
        return Photo(data=data, sha256=digest, fingerprint=found)

    # --- fetching whole objects (a manifest) ---

    async def download(self, url: str, dest: Path, *, what: str = "manifest") -> str:
        """The object at `url`, written to `dest` (created or truncated, owner-only), streamed in pieces of a
        MB; returns its version. Raises ImageError (its problem says what is wrong) when it can't be read."""
        obj = self._locate(url, what=what)
        if isinstance(obj, ImageProblem):
            raise ImageError(obj)
        store = self._store(obj)

        async def fetch() -> ObjectMeta:
            result = await obstore.get_async(store, obj.key)
            written = 0
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with open(fd, "wb") as out:
                async for chunk in result.stream(min_chunk_size=1 << 20):
                    out.write(chunk)
                    written += len(chunk)
            if written != result.meta["size"]:
                raise GenericError(f"short read: {written} of {result.meta['size']} bytes")  # retried
            return result.meta

        try:
            meta = await self._retrying(fetch)
        except _STORAGE_ERRORS as exc:
            raise ImageError(describe(exc, obj, what)) from exc
        return version_of(meta)

    # --- checks ---

    def _locate(self, raw: str, what: str = "image") -> ObjectUrl | ImageProblem:
        try:
            return parse(raw)
        except BadUrl as exc:
            shown = raw.split("?", 1)[0].split("#", 1)[0]  # never repeat a query: it may be a signature
            return ImageProblem(reason=Reason.IMAGE_MISSING, message=f"{what} {shown!r} can't be used: {exc}")

    def _store(self, obj: ObjectUrl) -> ObjectStore:
        key = (obj.scheme, obj.bucket)
        store = self._stores.get(key)
        if store is None:
            store = self._stores[key] = self._make_store(obj)
        return store

    async def _check(self, obj: ObjectUrl) -> Fingerprint | ImageProblem:
        store = self._store(obj)
        for _ in range(_CHANGED_RETRIES):
            try:
                async with self._slots:
                    return await self._examine(store, obj)
            except _Changed:
                continue
            except _STORAGE_ERRORS as exc:
                return describe(exc, obj)
        return ImageProblem(
            reason=Reason.IMAGE_UNREADABLE,
            message=f"image {obj.url!r} changed every time it was checked: make sure nothing "
            "writes to the photos during the run, then run again",
        )

    async def _examine(self, store: ObjectStore, obj: ObjectUrl) -> Fingerprint | ImageProblem:
        name = repr(obj.url)
        meta, head = await self._first_read(store, obj.key, (0, FIRST_READ))
        size = meta["size"]
        wrong_size = size_problem(name, size, self._max_bytes, convert=self._convert)
        if wrong_size is not None:
            return wrong_size
        etag = meta["e_tag"]

        async def read_at(offset: int, length: int) -> bytes:
            if offset + length <= len(head):
                return head[offset : offset + length]
            try:
                _, data = await self._retrying(
                    lambda: self._get(store, obj.key, (offset, offset + length), etag)
                )
            except PreconditionError as exc:
                raise _Changed from exc
            return data

        verdict, sample = await run_async(examine(size), read_at)
        if not verdict.complete:
            wrong = problem(verdict, name, convert=self._convert)
            if wrong is not None:
                return wrong
        return Fingerprint(ref=obj.url, size=size, version=version_of(meta), sample=sample)

    async def _first_read(
        self, store: ObjectStore, key: str, span: tuple[int, int]
    ) -> tuple[ObjectMeta, bytes]:
        """The object's metadata and the bytes of `span` (fewer if it is shorter), with retries.

        A 0-byte object can't be range-read (S3 answers 416, the in-memory store "invalid range", others
        differently): after any failure of the first try, a HEAD tells an empty object from a real failure.
        """
        try:
            return await self._get(store, key, span, None)
        except GenericError:
            meta = await self._retrying(lambda: obstore.head_async(store, key))
            if meta["size"] == 0:
                return meta, b""
        return await self._retrying(lambda: self._get(store, key, span, None))

    async def _get(
        self, store: ObjectStore, key: str, span: tuple[int, int], if_match: str | None
    ) -> tuple[ObjectMeta, bytes]:
        options: GetOptions = {"range": span}
        if if_match:
            options["if_match"] = if_match
        result: GetResult = await obstore.get_async(store, key, options=options)
        return result.meta, bytes(await result.bytes_async())

    # --- fingerprints ---

    async def _fingerprint_listed(
        self, items: list[tuple[int, ObjectUrl]], out: list[Fingerprint | ImageProblem | None]
    ) -> None:
        first = items[0][1]
        bucket = (first.scheme, first.bucket)
        keys = sorted({obj.key for _, obj in items})
        store = self._store(first)
        try:
            found = await self._list(store, keys)
        except _STORAGE_ERRORS as exc:
            if transient(exc):  # still failing after every retry: so would a HEAD
                for i, obj in items:
                    out[i] = describe(exc, obj)
                return
            # Refused (no s3:ListBucket, say: S3 answers 403), not supported, or an object in the range whose
            # key the client can't represent: this batch, and every later one of this bucket, is fingerprinted
            # by HEAD instead, one request a row. A HEAD then tells each row's own story (missing, denied).
            self._unlistable.add(bucket)
            await self._fingerprint_headed(items, out)
            return
        for i, obj in items:
            meta = found.get(obj.key)
            out[i] = (
                Fingerprint(ref=obj.url, size=meta["size"], version=version_of(meta))
                if meta is not None
                else ImageProblem(
                    reason=Reason.IMAGE_MISSING,
                    message=f"image {obj.url!r} doesn't exist (no object {obj.key!r} in bucket {obj.bucket!r}): "
                    "check the path",
                )
            )

    async def _list(self, store: ObjectStore, keys: list[str]) -> dict[str, ObjectMeta]:
        """The metadata of those of `keys` (sorted) that exist, from pages of a listing of their common folder."""
        wanted = set(keys)
        # The characters they share, cut back to a folder: listing prefixes are whole path segments.
        prefix = os.path.commonprefix(keys).rpartition("/")[0]  # noqa: RUF071
        found: dict[str, ObjectMeta] = {}
        i = 0
        while i < len(keys):
            # A listing starts after `offset`: here, just before keys[i] (its own prefix less a character, which
            # sorts before it), so the page starts at keys[i] or at most a few objects before it.
            start = keys[i][:-1].rstrip("/")
            offset = start if len(start) > len(prefix) else None

            async def page(offset: str | None = offset) -> Sequence[ObjectMeta]:
                stream = obstore.list(store, prefix or None, offset=offset, chunk_size=LIST_PAGE)
                async for chunk in stream:
                    return chunk
                return []

            async with self._slots:
                entries = await self._retrying(page)
            if offset is not None and entries and entries[0]["path"] <= offset:
                # A server that ignores start-after (fake-gcs-server does) would give this page forever: such a
                # bucket is fingerprinted by HEAD instead, as one whose listing is refused.
                raise ValueError("the listing ignored its start offset")
            for meta in entries:
                if meta["path"] in wanted:
                    found[meta["path"]] = meta
            if len(entries) < LIST_PAGE:
                break  # the listing ended: every key not seen is absent
            last = entries[-1]["path"]
            while i < len(keys) and keys[i] <= last:
                i += 1
        return found

    async def _fingerprint_headed(
        self, items: list[tuple[int, ObjectUrl]], out: list[Fingerprint | ImageProblem | None]
    ) -> None:
        async def one(item: tuple[int, ObjectUrl]) -> None:
            i, obj = item
            store = self._store(obj)
            try:
                async with self._slots:
                    meta = await self._retrying(lambda: obstore.head_async(store, obj.key))
            except _STORAGE_ERRORS as exc:
                out[i] = describe(exc, obj)
                return
            out[i] = Fingerprint(ref=obj.url, size=meta["size"], version=version_of(meta))

        await self._each(items, one)

    # --- plumbing ---

    async def _each(self, items: Sequence[_T], fn: Callable[[_T], Awaitable[None]]) -> None:
        """fn(item) for every item, `read_concurrency` at a time: a pool of tasks, not one task per item."""
        if not items:
            return
        todo: Iterator[_T] = iter(items)

        async def worker() -> None:
            for item in todo:
                await fn(item)

        await asyncio.gather(*(worker() for _ in range(min(self._concurrency, len(items)))))

    async def _retrying(self, call: Callable[[], Awaitable[_T]]) -> _T:
        """`call()`, tried again on transient failures, waiting as the run's retry policy says between tries.

        A plain loop rather than a tenacity one per call: most calls succeed first time, and building a retry
        loop for each would show in validation's rows/s. Whether to try again, and the wait, are the policy's.
        """
        attempt = 0
        while True:
            attempt += 1
            try:
                return await call()
            except _STORAGE_ERRORS as exc:
                wait = self._retries.after_storage_failure(attempt) if transient(exc) else None
                if wait is None:
                    raise
            await self._sleep(wait)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# A placeholder for a result not yet in: every one is replaced before check_many returns.
_PENDING = ImageProblem(reason=Reason.IMAGE_UNREADABLE, message="not checked")

"""An ImageSource whose photos carry their PhotoKey pin, not their plain SHA-256: what a run is given."""

from __future__ import annotations

from collections.abc import Sequence

from . import Fingerprint, ImageProblem, ImageSource, Photo, PhotoKey, Pinned


class KeyedImageSource(ImageSource):
    """`inner`'s photos, each with its digest replaced by `key.pin` of it, and its fingerprint's sample by
    `key.sample` of it: the ledger's key (Store.photo_key). What a check gives (`check_many`) is not keyed: the
    census compares those samples among themselves, and keys them only to ask the ledger.

    compose.py wraps the source of every run that has a ledger in one, so the pin the ledger records and the
    one plan.py compares are keyed alike, and the plain digest never leaves memory. The photo's SHA-256 is
    computed where the bytes are read (in a thread for big ones); its pin is one HMAC over 32 bytes.
    """

    def __init__(self, inner: ImageSource, key: PhotoKey) -> None:
        self._inner = inner
        self._key = key

    async def fingerprint_many(self, raws: Sequence[str]) -> list[Fingerprint | ImageProblem]:
        return await self._inner.fingerprint_many(raws)

    async def check_many(self, raws: Sequence[str]) -> list[Fingerprint | ImageProblem]:
        return await self._inner.check_many(raws)

    async def unchanged_many(self, raws: Sequence[str], pinned: Sequence[Pinned]) -> list[bool]:
        return await self._inner.unchanged_many(raws, pinned)

    async def read(self, fingerprint: Fingerprint) -> Photo:
        return self._keyed(await self._inner.read(fingerprint))

    async def read_source(self, fingerprint: Fingerprint) -> Photo:
        return self._keyed(await self._inner.read_source(fingerprint))

    def _keyed(self, photo: Photo) -> Photo:
        sent = photo.sent_sha256
        fp = photo.fingerprint
        if fp.sample:  # 0: nothing sampled, nothing to key
            fp = Fingerprint(ref=fp.ref, size=fp.size, version=fp.version, sample=self._key.sample(fp.sample))
        return Photo(
            data=photo.data,
            sha256=self._key.pin(photo.sha256),
            fingerprint=fp,
            sent_sha256=None if sent is None else self._key.pin(sent),
            note=photo.note,
        )

    async def close(self) -> None:
        await self._inner.close()

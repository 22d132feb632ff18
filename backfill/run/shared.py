"""Photos shared by several user_ids: the census of a manifest's checked photos, and which rows it rejects.

The one home of the `shared_photo` decision (`max_ids_per_photo`). One face for two users is almost always a
data error (an export that joined the wrong column, a placeholder photo), and there is no telling which user
the face belongs to, so **every** row of a photo named by more user_ids than the setting allows is rejected,
not all but the first.

Found as a duplicate-file finder finds copies, cheapest test first, without holding every key in memory:

1. Every photo that passed its checks is put in a temporary SQLite table (on disk, deleted when closed: memory
   stays flat at 10M rows) with its size and the sample its check already read (`Fingerprint.sample`: a digest
   of its head and tail), so the census costs no read of its own.
2. Only rows whose (size, sample) is named by more IDs than allowed (this manifest's, and in a run the ledger's,
   below) are candidates; only those are read whole and digested (`Photo.sha256`: in a run, the ledger's keyed
   pin). Photos with a size or sample of their own, nearly all of a clean manifest, are never read whole. A
   candidate that can't be read whole (gone, broken since its check, storage failing past its retries) can't be
   counted, so it is rejected with the reason its read gave rather than sent uncounted (a read that fails now and
   works at send time would let a shared photo through), and so are the rows alike to it, which may share its photo
   (`shared_photo`, saying so).
3. Candidates with the same digest are one photo; a digest named by more IDs than allowed is a shared photo.

Each candidate row has a user_id of its own: the manifest's text rules already reject every row of an ID that
appears twice with another photo (`duplicate_user_id`) and every later exact copy (`duplicate_row`). In a run, a
row the ledger holds as done (enrolled earlier) is counted by the pin it was sent with, its photo never read: it
is never rejected for sharing (what is enrolled stays enrolled), but the new IDs that name its photo are. Its
pin is asked for only when a photo that may be sent has its size, and the resume of a finished job takes no
census at all (`SharedPhotoRows`).

IDs sent from other manifests count too, though no line names them: the ledger keeps each pinned photo's size
and sample (keyed, `PhotoKey.sample`), so a run asks it for the IDs pinned to a photo like each one it may send
(`Store.holders`, one query per chunk of distinct keys), makes the rows that match candidates, and counts those
IDs by their pins, never reading their photos. Rows the ledger sent before it kept samples (schema 5) are found
only through this manifest's lines.

IDs are counted once each, by pin: an ID on a line and in the ledger with the same photo is one ID, so a re-run
never rejects a row because of its own pin; an ID the ledger pins to this photo while its line names another is
one more ID for this photo (the pin binds it, and `user_id_reused` rejects its line). Every process of a fleet
takes the census of the whole manifest; rows of a shared photo are never sent by any of them, so the ones that
start later count the same groups.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from ..images import Fingerprint, ImageError, ImageProblem, ImageSource, PhotoKey
from ..ledger import HOLDERS_PAGE, Holder, LedgerRow, Store
from ..manifest import Batch, Candidate, Manifest, Reject
from ..vocab import Reason
from .rows import Rows

SHOWN_LINES = 10  # lines a reject message and a group's listing name
_READ_AT_ONCE = 32  # candidates read whole at a time (object storage: requests in flight)
_MESSAGES_KEPT = 4096  # groups' messages kept made (a group's rows come close together, mostly)
_ALIKE_UNREAD = (
    "its photo may be the same as another row's (alike in size, head and tail), which couldn't be read whole to "
    "tell (that row's reject says why): held back, since a photo shared by several user_ids is never sent "
    "uncounted. Run again once that photo reads"
)
_LOOKUP = 500  # lines asked for in one query (SQLite's limit on parameters is 32,766; small stays quick)


@dataclass(frozen=True, slots=True, kw_only=True)
class SharedGroup:
    """One photo named by more rows than allowed: how many, and the first lines that name it."""

    rows: int  # user_ids that name it
    lines: list[int]
    # Of them, IDs on a line of this manifest the ledger holds as done: never rejected for it.
    enrolled: int = 0
    elsewhere: int = 0  # of them, IDs on no line of this manifest that the ledger pins to it: sent earlier

    def shown(self) -> str:
        """The lines that name it, the first of them, with how many more."""
        named = self.rows - self.elsewhere
        more = f" and {named - len(self.lines)} more" if named > len(self.lines) else ""
        return ", ".join(map(str, self.lines)) + more

    def described(self) -> str:
        """Its size and where it is named, as `check` and `validate` list it."""
        earlier = f", and {self.elsewhere} sent earlier from other manifests" if self.elsewhere else ""
        return f"{self.rows} user_ids: lines {self.shown()}{earlier}"


class Census:
    """The photos of one manifest's rows, added a chunk at a time; `settle` says which are shared.

    `key` keys every sample the census holds (`PhotoKey.sample`): a run's is the ledger's, so that its samples
    compare with the ledger's own; `validate`'s a throwaway one. A sample is a plain SHA-256 of a photo's first
    and last bytes, which anyone holding the photo could compute: keyed, the temporary file that may spill to
    TMPDIR holds nothing that tells of a photo.
    """

    def __init__(self, max_ids: int, key: PhotoKey) -> None:
        if max_ids < 1:
            raise ValueError(f"max_ids must be at least 1, not {max_ids}")
        self.max_ids = max_ids
        self.photos = 0
        self._key = key
        # "": a private temporary database, on disk (SQLite spills it past its small page cache), removed when
        # closed. It holds lines, user_ids, sizes, keyed samples and paths; never a photo's bytes, nor a digest
        # of one past `settle`.
        self._db = sqlite3.connect("", isolation_level=None)
        self._db.execute("PRAGMA journal_mode = OFF")
        self._db.execute("PRAGMA synchronous = OFF")
        # done: the ledger holds the row's ID as done (enrolled earlier): counted with its pin, never rejected.
        self._db.execute(
            "CREATE TABLE photo (line INTEGER PRIMARY KEY, user_id TEXT, size INTEGER, sample INTEGER, ref TEXT, "
            "version TEXT, done INTEGER)"
        )

    def add(self, rows: Iterable[tuple[int, str, Fingerprint]]) -> None:
        """Rows that may be sent, whose photo passed its checks: (line, user_id, the fingerprint it gave)."""
        before = self._db.total_changes
        keyed = self._key.sample
        with self._transaction():  # one per chunk: a transaction per row costs nearly twice as much
            self._db.executemany(
                "INSERT INTO photo VALUES (?, ?, ?, ?, ?, ?, 0)",
                (
                    (line, uid, f.size, keyed(f.sample) if f.sample else 0, f.ref, f.version)
                    for line, uid, f in rows
                ),
            )
        self.photos += self._db.total_changes - before

    def add_done(self, rows: Iterable[tuple[int, str, int | None]]) -> None:
        """Rows the ledger holds as done: (line, user_id, the size of the photo it was sent with). Their photos
        are not read: the ledger's pin says what was sent, and is asked for only if a photo that may be sent
        has the same size."""
        with self._transaction():
            self._db.executemany(
                "INSERT INTO photo VALUES (?, ?, ?, NULL, NULL, NULL, 1)",
                ((line, uid, size) for line, uid, size in rows if size is not None),
            )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    async def settle(
        self, images: ImageSource, pins: PinsOf | None = None, holders: HoldersOf | None = None
    ) -> Shared:
        """Asks `holders` for the IDs the ledger pins to a photo like one that may be sent, reads the candidates
        whole (only those), asks `pins` for the pins of the done rows that may share a photo with them, and
        finds the shared photos; the census is then read-only."""
        db = self._db
        db.execute("BEGIN")
        db.execute("CREATE INDEX photo_key ON photo (done, size, sample)")
        # line is NULL for an ID the ledger holds that no line of this manifest names with that photo.
        db.execute("CREATE TABLE pinned (line INTEGER, user_id TEXT, pin TEXT, done INTEGER)")
        db.execute("CREATE TABLE held (user_id TEXT, size INTEGER, sample INTEGER, pin TEXT)")
        if holders is not None:
            keys = db.execute("SELECT DISTINCT size, sample FROM photo WHERE done = 0 AND sample != 0")
            while chunk := keys.fetchmany(_LOOKUP):
                after: Holder | None = None
                while True:  # a page at a time: a placeholder photo may be pinned to a million IDs
                    page = await holders(chunk, after, HOLDERS_PAGE)
                    db.executemany("INSERT INTO held VALUES (?, ?, ?, ?)", page)
                    if len(page) < HOLDERS_PAGE:
                        break
                    after = page[-1]
        # Candidates: rows that may be sent whose size and sample are named by more IDs than allowed, counting
        # this manifest's and the ledger's (an ID both on a line and in the ledger once, so that a row held by
        # its own ID alone, as every row of a re-run is, is no candidate); or whose size is that of a photo a
        # done row was sent with.
        # The manifest's own keys are counted on photo_key's index; only keys the ledger holds too are counted
        # with its IDs (a few, nearly always), so that a manifest with no ledger pays what it always did.
        db.execute("CREATE INDEX held_key ON held (size, sample)")
        candidates = db.execute(
            "SELECT line, user_id, ref, size, version FROM photo WHERE done = 0 AND ((size, sample) IN "
            "(SELECT size, sample FROM photo WHERE done = 0 GROUP BY size, sample HAVING count(*) > ?) "
            "OR (size, sample) IN (SELECT size, sample FROM (SELECT user_id, size, sample FROM photo "
            "WHERE done = 0 AND (size, sample) IN (SELECT size, sample FROM held) UNION "
            "SELECT user_id, size, sample FROM held) GROUP BY size, sample HAVING count(*) > ?) "
            "OR size IN (SELECT size FROM photo WHERE done = 1))",
            (self.max_ids, self.max_ids),
        )
        # A candidate that can't be read whole can't be counted: it is held back (`unread`), not sent uncounted,
        # or a storage error at this moment would let a shared photo through when it reads again at send time.
        db.execute("CREATE TABLE unread (line INTEGER PRIMARY KEY, reason TEXT, message TEXT) WITHOUT ROWID")
        read = 0
        while chunk := candidates.fetchmany(_READ_AT_ONCE):
            prints = [Fingerprint(ref=ref, size=size, version=version) for _, _, ref, size, version in chunk]
            found = await asyncio.gather(*(_pin(images, fp) for fp in prints))
            read += len(chunk)
            pinned = list(zip(chunk, found, strict=True))
            db.executemany(
                "INSERT INTO pinned VALUES (?, ?, ?, 0)",
                [(line, uid, pin) for (line, uid, *_), pin in pinned if isinstance(pin, str)],
            )
            db.executemany(
                "INSERT INTO unread VALUES (?, ?, ?)",
                [
                    (
                        line,
                        pin.reason.value,
                        f"{pin.message} (read whole to count shared photos: not sent uncounted)",
                    )
                    for (line, *_), pin in pinned
                    if isinstance(pin, ImageProblem)
                ],
            )
        if pins is not None:
            done = db.execute(
                "SELECT line, user_id FROM photo WHERE done = 1 AND size IN "
                "(SELECT p.size FROM photo p JOIN pinned USING (line))"
            )
            while chunk := done.fetchmany(_LOOKUP):
                known = await pins([uid for _, uid in chunk])
                db.executemany(
                    "INSERT INTO pinned VALUES (?, ?, ?, 1)",
                    [(line, uid, known[uid]) for line, uid in chunk if known.get(uid) is not None],
                )
        db.execute("INSERT INTO pinned SELECT NULL, user_id, pin, 1 FROM held")
        db.execute("DROP TABLE held")
        db.execute("CREATE INDEX pinned_pin ON pinned (pin, line)")
        # A photo is shared when more IDs than allowed name it and at least one of them may be sent. All in SQL,
        # so that no group is ever held in memory: a placeholder photo may be named by every row.
        db.execute(
            "CREATE TABLE grp (grp INTEGER PRIMARY KEY, pin TEXT, rows INTEGER, done INTEGER, elsewhere INTEGER, "
            "lines TEXT)"
        )
        db.execute(
            "INSERT INTO grp SELECT row_number() OVER (ORDER BY min(line)), pin, count(DISTINCT user_id), "
            "count(DISTINCT user_id) FILTER (WHERE done = 1 AND line IS NOT NULL), count(DISTINCT user_id) - "
            "count(DISTINCT user_id) FILTER (WHERE line IS NOT NULL), '' "
            "FROM pinned GROUP BY pin HAVING count(DISTINCT user_id) > ? AND min(done) = 0",
            (self.max_ids,),
        )
        db.execute("CREATE UNIQUE INDEX grp_pin ON grp (pin)")
        db.execute(
            "UPDATE grp SET lines = (SELECT group_concat(line) FROM (SELECT DISTINCT line FROM pinned "
            "WHERE pinned.pin = grp.pin AND line IS NOT NULL ORDER BY line LIMIT ?))",
            (SHOWN_LINES,),
        )
        db.execute("CREATE TABLE shared (line INTEGER PRIMARY KEY, grp INTEGER) WITHOUT ROWID")
        db.execute(
            "INSERT INTO shared SELECT p.line, g.grp FROM pinned p JOIN grp g USING (pin) WHERE p.done = 0"
        )
        # The rows alike in size and sample to one that couldn't be read may share its photo: they can't be
        # cleared either, and are held back with it.
        db.execute(
            "INSERT INTO unread SELECT p.line, ?, ? FROM photo p WHERE p.done = 0 AND (p.size, p.sample) IN "
            "(SELECT size, sample FROM photo JOIN unread USING (line)) AND p.line NOT IN (SELECT line FROM unread) "
            "AND p.line NOT IN (SELECT line FROM shared)",
            (Reason.SHARED_PHOTO.value, _ALIKE_UNREAD),
        )
        db.execute("UPDATE grp SET pin = NULL")
        db.execute("DROP TABLE pinned")  # the digests are not kept past this point
        db.execute("COMMIT")
        return Shared(db, max_ids=self.max_ids, photos=self.photos, read_whole=read)

    def close(self) -> None:
        self._db.close()


# The pins the ledger holds for these user_ids (keyed, as a run's photos are), None where it holds none.
PinsOf = Callable[[list[str]], Awaitable[Mapping[str, str | None]]]
# `Store.holders`: the IDs the ledger pins to a photo of one of these (size, keyed sample) pairs, a page at a time.
HoldersOf = Callable[[list[tuple[int, int]], "Holder | None", int], Awaitable[list[Holder]]]


async def _pin(images: ImageSource, fingerprint: Fingerprint) -> str | ImageProblem:
    try:
        # The source's pin, as the ledger keeps it: with --normalize, read() would decode and re-encode it too.
        return (await images.read_source(fingerprint)).sha256
    except ImageError as exc:
        return exc.problem  # gone, broken since its check, or storage still failing after the retries


class Shared:
    """The census's answer: the shared photos (groups), and the message of each row rejected for one."""

    def __init__(self, db: sqlite3.Connection, *, max_ids: int, photos: int, read_whole: int) -> None:
        self._db = db
        self.max_ids = max_ids
        self.photos = photos  # photos counted
        self.read_whole = read_whole  # of which read whole: the candidates
        self._said: dict[int, str] = {}
        self.groups, self.rows = db.execute("SELECT count(*), coalesce(sum(rows), 0) FROM grp").fetchone()
        (self.rejected,) = db.execute("SELECT count(*) FROM shared").fetchone()  # rows not enrolled yet
        (self.unread,) = db.execute("SELECT count(*) FROM unread").fetchone()  # candidates held back unread

    def listing(self, limit: int) -> list[SharedGroup]:
        """The first `limit` shared photos, largest first (then by first line)."""
        found = self._db.execute(
            "SELECT rows, done, elsewhere, lines FROM grp ORDER BY rows DESC, grp LIMIT ?", (limit,)
        )
        return [
            SharedGroup(rows=rows, lines=_lines(lines), enrolled=done, elsewhere=elsewhere)
            for rows, done, elsewhere, lines in found
        ]

    def rejects(self, candidates: Sequence[Candidate]) -> dict[int, Reject]:
        """{line: its reject} of the candidates whose photo is shared, or couldn't be read to be counted."""
        if not (self.groups or self.unread) or not candidates:
            return {}
        by_line = {c.line: c for c in candidates}
        out: dict[int, Reject] = {}
        lines = list(by_line)
        for start in range(0, len(lines), _LOOKUP):
            part = lines[start : start + _LOOKUP]
            unread = self._db.execute(
                f"SELECT line, reason, message FROM unread WHERE line IN ({','.join('?' * len(part))})", part
            )
            for line, reason, said in unread:
                out[line] = Reject(
                    line=line, user_id=by_line[line].user_id, reason=Reason(reason), message=said
                )
            found = self._db.execute(
                "SELECT s.line, s.grp, g.rows, g.done, g.elsewhere, g.lines FROM shared s JOIN grp g USING (grp) "
                f"WHERE s.line IN ({','.join('?' * len(part))})",
                part,
            )
            for line, number, rows, done, elsewhere, shown in found:
                c = by_line[line]
                said = self._message(number, rows, done, elsewhere, shown)
                out[line] = Reject(line=line, user_id=c.user_id, reason=Reason.SHARED_PHOTO, message=said)
        return out

    def every_reject(self) -> Iterator[Reject]:
        """The reject of every row of a shared photo, and of every candidate that couldn't be read to be
        counted, in line order."""
        found = self._db.execute(
            "SELECT s.line, p.user_id, s.grp, g.rows, g.done, g.elsewhere, g.lines, NULL, NULL FROM shared s "
            "JOIN grp g USING (grp) JOIN photo p USING (line) "
            "UNION ALL SELECT u.line, p.user_id, NULL, NULL, NULL, NULL, NULL, u.reason, u.message FROM unread u "
            "JOIN photo p USING (line) ORDER BY 1"
        )
        for line, user_id, number, rows, done, elsewhere, shown, reason, said in found:
            if reason is not None:
                yield Reject(line=line, user_id=user_id, reason=Reason(reason), message=said)
                continue
            said = self._message(number, rows, done, elsewhere, shown)
            yield Reject(line=line, user_id=user_id, reason=Reason.SHARED_PHOTO, message=said)

    def _message(self, number: int, rows: int, done: int, elsewhere: int, shown: str) -> str:
        """A group's message, made once for its rows (a group's rows are often close together)."""
        said = self._said.get(number)
        if said is None:
            if len(self._said) >= _MESSAGES_KEPT:
                self._said.clear()
            group = SharedGroup(rows=rows, lines=_lines(shown), enrolled=done, elsewhere=elsewhere)
            said = self._said[number] = message(group, self.max_ids)
        return said

    def split(self, batch: Batch) -> Batch:
        """The batch with the rows of shared photos moved from its candidates to its rejects."""
        found = self.rejects(batch.candidates)
        if not found:
            return batch
        kept = [c for c in batch.candidates if c.line not in found]
        rejects = sorted([*batch.rejects, *found.values()], key=lambda r: r.line)
        return Batch(candidates=kept, rejects=rejects)

    def close(self) -> None:
        self._db.close()


def _lines(shown: str) -> list[int]:
    return [int(line) for line in shown.split(",")]


def message(group: SharedGroup, max_ids: int) -> str:
    """A shared_photo reject's message: the group's size and first lines, why, and the fix."""
    allowed = "one user_id" if max_ids == 1 else f"{max_ids} user_ids"
    earlier = (
        f"; {group.enrolled} of them enrolled earlier with it, and stay enrolled" if group.enrolled else ""
    )
    if group.elsewhere:
        earlier += (
            f"; and {group.elsewhere} more user_id{'s' if group.elsewhere > 1 else ''} sent with it earlier, "
            "which no line here names with it (the ledger pins it to them; they stay as they are)"
        )
    return (
        f"the same photo (by content) is named by {group.rows} different user_ids (lines "
        f"{group.shown()}{earlier}), more than max_ids_per_photo allows ({allowed}): one face for several users "
        "is almost always a data error, and there is no telling which user it belongs to, so every one not yet "
        "enrolled is held back. Give each user their own photo; if these IDs really are one person, raise "
        "max_ids_per_photo (the config file's key, or BACKFILL_MAX_IDS_PER_PHOTO)"
    )


async def take_census(
    manifest: Manifest,
    images: ImageSource,
    *,
    max_ids: int,
    store: Store | None = None,
    stopping: Callable[[], bool] = lambda: False,
) -> Shared | None:
    """The census of every row of `manifest` that passes its text rules and may be sent (neither done nor
    forgotten in `store`), each photo checked as a run checks it (head and tail read). None if `stopping` said
    so first."""
    census = Census(max_ids, store.photo_key if store is not None else PhotoKey.new())
    try:
        batches = manifest.batches()
        while (batch := await asyncio.to_thread(next, batches, None)) is not None:
            if stopping():
                return None
            rows = batch.candidates
            if store is not None and rows:
                done = await store.done([c.user_id for c in rows])
                if done:
                    census.add_done(
                        (c.line, c.user_id, done[c.user_id][2]) for c in rows if c.user_id in done
                    )
                    rows = [c for c in rows if c.user_id not in done]
                # A forgotten ID is never sent again, so it shares no photo with anyone; and the photo of a user
                # who asked to be forgotten is not read, not even for a count.
                gone = await store.forgotten([c.user_id for c in rows]) if rows else {}
                if gone:
                    rows = [c for c in rows if c.user_id not in gone]
            if not rows:
                continue
            checked = await images.check_many([c.image for c in rows])
            census.add(
                (c.line, c.user_id, f)
                for c, f in zip(rows, checked, strict=True)
                if isinstance(f, Fingerprint)
            )
        if store is None:
            return await census.settle(images)
        return await census.settle(images, _pins(store), store.holders)
    except BaseException:
        census.close()
        raise


def _pins(store: Store) -> PinsOf:
    async def pins(user_ids: list[str]) -> dict[str, str | None]:
        return {uid: row.photo_sha256 for uid, row in (await store.lookup(user_ids)).items()}

    return pins


@dataclass(frozen=True, slots=True, kw_only=True)
class Sampled:
    """What `sample_pinned` did: rows pinned before the ledger kept samples, and what became of each."""

    unsampled: int  # pinned rows the ledger held no sample for
    sampled: int  # of them, sampled now: their photo is where it was sent from, unchanged
    changed: int  # their photo is there, but not the version sent (another size or change marker)
    unreadable: int  # their photo can't be checked there now (gone, moved, denied, broken)


_SAMPLED_AT_ONCE = 500  # rows checked, and their samples kept, at a time


async def sample_pinned(store: Store, images: ImageSource) -> Sampled:
    """Keeps the sample of each photo the ledger pinned before it kept samples (schema 5), so that later
    censuses find the IDs it was sent for: each photo is checked where it was sent from (its head and tail
    read, as a census's check reads them), and kept only where it is still the version sent (its size and
    change marker, the resume's own quick check), since only then is its sample the pinned photo's."""
    unsampled = sampled = changed = unreadable = 0
    key = store.photo_key

    async def flush(part: list[LedgerRow]) -> None:
        nonlocal sampled, changed, unreadable
        checked = await images.check_many([row.image_ref or "" for row in part])
        keep: list[tuple[str, str, int]] = []
        for row, found in zip(part, checked, strict=True):
            if not isinstance(found, Fingerprint) or not found.sample:
                unreadable += 1
            elif found != row.fingerprint:
                changed += 1
            else:
                keep.append((row.user_id, row.photo_sha256 or "", key.sample(found.sample)))
        await store.keep_samples(keep)
        sampled += len(keep)

    part: list[LedgerRow] = []
    async for row in store.rows():
        if row.photo_sha256 is None or row.photo_sample is not None:
            continue
        unsampled += 1
        if row.fingerprint is None:
            unreadable += 1
            continue
        part.append(row)
        if len(part) >= _SAMPLED_AT_ONCE:
            await flush(part)
            part = []
    if part:
        await flush(part)
    return Sampled(unsampled=unsampled, sampled=sampled, changed=changed, unreadable=unreadable)


class SharedPhotoRows:
    """A run's rows (`Rows`), with every row of a shared photo rejected. The census is taken before the first
    batch with a row that may be sent is handed out, so no row of a shared photo is ever sent, whichever comes
    first in the file; batches of rows the ledger holds as done (`done`) go out before it, since none of them
    is ever rejected for sharing: the resume of a finished job takes no census at all."""

    def __init__(
        self,
        inner: Rows,
        census: Callable[[], Awaitable[Shared | None]],
        done: Callable[[list[str]], Awaitable[Collection[str]]] | None = None,
    ) -> None:
        self._inner = inner
        self._census = census
        self._done = done
        self._shared: Shared | None = None
        self._stopped = False

    @property
    def total(self) -> int | None:
        return self._inner.total

    @property
    def responsible(self) -> int:
        return self._inner.responsible

    async def next_batch(self) -> Batch | None:
        if self._stopped:
            return None
        batch = await self._inner.next_batch()
        if batch is None:
            return None
        if self._shared is None:
            if not batch.candidates or await self._all_done(batch.candidates):
                return batch
            taken = await self._census()
            if taken is None:
                # A stop came during the census: nothing more is handed out (this batch's rows are not reached,
                # and a fleet's claims on them go back with the rest).
                self._stopped = True
                return None
            self._shared = taken
        return self._shared.split(batch)

    async def _all_done(self, candidates: list[Candidate]) -> bool:
        if self._done is None:
            return False
        ids = [c.user_id for c in candidates]
        return len(await self._done(ids)) == len(ids)

    def handed_back(self, user_id: str) -> None:
        self._inner.handed_back(user_id)

    def give_back_unsent(self, in_hand: Collection[str]) -> None:
        self._inner.give_back_unsent(in_hand)

    async def close(self) -> None:
        try:
            await self._inner.close()
        finally:
            if self._shared is not None:
                self._shared.close()

"""The fault checker: a pure function from a recorded history and the final snapshot to the
violations of the contract that they prove. It never guesses: a rule fires only on evidence."""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum

from tests.faults.history import Delete, History, Read, Snapshot, Write


class Kind(StrEnum):
    MIXED_PAIR = "mixed pair"
    FOREIGN_DATA = "another user's data"
    UNKNOWN_PAIR = "unknown pair"
    WRONG_VERSION = "wrong version"
    BAD_STATUS = "bad read status"
    LOST_PROFILE = "404 after live"
    STALE_READ = "stale read"
    LOST_WRITE = "lost write"
    UNEXPLAINED_DEAD = "dead without reason"
    LIVE_REGRESSED = "live behind a finished intent"
    UNKNOWN_LIVE = "live version nobody wrote"
    DANGLING_POINTER = "dangling pointer"
    ORPHAN_BLOB = "orphan blob"


@dataclass(frozen=True)
class Violation:
    kind: Kind
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


# An answer that carries no data and claims nothing: an outage. Reads are never rate-limited.
NO_DATA_STATUSES = frozenset({503})
FINISHED = frozenset({"done", "superseded"})
ACCOUNTED = FINISHED | {"dead"}


class _Writes:
    """Every write that was sent, by token and by image: whether or not its answer came back, the
    API may have committed it, so any of them may legitimately show up in a read."""

    def __init__(self, writes: Iterable[Write]) -> None:
        self.by_token: dict[str, Write] = {}
        self.by_image: dict[str, Write] = {}
        for write in writes:
            self.by_token.setdefault(write.token, write)
            self.by_image.setdefault(write.image_sha, write)


def check(history: History, snapshot: Snapshot) -> list[Violation]:
    writes = _Writes(history.writes)
    return [
        *_check_read_answers(history.reads, writes),
        *_check_404s(history.reads, history.deletes),
        *_check_versions_never_go_back(history.reads),
        *_check_acknowledged_writes(history.writes, snapshot),
        *_check_live_versions(snapshot, writes),
        *_check_bucket(snapshot),
    ]


def _describe(read: Read) -> str:
    return f"read of {read.user!r} via API {read.api} during [{read.start:.3f}, {read.end:.3f}]"


def _check_read_answers(reads: Iterable[Read], writes: _Writes) -> Iterator[Violation]:
    for read in reads:
        if read.status is None or read.status in NO_DATA_STATUSES or read.status == 404:
            continue
        if read.status != 200 or read.seen is None:
            yield Violation(Kind.BAD_STATUS, f"{_describe(read)} answered {read.status}")
            continue
        found = _check_pair(read, writes)
        if found is not None:
            yield found


def _check_pair(read: Read, writes: _Writes) -> Violation | None:
    """A 200 must be exactly one write's (metadata, image) pair, of that user, at its version."""
    seen = read.seen
    assert seen is not None
    where = _describe(read)
    if seen.user != read.user:
        return Violation(Kind.FOREIGN_DATA, f"{where} returned the profile of {seen.user!r}")
    if seen.image_sha != seen.declared_sha:
        return Violation(
            Kind.MIXED_PAIR, f"{where} returned image bytes {seen.image_sha[:12]} described as {seen.declared_sha[:12]}"
        )
    by_token, by_image = writes.by_token.get(seen.token), writes.by_image.get(seen.image_sha)
    if by_token is None and by_image is None:
        return Violation(Kind.UNKNOWN_PAIR, f"{where} returned {seen.token!r} and an image that nobody wrote")
    for write in (by_token, by_image):
        if write is not None and write.user != read.user:
            return Violation(Kind.FOREIGN_DATA, f"{where} returned {write.user!r}'s write {write.token!r}")
    if by_token is not by_image:
        image_of = "an unknown write" if by_image is None else repr(by_image.token)
        message = f"{where} returned the metadata of {seen.token!r} with the image of {image_of}"
        return Violation(Kind.MIXED_PAIR, message)
    write = by_token
    assert write is not None
    if write.start > read.end:
        return Violation(Kind.UNKNOWN_PAIR, f"{where} returned {write.token!r}, sent only at {write.start:.3f}")
    if write.version is not None and write.version != seen.version:
        return Violation(
            Kind.WRONG_VERSION, f"{where} returned {write.token!r} as version {seen.version}; it was {write.version}"
        )
    return None


def _by_user(reads: Iterable[Read]) -> dict[str, list[Read]]:
    grouped: dict[str, list[Read]] = defaultdict(list)
    for read in reads:
        grouped[read.user].append(read)
    return grouped


class _Before:
    """The 200 reads of one user ordered by end, to ask which of them ended before a moment."""

    def __init__(self, reads: Iterable[Read]) -> None:
        ok = sorted((r for r in reads if r.status == 200 and r.seen is not None), key=lambda r: r.end)
        self._ends = [r.end for r in ok]
        # Prefix maxima: the read that started last, and the read that saw the highest version.
        self.latest_start: list[Read] = []
        self.highest: list[Read] = []
        for read in ok:
            last, high = (self.latest_start[-1], self.highest[-1]) if self.latest_start else (read, read)
            self.latest_start.append(read if read.start >= last.start else last)
            assert read.seen is not None and high.seen is not None
            self.highest.append(read if read.seen.version >= high.seen.version else high)

    def count_ended_before(self, moment: float) -> int:
        return bisect.bisect_left(self._ends, moment)


def _check_404s(reads: Iterable[Read], deletes: Iterable[Delete]) -> Iterator[Violation]:
    """A 404 after the profile was seen live needs a delete that may have committed in between.

    If read L (200) ended before read R (404) began, a tombstone was committed between their
    moments in the database, so by a delete D with D.start < R.end and D.end > L.start (a delete
    without an answer may commit at any later time). Checking the L that started last is enough:
    a delete that fits it fits every earlier L too."""
    deletes_of: dict[str, list[Delete]] = defaultdict(list)
    for delete in deletes:
        deletes_of[delete.user].append(delete)
    for user, mine in _by_user(reads).items():
        before = _Before(mine)
        for read in mine:
            if read.status != 404:
                continue
            count = before.count_ended_before(read.start)
            if count == 0:
                continue  # nothing was seen live before this read began
            seen_live = before.latest_start[count - 1]
            if not any(
                d.start < read.end and (d.end is None or d.end > seen_live.start) for d in deletes_of.get(user, [])
            ):
                assert seen_live.seen is not None
                yield Violation(
                    Kind.LOST_PROFILE,
                    f"{_describe(read)} answered 404, but {seen_live.seen.token!r} was read live during "
                    f"[{seen_live.start:.3f}, {seen_live.end:.3f}] and no delete was sent in between",
                )


def _check_versions_never_go_back(reads: Iterable[Read]) -> Iterator[Violation]:
    """The live version of a user only grows (a tombstone takes the next number too), so a read that
    began after another ended never returns an older version."""
    for mine in _by_user(reads).values():
        before = _Before(mine)
        for read in mine:
            if read.status != 200 or read.seen is None:
                continue
            count = before.count_ended_before(read.start)
            if count == 0:
                continue
            newer = before.highest[count - 1]
            assert newer.seen is not None
            if newer.seen.version > read.seen.version:
                yield Violation(
                    Kind.STALE_READ,
                    f"{_describe(read)} returned version {read.seen.version} after version "
                    f"{newer.seen.version} was read during [{newer.start:.3f}, {newer.end:.3f}]",
                )


def _check_acknowledged_writes(writes: Iterable[Write], snapshot: Snapshot) -> Iterator[Violation]:
    """Every 202 ends live, superseded or dead with its reason; a finished one left the live pointer
    at its version or later."""
    for write in writes:
        if not write.accepted:
            continue
        final = snapshot.intents.get(write.intent_id or "")
        if final is None:
            yield Violation(Kind.LOST_WRITE, f"202 for {write.token!r} (intent {write.intent_id}): the intent is gone")
            continue
        if final.state not in ACCOUNTED:
            yield Violation(Kind.LOST_WRITE, f"202 for {write.token!r} (intent {write.intent_id}): still {final.state}")
            continue
        if final.state == "dead" and not (final.last_error or "").strip():
            yield Violation(Kind.UNEXPLAINED_DEAD, f"202 for {write.token!r}: the intent died without a reason")
        live = snapshot.live.get(final.user)
        if final.state in FINISHED and (live is None or live.version < final.version):
            at = "nothing" if live is None else f"version {live.version}"
            yield Violation(
                Kind.LIVE_REGRESSED,
                f"{write.token!r} finished {final.state} as version {final.version} of {final.user!r}, "
                f"but {at} is live",
            )


def _check_live_versions(snapshot: Snapshot, writes: _Writes) -> Iterator[Violation]:
    """Every live version is one write's pair of that user, and its blob holds exactly its bytes."""
    for user, live in sorted(snapshot.live.items()):
        if live.kind != "put":
            continue
        write = writes.by_token.get(live.token or "")
        if write is None or write.user != user or write.image_sha != live.sha256:
            yield Violation(Kind.UNKNOWN_LIVE, f"version {live.version} of {user!r} ({live.token!r}) matches no write")
        held = snapshot.bucket.get(live.blob_key or "")
        if held is None:
            yield Violation(
                Kind.DANGLING_POINTER, f"live version {live.version} of {user!r} points at missing {live.blob_key}"
            )
        elif held != live.sha256:
            yield Violation(
                Kind.DANGLING_POINTER,
                f"live version {live.version} of {user!r}: {live.blob_key} holds {held[:12]}, not {live.sha256}",
            )


def _check_bucket(snapshot: Snapshot) -> Iterator[Violation]:
    """After quiescence and the grace period the bucket holds only blobs that something needs."""
    needed = {live.blob_key for live in snapshot.live.values() if live.kind == "put"} | snapshot.pending_keys
    for key in sorted(snapshot.bucket):
        if key not in needed:
            yield Violation(Kind.ORPHAN_BLOB, f"{key} is neither a live version's nor a pending intent's blob")

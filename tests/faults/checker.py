"""The fault checker: a pure function from a recorded history and the final snapshot to the
violations of the contract that they prove. It never guesses: a rule fires only on evidence."""

from __future__ import annotations

import bisect
import itertools
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, TypeVar

from service.core.operations import ReplayOutcome
from tests.faults.history import AdminAction, AdminCall, Delete, History, Read, Route, Snapshot, Write


class Kind(StrEnum):
    MIXED_PAIR = "mixed pair"
    FOREIGN_DATA = "another user's data"
    UNKNOWN_PAIR = "unknown pair"
    WRONG_VERSION = "wrong version"
    BAD_STATUS = "bad read status"
    LOST_PROFILE = "404 after live"
    STALE_READ = "stale read"
    RESURRECTED = "served after delete"
    LOST_WRITE = "lost write"
    UNEXPLAINED_DEAD = "dead without reason"
    LIVE_REGRESSED = "live behind a finished intent"
    UNKNOWN_LIVE = "live version nobody wrote"
    DANGLING_POINTER = "dangling pointer"
    ORPHAN_BLOB = "orphan blob"
    BAD_ADMIN_ANSWER = "bad operator answer"
    FOREIGN_VARIANT = "variant of another image"


@dataclass(frozen=True)
class Violation:
    kind: Kind
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


# An answer that carries no data and claims nothing: an outage. Reads are never rate-limited.
NO_DATA_STATUSES = frozenset({503})
FINISHED = frozenset({"done", "superseded"})
# How far a lossy variant's colour may stray from its image's, per channel.
VARIANT_COLOUR_TOLERANCE = 16
ACCOUNTED = FINISHED | {"dead"}
# Replay outcomes that a race explains: a worker, or another replay, got to the intent first.
# The others (not found, no staged bytes) would mean that a dead or stuck intent lost its data.
EXPLAINED_OUTCOMES = frozenset(
    {ReplayOutcome.REPLAYED, ReplayOutcome.ALREADY_PENDING, ReplayOutcome.LEASED, ReplayOutcome.FINISHED}
)


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
    # A versioned image may answer 404 at any time (not published yet, collected, deleted), and
    # an old version's image is no stale read: the rules on 404s and on order are the profile's.
    profile_reads = [read for read in history.reads if read.route is Route.PROFILE]
    floors = _TombstoneFloors(history)
    return [
        *_check_read_answers(history.reads, writes),
        *_check_404s(profile_reads, history.deletes),
        *_check_versions_never_go_back(profile_reads),
        *_check_nothing_served_after_delete(history.reads, floors),
        *_check_acknowledged_writes(history.writes, snapshot),
        *_check_live_versions(snapshot, writes),
        *_check_no_write_outlived_a_delete(snapshot, floors),
        *_check_bucket(snapshot),
        *_check_operator(history.admin),
    ]


def _describe(read: Read) -> str:
    what = {Route.VERSION_IMAGE: f"version {read.version} image", Route.VARIANT: "variant read"}.get(read.route, "read")
    return f"{what} of {read.user!r} via API {read.api} during [{read.start:.3f}, {read.end:.3f}]"


def _check_read_answers(reads: Iterable[Read], writes: _Writes) -> Iterator[Violation]:
    image_of: dict[tuple[str, int], Read] = {}  # the first good 200 of each (user, version)
    variant_of: dict[tuple[str, int], Read] = {}  # the same, of variant reads
    for read in reads:
        if read.status is None or read.status in NO_DATA_STATUSES or read.status == 404:
            continue
        if read.status != 200 or read.seen is None:
            yield Violation(Kind.BAD_STATUS, f"{_describe(read)} answered {read.status}")
            continue
        if read.route is Route.VARIANT:
            found = _check_variant(read, writes) or _check_one_image_per_version(read, variant_of)
        else:
            found = _check_pair(read, writes) or _check_one_image_per_version(read, image_of)
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
    by_image = writes.by_image.get(seen.image_sha)
    # The version route carries no metadata: its image alone names the write.
    by_token = by_image if seen.token is None else writes.by_token.get(seen.token)
    if by_token is None and by_image is None:
        what = "an image" if seen.token is None else f"{seen.token!r} and an image"
        return Violation(Kind.UNKNOWN_PAIR, f"{where} returned {what} that nobody wrote")
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


def _check_variant(read: Read, writes: _Writes) -> Violation | None:
    """A variant's 200 is the variant the body describes, of the write that body names, at its
    version, and made from that write's image (its colour)."""
    seen = read.seen
    assert seen is not None
    where = _describe(read)
    if seen.user != read.user:
        return Violation(Kind.FOREIGN_DATA, f"{where} returned the profile of {seen.user!r}")
    if seen.image_sha != seen.declared_sha:
        return Violation(
            Kind.MIXED_PAIR,
            f"{where} returned variant bytes {seen.image_sha[:12]} described as {seen.declared_sha[:12]}",
        )
    write = writes.by_token.get(seen.token or "")
    if write is None or write.user != read.user:
        return Violation(Kind.UNKNOWN_PAIR, f"{where} returned {seen.token!r}, which {read.user!r} never wrote")
    if write.version is not None and write.version != seen.version:
        return Violation(
            Kind.WRONG_VERSION, f"{where} returned {write.token!r} as version {seen.version}; it was {write.version}"
        )
    if write.colour is not None and not _close(seen.colour, write.colour):
        return Violation(
            Kind.FOREIGN_VARIANT, f"{where}: the variant of {write.token!r} is {seen.colour}, its image {write.colour}"
        )
    return None


def _close(seen: tuple[int, int, int] | None, expected: tuple[int, int, int]) -> bool:
    return seen is not None and all(abs(a - b) <= VARIANT_COLOUR_TOLERANCE for a, b in zip(seen, expected, strict=True))


def _check_one_image_per_version(read: Read, image_of: dict[tuple[str, int], Read]) -> Violation | None:
    """A version's bytes never change, whichever route serves them (a write whose 202 was lost
    names no version, so two reads are the evidence)."""
    assert read.seen is not None
    first = image_of.setdefault((read.user, read.seen.version), read)
    assert first.seen is not None
    if first.seen.image_sha == read.seen.image_sha:
        return None
    return Violation(
        Kind.WRONG_VERSION,
        f"{_describe(read)} returned other bytes as version {read.seen.version} than the {_describe(first)}",
    )


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


Item = TypeVar("Item")


class _Highest(Generic[Item]):
    """Values that became known at moments: the highest known before a moment, with its item."""

    def __init__(self, known: Iterable[tuple[float, int, Item]]) -> None:
        ordered = sorted(known, key=lambda entry: entry[0])
        self._moments = [moment for moment, _, _ in ordered]
        self._highest: list[tuple[float, int, Item]] = list(itertools.accumulate(ordered, _higher))

    def before(self, moment: float) -> tuple[int, Item] | None:
        count = bisect.bisect_left(self._moments, moment)
        return None if count == 0 else self._highest[count - 1][1:]

    def overall(self) -> tuple[int, Item] | None:
        return self._highest[-1][1:] if self._highest else None


def _higher(a: tuple[float, int, Item], b: tuple[float, int, Item]) -> tuple[float, int, Item]:
    return b if b[1] > a[1] else a


class _TombstoneFloors:
    """A DELETE answered 204 committed a tombstone above every version accepted before it was
    sent (a 202 answered before it began): its floor. Every version at or below the floor is gone
    for readers from the moment the DELETE answered, and can never be live again."""

    def __init__(self, history: History) -> None:
        accepted: dict[str, list[tuple[float, int, Write]]] = defaultdict(list)
        for write in history.writes:
            if write.accepted and write.end is not None and write.version is not None:
                accepted[write.user].append((write.end, write.version, write))
        known = {user: _Highest(entries) for user, entries in accepted.items()}
        floors: dict[str, list[tuple[float, int, Delete]]] = defaultdict(list)
        for delete in history.deletes:
            if delete.status == 204 and delete.end is not None:
                below = known[delete.user].before(delete.start) if delete.user in known else None
                floors[delete.user].append((delete.end, 1 + (below[0] if below else 0), delete))
        self.of: dict[str, _Highest[Delete]] = {user: _Highest(entries) for user, entries in floors.items()}

    def before(self, user: str, moment: float) -> tuple[int, Delete] | None:
        """The highest floor of a DELETE of `user` answered before `moment`."""
        found = self.of.get(user)
        return None if found is None else found.before(moment)


def _after_deletes(reads: Iterable[Read], floors: _TombstoneFloors) -> Iterator[tuple[Read, int, Delete]]:
    """Reads that began after a DELETE answered, of a version at or below its floor."""
    for read in reads:
        version = read.served_version
        found = floors.before(read.user, read.start)
        if version is not None and found is not None and version <= found[0]:
            yield read, *found


def reads_of_deleted_versions(history: History) -> list[Read]:
    """The version route's reads that the rule on deletes covers: a run where this is empty did
    not test it."""
    return [r for r, _, _ in _after_deletes(history.reads, _TombstoneFloors(history)) if r.route is Route.VERSION_IMAGE]


def _check_nothing_served_after_delete(reads: Iterable[Read], floors: _TombstoneFloors) -> Iterator[Violation]:
    for read, floor, delete in _after_deletes(reads, floors):
        if read.status == 200:
            assert delete.end is not None
            yield Violation(
                Kind.RESURRECTED,
                f"{_describe(read)} returned version {read.served_version}, but a DELETE answered 204 at "
                f"{delete.end:.3f} (sent at {delete.start:.3f}, after version {floor - 1} was accepted)",
            )


def _check_no_write_outlived_a_delete(snapshot: Snapshot, floors: _TombstoneFloors) -> Iterator[Violation]:
    """At the end the live version is the tombstone of the last DELETE or newer: a put at or
    below a floor (a write accepted before the DELETE) went live after it."""
    for user, floor_of in sorted(floors.of.items()):
        highest, live = floor_of.overall(), snapshot.live.get(user)
        if highest is None or live is None:
            continue
        floor, delete = highest
        if live.version < floor or (live.version == floor and live.kind == "put"):
            yield Violation(
                Kind.RESURRECTED,
                f"{live.kind} version {live.version} of {user!r} ({live.token!r}) is live at the end, but a DELETE "
                f"sent at {delete.start:.3f} after version {floor - 1} was accepted answered 204",
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
        for name, (key, sha256) in sorted(live.variants.items()):
            if snapshot.bucket.get(key) != sha256:
                yield Violation(
                    Kind.DANGLING_POINTER, f"variant {name} of live version {live.version} of {user!r}: {key} is not it"
                )


def _check_bucket(snapshot: Snapshot) -> Iterator[Violation]:
    """After quiescence and the grace period the bucket holds only blobs that something needs."""
    live_keys = {live.blob_key for live in snapshot.live.values() if live.kind == "put"}
    variant_keys = {key for live in snapshot.live.values() for key, _ in live.variants.values()}
    needed = live_keys | variant_keys | snapshot.pending_keys
    for key in sorted(snapshot.bucket):
        if key not in needed:
            yield Violation(Kind.ORPHAN_BLOB, f"{key} is neither a live version's nor a pending intent's blob")


def _check_operator(calls: Iterable[AdminCall]) -> Iterator[Violation]:
    """The admin API answers 200 (a replay may also refuse with 409), or 503 in an outage; every
    replay outcome it reports is one that a race explains."""
    for call in calls:
        if call.status is None or call.status in NO_DATA_STATUSES:
            continue
        where = f"{call.action} during [{call.start:.3f}, {call.end:.3f}]"
        if call.status not in (200, 409) or (call.status == 409 and call.action is not AdminAction.REPLAY):
            yield Violation(Kind.BAD_ADMIN_ANSWER, f"{where} answered {call.status}")
            continue
        for intent_id, outcome in zip(call.intents, call.outcomes, strict=False):
            if outcome not in EXPLAINED_OUTCOMES:
                yield Violation(Kind.BAD_ADMIN_ANSWER, f"{where}: intent {intent_id} answered {outcome!r}")

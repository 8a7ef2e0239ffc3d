"""The fault checker against recorded histories: a clean one passes, each planted violation is reported."""

from __future__ import annotations

import hashlib
from dataclasses import replace

from service.core.operations import ReplayOutcome
from tests.faults.checker import Kind, Violation, check, reads_of_deleted_versions
from tests.faults.history import (
    UNREADABLE,
    AdminAction,
    AdminCall,
    Delete,
    FinalIntent,
    History,
    LiveVersion,
    Read,
    Route,
    Seen,
    Snapshot,
    Write,
)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def write(user: str, token: str, start: float, version: int | None, *, answered: bool = True) -> Write:
    return Write(
        user=user,
        token=token,
        image_sha=sha(token),
        start=start,
        end=start + 0.1 if answered else None,
        status=202 if answered else None,
        version=version if answered else None,
        intent_id=f"intent-{token}" if answered else None,
    )


def ok_read(user: str, start: float, token: str, version: int, *, image_of: str | None = None, api: int = 0) -> Read:
    image = sha(image_of or token)
    return Read(user, api, start, start + 0.05, 200, Seen(user, version, token, image, image))


def status_read(user: str, start: float, status: int | None) -> Read:
    return Read(user, 1, start, start + 0.05, status)


def version_read(
    user: str, start: float, version: int, image_of: str | None, *, status: int = 200, etag_of: str | None = None
) -> Read:
    """A read of /versions/{version}/image: the bytes of `image_of`'s write, or no data."""
    seen = None
    if image_of is not None:
        seen = Seen(user, version, None, sha(image_of), sha(etag_of or image_of))
    return Read(user, 0, start, start + 0.05, status, seen, Route.VERSION_IMAGE, version)


RED, BLUE = (200, 20, 20), (20, 20, 200)


def variant_read(
    user: str, start: float, token: str, version: int, colour: tuple[int, int, int], *, bytes_of: str | None = None
) -> Read:
    """A variant read: the body named `token` at `version`; the variant had `colour` and the bytes
    of `bytes_of`'s variant (its own by default)."""
    seen = Seen(user, version, token, sha(f"variant-{bytes_of or token}"), sha(f"variant-{token}"), colour)
    return Read(user, 0, start, start + 0.05, 200, seen, Route.VARIANT)


def clean() -> tuple[History, Snapshot]:
    """ann writes twice and reads both, and an old version's image; bob writes (answer lost, yet it
    went live), then deletes; carl writes and deletes at once, the write dies, the operator replays
    it and it ends superseded by the tombstone."""
    writes = [
        replace(write("ann", "a1", 1.0, 1), colour=RED),
        replace(write("ann", "a2", 2.0, 2), colour=BLUE),
        write("bob", "b1", 1.0, None, answered=False),
        write("bob", "b2", 5.0, 3),
        write("carl", "c1", 1.0, 1),
    ]
    reads = [
        status_read("ann", 0.5, 404),  # before anything was written
        ok_read("ann", 1.5, "a1", 1),
        ok_read("ann", 2.05, "a1", 1),  # a2 accepted but not live yet
        ok_read("ann", 3.0, "a2", 2, api=1),
        status_read("ann", 3.5, 503),  # S3 down
        status_read("ann", 3.6, None),  # API killed mid-request
        ok_read("bob", 2.0, "b1", 1),  # its writer never heard back, yet it was committed
        status_read("bob", 3.05, 404),  # the delete below was in flight
        status_read("bob", 4.0, 404),
        version_read("ann", 3.2, 1, "a1"),  # an older version's image is no stale read
        version_read("ann", 3.3, 1, None, status=404),  # nor is it a lost profile once collected
        version_read("bob", 2.9, 1, "b1"),  # its version is known from the read at 2.0 alone
        version_read("bob", 3.1, 1, "b1"),  # it began before the delete answered
        version_read("bob", 3.5, 1, None, status=404),  # after: gone
        version_read("carl", 1.58, 1, "c1"),  # in flight when the delete answered at 1.6
        version_read("carl", 2.0, 1, None, status=404),
        version_read("carl", 2.1, 1, None, status=503),
        variant_read("ann", 1.6, "a1", 1, (205, 25, 18)),  # lossy, but red
        variant_read("ann", 3.1, "a2", 2, BLUE),
        replace(variant_read("ann", 3.2, "a2", 2, BLUE), status=404, seen=None),  # collected between its requests
    ]
    deletes = [Delete("bob", 3.0, 3.2, 204), Delete("carl", 1.5, 1.6, 204)]
    admin = [
        AdminCall(AdminAction.LIST_DEAD, 2.0, 2.1, 200, ("intent-c1",)),
        AdminCall(AdminAction.REPLAY, 2.1, 2.2, 200, ("intent-c1",), (ReplayOutcome.REPLAYED,)),
        AdminCall(AdminAction.REPLAY, 2.3, 2.4, 409, ("intent-c1",), (ReplayOutcome.LEASED,)),
        AdminCall(AdminAction.REPLAY_STUCK, 2.5, 2.6, 200, ("intent-a2",), (ReplayOutcome.FINISHED,)),
        AdminCall(AdminAction.LIST_DEAD, 3.0, 3.1, 503),
        AdminCall(AdminAction.REPLAY_STUCK, 3.2, 3.3, None),
    ]
    history = History(writes=writes, deletes=deletes, reads=reads, admin=admin)
    snapshot = Snapshot(
        intents={
            "intent-a1": FinalIntent("intent-a1", "ann", 1, "done", None),
            "intent-a2": FinalIntent("intent-a2", "ann", 2, "done", None),
            "intent-b2": FinalIntent("intent-b2", "bob", 3, "dead", "attempt 2: BlobStoreError: upload failed"),
            "intent-c1": FinalIntent("intent-c1", "carl", 1, "superseded", "attempt 2: upload failed", replays=1),
        },
        live={
            "ann": LiveVersion("ann", 2, "put", "a2", "images/k-a2", sha("a2")),
            "bob": LiveVersion("bob", 2, "delete"),
            "carl": LiveVersion("carl", 2, "delete"),
        },
        pending_keys=frozenset(),
        bucket={"images/k-a2": sha("a2")},
    )
    return history, snapshot


def kinds(violations: list[Violation]) -> list[Kind]:
    return [v.kind for v in violations]


def test_a_clean_history_with_lost_answers_outages_deletes_and_replays_has_no_violations() -> None:
    history, snapshot = clean()
    assert check(history, snapshot) == []


def test_the_reads_of_versions_under_a_tombstone_are_those_that_began_after_its_delete_answered() -> None:
    history, _ = clean()
    found = [(r.user, r.start, r.status) for r in reads_of_deleted_versions(history)]
    assert found == [("bob", 3.5, 404), ("carl", 2.0, 404), ("carl", 2.1, 503)]


def test_a_read_mixing_one_writes_metadata_with_another_writes_image_is_a_mixed_pair() -> None:
    history, snapshot = clean()
    history.reads.append(ok_read("ann", 3.1, "a2", 2, image_of="a1"))
    (found,) = check(history, snapshot)
    assert found.kind is Kind.MIXED_PAIR and "'a2'" in found.message and "'a1'" in found.message


def test_image_bytes_that_differ_from_the_described_image_are_a_mixed_pair() -> None:
    history, snapshot = clean()
    read = ok_read("ann", 3.1, "a2", 2)
    assert read.seen is not None
    history.reads.append(replace(read, seen=replace(read.seen, declared_sha=sha("a1"))))
    assert kinds(check(history, snapshot)) == [Kind.MIXED_PAIR]


def test_a_read_returning_another_users_write_is_reported() -> None:
    history, snapshot = clean()
    history.reads.append(ok_read("ann", 3.1, "b1", 2))
    assert kinds(check(history, snapshot)) == [Kind.FOREIGN_DATA]


def test_a_read_returning_a_pair_nobody_wrote_or_not_yet_sent_is_an_unknown_pair() -> None:
    history, snapshot = clean()
    history.reads.append(ok_read("ann", 3.1, "ghost", 7))
    history.reads.append(ok_read("bob", 4.0, "b2", 3))  # b2 is sent only at 5.0
    assert kinds(check(history, snapshot)) == [Kind.UNKNOWN_PAIR, Kind.UNKNOWN_PAIR]


def test_a_pair_read_under_another_version_than_its_202_said_is_reported() -> None:
    history, snapshot = clean()
    history.reads.append(ok_read("ann", 3.1, "a2", 5))
    assert kinds(check(history, snapshot)) == [Kind.WRONG_VERSION]


def test_a_500_on_a_read_is_reported_while_503_and_no_answer_are_not() -> None:
    history, snapshot = clean()
    history.reads.append(status_read("ann", 3.1, 500))
    (found,) = check(history, snapshot)
    assert found.kind is Kind.BAD_STATUS and "500" in found.message


def test_a_404_after_the_profile_was_read_live_without_a_delete_in_between_is_reported() -> None:
    history, snapshot = clean()
    history.reads.append(status_read("ann", 3.2, 404))
    (found,) = check(history, snapshot)
    assert found.kind is Kind.LOST_PROFILE and "'a2'" in found.message


def test_a_404_overlapping_a_delete_whose_answer_was_lost_is_not_reported() -> None:
    history, snapshot = clean()
    history.deletes.append(Delete("ann", 2.5, None, None))
    history.reads.append(status_read("ann", 9.0, 404))
    assert check(history, snapshot) == []


def test_a_read_returning_an_older_version_than_an_earlier_read_is_stale() -> None:
    history, snapshot = clean()
    history.reads.append(ok_read("ann", 3.2, "a1", 1))
    assert kinds(check(history, snapshot)) == [Kind.STALE_READ]


def test_an_acknowledged_write_whose_intent_is_gone_or_unfinished_is_a_lost_write() -> None:
    history, snapshot = clean()
    history.writes.append(write("ann", "a3", 6.0, 4))
    history.writes.append(write("ann", "a4", 6.1, 5))
    snapshot.intents["intent-a4"] = FinalIntent("intent-a4", "ann", 5, "pending", None)
    found = check(history, snapshot)
    assert kinds(found) == [Kind.LOST_WRITE, Kind.LOST_WRITE]
    assert "'a3'" in found[0].message and "gone" in found[0].message and "pending" in found[1].message


def test_a_dead_intent_without_its_reason_is_reported() -> None:
    history, snapshot = clean()
    snapshot.intents["intent-b2"] = replace(snapshot.intents["intent-b2"], last_error="")
    assert kinds(check(history, snapshot)) == [Kind.UNEXPLAINED_DEAD]


def test_a_live_pointer_behind_a_finished_intent_is_reported() -> None:
    history, snapshot = clean()
    snapshot.live["ann"] = LiveVersion("ann", 1, "put", "a1", "images/k-a1", sha("a1"))
    snapshot.bucket = {"images/k-a1": sha("a1")}
    assert kinds(check(history, snapshot)) == [Kind.LIVE_REGRESSED]


def test_a_live_version_whose_blob_is_missing_or_holds_other_bytes_is_a_dangling_pointer() -> None:
    history, snapshot = clean()
    snapshot.bucket = {}
    (missing,) = check(history, snapshot)
    snapshot.bucket = {"images/k-a2": sha("a1")}
    (other,) = check(history, snapshot)
    assert (missing.kind, other.kind) == (Kind.DANGLING_POINTER, Kind.DANGLING_POINTER)
    assert "missing" in missing.message and "holds" in other.message


def test_a_live_version_that_no_write_sent_is_reported() -> None:
    history, snapshot = clean()
    snapshot.live["ann"] = replace(snapshot.live["ann"], sha256=sha("b1"))
    snapshot.bucket = {"images/k-a2": sha("b1")}
    assert kinds(check(history, snapshot)) == [Kind.UNKNOWN_LIVE]


def test_a_blob_that_no_live_or_pending_version_needs_is_an_orphan() -> None:
    history, snapshot = clean()
    snapshot.bucket["images/k-old"] = sha("a1")
    snapshot.bucket["images/k-pending"] = sha("x")
    snapshot.pending_keys = frozenset({"images/k-pending"})
    (found,) = check(history, snapshot)
    assert found.kind is Kind.ORPHAN_BLOB and "images/k-old" in found.message


def test_a_recorded_history_with_a_mixed_pair_a_lost_write_and_a_dangling_pointer_reports_each() -> None:
    history, snapshot = clean()
    history.reads.append(ok_read("ann", 3.1, "a2", 2, image_of="a1"))
    history.writes.append(write("ann", "a3", 6.0, 4))
    snapshot.bucket = {"images/k-stray": sha("a1")}
    found = check(history, snapshot)
    assert sorted(kinds(found)) == sorted([Kind.MIXED_PAIR, Kind.LOST_WRITE, Kind.DANGLING_POINTER, Kind.ORPHAN_BLOB])


def test_a_version_image_nobody_wrote_of_another_user_or_unlike_its_etag_is_reported() -> None:
    history, snapshot = clean()
    history.reads.append(version_read("ann", 3.4, 1, "ghost"))
    history.reads.append(version_read("ann", 3.5, 1, "b1"))
    history.reads.append(version_read("ann", 3.6, 1, "a1", etag_of="a2"))
    history.reads.append(version_read("ann", 3.7, 1, "a2"))  # a2 was accepted as version 2
    found = check(history, snapshot)
    assert kinds(found) == [Kind.UNKNOWN_PAIR, Kind.FOREIGN_DATA, Kind.MIXED_PAIR, Kind.WRONG_VERSION]
    assert "version 1 image of 'ann'" in found[0].message


def test_one_version_served_as_two_different_images_is_a_wrong_version() -> None:
    history, snapshot = clean()
    history.writes.append(write("bob", "b0", 0.5, None, answered=False))  # neither 202 names a version
    history.reads.append(version_read("bob", 2.5, 1, "b0"))
    (found,) = check(history, snapshot)
    assert found.kind is Kind.WRONG_VERSION and "other bytes as version 1" in found.message


def test_a_version_at_or_below_a_tombstone_served_after_its_delete_answered_is_resurrected() -> None:
    history, snapshot = clean()
    history.reads.append(version_read("carl", 2.5, 1, "c1"))
    history.reads.append(ok_read("carl", 2.6, "c1", 1))
    found = check(history, snapshot)
    assert kinds(found) == [Kind.RESURRECTED, Kind.RESURRECTED]
    assert all("answered 204 at 1.600" in v.message for v in found)


def test_a_write_accepted_while_a_delete_was_in_flight_may_go_live_after_it() -> None:
    history, snapshot = clean()
    history.writes.append(write("carl", "c2", 1.48, 3))  # answered at 1.58, the delete at 1.6
    history.reads.append(ok_read("carl", 2.5, "c2", 3))
    snapshot.intents["intent-c2"] = FinalIntent("intent-c2", "carl", 3, "done", None)
    snapshot.live["carl"] = LiveVersion("carl", 3, "put", "c2", "images/k-c2", sha("c2"))
    snapshot.bucket["images/k-c2"] = sha("c2")
    assert check(history, snapshot) == []


def test_a_write_accepted_before_a_delete_that_is_live_at_the_end_is_resurrected() -> None:
    history, snapshot = clean()
    snapshot.live["carl"] = LiveVersion("carl", 1, "put", "c1", "images/k-c1", sha("c1"))
    snapshot.bucket["images/k-c1"] = sha("c1")
    (found,) = check(history, snapshot)
    assert found.kind is Kind.RESURRECTED and "'c1'" in found.message and "at the end" in found.message


def test_a_put_live_at_the_end_at_the_lowest_version_a_tombstone_can_have_is_resurrected() -> None:
    # c1 (version 1) was accepted before the delete, so its tombstone is version 2 or above: a
    # put at version 2 (c0, whose answer was lost) is either impossible or below the tombstone.
    history, snapshot = clean()
    history.writes.append(write("carl", "c0", 0.5, None, answered=False))
    snapshot.live["carl"] = LiveVersion("carl", 2, "put", "c0", "images/k-c0", sha("c0"))
    snapshot.bucket["images/k-c0"] = sha("c0")
    assert kinds(check(history, snapshot)) == [Kind.RESURRECTED]


def test_a_500_or_a_refusal_no_race_explains_from_the_admin_api_is_a_bad_operator_answer() -> None:
    history, snapshot = clean()
    history.admin += [
        AdminCall(AdminAction.REPLAY, 4.0, 4.1, 500, ("intent-b2",)),
        AdminCall(AdminAction.LIST_DEAD, 4.2, 4.3, 409),
        AdminCall(AdminAction.REPLAY_STUCK, 4.4, 4.5, 200, ("intent-b2",), (ReplayOutcome.NO_STAGED_BYTES,)),
        AdminCall(AdminAction.REPLAY, 4.6, 4.7, 200, ("intent-b2",), (UNREADABLE,)),
    ]
    found = check(history, snapshot)
    assert kinds(found) == [Kind.BAD_ADMIN_ANSWER] * 4
    assert "answered 500" in found[0].message and "no_staged_bytes" in found[2].message


def test_a_variant_of_another_image_or_unlike_its_description_or_version_is_reported() -> None:
    history, snapshot = clean()
    history.reads += [
        variant_read("ann", 3.3, "a2", 2, RED),  # a2's body, a1's colour: made from another image
        variant_read("ann", 3.4, "a2", 2, BLUE, bytes_of="a1"),  # bytes unlike the variant described
        variant_read("ann", 3.5, "a1", 2, RED),  # a1's variant served as version 2
    ]
    assert kinds(check(history, snapshot)) == [Kind.FOREIGN_VARIANT, Kind.MIXED_PAIR, Kind.WRONG_VERSION]


def test_a_live_variant_missing_from_the_bucket_is_a_dangling_pointer_and_an_unneeded_one_an_orphan() -> None:
    history, snapshot = clean()
    snapshot.live["ann"] = replace(snapshot.live["ann"], variants={"thumb": ("images/t-a2", sha("t-a2"))})
    snapshot.bucket["images/t-a2"] = sha("t-a2")
    assert check(history, snapshot) == []
    snapshot.bucket["images/t-a2"] = sha("other bytes")
    snapshot.bucket["images/t-a1"] = sha("t-a1")  # the variant of a version no longer live
    assert kinds(check(history, snapshot)) == [Kind.DANGLING_POINTER, Kind.ORPHAN_BLOB]

"""Pure rules, without any store: back-off, preconditions, fingerprints, keys, images and settings."""

from __future__ import annotations

import io
import socket
import subprocess
import sys

import pytest
from PIL import Image
from pydantic import ValidationError

from service.core.domain import Metadata, is_own_blob_key, new_blob_key, request_fingerprint, retry_delay
from service.core.images import ImageRejected, inspect_image
from service.core.migrate import dbmate_url
from service.core.profiles import PreconditionFailed, Preconditions
from service.core.repository import ProfileHead
from service.core.settings import Settings
from tests.support import ROOT


def test_retry_delays_grow_exponentially_with_jitter_up_to_the_cap() -> None:
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (10, 60.0), (200, 60.0)]:
        delays = [retry_delay(attempt, 1.0, 60.0) for _ in range(200)]
        assert all(ceiling / 2 <= delay <= ceiling for delay in delays)
        assert len(set(delays)) > 1


@pytest.mark.parametrize(
    ("preconditions", "head", "allowed"),
    [
        (Preconditions(if_none_match_any=True), None, True),
        (Preconditions(if_none_match_any=True), ProfileHead(3, 3, live_is_tombstone=True), True),
        (Preconditions(if_none_match_any=True), ProfileHead(3, None, live_is_tombstone=False), True),
        (Preconditions(if_none_match_any=True), ProfileHead(3, 2, live_is_tombstone=False), False),
        (Preconditions(if_match=3), ProfileHead(3, 2, live_is_tombstone=False), True),
        (Preconditions(if_match=2), ProfileHead(3, 2, live_is_tombstone=False), False),
        (Preconditions(if_match=3), ProfileHead(3, 3, live_is_tombstone=True), False),
        (Preconditions(if_match=3), ProfileHead(3, 2, live_is_tombstone=True), False),
        (Preconditions(if_match=1), ProfileHead(1, None, live_is_tombstone=False), False),
        (Preconditions(if_match=1), None, False),
        (Preconditions(), None, True),
    ],
)
def test_preconditions_compare_against_the_newest_accepted_version(
    preconditions: Preconditions, head: ProfileHead | None, allowed: bool
) -> None:
    if allowed:
        preconditions.check(head)
    else:
        with pytest.raises(PreconditionFailed):
            preconditions.check(head)


def test_the_idempotency_fingerprint_ignores_key_order_but_not_content() -> None:
    a = Metadata.model_validate({"display_name": "A", "bio": "b"})
    b = Metadata.model_validate({"bio": "b", "display_name": "A"})
    assert request_fingerprint(a, "00") == request_fingerprint(b, "00")
    assert request_fingerprint(a, "00") != request_fingerprint(a, "01")
    assert request_fingerprint(a, "00") != request_fingerprint(Metadata(display_name="B"), "00")


def test_websites_are_validated_but_kept_exactly_as_written() -> None:
    assert Metadata(display_name="A", website="https://example.com").stored()["website"] == "https://example.com"
    with pytest.raises(ValidationError):
        Metadata(display_name="A", website="javascript:alert(1)")


def test_blob_keys_are_fresh_random_and_never_name_the_user() -> None:
    keys = {new_blob_key("images/") for _ in range(1000)}
    assert len(keys) == 1000
    assert all(key.startswith("images/") and len(key) == len("images/") + 32 for key in keys)


@pytest.mark.parametrize(
    ("fmt", "content_type"),
    [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp"), ("GIF", "image/gif")],
)
def test_each_accepted_image_type_is_recognised_from_its_bytes(fmt: str, content_type: str) -> None:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(out, fmt)
    info = inspect_image(out.getvalue(), 10_000)
    assert (info.content_type, info.width, info.height, info.size) == (content_type, 40, 30, len(out.getvalue()))


def test_an_image_type_outside_the_list_is_refused_even_if_pillow_reads_it() -> None:
    out = io.BytesIO()
    Image.new("RGB", (4, 4)).save(out, "BMP")
    with pytest.raises(ImageRejected) as rejected:
        inspect_image(out.getvalue(), 10_000)
    assert rejected.value.status == 415


def test_dbmate_gets_tls_disabled_only_for_loopback_databases() -> None:
    assert dbmate_url("postgresql://u@127.0.0.1:5432/db") == "postgres://u@127.0.0.1:5432/db?sslmode=disable"
    assert dbmate_url("postgresql://u@db.internal/db") == "postgres://u@db.internal/db?sslmode=prefer"
    assert dbmate_url("postgresql://u@db/db?sslmode=require") == "postgres://u@db/db?sslmode=require"


@pytest.mark.parametrize("prefix", ["images", "", "/", "x//", "./", "a/../", "images/eu", "im ages/", "../x\n/"])
def test_settings_refuse_a_key_prefix_that_does_not_end_in_a_slash_or_holds_odd_characters(prefix: str) -> None:
    with pytest.raises(ValidationError, match="s3_key_prefix"):
        Settings(database_url="postgresql://x/y", s3_key_prefix=prefix)
    assert Settings(database_url="postgresql://x/y", s3_key_prefix="eu-1/images/").s3_key_prefix == "eu-1/images/"


def test_only_keys_of_the_shape_this_deployment_makes_are_its_own() -> None:
    assert is_own_blob_key(new_blob_key("images/"), "images/")
    assert not is_own_blob_key(new_blob_key("images/eu/"), "images/")
    assert not is_own_blob_key("images/README.txt", "images/")
    assert not is_own_blob_key(new_blob_key("images/").upper(), "images/")
    assert not is_own_blob_key(new_blob_key("images/") + "0", "images/")


def test_settings_refuse_an_attempt_deadline_that_outlives_the_lease() -> None:
    with pytest.raises(ValidationError, match="shorter than PROFILES_LEASE_SECONDS"):
        Settings(database_url="postgresql://x/y", lease_seconds=10, attempt_timeout_seconds=10)
    assert Settings(database_url="postgresql://x/y", lease_seconds=10).attempt_deadline_seconds == 5
    with pytest.raises(ValidationError):
        Settings(database_url="postgresql://x/y", poll_interval_seconds=2)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
        check=False,
    )


def test_a_missing_setting_is_reported_in_one_line() -> None:
    result = run_cli("api", env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert "PROFILES_DATABASE_URL" in result.stderr


def test_dev_on_a_busy_port_is_reported_in_one_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("dev", "--port", str(port), "--data-dir", "/nonexistent-never-used")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"profiles dev: port {port} on 127.0.0.1 for the API is already in use; choose another with --port"
    )

"""Domain rules shared by the API and the workers: identifiers, metadata, keys, retries, states."""

from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata
import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, HttpUrl, TypeAdapter

USER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
USER_ID_RULE = f"user_id must match {USER_ID.pattern}"
MAX_METADATA_BYTES = 16 * 1024
MAX_IDEMPOTENCY_KEY_LENGTH = 255
# How far back an operator may filter intents by age.
MAX_INTENT_AGE_SECONDS = 10 * 365 * 86400
# What is kept of an error message in the database.
MAX_ERROR_LENGTH = 2000


class IntentState(StrEnum):
    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    DONE = "done"
    SUPERSEDED = "superseded"
    DEAD = "dead"


class IntentPurpose(StrEnum):
    """Why an intent exists: to publish the version a PUT accepted, or to add to a live version the
    variants the configuration gained (or changed) after it went live."""

    PUBLISH = "publish"
    ADD_VARIANTS = "add_variants"


FINISHED_STATES = frozenset({IntentState.DONE, IntentState.SUPERSEDED, IntentState.DEAD})
# Not a state: an in_progress intent whose lease expired (its worker is gone). Operators list and
# replay by it as if it were one.
STUCK = "stuck"
INTENT_SELECTIONS: tuple[str, ...] = (*(state.value for state in IntentState), STUCK)


class Replayable(StrEnum):
    """What operators replay in bulk."""

    DEAD = IntentState.DEAD.value
    STUCK = STUCK


class JobState(StrEnum):
    """Where a bulk replay asked for in the operator console is."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"


class DeletionReason(StrEnum):
    """Why a blob was scheduled for deletion (a metric label and a column)."""

    REPLACED = "replaced"
    DELETED = "deleted"
    SUPERSEDED = "superseded"
    FAILED = "failed"
    # Found by reconciliation: a key nothing in the database names, or one whose deletion had finished.
    STRAY = "stray"
    REAPPEARED = "reappeared"
    # A live version's variant that is no longer configured, or configured with another size or type.
    UNCONFIGURED = "unconfigured"


class VersionKind(StrEnum):
    PUT = "put"
    DELETE = "delete"


def error_text(exc: BaseException, *, context: str = "") -> str:
    """An error as stored for operators: what it was, capped at MAX_ERROR_LENGTH."""
    return f"{context}{exc.__class__.__name__}: {exc}"[:MAX_ERROR_LENGTH]


def utc_text(moment: datetime) -> str:
    """The one spelling of a timestamp in answers and command output (pydantic's: ...Z)."""
    return moment.isoformat().replace("+00:00", "Z")


def is_valid_user_id(user_id: str) -> bool:
    return USER_ID.fullmatch(user_id) is not None


_http_url = TypeAdapter(HttpUrl)


def _no_control_characters(value: str) -> str:
    # NUL cannot be stored in jsonb at all; the other C0 controls have no place in a profile.
    if any((ord(char) < 32 and char not in "\t\n\r") or char == "\x7f" for char in value):
        raise ValueError("control characters are not allowed")
    return value


def _nfc(value: Any) -> Any:
    # One spelling per text: "é" typed precomposed or as e + combining accent is stored, compared and
    # length-checked the same way.
    return unicodedata.normalize("NFC", value) if isinstance(value, str) else value


Text = Annotated[str, BeforeValidator(_nfc), AfterValidator(_no_control_characters)]


def _http_or_https(value: str) -> str:
    # Validated as a URL but stored as the user wrote it, so reads return exactly what was sent.
    _http_url.validate_python(value)
    return value


class Metadata(BaseModel):
    """The profile fields a user may set; anything else is rejected."""

    model_config = ConfigDict(extra="forbid", strict=True)

    display_name: Text = Field(min_length=1, max_length=100)
    bio: Text | None = Field(default=None, max_length=1000)
    location: Text | None = Field(default=None, max_length=100)
    website: Annotated[str, BeforeValidator(_nfc), Field(max_length=2048), AfterValidator(_http_or_https)] | None = None

    def stored(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


def new_blob_key(prefix: str) -> str:
    """A fresh, never reused key: random, so it says nothing about the user and cannot collide."""
    return f"{prefix}{uuid.uuid4().hex}"


_BLOB_KEY_SUFFIX = re.compile(r"[0-9a-f]{32}")


def is_own_blob_key(key: str, prefix: str) -> bool:
    """Whether `key` has exactly the shape new_blob_key gives: keys of other deployments sharing the
    bucket (another prefix, even one that starts with ours) or put there by hand do not."""
    return key.startswith(prefix) and _BLOB_KEY_SUFFIX.fullmatch(key[len(prefix) :]) is not None


def request_fingerprint(metadata: Metadata, image_sha256: str) -> str:
    """What makes two writes "the same body" for Idempotency-Key, independent of multipart framing."""
    canonical = json.dumps(metadata.stored(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{canonical}\n{image_sha256}".encode()).hexdigest()


def retry_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential back-off with jitter, so that a fleet of failing workers does not retry in step."""
    ceiling = min(cap, base * 2 ** min(attempt - 1, 32))
    return random.uniform(ceiling / 2, ceiling)

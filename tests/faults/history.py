"""What the load did and what the stores held at the end: the only inputs of the checker."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


@dataclass(frozen=True)
class Write:
    """A PUT with a unique token (its display_name) and unique image bytes.

    `end` and `status` are None when no answer came back (the connection died or timed out): the API
    may still have committed the write, so it counts as sent but not as acknowledged."""

    user: str
    token: str
    image_sha: str
    start: float
    end: float | None
    status: int | None
    version: int | None = None
    intent_id: str | None = None
    colour: tuple[int, int, int] | None = None  # the solid colour of its image (variants keep it)

    @property
    def accepted(self) -> bool:
        return self.status == 202


@dataclass(frozen=True)
class Delete:
    """A DELETE; whatever it answered, it may have published a tombstone (a lost answer, or a
    client-side retry of a delete that had already committed, both look like something else)."""

    user: str
    start: float
    end: float | None
    status: int | None


class Route(StrEnum):
    PROFILE = "?embed=image"  # GET /v1/profiles/{user}?embed=image: metadata and image
    VERSION_IMAGE = "versions/{n}/image"  # GET /v1/profiles/{user}/versions/{n}/image: bytes only
    # GET /v1/profiles/{user}, then the URL of its first variant: the body's token and version with
    # the variant's bytes and its colour
    VARIANT = "?variant="


@dataclass(frozen=True)
class Seen:
    """What a 200 held: on the profile route its body, on the version route the bytes and ETag."""

    user: str
    version: int
    token: str | None  # None on the version route, which carries no metadata
    image_sha: str  # sha256 of the bytes received
    declared_sha: str  # image.sha256 in the same body, or the image's ETag (a variant's: its sha256)
    colour: tuple[int, int, int] | None = None  # a variant's colour at its centre


@dataclass(frozen=True)
class Read:
    """One read; `status` is None when no answer came back; `version` is the one asked for on the
    version route."""

    user: str
    api: int
    start: float
    end: float
    status: int | None
    seen: Seen | None = None
    route: Route = Route.PROFILE
    version: int | None = None

    @property
    def served_version(self) -> int | None:
        """The version this read answered with, or asked for (None for a profile read without data)."""
        return self.seen.version if self.seen is not None else self.version


UNREADABLE = "unreadable answer"  # the outcome recorded when an answer named none


class AdminAction(StrEnum):
    LIST_DEAD = "list dead"  # GET /v1/admin/intents?state=dead
    REPLAY = "replay"  # POST /v1/admin/intents/{id}/replay
    REPLAY_STUCK = "replay stuck"  # POST /v1/admin/intents/replay {"state": "stuck"}


@dataclass(frozen=True)
class AdminCall:
    """One call of the operator to the admin API; `status` is None when no answer came back."""

    action: AdminAction
    start: float
    end: float
    status: int | None
    intents: tuple[str, ...] = ()  # the intents listed, or replayed
    outcomes: tuple[str, ...] = ()  # a replay outcome per intent replayed, as the answer named it


@dataclass
class History:
    writes: list[Write] = field(default_factory=list)
    deletes: list[Delete] = field(default_factory=list)
    reads: list[Read] = field(default_factory=list)
    admin: list[AdminCall] = field(default_factory=list)


@dataclass(frozen=True)
class FinalIntent:
    intent_id: str
    user: str
    version: int
    state: str
    last_error: str | None
    replays: int = 0


@dataclass(frozen=True)
class LiveVersion:
    """A user's live version at the end: a put (token, blob key, sha256) or a tombstone."""

    user: str
    version: int
    kind: str
    token: str | None = None
    blob_key: str | None = None
    sha256: str | None = None
    variants: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (blob key, sha256)


@dataclass
class Snapshot:
    """The database and the bucket after the load stopped, the workers drained and GC ran."""

    intents: dict[str, FinalIntent] = field(default_factory=dict)
    live: dict[str, LiveVersion] = field(default_factory=dict)
    pending_keys: frozenset[str] = frozenset()
    bucket: dict[str, str] = field(default_factory=dict)  # key -> sha256 of the bytes it holds

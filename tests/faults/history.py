"""What the load did and what the stores held at the end: the only inputs of the checker."""

from __future__ import annotations

from dataclasses import dataclass, field


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


@dataclass(frozen=True)
class Seen:
    """What a 200 answer to `GET /v1/profiles/{user}?embed=image` held."""

    user: str
    version: int
    token: str
    image_sha: str  # sha256 of the bytes received
    declared_sha: str  # image.sha256 in the same body


@dataclass(frozen=True)
class Read:
    """One read; `status` is None when no answer came back."""

    user: str
    api: int
    start: float
    end: float
    status: int | None
    seen: Seen | None = None


@dataclass
class History:
    writes: list[Write] = field(default_factory=list)
    deletes: list[Delete] = field(default_factory=list)
    reads: list[Read] = field(default_factory=list)


@dataclass(frozen=True)
class FinalIntent:
    intent_id: str
    user: str
    version: int
    state: str
    last_error: str | None


@dataclass(frozen=True)
class LiveVersion:
    """A user's live version at the end: a put (token, blob key, sha256) or a tombstone."""

    user: str
    version: int
    kind: str
    token: str | None = None
    blob_key: str | None = None
    sha256: str | None = None


@dataclass
class Snapshot:
    """The database and the bucket after the load stopped, the workers drained and GC ran."""

    intents: dict[str, FinalIntent] = field(default_factory=dict)
    live: dict[str, LiveVersion] = field(default_factory=dict)
    pending_keys: frozenset[str] = frozenset()
    bucket: dict[str, str] = field(default_factory=dict)  # key -> sha256 of the bytes it holds

"""Response bodies of the API as pydantic models: they serialise responses and feed /openapi.json."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Collection
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service.core.domain import (
    MAX_INTENT_AGE_SECONDS,
    USER_ID,
    IntentPurpose,
    IntentState,
    Metadata,
    Replayable,
    VersionKind,
    utc_text,
)
from service.core.operations import ReplayOutcome
from service.core.repository import Accepted, Intent, ListedIntent, PublishedVersion, StoredImage


class VariantOut(BaseModel):
    url: str
    content_type: str
    size: int
    sha256: str
    width: int
    height: int

    @staticmethod
    def body(image: StoredImage, url: str) -> dict[str, Any]:
        return {
            "url": url,
            "content_type": image.content_type,
            "size": image.size,
            "sha256": image.sha256,
            "width": image.width,
            "height": image.height,
        }


class ImageOut(VariantOut):
    data: str | None = Field(default=None, description="base64 of the image, with ?embed=image only")


class ProfileOut(BaseModel):
    user_id: str
    version: int
    metadata: Metadata
    image: ImageOut
    variants: dict[str, VariantOut] = Field(
        description="the version's variants by name, each made from its image and published with it"
    )
    updated_at: datetime

    @staticmethod
    def body(version: PublishedVersion, served: Collection[str], image_data: bytes | None = None) -> dict[str, Any]:
        """This model's JSON for `version`, built directly: reads are the hottest path, and the
        stored metadata was validated when it was written. (The fuzz tests hold every answer
        against this model's schema.) Only the variants still `served` (configured) are listed."""
        url = version_image_url(version.user_id, version.version)
        image = VariantOut.body(version, url)
        if image_data is not None:
            image["data"] = base64.b64encode(image_data).decode()
        return {
            "user_id": version.user_id,
            "version": version.version,
            "metadata": version.metadata,
            "image": image,
            "variants": {
                name: VariantOut.body(variant, f"{url}?variant={name}")
                for name, variant in version.variants.items()
                if name in served
            },
            "updated_at": utc_text(version.published_at),
        }


class AcceptedOut(BaseModel):
    user_id: str
    version: int
    intent_id: uuid.UUID
    state: IntentState
    status_url: str

    @classmethod
    def of(cls, accepted: Accepted) -> AcceptedOut:
        return cls(
            user_id=accepted.user_id,
            version=accepted.version,
            intent_id=accepted.intent_id,
            state=accepted.state,
            status_url=status_url(accepted.intent_id),
        )


class IntentOut(BaseModel):
    intent_id: uuid.UUID
    user_id: str
    version: int
    kind: VersionKind
    # publish: the intent of a PUT; add_variants: variants configured after the version went live.
    purpose: IntentPurpose
    state: IntentState
    attempts: int
    max_attempts: int
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    next_attempt_at: datetime

    @classmethod
    def of(cls, intent: Intent) -> IntentOut:
        return cls(
            intent_id=intent.id,
            user_id=intent.user_id,
            version=intent.version,
            kind=intent.kind,
            purpose=intent.purpose,
            state=intent.state,
            attempts=intent.attempts,
            max_attempts=intent.max_attempts,
            last_error=intent.last_error,
            created_at=intent.created_at,
            updated_at=intent.updated_at,
            next_attempt_at=intent.next_attempt_at,
        )


class AdminIntentOut(IntentOut):
    replays: int
    lease_owner: str | None
    leased: bool

    @classmethod
    def of_listed(cls, intent: ListedIntent) -> AdminIntentOut:
        base = IntentOut.of(intent).model_dump()
        return cls(**base, replays=intent.replays, lease_owner=intent.lease_owner, leased=intent.leased)


class IntentPageOut(BaseModel):
    items: list[AdminIntentOut]
    next_cursor: str | None


class ReplayOut(BaseModel):
    intent_id: uuid.UUID
    outcome: ReplayOutcome


class BulkReplayIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    state: Replayable
    user_id: str | None = Field(default=None, pattern=USER_ID.pattern)
    older_than_seconds: float | None = Field(default=None, ge=0, le=MAX_INTENT_AGE_SECONDS)
    dry_run: bool = False


class BulkReplayOut(BaseModel):
    outcomes: dict[str, int]
    intents: list[ReplayOut]
    remaining: int = Field(description="matching intents left for another call")


class ProblemOut(BaseModel):
    type: str
    title: str
    status: int
    detail: str
    errors: list[dict[str, Any]] | None = None


def status_url(intent_id: uuid.UUID) -> str:
    return f"/v1/intents/{intent_id}"


def version_image_url(user_id: str, version: int) -> str:
    return f"/v1/profiles/{user_id}/versions/{version}/image"

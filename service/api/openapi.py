"""The OpenAPI 3.1 document of the API, with schemas generated from the pydantic models it uses."""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic.json_schema import models_json_schema

from service.api.admin import MAX_PAGE
from service.api.schemas import (
    AcceptedOut,
    AdminIntentOut,
    BulkReplayIn,
    BulkReplayOut,
    IntentOut,
    IntentPageOut,
    ProblemOut,
    ProfileOut,
    ReplayOut,
)
from service.core.domain import INTENT_SELECTIONS, USER_ID, Metadata
from service.core.images import CONTENT_TYPES
from service.core.variants import VARIANT_NAME

PROBLEM = "application/problem+json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


def _problems(*statuses: int) -> dict[str, Any]:
    return {
        str(status): {"description": "problem details", "content": {PROBLEM: {"schema": _ref("ProblemOut")}}}
        for status in statuses
    }


def _image(description: str) -> dict[str, Any]:
    """Bytes in one of the accepted formats, each named: generators refuse a range like image/*."""
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {"description": description, "content": {media_type: binary for media_type in CONTENT_TYPES.values()}}


def _image_responses(description: str) -> dict[str, Any]:
    """What an image route answers, in either delivery mode (PROFILES_IMAGE_DELIVERY)."""
    etag = {"description": "the image's sha256, quoted", "schema": {"type": "string"}}
    return {
        "200": _image(description),
        "307": {
            "description": (
                "redirect delivery (of the live version; an older one is still sent by the API): the bytes are at "
                "Location, a presigned URL of the version's blob (it expires "
                "after PROFILES_PRESIGN_EXPIRY_SECONDS) or PROFILES_PUBLIC_BASE_URL + key; the same ETag"
            ),
            "headers": {
                "Location": {"required": True, "schema": {"type": "string", "format": "uri"}},
                "ETag": etag,
                "Cache-Control": {"description": "no-store: no cache keeps a redirect", "schema": {"type": "string"}},
            },
        },
        "304": {"description": "not modified"},
        **_problems(400, 401, 403, 404, 503),
    }


USER_PARAM = {
    "name": "user_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": USER_ID.pattern},
}
VERSION_PARAM = {"name": "version", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1}}
VARIANT_PARAM = {
    "name": "variant",
    "in": "query",
    "required": False,
    "description": (
        "one of the configured variants (PROFILES_VARIANTS) instead of the original image; an unknown "
        "name is 400 listing the names, one the version was published without is 404. Without it, the "
        "original: 403 unless originals are public (PROFILES_PUBLIC_ORIGINALS) or the token has the admin scope"
    ),
    "schema": {"type": "string", "pattern": VARIANT_NAME.pattern},
}
INTENT_PARAM = {"name": "intent_id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}


def _header(name: str, description: str, **schema: Any) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": False,
        "description": description,
        "schema": {"type": "string", **schema},
    }


# Conditional reads: 304 when the caller already holds the current ETag.
IF_NONE_MATCH_READ = _header("If-None-Match", "ETags the caller holds, comma-separated, or *")


# Writes need a token whose sub is the user_id (or the admin scope); the admin routes need the
# admin scope; reads need none unless PROFILES_AUTH_READS_REQUIRE_TOKEN is set (hence "{}": optional).
TOKEN: list[dict[str, list[str]]] = [{"bearerJWT": []}]
ADMIN: list[dict[str, list[str]]] = [{"bearerJWT": ["profiles:admin"]}]
OPTIONAL_TOKEN: list[dict[str, list[str]]] = [{}, {"bearerJWT": []}]
REPLAY_QUERY = {"name": "dry_run", "in": "query", "required": False, "schema": {"type": "boolean"}}


def _admin_paths() -> dict[str, Any]:
    """Operator routes: every call needs a bearer token with the admin scope."""
    filters = [
        {"name": name, "in": "query", "required": False, "schema": schema}
        for name, schema in [
            ("state", {"type": "string", "enum": list(INTENT_SELECTIONS)}),
            ("user_id", {"type": "string", "pattern": USER_ID.pattern}),
            ("older_than_seconds", {"type": "number"}),
            ("limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}),
            ("cursor", {"type": "string"}),
        ]
    ]
    return {
        "/v1/admin/intents": {
            "get": {
                "summary": "Intents, oldest first, filtered and paginated by cursor",
                "security": ADMIN,
                "parameters": filters,
                "responses": {"200": _json("IntentPageOut", "a page"), **_problems(400, 401, 403, 503)},
            }
        },
        "/v1/admin/intents/replay": {
            "post": {
                "summary": "Replay every dead or stuck intent matching a filter",
                "security": ADMIN,
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("BulkReplayIn")}}},
                "responses": {"200": _json("BulkReplayOut", "what happened to each"), **_problems(401, 403, 422, 503)},
            }
        },
        "/v1/admin/intents/{intent_id}": {
            "parameters": [INTENT_PARAM],
            "get": {
                "summary": "One intent",
                "security": ADMIN,
                "responses": {"200": _json("AdminIntentOut", "the intent"), **_problems(401, 403, 404, 503)},
            },
        },
        "/v1/admin/intents/{intent_id}/replay": {
            "parameters": [INTENT_PARAM],
            "post": {
                "summary": "Replay one dead or stuck intent (safe to repeat)",
                "security": ADMIN,
                "parameters": [REPLAY_QUERY],
                "responses": {
                    "200": _json("ReplayOut", "replayed, would be, or already pending"),
                    **_problems(400, 401, 403, 404, 409, 503),
                },
            },
        },
    }


def _paths() -> dict[str, Any]:
    put_body = {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["metadata", "image"],
                    "properties": {"metadata": _ref("Metadata"), "image": {"type": "string", "format": "binary"}},
                    # Any other part is refused with 400.
                    "additionalProperties": False,
                },
                "encoding": {
                    "metadata": {"contentType": "application/json"},
                    # Recognised from the bytes, not from this declared type; listed so clients know the formats.
                    "image": {"contentType": "image/jpeg, image/png, image/webp, image/gif"},
                },
            }
        },
    }
    write_headers = [
        _header("If-Match", 'the newest accepted version, quoted: "3"', pattern='^"[0-9]{1,18}"$'),
        _header("If-None-Match", "* to create only", enum=["*"]),
    ]
    return {
        "/v1/profiles/{user_id}": {
            "parameters": [USER_PARAM],
            "put": {
                "summary": "Create or replace a profile (accepted now, published by a worker)",
                "security": TOKEN,
                "parameters": [
                    *write_headers,
                    _header("Idempotency-Key", "at most 255 characters", minLength=1, maxLength=255),
                    _header("Prefer", "wait=<seconds>, at most 30"),
                ],
                "requestBody": put_body,
                "responses": {
                    "202": _json("AcceptedOut", "accepted; a worker will publish it"),
                    "200": _json("ProfileOut", "published within Prefer: wait"),
                    **_problems(400, 401, 403, 408, 409, 412, 413, 415, 422, 429, 503),
                },
            },
            "get": {
                "summary": "The live version",
                "security": OPTIONAL_TOKEN,
                "parameters": [
                    {
                        "name": "embed",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "enum": ["image"]},
                    },
                    IF_NONE_MATCH_READ,
                ],
                "responses": {
                    "200": _json("ProfileOut", "the live version"),
                    "304": {"description": "not modified"},
                    **_problems(400, 401, 403, 404, 503),
                },
            },
            "delete": {
                "summary": "Delete a profile (a tombstone version)",
                "security": TOKEN,
                "parameters": write_headers,
                "responses": {"204": {"description": "deleted"}, **_problems(400, 401, 403, 404, 412, 429, 503)},
            },
        },
        "/v1/profiles/{user_id}/image": {
            "parameters": [USER_PARAM],
            "get": {
                "summary": "Bytes of the live image",
                "security": OPTIONAL_TOKEN,
                "parameters": [VARIANT_PARAM, IF_NONE_MATCH_READ],
                "responses": _image_responses("the live image"),
            },
        },
        "/v1/profiles/{user_id}/versions/{version}/image": {
            "parameters": [USER_PARAM, VERSION_PARAM],
            "get": {
                "summary": "Bytes of one published version's image",
                "description": (
                    "The bytes never change. The live version always answers; a superseded one until its blob "
                    "is collected, at least the grace period (PROFILES_GC_GRACE_SECONDS) after it stopped being "
                    "live; once a DELETE answered, no version at or below its tombstone answers (404). "
                    "Cache-Control: max-age=60, immutable, public (private when reads need a token)."
                ),
                "security": OPTIONAL_TOKEN,
                "parameters": [VARIANT_PARAM, IF_NONE_MATCH_READ],
                "responses": _image_responses("the image"),
            },
        },
        "/v1/intents/{intent_id}": {
            "parameters": [INTENT_PARAM],
            "get": {
                "summary": "An intent's state",
                "security": OPTIONAL_TOKEN,
                "responses": {"200": _json("IntentOut", "the intent"), **_problems(401, 404, 503)},
            },
        },
        "/healthz": {"get": {"summary": "The process is up", "responses": {"200": {"description": "up"}}}},
        "/readyz": {
            "get": {
                "summary": "PostgreSQL and the blob store answer",
                "responses": {"200": {"description": "ready"}, **_problems(503)},
            }
        },
        "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3.1"}}}},
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        **_admin_paths(),
    }


@cache
def document() -> dict[str, Any]:
    models = [
        (model, "serialization")
        for model in (
            ProfileOut,
            AcceptedOut,
            IntentOut,
            ProblemOut,
            Metadata,
            AdminIntentOut,
            IntentPageOut,
            ReplayOut,
            BulkReplayOut,
        )
    ] + [(BulkReplayIn, "validation")]
    _, schemas = models_json_schema(models, ref_template="#/components/schemas/{model}")  # type: ignore[arg-type]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Profiles",
            "version": "1.0.0",
            "description": "Profile metadata in PostgreSQL, images in S3, kept consistent by an outbox.",
        },
        "paths": _paths(),
        "components": {
            "schemas": schemas.get("$defs", {}),
            "securitySchemes": {"bearerJWT": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
    }

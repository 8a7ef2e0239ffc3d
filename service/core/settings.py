"""Configuration from PROFILES_* environment variables, validated once and passed around explicitly."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Literal, Self

from pydantic import Field, SecretStr, field_serializer, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.core.variants import DEFAULT_VARIANTS, VariantFormat, VariantSpec, parse_variants, variants_text

_KEY_SEGMENT = re.compile(r"(?!\.\.?$)[A-Za-z0-9._-]+")


class ImageDelivery(StrEnum):
    """Who sends image bytes: the API itself, or the blob store (or a CDN) the API redirects to."""

    PROXY = "proxy"
    REDIRECT = "redirect"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PROFILES_", extra="ignore")

    database_url: str
    s3_endpoint_url: str | None = None
    s3_bucket: str = Field(default="profiles", min_length=3, max_length=63)
    s3_region: str = "us-east-1"
    # Blob keys are "<prefix><32 hex digits>": a prefix lets several deployments share one bucket, as
    # long as neither prefix starts with the other (reconciliation only touches keys of that shape).
    s3_key_prefix: str = Field(default="images/", max_length=200)

    # Redirect delivery: image routes answer 307 to a presigned GET of the version's key, or to
    # public_base_url + key when a CDN fronts the bucket.
    image_delivery: ImageDelivery = ImageDelivery.PROXY
    presign_expiry_seconds: int = Field(default=60, ge=1, le=7 * 86400)
    public_base_url: str | None = Field(default=None, pattern=r"^https?://[^?#]+$")

    max_image_bytes: int = Field(default=10 * 1024 * 1024, gt=0)
    # Verified live-image bytes each API process keeps in memory (proxy delivery); 0 turns it off.
    image_cache_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    max_image_side: int = Field(default=10_000, gt=0)
    # Request-body bytes one API process buffers at once; more uploads than that get 503.
    max_inflight_upload_bytes: int = Field(default=256 * 1024 * 1024, gt=0)
    request_timeout_seconds: float = Field(default=30.0, gt=0)
    # Variants every new version gets ("name:box,...", empty for none), made by the workers.
    variants: Annotated[tuple[VariantSpec, ...], NoDecode] = parse_variants(DEFAULT_VARIANTS)
    variant_format: VariantFormat = VariantFormat.WEBP
    # False: only the variants (metadata-free) are served to the public; originals need the admin scope.
    public_originals: bool = True
    # Live versions are brought to the configured variants by add_variants intents; at most this
    # many are queued or running at once, fleet-wide (0: never, for versions that are already live).
    variant_backfill_in_flight: int = Field(default=100, ge=0)

    lease_seconds: float = Field(default=60.0, gt=0)
    attempt_timeout_seconds: float | None = Field(
        default=None, gt=0, description="deadline of one upload attempt; half the lease when unset"
    )
    max_attempts: int = Field(default=10, ge=1)
    retry_base_seconds: float = Field(default=1.0, gt=0)
    retry_max_seconds: float = Field(default=300.0, gt=0)
    poll_interval_seconds: float = Field(default=1.0, gt=0, le=1.0)
    worker_concurrency: int = Field(default=16, ge=1)
    gc_grace_seconds: float = Field(default=300.0, gt=0)
    gc_interval_seconds: float = Field(default=10.0, gt=0)
    gc_batch_size: int = Field(default=100, ge=1)
    reconcile_interval_seconds: float = Field(default=3600.0, gt=0)
    prune_interval_seconds: float = Field(default=60.0, gt=0)
    prune_batch_size: int = Field(default=500, ge=1)
    # Staged bytes of dead intents are kept this long so that a replay can still publish them.
    dead_retention_seconds: float = Field(default=7 * 86400.0, gt=0)
    intent_retention_seconds: float = Field(default=7 * 86400.0, gt=0)
    # The contract keeps idempotency keys at least 24 h.
    idempotency_retention_seconds: float = Field(default=86400.0, ge=86400.0)

    # Production refuses to serve without authentication unless auth_allow_off says a gateway does it.
    mode: Literal["production", "development"] = "production"
    # Bearer JWTs: an HS256 shared secret, or RS256/ES256 keys published at a JWKS URL (one of them).
    auth_jwt_secret: SecretStr | None = Field(default=None, min_length=32)
    auth_jwks_url: str | None = Field(default=None, pattern=r"^https?://")
    auth_issuer: str | None = None
    auth_audience: str | None = None
    auth_leeway_seconds: float = Field(default=30.0, ge=0, le=300)
    auth_admin_scope: str = Field(default="profiles:admin", min_length=1)
    auth_reads_require_token: bool = False
    auth_allow_off: bool = False
    auth_jwks_cache_seconds: float = Field(default=300.0, gt=0)
    # An unknown key id refetches the JWKS at most this often, so forged ids cannot flood the issuer.
    auth_jwks_min_refresh_seconds: float = Field(default=30.0, ge=0)

    # Token buckets per profile and per client address, in each API process; 0 turns one off.
    # Development mode is for trying things (rejected requests count too): there they are off
    # unless set (see _development_has_no_rate_limits).
    write_rate_per_user_per_minute: float = Field(default=30.0, ge=0)
    write_burst_per_user: int = Field(default=10, ge=1)
    write_rate_per_ip_per_minute: float = Field(default=300.0, ge=0)
    write_burst_per_ip: int = Field(default=100, ge=1)
    # How many reverse proxies append to X-Forwarded-For in front of the API; 0 trusts none of it.
    trusted_proxy_hops: int = Field(default=0, ge=0, le=10)
    # A request body must arrive within this (a trickling client gets 408); idle or half-sent
    # request headers are cut off after idle_connection_seconds.
    body_timeout_seconds: float | None = Field(
        default=None, gt=0, description="deadline of a request body; two thirds of the request deadline when unset"
    )
    idle_connection_seconds: float = Field(default=15.0, gt=0)

    # The operator console (/admin/): the key that signs its cookies (production keeps the console
    # shut without it; development uses a random one per process), how long a session lasts, and
    # whether a TLS proxy is in front (its cookie is then Secure even over plain HTTP).
    console_secret: SecretStr | None = Field(default=None, min_length=32)
    console_session_seconds: float = Field(default=900.0, gt=0, le=86400)
    console_behind_tls: bool = False

    worker_metrics_port: int = Field(default=9102, ge=0, le=65535, description="0 turns it off")
    worker_metrics_host: str = "0.0.0.0"
    log_format: Literal["json", "text"] = "json"
    access_log: bool = False

    db_pool_min_size: int = Field(default=1, ge=0)
    db_pool_max_size: int = Field(default=10, ge=1)
    # How long a request waits for a database connection before answering 503.
    db_acquire_timeout_seconds: float = Field(default=5.0, gt=0)
    retry_after_seconds: int = Field(default=5, ge=1)

    def environment(self) -> dict[str, str]:
        """The PROFILES_* variables that give a child process these same settings."""
        values = self.model_dump()
        for name in ("auth_jwt_secret", "console_secret"):
            secret = getattr(self, name)
            if secret is not None:
                values[name] = secret.get_secret_value()
        return {f"PROFILES_{name.upper()}": str(value) for name, value in values.items() if value is not None}

    @property
    def body_deadline_seconds(self) -> float:
        return self.body_timeout_seconds or self.request_timeout_seconds * 2 / 3

    @property
    def auth_enabled(self) -> bool:
        return self.auth_jwt_secret is not None or self.auth_jwks_url is not None

    @property
    def attempt_deadline_seconds(self) -> float:
        return self.attempt_timeout_seconds or self.lease_seconds / 2

    @field_validator("variants", mode="before")
    @classmethod
    def _parse_variants(cls, value: object) -> object:
        return parse_variants(value) if isinstance(value, str) else value

    @field_serializer("variants")
    def _variants_as_text(self, specs: tuple[VariantSpec, ...]) -> str:
        return variants_text(specs)

    @property
    def variant_configuration(self) -> str:
        """The configured variants and their format in one canonical text (what the walk brings
        live versions to)."""
        return f"{variants_text(self.variants)} as {self.variant_format.value}"

    def variant(self, name: str) -> VariantSpec | None:
        return next((spec for spec in self.variants if spec.name == name), None)

    @field_validator("s3_key_prefix")
    @classmethod
    def _prefix_is_whole_segments(cls, prefix: str) -> str:
        # S3 servers fold empty segments ("a//b") and refuse dot segments: keys must be stored as given.
        segments = prefix.split("/")
        if len(segments) < 2 or segments[-1] != "" or not all(_KEY_SEGMENT.fullmatch(s) for s in segments[:-1]):
            raise ValueError(
                "must be one or more segments of letters, digits, '.', '_' or '-', each ending in '/' "
                "(for example images/ or eu/images/), with no empty, '.' or '..' segment"
            )
        return prefix

    @model_validator(mode="after")
    def _development_has_no_rate_limits(self) -> Self:
        if self.mode == "development":
            for name in ("write_rate_per_user_per_minute", "write_rate_per_ip_per_minute"):
                if name not in self.model_fields_set:
                    setattr(self, name, 0.0)
        return self

    @model_validator(mode="after")
    def _attempt_ends_before_its_lease(self) -> Self:
        # A stale attempt must give up before another worker can take the intent over.
        if self.attempt_deadline_seconds >= self.lease_seconds:
            raise ValueError(
                f"PROFILES_ATTEMPT_TIMEOUT_SECONDS ({self.attempt_deadline_seconds}) must be shorter "
                f"than PROFILES_LEASE_SECONDS ({self.lease_seconds})"
            )
        # A reader holding an old pointer, or an upload still in flight, must outlive the grace period.
        longest = max(self.request_timeout_seconds, self.attempt_deadline_seconds)
        if self.gc_grace_seconds <= longest:
            raise ValueError(
                f"PROFILES_GC_GRACE_SECONDS ({self.gc_grace_seconds}) must be longer than the request deadline "
                f"({self.request_timeout_seconds}) and the upload attempt deadline ({self.attempt_deadline_seconds})"
            )
        # A handed-out URL must not outlive its blob, which can be collected one grace period after its
        # version stopped being live: and a URL may be signed up to a request deadline after the read
        # that found the version live.
        signed_for = self.presign_expiry_seconds + self.request_timeout_seconds
        if self.image_delivery is ImageDelivery.REDIRECT and signed_for >= self.gc_grace_seconds:
            raise ValueError(
                f"PROFILES_PRESIGN_EXPIRY_SECONDS ({self.presign_expiry_seconds}) plus the request deadline "
                f"({self.request_timeout_seconds}) must be shorter than "
                f"PROFILES_GC_GRACE_SECONDS ({self.gc_grace_seconds})"
            )
        if self.public_base_url is not None and self.auth_reads_require_token:
            raise ValueError(
                "PROFILES_PUBLIC_BASE_URL serves images to anyone: it cannot go with PROFILES_AUTH_READS_REQUIRE_TOKEN"
            )
        if self.max_inflight_upload_bytes < self.max_image_bytes + 64 * 1024:
            raise ValueError(
                "PROFILES_MAX_INFLIGHT_UPLOAD_BYTES must fit at least one image of PROFILES_MAX_IMAGE_BYTES"
            )
        if self.auth_jwt_secret is not None and self.auth_jwks_url is not None:
            raise ValueError("set PROFILES_AUTH_JWT_SECRET or PROFILES_AUTH_JWKS_URL, not both")
        if self.body_deadline_seconds >= self.request_timeout_seconds:
            raise ValueError("PROFILES_BODY_TIMEOUT_SECONDS must be shorter than PROFILES_REQUEST_TIMEOUT_SECONDS")
        if self.db_pool_min_size > self.db_pool_max_size:
            raise ValueError("PROFILES_DB_POOL_MIN_SIZE must not exceed PROFILES_DB_POOL_MAX_SIZE")
        return self

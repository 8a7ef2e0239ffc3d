"""Authentication and authorisation: bearer JWTs (HS256 and JWKS with RS256/ES256), 401 versus 403,
ownership of profiles, the admin scope, and the refusal to run production without auth."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from pydantic import SecretStr

from service.api.app import create_app
from service.api.auth import AuthNotConfigured
from service.core.settings import Settings
from service.dev.stack import _auth_line
from tests.support import (
    ADMIN_SCOPE,
    EMPTY,
    JWT_SECRET,
    ROOT,
    Client,
    MakeClient,
    bearer,
    png,
    publish_due,
    put_profile,
    status_line_before_body,
    table_counts,
    token,
)

ISSUER = "https://issuer.test/"
AUDIENCE = "profiles-api"


def hs256(settings: Settings, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "auth_jwt_secret": SecretStr(JWT_SECRET),
        "auth_issuer": ISSUER,
        "auth_audience": AUDIENCE,
    }
    return settings.model_copy(update=values | overrides)


def good(subject: str, **claims: Any) -> dict[str, str]:
    return bearer(subject, **({"iss": ISSUER, "aud": AUDIENCE} | claims))


@pytest.fixture
async def secured(make_client: MakeClient, settings: Settings) -> Client:
    return await make_client(hs256(settings))


async def assert_unauthorized(response: Any, *, invalid: bool) -> None:
    assert response.status == 401, await response.text()
    assert response.content_type == "application/problem+json"
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="profiles"')
    assert ('error="invalid_token"' in challenge) is invalid


async def test_writes_without_a_valid_token_get_401_and_store_nothing(secured: Client, settings: Settings) -> None:
    now = int(time.time())
    refused = {
        "no token": ({}, False),
        "not a bearer token": ({"Authorization": f"Basic {token('ann')}"}, True),
        "garbage": ({"Authorization": "Bearer not.a.jwt"}, True),
        "expired beyond the leeway": (good("ann", exp=now - 120), True),
        "wrong issuer": (good("ann", iss="https://evil.test/"), True),
        "wrong audience": (good("ann", aud="another-api"), True),
        "wrong signature": (good("ann", secret="a-different-secret-of-32-bytes-or-more"), True),
        "no expiry": ({"Authorization": "Bearer " + jwt.encode({"sub": "ann"}, JWT_SECRET)}, True),
        "alg none": ({"Authorization": "Bearer " + jwt.encode({"sub": "ann"}, "", algorithm="none")}, True),
    }
    for case, (headers, invalid) in refused.items():
        response = await put_profile(secured, "ann", {"display_name": case}, png(1), headers)
        await assert_unauthorized(response, invalid=invalid)
        assert (await secured.delete("/v1/profiles/ann", headers=headers)).status == 401, case
    assert await table_counts(settings.database_url) == EMPTY


async def test_a_token_just_past_its_expiry_is_accepted_within_the_leeway(secured: Client) -> None:
    headers = good("ann", exp=int(time.time()) - 5)
    assert (await put_profile(secured, "ann", {"display_name": "A"}, png(1), headers)).status == 202


async def test_another_users_token_gets_403_and_changes_nothing(secured: Client, settings: Settings) -> None:
    response = await put_profile(secured, "ann", {"display_name": "A"}, png(1), good("bob"))
    assert response.status == 403
    assert 'error="insufficient_scope"' in response.headers["WWW-Authenticate"]
    assert (await secured.delete("/v1/profiles/ann", headers=good("bob"))).status == 403
    assert await table_counts(settings.database_url) == EMPTY


async def test_the_owner_and_an_admin_may_write_and_delete_a_profile(secured: Client, settings: Settings) -> None:
    assert (await put_profile(secured, "ann", {"display_name": "A"}, png(1), good("ann"))).status == 202
    admin = good("operator", scope=f"openid {ADMIN_SCOPE}")
    assert (await put_profile(secured, "ann", {"display_name": "B"}, png(2), admin)).status == 202
    listed = good("operator", scp=[ADMIN_SCOPE])
    assert (await secured.get("/v1/admin/intents", headers=listed)).status == 200
    assert await publish_due(settings) == 2
    assert (await secured.delete("/v1/profiles/ann", headers=good("ann"))).status == 204


async def test_admin_routes_need_the_admin_scope(secured: Client) -> None:
    await assert_unauthorized(await secured.get("/v1/admin/intents"), invalid=False)
    response = await secured.get("/v1/admin/intents", headers=good("ann", scope="profiles:write"))
    assert response.status == 403
    assert f'scope="{ADMIN_SCOPE}"' in response.headers["WWW-Authenticate"]


async def test_reads_are_public_by_default_and_can_require_a_token(
    secured: Client, make_client: MakeClient, settings: Settings
) -> None:
    assert (await secured.get("/v1/profiles/ann")).status == 404  # answered, not 401
    private = await make_client(hs256(settings, auth_reads_require_token=True))
    for path in ("/v1/profiles/ann", "/v1/profiles/ann/image", "/v1/profiles/ann/versions/1/image"):
        await assert_unauthorized(await private.get(path), invalid=False)
        assert (await private.get(path, headers=good("anyone"))).status == 404
    assert (await private.get("/healthz")).status == 200


async def test_a_versioned_image_behind_a_token_is_never_marked_for_shared_caches(
    make_client: MakeClient, settings: Settings
) -> None:
    private = await make_client(hs256(settings, auth_reads_require_token=True))
    assert (await put_profile(private, "ann", {"display_name": "A"}, png(1), good("ann"))).status == 202
    assert await publish_due(settings) == 1
    response = await private.get("/v1/profiles/ann/versions/1/image", headers=good("anyone"))
    assert response.status == 200
    assert response.headers["Cache-Control"].split(", ")[0] == "private"


async def test_an_unauthenticated_upload_is_refused_before_its_body_is_read(secured: Client) -> None:
    assert (await status_line_before_body(secured, "ann", 5_000_000)).startswith(b"HTTP/1.1 401")


def test_production_refuses_to_start_without_auth_unless_allowed(settings: Settings) -> None:
    production = settings.model_copy(update={"mode": "production"})
    with pytest.raises(AuthNotConfigured, match="PROFILES_AUTH_ALLOW_OFF"):
        create_app(production)
    assert create_app(production.model_copy(update={"auth_allow_off": True})) is not None
    assert create_app(hs256(production)) is not None
    assert "OFF" in _auth_line(settings)


def test_profiles_api_exits_with_a_clear_message_when_production_has_no_auth() -> None:
    env = {"PATH": "/usr/bin:/bin", "PROFILES_DATABASE_URL": "postgresql://127.0.0.1:1/none"}
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "api", "--port", "0"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "refusing to start with authentication off" in result.stderr


def test_both_an_hs256_secret_and_a_jwks_url_are_refused() -> None:
    with pytest.raises(ValueError, match="not both"):
        Settings(
            database_url="postgresql://x/y",
            auth_jwt_secret=SecretStr("s" * 32),
            auth_jwks_url="https://issuer.test/jwks.json",
        )


@dataclass
class Issuer:
    """An identity provider publishing its keys at a JWKS URL, able to rotate them."""

    private: dict[str, Any] = field(default_factory=dict)
    published: list[dict[str, Any]] = field(default_factory=list)
    fetches: int = 0

    def add_rsa(self, kid: str) -> None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.private[kid] = key
        self.published.append(RSAAlgorithm.to_jwk(key.public_key(), as_dict=True) | {"kid": kid, "use": "sig"})

    def add_ec(self, kid: str) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        self.private[kid] = key
        self.published.append(ECAlgorithm.to_jwk(key.public_key(), as_dict=True) | {"kid": kid, "use": "sig"})

    def retire(self, kid: str) -> None:
        self.published = [jwk for jwk in self.published if jwk["kid"] != kid]

    def sign(self, kid: str, subject: str, algorithm: str = "RS256") -> dict[str, str]:
        now = int(time.time())
        claims = {"sub": subject, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300}
        encoded = jwt.encode(claims, self.private[kid], algorithm=algorithm, headers={"kid": kid})
        return {"Authorization": f"Bearer {encoded}"}

    async def jwks(self, _request: web.Request) -> web.Response:
        self.fetches += 1
        return web.json_response({"keys": self.published})


@pytest.fixture
async def issuer() -> AsyncIterator[tuple[Issuer, str]]:
    provider = Issuer()
    app = web.Application()
    app.router.add_get("/jwks.json", provider.jwks)
    server = TestServer(app)
    await server.start_server()
    yield provider, str(server.make_url("/jwks.json"))
    await server.close()


def jwks_settings(settings: Settings, url: str, min_refresh: float) -> Settings:
    values = {
        "auth_jwks_url": url,
        "auth_issuer": ISSUER,
        "auth_audience": AUDIENCE,
        "auth_jwks_min_refresh_seconds": min_refresh,
    }
    return settings.model_copy(update=values)


async def test_jwks_tokens_verify_with_rs256_and_es256_and_survive_key_rotation(
    make_client: MakeClient, settings: Settings, issuer: tuple[Issuer, str]
) -> None:
    provider, url = issuer
    provider.add_rsa("rsa-1")
    provider.add_ec("ec-1")
    client = await make_client(jwks_settings(settings, url, min_refresh=0))
    write = {"display_name": "A"}
    assert (await put_profile(client, "ann", write, png(1), provider.sign("rsa-1", "ann"))).status == 202
    assert (await put_profile(client, "ann", write, png(2), provider.sign("ec-1", "ann", "ES256"))).status == 202
    provider.add_rsa("rsa-2")  # rotation: a new key appears, the old one is retired
    provider.retire("rsa-1")
    assert (await put_profile(client, "ann", write, png(3), provider.sign("rsa-2", "ann"))).status == 202
    retired = await put_profile(client, "ann", write, png(4), provider.sign("rsa-1", "ann"))
    await assert_unauthorized(retired, invalid=True)


async def test_forged_key_ids_do_not_make_every_request_fetch_the_jwks(
    make_client: MakeClient, settings: Settings, issuer: tuple[Issuer, str]
) -> None:
    provider, url = issuer
    provider.add_rsa("rsa-1")
    provider.private["forged"] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    client = await make_client(jwks_settings(settings, url, min_refresh=3600))
    assert (
        await put_profile(client, "ann", {"display_name": "A"}, png(1), provider.sign("rsa-1", "ann"))
    ).status == 202
    before = provider.fetches
    for i in range(5):
        forged = await put_profile(client, "ann", {"display_name": "A"}, png(i), provider.sign("forged", "ann"))
        await assert_unauthorized(forged, invalid=True)
    assert provider.fetches == before


async def test_an_hmac_key_in_the_jwks_cannot_sign_tokens(
    make_client: MakeClient, settings: Settings, issuer: tuple[Issuer, str]
) -> None:
    provider, url = issuer
    provider.add_rsa("rsa-1")
    secret = "published-hmac-secret-anyone-can-read"
    provider.published.append({"kty": "oct", "kid": "hmac", "k": jwt.utils.base64url_encode(secret.encode()).decode()})
    client = await make_client(jwks_settings(settings, url, min_refresh=0))
    claims = {"sub": "ann", "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 300}
    header = {"Authorization": "Bearer " + jwt.encode(claims, secret, algorithm="HS256", headers={"kid": "hmac"})}
    await assert_unauthorized(await put_profile(client, "ann", {"display_name": "A"}, png(1), header), invalid=True)


async def test_an_unreachable_jwks_gives_503_with_retry_after(make_client: MakeClient, settings: Settings) -> None:
    client = await make_client(jwks_settings(settings, "http://127.0.0.1:9/jwks.json", min_refresh=0))
    response = await put_profile(client, "ann", {"display_name": "A"}, png(1), bearer("ann"))
    assert response.status == 503
    assert response.headers["Retry-After"]

"""RFC 9457 problem details: the one shape every error response of the API takes."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import ValidationError

PROBLEM_JSON = "application/problem+json"


class Problem(Exception):
    """Raised anywhere in a request; the error middleware turns it into a problem+json response."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        slug: str | None = None,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.slug = slug or title.lower().replace(" ", "-")
        self.errors = errors
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": f"/problems/{self.slug}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if self.errors is not None:
            body["errors"] = self.errors
        return body

    def response(self) -> web.Response:
        response = web.json_response(self.body(), status=self.status, headers=self.headers, content_type=PROBLEM_JSON)
        if self.status in (408, 413):
            # The rest of the body is never read, so the connection cannot be reused.
            response.force_close()
        return response


def validation_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """A pydantic error as the problem's `errors`: which field, what is wrong, and pydantic's code for it."""
    return [
        {"field": ".".join(str(p) for p in err["loc"]), "message": err["msg"], "type": err["type"]}
        for err in exc.errors()
    ]


def unavailable(what: str, retry_after: int) -> Problem:
    return Problem(
        503, "Service unavailable", f"{what} is unavailable; retry later", headers={"Retry-After": str(retry_after)}
    )


def not_found(detail: str) -> Problem:
    return Problem(404, "Not found", detail)


def _auth_header(error: str | None = None, description: str | None = None, scope: str | None = None) -> str:
    params = ['realm="profiles"']
    for name, value in (("error", error), ("error_description", description), ("scope", scope)):
        if value is not None:
            # A quoted string of printable ASCII without quotes or backslashes (RFC 6750 3); the
            # problem's detail carries the full text.
            kept = "".join(c for c in value if " " <= c <= "~" and c not in '"\\')
            params.append(f'{name}="{kept}"')
    return "Bearer " + ", ".join(params)


def unauthenticated(detail: str, *, invalid: bool) -> Problem:
    header = _auth_header("invalid_token", detail) if invalid else _auth_header()
    return Problem(401, "Unauthorized", detail, slug="unauthorized", headers={"WWW-Authenticate": header})


def forbidden(detail: str, scope: str | None) -> Problem:
    header = _auth_header("insufficient_scope", scope=scope)
    return Problem(403, "Forbidden", detail, slug="forbidden", headers={"WWW-Authenticate": header})

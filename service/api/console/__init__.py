"""The operator console at /admin/: server-rendered pages (Jinja2) over service.core.operations,
with a little vendored htmx that polls what changes. security.py says who may use it."""

from __future__ import annotations

from aiohttp import web

from service.api.console.pages import console_app
from service.core.settings import Settings


def add_console(app: web.Application, settings: Settings) -> None:
    app.add_subapp("/admin", console_app(settings))

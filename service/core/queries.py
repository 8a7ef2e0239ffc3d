"""Loads the named SQL in sql/queries.sql; code refers to a query by name, never by building SQL."""

from __future__ import annotations

import re
from importlib.resources import files

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
# Each statement is sent with its name first, so that pg_stat_activity, pg_stat_statements and
# database spans (service/core/tracing.py) say which query it is.
NAMED = re.compile(r"/\* (\w+) \*/")


def _load() -> dict[str, str]:
    text = files("service.core").joinpath("sql/queries.sql").read_text(encoding="utf-8")
    parts = _NAME.split(text)[1:]
    return {name: f"/* {name} */\n{body.strip()}" for name, body in zip(parts[::2], parts[1::2], strict=True)}


QUERIES = _load()


def query(name: str) -> str:
    return QUERIES[name]

"""The named SQL of service/core/sql/queries.sql against the code that runs it."""

from __future__ import annotations

import ast
from pathlib import Path

from service.core.queries import QUERIES

ROOT = Path(__file__).resolve().parent.parent


def query_calls() -> list[tuple[str, ast.Call]]:
    """Every call of `query(...)` in the product's code, with the file it is in."""
    calls = []
    for path in sorted([*ROOT.glob("service/**/*.py"), *ROOT.glob("workers/**/*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "query":
                calls.append((str(path.relative_to(ROOT)), node))
    return calls


def test_every_query_is_named_literally_where_it_runs() -> None:
    built = [f"{path}:{call.lineno}" for path, call in query_calls() if not _literal_name(call)]
    assert not built, f"query names built at run time: {built}"


def test_every_query_used_is_defined_and_every_defined_query_is_used() -> None:
    used = {_literal_name(call) for _, call in query_calls()}
    assert used - set(QUERIES) == set(), "used but not defined in queries.sql"
    assert set(QUERIES) - used == set(), "defined in queries.sql but never used"
    assert len(QUERIES) > 20  # the loader found the file's blocks


def _literal_name(call: ast.Call) -> str | None:
    match call.args:
        case [ast.Constant(value=str(name))]:
            return name
    return None

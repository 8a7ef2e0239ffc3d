"""CI smoke of `./scripts/dev` in one checkout: bootstrap, start, one PUT and GET, two SIGINTs, then
no process that the dev stack started may be left. Every wait is bounded; on failure it kills all of them.

Usage: python3 .ci/smoke_dev.py CHECKOUT [--python PYTHON]. Standard library only; Linux (see leftovers.py).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from leftovers import become_subreaper, kill_all_below, left_behind, reap_zombies, wait_for

HTTP_TIMEOUT_SECONDS = 10.0
REACTION_SECONDS = 10.0
SECOND_SIGINT_DELAY_SECONDS = 1.0


@dataclass(frozen=True)
class Limits:
    bootstrap: float = 600.0
    banner: float = 120.0
    requests: float = 60.0
    shutdown: float = 60.0
    vanish: float = 5.0


class SmokeFailed(Exception):
    """One line for the CI log saying which step failed."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Output:
    """The dev stack's output, echoed to the CI log as it comes and kept for waiting on."""

    lines: list[str] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def follow(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            print(f"dev| {line}", flush=True)
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()

    def wait_for_line(self, text: str, seconds: float, *, after: int = 0) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: any(text in line for line in self.lines[after:]), seconds)


def tiny_png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    width, height = 4, 3
    rows = b"".join(b"\0" + b"".join(bytes([x * 60, y * 80, 200]) for x in range(width)) for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def multipart(metadata: dict[str, str], image: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="metadata"\r\n'
        f"Content-Type: application/json\r\n\r\n{json.dumps(metadata)}\r\n"
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="smoke.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    )
    body = head.encode() + image + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def request(method: str, url: str, body: bytes | None = None, content_type: str | None = None) -> tuple[int, bytes]:
    headers = {"Content-Type": content_type} if content_type else {}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, data=body, method=method, headers=headers), timeout=HTTP_TIMEOUT_SECONDS
        ) as answer:
            return int(answer.status), bytes(answer.read())
    except urllib.error.HTTPError as error:
        return int(error.code), bytes(error.read())
    except (urllib.error.URLError, OSError):
        return 0, b""


def put_and_get(api: str, seconds: float) -> None:
    """Waits for /healthz, writes one profile and reads it back once the worker has published it."""
    deadline = time.monotonic() + seconds
    while request("GET", f"{api}/healthz")[0] != 200:
        if time.monotonic() > deadline:
            raise SmokeFailed(f"{api}/healthz did not answer 200 within {seconds:.0f}s")
        time.sleep(0.2)
    user, name, image = f"smoke-{uuid.uuid4().hex[:8]}", "Smoke Test", tiny_png()
    status, answer = request("PUT", f"{api}/v1/profiles/{user}", *multipart({"display_name": name}, image))
    if status != 202:
        raise SmokeFailed(f"PUT answered {status}, not 202: {answer[:200]!r}")
    while (read := request("GET", f"{api}/v1/profiles/{user}?embed=image"))[0] != 200:
        if time.monotonic() > deadline:
            raise SmokeFailed(f"GET did not answer 200 within {seconds:.0f}s (last: {read[0]} {read[1][:200]!r})")
        time.sleep(0.2)
    profile = json.loads(read[1])
    if profile["metadata"]["display_name"] != name or base64.b64decode(profile["image"]["data"]) != image:
        raise SmokeFailed(f"GET returned something else than the PUT: {read[1][:200]!r}")
    print(f"smoke: PUT and GET of {user} round-tripped", flush=True)


def run_bounded(command: list[str], cwd: Path, env: dict[str, str], seconds: float, what: str) -> None:
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        code = proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        raise SmokeFailed(f"{what} did not finish within {seconds:.0f}s") from None
    finally:
        kill_all_below(os.getpid())
    if code != 0:
        raise SmokeFailed(f"{what} exited with {code}")


def api_refuses(api_port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", api_port)) != 0


def interrupt_twice(proc: subprocess.Popen[bytes], api_port: int, limits: Limits) -> None:
    """Ctrl-C as a terminal sends it (to the foreground process group), then a person's second one a
    moment after the API closed, while the engines stop: the window where a stack is most easily left."""
    os.killpg(proc.pid, signal.SIGINT)
    wait_for(lambda: proc.poll() is not None or api_refuses(api_port), REACTION_SECONDS)
    time.sleep(SECOND_SIGINT_DELAY_SECONDS)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=limits.shutdown)
    except subprocess.TimeoutExpired:
        raise SmokeFailed(f"./scripts/dev did not stop within {limits.shutdown:.0f}s of two SIGINTs") from None


def smoke_dev(checkout: Path, env: dict[str, str], limits: Limits) -> None:
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    data_dir = checkout / ".profiles-dev"
    command = ["./scripts/dev", "--data-dir", str(data_dir), "--port", str(port)]
    print(f"smoke: {' '.join(command)}", flush=True)
    proc = subprocess.Popen(
        command,
        cwd=checkout,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    assert proc.stdout is not None
    output = Output()
    reader = threading.Thread(target=output.follow, args=(proc.stdout,), daemon=True)
    reader.start()
    if not output.wait_for_line(api, limits.banner):
        raise SmokeFailed(f"no banner naming {api} within {limits.banner:.0f}s (exit code {proc.poll()})")
    put_and_get(api, limits.requests)
    interrupt_twice(proc, port, limits)
    if left := left_behind(limits.vanish):
        raise SmokeFailed(f"./scripts/dev exited ({proc.returncode}) but left processes behind: {'; '.join(left)}")
    print(f"smoke: ./scripts/dev stopped ({proc.returncode}) and left no process behind", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("checkout", type=Path)
    parser.add_argument("--python", help="the Python that bootstraps .venv (PYTHON of scripts/bootstrap.sh)")
    parser.add_argument("--banner-seconds", type=float, default=Limits.banner)
    args = parser.parse_args(argv)
    checkout = args.checkout.resolve()
    env = {**os.environ, **({"PYTHON": args.python} if args.python else {})}
    limits = Limits(banner=args.banner_seconds)
    become_subreaper()
    try:
        bootstrap = ["bash", "-c", "source scripts/bootstrap.sh"]
        run_bounded(bootstrap, checkout, env, limits.bootstrap, "the bootstrap")
        smoke_dev(checkout, env, limits)
    except SmokeFailed as failure:
        print(f"smoke: FAILED: {failure}", file=sys.stderr, flush=True)
        return 1
    finally:
        kill_all_below(os.getpid())
        reap_zombies()
    return 0


if __name__ == "__main__":
    sys.exit(main())

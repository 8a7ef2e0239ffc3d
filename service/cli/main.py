"""The `profiles` command: dev, api, worker, migrate, intents and gc."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from service.api.auth import AuthNotConfigured
from service.cli import console
from service.cli.console import parse_duration
from service.core.blobstore import BlobStoreError
from service.core.domain import INTENT_SELECTIONS, IntentState
from service.core.lifecycle import Shutdown, install_stop_signals
from service.core.logs import configure_logging
from service.core.migrate import MigrationError, migrate
from service.core.repository import DATABASE_UNAVAILABLE, IntentFilter
from service.core.settings import Settings
from service.core.tracing import Role, traced
from service.dev.stackfile import (
    DATA_DIR_VARIABLE,
    NoDevStack,
    default_data_dir,
    running_stack_settings,
    use_stack_environment,
)


class UsageError(Exception):
    """A problem a person can fix, reported in one line."""


def _settings(**overrides: object) -> Settings:
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise UsageError(_invalid_configuration(exc)) from None


def _invalid_configuration(exc: ValidationError) -> str:
    problems = "; ".join(
        f"PROFILES_{'_'.join(str(p) for p in err['loc']).upper() or 'SETTINGS'}: {err['msg']}" for err in exc.errors()
    )
    return f"invalid configuration: {problems}"


def _use_dev_stack() -> None:
    """Without PROFILES_DATABASE_URL, the settings of the `profiles dev` running here, said in one line."""
    data_dir = default_data_dir()
    use_stack_environment(running_stack_settings(data_dir))
    print(f"profiles: PROFILES_DATABASE_URL is not set: using the `profiles dev` on {data_dir}", file=sys.stderr)


def _cmd_migrate(_args: argparse.Namespace) -> int:
    settings = _settings()
    configure_logging(settings.log_format)
    print(migrate(settings.database_url) or "schema is up to date")
    return 0


def _cmd_api(args: argparse.Namespace) -> int:
    from service.api.app import serve

    settings = _settings()
    configure_logging(settings.log_format)
    with traced(settings, Role.API):
        asyncio.run(_until_signal(lambda shutdown: serve(settings, args.host, args.port, shutdown.graceful)))
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from workers.outbox import run_worker

    settings = _settings(**({} if args.concurrency is None else {"worker_concurrency": args.concurrency}))
    configure_logging(settings.log_format)
    with traced(settings, Role.WORKER):
        asyncio.run(_until_signal(lambda shutdown: run_worker(settings, shutdown)))
    return 0


def _cmd_dev(args: argparse.Namespace) -> int:
    # Imported here, not at start-up: the engines are for development only.
    from service.dev.embedded import EngineUnavailable
    from service.dev.stack import DevStackInUse, run_dev

    configure_logging("text")
    try:
        run_dev(Path(args.data_dir), args.host, args.port)
    except ValidationError as exc:
        raise UsageError(_invalid_configuration(exc)) from None
    except (EngineUnavailable, DevStackInUse) as exc:
        raise UsageError(str(exc)) from None
    return 0


def _ops_settings() -> Settings:
    settings = _settings()
    configure_logging(settings.log_format, logging.WARNING)
    return settings


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _filter(args: argparse.Namespace) -> IntentFilter:
    try:
        older = None if args.older_than is None else parse_duration(args.older_than)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return IntentFilter(state=args.state, user_id=args.user, older_than_seconds=older)


def _intent_ids(values: list[str]) -> list[uuid.UUID]:
    try:
        return [uuid.UUID(value) for value in values]
    except ValueError:
        raise UsageError(f"not intent ids: {' '.join(values)}") from None


def _cmd_intents_list(args: argparse.Namespace) -> int:
    asyncio.run(console.intents_list(_ops_settings(), _filter(args), args.limit, args.json))
    return 0


def _cmd_intents_show(args: argparse.Namespace) -> int:
    (intent_id,) = _intent_ids([args.intent_id])
    return 0 if asyncio.run(console.intents_show(_ops_settings(), intent_id, args.json)) else 1


def _cmd_intents_replay(args: argparse.Namespace) -> int:
    if bool(args.intent_ids) == args.all_dead:
        raise UsageError("give intent ids or --all-dead, not both and not neither")
    where = IntentFilter(state=IntentState.DEAD, user_id=args.user) if args.all_dead else None
    replayed = asyncio.run(
        console.intents_replay(
            _ops_settings(), _intent_ids(args.intent_ids), where, dry_run=args.dry_run, as_json=args.json
        )
    )
    return 0 if replayed else 1


def _cmd_gc(args: argparse.Namespace) -> int:
    asyncio.run(console.gc(_ops_settings(), reconcile_bucket=args.reconcile, dry_run=args.dry_run, as_json=args.json))
    return 0


async def _until_signal(main: Callable[[Shutdown], object]) -> None:
    shutdown = Shutdown()
    install_stop_signals(shutdown)
    await main(shutdown)  # type: ignore[misc]


def _add_intents_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    intents = commands.add_parser("intents", help="inspect and replay intents").add_subparsers(
        dest="intents_command", required=True
    )
    listing = intents.add_parser("list", help="intents, oldest first")
    listing.add_argument("--state", choices=INTENT_SELECTIONS)
    listing.add_argument("--user", help="only this user's intents")
    listing.add_argument("--older-than", help="only intents older than this, e.g. 10m, 2h, 7d")
    listing.add_argument("--limit", type=_positive, default=100)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=_cmd_intents_list)
    show = intents.add_parser("show", help="one intent")
    show.add_argument("intent_id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(run=_cmd_intents_show)
    replay = intents.add_parser("replay", help="send dead or stuck intents round again")
    replay.add_argument("intent_ids", nargs="*", metavar="ID")
    replay.add_argument("--all-dead", action="store_true", help="every dead intent (of --user)")
    replay.add_argument("--user")
    replay.add_argument("--dry-run", action="store_true", help="say what would be replayed, change nothing")
    replay.add_argument("--json", action="store_true")
    replay.set_defaults(run=_cmd_intents_replay)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="profiles", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    dev = commands.add_parser(
        "dev",
        help="the whole system on this machine, no setup needed",
        description="Embedded PostgreSQL and S3, migrations, the API and a worker; Ctrl-C stops everything. "
        "While it runs, the other commands find it through DATA_DIR/settings.env.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    dev.add_argument(
        "--data-dir",
        default=str(default_data_dir()),
        help=f"where PostgreSQL and S3 keep their data; {DATA_DIR_VARIABLE} sets the default",
    )
    dev.add_argument("--host", default="127.0.0.1", help="address of the API and the worker's metrics")
    dev.add_argument("--port", type=int, default=8080, help="port of the API")
    dev.set_defaults(run=_cmd_dev)
    api = commands.add_parser("api", help="the HTTP API")
    api.add_argument("--host", default="0.0.0.0")
    api.add_argument("--port", type=int, default=8080)
    api.set_defaults(run=_cmd_api)
    worker = commands.add_parser("worker", help="one outbox worker process")
    worker.add_argument("--concurrency", type=int, default=None)
    worker.set_defaults(run=_cmd_worker)
    commands.add_parser("migrate", help="apply database migrations").set_defaults(run=_cmd_migrate)
    _add_intents_commands(commands)
    gc = commands.add_parser("gc", help="collect blobs no live version needs")
    gc.add_argument("--reconcile", action="store_true", help="also list the bucket for keys nobody needs")
    gc.add_argument("--dry-run", action="store_true", help="report only, delete and schedule nothing")
    gc.add_argument("--json", action="store_true")
    gc.set_defaults(run=_cmd_gc)
    return parser


# Failures a person can act on: said in one line, never as a traceback.
REPORTED_IN_ONE_LINE: tuple[type[BaseException], ...] = (
    UsageError,
    AuthNotConfigured,
    NoDevStack,
    MigrationError,
    BlobStoreError,
    *DATABASE_UNAVAILABLE,
)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command != "dev" and "PROFILES_DATABASE_URL" not in os.environ:
            _use_dev_stack()
        code: int = args.run(args)
    except REPORTED_IN_ONE_LINE as exc:
        print(f"profiles {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before a command's own signal handling is in place
        return 130
    return code

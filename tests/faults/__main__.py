"""`python -m tests.faults [--seconds N] [--seed S]`: one fault-injection run, its figures, exit 1 on violations."""

from __future__ import annotations

import argparse
import asyncio
import sys

from tests.faults.run import RunConfig, figures, run


def main(argv: list[str] | None = None) -> int:
    defaults = RunConfig.from_environment()
    parser = argparse.ArgumentParser(prog="python -m tests.faults", description=__doc__)
    parser.add_argument("--seconds", type=float, default=defaults.seconds, help="length of the chaos period")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the fault schedule and the load")
    parser.add_argument("--users", type=int, default=defaults.users)
    parser.add_argument("--writers", type=int, default=defaults.writers)
    parser.add_argument("--readers", type=int, default=defaults.readers)
    args = parser.parse_args(argv)
    config = RunConfig(
        seconds=args.seconds, seed=args.seed, users=args.users, writers=args.writers, readers=args.readers
    )
    result = asyncio.run(run(config))
    print(figures(result))
    return 1 if result.violations else 0


if __name__ == "__main__":
    sys.exit(main())

"""A seeded random schedule of faults: SIGKILL and SIGSTOP/SIGCONT of workers and API processes, every
worker stalled mid-upload past its lease, S3 server outages, PostgreSQL restarts (fast shutdown) and
crashes (immediate shutdown, then recovery)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tests.faults.cluster import Cluster, Slot

WORKER_KILL = "worker SIGKILL"
WORKER_PAUSE = "worker SIGSTOP"
FLEET_STALL = "worker fleet stall"
API_KILL = "API SIGKILL"
API_PAUSE = "API SIGSTOP"
S3_OUTAGE = "S3 outage"
POSTGRES_RESTART = "PostgreSQL restart"
POSTGRES_CRASH = "PostgreSQL crash"
STALL_SECONDS = 0.5  # how long S3 hangs before the workers are paused: uploads claimed meanwhile hang
KINDS = (WORKER_KILL, WORKER_PAUSE, FLEET_STALL, API_KILL, API_PAUSE, S3_OUTAGE, POSTGRES_RESTART, POSTGRES_CRASH)


@dataclass(frozen=True)
class Fault:
    kind: str
    target: str
    start: float
    end: float
    held: float  # how long the target was down or paused, as drawn from the schedule


@dataclass(frozen=True)
class _Plan:
    kind: str
    target: str
    locks: tuple[asyncio.Lock, ...]
    held: float
    act: Callable[[float], Awaitable[None]]


class Chaos:
    """Every 1-3 s one fault on a target that is not already under one. Kinds are drawn from a
    shuffled bag, so every kind comes up once per round however short the run."""

    def __init__(self, cluster: Cluster, seed: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._cluster = cluster
        self._clock = clock
        self._rng = random.Random(seed)
        self._lease = cluster.settings.lease_seconds
        self._bag: list[str] = []
        self.faults: list[Fault] = []

    async def run(self, stop: asyncio.Event) -> None:
        running: set[asyncio.Task[None]] = set()
        try:
            while not await stopped_within(stop, self._rng.uniform(1.0, 3.0)):
                plan = self._next_plan()
                if plan is not None:
                    for lock in plan.locks:
                        await lock.acquire()  # free, so this does not wait: held until the target is back
                    running.add(asyncio.create_task(self._inject(plan)))
        finally:
            # Every fault restores its target (SIGCONT, restart) before the run goes on.
            await asyncio.gather(*running)

    def _next_plan(self) -> _Plan | None:
        if not self._bag:
            self._bag = self._rng.sample(KINDS, len(KINDS))
        for kind in self._bag:
            plan = self._plan(kind)
            if plan is not None:
                self._bag.remove(kind)
                return plan
        return None  # every target of the remaining kinds is still under a fault

    def _plan(self, kind: str) -> _Plan | None:
        cluster, rng = self._cluster, self._rng
        if kind in (WORKER_KILL, WORKER_PAUSE, API_KILL, API_PAUSE):
            slots = cluster.workers if kind in (WORKER_KILL, WORKER_PAUSE) else cluster.apis
            free = [slot for slot in slots if not slot.lock.locked()]
            if not free:
                return None
            slot = rng.choice(free)
            if kind in (WORKER_KILL, API_KILL):
                return _Plan(kind, slot.name, (slot.lock,), rng.uniform(0.2, 1.0), _killer(slot))
            # Workers are sometimes paused past their lease: another worker takes the intent over
            # and the paused one must be fenced off when it wakes up.
            longest = 2.0 * self._lease if kind == WORKER_PAUSE else 3.0
            return _Plan(kind, slot.name, (slot.lock,), rng.uniform(0.5, longest), _pauser(slot))
        if kind == FLEET_STALL:
            locks = (cluster.s3_lock, *(slot.lock for slot in cluster.workers))
            if any(lock.locked() for lock in locks):
                return None
            held = rng.uniform(self._lease + 0.5, 2.0 * self._lease)
            return _Plan(kind, "s3 and every worker", locks, held, self._fleet_stall)
        if kind == S3_OUTAGE:
            if cluster.s3_lock.locked():
                return None
            return _Plan(kind, "s3", (cluster.s3_lock,), rng.uniform(1.0, 4.0), self._s3_outage)
        if cluster.postgres_lock.locked():
            return None
        crash = kind == POSTGRES_CRASH
        act = self._postgres_down(crash=crash)
        return _Plan(kind, "postgres", (cluster.postgres_lock,), rng.uniform(0.0, 1.5), act)

    async def _inject(self, plan: _Plan) -> None:
        start = self._clock()
        try:
            await plan.act(plan.held)
        finally:
            for lock in plan.locks:
                lock.release()
        self.faults.append(Fault(plan.kind, plan.target, start, self._clock(), plan.held))

    async def _s3_outage(self, held: float) -> None:
        s3 = self._cluster.s3
        await asyncio.to_thread(s3.kill)  # a graceful stop takes SeaweedFS about 15 s
        try:
            await asyncio.sleep(held)
        finally:
            await asyncio.to_thread(s3.start)

    async def _fleet_stall(self, held: float) -> None:
        """S3 hangs, so that uploads in flight pile up; then every worker pauses past its lease
        with no worker left to take the intents over: they stay stuck until the operator replays
        them, and the workers wake up fenced off."""
        s3, workers = self._cluster.s3, self._cluster.workers
        os.kill(s3.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(STALL_SECONDS)
            for slot in workers:
                slot.signal(signal.SIGSTOP)
        finally:
            os.kill(s3.pid, signal.SIGCONT)
        try:
            await asyncio.sleep(held)
        finally:
            for slot in workers:
                slot.signal(signal.SIGCONT)

    def _postgres_down(self, *, crash: bool) -> Callable[[float], Awaitable[None]]:
        postgres = self._cluster.postgres

        async def act(held: float) -> None:
            if crash:
                # Immediate shutdown: backends die without a checkpoint; the next start recovers from WAL.
                postmaster = int((postgres.data_dir / "postmaster.pid").read_text().split()[0])
                os.kill(postmaster, signal.SIGQUIT)
            await asyncio.to_thread(postgres.stop)  # fast shutdown, or reaping the crashed postmaster
            try:
                await asyncio.sleep(held)
            finally:
                await asyncio.to_thread(postgres.start)

        return act


def _killer(slot: Slot) -> Callable[[float], Awaitable[None]]:
    async def act(held: float) -> None:
        await slot.kill()
        await asyncio.sleep(held)
        await slot.start()

    return act


def _pauser(slot: Slot) -> Callable[[float], Awaitable[None]]:
    async def act(held: float) -> None:
        slot.signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(held)
        finally:
            slot.signal(signal.SIGCONT)

    return act


async def stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep `seconds` unless `stop` is set first; True if it was."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True

"""The refresher: a long-running worker that re-signs URLs before they expire.

    async for _ in poll(interval): claim due ids -> re-sign (bounded concurrency) -> store

Ids nobody requested for `refresh_idle` seconds are retired from the index instead of being
re-signed forever; ids whose object is gone (the resolver says NotFound) are purged.
SIGTERM: stop claiming, finish the claimed work within `refresh_drain_timeout`, hand back
whatever is left, close the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError
from starlette.applications import Starlette

from . import metrics
from .config import Config
from .errors import NotFound
from .index import Index
from .ops import ops_app
from .resolvers import Backed, Resolver, check_key, make_resolver
from .storage import Signer, make_signer

log = logging.getLogger("proxy_service.refresher")


@dataclass
class CycleStats:
    claimed: int = 0
    refreshed: int = 0
    failed: int = 0
    retired: int = 0
    lag: float = 0.0


@dataclass
class Totals(CycleStats):
    """Since start: the cycle counts summed (lag is the last cycle's), plus what only a running
    worker knows. Each cycle also goes to the Prometheus metrics as it is added."""

    cycles: int = 0
    index_size: int = 0
    last_cycle_at: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)

    def add(self, stats: CycleStats) -> None:
        self.cycles += 1
        metrics.CYCLES.inc()
        for name, counter in _COUNTERS.items():
            setattr(self, name, getattr(self, name) + getattr(stats, name))
            counter.inc(getattr(stats, name))
        self.lag = stats.lag
        metrics.LAG.set(stats.lag)


_COUNTERS = {
    "claimed": metrics.CLAIMED,
    "refreshed": metrics.REFRESHED,
    "failed": metrics.FAILED,
    "retired": metrics.RETIRED,
}


async def poll(interval: float, stop: asyncio.Event) -> AsyncIterator[None]:
    """Yield now, then every `interval` seconds, until `stop` is set."""
    while not stop.is_set():
        yield
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


class Refresher:
    def __init__(
        self,
        config: Config,
        index: Index,
        resolver: Resolver | None = None,
        signer: Signer | None = None,
    ) -> None:
        self.config = config
        self.index = index
        self.resolver = resolver or make_resolver(config)
        self.signer = signer or make_signer(config)
        self.totals = Totals()
        self.stop = asyncio.Event()
        self._prefix = config.key_prefix
        self._heartbeat = (
            Path(config.refresh_heartbeat_file) if config.refresh_heartbeat_file else None
        )

    async def run(self) -> None:
        async for _ in poll(self.config.refresh_interval, self.stop):
            try:
                await self.cycle()
            except (RedisError, OSError) as exc:
                # Only the type: redis-py messages can carry the URL with its password.
                log.warning("refresh cycle failed: %s", type(exc).__name__)
                metrics.REDIS_UP.set(0)
                name = type(exc).__name__
                self.totals.errors[name] = self.totals.errors.get(name, 0) + 1
                continue
            metrics.REDIS_UP.set(1)
            self._beat()

    async def cycle(self) -> CycleStats:
        """Drain everything due now, batch by batch (stops claiming once `stop` is set)."""
        c = self.config
        now = time.time()
        stats = CycleStats(lag=await self.index.lag(now))
        while not self.stop.is_set():
            ids = await self._claim(now)
            stats.claimed += len(ids)
            if ids:
                await self._batch(ids, now, stats)
                self._beat()  # a long drain is progress too: keep the liveness probe happy
            if len(ids) < c.refresh_batch:
                break
            now = time.time()
        self.totals.add(stats)
        self.totals.index_size = await self.index.size()
        metrics.INDEX_SIZE.set(self.totals.index_size)
        self.totals.last_cycle_at = time.time()
        if stats.claimed or stats.lag:
            log.info(
                "refresh cycle: claimed=%d refreshed=%d failed=%d retired=%d lag=%.1fs",
                stats.claimed,
                stats.refreshed,
                stats.failed,
                stats.retired,
                stats.lag,
            )
        return stats

    async def _claim(self, now: float) -> list[str]:
        claim = asyncio.ensure_future(
            self.index.claim(now, self.config.refresh_lease, self.config.refresh_batch)
        )
        try:
            ids = await asyncio.shield(claim)
        except asyncio.CancelledError:
            # Cancelled (a hard stop) while the claim was on its way: what it took goes back.
            with contextlib.suppress(Exception):
                ids = await asyncio.wait_for(claim, self.config.redis_timeout + 1.0)
                await self.index.release(ids, time.time())
            raise
        if ids and self.stop.is_set():
            # Stopped while the claim was on its way: nothing started, all of it goes back.
            await self.index.release(ids, time.time())
            return []
        return ids

    async def _batch(self, ids: list[str], now: float, stats: CycleStats) -> None:
        gate = asyncio.Semaphore(self.config.refresh_concurrency)
        pending: set[str] = set(ids)

        async def one(image_id: str) -> None:
            async with gate:
                outcome = await self._refresh(image_id, now)
            pending.discard(image_id)
            setattr(stats, outcome, getattr(stats, outcome) + 1)

        tasks = [asyncio.ensure_future(one(i)) for i in ids]
        work = asyncio.gather(*tasks)
        # Stopping is an event, not a cancel: a cancel can be swallowed inside redis-py on
        # Python 3.11 (CPython gh-86296), and a second one would cut the drain short.
        stopping = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait((work, stopping), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # a hard stop: the leases hand the ids back later
            work.cancel()
            raise
        finally:
            stopping.cancel()
        if not work.done():
            # Stopping: give claimed work the drain timeout, then hand back the rest.
            _, late = await asyncio.wait(tasks, timeout=self.config.refresh_drain_timeout)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
            # Ids cut off between signing and storing go back too: signed again later, never lost.
            await self.index.release(sorted(pending), time.time())
            with contextlib.suppress(asyncio.CancelledError):
                await work  # settled now; retrieving it keeps asyncio from logging it as lost
            return
        await work

    async def _refresh(self, image_id: str, now: float) -> str:
        try:
            if await self.index.retire_if_idle(image_id, now - self.config.refresh_idle):
                return "retired"
            try:
                key = check_key(await self.resolver.resolve(image_id), self._prefix)
            except NotFound:
                await self.index.purge(image_id)  # the object is gone: nobody should get a URL
                return "retired"
            entry = self.signer.sign(key, time.time())
            if not await self.index.store(image_id, entry, time.time()):
                return "retired"  # purged while we were signing it
            return "refreshed"
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The claim's lease makes the id due again: a failure is retried, never lost.
            log.warning("refresh of %s failed: %s", image_id, type(exc).__name__)
            return "failed"

    async def refresh_now(self, image_id: str) -> bool:
        """Re-sign one id whatever its state and tell every proxy; False if it no longer exists."""
        try:
            key = check_key(await self.resolver.resolve(image_id), self._prefix)
        except NotFound:
            await self.index.purge(image_id)
            return False
        entry = self.signer.sign(key, time.time())
        await self.index.store(image_id, entry, time.time(), force=True)
        await self.index.announce(image_id)
        return True

    def _beat(self) -> None:
        if self._heartbeat is not None:
            try:
                self._heartbeat.touch()
            except OSError as exc:
                log.warning("cannot write heartbeat file: %s", exc.strerror)


def make_app(config: Config) -> Starlette:
    """The refresher process: its ops listener (/metrics, /healthz, /readyz) under uvicorn, with
    the worker loop in the lifespan. uvicorn turns SIGTERM into a lifespan shutdown, where the
    worker stops claiming, drains within `refresh_drain_timeout`, hands back the rest and closes."""
    index = Index(config)
    worker = Refresher(config, index)

    async def readiness() -> tuple[bool, dict[str, Any]]:
        try:
            redis = await index.ping()
        except (RedisError, OSError):
            redis = False
        return redis, {"status": "ready" if redis else "redis down", "cycles": worker.totals.cycles}

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        if isinstance(worker.resolver, Backed):
            await worker.resolver.start()  # a wrong query fails here, not as failed refreshes
        task = asyncio.ensure_future(worker.run())
        log.info("refresher started (refresh %ds before expiry)", config.refresh_before)
        try:
            yield
        finally:
            log.info("stopping: no new claims; draining claimed work")
            worker.stop.set()
            # The worker ends by itself: it stops claiming and drains within the drain timeout.
            # Cancel only one stuck past that (a hanging Redis): the leases hand its ids back.
            done, _ = await asyncio.wait((task,), timeout=config.refresh_drain_timeout + 10)
            if not done:
                log.warning("refresher worker did not stop in time: cancelling it")
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await worker.resolver.aclose()
            await index.aclose()
            log.info("refresher stopped")

    return ops_app(readiness, "", lifespan=lifespan)


def check(config: Config, now: float | None = None) -> bool:
    """For a k8s exec probe: has the worker loop completed a cycle recently?"""
    if not config.refresh_heartbeat_file:
        return False
    try:
        age = (now or time.time()) - Path(config.refresh_heartbeat_file).stat().st_mtime
    except OSError:
        return False
    return age < 3 * config.refresh_interval + 30

"""The proxy's ASGI app. One process serves two listeners:

- the public port: `/images/` goes straight to the raw hot-path handler; everything else
  (lifespan, anything that is not an image) is Starlette's;
- the internal port (`PROXY_INTERNAL_PORT`): the ops app (/metrics, /healthz, /readyz).

Requests are told apart by the port they arrived on, so no public request reaches ops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from . import metrics, sync
from .cache import UrlCache
from .config import Config, ConfigError
from .handler import ImageHandler, Receive, Scope, Send
from .objects import ObjectCache
from .observe import Observer
from .ops import ops_app
from .resolvers import Backed, make_resolver
from .storage import Origin, make_signer
from .store import RedisStore

log = logging.getLogger("proxy_service.app")


class ProxyApp:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = RedisStore(config) if config.redis_url else None
        self.resolver = make_resolver(config)
        self.cache = UrlCache(config, self.resolver, make_signer(config), self.store)
        self.origin = _make_origin(config)
        # Local files are already in the page cache: the small-object cache is for remote origins.
        use_objects = config.object_cache_size and config.storage != "local"
        self.objects = ObjectCache(config) if use_objects else None
        self.handler = ImageHandler(
            config,
            self.cache,
            self.origin,
            can_redirect=config.storage != "local",
            objects=self.objects,
        )
        self.router = Starlette(
            lifespan=self._lifespan,
            exception_handlers={HTTPException: _http_error},
        )
        self.ops = ops_app(
            self.readiness, config.metrics_dir, before_scrape=self.handler.observer.flush
        )
        self._internal_port = config.internal_port
        self._serving = False
        self.config_error: ConfigError | None = None  # found at start-up (e.g. the SQL query)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            server = scope.get("server")
            if server is not None and server[1] == self._internal_port:
                await self.ops(scope, receive, send)
            elif scope["path"].startswith("/images/"):
                await self.handler(scope, receive, send)
            else:
                await self.router(scope, receive, send)
        else:
            await self.router(scope, receive, send)

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready while serving with the upstream client open; Redis or the resolver's database
        down only degrades (cached ids are still served)."""
        redis = "off"
        if self.store is not None:
            redis = "up" if await self.store.ping() else "down"
        extra: dict[str, Any] = {}
        if isinstance(self.resolver, Backed):
            extra["resolver"] = "up" if await self.resolver.ping() else "down"
        down = redis == "down" or extra.get("resolver") == "down"
        status = "degraded" if down else "ready"
        if not self._serving:
            status = "stopping"
        body = {"status": status, "redis": redis, "storage": self.config.storage, **extra}
        return self._serving, body

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        if isinstance(self.resolver, Backed):
            try:
                await self.resolver.start()  # first: a wrong query fails start-up, nothing open
            except ConfigError as exc:
                self.config_error = exc
                raise
        await self.origin.start()
        metrics.REDIS_CONFIGURED.set(1 if self.store is not None else 0)
        tasks = [asyncio.ensure_future(_flush_metrics(self.handler.observer))]
        if self.store is not None:
            if not await self.store.ping():
                log.warning("redis is not reachable at start-up; serving without it until it is")
            tasks += [
                asyncio.ensure_future(sync.flush_access(self.config, self.cache, self.store)),
                asyncio.ensure_future(sync.listen_purges(self.config, self.cache, self.objects)),
            ]
        log.info("proxy ready", extra={"config": self.config.redacted()})
        self._serving = True
        try:
            yield
        finally:
            self._serving = False
            self.handler.observer.flush()
            metrics.mark_dead(self.config.metrics_dir, os.getpid())
            # On Python 3.11 a cancel that lands with a Redis reply can be swallowed inside
            # redis-py (CPython gh-86296): cancel again until the tasks are really gone.
            pending = set(tasks)
            for _ in range(10):
                if not pending:
                    break
                for task in pending:
                    task.cancel()
                _, pending = await asyncio.wait(pending, timeout=0.5)
            await self.origin.aclose()
            await self.resolver.aclose()
            if self.store is not None:
                await self.store.aclose()


async def _flush_metrics(observer: Observer) -> None:
    while True:
        await asyncio.sleep(1.0)
        observer.flush()


async def _http_error(_request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    return PlainTextResponse(
        "not found\n" if status == 404 else "bad request\n",
        status_code=status,
        headers={"cache-control": "no-store"},
    )


def _make_origin(config: Config) -> Origin:
    if config.storage == "local":
        from .storage.local import LocalOrigin

        return LocalOrigin(config)
    from .upstream import HttpOrigin

    return HttpOrigin(config)

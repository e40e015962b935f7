"""The public ASGI app: `/images/` goes straight to the raw hot-path handler; everything else
(lifespan, anything that is not an image) is Starlette's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from . import sync
from .cache import UrlCache
from .config import Config
from .handler import ImageHandler, Receive, Scope, Send
from .resolvers import make_resolver
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
        self.handler = ImageHandler(
            config, self.cache, self.origin, can_redirect=config.storage != "local"
        )
        self.router = Starlette(
            lifespan=self._lifespan,
            exception_handlers={HTTPException: _http_error},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/images/"):
            await self.handler(scope, receive, send)
        else:
            await self.router(scope, receive, send)

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        await self.origin.start()
        tasks: list[asyncio.Task[None]] = []
        if self.store is not None:
            if not await self.store.ping():
                log.warning("redis is not reachable at start-up; serving without it until it is")
            tasks = [
                asyncio.ensure_future(sync.flush_access(self.config, self.cache, self.store)),
                asyncio.ensure_future(sync.listen_purges(self.config, self.cache)),
            ]
        log.info("proxy ready", extra={"config": self.config.redacted()})
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.origin.aclose()
            await self.resolver.aclose()
            if self.store is not None:
                await self.store.aclose()


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

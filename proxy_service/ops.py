"""The internal listener: /metrics, /healthz (liveness), /readyz (readiness).

Served only on `PROXY_INTERNAL_PORT`, never on the public port, and never access-logged.
Readiness means "send me traffic": config loaded and the upstream client open. A Redis outage
makes the pod *degraded*, still ready, so it cannot take every pod out of the Service at once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from . import metrics

Readiness = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]
Lifespan = Callable[[Starlette], AbstractAsyncContextManager[None]]


def ops_app(
    readiness: Readiness,
    multiprocess_dir: str,
    lifespan: Lifespan | None = None,
    before_scrape: Callable[[], None] | None = None,
) -> Starlette:
    async def scrape(_request: Request) -> Response:
        if before_scrape is not None:
            before_scrape()
        body, content_type = metrics.scrape(multiprocess_dir)
        return Response(body, headers={"content-type": content_type, "cache-control": "no-store"})

    async def healthz(_request: Request) -> Response:
        return PlainTextResponse("ok\n", headers={"cache-control": "no-store"})

    async def readyz(_request: Request) -> Response:
        ready, detail = await readiness()
        return JSONResponse(
            detail, status_code=200 if ready else 503, headers={"cache-control": "no-store"}
        )

    return Starlette(
        lifespan=lifespan,
        routes=[
            Route("/metrics", scrape, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET", "HEAD"]),
            Route("/readyz", readyz, methods=["GET", "HEAD"]),
        ],
    )

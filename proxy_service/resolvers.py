"""Resolvers: image id -> object key.

A resolver is any object with `async def resolve(image_id) -> str` that raises `NotFound` for an
id it does not know. The `template` resolver derives the key; the `sql` resolver (`sql.py`) looks
it up in the application's database. Whatever a resolver returns is checked to stay under the
configured prefix.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .config import Config
from .errors import BadId


class Resolver(Protocol):
    async def resolve(self, image_id: str) -> str: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class Backed(Protocol):
    """A resolver with a backend of its own: connected (and checked) at start-up, probed by
    readiness. `start` raises `ConfigError` for wrong settings; an unreachable backend only
    degrades, and `resolve` raises `ResolverUnavailable` until it is back."""

    async def start(self) -> None: ...

    async def ping(self) -> bool: ...


class TemplateResolver:
    def __init__(self, template: str) -> None:
        self.prefix, self.suffix = template.split("{id}", 1)

    async def resolve(self, image_id: str) -> str:
        return self.prefix + image_id + self.suffix

    async def aclose(self) -> None:
        return None


def check_key(key: str, prefix: str) -> str:
    """Refuse any key outside the prefix or with a traversal segment, whatever produced it."""
    if not key.startswith(prefix) or any(
        part in ("", ".", "..") for part in key[len(prefix) :].split("/")
    ):
        raise BadId("resolver produced a key outside the configured prefix")
    return key


def make_resolver(config: Config) -> Resolver:
    if config.resolver == "sql":
        from .sql import SqlResolver  # the only import of asyncpg: an optional dependency

        return SqlResolver(config)
    return TemplateResolver(config.key_template)

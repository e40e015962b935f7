"""Resolvers: image id -> object key.

A resolver is any object with `async def resolve(image_id) -> str` that raises `NotFound` for an
id it does not know. The `template` resolver derives the key; a database-backed resolver plugs in
behind the same seam. Whatever a resolver returns is checked to stay under the configured prefix.
"""

from __future__ import annotations

from typing import Protocol

from .config import Config
from .errors import BadId


class Resolver(Protocol):
    async def resolve(self, image_id: str) -> str: ...

    async def aclose(self) -> None: ...


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
    return TemplateResolver(config.key_template)

"""The seams between the hot path and storage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..headers import Headers


@dataclass(frozen=True, slots=True)
class Entry:
    """What the URL cache holds for one id: the object key and its presigned URLs.

    The HTTP method is part of a COS signature, so HEAD has its own URL; it is signed only when a
    HEAD asks for it (`head_url` empty until then; see `Signer.head_url`).
    """

    key: str
    url: str
    head_url: str
    expires_at: float
    signed_at: float

    def url_for(self, method: str) -> str:
        return self.head_url if method == "HEAD" else self.url


class Signer(Protocol):
    """Turns an object key into an `Entry`. Local computation only: no network I/O."""

    def sign(self, key: str, now: float) -> Entry: ...

    def head_url(self, entry: Entry, now: float) -> str:
        """A URL signed for HEAD, valid as long as `entry`."""
        ...


class OriginResponse(Protocol):
    """A relayable origin response: status 200, 206, 304 or 416 (errors are raised instead)."""

    status: int
    headers: Headers  # already filtered to `headers.RELAY_RESPONSE`

    async def read(self) -> bytes:
        """The next chunk of body, b"" at the end; raises `StreamAborted` on failure."""
        ...

    def at_eof(self) -> bool: ...

    def close(self) -> None:
        """Release at once: unread bodies drop their connection instead of draining it."""
        ...


class Origin(Protocol):
    async def start(self) -> None: ...

    async def open(self, entry: Entry, method: str, headers: dict[str, str]) -> OriginResponse:
        """Raise `UpstreamNotFound`, `UpstreamForbidden`, `UpstreamError` or `UpstreamTimeout`."""
        ...

    async def aclose(self) -> None: ...

    @property
    def in_flight(self) -> int:
        """Responses opened and not yet closed."""
        ...

"""What a request may ask for beyond its id: the response mode, and (with signing keys set) a
signature and an expiry that no cache may outlive.

Without signing keys the query is ignored unless mode overrides are allowed; with them only
`s`, `exp` and `mode` count, and `mode` is part of what is signed.
"""

from __future__ import annotations

import re

from . import signing
from .config import Config
from .errors import BadRequest, BadSignature, ExpiredSignature, ModeUnavailable

_MAX_AGE = re.compile(rb"\b(max-age|s-maxage)=(\d+)")


class Params:
    def __init__(self, config: Config, *, can_redirect: bool) -> None:
        self._keys = signing.parse_keys(config.signing_keys)
        self._redirect_default = config.mode == "redirect"
        self._override = config.allow_mode_override
        self._can_redirect = can_redirect
        self.success_cc = (b"cache-control", config.cache_control.encode())

    def read(self, image_id: str, query: bytes, now: float) -> tuple[bool, float | None]:
        """Whether to redirect, and the signed URL's expiry (None: unsigned or no expiry)."""
        if self._keys:
            return self._check_signature(image_id, query, now)
        return self._wants_redirect(query), None

    def cache_control(self, until: float | None, now: float) -> tuple[bytes, bytes]:
        """The success Cache-Control, every max-age cut to what a signed URL has left."""
        if until is None:
            return self.success_cc
        left = max(0, int(until - now))
        value, count = _MAX_AGE.subn(
            lambda m: b"%s=%d" % (m[1], min(int(m[2]), left)), self.success_cc[1]
        )
        if not count:
            value = value + b", max-age=%d" % left if value.strip() else b"max-age=%d" % left
        return (b"cache-control", value)

    def _check_signature(
        self, image_id: str, query: bytes, now: float
    ) -> tuple[bool, float | None]:
        try:
            params = signing.parse_query(query.decode("latin-1"))
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        result = signing.verify(image_id, params, self._keys, now)
        if result == signing.EXPIRED:
            raise ExpiredSignature()
        if result != signing.OK:
            raise BadSignature()
        exp = params.get("exp")
        mode = params.get("mode") if self._override else None
        redirect = self._pick_mode(b"" if mode is None else mode.encode("latin-1"))
        return redirect, float(exp) if exp else None

    def _wants_redirect(self, query: bytes) -> bool:
        if not (self._override and query):
            return self._redirect_default
        mode = b""
        for pair in query.split(b"&"):
            if pair.startswith(b"mode="):
                mode = pair[5:]
        return self._pick_mode(mode)

    def _pick_mode(self, mode: bytes) -> bool:
        if mode == b"redirect":
            if not self._can_redirect:
                raise ModeUnavailable()
            return True
        if mode == b"stream":
            return False
        if mode:
            raise BadRequest("unknown mode")
        return self._redirect_default

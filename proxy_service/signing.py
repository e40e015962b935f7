"""Signed stable URLs for the image proxy: sign them in an application, verify them in the proxy.

Standard library only, and nothing imported from the rest of `proxy_service`: copy this file into
any Python application that needs to hand out image URLs (or `pip install` the proxy and import it).

URL shape (parameters in this order, nothing percent-encoded)::

    /images/<id>?[mode=<mode>&][exp=<unix seconds>&]s=<signature>

Algorithm, for implementations in other languages::

    canonical = "v1\\n" + id + "\\n" + mode + "\\n" + exp     (mode, exp: "" when absent;
                                                             exp exactly as written in the URL)
    signature = base64url(HMAC-SHA256(key, UTF-8(canonical))), without "=" padding (43 chars)

`key` is the UTF-8 bytes of one entry of `PROXY_SIGNING_KEYS`, as written (not base64-decoded).
The first key signs; every key verifies, so keys rotate without downtime. A URL with `exp` is
valid while `now < exp`. `s` is compared in its encoded form, in constant time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Mapping, Sequence

__all__ = [
    "BAD",
    "EXPIRED",
    "OK",
    "PARAMS",
    "canonical",
    "parse_keys",
    "parse_query",
    "sign_path",
    "signature",
    "verify",
    "verify_path",
]

OK = "ok"
BAD = "bad_signature"
EXPIRED = "expired_signature"

PREFIX = "/images/"
# The query parameters the proxy reads; any other parameter is ignored.
PARAMS = frozenset(("mode", "exp", "s"))

# The proxy's id syntax (see ids.py), repeated here so this module stays standalone.
_SEGMENT = r"[A-Za-z0-9_~-][A-Za-z0-9._~-]*"
_ID = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})*")
_MODE = re.compile(r"[A-Za-z0-9_-]{1,32}")
_EXP = re.compile(r"[0-9]{1,12}")

KeyLike = str | bytes


def parse_keys(raw: str) -> list[bytes]:
    """`PROXY_SIGNING_KEYS` ("new,old,...") as key bytes, first (signing) key first."""
    return [k.strip().encode() for k in raw.split(",") if k.strip()]


def canonical(image_id: str, *, mode: str = "", expires: str = "") -> bytes:
    """The bytes that are signed. `expires` is the decimal string exactly as it is in the URL."""
    return f"v1\n{image_id}\n{mode}\n{expires}".encode()


def _mac(key: KeyLike, message: bytes) -> bytes:
    raw = key.encode() if isinstance(key, str) else key
    digest = hmac.new(raw, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=")


def signature(
    image_id: str, key: KeyLike, *, expires: int | None = None, mode: str | None = None
) -> str:
    """The `s` parameter for an id (and optional mode and absolute expiry, in Unix seconds)."""
    if not _ID.fullmatch(image_id):
        raise ValueError("not a valid image id")
    if mode is not None and not _MODE.fullmatch(mode):
        raise ValueError("mode must be 1-32 characters of [A-Za-z0-9_-]")
    exp = ""
    if expires is not None:
        if isinstance(expires, bool) or not isinstance(expires, int) or expires < 0:
            raise ValueError("expires must be a non-negative int (Unix seconds)")
        exp = str(expires)
        if not _EXP.fullmatch(exp):
            raise ValueError("expires is too far in the future")
    if not key:
        raise ValueError("empty signing key")
    return _mac(key, canonical(image_id, mode=mode or "", expires=exp)).decode()


def sign_path(
    image_id: str, key: KeyLike, *, expires: int | None = None, mode: str | None = None
) -> str:
    """`/images/<id>?...&s=<signature>`: prepend the proxy's (or CDN's) origin to get the URL."""
    sig = signature(image_id, key, expires=expires, mode=mode)
    query = []
    if mode is not None:
        query.append(f"mode={mode}")
    if expires is not None:
        query.append(f"exp={expires}")
    query.append(f"s={sig}")
    return f"{PREFIX}{image_id}?{'&'.join(query)}"


def parse_query(query: str) -> dict[str, str]:
    """The recognised parameters of a raw query string, exactly as sent (no %-decoding).

    Other parameters are ignored. Raises ValueError for a recognised parameter given twice
    (two readers could disagree on which one counts) or an `exp` that is not 1-12 digits.
    """
    out: dict[str, str] = {}
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        if name not in PARAMS:
            continue
        if name in out:
            raise ValueError(f"{name} given twice")
        out[name] = value
    if "exp" in out and not _EXP.fullmatch(out["exp"]):
        raise ValueError("exp must be 1-12 digits")
    return out


def verify(
    image_id: str,
    params: Mapping[str, str],
    keys: Sequence[KeyLike],
    now: float | None = None,
) -> str:
    """OK, BAD (missing or wrong signature, malformed `exp`) or EXPIRED (a good signature whose
    `exp` has passed). `params` as returned by `parse_query`."""
    given = params.get("s")
    exp = params.get("exp", "")
    if not given or not keys or (exp and not _EXP.fullmatch(exp)):
        return BAD
    message = canonical(image_id, mode=params.get("mode", ""), expires=exp)
    expected = given.encode("utf-8", "replace")
    good = False
    for key in keys:  # no early exit: the time taken does not depend on which key matched
        good |= hmac.compare_digest(_mac(key, message), expected)
    if not good:
        return BAD
    if exp and int(exp) <= (time.time() if now is None else now):
        return EXPIRED
    return OK


def verify_path(path: str, keys: Sequence[KeyLike], now: float | None = None) -> str:
    """`verify` for a whole `/images/<id>?query` (as `sign_path` returns it)."""
    target, _, query = path.partition("?")
    image_id = target.removeprefix(PREFIX)
    if not target.startswith(PREFIX) or not _ID.fullmatch(image_id):
        return BAD
    try:
        params = parse_query(query)
    except ValueError:
        return BAD
    return verify(image_id, params, keys, now)

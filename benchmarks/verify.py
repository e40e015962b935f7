"""One checked request per contender and scenario before measuring: a fast wrong answer is no
result. Raises `VerificationError` on a wrong status, length, body or Location."""

from __future__ import annotations

import hashlib
import http.client
from dataclasses import dataclass
from urllib.parse import urlsplit

from .objects import Obj


class VerificationError(AssertionError):
    pass


@dataclass
class Fetched:
    status: int
    headers: dict[str, str]  # lower-case names
    length: int
    sha256: str


def fetch(url: str, timeout: float = 30.0) -> Fetched:
    """GET without following redirects; the body is hashed as it streams (1 GiB objects)."""
    parts = urlsplit(url)
    if parts.hostname != "127.0.0.1":
        raise VerificationError(f"refusing to fetch a non-loopback URL: {url}")
    conn = http.client.HTTPConnection("127.0.0.1", parts.port, timeout=timeout)
    try:
        conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""))
        resp = conn.getresponse()
        digest = hashlib.sha256()
        length = 0
        while chunk := resp.read(1024 * 1024):
            digest.update(chunk)
            length += len(chunk)
        headers = {k.lower(): v for k, v in resp.getheaders()}
        return Fetched(resp.status, headers, length, digest.hexdigest())
    except (OSError, http.client.HTTPException) as exc:
        raise VerificationError(f"GET {url} failed: {type(exc).__name__}: {exc}") from None
    finally:
        conn.close()


def check_object(url: str, obj: Obj) -> str:
    got = fetch(url)
    if got.status != 200:
        raise VerificationError(f"GET {url}: status {got.status}, expected 200")
    if got.length != obj.size or got.sha256 != obj.sha256:
        raise VerificationError(
            f"GET {url}: wrong body ({got.length} bytes, sha256 {got.sha256[:16]}...), "
            f"expected {obj.name} ({obj.size} bytes, sha256 {obj.sha256[:16]}...)"
        )
    return f"200, {got.length} bytes, sha256 ok"


def check_redirect(url: str, origin_base: str, obj: Obj, signed: bool) -> str:
    """A 302 to the object on the origin; the proxy's must be a presigned COS URL that works."""
    got = fetch(url)
    location = got.headers.get("location", "")
    if got.status != 302:
        raise VerificationError(f"GET {url}: status {got.status}, expected 302")
    if not location.startswith(f"{origin_base}/{obj.name}?"):
        raise VerificationError(f"GET {url}: Location {location[:80]!r} is not {obj.name}")
    if signed and not ("q-sign-algorithm=sha1" in location and "q-signature=" in location):
        raise VerificationError(f"GET {url}: Location is not a presigned COS URL")
    check_object(location, obj)
    return "302, Location serves the object"

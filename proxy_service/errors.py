"""Typed errors: each carries its HTTP status, a short public message and a metrics label.

Messages are fixed strings, never built from request data, upstream URLs or exception text,
so nothing secret can reach a response body through them.
"""

from __future__ import annotations


class ProxyError(Exception):
    status = 500
    message = "internal error"
    label = "internal"
    # Errors must not be cached unless a subclass says otherwise (imgproxy #1677: a cached 504).
    cache_control = "no-store"
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def __init__(self, detail: str = "") -> None:
        # `detail` is for logs only (never a URL or secret); the body is always `message`.
        super().__init__(detail or self.message)
        self.detail = detail


class BadId(ProxyError):
    status = 400
    message = "invalid image id"
    label = "bad_id"


class BadRequest(ProxyError):
    status = 400
    message = "bad request"
    label = "bad_request"


class HeadersTooLarge(ProxyError):
    status = 431
    message = "request headers too large"
    label = "headers_too_large"


class ModeUnavailable(ProxyError):
    status = 400
    message = "redirect mode is not available for this storage"
    label = "mode_unavailable"


class BadSignature(ProxyError):
    """Signing is on and the signature is missing or does not match (any key)."""

    status = 403
    message = "forbidden"
    label = "bad_signature"


class ExpiredSignature(ProxyError):
    """A correctly signed URL whose `exp` has passed: its own status and label, so metrics and
    clients can tell an expired link from a forged one."""

    status = 410
    message = "link expired"
    label = "expired_signature"


class NotFound(ProxyError):
    status = 404
    message = "not found"
    label = "not_found"
    cache_control = ""  # set from config: a short public max-age so CDNs negative-cache


class MethodNotAllowed(ProxyError):
    status = 405
    message = "method not allowed"
    label = "method_not_allowed"
    headers = ((b"allow", b"GET, HEAD"),)


class Overloaded(ProxyError):
    """Too many requests in flight to the origin: refuse at once rather than queue without end."""

    status = 503
    message = "overloaded"
    label = "overloaded"
    headers = ((b"retry-after", b"1"),)


class ResolverUnavailable(ProxyError):
    """The resolver's database is down, slow or out of connections. A 503, never a 404 that a
    CDN would keep: the id may well exist."""

    status = 503
    message = "temporarily unavailable"
    label = "resolver_unavailable"
    headers = ((b"retry-after", b"5"),)


class ObjectTooLarge(ProxyError):
    """The object is larger than PROXY_MAX_OBJECT_SIZE: a 502, the origin holds something this
    proxy is configured not to serve (413 is about request bodies)."""

    status = 502
    message = "object too large"
    label = "too_large"


class UpstreamError(ProxyError):
    status = 502
    message = "upstream error"
    label = "upstream_error"


class UpstreamTimeout(ProxyError):
    status = 504
    message = "upstream timeout"
    label = "upstream_timeout"


class UpstreamForbidden(UpstreamError):
    """COS refused the signature (expired, skewed, wrong key): worth one re-sign and retry."""

    label = "upstream_forbidden"


class UpstreamNotFound(NotFound):
    label = "not_found"


class StreamAborted(Exception):
    """The upstream failed after the response started: the client connection must be dropped,
    never completed, so a truncated body is not taken as whole."""

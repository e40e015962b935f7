"""Image id validation.

Ids are checked on the *raw* request path, before any percent-decoding, so an encoded separator
(`%2F`), an encoded dot or any other escape can never become part of a key: `%` is simply not
in the alphabet. Ids may have `/`-separated segments; no segment may be empty or start with a dot,
which rules out `.`, `..` and hidden files. `@` is allowed inside a segment for the common
`logo@2x.png` naming of srcset images; it is only ever part of the object key's path.
"""

from __future__ import annotations

import re

from .errors import BadId

_SEGMENT = rb"[A-Za-z0-9_~-][A-Za-z0-9._~@-]*"
_ID = re.compile(rb"%s(?:/%s)*" % (_SEGMENT, _SEGMENT))


def parse_id(raw: bytes, max_length: int) -> str:
    """Return the id as text, or raise `BadId`."""
    if not raw or len(raw) > max_length or _ID.fullmatch(raw) is None:
        raise BadId()
    return raw.decode("ascii")

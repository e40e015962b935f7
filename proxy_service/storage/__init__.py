"""Storage backends: a `Signer` makes URLs for a key; an `Origin` produces an entry's bytes."""

from __future__ import annotations

from ..config import Config
from .base import Entry, Origin, OriginResponse, Signer

__all__ = ["Entry", "Origin", "OriginResponse", "Signer", "make_signer"]


def make_signer(config: Config) -> Signer:
    if config.storage == "cos":
        from .cos import CosSigner  # the only import of the COS SDK (~150 ms): only when used

        return CosSigner(config)
    from .local import LocalSigner

    return LocalSigner(config)

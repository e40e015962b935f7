"""COS presigning with cos-python-sdk-v5: the only module that imports the SDK."""

from __future__ import annotations

import logging

from qcloud_cos import CosConfig, CosS3Client

from ..config import Config
from .base import Entry

# The SDK logs at INFO on every client construction; keep it quiet (and free of settings).
logging.getLogger("qcloud_cos").setLevel(logging.WARNING)


class CosSigner:
    def __init__(self, config: Config) -> None:
        options: dict[str, object] = {
            "SecretId": config.cos_secret_id,
            "SecretKey": config.cos_secret_key,
            "Scheme": config.cos_scheme,
        }
        if config.cos_domain:
            # A custom domain wins over region/endpoint: private endpoints, CDNs, test origins.
            options["Domain"] = config.cos_domain
        if config.cos_region:
            options["Region"] = config.cos_region
        self._client = CosS3Client(CosConfig(**options))
        self._bucket = config.cos_bucket
        self._expires = config.sign_expires
        # The SDK never puts an STS token into a presigned URL by itself.
        self._params = {"x-cos-security-token": config.cos_token} if config.cos_token else {}
        # A URL signed with temporary credentials dies with them.
        self._credential_expires_at = config.cos_credential_expires_at or float("inf")

    def sign(self, key: str, now: float) -> Entry:
        # Only GET is signed up front: HEADs are rare (CDNs turn them into GETs), and each
        # presign costs ~80 µs of a miss. `head_url` signs one when a HEAD comes.
        return Entry(
            key=key,
            url=self._presign(key, "GET", self._expires),
            head_url="",
            expires_at=min(now + self._expires, self._credential_expires_at),
            signed_at=now,
        )

    def head_url(self, entry: Entry, now: float) -> str:
        """A HEAD-signed URL for the entry's key, valid as long as the entry."""
        return self._presign(entry.key, "HEAD", max(1, int(entry.expires_at - now)))

    def _presign(self, key: str, method: str, expires: int) -> str:
        url: str = self._client.get_presigned_url(
            Bucket=self._bucket,
            Key=key,
            Method=method,
            Expired=expires,
            Params=dict(self._params),
        )
        return url

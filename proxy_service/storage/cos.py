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
        def presign(method: str) -> str:
            url: str = self._client.get_presigned_url(
                Bucket=self._bucket,
                Key=key,
                Method=method,
                Expired=self._expires,
                Params=dict(self._params),
            )
            return url

        return Entry(
            key=key,
            url=presign("GET"),
            head_url=presign("HEAD"),
            expires_at=min(now + self._expires, self._credential_expires_at),
            signed_at=now,
        )

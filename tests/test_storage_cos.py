"""COS presigning with the real SDK, verified by the COS-compatible test origin."""

from __future__ import annotations

import time

from proxy_service.storage.cos import CosSigner
from tests.conftest import ConfigFactory
from tests.support.cos_server import CosTestServer
from tests.support.http import request


def test_get_and_head_urls_are_signed_for_their_method(
    cos: CosTestServer, cos_config: ConfigFactory
) -> None:
    cos.put("images/2024/05/a-b_c~d.png", b"data")
    now = time.time()
    signer = CosSigner(cos_config())
    entry = signer.sign("images/2024/05/a-b_c~d.png", now)
    assert entry.key == "images/2024/05/a-b_c~d.png"
    assert entry.signed_at == now
    assert entry.expires_at == now + 3600
    assert entry.head_url == ""  # signed only when a HEAD asks (a miss pays for one presign)
    assert request(entry.url).body == b"data"
    head_url = signer.head_url(entry, now)
    assert request(head_url, method="HEAD").status == 200
    # The method is part of the signature: crossing them is refused.
    assert request(entry.url, method="HEAD").status == 403
    refused = request(head_url)
    assert refused.status == 403
    assert b"SignatureDoesNotMatch" in refused.body


def test_urls_expire_after_sign_expires(cos: CosTestServer, cos_config: ConfigFactory) -> None:
    cos.put("images/a.png", b"data")
    entry = CosSigner(cos_config(sign_expires=120, expiry_margin=30)).sign(
        "images/a.png", time.time()
    )
    assert request(entry.url).status == 200
    cos.clock = lambda: time.time() + 121
    expired = request(entry.url)
    assert expired.status == 403
    assert b"Request has expired" in expired.body


def test_sts_token_rides_in_the_signed_url(cos: CosTestServer, cos_config: ConfigFactory) -> None:
    cos.put("images/a.png", b"data")
    cos.require_token = "session-token-123"
    with_token = CosSigner(cos_config(cos_token="session-token-123")).sign("images/a.png", 0)
    assert request(with_token.url).status == 200
    assert request(CosSigner(cos_config()).sign("images/a.png", 0).url).status == 403


def test_temporary_credentials_cap_the_expiry(cos_config: ConfigFactory) -> None:
    now = time.time()
    config = cos_config(cos_token="t", cos_credential_expires_at=now + 600)
    assert CosSigner(config).sign("images/a.png", now).expires_at == now + 600


def test_wrong_secret_is_refused(cos: CosTestServer, cos_config: ConfigFactory) -> None:
    cos.put("images/a.png", b"data")
    entry = CosSigner(cos_config(cos_secret_key="not-the-key")).sign("images/a.png", time.time())
    reply = request(entry.url)
    assert reply.status == 403
    assert b"SignatureDoesNotMatch" in reply.body


def test_head_url_lives_as_long_as_the_entry(cos: CosTestServer, cos_config: ConfigFactory) -> None:
    cos.put("images/a.png", b"data")
    signer = CosSigner(cos_config(sign_expires=600, expiry_margin=60))
    now = time.time()
    entry = signer.sign("images/a.png", now)
    head_url = signer.head_url(entry, time.time())
    assert request(head_url, method="HEAD").status == 200
    cos.clock = lambda: now + 590
    assert request(head_url, method="HEAD").status == 200
    cos.clock = lambda: now + 620
    assert request(head_url, method="HEAD").status == 403

"""Structured logs: one JSON line a request, no secrets, no health-check noise."""

from __future__ import annotations

import json
import logging
import sys

from proxy_service.logs import JsonFormatter
from tests.conftest import cos_env
from tests.support.cos_server import CosTestServer
from tests.support.http import request
from tests.support.proxy import ProxyProcess


def test_formatter_writes_extras_and_no_traceback_text() -> None:
    try:
        raise ValueError("http://cos/secret?q-signature=abc")
    except ValueError:
        info = sys.exc_info()
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "boom %s", ("!",), info)
    record.image_id = "cat.png"
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "boom !"
    assert line["level"] == "error"
    assert line["image_id"] == "cat.png"
    assert line["error"] == "ValueError"
    assert "q-signature" not in json.dumps(line)


def test_access_lines_are_json_and_clean(cos: CosTestServer) -> None:
    cos.put("images/cat.png", b"cat")
    env = cos_env(cos, PROXY_ALLOW_MODE_OVERRIDE="true")
    with ProxyProcess(env, access_log=True) as proxy:
        assert request(proxy.base_url + "/images/cat.png").status == 200
        assert request(proxy.base_url + "/images/cat.png?mode=redirect").status == 302
        assert request(proxy.base_url + "/images/nope.png").status == 404
        for _ in range(3):
            assert request(proxy.internal_url + "/healthz").status == 200
            assert request(proxy.internal_url + "/readyz").status == 200
        output = proxy.output()
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert lines, output
    assert len(lines) == len(output.strip().splitlines()), "every log line is JSON"
    access = [line for line in lines if line["logger"] == "proxy_service.access"]
    assert [(a["image_id"], a["status"], a["mode"], a["tier"]) for a in access] == [
        ("cat.png", 200, "stream", "miss"),
        ("cat.png", 302, "redirect", "local"),
        ("nope.png", 404, "stream", "miss"),
    ]
    assert access[0]["bytes"] == 3
    assert access[0]["duration_ms"] >= access[0]["ttfb_ms"] > 0
    assert "healthz" not in output
    assert "readyz" not in output
    for secret in (cos.secret_key, "q-signature", "q-ak="):
        assert secret not in output

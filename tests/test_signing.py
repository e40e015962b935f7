"""Signed stable URLs: the standalone signer/verifier, its properties, the `sign` command, and the
proxy enforcing signatures end to end (real uvicorn, the COS test origin behind it)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy_service import signing
from proxy_service.config import Config, ConfigError
from tests.conftest import ConfigFactory
from tests.support.cos_server import CosTestServer
from tests.support.http import Reply, request
from tests.support.proxy import ThreadedProxy, running

KEY = "k-0123456789abcdef"
OLD = "old-key-0123456789"
NEW = "new-key-0123456789"
NOW = 1_700_000_000.0
PROPS = settings(max_examples=300, derandomize=True, database=None, deadline=None)

# Known answers, also checkable with openssl (README, Security).
VECTORS = [
    (
        ("2024/05/cat.png", 1700000000, "redirect"),
        "/images/2024/05/cat.png?mode=redirect&exp=1700000000"
        "&s=yzrw42NuFEjhS2y5NSmbVYwVrV_oTL8mof1csm3GxGo",
    ),
    (("cat.png", None, None), "/images/cat.png?s=U5U5wkIsSZtDw3cJmCrpZS_TwGyHuJukFZFqsJ6RE9U"),
]


# --- the module -------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "path"), VECTORS)
def test_known_answers(args: tuple[str, int | None, str | None], path: str) -> None:
    image_id, expires, mode = args
    assert signing.sign_path(image_id, KEY, expires=expires, mode=mode) == path
    assert signing.verify_path(path, [KEY], now=NOW - 1) == signing.OK


def test_signature_shape() -> None:
    sig = signing.signature("a.png", KEY)
    assert len(sig) == 43
    assert set(sig) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert signing.signature("a.png", KEY.encode()) == sig


def test_canonical_string_covers_every_parameter() -> None:
    assert (
        signing.canonical("a/b.png", mode="redirect", expires="12") == b"v1\na/b.png\nredirect\n12"
    )
    assert signing.canonical("a/b.png") == b"v1\na/b.png\n\n"
    base = signing.signature("a.png", KEY)
    assert signing.signature("a.png", KEY, mode="stream") != base
    assert signing.signature("a.png", KEY, expires=1) != base
    assert signing.signature("b.png", KEY) != base
    assert signing.signature("a.png", KEY + "x") != base


def test_expiry_is_exclusive_and_checked_after_the_signature() -> None:
    path = signing.sign_path("a.png", KEY, expires=int(NOW))
    assert signing.verify_path(path, [KEY], now=NOW - 0.5) == signing.OK
    assert signing.verify_path(path, [KEY], now=NOW) == signing.EXPIRED
    assert signing.verify_path(path, [KEY], now=NOW + 10**6) == signing.EXPIRED
    # Expired *and* forged is forged: "expired" is only ever said of a genuine link.
    assert signing.verify_path(path, ["another-key-0123456"], now=NOW + 1) == signing.BAD


def test_missing_or_malformed_parts_are_bad() -> None:
    good = signing.sign_path("a.png", KEY, expires=int(NOW) + 60)
    for path in (
        "/images/a.png",
        "/images/a.png?s=",
        "/images/a.png?s",
        good.replace("exp=", "exp=+"),
        good + "&s=again",
        good.replace("/images/", "/img/"),
        good.replace("a.png", "../a.png"),
    ):
        assert signing.verify_path(path, [KEY], now=NOW) == signing.BAD, path
    assert signing.verify_path(good, [], now=NOW) == signing.BAD  # no keys: fail closed


def test_parse_query() -> None:
    assert signing.parse_query("") == {}
    assert signing.parse_query("x=1&s=abc&&utm=2&mode=redirect&exp=5") == {
        "s": "abc",
        "mode": "redirect",
        "exp": "5",
    }
    assert signing.parse_query("S=1&%73=2&s%3D=3") == {}  # exact names only, no decoding
    for bad in ("s=a&s=b", "mode=a&mode=", "exp=1&exp=1"):
        with pytest.raises(ValueError, match="given twice"):
            signing.parse_query(bad)
    for bad in ("exp=", "exp=-1", "exp=1e3", "exp=٣", "exp=" + "9" * 13):
        with pytest.raises(ValueError, match="1-12 digits"):
            signing.parse_query(bad)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"image_id": "../a"},
        {"image_id": "a//b"},
        {"image_id": "a b"},
        {"image_id": ""},
        {"mode": "re direct"},
        {"mode": "x" * 33},
        {"expires": -1},
        {"expires": 10**12},
        {"expires": True},
        {"key": ""},
    ],
)
def test_sign_refuses_what_the_proxy_would_refuse(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"image_id": "a.png", "key": KEY, **kwargs}
    with pytest.raises(ValueError, match=r"id|mode|expires|key"):
        signing.sign_path(**args)  # type: ignore[arg-type]


def test_parse_keys() -> None:
    assert signing.parse_keys("") == []
    assert signing.parse_keys(" a , b,,") == [b"a", b"b"]


def test_module_is_standalone(tmp_path: Path) -> None:
    """Stdlib imports only, and it works copied out of the package."""
    source = Path(signing.__file__).read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0
            assert node.module is not None
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            assert top == "__future__" or top in sys.stdlib_module_names, name
    shutil.copy(signing.__file__, tmp_path / "image_urls.py")
    out = subprocess.run(
        [sys.executable, "-c", "import image_urls as u; print(u.sign_path('cat.png', 'k'))"],
        cwd=tmp_path,
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == signing.sign_path("cat.png", "k")


# --- properties -------------------------------------------------------------------------------

_SEGMENT = st.builds(
    str.__add__,
    st.sampled_from("abcXYZ019_~-"),
    st.text(alphabet="abcXYZ019._~-", max_size=10),
)
ids = st.lists(_SEGMENT, min_size=1, max_size=4).map("/".join)
keys = st.text(alphabet=st.characters(codec="utf-8", exclude_characters=","), min_size=1).filter(
    lambda k: k.strip() == k and k != ""
)
modes = st.one_of(st.none(), st.sampled_from(["redirect", "stream", "x"]))
expiries = st.one_of(st.none(), st.integers(int(NOW) + 1, 10**12 - 1))
# Anything a URL could be changed to, including what a parser might treat specially.
chars = st.one_of(
    st.sampled_from(list("?&=/.%+-_~ #;aAzZ09sS\x00")),
    st.characters(codec="utf-8"),
)


@PROPS
@given(ids, keys, modes, expiries)
def test_signed_paths_verify(image_id: str, key: str, mode: str | None, exp: int | None) -> None:
    path = signing.sign_path(image_id, key, expires=exp, mode=mode)
    assert signing.verify_path(path, [key], now=NOW) == signing.OK
    # The proxy's own parsing gives the same answer.
    target, _, query = path.partition("?")
    params = signing.parse_query(query)
    assert params.get("mode") == mode
    assert signing.verify(target.removeprefix("/images/"), params, [key], NOW) == signing.OK


@PROPS
@given(ids, keys, modes, expiries, st.data())
def test_any_single_character_change_is_rejected(
    image_id: str, key: str, mode: str | None, exp: int | None, data: st.DataObject
) -> None:
    path = signing.sign_path(image_id, key, expires=exp, mode=mode)
    # Anywhere after "/images/": in the id, a parameter name or value, a separator, the signature.
    at = data.draw(st.integers(len("/images/"), len(path) - 1), label="position")
    edit = data.draw(st.sampled_from(["replace", "delete"]), label="edit")
    if edit == "replace":
        char = data.draw(chars.filter(lambda c: c != path[at]), label="char")
        changed = path[:at] + char + path[at + 1 :]
    else:
        changed = path[:at] + path[at + 1 :]
    assert signing.verify_path(changed, [key], now=NOW) != signing.OK, changed


@PROPS
@given(
    ids,
    st.lists(keys, min_size=1, max_size=4, unique=True),
    st.data(),
)
def test_rotation_accepts_every_listed_key_and_no_other(
    image_id: str, key_list: list[str], data: st.DataObject
) -> None:
    signer = data.draw(st.sampled_from(key_list), label="signer")
    path = signing.sign_path(image_id, signer)
    assert signing.verify_path(path, key_list, now=NOW) == signing.OK
    removed = [k for k in key_list if k != signer]
    assert signing.verify_path(path, removed, now=NOW) == signing.BAD


# --- configuration and the `sign` command -----------------------------------------------------


def test_signing_keys_are_a_validated_secret() -> None:
    config = Config.load({"PROXY_SIGNING_KEYS": f"{NEW}, {OLD}"})
    assert signing.parse_keys(config.signing_keys) == [NEW.encode(), OLD.encode()]
    assert config.redacted()["signing_keys"] == "***"
    assert NEW not in repr(config)
    for bad in ("short", f"{NEW},", f"{NEW},,{OLD}"):
        with pytest.raises(ConfigError, match="PROXY_SIGNING_KEYS"):
            Config.load({"PROXY_SIGNING_KEYS": bad})
    from proxy_service.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--signing-keys", NEW])


def _sign_cli(*args: str, keys: str | None = f"{NEW},{OLD}") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    if keys is not None:
        env["PROXY_SIGNING_KEYS"] = keys
    return subprocess.run(
        [sys.executable, "-m", "proxy_service", "sign", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_sign_command() -> None:
    out = _sign_cli("2024/cat.png")
    assert out.returncode == 0, out.stderr
    path = out.stdout.strip()
    assert path == signing.sign_path("2024/cat.png", NEW)  # the first key signs
    out = _sign_cli(
        "cat.png", "--expires", "600", "--mode", "redirect", "--base-url", "https://i.x/"
    )
    assert out.returncode == 0, out.stderr
    url = out.stdout.strip()
    assert url.startswith("https://i.x/images/cat.png?mode=redirect&exp=")
    path = url.removeprefix("https://i.x")
    assert signing.verify_path(path, [NEW.encode()]) == signing.OK
    exp = int(signing.parse_query(path.partition("?")[2])["exp"])
    assert 590 <= exp - time.time() <= 610
    out = _sign_cli("cat.png", "--expires-at", str(int(time.time()) + 100))
    assert out.returncode == 0
    assert signing.verify_path(out.stdout.strip(), [OLD, NEW]) == signing.OK


@pytest.mark.parametrize(
    ("args", "keys", "message"),
    [
        (("cat.png",), None, "PROXY_SIGNING_KEYS is not set"),
        (("cat.png",), "", "PROXY_SIGNING_KEYS is not set"),
        (("cat.png",), "short", "PROXY_SIGNING_KEYS: every comma-separated key"),
        (("../cat.png",), NEW, "invalid image id"),
        (("cat.png", "--expires-at", "1000"), NEW, "in the past"),
        (("cat.png", "--expires", "0"), NEW, "positive"),
        (("cat.png", "--expires", "5", "--expires-at", "9999999999"), NEW, "not allowed with"),
        (("cat.png", "--mode", "zzz"), NEW, "invalid choice"),
    ],
)
def test_sign_command_errors(
    args: tuple[str, ...],
    keys: str | None,
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from proxy_service.cli import main

    for name in [k for k in os.environ if k.startswith("PROXY_")]:
        monkeypatch.delenv(name)
    if keys is not None:
        monkeypatch.setenv("PROXY_SIGNING_KEYS", keys)
    try:
        code = main(["sign", *args])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code  # type: ignore[assignment]
    out = capsys.readouterr()
    assert code == 2
    assert message in out.err
    assert out.out == ""


# --- the proxy enforcing signatures -----------------------------------------------------------

BODY = b"signed-image-bytes" * 100


@pytest.fixture
def signed_proxy(cos: CosTestServer, cos_config: ConfigFactory) -> Iterator[ThreadedProxy]:
    cos.put("images/cat.png", BODY)
    config = cos_config(signing_keys=f"{NEW},{OLD}", allow_mode_override=True)
    with running(config) as proxy:
        yield proxy


def _get(proxy: ThreadedProxy, path: str, method: str = "GET") -> Reply:
    return request(proxy.base_url + path, method=method)


def _assert_refused(reply: Reply, status: int, body: bytes) -> None:
    assert reply.status == status
    assert reply.body == body
    assert reply.header("cache-control") == "no-store"


def test_signed_url_is_served_and_unsigned_is_403(
    signed_proxy: ThreadedProxy, cos: CosTestServer
) -> None:
    path = signing.sign_path("cat.png", NEW)
    assert _get(signed_proxy, path).body == BODY
    assert _get(signed_proxy, path, method="HEAD").status == 200
    assert _get(signed_proxy, path + "&utm_source=mail&x").body == BODY  # junk is ignored
    assert len(cos.requests) == 3
    cos.reset()
    _assert_refused(_get(signed_proxy, "/images/cat.png"), 403, b"forbidden\n")
    _assert_refused(_get(signed_proxy, "/images/cat.png?s="), 403, b"forbidden\n")
    _assert_refused(_get(signed_proxy, path.replace("cat", "cow")), 403, b"forbidden\n")
    _assert_refused(_get(signed_proxy, path[:-1] + "A"), 403, b"forbidden\n")
    _assert_refused(_get(signed_proxy, "/images/cat.png", method="HEAD"), 403, b"")
    assert cos.requests == []  # refused before any storage access


def test_expired_signed_url_is_410(signed_proxy: ThreadedProxy, cos: CosTestServer) -> None:
    expired = signing.sign_path("cat.png", NEW, expires=int(time.time()) - 1)
    _assert_refused(_get(signed_proxy, expired), 410, b"link expired\n")
    forged = signing.sign_path("cat.png", "not-a-configured-key", expires=int(time.time()) - 1)
    _assert_refused(_get(signed_proxy, forged), 403, b"forbidden\n")
    assert cos.requests == []


def test_rotation_old_key_verifies_until_removed(
    cos: CosTestServer, cos_config: ConfigFactory
) -> None:
    cos.put("images/cat.png", BODY)
    by_old = signing.sign_path("cat.png", OLD)
    by_new = signing.sign_path("cat.png", NEW)
    with running(cos_config(signing_keys=OLD)) as proxy:  # before the rotation
        assert _get(proxy, by_old).status == 200
        assert _get(proxy, by_new).status == 403
    with running(cos_config(signing_keys=f"{NEW},{OLD}")) as proxy:  # during
        assert _get(proxy, by_old).status == 200
        assert _get(proxy, by_new).status == 200
    with running(cos_config(signing_keys=NEW)) as proxy:  # after
        assert _get(proxy, by_old).status == 403
        assert _get(proxy, by_new).status == 200


def test_mode_is_signed(signed_proxy: ThreadedProxy, cos: CosTestServer) -> None:
    redirect = signing.sign_path("cat.png", NEW, mode="redirect")
    reply = _get(signed_proxy, redirect)
    assert reply.status == 302
    assert (reply.header("location") or "").startswith(cos.base_url + "/images/cat.png?")
    unsigned_mode = signing.sign_path("cat.png", NEW) + "&mode=redirect"
    _assert_refused(_get(signed_proxy, unsigned_mode), 403, b"forbidden\n")
    swapped = redirect.replace("mode=redirect", "mode=stream")
    _assert_refused(_get(signed_proxy, swapped), 403, b"forbidden\n")
    # A recognised parameter with a bad value, or given twice, is a 400.
    _assert_refused(
        _get(signed_proxy, signing.sign_path("cat.png", NEW, mode="zzz")), 400, b"bad request\n"
    )
    _assert_refused(_get(signed_proxy, redirect + "&mode=stream"), 400, b"bad request\n")
    _assert_refused(_get(signed_proxy, redirect + "&s=x"), 400, b"bad request\n")
    _assert_refused(_get(signed_proxy, "/images/cat.png?exp=soon&s=x"), 400, b"bad request\n")


def test_mode_signed_but_override_off_is_ignored(
    cos: CosTestServer, cos_config: ConfigFactory
) -> None:
    cos.put("images/cat.png", BODY)
    with running(cos_config(signing_keys=NEW)) as proxy:
        assert _get(proxy, signing.sign_path("cat.png", NEW, mode="redirect")).body == BODY
        assert _get(proxy, signing.sign_path("cat.png", NEW) + "&mode=redirect").status == 403


def test_caches_never_outlive_a_signed_url(cos: CosTestServer, cos_config: ConfigFactory) -> None:
    cos.put("images/cat.png", BODY)
    exp = int(time.time()) + 100
    config = cos_config(
        signing_keys=NEW,
        allow_mode_override=True,
        cache_control="public, max-age=86400, s-maxage=3600",
        redirect_max_age=1000,
    )
    with running(config) as proxy:
        forever = _get(proxy, signing.sign_path("cat.png", NEW))
        assert forever.header("cache-control") == "public, max-age=86400, s-maxage=3600"
        reply = _get(proxy, signing.sign_path("cat.png", NEW, expires=exp))
        assert reply.status == 200
        cc = reply.header("cache-control") or ""
        ages = [int(part.split("=")[1]) for part in cc.split(", ") if "=" in part]
        assert cc.startswith("public, max-age=")
        assert "s-maxage=" in cc
        assert len(ages) == 2
        assert all(90 <= age <= 100 for age in ages), cc
        etag = reply.header("etag") or ""
        path = signing.sign_path("cat.png", NEW, expires=exp)
        not_modified = request(proxy.base_url + path, headers={"If-None-Match": etag})
        assert not_modified.status == 304
        assert not_modified.header("cache-control") == cc
        redirect = _get(proxy, signing.sign_path("cat.png", NEW, expires=exp, mode="redirect"))
        assert redirect.status == 302
        age = int((redirect.header("cache-control") or "").rpartition("=")[2])
        assert 90 <= age <= 100


def test_signing_off_leaves_query_strings_alone(
    cos: CosTestServer, cos_config: ConfigFactory
) -> None:
    cos.put("images/cat.png", BODY)
    with running(cos_config()) as proxy:
        for junk in ("?s=nonsense", "?exp=abc&s=1&s=2", "?mode=a&mode=b"):
            reply = _get(proxy, "/images/cat.png" + junk)
            assert reply.status == 200
            assert reply.header("cache-control") == "public, max-age=86400"


@settings(
    max_examples=60,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.data())
def test_tampered_urls_never_reach_storage(
    signed_proxy: ThreadedProxy, cos: CosTestServer, data: st.DataObject
) -> None:
    """The single-character property again, over HTTP: never a 200, never an origin request."""
    path = signing.sign_path("cat.png", NEW, expires=int(time.time()) + 600, mode="stream")
    at = data.draw(st.integers(len("/images/"), len(path) - 1))
    char = data.draw(
        st.sampled_from("abcABC019-_.~&=?/%").filter(lambda c: c != path[at]), label="char"
    )
    before = len(cos.requests)
    reply = _get(signed_proxy, path[:at] + char + path[at + 1 :])
    assert reply.status in (400, 403), (path[:at] + char + path[at + 1 :], reply.status)
    assert len(cos.requests) == before

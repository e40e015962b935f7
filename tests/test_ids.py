"""`parse_id`: the raw-path id check that keeps every key inside the configured prefix."""

from __future__ import annotations

import asyncio
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy_service.errors import BadId
from proxy_service.ids import parse_id
from proxy_service.resolvers import TemplateResolver, check_key

MAX = 256
ALPHABET = re.compile(r"[A-Za-z0-9._~/-]+")


@pytest.mark.parametrize(
    "raw",
    [
        b"a.png",
        b"a",
        b"2024/05/cat-1_x~y.jpg",
        b"a/b/c/d.e.f",
        b"-dash",
        b"_under",
        b"~tilde",
        b"a..b",
        b"a.",
        b"x/y..",
        b"UPPER/lower/0123456789",
    ],
)
def test_accepts(raw: bytes) -> None:
    image_id = parse_id(raw, MAX)
    assert isinstance(image_id, str)
    assert image_id == raw.decode("ascii")


def test_accepts_exactly_max_length() -> None:
    assert parse_id(b"a" * MAX, MAX) == "a" * MAX
    nested = (b"ab/" * MAX)[: MAX - 1] + b"z"
    assert len(nested) == MAX
    assert parse_id(nested, MAX) == nested.decode()


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b".",
        b"..",
        b"a/../b",
        b"a/..",
        b"../a",
        b"./a",
        b"a/./b",
        b".hidden",
        b"a/.hidden",
        b"a//b",
        b"a/",
        b"/a",
        b"/",
        b"//",
        b"%2F",
        b"a%2Fb",
        b"%2e%2e",
        b"%2E%2E/a",
        b"a%00",
        b"a\x00b",
        b"\x00",
        b"a\nb",
        b"a\r",
        b"a\tb",
        b"a\x7fb",
        b"a\x1b",
        b"a b",
        b" a",
        b"a\\b",
        b"..\\a",
        b"a?b",
        b"a#b",
        b"a:b",
        b"a+b",
        b"a;b",
        b"a*b",
        "é.png".encode(),
        "a／b".encode(),  # noqa: RUF001 - fullwidth solidus on purpose
        "．．/a".encode(),  # noqa: RUF001 - fullwidth full stops on purpose
        b"\xff",
        b"a\xc0\xafb",  # overlong UTF-8 for "/"
    ],
)
def test_rejects(raw: bytes) -> None:
    with pytest.raises(BadId):
        parse_id(raw, MAX)


def test_rejects_one_over_max_length() -> None:
    with pytest.raises(BadId):
        parse_id(b"a" * (MAX + 1), MAX)
    with pytest.raises(BadId):
        parse_id(b"a" * 9, 8)


def test_rejects_10_kb() -> None:
    with pytest.raises(BadId):
        parse_id(b"a" * 10_240, MAX)
    with pytest.raises(BadId):
        parse_id(b"a/" * 5_120 + b"a", MAX)


def test_bad_id_is_a_400() -> None:
    with pytest.raises(BadId) as info:
        parse_id(b"..", MAX)
    assert info.value.status == 400


# --- properties -------------------------------------------------------------------------------

_SEGMENT_CHARS = "abcXYZ019._~-"
_segment = st.text(alphabet=_SEGMENT_CHARS, min_size=1, max_size=12)
# Ids built from plausible pieces (so many are valid), plus hostile characters and raw bytes.
_plausible = st.lists(
    st.one_of(
        _segment,
        st.sampled_from(["", ".", "..", "%2F", "%2e", "\\", " ", "\x00", "é", "／", "\n"]),  # noqa: RUF001
    ),
    min_size=1,
    max_size=6,
).map(lambda parts: "/".join(parts).encode())
_candidates = st.one_of(_plausible, st.binary(max_size=40))


def _key_for(image_id: str) -> str:
    return asyncio.run(TemplateResolver("images/{id}").resolve(image_id))


@settings(database=None, suppress_health_check=[HealthCheck.too_slow])
@given(_candidates)
def test_accepted_ids_are_safe(raw: bytes) -> None:
    try:
        image_id = parse_id(raw, MAX)
    except BadId:
        return
    assert ALPHABET.fullmatch(image_id)
    for segment in image_id.split("/"):
        assert segment not in ("", ".", "..")
        assert not segment.startswith(".")
    key = _key_for(image_id)
    assert check_key(key, "images/") == key
    assert key.startswith("images/")


_good_segment = st.builds(
    str.__add__,
    st.text(alphabet="abcXYZ019_~-", min_size=1, max_size=1),
    st.text(alphabet=_SEGMENT_CHARS, max_size=11),
)


@settings(database=None)
@given(st.lists(_good_segment, min_size=1, max_size=8))
def test_well_formed_ids_are_accepted(segments: list[str]) -> None:
    raw = "/".join(segments).encode()
    assert parse_id(raw, MAX) == raw.decode()

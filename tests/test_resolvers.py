"""Template resolution and the prefix check applied to whatever a resolver returns."""

from __future__ import annotations

import asyncio

import pytest

from proxy_service.config import Config
from proxy_service.errors import BadId
from proxy_service.resolvers import Resolver, TemplateResolver, check_key, make_resolver


def resolve(resolver: Resolver, image_id: str) -> str:
    return asyncio.run(resolver.resolve(image_id))


def test_template_prefix_only() -> None:
    assert resolve(TemplateResolver("images/{id}"), "a.png") == "images/a.png"
    assert resolve(TemplateResolver("images/{id}"), "2024/05/cat.jpg") == "images/2024/05/cat.jpg"


def test_template_with_prefix_and_suffix() -> None:
    resolver = TemplateResolver("images/{id}.png")
    assert resolve(resolver, "cat") == "images/cat.png"
    assert resolve(resolver, "a/b") == "images/a/b.png"


def test_template_without_prefix() -> None:
    assert resolve(TemplateResolver("{id}"), "cat.png") == "cat.png"


def test_template_nested_suffix() -> None:
    assert resolve(TemplateResolver("o/{id}/original.webp"), "x") == "o/x/original.webp"


def test_template_braces_in_id_are_not_reformatted() -> None:
    # The id is spliced in verbatim, not passed through str.format.
    assert resolve(TemplateResolver("images/{id}"), "{id}") == "images/{id}"


def test_make_resolver_uses_the_configured_template() -> None:
    config = Config.load({}, {"key_template": "originals/{id}.jpg"})
    resolver = make_resolver(config)
    key = resolve(resolver, "cat")
    assert key == "originals/cat.jpg"
    assert check_key(key, config.key_prefix) == key
    assert asyncio.run(resolver.aclose()) is None


@pytest.mark.parametrize(
    ("key", "prefix"),
    [
        ("images/a.png", "images/"),
        ("images/2024/05/a.png", "images/"),
        ("images/a..b", "images/"),
        ("images/.x", "images/"),  # a dot-file is not traversal; ids forbid it separately
        ("a.png", ""),
        ("img-a.png", "img-"),
    ],
)
def test_check_key_accepts_keys_under_the_prefix(key: str, prefix: str) -> None:
    assert check_key(key, prefix) == key


@pytest.mark.parametrize(
    ("key", "prefix"),
    [
        ("other/a.png", "images/"),
        ("imagesX/a.png", "images/"),
        ("image", "images/"),
        ("/images/a.png", "images/"),
        ("Images/a.png", "images/"),
        ("images/../secret", "images/"),
        ("images/a/../../secret", "images/"),
        ("images/..", "images/"),
        ("images/.", "images/"),
        ("images/./a", "images/"),
        ("images/", "images/"),
        ("images//a", "images/"),
        ("images/a/", "images/"),
        ("images/a//b", "images/"),
        ("", ""),
        ("../a", ""),
        ("a/..", ""),
        ("img-../x", "img-"),
    ],
)
def test_check_key_rejects_keys_outside_the_prefix(key: str, prefix: str) -> None:
    with pytest.raises(BadId):
        check_key(key, prefix)


def test_check_key_rejects_traversal_via_suffix() -> None:
    # Even a resolver whose template smuggles '..' in after the id cannot escape.
    key = resolve(TemplateResolver("images/{id}/../../etc/passwd"), "a")
    with pytest.raises(BadId):
        check_key(key, "images/")

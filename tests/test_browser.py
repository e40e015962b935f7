"""A real browser on `<img src="/images/<id>">`: Debian's Chromium (driven by Playwright) loads a
page of images from the proxy, in stream and redirect mode, before and after the presigned URLs
behind them have expired. Every image must decode, to its real pixel size.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import parse_qs, urlsplit

import pytest
import redis
from playwright.sync_api import Browser, BrowserContext, Page, Response, sync_playwright

from proxy_service.storage import Entry
from proxy_service.store import Keys, dumps
from tests.conftest import REDIS_URL, ConfigFactory
from tests.support.browser import CHROMIUM_ARGS, PageServer, chromium_binary, png
from tests.support.cos_server import CosTestServer
from tests.support.proxy import ThreadedProxy, running


@dataclass(frozen=True)
class Picture:
    id: str
    width: int
    height: int
    color_type: int = 2
    lazy: bool = False

    @property
    def key(self) -> str:
        return f"images/{self.id}"


EAGER = [
    Picture("page/grey-1x1.png", 1, 1, color_type=0),
    Picture("page/rgb-2x3.png", 2, 3),
    Picture("page/rgba-16.png", 16, 16, color_type=6),
    Picture("page/rgb-40x30.png", 40, 30),
    Picture("page/grey-64.png", 64, 64, color_type=0),
    Picture("page/rgba-100x20.png", 100, 20, color_type=6),
    Picture("page/rgb-7x120.png", 7, 120),
    Picture("page/rgb-300x200.png", 300, 200),
]
LAZY = [
    Picture("page/lazy-50.png", 50, 50, lazy=True),
    Picture("page/lazy-80x60.png", 80, 60, color_type=6, lazy=True),
    Picture("page/lazy-33x77.png", 33, 77, color_type=0, lazy=True),
]
# One <img srcset>: at device scale factor 2 the browser must pick the 2x candidate.
SRCSET_1X = Picture("page/logo.png", 60, 40)
SRCSET_2X = Picture("page/logo@2x.png", 120, 80)
PICTURES = [*EAGER, *LAZY, SRCSET_1X, SRCSET_2X]
FETCHED = [*EAGER, *LAZY, SRCSET_2X]  # what a DPR-2 browser asks for
MISSING_ID = "page/missing.png"  # the control: an image that must NOT decode

STATE_JS = """() => [...document.images].map(i => ({
    id: i.id, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight,
    src: i.currentSrc}))"""
DECODE_JS = """() => Promise.all([...document.images].filter(i => i.id !== 'missing')
    .map(i => i.decode().then(() => null, e => i.id + ': ' + e)))"""
ALL_SETTLED_JS = "() => [...document.images].every(i => i.complete)"


def page_html(proxy_url: str) -> str:
    def img(p: Picture, element_id: str, extra: str = "") -> str:
        lazy = ' loading="lazy"' if p.lazy else ""
        return (
            f'<img id="{element_id}" src="{proxy_url}/images/{p.id}"{lazy}{extra} '
            f'width="{p.width}" height="{p.height}" alt="">'
        )

    srcset = f' srcset="{proxy_url}/images/{SRCSET_1X.id} 1x, {proxy_url}/images/{SRCSET_2X.id} 2x"'
    return "\n".join(
        [
            "<!doctype html><html><head><meta charset='utf-8'><title>gallery</title>",
            "<style>img { display: block; margin: 2px }</style></head><body>",
            *(img(p, f"e{i}") for i, p in enumerate(EAGER)),
            img(SRCSET_1X, "srcset", srcset),
            f'<img id="missing" src="{proxy_url}/images/{MISSING_ID}" alt="">',
            '<div style="height: 30000px"></div>',  # far below the fold: lazy means not yet
            *(img(p, f"l{i}") for i, p in enumerate(LAZY)),
            "</body></html>",
        ]
    )


def expected_sizes() -> dict[str, tuple[int, int]]:
    sizes = {f"e{i}": (p.width, p.height) for i, p in enumerate(EAGER)}
    sizes.update({f"l{i}": (p.width, p.height) for i, p in enumerate(LAZY)})
    # A 2x density candidate has half its pixel size as natural size.
    sizes["srcset"] = (SRCSET_2X.width // 2, SRCSET_2X.height // 2)
    return sizes


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = chromium_binary()
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    ctx = browser.new_context(device_scale_factor=2, viewport={"width": 800, "height": 600})
    try:
        yield ctx
    finally:
        ctx.close()


@pytest.fixture
def pictures(cos: CosTestServer) -> None:
    for n, p in enumerate(PICTURES):
        cos.put(p.key, png(p.width, p.height, color_type=p.color_type, seed=n))


def load_gallery(page: Page, url: str, cos: CosTestServer) -> None:
    """Open the page, check the eager images, scroll to the lazy ones, check them all."""
    page.goto(url, wait_until="load")
    page.wait_for_function(
        "() => [...document.images].filter(i => i.loading !== 'lazy').every(i => i.complete)"
    )
    lazy_keys = {p.key for p in LAZY}
    before = {s["id"]: s for s in page.evaluate(STATE_JS)}
    assert not any(before[f"l{i}"]["width"] for i in range(len(LAZY))), before
    assert not lazy_keys & {r.key for r in cos.requests}, "lazy images loaded before scrolling"
    page.evaluate("() => window.scrollTo(0, document.body.scrollHeight)")
    page.wait_for_function(ALL_SETTLED_JS, timeout=10_000)
    assert_all_decoded(page)


def assert_all_decoded(page: Page) -> None:
    states = {s["id"]: s for s in page.evaluate(STATE_JS)}
    sizes = {k: (s["width"], s["height"]) for k, s in states.items() if k != "missing"}
    assert sizes == expected_sizes(), states
    assert states["srcset"]["src"].endswith("/images/" + SRCSET_2X.id)
    assert page.evaluate(DECODE_JS) == [None] * len(sizes)
    # The control proves the check can fail: a 404 never decodes.
    assert states["missing"]["complete"]
    assert states["missing"]["width"] == 0


def image_statuses(responses: list[Response], proxy: ThreadedProxy) -> dict[str, int]:
    """Final status per image id, as the browser saw it (after following any redirect)."""
    out: dict[str, int] = {}
    for resp in responses:
        if 300 <= resp.status < 400:
            continue
        chain = resp.request
        while chain.redirected_from is not None:
            chain = chain.redirected_from
        if chain.url.startswith(proxy.base_url + "/images/"):
            out[chain.url.removeprefix(proxy.base_url + "/images/")] = resp.status
    return out


def seed_short_lived_urls(cos: CosTestServer, prefix: str, pictures: list[Picture]) -> list[int]:
    """Put in the shared Redis, as another replica would, URLs signed to live 5 s; their ends."""
    now = time.time()
    ends = []
    with redis.Redis.from_url(REDIS_URL) as client:
        for p in pictures:
            url = cos.presign(p.key, expires=5)
            end = sign_end(url)
            ends.append(end)
            entry = Entry(p.key, url, cos.presign(p.key, method="HEAD", expires=5), end, now)
            client.set(Keys(prefix).url(p.id), dumps(entry), px=int((end - now) * 1000))
    return ends


def redirects_of(responses: list[Response]) -> list[Response]:
    return [r for r in responses if r.status == 302]


def sign_end(url: str) -> int:
    """The end of a presigned URL's validity (`q-sign-time=<start>;<end>`), epoch seconds."""
    return int(parse_qs(urlsplit(url).query)["q-sign-time"][0].split(";")[1])


def test_gallery_decodes_in_a_real_browser_and_is_cached_by_it(
    cos: CosTestServer, cos_config: ConfigFactory, pictures: None, context: BrowserContext
) -> None:
    with running(cos_config()) as proxy, PageServer({"/": page_html(proxy.base_url)}) as site:
        page = context.new_page()
        responses: list[Response] = []
        page.on("response", lambda r: responses.append(r))
        load_gallery(page, site.url("/"), cos)
        assert image_statuses(responses, proxy) == {
            **{p.id: 200 for p in FETCHED},
            MISSING_ID: 404,
        }
        fetched = sorted(r.key for r in cos.requests)
        assert fetched == sorted([*(p.key for p in FETCHED), f"images/{MISSING_ID}"])

        # Visiting again: `Cache-Control: public, max-age=86400` lets the browser reuse every
        # image without asking (and the 404's short max-age covers the missing one).
        cos.reset()
        load_again = context.new_page()
        load_again.goto(site.url("/"), wait_until="load")
        load_again.evaluate("() => window.scrollTo(0, document.body.scrollHeight)")
        load_again.wait_for_function(ALL_SETTLED_JS, timeout=10_000)
        assert_all_decoded(load_again)
        assert cos.requests == []


def test_images_still_load_after_the_presigned_urls_expired(
    cos: CosTestServer,
    cos_config: ConfigFactory,
    redis_prefix: str,
    pictures: None,
    context: BrowserContext,
) -> None:
    # The shortest URL life there is, nothing kept back, and the shared Redis tier as deployed.
    config = cos_config(
        sign_expires=60,
        expiry_margin=0,
        redis_url=REDIS_URL,
        redis_prefix=redis_prefix,
        redis_timeout=1.0,
    )
    with running(config) as proxy, PageServer({"/": page_html(proxy.base_url)}) as site:
        page = context.new_page()
        responses: list[Response] = []
        page.on("response", lambda r: responses.append(r))
        load_gallery(page, site.url("/"), cos)
        signed = proxy.app.cache.signings
        assert signed == len(FETCHED) + 1  # one URL per id, the missing one included
        loaded_at = time.time()

        # A minute passes for COS: its clock stops just past the end of every URL the proxy
        # holds (signed at or before `loaded_at`, for 60 s from the whole second). The proxy's
        # cache still trusts them. A URL signed a whole second later is still valid then.
        frozen = int(loaded_at) + 60.5
        cos.wait_until(lambda: time.time() >= int(loaded_at) + 1.05, timeout=3)
        cos.clock = lambda: frozen
        cos.reset()
        responses.clear()

        # Reload, bypassing the browser's cache, with the same page and the same <img src>.
        cdp = context.new_cdp_session(page)
        cdp.send("Network.enable")
        cdp.send("Network.setCacheDisabled", {"cacheDisabled": True})
        page.reload(wait_until="load")
        page.evaluate("() => window.scrollTo(0, document.body.scrollHeight)")
        page.wait_for_function(ALL_SETTLED_JS, timeout=10_000)
        assert_all_decoded(page)

        assert image_statuses(responses, proxy) == {
            **{p.id: 200 for p in FETCHED},
            MISSING_ID: 404,  # from the proxy's negative cache
        }
        # Every cached URL was refused as expired, re-signed once and retried.
        for p in FETCHED:
            seen = [(r.status, r.error_code) for r in cos.requests if r.key == p.key]
            assert seen == [(403, "AccessDenied"), (200, None)], (p.id, seen)
        assert proxy.app.cache.signings == signed + len(FETCHED)


def test_redirect_mode_gallery_survives_url_expiry_without_cache_bypass(
    cos: CosTestServer,
    cos_config: ConfigFactory,
    redis_prefix: str,
    pictures: None,
    context: BrowserContext,
) -> None:
    config = cos_config(
        mode="redirect",
        sign_expires=60,
        expiry_margin=1,
        redis_url=REDIS_URL,
        redis_prefix=redis_prefix,
        redis_timeout=1.0,  # a loaded machine must not push the proxy into signing by itself
    )
    with running(config) as proxy, PageServer({"/": page_html(proxy.base_url)}) as site:
        ends = seed_short_lived_urls(cos, redis_prefix, [*FETCHED, Picture(MISSING_ID, 0, 0)])
        page = context.new_page()
        responses: list[Response] = []
        page.on("response", lambda r: responses.append(r))
        load_gallery(page, site.url("/"), cos)
        assert proxy.app.cache.signings == 0  # every 302 pointed at a seeded, short-lived URL
        # COS's 404 for the missing one is XML: the browser blocks it (ERR_BLOCKED_BY_ORB) and
        # reports no response at all.
        assert image_statuses(responses, proxy) == {p.id: 200 for p in FETCHED}
        redirects = redirects_of(responses)
        assert len(redirects) == len(FETCHED) + 1
        for r in redirects:  # no browser may keep a 302 longer than its URL lives
            cache_control = r.headers["cache-control"]
            max_age = 0 if cache_control == "no-store" else int(cache_control.rpartition("=")[2])
            sent_at = parsedate_to_datetime(r.headers["date"]).timestamp()
            assert max_age <= sign_end(r.headers["location"]) - sent_at - config.expiry_margin

        # Those URLs die. A plain visit, no cache bypass: the browser's cached 302s died with
        # them (their max-age never outlives the URL), so it asks the proxy, which re-signs.
        cos.wait_until(lambda: time.time() > max(ends) + 0.2, timeout=8)
        cos.reset()
        responses.clear()
        page.goto(site.url("/"), wait_until="load")
        page.evaluate("() => window.scrollTo(0, document.body.scrollHeight)")
        page.wait_for_function(ALL_SETTLED_JS, timeout=10_000)
        assert_all_decoded(page)
        assert image_statuses(responses, proxy) == {p.id: 200 for p in FETCHED}
        assert proxy.app.cache.signings == len(FETCHED) + 1
        assert {r.status for r in cos.requests} == {200, 404}  # never a dead URL
        assert all(
            sign_end(r.headers["location"]) > time.time() + 30 for r in redirects_of(responses)
        )

"""What a run measures: options, scenarios, and the path each contender is asked for."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .objects import GIB, MIB

Style = Literal["rate", "count", "slow"]
Kind = Literal["direct", "nginx", "proxy", "proxy-redirect"]

RESULTS_DIR = Path(__file__).parent / "results"
KINDS: tuple[str, ...] = ("direct", "nginx", "proxy")  # `proxy` includes proxy-redirect

# A Location of the shape and length of a real presigned COS URL, for the 302s that nginx and
# the origin answer in the redirect scenario (so all contenders send about the same bytes).
FAKE_SIGNATURE = (
    "q-sign-algorithm=sha1&q-ak=AKIDbenchmarkbenchmarkbenchmark00&"
    "q-sign-time=1700000000%3B1700003600&q-key-time=1700000000%3B1700003600&"
    "q-header-list=host&q-url-param-list=&q-signature=" + "0" * 40
)


@dataclass(frozen=True)
class Scenario:
    name: str
    obj: str  # key in objects.SIZES (or "huge")
    style: Style
    status: int = 200
    vary: bool = False  # every request a new id (URL-cache miss)
    redirect: bool = False
    doc: str = ""


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("small", "small", "rate", doc="16 KiB, URL-cache hit"),
        Scenario("medium", "medium", "rate", doc="256 KiB, URL-cache hit"),
        Scenario("large", "large", "rate", doc="4 MiB, URL-cache hit"),
        Scenario("miss", "small", "rate", vary=True, doc="16 KiB, every request a new id"),
        Scenario("redirect", "small", "rate", status=302, redirect=True, doc="302, not followed"),
        Scenario("huge", "huge", "count", doc="1 GiB streamed a few times: RSS growth"),
        Scenario("slow", "medium", "slow", doc="1 000 clients reading 256 KiB slowly"),
    )
}
DEFAULT_SCENARIOS = ("small", "medium", "large", "miss", "redirect")
SMOKE_SCENARIOS = ("small", "large", "miss", "redirect")

# Targets from the brief: a flat stream and bounded memory under slow clients.
HUGE_RSS_GROWTH_LIMIT_MIB = 64.0
SLOW_RSS_LIMIT_MIB = 300.0


@dataclass(frozen=True)
class Options:
    scenarios: tuple[str, ...] = DEFAULT_SCENARIOS
    kinds: tuple[str, ...] = KINDS
    workers: tuple[int, ...] = (1,)
    repeats: int = 3
    duration: float = 5.0
    warmup: float = 1.0
    connections: int = 64
    origin: Literal["auto", "nginx", "builtin"] = "auto"
    load: Literal["auto", "wrk", "bundled"] = "auto"
    huge_size: int = GIB
    huge_requests: int = 3
    slow_clients: int = 1000
    slow_read: int = 16 * 1024
    slow_interval: float = 0.05
    slow_duration: float = 10.0
    pin: bool = True
    # A new proxy process for every proxy cell: memory and the URL cache then belong to that
    # scenario alone, not to whatever ran before it in the interleaving.
    fresh_proxy: bool = True
    # A cell during which other processes used more than `noise_limit` % of a core is measured
    # again (up to `noise_retries` times) and the least disturbed attempt is kept.
    noise_limit: float = 50.0
    noise_retries: int = 1
    results_dir: Path = RESULTS_DIR
    tmp_dir: Path | None = None
    keep_tmp: bool = False
    proxy_env: dict[str, str] = field(default_factory=dict)
    proxy_src: Path | None = None  # directory holding the proxy_service package to measure
    smoke: bool = False

    @classmethod
    def smoke_defaults(cls) -> dict[str, object]:
        return {
            "scenarios": SMOKE_SCENARIOS,
            "repeats": 1,
            "duration": 1.0,
            "warmup": 0.0,
            "noise_retries": 0,
            "fresh_proxy": False,
            "connections": 16,
            "huge_size": 16 * MIB,
            "huge_requests": 2,
            "slow_clients": 50,
            "slow_duration": 1.0,
            "slow_interval": 0.01,
            "results_dir": RESULTS_DIR / "tmp" / "smoke",
            "smoke": True,
        }


def contender_kinds(scenario: Scenario, selected: tuple[str, ...]) -> list[Kind]:
    proxy: Kind = "proxy-redirect" if scenario.redirect else "proxy"
    kinds: list[Kind] = []
    if "direct" in selected:
        kinds.append("direct")
    if "nginx" in selected:
        kinds.append("nginx")
    if "proxy" in selected:
        kinds.append(proxy)
    return kinds


def target_path(scenario: Scenario, kind: Kind, obj_file: str, token: str) -> str:
    """The path to load; for `vary` scenarios a prefix the load generator appends a counter to."""
    images = "" if kind == "direct" else "/images"
    if scenario.redirect and kind in ("direct", "nginx"):
        return f"/redirect/{obj_file}"  # the server itself answers the same 302
    if scenario.vary:
        return f"{images}/miss/{token}-"
    return f"{images}/{obj_file}"

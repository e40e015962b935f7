"""From measured cells to the results: medians, ratios to nginx and to the direct origin, the
targets a scenario must meet, and which proxy code was measured."""

from __future__ import annotations

import statistics
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .contenders import Contender
from .plan import HUGE_RSS_GROWTH_LIMIT_MIB, SLOW_RSS_LIMIT_MIB, Scenario

Cell = dict[str, Any]
MEDIAN_KEYS = (
    "req_s",
    "mib_s",
    "p50_ms",
    "p99_ms",
    "cpu_us_per_req",
    "origin_cpu_us_per_req",
    "rss_mib",
    "rss_growth_mib",
    "noise_pct",
)


def aggregate(
    scenarios: Sequence[Scenario],
    cells_for: Callable[[Scenario], list[Contender]],
    runs: dict[tuple[str, str], list[Cell]],
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for scenario in scenarios:
        row: dict[str, Any] = {}
        for c in cells_for(scenario):
            cells = runs[(scenario.name, c.name)]
            median = {k: statistics.median(cell[k] for cell in cells) for k in MEDIAN_KEYS}
            median["requests"] = sum(cell["requests"] for cell in cells)
            median["errors"] = sum(cell["errors"] for cell in cells)
            row[c.name] = {
                "kind": c.kind,
                "workers": c.workers if c.kind.startswith("proxy") else None,
                "tool": cells[0]["tool"],
                **median,
                "runs": cells,
            }
        for name, entry in row.items():
            for ref in ("nginx", "direct"):
                base = row.get(ref, {}).get("req_s")
                entry[f"ratio_to_{ref}"] = entry["req_s"] / base if base else None
            nginx_cpu = row.get("nginx", {}).get("cpu_us_per_req")
            entry["cpu_ratio_to_nginx"] = entry["cpu_us_per_req"] / nginx_cpu if nginx_cpu else None
            entry["targets"] = targets(scenario, name, entry)
        out[scenario.name] = row
    return out


def targets(scenario: Scenario, name: str, entry: dict[str, Any]) -> dict[str, Any]:
    if not name.startswith("proxy"):
        return {}
    if scenario.name == "huge":
        limit = HUGE_RSS_GROWTH_LIMIT_MIB
        return {"rss_growth_mib_below": limit, "ok": entry["rss_growth_mib"] < limit}
    if scenario.name == "slow":
        limit = SLOW_RSS_LIMIT_MIB
        return {"rss_mib_below": limit, "ok": entry["rss_mib"] < limit and not entry["errors"]}
    return {}


def source_state(src: Path) -> dict[str, Any]:
    """Which proxy code was measured: the commit, and whether proxy_service/ had local edits
    (then only the snapshot's sha256 in the results names the code exactly)."""
    state: dict[str, Any] = {"src": str(src)}
    try:
        head = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--", "proxy_service"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except OSError:
        return state
    if head.returncode == 0:
        state["commit"] = head.stdout.strip()
        state["dirty"] = bool(dirty.stdout.strip())
    return state

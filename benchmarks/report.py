"""Results out: a text table, JSON (`<timestamp>.json` and `latest.json`) and a bar chart
(`latest.svg`, dependency-free; `latest.png` too when matplotlib happens to be importable)."""

from __future__ import annotations

import importlib
import json
import math
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

CHART_SCENARIOS = ("small", "medium", "large")
COLORS = ("#7f7f7f", "#2ca02c", "#1f77b4", "#ff7f0e", "#9467bd", "#d62728", "#8c564b")


def _num(value: object, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(data: dict[str, Any]) -> str:
    head = (
        f"{'scenario':9} {'contender':18} {'req/s':>9} {'MiB/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'CPU us/req':>10} {'RSS MiB':>8} {'x nginx':>7} {'x direct':>8} {'errors':>6} "
        f"{'noise%':>6}"
    )
    lines = [head, "-" * len(head)]
    for scenario, row in data["results"].items():
        for name, e in row.items():
            lines.append(
                f"{scenario:9} {name:18} {e['req_s']:9.0f} {e['mib_s']:8.1f} "
                f"{e['p50_ms']:7.2f} {e['p99_ms']:7.2f} {e['cpu_us_per_req']:10.0f} "
                f"{e['rss_mib']:8.1f} {_num(e['ratio_to_nginx'], '7.2f'):>7} "
                f"{_num(e['ratio_to_direct'], '8.2f'):>8} {e['errors']:6d} {e['noise_pct']:6.0f}"
            )
            if scenario == "huge":
                lines[-1] += f"   RSS growth {e['rss_growth_mib']:.1f} MiB"
            if e.get("targets"):
                lines[-1] += "   target " + ("met" if e["targets"]["ok"] else "MISSED")
        lines.append("")
    return "\n".join(lines)


def write_json(data: dict[str, Any], results_dir: Path) -> dict[str, Path]:
    """`<timestamp>.json` and `latest.json`, the same text."""
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    paths = {"json": results_dir / f"{stamp}.json", "latest": results_dir / "latest.json"}
    for path in paths.values():
        path.write_text(text)
    return paths


def write(data: dict[str, Any], results_dir: Path) -> dict[str, Path]:
    paths = write_json(data, results_dir)
    for stale in ("latest.svg", "latest.png"):  # never a chart of an older run beside this JSON
        (results_dir / stale).unlink(missing_ok=True)
    svg = svg_chart(data)
    if svg:
        paths["svg"] = results_dir / "latest.svg"
        paths["svg"].write_text(svg)
        png = png_chart(data, results_dir / "latest.png")
        if png:
            paths["png"] = png
    return paths


def _series(data: dict[str, Any]) -> tuple[list[str], list[str], dict[str, dict[str, Any]]]:
    results = data["results"]
    groups = [s for s in CHART_SCENARIOS if s in results]
    names: list[str] = []
    for s in groups:
        names += [n for n in results[s] if n not in names]
    return groups, names, results


def _panels(results: dict[str, Any], groups: list[str]) -> list[tuple[str, str]]:
    """MiB/s, and throughput relative to the reference (nginx, or the origin without nginx)."""
    ref = "nginx" if any("nginx" in results[g] for g in groups) else "direct"
    return [("mib_s", "MiB/s"), (f"ratio_to_{ref}", f"throughput relative to {ref} (= 1)")]


def svg_chart(data: dict[str, Any]) -> str:
    """Two panels, MiB/s and the ratio to nginx, grouped by object size, a bar per contender."""
    groups, names, results = _series(data)
    if not groups:
        return ""
    panel_w, panel_h, top, bottom, left = 460, 300, 50, 60, 60
    width, height = 2 * panel_w + 40, top + panel_h + bottom + 20 * math.ceil(len(names) / 4)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">'
        f"{escape(_title(data))}</text>",
    ]
    sizes = {"small": "16 KiB", "medium": "256 KiB", "large": "4 MiB"}
    for p, (metric, label) in enumerate(_panels(results, groups)):
        x0 = 20 + p * (panel_w + 20) + left
        plot_w = panel_w - left - 10
        values = [results[g].get(n, {}).get(metric) or 0.0 for g in groups for n in names]
        vmax = _nice(max(values) if values else 1.0)
        out.append(
            f'<text x="{x0 + plot_w / 2}" y="{top - 12}" text-anchor="middle">{label}</text>'
        )
        for i in range(5):  # grid and y labels
            v = vmax * i / 4
            y = top + panel_h - panel_h * i / 4
            out.append(
                f'<line x1="{x0}" y1="{y}" x2="{x0 + plot_w}" y2="{y}" stroke="#ddd"/>'
                f'<text x="{x0 - 4}" y="{y + 4}" text-anchor="end">{_short(v)}</text>'
            )
        gw = plot_w / len(groups)
        bw = gw * 0.8 / max(len(names), 1)
        for gi, g in enumerate(groups):
            gx = x0 + gi * gw + gw * 0.1
            for ni, n in enumerate(names):
                v = results[g].get(n, {}).get(metric)
                if v is None:
                    continue
                h = panel_h * v / vmax
                x, y = gx + ni * bw, top + panel_h - h
                out.append(
                    f'<rect x="{x:.1f}" y="{y:.1f}" width="{bw - 2:.1f}" height="{h:.1f}" '
                    f'fill="{COLORS[ni % len(COLORS)]}"><title>{escape(n)} {g}: {v:.1f}</title>'
                    f'</rect><text x="{x + bw / 2 - 1:.1f}" y="{y - 3:.1f}" text-anchor="middle" '
                    f'font-size="9">{_short(v)}</text>'
                )
            out.append(
                f'<text x="{x0 + gi * gw + gw / 2:.1f}" y="{top + panel_h + 16}" '
                f'text-anchor="middle">{g} ({sizes[g]})</text>'
            )
    for ni, n in enumerate(names):  # legend
        lx = 20 + left + (ni % 4) * 200
        ly = top + panel_h + 36 + 20 * (ni // 4)
        out.append(
            f'<rect x="{lx}" y="{ly - 10}" width="12" height="12" '
            f'fill="{COLORS[ni % len(COLORS)]}"/><text x="{lx + 18}" y="{ly}">{escape(n)}</text>'
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def png_chart(data: dict[str, Any], path: Path) -> Path | None:
    try:
        matplotlib = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        plt = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        return None  # not a dependency: the SVG is the chart
    groups, names, results = _series(data)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (metric, label) in zip(
        axes, (("req_s", "requests/s"), ("mib_s", "MiB/s")), strict=True
    ):
        width = 0.8 / max(len(names), 1)
        for ni, n in enumerate(names):
            xs = [gi + ni * width for gi in range(len(groups))]
            ys = [results[g].get(n, {}).get(metric) or 0.0 for g in groups]
            ax.bar(xs, ys, width, label=n, color=COLORS[ni % len(COLORS)])
        ax.set_xticks([gi + 0.4 - width / 2 for gi in range(len(groups))], groups)
        ax.set_title(label)
    axes[0].legend()
    fig.suptitle(_title(data))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _title(data: dict[str, Any]) -> str:
    meta = data["meta"]
    return (
        f"throughput by object size ({meta['origin']} origin, {meta['load']} load, "
        f"{'pinned' if meta['pinned'] else 'unpinned'}, {meta['started']})"
    )


def _nice(v: float) -> float:
    if v <= 0:
        return 1.0
    exp = 10.0 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * exp:
            return m * exp
    return 10 * exp


def _short(v: float) -> str:
    if v == 0:
        return "0"
    if v < 10:
        return f"{v:.2f}"
    if v >= 10_000:
        return f"{v / 1000:.0f}k"
    if v >= 1000:
        return f"{v / 1000:.1f}k"
    return f"{v:.0f}"

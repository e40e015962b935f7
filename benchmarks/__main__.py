"""`python -m benchmarks run [options]`: measure, print the table, write JSON and the chart.
`python -m benchmarks clients [options]`: the upstream HTTP client's own cost (see clients.py).

Exit status: 0 when every response was right and no request failed, 1 when some requests
failed (the table says where), 2 on a set-up or verification failure.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from types import FrameType
from typing import Any

from . import clients, report
from .load import LoadError
from .objects import MIB
from .plan import DEFAULT_SCENARIOS, KINDS, SCENARIOS, Options
from .procs import ChildError, stop_all
from .runner import SetupError, run
from .verify import VerificationError


def _csv(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _workers(raw: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in _csv(raw))
    except ValueError:
        raise argparse.ArgumentTypeError("expected e.g. 1,2") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("worker counts must be >= 1")
    return values


def _env(raw: str) -> tuple[str, str]:
    name, sep, value = raw.partition("=")
    if not sep or not name.startswith("PROXY_"):
        raise argparse.ArgumentTypeError("expected PROXY_NAME=value")
    return name, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the benchmark")
    p.add_argument("--smoke", action="store_true", help="a tiny run of a few seconds (tests)")
    p.add_argument(
        "--scenarios",
        type=_csv,
        help=f"comma-separated, of {', '.join(SCENARIOS)} (default {','.join(DEFAULT_SCENARIOS)})",
    )
    p.add_argument(
        "--contenders", dest="kinds", type=_csv, help=f"of {', '.join(KINDS)} (default all)"
    )
    p.add_argument("--workers", type=_workers, help="proxy worker counts, e.g. 1,2 (default 1)")
    p.add_argument("--repeats", type=int, help="interleaved repeats; the median is kept (3)")
    p.add_argument("--duration", type=float, help="seconds per cell (5; wrk rounds up)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up per contender (1)")
    p.add_argument("--connections", type=int, help="concurrent connections (64)")
    p.add_argument("--origin", choices=("auto", "nginx", "builtin"), help="origin server")
    p.add_argument("--load", choices=("auto", "wrk", "bundled"), help="load generator")
    p.add_argument("--huge-mib", type=int, help="size of the huge object in MiB (1024)")
    p.add_argument("--huge-requests", type=int, help="downloads of the huge object (3)")
    p.add_argument("--slow-clients", type=int, help="slow clients (1000)")
    p.add_argument("--slow-duration", type=float, help="seconds of the slow scenario (10)")
    p.add_argument(
        "--noise-limit", type=float, help="%% of a core used by others that marks a cell (50)"
    )
    p.add_argument("--noise-retries", type=int, help="re-measures of a disturbed cell (1)")
    p.add_argument("--no-pin", dest="pin", action="store_false", default=None)
    p.add_argument(
        "--fresh-proxy",
        action=argparse.BooleanOptionalAction,
        help="a new proxy process for every proxy cell (default; not with --smoke)",
    )
    p.add_argument("--results-dir", type=Path, help="where JSON and chart go")
    p.add_argument("--tmp-dir", type=Path, help="parent of the run's temporary directory")
    p.add_argument(
        "--proxy-src",
        type=Path,
        help="directory holding the proxy_service package to measure (default: this checkout)",
    )
    p.add_argument("--keep-tmp", action="store_true", default=None, help="keep configs and logs")
    p.add_argument(
        "--proxy-env",
        type=_env,
        action="append",
        metavar="PROXY_NAME=value",
        help="extra proxy setting, e.g. PROXY_REDIS_URL=redis://127.0.0.1:6379/0 (repeatable)",
    )
    c = sub.add_parser("clients", help="CPU per request of the upstream HTTP client alone")
    c.add_argument("--smoke", action="store_true", help="a tiny run of a few seconds (tests)")
    c.add_argument("--rounds", type=int, default=5, help="interleaved rounds; median kept (5)")
    c.add_argument("--origin", choices=("auto", "builtin"), default="auto", help="origin server")
    c.add_argument(
        "--clients",
        type=_csv,
        default=("proxy-upstream", "aiohttp", "httpx", "floor"),
        help="of proxy-upstream, aiohttp, httpx (when installed), floor (default all)",
    )
    c.add_argument("--results-dir", type=Path, default=clients.DEFAULT_RESULTS)
    return parser


def clients_main(args: argparse.Namespace) -> int:
    try:
        data = clients.run(
            args.smoke, args.rounds, args.results_dir, args.origin, list(args.clients)
        )
    except (ChildError, RuntimeError, OSError) as exc:
        print(f"benchmarks: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(clients.table(data))
    print(f"json: {args.results_dir / 'latest.json'}")
    return 0


def options_from_args(args: argparse.Namespace) -> Options:
    values: dict[str, Any] = Options.smoke_defaults() if args.smoke else {}
    names = {f.name for f in fields(Options)}
    for key, value in vars(args).items():
        if key in names and value is not None:
            values[key] = value
    if args.huge_mib is not None:
        values["huge_size"] = args.huge_mib * MIB
    if args.proxy_env:
        values["proxy_env"] = dict(args.proxy_env)
    return Options(**values)


def _terminate(signum: int, _frame: FrameType | None) -> None:
    # Unwind through the runner's `finally`, which stops every child.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    if args.command == "clients":
        return clients_main(args)
    opts = options_from_args(args)
    try:
        data = run(opts)
    except (SetupError, ChildError, VerificationError, LoadError) as exc:
        print(f"benchmarks: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("benchmarks: interrupted", file=sys.stderr)
        return 130
    finally:
        stop_all()
    print()
    print(report.table(data))
    for kind, path in report.write(data, opts.results_dir).items():
        print(f"{kind}: {path}")
    errors = sum(e["errors"] for row in data["results"].values() for e in row.values())
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

"""`proxy-service` command line: builds the `Config` (environment, then flags) and runs.

Every non-secret setting has a flag named after its field (`--redis-prefix`, `--upstream-retries`
...); secrets come only from the environment, so they never show up in `ps`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any, get_type_hints

import uvicorn

from .app import ProxyApp
from .config import ENV_PREFIX, Config, ConfigError, _parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="proxy-service", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the image proxy")
    hints = get_type_hints(Config)
    for f in fields(Config):
        if f.metadata.get("secret"):
            continue
        env = ENV_PREFIX + f.name.upper()
        serve.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            metavar=env,
            type=_flag_parser(env, hints[f.name]),
            help=f"default {f.default!r}, or ${env}",
        )
    serve.add_argument("--no-access-log", action="store_true", help="disable uvicorn's access log")
    return parser


def _flag_parser(env: str, hint: Any) -> Callable[[str], object]:
    def parse(raw: str) -> object:
        try:
            return _parse(env, raw, hint)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def app_from_env() -> ProxyApp:
    """uvicorn factory for `serve --workers N`: each worker process rebuilds the config."""
    return ProxyApp(Config.load(os.environ))


def serve(config: Config, access_log: bool) -> None:
    options: dict[str, Any] = {
        "host": config.host,
        "port": config.port,
        "loop": "uvloop",
        "http": "httptools",
        "lifespan": "on",
        "log_level": config.log_level,
        "access_log": access_log,
        "server_header": False,
        "proxy_headers": False,
    }
    if config.workers == 1:
        uvicorn.run(ProxyApp(config), **options)
        return
    # Workers are separate processes: hand them the resolved settings through the environment.
    os.environ.update(config.to_env())
    uvicorn.run("proxy_service.cli:app_from_env", factory=True, workers=config.workers, **options)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "no_access_log")}
    try:
        config = Config.load(os.environ, overrides)
    except ConfigError as exc:
        print(f"proxy-service: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), format="%(levelname)s %(name)s %(message)s")
    if args.command == "serve":
        serve(config, access_log=not args.no_access_log)
    return 0

"""`proxy-service` command line: builds the `Config` (environment, then flags) and runs.

Every non-secret setting has a flag named after its field (`--redis-prefix`, `--upstream-retries`
...); secrets come only from the environment, so they never show up in `ps`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any, get_type_hints

import uvicorn

from . import refresher, signing
from .app import ProxyApp
from .config import ENV_PREFIX, Config, ConfigError, _parse
from .errors import BadId
from .ids import parse_id
from .index import Index


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="proxy-service", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = _with_config_flags(sub.add_parser("serve", help="run the image proxy"))
    serve.add_argument("--no-access-log", action="store_true", help="disable uvicorn's access log")
    refresher = _with_config_flags(
        sub.add_parser("refresher", help="run the worker that re-signs URLs before they expire")
    )
    refresher.add_argument(
        "--check", action="store_true", help="exit 0 if a local refresher loop is alive (probe)"
    )
    for name, text in (
        ("purge", "drop ids from Redis, the index and every proxy's LRU"),
        ("refresh", "re-sign ids now and make every proxy pick up the new URL"),
    ):
        cmd = _with_config_flags(sub.add_parser(name, help=text))
        cmd.add_argument("ids", nargs="+", metavar="ID")
    _add_sign_parser(sub)
    return parser


def _with_config_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    hints = get_type_hints(Config)
    for f in fields(Config):
        if f.metadata.get("secret"):
            continue
        env = ENV_PREFIX + f.name.upper()
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            metavar=env,
            type=_flag_parser(env, hints[f.name]),
            help=f"default {f.default!r}, or ${env}",
        )
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
    names = {f.name for f in fields(Config)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    try:
        config = Config.load(os.environ, overrides)
    except ConfigError as exc:
        print(f"proxy-service: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), format="%(levelname)s %(name)s %(message)s")
    if args.command == "serve":
        serve(config, access_log=not args.no_access_log)
        return 0
    if args.command == "refresher":
        if args.check:
            return 0 if refresher.check(config) else 1
        if not config.redis_url:
            print("proxy-service: configuration error: PROXY_REDIS_URL: required", file=sys.stderr)
            return 2
        asyncio.run(refresher.serve(config))
        return 0
    if args.command in ("purge", "refresh"):
        return _admin(config, args.command, args.ids)
    if args.command == "sign":
        return _sign(config, args)
    return 2


def _admin(config: Config, command: str, raw_ids: list[str]) -> int:
    if not config.redis_url:
        print("proxy-service: configuration error: PROXY_REDIS_URL: required", file=sys.stderr)
        return 2
    try:
        ids = [parse_id(i.encode(), config.id_max_length) for i in raw_ids]
    except (BadId, UnicodeEncodeError):
        print("proxy-service: invalid image id", file=sys.stderr)
        return 2

    async def run() -> int:
        index = Index(config)
        worker = refresher.Refresher(config, index)
        failed = 0
        try:
            for image_id in ids:
                if command == "purge":
                    await index.purge(image_id)
                elif not await worker.refresh_now(image_id):
                    failed += 1
                    print(f"{image_id}: not found (purged)", file=sys.stderr)
        finally:
            await worker.resolver.aclose()
            await index.aclose()
        return 1 if failed else 0

    return asyncio.run(run())


def _add_sign_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # No config flags here: `--mode` is the signed `?mode=`, not PROXY_MODE.
    cmd = sub.add_parser(
        "sign", help="print a signed stable URL, signed with the first key of $PROXY_SIGNING_KEYS"
    )
    cmd.add_argument("image_id", metavar="ID")
    when = cmd.add_mutually_exclusive_group()
    when.add_argument("--expires", type=int, metavar="SECONDS", help="valid for SECONDS from now")
    when.add_argument("--expires-at", type=int, metavar="UNIX", help="valid until this Unix time")
    cmd.add_argument(
        "--mode",
        dest="url_mode",
        choices=("redirect", "stream"),
        help="sign a ?mode= too (honoured when PROXY_ALLOW_MODE_OVERRIDE=true)",
    )
    cmd.add_argument(
        "--base-url",
        default="",
        metavar="URL",
        help="public origin, e.g. https://img.example.com (default: print the path only)",
    )


def _sign(config: Config, args: argparse.Namespace) -> int:
    def fail(why: str) -> int:
        print(f"proxy-service sign: {why}", file=sys.stderr)
        return 2

    keys = signing.parse_keys(config.signing_keys)
    if not keys:
        return fail("PROXY_SIGNING_KEYS is not set: no key to sign with")
    try:
        image_id = parse_id(args.image_id.encode(), config.id_max_length)
    except (BadId, UnicodeEncodeError):
        return fail("invalid image id")
    expires: int | None = args.expires_at
    if args.expires is not None:
        if args.expires <= 0:
            return fail("--expires must be a positive number of seconds")
        expires = int(time.time()) + args.expires
    elif expires is not None and expires <= time.time():
        return fail("--expires-at is in the past")
    try:
        path = signing.sign_path(image_id, keys[0], expires=expires, mode=args.url_mode)
    except ValueError as exc:
        return fail(str(exc))
    print(args.base_url.rstrip("/") + path)
    return 0

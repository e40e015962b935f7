"""`proxy-service` command line: builds the `Config` (environment, then flags) and runs.

Every non-secret setting has a flag named after its field (`--redis-prefix`, `--upstream-retries`
...); secrets come only from the environment, so they never show up in `ps`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_type_hints

import uvicorn
from redis.exceptions import RedisError
from uvicorn.supervisors import Multiprocess

from . import logs, signing
from .config import ENV_PREFIX, Config, ConfigError, _parse
from .errors import BadId, ProxyError
from .ids import parse_id

if TYPE_CHECKING:
    from .app import ProxyApp

# Nothing that imports prometheus-client may be imported at module level: with `--workers N`
# its multiprocess directory must be in the environment first (see `serve`).
log = logging.getLogger("proxy_service.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="proxy-service", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = _with_config_flags(sub.add_parser("serve", help="run the image proxy"))
    serve.add_argument("--no-access-log", action="store_true", help="same as --access-log false")
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
    from .app import ProxyApp

    return ProxyApp(Config.load(os.environ))


def serve(config: Config) -> None:
    public = _bind(config.host, config.port)
    internal = _bind(config.internal_host, config.internal_port)
    config = config.replace(internal_port=internal.getsockname()[1])
    options: dict[str, Any] = {
        "loop": "uvloop",
        "http": "httptools",
        "lifespan": "on",
        "log_config": None,  # logging is ours (logs.setup): JSON lines
        "access_log": False,  # the handler writes one access line a request itself
        "server_header": False,
        "proxy_headers": False,
    }
    log.info(
        "serving on %s:%d (internal %s:%d)",
        config.host,
        config.port,
        config.internal_host,
        config.internal_port,
    )
    if config.workers == 1:
        from .app import ProxyApp

        app = ProxyApp(config)
        if not _run(uvicorn.Server(uvicorn.Config(app, **options)), [public, internal]):
            if app.config_error is not None:  # e.g. PROXY_SQL_QUERY, checked on the database
                print(f"proxy-service: configuration error: {app.config_error}", file=sys.stderr)
                sys.exit(2)
            sys.exit(3)
        return
    # prometheus-client reads PROMETHEUS_MULTIPROC_DIR when imported: set it (on an empty
    # directory) before any worker starts; workers get every setting through the environment.
    directory = config.metrics_dir or tempfile.mkdtemp(prefix="proxy-service-metrics-")
    for stale in Path(directory).glob("*.db"):
        stale.unlink()
    config = config.replace(metrics_dir=directory)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    os.environ.update(config.to_env())
    ucfg = uvicorn.Config(
        "proxy_service.cli:app_from_env", factory=True, workers=config.workers, **options
    )
    Multiprocess(ucfg, sockets=[public, internal]).run()


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def _run(server: uvicorn.Server, sockets: list[socket.socket]) -> bool:
    """Serve until stopped; False when start-up failed."""
    # uvicorn re-raises SIGTERM after a graceful shutdown; a graceful stop should exit 0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.run(sockets=sockets)
    except SystemExit as exc:
        if server.started or exc.code != 3:  # 3: uvicorn's own exit when the start-up fails
            raise
        return False
    return bool(server.started)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = {f.name for f in fields(Config)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    try:
        config = Config.load(os.environ, overrides)
    except ConfigError as exc:
        print(f"proxy-service: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command in ("serve", "refresher") and not getattr(args, "check", False):
        logs.setup(config.log_level)
    if args.command == "serve":
        if args.no_access_log:
            config = config.replace(access_log=False)
        serve(config)
        return 0
    if args.command == "refresher":
        if args.check:
            from .refresher import check

            return 0 if check(config) else 1
        if not config.redis_url:
            print("proxy-service: configuration error: PROXY_REDIS_URL: required", file=sys.stderr)
            return 2
        from . import refresher

        refresher_app = refresher.make_app(config)
        internal = _bind(config.internal_host, config.internal_port)
        options: dict[str, Any] = {"lifespan": "on", "log_config": None, "access_log": False}
        return (
            0 if _run(uvicorn.Server(uvicorn.Config(refresher_app, **options)), [internal]) else 3
        )
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

    from . import refresher
    from .index import Index

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

    try:
        return asyncio.run(run())
    except (ProxyError, RedisError, OSError) as exc:
        # Types only: messages from redis-py or asyncpg can quote a URL with its password.
        print(f"proxy-service: {command} failed: {type(exc).__name__}", file=sys.stderr)
        return 1


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

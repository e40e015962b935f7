"""The one typed, frozen configuration, built from `PROXY_*` environment variables and CLI flags.

Every setting is a field of `Config`; its environment variable is `PROXY_` + the upper-cased name.
`Config.load()` parses and validates once, at start-up, and names the offending key in any error.
Nothing else in the package reads `os.environ`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

ENV_PREFIX = "PROXY_"
SAMPLE_ROOT = str(Path(__file__).parent / "sample")

Storage = Literal["local", "cos"]
Mode = Literal["stream", "redirect"]
Scheme = Literal["http", "https"]
LogLevel = Literal["debug", "info", "warning", "error"]
ResolverKind = Literal["template", "sql"]


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names its environment variable."""


def _secret() -> Any:
    return field(default="", repr=False, metadata={"secret": True})


@dataclass(frozen=True, slots=True)
class Config:
    # Public listener and process model.
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    log_level: LogLevel = "info"
    access_log: bool = True

    # The internal listener (/metrics, /healthz, /readyz): never the public port. 0 = any free port.
    internal_host: str = "127.0.0.1"
    internal_port: int = 9090
    # prometheus-client's multiprocess directory for `--workers N` (a fresh temp dir if empty).
    metrics_dir: str = ""

    # Where objects live and how ids become keys.
    storage: Storage = "local"
    local_root: str = SAMPLE_ROOT
    key_template: str = "images/{id}"
    id_max_length: int = 256
    # `sql`: ids are looked up in the application's PostgreSQL (README, "Database resolver"); the
    # key it returns must still stay under PROXY_KEY_TEMPLATE's prefix. Needs the `postgres` extra.
    resolver: ResolverKind = "template"
    sql_dsn: str = _secret()  # postgresql://user:password@host:5432/db
    sql_query: str = ""  # e.g. SELECT cos_key FROM images WHERE id = $1 AND deleted_at IS NULL
    sql_pool_min: int = 1
    sql_pool_size: int = 10
    sql_timeout: float = 1.0  # connect, pool wait and statement, seconds

    # COS (used when storage == "cos").
    cos_secret_id: str = _secret()
    cos_secret_key: str = _secret()
    cos_token: str = _secret()
    cos_credential_expires_at: float = 0.0
    cos_region: str = ""
    cos_bucket: str = ""
    cos_scheme: Scheme = "https"
    cos_domain: str = ""

    # Presigned URLs and the cache tiers in front of them.
    sign_expires: int = 3600
    expiry_margin: int = 300
    lru_size: int = 100_000
    lru_ttl: float = 60.0
    negative_ttl: float = 30.0
    redis_url: str = field(default="", repr=False, metadata={"secret": True})
    redis_prefix: str = "ps:"
    redis_timeout: float = 0.1
    redis_backoff: float = 2.0
    redis_cluster: bool = False

    # The refresher, and the index/access records the proxy keeps for it in Redis.
    refresh_threshold: int = 0  # 0: halfway between signing and the expiry margin
    refresh_interval: float = 5.0
    refresh_batch: int = 200
    refresh_concurrency: int = 16
    refresh_lease: float = 60.0
    refresh_idle: float = 86_400.0
    refresh_drain_timeout: float = 10.0
    refresh_heartbeat_file: str = "/tmp/proxy-service-refresher.alive"
    access_flush_interval: float = 10.0

    # How responses are produced.
    mode: Mode = "stream"
    allow_mode_override: bool = False
    cache_control: str = "public, max-age=86400"
    not_found_max_age: int = 60
    redirect_max_age: int = 300

    # A bounded in-process cache of small hot objects (0 bytes: off).
    object_cache_size: int = 64 * 1024 * 1024
    object_cache_max_object: int = 256 * 1024
    object_cache_ttl: float = 10.0

    # The pooled upstream client.
    upstream_pool_size: int = 256
    upstream_connect_timeout: float = 3.0
    upstream_read_timeout: float = 15.0
    upstream_retries: int = 2
    upstream_read_size: int = 262_144

    # Security (README, Security): signed stable URLs, object size and concurrency limits.
    signing_keys: str = _secret()  # "new,old,...": the first signs, all verify; empty: unsigned
    max_object_size: int = 0  # bytes; 0: unlimited
    max_in_flight: int = 1024  # concurrent origin requests per process; 0: unlimited

    @classmethod
    def load(cls, env: Mapping[str, str], overrides: Mapping[str, object] | None = None) -> Config:
        """Build from `PROXY_*` variables, then CLI overrides (already typed), then validate."""
        hints = get_type_hints(cls)
        values: dict[str, object] = {}
        for f in fields(cls):
            name = ENV_PREFIX + f.name.upper()
            if name in env:
                values[f.name] = _parse(name, env[name], hints[f.name])
        for key, value in (overrides or {}).items():
            if value is not None:
                values[key] = value
        config = cls(**values)  # type: ignore[arg-type]
        config.validate()
        return config

    def validate(self) -> None:
        def need(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"{ENV_PREFIX}{key.upper()}: {why}")

        need(0 < self.port < 65536, "port", "must be a TCP port (1-65535)")
        need(self.workers >= 1, "workers", "must be at least 1")
        need(0 <= self.internal_port < 65536, "internal_port", "must be a TCP port or 0")
        need(
            self.internal_port != self.port,
            "internal_port",
            "must differ from PROXY_PORT: metrics and probes never share the public listener",
        )
        need(
            self.key_template.count("{id}") == 1,
            "key_template",
            "must contain '{id}' exactly once",
        )
        prefix = self.key_template.split("{id}", 1)[0]
        need(
            not prefix.startswith("/") and ".." not in prefix.split("/"),
            "key_template",
            "must not start with '/' or contain '..'",
        )
        # Checked here, not per request: `resolvers.check_key` would refuse every key.
        suffix = self.key_template.split("{id}", 1)[1]
        need(
            not any(part in ("", ".", "..") for part in suffix.split("/")[1:]),
            "key_template",
            "must not have an empty, '.' or '..' segment after '{id}'",
        )
        need(8 <= self.id_max_length <= 1024, "id_max_length", "must be 8-1024")
        if self.storage == "local":
            need(Path(self.local_root).is_dir(), "local_root", "is not a directory")
            need(
                self.mode == "stream",
                "mode",
                "redirect mode is unavailable with local storage (there is no URL "
                "to redirect to); use PROXY_STORAGE=cos",
            )
        else:
            for key in ("cos_secret_id", "cos_secret_key", "cos_bucket"):
                need(bool(getattr(self, key)), key, "is required when PROXY_STORAGE=cos")
            need(
                bool(self.cos_region or self.cos_domain),
                "cos_region",
                "is required when PROXY_STORAGE=cos (or set PROXY_COS_DOMAIN)",
            )
            need(
                not re.search(r"[/\s]", self.cos_domain),
                "cos_domain",
                "must be a host[:port] without scheme or path",
            )
        if self.resolver == "sql":
            # Messages never quote the DSN: it holds the database password.
            need(bool(self.sql_dsn), "sql_dsn", "is required when PROXY_RESOLVER=sql")
            need(
                self.sql_dsn.startswith(("postgresql://", "postgres://")),
                "sql_dsn",
                "must be a postgresql:// URL",
            )
            need(bool(self.sql_query.strip()), "sql_query", "is required when PROXY_RESOLVER=sql")
            need(
                _installed("asyncpg"),
                "resolver",
                "sql needs asyncpg: pip install 'proxy-service[postgres]'",
            )
        need(1 <= self.sql_pool_size <= 1000, "sql_pool_size", "must be 1-1000")
        need(
            0 <= self.sql_pool_min <= self.sql_pool_size,
            "sql_pool_min",
            "must be 0-PROXY_SQL_POOL_SIZE",
        )
        need(0 < self.sql_timeout <= 60, "sql_timeout", "must be in (0, 60] seconds")
        need(self.sign_expires >= 60, "sign_expires", "must be at least 60 seconds")
        need(
            0 <= self.expiry_margin < self.sign_expires // 2,
            "expiry_margin",
            "must be >= 0 and less than half of PROXY_SIGN_EXPIRES",
        )
        need(self.lru_size >= 0, "lru_size", "must be >= 0")
        need(self.lru_ttl > 0, "lru_ttl", "must be > 0")
        need(self.negative_ttl >= 0, "negative_ttl", "must be >= 0")
        need(
            not self.redis_url or self.redis_url.startswith(("redis://", "rediss://", "unix://")),
            "redis_url",
            "must start with redis://, rediss:// or unix://",
        )
        need(0 < self.redis_timeout <= 5, "redis_timeout", "must be in (0, 5] seconds")
        need(self.redis_backoff >= 0, "redis_backoff", "must be >= 0")
        need(
            self.refresh_threshold == 0
            or self.expiry_margin < self.refresh_threshold < self.sign_expires,
            "refresh_threshold",
            "must be above PROXY_EXPIRY_MARGIN and below PROXY_SIGN_EXPIRES",
        )
        need(self.refresh_interval > 0, "refresh_interval", "must be > 0")
        need(1 <= self.refresh_batch <= 10_000, "refresh_batch", "must be 1-10000")
        need(1 <= self.refresh_concurrency <= 1000, "refresh_concurrency", "must be 1-1000")
        need(self.refresh_lease > 0, "refresh_lease", "must be > 0")
        need(self.refresh_idle > 0, "refresh_idle", "must be > 0")
        need(self.refresh_drain_timeout >= 0, "refresh_drain_timeout", "must be >= 0")
        need(
            0 < self.access_flush_interval < self.refresh_idle,
            "access_flush_interval",
            "must be > 0 and below PROXY_REFRESH_IDLE",
        )
        need(
            "\n" not in self.cache_control and "\r" not in self.cache_control,
            "cache_control",
            "must be a single header line",
        )
        need(self.not_found_max_age >= 0, "not_found_max_age", "must be >= 0")
        need(self.redirect_max_age >= 0, "redirect_max_age", "must be >= 0")
        need(self.object_cache_size >= 0, "object_cache_size", "must be >= 0 (0: off)")
        need(
            self.object_cache_max_object > 0
            and (
                not self.object_cache_size or self.object_cache_max_object <= self.object_cache_size
            ),
            "object_cache_max_object",
            "must be > 0 and at most PROXY_OBJECT_CACHE_SIZE",
        )
        need(self.object_cache_ttl >= 0, "object_cache_ttl", "must be >= 0")
        need(self.upstream_pool_size >= 1, "upstream_pool_size", "must be at least 1")
        need(self.upstream_connect_timeout > 0, "upstream_connect_timeout", "must be > 0")
        need(self.upstream_read_timeout > 0, "upstream_read_timeout", "must be > 0")
        need(0 <= self.upstream_retries <= 5, "upstream_retries", "must be 0-5")
        need(self.upstream_read_size >= 4096, "upstream_read_size", "must be >= 4096")
        keys = self.signing_keys.split(",") if self.signing_keys.strip() else []
        need(
            all(len(k.strip()) >= 16 for k in keys),
            "signing_keys",
            "every comma-separated key must be at least 16 characters",
        )
        need(self.max_object_size >= 0, "max_object_size", "must be >= 0 (0: unlimited)")
        need(self.max_in_flight >= 0, "max_in_flight", "must be >= 0 (0: unlimited)")

    @property
    def refresh_before(self) -> int:
        """Seconds before a URL's expiry at which the refresher re-signs it."""
        if self.refresh_threshold:
            return self.refresh_threshold
        return self.expiry_margin + (self.sign_expires - self.expiry_margin) // 2

    @property
    def key_prefix(self) -> str:
        return self.key_template.split("{id}", 1)[0]

    def redacted(self) -> dict[str, object]:
        """The settings as a dict, with every secret replaced: safe to log."""
        out: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = "***" if f.metadata.get("secret") and value else value
        return out

    def to_env(self) -> dict[str, str]:
        """The inverse of `load`: lets `serve --workers N` hand CLI flags to worker processes."""
        out: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                value = "true" if value else "false"
            out[ENV_PREFIX + f.name.upper()] = str(value)
        return out

    def replace(self, **changes: Any) -> Config:
        config = dataclasses.replace(self, **changes)
        config.validate()
        return config


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # in sys.modules as None: imports of it are blocked
        return False


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse(name: str, raw: str, hint: Any) -> object:
    raw = raw.strip()
    try:
        if hint is bool:
            if raw.lower() in _TRUE:
                return True
            if raw.lower() in _FALSE:
                return False
            raise ValueError
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected {hint.__name__}, got {raw!r}") from None
    choices = get_args(hint)
    if choices and raw not in choices:
        raise ConfigError(f"{name}: must be one of {', '.join(choices)}; got {raw!r}")
    return raw

"""`Config.load` (env + overrides + validation), secrets redaction, `to_env`, and the CLI parser."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import fields
from pathlib import Path

import pytest

from proxy_service.cli import build_parser, main
from proxy_service.config import ENV_PREFIX, SAMPLE_ROOT, Config, ConfigError

COS_ENV = {
    "PROXY_STORAGE": "cos",
    "PROXY_COS_SECRET_ID": "AKIDexample",
    "PROXY_COS_SECRET_KEY": "s3cr3t-key-value",
    "PROXY_COS_BUCKET": "images-1250000000",
    "PROXY_COS_REGION": "ap-guangzhou",
}


@pytest.fixture(autouse=True)
def _clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """`main` reads `os.environ`: keep the developer's or CI's PROXY_* settings out of it."""
    for name in list(os.environ):
        if name.startswith("PROXY_"):
            monkeypatch.delenv(name)


# --- defaults ---------------------------------------------------------------------------------


def test_defaults_load_and_validate() -> None:
    config = Config.load({})
    assert config == Config()
    config.validate()
    assert config.storage == "local"
    assert config.mode == "stream"
    assert config.key_prefix == "images/"


def test_default_local_root_is_the_bundled_sample_dir() -> None:
    config = Config.load({})
    assert config.local_root == SAMPLE_ROOT
    root = Path(config.local_root)
    assert root.is_dir()
    assert (root / "images" / "sample.png").is_file()


def test_unrelated_env_vars_are_ignored() -> None:
    config = Config.load({"PORT": "1", "HOME": "/nowhere", "PROXY_NOT_A_FIELD": "x"})
    assert config == Config()


# --- env parsing ------------------------------------------------------------------------------


def test_env_parses_ints_floats_and_strings() -> None:
    config = Config.load(
        {
            "PROXY_PORT": " 9000 ",
            "PROXY_WORKERS": "4",
            "PROXY_LRU_TTL": "2.5",
            "PROXY_REDIS_TIMEOUT": "0.05",
            "PROXY_COS_CREDENTIAL_EXPIRES_AT": "1700000000.25",
            "PROXY_REDIS_PREFIX": "img:",
            "PROXY_KEY_TEMPLATE": "originals/{id}.png",
        }
    )
    assert config.port == 9000
    assert config.workers == 4
    assert config.lru_ttl == 2.5
    assert config.redis_timeout == 0.05
    assert config.cos_credential_expires_at == 1700000000.25
    assert config.redis_prefix == "img:"
    assert config.key_template == "originals/{id}.png"
    assert config.key_prefix == "originals/"


@pytest.mark.parametrize("raw", ["1", "true", "TRUE", "yes", "On", " true "])
def test_env_parses_true_booleans(raw: str) -> None:
    assert Config.load({"PROXY_ALLOW_MODE_OVERRIDE": raw}).allow_mode_override is True


@pytest.mark.parametrize("raw", ["0", "false", "False", "no", "OFF"])
def test_env_parses_false_booleans(raw: str) -> None:
    config = Config.load({"PROXY_ALLOW_MODE_OVERRIDE": raw})
    assert config.allow_mode_override is False


def test_env_parses_literals() -> None:
    config = Config.load({**COS_ENV, "PROXY_MODE": "redirect", "PROXY_COS_SCHEME": "http"})
    assert config.storage == "cos"
    assert config.mode == "redirect"
    assert config.cos_scheme == "http"
    assert Config.load({"PROXY_LOG_LEVEL": "debug"}).log_level == "debug"


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("PROXY_PORT", "abc"),
        ("PROXY_PORT", "80.5"),
        ("PROXY_WORKERS", ""),
        ("PROXY_LRU_TTL", "soon"),
        ("PROXY_UPSTREAM_RETRIES", "two"),
        ("PROXY_ALLOW_MODE_OVERRIDE", "maybe"),
        ("PROXY_ALLOW_MODE_OVERRIDE", ""),
        ("PROXY_MODE", "proxy"),
        ("PROXY_STORAGE", "s3"),
        ("PROXY_LOG_LEVEL", "verbose"),
        ("PROXY_COS_SCHEME", "ftp"),
    ],
)
def test_unparsable_env_value_names_the_variable(name: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=f"^{name}: "):
        Config.load({name: raw})


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"PROXY_PORT": "0"}, "PROXY_PORT"),
        ({"PROXY_PORT": "65536"}, "PROXY_PORT"),
        ({"PROXY_WORKERS": "0"}, "PROXY_WORKERS"),
        ({"PROXY_KEY_TEMPLATE": "images/"}, "PROXY_KEY_TEMPLATE"),
        ({"PROXY_KEY_TEMPLATE": "{id}/{id}"}, "PROXY_KEY_TEMPLATE"),
        ({"PROXY_KEY_TEMPLATE": "/images/{id}"}, "PROXY_KEY_TEMPLATE"),
        ({"PROXY_KEY_TEMPLATE": "../images/{id}"}, "PROXY_KEY_TEMPLATE"),
        ({"PROXY_KEY_TEMPLATE": "images/../{id}"}, "PROXY_KEY_TEMPLATE"),
        ({"PROXY_KEY_TEMPLATE": "images/{id}/../../etc"}, "PROXY_KEY_TEMPLATE"),
        ({"PROXY_KEY_TEMPLATE": "images/{id}/"}, "PROXY_KEY_TEMPLATE"),
        ({"PROXY_KEY_TEMPLATE": "images/{id}/./x.png"}, "PROXY_KEY_TEMPLATE"),
        ({"PROXY_ID_MAX_LENGTH": "7"}, "PROXY_ID_MAX_LENGTH"),
        ({"PROXY_ID_MAX_LENGTH": "1025"}, "PROXY_ID_MAX_LENGTH"),
        ({"PROXY_LOCAL_ROOT": "/definitely/not/a/dir"}, "PROXY_LOCAL_ROOT"),
        ({"PROXY_MODE": "redirect"}, "PROXY_MODE"),
        ({**COS_ENV, "PROXY_COS_SECRET_ID": ""}, "PROXY_COS_SECRET_ID"),
        ({**COS_ENV, "PROXY_COS_SECRET_KEY": ""}, "PROXY_COS_SECRET_KEY"),
        ({**COS_ENV, "PROXY_COS_BUCKET": ""}, "PROXY_COS_BUCKET"),
        ({**COS_ENV, "PROXY_COS_REGION": ""}, "PROXY_COS_REGION"),
        ({**COS_ENV, "PROXY_COS_DOMAIN": "https://cos.example.com"}, "PROXY_COS_DOMAIN"),
        ({**COS_ENV, "PROXY_COS_DOMAIN": "cos.example.com/path"}, "PROXY_COS_DOMAIN"),
        ({"PROXY_SIGN_EXPIRES": "59"}, "PROXY_SIGN_EXPIRES"),
        ({"PROXY_EXPIRY_MARGIN": "1800"}, "PROXY_EXPIRY_MARGIN"),
        ({"PROXY_EXPIRY_MARGIN": "-1"}, "PROXY_EXPIRY_MARGIN"),
        ({"PROXY_SIGN_EXPIRES": "600", "PROXY_EXPIRY_MARGIN": "300"}, "PROXY_EXPIRY_MARGIN"),
        ({"PROXY_LRU_SIZE": "-1"}, "PROXY_LRU_SIZE"),
        ({"PROXY_LRU_TTL": "0"}, "PROXY_LRU_TTL"),
        ({"PROXY_NEGATIVE_TTL": "-0.5"}, "PROXY_NEGATIVE_TTL"),
        ({"PROXY_REDIS_URL": "http://cache:6379/0"}, "PROXY_REDIS_URL"),
        ({"PROXY_REDIS_URL": "cache:6379"}, "PROXY_REDIS_URL"),
        ({"PROXY_REDIS_TIMEOUT": "0"}, "PROXY_REDIS_TIMEOUT"),
        ({"PROXY_REDIS_TIMEOUT": "5.5"}, "PROXY_REDIS_TIMEOUT"),
        ({"PROXY_REDIS_BACKOFF": "-1"}, "PROXY_REDIS_BACKOFF"),
        ({"PROXY_CACHE_CONTROL": "public\r\nSet-Cookie: a=b"}, "PROXY_CACHE_CONTROL"),
        ({"PROXY_NOT_FOUND_MAX_AGE": "-1"}, "PROXY_NOT_FOUND_MAX_AGE"),
        ({"PROXY_REDIRECT_MAX_AGE": "-1"}, "PROXY_REDIRECT_MAX_AGE"),
        ({"PROXY_UPSTREAM_POOL_SIZE": "0"}, "PROXY_UPSTREAM_POOL_SIZE"),
        ({"PROXY_UPSTREAM_CONNECT_TIMEOUT": "0"}, "PROXY_UPSTREAM_CONNECT_TIMEOUT"),
        ({"PROXY_UPSTREAM_READ_TIMEOUT": "-1"}, "PROXY_UPSTREAM_READ_TIMEOUT"),
        ({"PROXY_UPSTREAM_RETRIES": "6"}, "PROXY_UPSTREAM_RETRIES"),
        ({"PROXY_UPSTREAM_RETRIES": "-1"}, "PROXY_UPSTREAM_RETRIES"),
        ({"PROXY_UPSTREAM_READ_SIZE": "4095"}, "PROXY_UPSTREAM_READ_SIZE"),
    ],
)
def test_validation_error_names_the_variable(env: dict[str, str], name: str) -> None:
    with pytest.raises(ConfigError, match=f"^{name}: "):
        Config.load(env)


def test_redirect_with_local_storage_points_at_cos() -> None:
    with pytest.raises(ConfigError) as info:
        Config.load({"PROXY_MODE": "redirect"})
    assert "PROXY_STORAGE=cos" in str(info.value)


@pytest.mark.parametrize(
    "env",
    [
        {"PROXY_PORT": "1"},
        {"PROXY_PORT": "65535"},
        {"PROXY_ID_MAX_LENGTH": "8"},
        {"PROXY_ID_MAX_LENGTH": "1024"},
        {"PROXY_EXPIRY_MARGIN": "1799"},
        {"PROXY_EXPIRY_MARGIN": "0"},
        {"PROXY_SIGN_EXPIRES": "60", "PROXY_EXPIRY_MARGIN": "29"},
        {"PROXY_REDIS_URL": "redis://:pw@cache:6379/0"},
        {"PROXY_REDIS_URL": "rediss://cache:6380/1"},
        {"PROXY_REDIS_URL": "unix:///run/redis.sock"},
        {"PROXY_REDIS_TIMEOUT": "5"},
        {"PROXY_UPSTREAM_RETRIES": "0"},
        {"PROXY_UPSTREAM_RETRIES": "5"},
        {"PROXY_UPSTREAM_READ_SIZE": "4096"},
        {"PROXY_KEY_TEMPLATE": "{id}"},
        {"PROXY_KEY_TEMPLATE": "a/b/{id}.webp"},
        {"PROXY_KEY_TEMPLATE": "images/{id}/original.png"},
        {"PROXY_KEY_TEMPLATE": "images/{id}..png"},
        {**COS_ENV, "PROXY_MODE": "redirect"},
        {**COS_ENV, "PROXY_COS_REGION": "", "PROXY_COS_DOMAIN": "127.0.0.1:9000"},
    ],
)
def test_boundary_values_are_accepted(env: dict[str, str]) -> None:
    Config.load(env)


def test_cos_storage_does_not_need_a_local_root() -> None:
    config = Config.load({**COS_ENV, "PROXY_LOCAL_ROOT": "/definitely/not/a/dir"})
    assert config.storage == "cos"


def test_replace_validates() -> None:
    config = Config.load({})
    assert config.replace(port=9999).port == 9999
    with pytest.raises(ConfigError, match=r"^PROXY_PORT: "):
        config.replace(port=0)


def test_config_is_frozen() -> None:
    config = Config.load({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1  # type: ignore[misc]


# --- overrides --------------------------------------------------------------------------------


def test_overrides_beat_env() -> None:
    env = {"PROXY_PORT": "9000", "PROXY_REDIS_PREFIX": "env:", "PROXY_LRU_TTL": "5"}
    config = Config.load(env, {"port": 9100, "redis_prefix": "cli:"})
    assert config.port == 9100
    assert config.redis_prefix == "cli:"
    assert config.lru_ttl == 5.0  # not overridden: env still applies


def test_none_overrides_leave_env_alone() -> None:
    config = Config.load({"PROXY_PORT": "9000"}, {"port": None, "workers": None})
    assert config.port == 9000
    assert config.workers == 1


def test_overrides_can_fix_a_bad_env_value() -> None:
    config = Config.load({"PROXY_MODE": "redirect"}, {"mode": "stream"})
    assert config.mode == "stream"


def test_overrides_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"^PROXY_UPSTREAM_RETRIES: "):
        Config.load({}, {"upstream_retries": 9})


# --- secrets ----------------------------------------------------------------------------------

SECRETS = {
    "cos_secret_id": "AKIDsecretidvalue",
    "cos_secret_key": "SECRETKEYdonotlog",
    "cos_token": "STStokenDONOTLOG",
    "redis_url": "redis://user:hunter2passw0rd@cache:6379/0",
}
SECRET_FRAGMENTS = ["AKIDsecretidvalue", "SECRETKEYdonotlog", "STStokenDONOTLOG", "hunter2passw0rd"]


def _secret_config() -> Config:
    return Config.load(
        {**COS_ENV, **{"PROXY_" + name.upper(): value for name, value in SECRETS.items()}}
    )


def test_redacted_hides_every_secret() -> None:
    config = _secret_config()
    out = config.redacted()
    text = str(out)
    for fragment in SECRET_FRAGMENTS:
        assert fragment not in text
    for name in SECRETS:
        assert out[name] == "***"
    # Non-secrets are all there, unchanged.
    assert out["cos_bucket"] == COS_ENV["PROXY_COS_BUCKET"]
    assert out["port"] == 8080
    assert set(out) == {f.name for f in fields(Config)}


def test_redacted_leaves_empty_secrets_empty() -> None:
    out = Config.load({}).redacted()
    assert out["cos_secret_key"] == ""
    assert out["redis_url"] == ""


def test_repr_and_str_hide_every_secret() -> None:
    config = _secret_config()
    for text in (repr(config), str(config), f"{config}"):
        for fragment in SECRET_FRAGMENTS:
            assert fragment not in text
    assert "images-1250000000" in repr(config)


def test_secrets_have_no_cli_flag_but_load_from_env() -> None:
    config = _secret_config()
    for name, value in SECRETS.items():
        assert getattr(config, name) == value


# --- to_env -----------------------------------------------------------------------------------


def test_to_env_round_trips_defaults() -> None:
    config = Config.load({})
    env = config.to_env()
    assert all(name.startswith("PROXY_") for name in env)
    assert all(isinstance(value, str) for value in env.values())
    assert Config.load(env) == config


def test_to_env_round_trips_every_kind_of_field(tmp_path: Path) -> None:
    config = Config.load(
        {**COS_ENV, "PROXY_COS_DOMAIN": "cos.internal:9000"},
        {
            "host": "0.0.0.0",
            "port": 9443,
            "workers": 3,
            "log_level": "warning",
            "local_root": str(tmp_path),
            "key_template": "originals/{id}.jpg",
            "cos_token": "tok",
            "cos_credential_expires_at": 1712345678.123456,
            "cos_scheme": "http",
            "lru_ttl": 0.1,
            "redis_url": "rediss://:pw@cache:6380/2",
            "mode": "redirect",
            "allow_mode_override": True,
            "cache_control": "public, max-age=600, immutable",
            "upstream_retries": 0,
        },
    )
    env = config.to_env()
    assert env["PROXY_ALLOW_MODE_OVERRIDE"] == "true"
    assert Config.load(env) == config


def test_to_env_round_trips_false_boolean() -> None:
    config = Config.load({}, {"allow_mode_override": False})
    assert config.to_env()["PROXY_ALLOW_MODE_OVERRIDE"] == "false"
    assert Config.load(config.to_env()).allow_mode_override is False


# --- CLI --------------------------------------------------------------------------------------


def test_cli_has_a_flag_for_every_non_secret_field() -> None:
    parser = build_parser()
    defaults = Config()
    env = defaults.to_env()
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.metadata.get("secret"):
            continue
        args = parser.parse_args(["serve", flag, env["PROXY_" + f.name.upper()]])
        assert getattr(args, f.name) == getattr(defaults, f.name), flag


def test_cli_flags_are_typed() -> None:
    args = build_parser().parse_args(
        [
            "serve",
            "--redis-prefix",
            "x:",
            "--upstream-retries",
            "3",
            "--lru-ttl",
            "1.5",
            "--allow-mode-override",
            "yes",
            "--mode",
            "redirect",
        ]
    )
    assert args.command == "serve"
    assert args.redis_prefix == "x:"
    assert args.upstream_retries == 3
    assert args.lru_ttl == 1.5
    assert args.allow_mode_override is True
    assert args.mode == "redirect"
    assert args.port is None  # unset flags do not override the environment


@pytest.mark.parametrize(
    ("argv", "name"),
    [
        (["--upstream-retries", "many"], "PROXY_UPSTREAM_RETRIES"),
        (["--port", "http"], "PROXY_PORT"),
        (["--mode", "proxy"], "PROXY_MODE"),
        (["--allow-mode-override", "perhaps"], "PROXY_ALLOW_MODE_OVERRIDE"),
        (["--redis-timeout", "fast"], "PROXY_REDIS_TIMEOUT"),
    ],
)
def test_bad_flag_value_exits_naming_the_variable(
    argv: list[str], name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["serve", *argv])
    assert info.value.code == 2
    assert name in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag", ["--cos-secret-key", "--cos-secret-id", "--cos-token", "--redis-url"]
)
def test_no_flag_for_secrets(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["serve", flag, "leaked-value"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err


def test_help_lists_flags_but_not_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["serve", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--redis-prefix" in out
    assert "--upstream-retries" in out
    for secret in ("--cos-secret-key", "--cos-secret-id", "--cos-token", "--redis-url"):
        assert secret not in out


def test_main_reports_invalid_flag_value_with_key_name(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["serve", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "PROXY_PORT" in err
    assert "configuration error" in err


def test_main_reports_invalid_environment_with_key_name(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PROXY_STORAGE", "cos")
    monkeypatch.setenv("PROXY_COS_SECRET_KEY", "SECRETKEYdonotlog")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "PROXY_COS_SECRET_ID" in err
    assert "SECRETKEYdonotlog" not in err


def test_main_flag_overrides_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A valid environment port is overridden by an invalid flag: the flag is what gets checked.
    monkeypatch.setenv("PROXY_PORT", "9000")
    assert main(["serve", "--port", "70000"]) == 2
    assert "PROXY_PORT" in capsys.readouterr().err


def test_readme_documents_every_setting() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = [
        ENV_PREFIX + f.name.upper()
        for f in dataclasses.fields(Config)
        if ENV_PREFIX + f.name.upper() not in readme
    ]
    assert missing == [], f"README's Configuration table lacks {missing}"

"""load_config: layering, TOML sections, env parsing, and that every bad
value names its dotted key."""
import os

import pytest

from broker.config import ENV_VARS, Config, Namespace, load_config
from broker.errors import ConfigError


@pytest.fixture
def toml(tmp_path):
    def write(text: str) -> str:
        path = tmp_path / "broker.toml"
        path.write_text(text)
        return str(path)
    return write


def error_of(*args, **kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    return info.value


def test_defaults():
    config = load_config()
    assert config == Config()
    assert (config.host, config.port, config.redis_url) == ("127.0.0.1", 8765, None)
    assert config.shards == (os.cpu_count() or 1)
    assert config.api_key is None and config.allow_anonymous is False
    assert set(config.namespaces) == {"bill", "user"}
    assert config.namespaces["user"].subscribe == "owner"


def test_layers_file_env_flags(toml):
    path = toml('host = "0.0.0.0"\nport = 1000\nshards = 3\napi_key = "file"\n')
    assert load_config(path).port == 1000
    config = load_config(path, env={"BROKER_PORT": "2000", "BROKER_API_KEY": "env"})
    assert (config.host, config.port, config.shards, config.api_key) == ("0.0.0.0", 2000, 3, "env")
    config = load_config(path, env={"BROKER_PORT": "2000", "BROKER_API_KEY": "env"},
                         flags={"port": "3000"})
    assert (config.port, config.api_key, config.shards) == (3000, "env", 3)


def test_flags_not_given_do_not_override(toml):
    path = toml("port = 1000\n")
    assert load_config(path, flags={"port": None}).port == 1000


def test_flags_typed_or_text_and_redis_alias():
    config = load_config(flags={"port": 0, "shards": "2", "allow_anonymous": True,
                                "redis": "redis://localhost:6379/0", "drain_timeout": "2.5"})
    assert (config.port, config.shards, config.allow_anonymous) == (0, 2, True)
    assert config.redis_url == "redis://localhost:6379/0"
    assert config.drain_timeout == 2.5


def test_env_parsing():
    env = {"BROKER_HOST": "::1", "BROKER_PORT": "0", "BROKER_SHARDS": "4",
           "BROKER_JWT_SECRET": "s3", "BROKER_REDIS_URL": "unix:///tmp/redis.sock",
           "BROKER_MEMORY_LIMIT_MB": "512", "BROKER_DRAIN_TIMEOUT": "3",
           "BROKER_LOG_LEVEL": "DEBUG", "BROKER_URL": "ignored", "BROKER_PURE_PYTHON": "1",
           "BROKER_COMPRESSION": "off", "BROKER_FLUSH_INTERVAL": "0.002"}
    config = load_config(env=env)
    assert config.host == "::1" and config.port == 0 and config.shards == 4
    assert config.jwt_secret == "s3" and config.redis_url == "unix:///tmp/redis.sock"
    assert config.memory_limit_mb == 512 and config.drain_timeout == 3.0
    assert config.log_level == "debug" and config.compression is False
    assert config.flush_interval == 0.002


@pytest.mark.parametrize("text, value", [("1", True), ("true", True), ("YES", True), ("on", True),
                                         ("0", False), ("false", False), ("no", False), ("Off", False)])
def test_env_booleans(text, value):
    assert load_config(env={"BROKER_ALLOW_ANONYMOUS": text}).allow_anonymous is value


def test_empty_env_value_is_unset(toml):
    assert load_config(toml("port = 1000\n"), env={"BROKER_PORT": ""}).port == 1000


def test_env_vars_cover_documented_names():
    for name in ("BROKER_HOST", "BROKER_PORT", "BROKER_SHARDS", "BROKER_API_KEY", "BROKER_JWT_SECRET",
                 "BROKER_ALLOW_ANONYMOUS", "BROKER_REDIS_URL", "BROKER_MEMORY_LIMIT_MB",
                 "BROKER_DRAIN_TIMEOUT", "BROKER_LOG_LEVEL"):
        assert name in ENV_VARS


def test_sections(toml):
    path = toml("""
[limits]
max_message_size = 1024
bad_command_window = 2

[jwt]
require_exp = false
algorithms = ["HS256", "HS512"]
leeway = 5

[namespaces.bill]
history_size = 3

[namespaces.room-1]
history_ttl = 0
subscribe = "authenticated"
client_publish = true
""")
    config = load_config(path)
    assert config.limits.max_message_size == 1024
    assert config.limits.bad_command_window == 2.0
    assert config.limits.max_body_size == 1 << 20
    assert config.jwt.require_exp is False and config.jwt.algorithms == ("HS256", "HS512")
    assert config.jwt.leeway == 5.0
    # A built-in namespace keeps its other defaults.
    assert config.namespaces["bill"] == Namespace("bill", history_size=3, subscribe="public")
    assert config.namespaces["user"].subscribe == "owner"
    assert config.namespaces["room-1"] == Namespace("room-1", history_ttl=0.0, subscribe="authenticated",
                                                    client_publish=True)


def test_cluster_sweep_interval(toml):
    assert load_config().cluster.sweep_interval == 30.0
    config = load_config(toml("[cluster]\nsweep_interval = 0.25\n"))
    assert config.cluster.sweep_interval == 0.25
    assert Config.from_dict(config.to_dict()).cluster.sweep_interval == 0.25  # reaches the shards


def test_public_key_file(toml, tmp_path):
    pem = "-----BEGIN PUBLIC KEY-----\nabc\n-----END PUBLIC KEY-----\n"
    (tmp_path / "key.pem").write_text(pem)
    config = load_config(toml(f'[jwt]\npublic_key_file = "{tmp_path / "key.pem"}"\n'))
    assert config.jwt.public_key == pem
    assert error_of(toml('[jwt]\npublic_key_file = "/nonexistent/key.pem"\n')).key == "jwt.public_key_file"


def test_namespace_for():
    config = load_config()
    assert config.namespace_for("bill:42").name == "bill"
    assert config.namespace_for("user:7:x").name == "user"
    assert config.namespace_for("room:1") is None
    assert config.namespace_for("bill") is None


@pytest.mark.parametrize("text, key", [
    ('port = "8765"', "port"),
    ("port = 65536", "port"),
    ("port = -1", "port"),
    ("port = true", "port"),
    ("shards = 0", "shards"),
    ("shards = 1.5", "shards"),
    ('host = ""', "host"),
    ("host = 1", "host"),
    ('api_key = ""', "api_key"),
    ("jwt_secret = 5", "jwt_secret"),
    ('allow_anonymous = "yes"', "allow_anonymous"),
    ('redis_url = "http://localhost"', "redis_url"),
    ('redis_url = "localhost:6379"', "redis_url"),
    ("memory_limit_mb = 0", "memory_limit_mb"),
    ("drain_timeout = -1", "drain_timeout"),
    ('drain_timeout = "soon"', "drain_timeout"),
    ("flush_interval = -0.1", "flush_interval"),
    ("compression = 1", "compression"),
    ('log_level = "loud"', "log_level"),
    ("nonsense = 1", "nonsense"),
    ("limits = 3", "limits"),
    ("[limits]\nmax_message_size = 0", "limits.max_message_size"),
    ("[limits]\nmax_body_size = -5", "limits.max_body_size"),
    ("[limits]\nhandshake_timeout = 0", "limits.handshake_timeout"),
    ('[limits]\nmax_connections = "many"', "limits.max_connections"),
    ("[limits]\nunknown = 1", "limits.unknown"),
    ('[jwt]\nrequire_exp = "no"', "jwt.require_exp"),
    ('[jwt]\nalgorithms = ["none"]', "jwt.algorithms"),
    ("[jwt]\nalgorithms = []", "jwt.algorithms"),
    ('[jwt]\nalgorithms = ["RS256"]', "jwt.algorithms"),
    ('[jwt]\npublic_key = "not a pem"', "jwt.public_key"),
    ("[jwt]\nleeway = -1", "jwt.leeway"),
    ("[jwt]\nissuer = 1", "jwt.issuer"),
    ("[cluster]\nsweep_interval = 0", "cluster.sweep_interval"),
    ("[cluster]\nsweep_interval = -1", "cluster.sweep_interval"),
    ('[cluster]\nsweep_interval = "30s"', "cluster.sweep_interval"),
    ("[cluster]\nsweep_interval = nan", "cluster.sweep_interval"),
    ("[namespaces.bill]\nhistory_size = 0", "namespaces.bill.history_size"),
    ("[namespaces.bill]\nhistory_ttl = -1", "namespaces.bill.history_ttl"),
    ('[namespaces.bill]\nsubscribe = "friends"', "namespaces.bill.subscribe"),
    ('[namespaces.bill]\nclient_publish = "yes"', "namespaces.bill.client_publish"),
    ("[namespaces.bill]\ncolour = 1", "namespaces.bill.colour"),
    ('[namespaces."bad name"]\nhistory_size = 1', "namespaces.bad name"),
    ('[namespaces."a:b"]\nhistory_size = 1', "namespaces.a:b"),
    ("namespaces = 1", "namespaces"),
    ("[namespaces]\nbill = 1", "namespaces.bill"),
])
def test_file_errors_name_their_key(toml, text, key):
    error = error_of(toml(text + "\n"))
    assert error.key == key
    assert str(error).startswith(f"{key}: ")
    assert error.message


@pytest.mark.parametrize("var, value, key", [
    ("BROKER_PORT", "notaport", "port"),
    ("BROKER_PORT", "70000", "port"),
    ("BROKER_SHARDS", "0", "shards"),
    ("BROKER_ALLOW_ANONYMOUS", "maybe", "allow_anonymous"),
    ("BROKER_REDIS_URL", "mysql://x", "redis_url"),
    ("BROKER_MEMORY_LIMIT_MB", "-3", "memory_limit_mb"),
    ("BROKER_DRAIN_TIMEOUT", "nan", "drain_timeout"),
    ("BROKER_LOG_LEVEL", "verbose", "log_level"),
])
def test_env_errors_name_key_and_variable(var, value, key):
    error = error_of(env={var: value})
    assert error.key == key
    assert var in error.message


@pytest.mark.parametrize("flags, key", [
    ({"port": "notaport"}, "port"),
    ({"shards": "0"}, "shards"),
    ({"shards": 0}, "shards"),
    ({"redis": "ftp://x"}, "redis_url"),
    ({"allow_anonymous": "perhaps"}, "allow_anonymous"),
    ({"colour": "red"}, "colour"),
])
def test_flag_errors_name_their_key(flags, key):
    assert error_of(flags=flags).key == key


def test_file_problems_are_key_config(toml, tmp_path):
    assert error_of(str(tmp_path / "missing.toml")).key == "config"
    error = error_of(toml("port = = 1\n"))
    assert error.key == "config" and "invalid TOML" in error.message
    assert error_of(str(tmp_path)).key == "config"  # a directory
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'host = "\xe9"\n')
    assert error_of(str(bad)).key == "config"


def test_bad_env_beaten_by_flag_is_still_an_error():
    # Every layer is validated: a wrong BROKER_PORT is reported even if a
    # flag would override it (an operator wants to know).
    assert error_of(env={"BROKER_PORT": "x"}, flags={"port": "1"}).key == "port"

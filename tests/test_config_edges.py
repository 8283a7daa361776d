"""load_config edges the main table does not reach: the cluster transport,
the Redis section, Redis URL shapes, host names and the features table."""
import pytest
from click.testing import CliRunner

from broker.cli import main
from broker.config import JWT, load_config
from broker.errors import ConfigError


def error_of(*args, **kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    return info.value


@pytest.fixture
def toml(tmp_path):
    def write(text: str) -> str:
        path = tmp_path / "broker.toml"
        path.write_text(text + "\n")
        return str(path)
    return write


def test_cluster_transport_and_redis_section(toml):
    config = load_config(toml('[cluster]\ntransport = "tcp"\n[redis]\nprefix = "app1"\ntimeout = 2'))
    assert config.cluster.transport == "tcp"
    assert (config.redis.prefix, config.redis.timeout) == ("app1", 2.0)


@pytest.mark.parametrize("text, key, words", [
    ('[cluster]\ntransport = "udp"', "cluster.transport", "'ipc' or 'tcp'"),
    ('[redis]\nprefix = "a{b}"', "redis.prefix", "braces or whitespace"),
    ('[redis]\nprefix = "a b"', "redis.prefix", "braces or whitespace"),
    ('[features."bad name"]\nenabled = true', "features.bad name", "letters, digits"),
])
def test_section_errors_name_their_key(toml, text, key, words):
    error = error_of(toml(text))
    assert error.key == key and words in error.message


@pytest.mark.parametrize("var, value, words", [
    ("BROKER_DRAIN_TIMEOUT", "soon", "must be a number, got 'soon'"),
    ("BROKER_HOST", "my host", "not a host name or address"),
    ("BROKER_HOST", "a/b", "not a host name or address"),
    ("BROKER_REDIS_URL", "redis+cluster://seed", "one seed node as HOST:PORT"),
    ("BROKER_REDIS_URL", "redis+cluster://:7000", "one seed node as HOST:PORT"),
    ("BROKER_REDIS_URL", "redis://:6380", "names no host"),
    ("BROKER_REDIS_URL", "redis://localhost:6380/cache", "database after the host must be a number"),
])
def test_env_value_errors_say_what_is_wrong(var, value, words):
    error = error_of(env={var: value})
    assert words in error.message and var in error.message


def test_good_redis_urls_pass():
    for url in ("redis+cluster://seed:7000", "redis://localhost:6380/2", "unix:///tmp/redis.sock"):
        assert load_config(env={"BROKER_REDIS_URL": url}).redis_url == url


def test_algorithms_parse_from_comma_separated_text():
    # Every parser takes text (a flag or a variable) as well as TOML values.
    parse = JWT["algorithms"]
    assert parse("jwt.algorithms", " HS256, HS512 ,", True) == ("HS256", "HS512")
    with pytest.raises(ConfigError):
        parse("jwt.algorithms", " , ", True)


def test_check_config_without_a_file_says_what_to_give():
    result = CliRunner().invoke(main, ["check-config"])
    assert result.exit_code == 2
    assert result.stderr == "error: FILE: give a config file to check (or --diff OLD NEW)\n"

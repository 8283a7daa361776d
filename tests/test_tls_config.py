"""TLS and pressure settings in the config: tls_cert/tls_key as a validated
pair loadable by ssl, the new [limits] keys and the [memory] section."""
import ssl

import pytest

from broker.config import Config, Memory, load_config
from broker.errors import ConfigError
from broker.testing import self_signed_cert
from broker.tls import load_server_context, server_context

from .test_cli import run


@pytest.fixture
def pair(tmp_path):
    return self_signed_cert(str(tmp_path))


def error_of(*args, **kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    return info.value


def test_pressure_defaults_match_the_protocol():
    limits = Config().limits
    assert (limits.ping_interval, limits.ping_timeout) == (25.0, 20.0)
    assert limits.subscriptions_per_connection == 1000
    assert limits.commands_per_second == 100
    assert limits.connections_per_ip == 1000
    assert limits.channels_per_shard == 100000 and limits.inbound_pending_commands == 1024
    assert Config().memory == Memory(0.75, 0.85, 0.95, 0.05, 1.0)


def test_limits_and_memory_from_file_survive_to_dict(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[limits]\nping_interval = 1\nping_timeout = 0.5\ncommands_per_second = 5\n"
                    "[memory]\nlevel1 = 0.5\nlevel2 = 0.6\nlevel3 = 0.9\nhysteresis = 0\n")
    config = load_config(str(path))
    assert (config.limits.ping_interval, config.limits.commands_per_second) == (1.0, 5)
    assert config.memory.level1 == 0.5 and config.memory.hysteresis == 0.0
    assert Config.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("text, key", [
    ("[limits]\nping_interval = 0\n", "limits.ping_interval"),
    ("[limits]\nsubscriptions_per_connection = 0\n", "limits.subscriptions_per_connection"),
    ("[limits]\ncommands_per_second = 1.5\n", "limits.commands_per_second"),
    ("[memory]\nlevel1 = 1.2\n", "memory.level1"),
    ("[memory]\nlevel1 = 0\n", "memory.level1"),
    ("[memory]\nlevel2 = 0.7\n", "memory.level2"),
    ("[memory]\nlevel3 = 0.8\n", "memory.level3"),
    ("[memory]\nhysteresis = 0.8\n", "memory.hysteresis"),
    ("[memory]\nlevel4 = 0.99\n", "memory.level4"),
    ("[memory]\ncheck_interval = 0\n", "memory.check_interval"),
])
def test_bad_pressure_settings_name_their_key(tmp_path, text, key):
    path = tmp_path / "c.toml"
    path.write_text(text)
    assert error_of(str(path)).key == key


def test_tls_pair_loads_and_context_is_a_server_context(pair):
    cert, key = pair
    config = load_config(flags={"tls_cert": cert, "tls_key": key})
    context = server_context(config)
    assert isinstance(context, ssl.SSLContext) and context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert server_context(Config()) is None


def test_tls_needs_both(pair):
    cert, key = pair
    assert error_of(flags={"tls_cert": cert}).key == "tls_key"
    assert error_of(env={"BROKER_TLS_KEY": key}).key == "tls_cert"


def test_tls_errors_name_the_key(pair, tmp_path):
    cert, key = pair
    assert error_of(flags={"tls_cert": str(tmp_path / "nope.pem"), "tls_key": key}).key == "tls_cert"
    assert error_of(flags={"tls_cert": cert, "tls_key": str(tmp_path / "nope.pem")}).key == "tls_key"
    assert error_of(flags={"tls_cert": key, "tls_key": key}).key == "tls_cert"   # a key, not a cert
    assert error_of(flags={"tls_cert": cert, "tls_key": cert}).key == "tls_key"  # a cert, not a key
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    _, other_key = self_signed_cert(str(other_dir))
    mismatch = error_of(flags={"tls_cert": cert, "tls_key": other_key})
    assert mismatch.key == "tls_key" and "not the private key" in mismatch.message
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    assert error_of(flags={"tls_cert": str(garbage), "tls_key": key}).key in ("tls_cert", "tls_key")


def test_serve_with_a_bad_tls_pair_exits_2_naming_the_key(pair, tmp_path):
    cert, _ = pair
    result = run("serve", "--tls-cert", cert)
    assert result.returncode == 2 and result.stderr.startswith("error: tls_key: "), result.stderr
    result = run("serve", "--tls-cert", cert, "--tls-key", str(tmp_path / "missing.pem"))
    assert result.returncode == 2 and result.stderr.startswith("error: tls_key: cannot read"), result.stderr


def test_load_server_context_directly(pair):
    assert isinstance(load_server_context(*pair), ssl.SSLContext)

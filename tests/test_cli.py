"""`python -m broker ...` as a subprocess (PROTOCOL.md §5). None of these
needs a running server: bad settings fail before the server is imported."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest

from broker.testing import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.timeout(60), pytest.mark.filterwarnings("ignore::jwt.InsecureKeyLengthWarning")]


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), base.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "broker", *args], cwd=ROOT, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def test_version():
    result = run("--version")
    assert result.returncode == 0, result.stderr
    from broker._version import __version__
    lines = result.stdout.splitlines()
    assert lines[0] == f"broker {__version__}"
    assert lines[1] == "fastpath: compiled", "the test command builds every module; partial is a broken build"
    pure = run("--version", env={"BROKER_PURE_PYTHON": "1"})
    assert pure.stdout.splitlines()[1] == "fastpath: pure-python"


def test_help_lists_commands():
    result = run("--help")
    assert result.returncode == 0
    for command in ("serve", "token", "publish", "stats", "check-config"):
        assert command in result.stdout


def test_token_verifies_with_pyjwt():
    result = run("token", "--jwt-secret", "s3cret", "--sub", "alice", "--ttl", "120",
                 "--channel", "user:9", "--channel", "bill:1")
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), "s3cret", algorithms=["HS256"])
    assert claims["sub"] == "alice"
    assert time.time() + 100 < claims["exp"] <= time.time() + 121
    assert claims["channels"] == ["user:9", "bill:1"]


def test_token_secret_from_environment():
    result = run("token", "--sub", "bob", env={"BROKER_JWT_SECRET": "envsecret"})
    assert result.returncode == 0, result.stderr
    assert jwt.decode(result.stdout.strip(), "envsecret", algorithms=["HS256"])["sub"] == "bob"


def test_token_negative_ttl_is_expired():
    result = run("token", "--jwt-secret", "s", "--sub", "x", "--ttl", "-10")
    assert result.returncode == 0, result.stderr
    with pytest.raises(jwt.ExpiredSignatureError):
        jwt.decode(result.stdout.strip(), "s", algorithms=["HS256"])


def test_token_without_secret_is_usage_error():
    result = run("token", "--sub", "x")
    assert result.returncode == 2
    assert "--jwt-secret" in result.stderr


def test_check_config_ok(tmp_path):
    path = tmp_path / "good.toml"
    path.write_text('port = 9100\nshards = 2\napi_key = "k"\n[namespaces.bill]\nhistory_size = 3\n')
    result = run("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "ok"
    assert "9100" in result.stdout and "history 3" in result.stdout


@pytest.mark.parametrize("text, key", [
    ("[namespaces.bill]\nsubscribe = \"nobody\"\n", "namespaces.bill.subscribe"),
    ("[limits]\nmax_message_size = -1\n", "limits.max_message_size"),
    ("port = = 3\n", "config"),
    ("mystery = 1\n", "mystery"),
])
def test_check_config_bad(tmp_path, text, key):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = run("check-config", str(path))
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {key}: ")
    assert result.stdout == ""


def test_check_config_missing_file(tmp_path):
    result = run("check-config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: config: ")


@pytest.mark.parametrize("args, env, key", [
    (["--port", "notaport"], {}, "port"),
    (["--shards", "0"], {}, "shards"),
    (["--redis", "http://nope"], {}, "redis_url"),
    (["--log-level", "chatty"], {}, "log_level"),
    ([], {"BROKER_PORT": "99999"}, "port"),
    ([], {"BROKER_ALLOW_ANONYMOUS": "sometimes"}, "allow_anonymous"),
])
def test_serve_bad_settings_exit_2_naming_key(args, env, key):
    result = run("serve", *args, env=env)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith(f"error: {key}: "), result.stderr


def test_serve_bad_config_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[namespaces.bill]\nhistory_size = 0\n")
    result = run("serve", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.startswith("error: namespaces.bill.history_size: ")


def test_serve_flag_beats_bad_file_value_only_when_valid(tmp_path):
    # The file is validated even if a flag overrides its key.
    path = tmp_path / "bad.toml"
    path.write_text("port = \"x\"\n")
    result = run("serve", "--config", str(path), "--port", "1")
    assert result.returncode == 2 and result.stderr.startswith("error: port: ")


def test_publish_bad_json_argument():
    result = run("publish", "bill:1", "{not json")
    assert result.returncode == 2
    assert result.stderr.startswith("error: JSON: ")


def test_publish_and_stats_unreachable_broker():
    url = f"http://127.0.0.1:{free_port()}"
    result = run("publish", "--url", url, "bill:1", '{"a":1}')
    assert result.returncode == 1
    assert "cannot reach" in result.stderr
    result = run("stats", env={"BROKER_URL": url})
    assert result.returncode == 1
    assert "cannot reach" in result.stderr


def test_stats_table_format():
    from broker.cli import _stats_table

    table = _stats_table({"node": "n1", "connections": 3, "subscriptions": 5, "channels": 2,
                          "published": 10, "delivered": 20,
                          "shards": [{"id": 0, "pid": 123, "connections": 3, "subscriptions": 5,
                                      "delivered": 20, "rss_bytes": 52428800, "degradation": 0,
                                      "up": True}]})
    lines = table.splitlines()
    assert lines[0] == "node n1"
    assert "connections 3" in lines[1] and "delivered 20" in lines[1]
    assert lines[3].split() == ["shard", "pid", "up", "connections", "subscriptions", "delivered",
                                "rss", "MB", "degradation"]
    assert lines[4].split() == ["0", "123", "yes", "3", "5", "20", "50.0", "0"]
    with pytest.raises(json.JSONDecodeError):
        json.loads(table)  # the default output is for people; --json is for programs


def test_stats_table_shows_a_down_shard_and_aligns_columns():
    from broker.cli import _stats_table

    table = _stats_table({"node": "n1", "shards": [
        {"id": 0, "pid": 123456, "up": True, "connections": 1200, "subscriptions": 5, "delivered": 7,
         "rss_bytes": 1024 * 1024, "degradation": 0},
        {"id": 1, "up": False},
    ]})
    lines = table.splitlines()
    assert lines[1].split() == ["connections", "-", "subscriptions", "-", "channels", "-", "published", "-",
                                "delivered", "-"]
    assert lines[5].split() == ["1", "-", "no", "-", "-", "-", "-", "-"]
    header, up_row, down_row = lines[3], lines[4], lines[5]
    # Right-aligned numeric columns: every row's "connections" cell ends where the header's does.
    end = header.index("connections") + len("connections")
    assert up_row[:end].endswith("1200") and down_row[:end].endswith("-")


def test_token_with_an_empty_secret_and_publish_to_a_bad_url_name_the_problem():
    result = run("token", "--jwt-secret", "", "--sub", "alice")
    assert result.returncode == 2 and "error: jwt_secret: must not be empty" in result.stderr
    result = run("publish", "--url", "ftp://127.0.0.1:1", "bill:1", "1")
    assert result.returncode == 2 and "error: url: broker URL must be http:// or https://" in result.stderr

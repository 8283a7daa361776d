"""`broker bench` as a user runs it: against a broker that is already up
(attach), and against one that is not there."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from broker.bench.stats import RESULT_FIELDS
from broker.testing import free_port
from tests.redis_helpers import require_redis

pytestmark = pytest.mark.timeout(120)


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    return subprocess.run([sys.executable, "-m", "broker", "bench", *args], env=env, capture_output=True,
                          text=True, timeout=100)


def test_a_small_w2_against_a_running_broker(broker, tmp_path):
    path = tmp_path / "w2.json"
    result = bench("--workload", "w2", "--connections", "10", "--rate", "20", "--duration", "1", "--workers", "1",
                   "--url", broker.url, "--api-key", broker.api_key, "--jwt-secret", broker.jwt_secret,
                   "--json", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    [record] = json.loads(path.read_text())["results"]
    assert set(record) == set(RESULT_FIELDS) and record["errors"] == []
    assert (record["target"], record["workload"], record["connections"]) == ("broker", "w2", 10)
    assert record["publications"] == 20 and record["deliveries_received"] == record["deliveries_expected"] == 20
    assert "[broker w2]" in result.stderr  # progress lines, one per phase (not a TTY: no rewriting)
    assert "w2" in result.stdout and broker.process.poll() is None  # attached: left running


def test_a_broker_that_is_not_there_is_a_failed_run_with_a_note(tmp_path):
    path = tmp_path / "w3.json"
    url = f"http://127.0.0.1:{free_port()}"
    result = bench("--workload", "w3", "--connections", "5", "--url", url, "--quiet", "--json", str(path))
    assert result.returncode == 1
    [record] = json.loads(path.read_text())["results"]
    assert record["errors"] == [f"start failed: RuntimeError: {url}/readyz does not answer 200"]
    assert "notes:" in result.stdout and "start failed" in result.stdout
    assert result.stderr == ""  # --quiet


def test_the_broker_on_redis_and_embedded_in_one_run_with_their_ratio(tmp_path):
    require_redis()
    path = tmp_path / "w1.json"
    result = bench("--spawn", "--redis", "--workload", "w1-1k", "--connections", "20", "--rate", "10",
                   "--duration", "1", "--workers", "1", "--quiet", "--json", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    records = {r["target"]: r for r in json.loads(path.read_text())["results"]}
    assert set(records) == {"broker", "broker-redis"}
    for record in records.values():
        assert record["errors"] == [] and record["publications"] == 10
        assert record["deliveries_received"] == record["deliveries_expected"] == 200
    assert records["broker"]["redis_cpu_seconds"] is None
    assert records["broker-redis"]["redis_cpu_seconds"] is not None  # the redis-server it started
    assert "ratios broker-redis / broker" in result.stdout


def test_the_broker_on_redis_needs_spawn():
    result = bench("--targets", "broker-redis", "--url", "http://127.0.0.1:1")
    assert result.returncode == 2 and "broker-redis (--redis) needs --spawn" in result.stderr

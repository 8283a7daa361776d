"""The supervisor's own exits: a port it cannot listen on (exit 1, and the
warning about a missing api_key first), and a stop that arrives while a
deploy runs (the deploy is cancelled and answered, the broker exits 0),
and a shard that hangs at stop (killed, and the broker exits 1)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from broker.generations import describe_exit
from broker.testing import BrokerProcess

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[2]


def test_a_port_in_use_is_an_error_naming_it(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        result = subprocess.run([sys.executable, "-m", "broker", "serve", "--port", str(port), "--shards", "1"],
                                env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "no api_key configured" in result.stderr
    assert f"error: cannot listen on 127.0.0.1:{port}: " in result.stderr


def test_a_stop_during_a_deploy_cancels_it_and_the_broker_exits_0(broker_factory, tmp_path):
    config = tmp_path / "slow.toml"
    config.write_text("[deploy]\nfirst_wave_watch = 60\n")   # the deploy lasts until the stop
    broker: BrokerProcess = broker_factory("--shards", "1", "--allow-anonymous", "--config", str(config))
    outcome: dict[str, object] = {}

    def deploy() -> None:
        try:
            while True:   # a probing reload may hold the operator for a moment: 409, try again
                status, reply = broker.api("POST", "/api/admin/deploy", {"config": None})
                if status != 409:
                    outcome["reply"] = (status, reply)
                    return
                time.sleep(0.02)
        except OSError as exc:   # the shard that held the request stopped before the answer
            outcome["error"] = exc

    runner = threading.Thread(target=deploy)
    runner.start()
    # Stop once the deploy holds the operator (a reload is refused as busy).
    deadline = time.monotonic() + 30
    while True:
        status, reply = broker.api("POST", "/api/admin/reload", {"config": None})
        if status == 409:
            break
        assert time.monotonic() < deadline and runner.is_alive(), reply
        time.sleep(0.02)
    broker.process.send_signal(signal.SIGTERM)
    runner.join(60)
    assert broker.process.wait(30) == 0
    if "reply" in outcome:
        status, reply = outcome["reply"]
        last = reply.splitlines()[-1] if isinstance(reply, str) else reply
        assert status == 503 and "the broker is stopping" in str(last), reply
    else:
        assert isinstance(outcome["error"], OSError)
    assert "deploy failed" not in Path(broker.log_path).read_text()   # cancelled, not crashed


def test_a_shard_that_hangs_at_stop_is_killed_and_the_exit_says_so(broker_factory, tmp_path):
    config = tmp_path / "quick.toml"
    config.write_text("drain_timeout = 0.5\n")
    broker: BrokerProcess = broker_factory("--shards", "2", "--config", str(config))
    shards = [child for child in psutil.Process(broker.process.pid).children()
              if "broker.worker" in child.cmdline()]
    assert len(shards) == 2
    shards[0].suspend()   # SIGSTOP: it cannot drain or exit
    assert broker.stop(timeout=30) == 1   # drain_timeout + 5 s, then the kill
    assert not shards[0].is_running() or shards[0].status() == psutil.STATUS_ZOMBIE
    log = Path(broker.log_path).read_text()
    assert f"shard pid {shards[0].pid} did not stop in 6s; killing it" in log
    assert "did not stop cleanly" in log


def test_exits_are_described_by_signal_name_or_number():
    assert describe_exit(0) == "exited with code 0"
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(-200) == "killed by signal 200"   # no such signal: its number


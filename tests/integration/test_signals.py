"""Signals and process limits of a real `broker serve` (issue 13, items 7 and 10)."""
import os
import re
import signal
import time

import pytest

from broker.testing import BrokerProcess, http_json

from .wsclient import NativeClient

pytestmark = pytest.mark.timeout(90)


def test_sighup_reloads_in_the_supervisor_and_is_ignored_by_shards(broker_factory, tmp_path):
    broker = broker_factory("--shards", "2", "--allow-anonymous")
    status, stats = broker.api("GET", "/api/stats")
    pids = sorted(s["pid"] for s in stats["shards"])
    with NativeClient(broker.ws_url) as client:
        client.subscribe("bill:hup")
        broker.process.send_signal(signal.SIGHUP)
        for pid in pids:  # as a terminal hangup would reach the whole group
            os.kill(pid, signal.SIGHUP)
        time.sleep(1.0)
        assert broker.process.poll() is None
        assert http_json("GET", broker.url + "/readyz")[0] == 200
        _, stats = broker.api("GET", "/api/stats")
        assert sorted(s["pid"] for s in stats["shards"]) == pids  # no shard died and restarted
        broker.publish("bill:hup", "after hangup")
        assert client.pubs(1)[0]["data"] == "after hangup"  # the connection survived
    assert broker.stop() == 0
    log = open(broker.log_path, encoding="utf-8").read()
    assert "SIGHUP: reloading" in log and "SIGHUP ignored" in log  # a reload; the shards' hangup


class LowFdBroker(BrokerProcess):
    """Started by a shell that lowers the soft descriptor limit first."""

    def command(self) -> list[str]:
        return ["sh", "-c", 'ulimit -Sn 512 && exec "$@"', "sh", *super().command()]


def test_serve_raises_the_soft_fd_limit_in_every_process(tmp_path):
    hard = int(open("/proc/self/limits").read().split("Max open files")[1].split()[1]
               .replace("unlimited", str(2**20)))
    if hard <= 512:
        message = "the hard limit is too low to show a raise"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " (CI=true: the environment cannot run this test)")
        pytest.skip(message)
    broker = LowFdBroker(args=["--shards", "2", "--allow-anonymous"], log_path=str(tmp_path / "b.log"))
    try:
        broker.start()
        _, stats = broker.api("GET", "/api/stats")
        for pid in [broker.process.pid, *(s["pid"] for s in stats["shards"])]:
            limits = open(f"/proc/{pid}/limits").read()
            soft = int(re.search(r"Max open files\s+(\d+)", limits).group(1))
            assert soft > 512, (pid, limits)
    finally:
        assert broker.stop() == 0
    log = open(broker.log_path, encoding="utf-8").read()
    assert re.search(r"supervisor: file descriptor limit raised from 512 to \d+", log), log
    # shards inherit the raised limit from the supervisor and log what they hold
    assert len(set(re.findall(r"(shard \d): file descriptor limit", log))) == 2, log

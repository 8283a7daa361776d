"""broker.testing: the helper every integration test starts brokers with."""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from broker.testing import BrokerProcess

IGNORE_SIGTERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ok', flush=True); " \
                 "time.sleep(60)"


def test_a_broker_that_exits_at_once_is_reported_with_its_code(tmp_path):
    proc = BrokerProcess(args=["--shards", "0"], log_path=str(tmp_path / "log"))
    with pytest.raises(RuntimeError, match="exited early with 2"):
        proc.start()
    assert "shards" in (tmp_path / "log").read_text()


def test_waiting_for_a_process_that_never_listens_times_out():
    proc = BrokerProcess()
    proc.process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(TimeoutError, match=f"port {proc.port} not ready"):
            proc.wait_ready(timeout=0.5)
    finally:
        proc.process.kill()
        proc.process.wait()


def test_stop_kills_a_process_that_ignores_sigterm_and_says_so():
    proc = BrokerProcess()
    assert proc.stop() == 0  # never started: nothing to stop
    proc.process = subprocess.Popen([sys.executable, "-c", IGNORE_SIGTERM], stdout=subprocess.PIPE)
    assert proc.process.stdout is not None and proc.process.stdout.readline() == b"ok\n"
    with pytest.raises(subprocess.TimeoutExpired):
        proc.stop(timeout=0.5)
    assert proc.process.returncode == -signal.SIGKILL


@pytest.mark.timeout(60)
def test_context_manager_starts_and_stops_and_a_refused_publish_raises():
    with BrokerProcess(args=["--shards", "1"]) as proc:
        assert proc.process is not None and proc.process.poll() is None
        assert proc.publish("bill:1", {"n": 1})["offset"] == 1
        with pytest.raises(AssertionError, match="publish failed: 400"):
            proc.publish("no spaces allowed here", 1)
    assert proc.process.returncode == 0  # SIGTERM: a graceful stop

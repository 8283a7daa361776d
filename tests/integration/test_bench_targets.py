"""broker.bench.targets: finding, measuring and stopping the servers a load
run points at, against real processes."""
from __future__ import annotations

import subprocess
import sys

import psutil
import pytest

from broker.bench.targets import ProcessTree, Target, attach, spawn_baseline
from broker.testing import free_port

pytestmark = pytest.mark.timeout(60)


def test_attach_finds_the_serve_process_behind_the_port(broker):
    target = attach(broker.url, None, None)
    assert target.pid == broker.process.pid  # climbed from the listening shard to `broker serve`
    assert target.ws_url == f"ws://127.0.0.1:{broker.port}/ws" and target.http_url == broker.url
    assert target.alive() and target.spawned is None
    assert target.stop() is None  # not ours to stop
    assert broker.process.poll() is None
    shard_pids = {child.pid for child in psutil.Process(broker.process.pid).children()}
    assert {p.pid for p in target.tree.processes()} >= {broker.process.pid} | shard_pids
    assert target.tree.rss_bytes() > 0 and target.tree.cpu_seconds() > 0
    explicit = attach(broker.url + "/", broker.url, broker.process.pid)
    assert explicit.pid == broker.process.pid


def test_attach_refuses_what_it_cannot_measure():
    with pytest.raises(ValueError, match="--url must be http://HOST:PORT"):
        attach("ftp://127.0.0.1:1", None, None)
    with pytest.raises(RuntimeError, match="does not answer 200"):
        attach(f"http://127.0.0.1:{free_port()}", None, None)
    with pytest.raises(ValueError, match="unknown baseline 'nginx'"):
        spawn_baseline("nginx")


def test_a_target_this_run_started_is_stopped_and_then_gone():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    target = Target("sleeper", "ws://127.0.0.1:1/ws", "http://127.0.0.1:1", proc.pid, spawned=proc)
    assert target.alive()
    assert target.stop() == -15  # SIGTERM was enough
    assert target.stop() is None and not target.alive()


def test_a_process_tree_keeps_the_cpu_of_children_that_ended():
    parent = subprocess.Popen([sys.executable, "-c",
                               "import subprocess, sys, time\n"
                               "child = subprocess.Popen([sys.executable, '-c', 'sum(range(3 * 10**7))'])\n"
                               "print('started', flush=True); child.wait(); time.sleep(30)"],
                              stdout=subprocess.PIPE)
    try:
        tree = ProcessTree(parent.pid)
        assert parent.stdout is not None and parent.stdout.readline() == b"started\n"
        procs = tree.processes()
        assert [p.pid for p in procs][0] == parent.pid and len(procs) == 2
        child = procs[1]
        during = 0.0
        while child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
            during = tree.cpu_seconds()  # sampled while the child runs
        after = tree.cpu_seconds()
        assert after >= during > 0  # the ended child's CPU still counts (its last sample)
        assert tree.rss_bytes() > 0 and len(tree.processes()) == 2  # the dead child is remembered, not measured
    finally:
        parent.kill()
        parent.wait()

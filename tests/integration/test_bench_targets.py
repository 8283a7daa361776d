"""broker.bench.targets: finding, measuring and stopping the servers a load
run points at, against real processes."""
from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

from broker.bench.nats import nats_server_path, spawn_nats
from broker.bench.runner import RunOptions, run_workload, workload
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


def _need_nats_server() -> None:
    """nats-server missing: skip, except under CI=true, where that is a failure."""
    if nats_server_path() is None:
        message = "nats-server not installed (or set NATS_SERVER)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " (CI=true: a missing dependency is a failure)")
        pytest.skip(message)


@pytest.mark.parametrize(("name", "per_publication"), [("w1-1k", 30), ("w2", 1)])
def test_a_tiny_run_against_nats_delivers_every_publication_in_order(tmp_path, name, per_publication):
    _need_nats_server()
    target = spawn_nats(log_path=str(tmp_path / "nats.log"))
    try:
        assert target.protocol == "nats" and target.ws_url.startswith("ws://127.0.0.1:")
        assert target.tree.root.name() == "nats-server" and target.alive()  # our own, not a system one
        record = run_workload(target, workload(name, connections=30, rate=20, duration=1),
                              RunOptions(workers=1, jwt_secret="unused-by-nats", drain_timeout=5, progress=None))
    finally:
        code = target.stop()
    assert code == 0 and not target.alive()   # SIGINT: a clean exit
    assert record["errors"] == [] and record["connections"] == 30 and record["publications"] == 20
    assert record["deliveries_expected"] == record["deliveries_received"] == 20 * per_publication
    assert record["offset_gaps"] == record["offsets_missing"] == record["duplicates"] == record["disconnects"] == 0
    assert record["latency_samples"] == record["deliveries_received"] and record["latency_p50_ms"] > 0
    assert record["server_cpu_seconds"] > 0 and record["rss_per_connection_bytes"] is not None


def test_nats_takes_a_connect_storm_without_a_publisher(tmp_path):
    _need_nats_server()
    target = spawn_nats()
    try:
        record = run_workload(target, workload("w3", connections=40), RunOptions(workers=2, progress=None))
    finally:
        target.stop()
    assert record["errors"] == [] and record["connections"] == 40 and record["connect_rate"] > 0
    assert record["publications"] is None and record["peak_rss_bytes"] > 0


@pytest.mark.parametrize("kind", ["broker", "picows"])
def test_publishing_over_one_pipelined_websocket_reaches_every_user(tmp_path, broker, kind):
    """``--publish-over stream``: the broker's backend stream, or the
    baseline's own WebSocket with ``publish`` commands; one connection,
    commands sent when due without waiting for earlier replies."""
    target = (attach(broker.url, None, None) if kind == "broker"
              else spawn_baseline("picows", log_path=str(tmp_path / "picows.log")))
    try:
        record = run_workload(target, workload("w2", connections=40, rate=400, duration=1),
                              RunOptions(workers=1, api_key=broker.api_key, jwt_secret=broker.jwt_secret,
                                         drain_timeout=5, progress=None, publish_over="stream"))
    finally:
        target.stop()
    assert record["errors"] == [] and record["publications"] == 400 and record["publications_failed"] == 0
    assert record["deliveries_expected"] == record["deliveries_received"] == 400
    assert record["offset_gaps"] == record["offsets_missing"] == record["duplicates"] == 0

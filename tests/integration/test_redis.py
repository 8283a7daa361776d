"""The Redis engine through real processes: redis-server on free ports,
several ``broker serve --redis`` hosts, WebSocket clients and the HTTP API.

What a user would check: publications entering any host reach subscribers
on every host with the same offsets; a client that moves host recovers
exactly what it missed; Redis killed, paused or restarted mid-traffic never
yields a false acknowledgement, never a silent gap, and clients stay
connected through it.
"""
from __future__ import annotations

import json
import threading
import time
from collections import defaultdict

import pytest
from websockets.sync.client import connect

from broker.testing import http_json

from ..redis_helpers import RedisClusterServers, RedisServer
from .wsclient import NativeClient

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def start_hosts(broker_factory, url: str, count: int = 2, shards: int = 2, *extra: str):
    return [broker_factory("--shards", str(shards), "--allow-anonymous", "--redis", url, *extra)
            for _ in range(count)]


class Follower:
    """A WebSocket client on its own thread that records every message."""

    def __init__(self, ws_url: str, channels: list[str], recover: dict | None = None) -> None:
        self._connect = connect(ws_url, max_size=None, max_queue=None, open_timeout=10)
        self.ws = self._connect.__enter__()
        self.messages: list[dict] = []
        self.replies: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.closed = threading.Event()
        commands = []
        for i, channel in enumerate(channels):
            command = {"id": i + 1, "op": "subscribe", "channel": channel}
            if recover and channel in recover:
                command["recover"] = recover[channel]
            commands.append(command)
        self.ws.send("\n".join(json.dumps(c) for c in commands))
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while len(self.replies) < len(channels):
            assert time.monotonic() < deadline, f"no subscribe replies: {self.messages}"
            time.sleep(0.01)

    def _read(self) -> None:
        try:
            for frame in self.ws:
                for line in frame.split("\n"):
                    message = json.loads(line)
                    with self.lock:
                        self.messages.append(message)
                        if "id" in message:
                            self.replies[message.get("channel", message["id"])] = message
        except Exception:
            pass
        finally:
            self.closed.set()

    def send(self, command: dict) -> None:
        self.ws.send(json.dumps(command))

    def pubs(self, channel: str) -> list[dict]:
        with self.lock:
            return [m for m in self.messages if m.get("op") == "pub" and m["channel"] == channel]

    def offsets(self, channel: str) -> list[int]:
        return [m["offset"] for m in self.pubs(channel)]

    def lost(self) -> list[dict]:
        with self.lock:
            return [m for m in self.messages if m.get("op") == "unsubscribed" and "id" not in m]

    def wait(self, predicate, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; last messages: {self.messages[-5:]}")
            time.sleep(0.02)

    def close(self) -> None:
        self.ws.close()
        self.thread.join(5)


def wait_status(host, path: str, status: int, timeout: float = 15.0) -> float:
    """Seconds until ``path`` answers ``status``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if http_json("GET", host.url + path, timeout=5)[0] == status:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"{path} did not answer {status} within {timeout}s")


class Traffic:
    """Publishers on threads, alternating hosts, recording every answer."""

    def __init__(self, hosts, channels: list[str], threads: int = 2) -> None:
        self.hosts, self.channels = hosts, channels
        self.acked: dict[str, list[tuple[int, object]]] = defaultdict(list)
        self.refused: list[tuple[int, object]] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.pool = [threading.Thread(target=self._work, args=(n,), daemon=True) for n in range(threads)]

    def _work(self, seed: int) -> None:
        i = 0
        while not self.stop.is_set():
            host = self.hosts[(seed + i) % len(self.hosts)]
            channel = self.channels[i % len(self.channels)]
            data = {"t": seed, "i": i}
            status, reply = host.api("POST", "/api/publish", {"channel": channel, "data": data})
            with self.lock:
                if status == 200:
                    self.acked[channel].append((reply["offset"], data))
                else:
                    self.refused.append((status, reply))
            i += 1
            time.sleep(0.005)

    def __enter__(self) -> "Traffic":
        for thread in self.pool:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.pool:
            thread.join(30)


def test_two_hosts_deliver_every_publication_with_the_same_offsets(broker_factory, redis_server):
    a, b = start_hosts(broker_factory, redis_server.url)
    channels = ["bill:1", "bill:2", "bill:3"]
    followers = [Follower(host.ws_url, channels) for host in (a, b) for _ in range(3)]
    epochs = {f.replies[c]["epoch"] for f in followers for c in channels}
    assert len(epochs) == len(channels)  # one epoch per channel, the same on both hosts
    with Traffic([a, b], channels, threads=3) as traffic:
        time.sleep(2.0)
    assert not traffic.refused
    for channel in channels:
        acked = sorted(traffic.acked[channel], key=lambda item: item[0])
        assert [offset for offset, _ in acked] == list(range(1, len(acked) + 1))  # gapless, no dupes
        for follower in followers:
            follower.wait(lambda: len(follower.pubs(channel)) >= len(acked))
            assert [(p["offset"], p["data"]) for p in follower.pubs(channel)] == acked
    status, stats = b.api("GET", "/api/stats")
    assert status == 200 and all(s["engine"]["redis_up"] == 1 for s in stats["shards"])
    published = sum(len(offsets) for offsets in traffic.acked.values())
    assert sum(s["engine"]["redis_calls"] for s in stats["shards"]) >= published // 2
    status, metrics = http_json("GET", b.url + "/metrics")
    assert 'broker_redis_up{shard="0"} 1.0' in metrics and 'broker_redis_up{shard="1"} 1.0' in metrics
    for follower in followers:
        follower.close()


def test_a_client_that_moves_host_recovers_exactly_what_it_missed(broker_factory, redis_server):
    a, b = start_hosts(broker_factory, redis_server.url)
    first = Follower(a.ws_url, ["bill:7"])
    epoch = first.replies["bill:7"]["epoch"]
    for i in range(5):
        b.publish("bill:7", {"n": i})
    first.wait(lambda: len(first.pubs("bill:7")) == 5)
    first.close()
    for i in range(5, 12):  # missed while moving
        (a if i % 2 else b).publish("bill:7", {"n": i})
    moved = Follower(b.ws_url, ["bill:7"], recover={"bill:7": {"epoch": epoch, "offset": 5}})
    reply = moved.replies["bill:7"]
    assert reply["recovered"] is True and reply["epoch"] == epoch and reply["offset"] == 12
    a.publish("bill:7", {"n": 12})
    moved.wait(lambda: len(moved.pubs("bill:7")) == 8)
    assert [(p["offset"], p["data"]["n"]) for p in moved.pubs("bill:7")] == [(o, o - 1) for o in range(6, 14)]
    # An offset the channel never reached, or another epoch: recovered false, nothing old.
    for recover in ({"epoch": epoch, "offset": 99}, {"epoch": "other", "offset": 1}):
        stranger = Follower(a.ws_url, ["bill:7"], recover={"bill:7": recover})
        assert stranger.replies["bill:7"]["recovered"] is False
        time.sleep(0.2)
        assert stranger.pubs("bill:7") == []
        stranger.close()
    moved.close()


def test_history_and_offsets_are_shared_by_every_host(broker_factory, redis_server):
    a, b = start_hosts(broker_factory, redis_server.url, 2, 1)
    offsets = [(a if i % 2 else b).publish("user:9", {"i": i})["offset"] for i in range(6)]
    assert offsets == [1, 2, 3, 4, 5, 6]
    for host in (a, b):
        status, history = host.api("GET", "/api/history?channel=user:9&since=2&limit=3")
        assert status == 200
        assert [(p["offset"], p["data"]["i"]) for p in history["publications"]] == [(3, 2), (4, 3), (5, 4)]
        assert history["offset"] == 6


def test_large_payloads_are_compressed_in_redis_and_arrive_intact(broker_factory, redis_server, tmp_path):
    config = tmp_path / "broker.toml"
    config.write_text("[redis]\ncompress_threshold = 1024\n")
    a, b = start_hosts(broker_factory, redis_server.url, 2, 1, "--config", str(config))
    follower = Follower(b.ws_url, ["bill:big"])
    big = {"text": "lorem ipsum " * 2000, "n": [1, 2, 3]}
    a.publish("bill:big", big)
    a.publish("bill:big", {"small": True})
    follower.wait(lambda: len(follower.pubs("bill:big")) == 2)
    assert [p["data"] for p in follower.pubs("bill:big")] == [big, {"small": True}]
    stored = redis_server.cli("XRANGE", "broker:{bill:big}:h", "-", "+")
    assert "lorem ipsum lorem" not in stored  # stored compressed, not as the JSON text
    status, history = b.api("GET", "/api/history?channel=bill:big&since=0&limit=5")
    assert history["publications"][0]["data"] == big
    _, stats = a.api("GET", "/api/stats")
    assert sum(s["engine"]["redis_compressed"] for s in stats["shards"]) == 1
    follower.close()


def test_redis_paused_answers_503_then_nothing_acknowledged_is_lost(broker_factory, redis_server):
    a, b = start_hosts(broker_factory, redis_server.url)
    channels = ["bill:p1", "bill:p2"]
    followers = [Follower(host.ws_url, channels) for host in (a, b)]
    with Traffic([a, b], channels) as traffic:
        time.sleep(1.0)
        redis_server.pause()
        try:
            assert wait_status(a, "/readyz", 503, timeout=8) < 8
            wait_status(b, "/readyz", 503, timeout=8)
            time.sleep(0.5)
            status, body = a.api("POST", "/api/publish", {"channel": "bill:p1", "data": {}})
            assert status == 503 and "error" in body
            newcomer = NativeClient(b.ws_url)
            assert newcomer.subscribe("bill:p1")["code"] == 503
        finally:
            redis_server.resume()
        wait_status(a, "/readyz", 200)
        wait_status(b, "/readyz", 200)
        time.sleep(1.0)
    assert traffic.refused and all(status == 503 for status, _ in traffic.refused)
    assert all(isinstance(body, dict) and "error" in body for _, body in traffic.refused)
    assert newcomer.subscribe("bill:p2")["op"] == "subscribed"  # the same connection, still open
    for channel in channels:
        acked = dict(traffic.acked[channel])
        last = max(acked)
        for follower in followers:
            follower.wait(lambda: follower.offsets(channel) and follower.offsets(channel)[-1] >= last)
            offsets = follower.offsets(channel)
            assert offsets == list(range(1, offsets[-1] + 1))  # gapless through the pause
            got = {p["offset"]: p["data"] for p in follower.pubs(channel)}
            assert all(got[offset] == data for offset, data in acked.items())  # every ack delivered
    assert not any(f.lost() for f in followers)  # Redis kept its data: no stream was lost
    for follower in followers:
        assert not follower.closed.is_set()
        follower.close()


def test_redis_killed_and_restarted_empty_means_new_epoch_and_recovered_false(broker_factory, redis_server):
    a, b = start_hosts(broker_factory, redis_server.url)
    followers = [Follower(host.ws_url, ["bill:k"]) for host in (a, b)]
    old_epoch = followers[0].replies["bill:k"]["epoch"]
    with Traffic([a, b], ["bill:k"]) as traffic:
        time.sleep(1.0)
        redis_server.kill()
        wait_status(a, "/readyz", 503, timeout=8)
        wait_status(b, "/readyz", 503, timeout=8)
        time.sleep(0.5)
        acked_before = dict(traffic.acked["bill:k"])
        redis_server.start()  # same port, no data: the history is gone
        wait_status(a, "/readyz", 200)
        wait_status(b, "/readyz", 200)
        time.sleep(1.0)
    assert any(status == 503 for status, _ in traffic.refused)
    for follower in followers:
        assert not follower.closed.is_set()  # connected through the outage
        got = {p["offset"]: p["data"] for p in follower.pubs("bill:k") if p["offset"] in acked_before}
        assert got == acked_before  # everything acknowledged before the kill was delivered
        follower.wait(lambda: follower.lost())  # told, never a silent jump to the new epoch
        assert follower.lost()[0]["channel"] == "bill:k"
        last = follower.offsets("bill:k")[-1]
        follower.send({"id": 50, "op": "subscribe", "channel": "bill:k",
                       "recover": {"epoch": old_epoch, "offset": last}})
        follower.wait(lambda: any(m.get("id") == 50 for m in follower.messages))
        reply = next(m for m in follower.messages if m.get("id") == 50)
        assert reply["op"] == "subscribed" and reply["recovered"] is False
        assert reply["epoch"] != old_epoch
        follower.close()


def test_redis_restarted_with_its_data_repairs_every_stream(broker_factory, tmp_path):
    redis_server = RedisServer(tmp_path, None, "--appendonly", "yes", "--appendfsync", "always").start()
    try:
        a, b = start_hosts(broker_factory, redis_server.url)
        followers = [Follower(host.ws_url, ["bill:r"]) for host in (a, b)]
        with Traffic([a, b], ["bill:r"]) as traffic:
            time.sleep(1.0)
            redis_server.kill()
            wait_status(a, "/readyz", 503, timeout=8)
            redis_server.start()  # replays its append-only file: same epoch, same history
            wait_status(a, "/readyz", 200)
            wait_status(b, "/readyz", 200)
            time.sleep(1.0)
        acked = dict(traffic.acked["bill:r"])
        for follower in followers:
            follower.wait(lambda: follower.offsets("bill:r")[-1] >= max(acked))
            offsets = follower.offsets("bill:r")
            assert offsets == list(range(1, offsets[-1] + 1))
            got = {p["offset"]: p["data"] for p in follower.pubs("bill:r")}
            assert all(got[offset] == data for offset, data in acked.items())
            assert not follower.lost()
            follower.close()
    finally:
        redis_server.stop()


def test_redis_cluster_three_masters(broker_factory, tmp_path):
    cluster = RedisClusterServers(tmp_path).start()
    try:
        a, b = start_hosts(broker_factory, cluster.url)
        channels = [f"bill:c{i}" for i in range(12)]  # spread over the three masters' slots
        followers = [Follower(host.ws_url, channels) for host in (a, b)]
        with Traffic([a, b], channels, threads=3) as traffic:
            time.sleep(2.0)
        assert not traffic.refused
        for channel in channels:
            acked = sorted(traffic.acked[channel], key=lambda item: item[0])
            assert [offset for offset, _ in acked] == list(range(1, len(acked) + 1))
            for follower in followers:
                follower.wait(lambda: len(follower.pubs(channel)) >= len(acked))
                assert [(p["offset"], p["data"]) for p in follower.pubs(channel)] == acked
        owners = {node.port for node in cluster.nodes
                  if any(node.cli("EXISTS", f"broker:{{{c}}}:m").strip() == "1" for c in channels)}
        assert len(owners) == 3  # the channels really live on every master
        status, history = b.api("GET", f"/api/history?channel={channels[0]}&since=0&limit=2")
        assert status == 200 and [p["offset"] for p in history["publications"]] == [1, 2]
        for follower in followers:
            follower.close()
    finally:
        cluster.stop()


def test_bad_redis_url_names_the_key_and_exits_2(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "broker", "serve", "--redis", "redis://host:notaport"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "redis_url" in result.stderr


def test_presence_counts_subscribers_and_users_across_hosts(broker_factory, redis_server):
    a, b = start_hosts(broker_factory, redis_server.url)
    alice = NativeClient(a.ws_url, token=a.token("alice"))
    bob = NativeClient(b.ws_url, token=b.token("bob"))
    anonymous = NativeClient(b.ws_url)
    for client in (alice, bob, anonymous):
        assert client.subscribe("bill:pres")["op"] == "subscribed"

    def presence(host) -> dict:
        status, body = host.api("GET", "/api/presence?channel=bill:pres")
        assert status == 200, body
        return body

    deadline = time.monotonic() + 10
    while presence(a) != {"channel": "bill:pres", "subscribers": 3, "users": ["alice", "bob"]}:
        assert time.monotonic() < deadline, presence(a)
        time.sleep(0.2)
    assert presence(b) == presence(a)
    bob.ws.close()
    while presence(b) != {"channel": "bill:pres", "subscribers": 2, "users": ["alice"]}:
        assert time.monotonic() < deadline + 5, presence(b)
        time.sleep(0.2)
    assert a.api("GET", "/api/presence")[0] == 400
    assert a.api("GET", "/api/presence?channel=nope:1")[0] == 400


def test_presence_needs_the_redis_engine(broker):
    status, body = broker.api("GET", "/api/presence?channel=bill:1")
    assert status == 501 and "redis" in body["error"].lower()

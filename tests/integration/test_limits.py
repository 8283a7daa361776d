"""Liveness and limits (PROTOCOL.md §1) and the memory budget (§3), through
real `broker serve` processes and sockets."""
from __future__ import annotations

import json
import time

import pytest
from websockets.exceptions import ConnectionClosed

from broker.testing import http_json

from .wsclient import NativeClient, RawSocket, handshake_request

pytestmark = pytest.mark.timeout(90)


def start(broker_factory, tmp_path, toml: str, *args: str):
    config = tmp_path / "limits.toml"
    config.write_text(toml)
    return broker_factory("--allow-anonymous", "--config", str(config), *args)


def test_a_silent_connection_is_pinged_then_dropped(broker_factory, tmp_path):
    broker = start(broker_factory, tmp_path, "[limits]\nping_interval = 0.5\nping_timeout = 3.0\n",
                   "--shards", "1")
    raw = RawSocket(broker.port, timeout=10)
    raw.upgrade(broker.port)                      # never answers a ping
    started = time.monotonic()
    frames = []
    try:
        while True:
            frames.append(raw.read_frame())
    except (EOFError, ConnectionResetError):
        pass
    waited = time.monotonic() - started
    assert frames and frames[0][0] == 0x9, frames  # a Ping first
    closes = [payload for op, payload in frames if op == 0x8]
    assert closes and int.from_bytes(closes[0][:2], "big") == 1011
    assert 3.0 <= waited < 10.0
    # a client that answers pings (websockets does) stays connected
    with NativeClient(broker.ws_url) as alive:
        time.sleep(4.0)  # several pings answered by the client library
        assert alive.request("ping")["op"] == "pong"


def test_an_expired_token_closes_with_1008_unless_refreshed(broker_factory, tmp_path):
    broker = start(broker_factory, tmp_path, "", "--shards", "1")
    with NativeClient(broker.ws_url, token=broker.token("ann", ttl=2)) as expiring, \
            NativeClient(broker.ws_url, token=broker.token("bob", ttl=2)) as refreshing:
        fresh = broker.token("bob", ttl=60)
        reply = refreshing.request("refresh", token=fresh)
        assert reply["op"] == "refreshed" and reply["exp"] > time.time() + 50
        denied = refreshing.request("refresh", token=broker.token("ann", ttl=60))
        assert denied["op"] == "error" and denied["code"] == 403
        assert refreshing.request("refresh", token="garbage")["code"] == 403
        with pytest.raises(ConnectionClosed) as closed:
            expiring.recv(timeout=6)
        assert closed.value.rcvd.code == 1008 and "expired" in closed.value.rcvd.reason
        time.sleep(1.0)
        assert refreshing.request("ping")["op"] == "pong"  # bob refreshed: still here


def test_subscriptions_per_connection(broker_factory, tmp_path):
    broker = start(broker_factory, tmp_path, "[limits]\nsubscriptions_per_connection = 2\n",
                   "--shards", "1")
    with NativeClient(broker.ws_url) as client:
        assert client.subscribe("bill:1")["op"] == "subscribed"
        assert client.subscribe("bill:2")["op"] == "subscribed"
        refused = client.subscribe("bill:3")
        assert refused["op"] == "error" and refused["code"] == 429
        client.request("unsubscribe", channel="bill:1")
        assert client.subscribe("bill:3")["op"] == "subscribed"
        broker.publish("bill:2", "kept")
        assert client.pubs(1)[0]["data"] == "kept"


def _upgrade_status(port: int) -> tuple[int, bytes, RawSocket]:
    raw = RawSocket(port)
    raw.send(handshake_request(port))
    status, _, body = raw.read_head()
    return status, body, raw


def test_connections_per_ip_across_shards(broker_factory, tmp_path):
    broker = start(broker_factory, tmp_path, "[limits]\nconnections_per_ip = 4\n", "--shards", "2")
    held = [_upgrade_status(broker.port) for _ in range(4)]
    assert [status for status, _, _ in held] == [101] * 4
    status, body, extra = _upgrade_status(broker.port)
    assert status == 429 and "too many connections" in json.loads(body)["error"]
    extra.sock.close()
    held[0][2].sock.close()
    deadline = time.monotonic() + 5
    while True:  # the slot frees once the shard saw the close
        status, _, raw = _upgrade_status(broker.port)
        if status == 101 or time.monotonic() > deadline:
            break
        raw.sock.close()
        time.sleep(0.1)
    assert status == 101
    assert http_json("GET", broker.url + "/healthz")[0] == 200  # plain HTTP is not limited


def test_a_shard_over_its_memory_budget_refuses_upgrades_and_publishes(broker_factory, tmp_path):
    # A shard's idle RSS is far above 8 MiB: it goes to level 3 at its first check.
    broker = start(broker_factory, tmp_path, "[memory]\ncheck_interval = 0.2\n",
                   "--shards", "1", "--memory-limit-mb", "8")
    with NativeClient(broker.ws_url) as before:  # may have been admitted before the first check
        deadline = time.monotonic() + 10
        while broker.api("GET", "/api/stats")[1]["shards"][0]["degradation"] != 3:
            assert time.monotonic() < deadline, "never reached level 3"
            time.sleep(0.1)
        status, stats = broker.api("GET", "/api/stats")
        assert stats["memory_limit_bytes"] == 8 * 2**20
        status, body, _ = _upgrade_status(broker.port)
        assert status == 503 and "memory budget" in json.loads(body)["error"]
        status, reply = broker.api("POST", "/api/publish", {"channel": "bill:1", "data": 1})
        assert status == 503 and reply["error"].startswith("overloaded")
        assert http_json("GET", broker.url + "/readyz")[0] == 503
        assert http_json("GET", broker.url + "/healthz")[0] == 200
        _, metrics = http_json("GET", broker.url + "/metrics",
                               headers={"Authorization": f"apikey {broker.api_key}"})
        assert 'broker_degradation_level{shard="0"} 3.0' in metrics
        del before


def test_level_1_keeps_a_quarter_of_each_history_window(broker_factory, tmp_path):
    # Thresholds put an idle shard (tens of MB) at level 1 of a 1,000 MB
    # budget, far from level 2.
    broker = start(broker_factory, tmp_path,
                   "[memory]\ncheck_interval = 0.2\nlevel1 = 0.001\nlevel2 = 0.98\n"
                   "level3 = 0.99\nhysteresis = 0.0005\n",
                   "--shards", "1", "--memory-limit-mb", "1000")
    deadline = time.monotonic() + 10
    while broker.api("GET", "/api/stats")[1]["shards"][0]["degradation"] != 1:
        assert time.monotonic() < deadline, "never reached level 1"
        time.sleep(0.1)
    for i in range(40):
        assert broker.api("POST", "/api/publish", {"channel": "bill:1", "data": i})[0] == 200
    status, history = broker.api("GET", "/api/history?channel=bill:1&since=0")
    assert status == 200 and history["offset"] == 40
    # bill's history_size is 100: a quarter of it is kept under pressure
    assert [p["offset"] for p in history["publications"]] == list(range(16, 41))
    assert "history windows at 25%" in open(broker.log_path).read()


def test_few_file_descriptors_refuse_upgrades_with_503_and_keep_http_answering(tmp_path):
    from broker.testing import BrokerProcess

    broker = BrokerProcess(args=["--shards", "1", "--allow-anonymous"], nofile=200,
                           log_path=str(tmp_path / "broker.log"))
    broker.start()
    held: list[RawSocket] = []
    try:
        statuses = []
        attempts = 160  # more than 200 - what the shard holds - the reserve
        for _ in range(attempts):
            status, body, raw = _upgrade_status(broker.port)
            statuses.append(status)
            held.append(raw)
            if status != 101:
                assert status == 503 and "file descriptors" in json.loads(body)["error"]
        accepted = statuses.count(101)
        # One descriptor per WebSocket: more than two each could ever allow.
        assert (200 - 64) // 2 < accepted < 200 - 64 and statuses.count(503) == attempts - accepted
        assert statuses == [101] * accepted + [503] * (attempts - accepted)
        for _ in range(20):  # the reserve keeps plain HTTP answering
            assert http_json("GET", broker.url + "/healthz")[0] == 200
        _, stats = broker.api("GET", "/api/stats")
        assert stats["shards"][0]["upgrades_refused_fds"] == attempts - accepted
        assert stats["shards"][0]["websocket_capacity"] == accepted
        assert "upgrades refused with 503" in open(tmp_path / "broker.log").read()
    finally:
        for raw in held:
            raw.sock.close()
        broker.stop()

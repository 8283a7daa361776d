"""The native protocol end to end: a real ``broker serve`` and real clients."""
import time

import psutil
import pytest

from .wsclient import NativeClient

pytestmark = pytest.mark.timeout(60)

ROOMS = """
[namespaces.room]
client_publish = true
subscribe = "authenticated"
history_size = 100

[namespaces.tiny]
history_size = 3
"""


@pytest.fixture
def rooms_broker(broker_factory, tmp_path):
    config = tmp_path / "broker.toml"
    config.write_text(ROOMS)
    return broker_factory("--shards", "1", "--allow-anonymous", "--config", str(config))


def test_subscribe_publish_receive_in_order_without_gaps(broker):
    with NativeClient(broker.ws_url) as a, NativeClient(broker.ws_url, compression=None) as b:
        for client in (a, b):
            reply = client.subscribe("bill:42")
            assert reply["op"] == "subscribed" and reply["channel"] == "bill:42"
            assert reply["offset"] == 0 and isinstance(reply["epoch"], str)
        for i in range(50):
            assert broker.publish("bill:42", {"n": i, "text": "é\nline"})["offset"] == i + 1
        for client in (a, b):
            pubs = client.pubs(50)
            assert [p["offset"] for p in pubs] == list(range(1, 51))
            assert [p["data"]["n"] for p in pubs] == list(range(50))
            assert pubs[0] == {"op": "pub", "channel": "bill:42", "offset": 1,
                               "data": {"n": 0, "text": "é\nline"}}


def test_replies_carry_ids_in_command_order_and_batched_commands_work(broker):
    with NativeClient(broker.ws_url) as c:
        c.send({"id": 1, "op": "ping"}, {"id": 2, "op": "subscribe", "channel": "bill:1"},
               {"id": 3, "op": "ping"}, {"op": "ping"})
        replies = [c.recv() for _ in range(4)]
        assert [r.get("id") for r in replies] == [1, 2, 3, None]
        assert [r["op"] for r in replies] == ["pong", "subscribed", "pong", "pong"]
        reply = c.request("unsubscribe", channel="bill:1")
        assert reply == {"id": reply["id"], "op": "unsubscribed", "channel": "bill:1"}
        broker.publish("bill:1", "after")
        assert c.request("ping")["op"] == "pong"
        assert not c.pending  # nothing delivered after unsubscribing


def test_subscribe_twice_is_409_and_first_subscription_survives(broker):
    with NativeClient(broker.ws_url) as c:
        c.subscribe("bill:9")
        reply = c.subscribe("bill:9")
        assert reply["op"] == "error" and reply["code"] == 409
        broker.publish("bill:9", 1)
        assert c.pubs(1)[0]["data"] == 1


def test_recovery_returns_exactly_the_missed_publications(broker):
    with NativeClient(broker.ws_url) as c:
        first = c.subscribe("bill:7")
        broker.publish("bill:7", "seen")
        seen = c.pubs(1)[0]
    for i in range(10):
        broker.publish("bill:7", {"missed": i})
    with NativeClient(broker.ws_url) as c:
        reply = c.subscribe("bill:7", recover={"epoch": first["epoch"], "offset": seen["offset"]})
        assert reply["recovered"] is True and reply["offset"] == 11
        missed = c.pubs(10)
        assert [p["offset"] for p in missed] == list(range(2, 12))
        assert [p["data"] for p in missed] == [{"missed": i} for i in range(10)]
        broker.publish("bill:7", "live")
        assert c.pubs(1)[0]["offset"] == 12


def test_recovery_fails_honestly_when_history_cannot_cover(rooms_broker):
    broker = rooms_broker
    with NativeClient(broker.ws_url) as c:
        first = c.subscribe("tiny:1")
    for i in range(10):
        broker.publish("tiny:1", i)
    with NativeClient(broker.ws_url) as c:
        reply = c.subscribe("tiny:1", recover={"epoch": first["epoch"], "offset": 0})
        assert reply["recovered"] is False and reply["offset"] == 10
        reply2 = c.subscribe("tiny:2", recover={"epoch": "not-the-epoch", "offset": 0})
        assert reply2["recovered"] is False
        assert c.request("ping")["op"] == "pong"
        assert not c.pending  # nothing old was delivered


def test_permissions_and_namespaces(rooms_broker):
    broker = rooms_broker
    alice = broker.token("alice")
    with NativeClient(broker.ws_url) as anon:
        assert anon.subscribe("user:alice")["code"] == 401
        assert anon.subscribe("room:1")["code"] == 401
        assert anon.subscribe("nope:1")["code"] == 404
        assert anon.subscribe("bad channel")["code"] == 400
        assert anon.subscribe("bill:1")["op"] == "subscribed"
    with NativeClient(broker.ws_url, token=alice) as c:
        assert c.subscribe("user:alice")["op"] == "subscribed"
        assert c.subscribe("user:bob")["code"] == 403
        denied = c.request("publish", channel="bill:1", data={"x": 1})
        assert denied["op"] == "error" and denied["code"] == 403
        assert c.subscribe("room:7")["op"] == "subscribed"
        published = c.request("publish", channel="room:7", data={"hello": [1, 2]})
        assert published == {"id": published["id"], "op": "published", "channel": "room:7", "offset": 1}
        assert c.pubs(1)[0]["data"] == {"hello": [1, 2]}
        broker.publish("user:alice", {"note": "hi"})
        assert c.pubs(1)[0]["data"] == {"note": "hi"}
    with NativeClient(broker.ws_url, token=broker.token("carol", channels=["user:alice"])) as c:
        assert c.subscribe("user:alice")["op"] == "subscribed"


def test_bad_commands_get_400_then_budget_closes_1008(broker):
    from websockets.exceptions import ConnectionClosed

    with NativeClient(broker.ws_url) as c:
        c.send_raw("not json")
        error = c.recv()
        assert error["op"] == "error" and error["code"] == 400 and "id" not in error
        reply = c.request("frobnicate")
        assert reply["code"] == 400 and "unknown op" in reply["message"]
        assert c.request("ping")["op"] == "pong"  # still open
        with pytest.raises(ConnectionClosed) as closed:
            for _ in range(20):
                c.send_raw("{bad")
                c.recv()
        assert closed.value.rcvd.code == 1008


def test_anonymous_refused_without_allow_anonymous(broker_factory):
    from websockets.exceptions import InvalidStatus

    broker = broker_factory("--shards", "1")
    with pytest.raises(InvalidStatus) as refused:
        NativeClient(broker.ws_url)
    assert refused.value.response.status_code == 401
    assert b'"error"' in refused.value.response.body
    for bad in ("garbage", broker.token("x", ttl=-10)):
        with pytest.raises(InvalidStatus) as refused:
            NativeClient(broker.ws_url, token=bad)
        assert refused.value.response.status_code == 401
    with NativeClient(broker.ws_url + "?token=" + broker.token("u1")) as c:
        assert c.subscribe("user:u1")["op"] == "subscribed"


def test_stats_count_connections_and_deliveries(broker):
    with NativeClient(broker.ws_url) as a, NativeClient(broker.ws_url) as b:
        a.subscribe("bill:5")
        b.subscribe("bill:5")
        b.subscribe("bill:6")
        broker.publish("bill:5", 1)
        a.pubs(1), b.pubs(1)
        status, stats = broker.api("GET", "/api/stats")
        assert status == 200
        assert stats["connections"] == 2 and stats["subscriptions"] == 3
        assert stats["channels"] == 2 and stats["published"] == 1 and stats["delivered"] == 2
        shard = stats["shards"][0]
        assert shard["id"] == 0 and shard["up"] is True
        process = psutil.Process(shard["pid"])
        assert process.ppid() == broker.process.pid  # a shard of this broker
        # The reported memory is that shard's own resident size (not the supervisor's, not a constant).
        rss = process.memory_info().rss
        assert 0.5 * rss < shard["rss_bytes"] < 1.5 * rss
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if broker.api("GET", "/api/stats")[1]["connections"] == 0:
            break
        time.sleep(0.05)
    assert broker.api("GET", "/api/stats")[1]["subscriptions"] == 0

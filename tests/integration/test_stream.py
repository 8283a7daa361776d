"""The backend stream (PROTOCOL.md §3, GET /api/stream) through real sockets."""
import json

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from broker.testing import http_json

from .wsclient import NativeClient

pytestmark = pytest.mark.timeout(90)


def open_stream(broker, key: str | None = None):
    headers = {"Authorization": f"apikey {key or broker.api_key}"}
    return connect(f"ws://127.0.0.1:{broker.port}/api/stream", additional_headers=headers,
                   open_timeout=10, max_size=None)


def replies(ws, count: int) -> list[dict]:
    out: list[dict] = []
    while len(out) < count:
        out.extend(json.loads(line) for line in ws.recv(timeout=10).split("\n"))
    return out


def test_pipelined_publishes_are_acknowledged_in_order_and_delivered(broker):
    with NativeClient(broker.ws_url, token=broker.token("u1")) as client, open_stream(broker) as ws:
        client.subscribe("bill:7")
        client.subscribe("user:u1")
        commands = [{"id": i, "op": "publish", "channel": "bill:7", "data": {"n": i}} for i in range(50)]
        commands.append({"id": 50, "op": "publish", "channel": "user:u1", "data": "private"})
        ws.send("\n".join(json.dumps(c) for c in commands))
        got = replies(ws, 51)
        assert [r["id"] for r in got] == list(range(51))
        assert all(r["op"] == "published" and r["epoch"] for r in got)
        assert [r["offset"] for r in got[:50]] == list(range(1, 51))
        assert got[50] == {"id": 50, "op": "published", "channel": "user:u1",
                           "epoch": got[50]["epoch"], "offset": 1}
        pubs = client.pubs(51)
        assert [p["data"] for p in pubs if p["channel"] == "bill:7"] == [{"n": i} for i in range(50)]
        assert [p["data"] for p in pubs if p["channel"] == "user:u1"] == ["private"]
        # a "published" means stored: the history has it
        status, history = broker.api("GET", "/api/history?channel=bill:7&since=49")
        assert status == 200 and history["publications"] == [{"offset": 50, "data": {"n": 49}}]


def test_broadcast_over_the_stream(broker):
    with open_stream(broker) as ws:
        ws.send(json.dumps({"id": 1, "op": "broadcast", "channels": ["user:a", "user:b"], "data": [1]}))
        (reply,) = replies(ws, 1)
        assert reply["op"] == "broadcasted" and reply["id"] == 1
        assert [(r["channel"], r["offset"]) for r in reply["results"]] == [("user:a", 1), ("user:b", 1)]
        # refused whole when one channel is invalid: nothing published
        ws.send(json.dumps({"id": 2, "op": "broadcast", "channels": ["user:a", "bad channel"], "data": 1}))
        (error,) = replies(ws, 1)
        assert error["op"] == "error" and error["code"] == 400 and error["id"] == 2
        status, history = broker.api("GET", "/api/history?channel=user:a")
        assert history["offset"] == 1


def test_errors_keep_the_stream_open_and_in_order(broker):
    with open_stream(broker) as ws:
        ws.send("\n".join([
            '{"id":1,"op":"subscribe","channel":"bill:1"}',     # not a stream op
            "not json",
            '{"id":3,"op":"publish","channel":"nope:1","data":1}',  # unknown namespace
            '{"id":4,"op":"publish","channel":"bill:1"}',        # no data
            '{"id":5,"op":"publish","channel":"bill:1","data":{"ok":true}}',
        ]))
        got = replies(ws, 5)
        assert [(r.get("id"), r["op"], r.get("code")) for r in got] == [
            (1, "error", 400), (None, "error", 400), (3, "error", 404), (4, "error", 400),
            (5, "published", None)]


def test_the_stream_needs_the_api_key(broker):
    with pytest.raises(InvalidStatus) as refused:
        open_stream(broker, key="wrong").__enter__()
    assert refused.value.response.status_code == 401
    assert "API key" in json.loads(refused.value.response.body)["error"]
    status, body = http_json("GET", broker.url + "/api/stream")
    assert status == 426 and "error" in body


def test_stream_on_two_shards_reaches_every_home(broker_factory):
    broker = broker_factory("--shards", "2", "--allow-anonymous")
    channels = [f"bill:{i}" for i in range(40)]  # homes on both shards
    with open_stream(broker) as ws:
        ws.send("\n".join(json.dumps({"id": i, "op": "publish", "channel": c, "data": i})
                          for i, c in enumerate(channels)))
        got = replies(ws, len(channels))
    assert [r["id"] for r in got] == list(range(len(channels)))
    assert all(r["op"] == "published" and r["offset"] == 1 for r in got)
    status, stats = broker.api("GET", "/api/stats")
    assert sum(s["published"] for s in stats["shards"]) == len(channels)


def test_pipelined_commands_on_two_shards_keep_each_channels_order(broker_factory):
    """Commands run concurrently (one homed on the other shard no longer
    holds up those behind it), so order is the thing to check: replies in
    command order, and a channel's offsets in the order its commands came,
    whether the channel is homed here or on the other shard, published
    alone or in a broadcast, in one message or across messages."""
    broker = broker_factory("--shards", "2", "--allow-anonymous")
    channels = [f"user:{i}" for i in range(8)]  # homes on both shards
    commands = []
    for round_ in range(30):
        for i, channel in enumerate(channels):
            if (round_ + i) % 5 == 0:
                commands.append({"op": "broadcast", "channels": [channel, channels[(i + 3) % 8]], "data": round_})
            else:
                commands.append({"op": "publish", "channel": channel, "data": round_})
    for n, command in enumerate(commands):
        command["id"] = n
    with open_stream(broker) as ws:
        for start in range(0, len(commands), 37):  # messages of 37 commands, sent without waiting
            ws.send("\n".join(json.dumps(c) for c in commands[start:start + 37]))
        got = replies(ws, len(commands))
    assert [r["id"] for r in got] == list(range(len(commands)))
    offsets: dict[str, list[int]] = {}
    for reply in got:
        assert reply["op"] in ("published", "broadcasted"), reply
        for result in reply.get("results", [reply]):
            offsets.setdefault(result["channel"], []).append(result["offset"])
    assert offsets == {channel: list(range(1, len(offsets[channel]) + 1)) for channel in channels}


def test_publisher_over_the_stream(broker):
    from broker import Publisher
    from broker.errors import PublishError

    with NativeClient(broker.ws_url, token=broker.token("ann")) as client, \
            Publisher(broker.url, api_key=broker.api_key, stream=True) as publisher:
        client.subscribe("bill:9")
        client.subscribe("user:ann")
        assert publisher.broadcast_bill_update(9, {"status": "read"})["offset"] == 1
        assert publisher.send_user_notification("ann", "hello")["channel"] == "user:ann"
        batch = publisher.publish_batch([("bill:9", 2), ("bill:9", 3)])
        assert [r["offset"] for r in batch["results"]] == [2, 3]
        with pytest.raises(PublishError) as refused:
            publisher.publish("nope:1", 1)
        assert refused.value.status == 404
        assert publisher.publish("bill:9", 4)["offset"] == 4  # the stream survived the error
        assert [p["data"] for p in client.pubs(5)] == [{"status": "read"}, "hello", 2, 3, 4]
        assert publisher.get_stats()["published"] == 5  # HTTP still serves the rest


def test_async_publisher_pipelines_over_the_stream(broker):
    import asyncio

    from broker import AsyncPublisher
    from broker.errors import PublishError

    async def main() -> list[dict]:
        async with AsyncPublisher(broker.url, api_key=broker.api_key, stream=True) as publisher:
            replies = await asyncio.gather(*(publisher.publish("bill:pipe", i) for i in range(200)))
            with pytest.raises(PublishError):
                await AsyncPublisher(broker.url, api_key="wrong", stream=True).publish("bill:pipe", 0)
            return replies

    replies = asyncio.run(main())
    assert sorted(r["offset"] for r in replies) == list(range(1, 201))
    status, history = broker.api("GET", "/api/history?channel=bill:pipe&limit=1000")
    # offsets follow the calls' order: the stream keeps a backend's order
    assert [p["data"] for p in history["publications"]] == list(range(200))[-len(history["publications"]):]

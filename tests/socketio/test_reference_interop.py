"""The Sans-I/O Engine.IO and Socket.IO state machines against real clients
(socket.io-client in Node, python-socketio, raw HTTP as in Engine.IO's
compliance suite), through the test-only aiohttp wiring of reference_server.py."""
from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import pytest
import socketio

from broker.adapters.socketio import engine as eio

from .reference_server import ReferenceServer

FAST = eio.EngineConfig(ping_interval=0.3, ping_timeout=0.4, max_payload=65536, upgrade_timeout=5.0)


@pytest.fixture
def server():
    server = ReferenceServer(FAST, tokens={"good"}).start()
    yield server
    server.stop()


def http(method: str, url: str, body: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.parametrize("transports, first", [(["polling", "websocket"], "polling"), (["websocket"], "websocket")])
def test_socket_io_client_subscribes_upgrades_and_receives(server, node_client, transports, first):
    client = node_client(server.url, token="good", channels=["bill:1"], transports=transports,
                         count=3, timeout=20000)
    assert client.wait_for("connect")["transport"] == first
    assert client.wait_for("ack")["data"] == {"ok": True, "epoch": "ref", "offset": 0}
    if first == "polling" and not any(e["event"] == "upgrade" for e in client.events):
        client.wait_for("upgrade")
    time.sleep(1.0)   # several ping/pong rounds (0.3 s interval) on the final transport
    for i in range(3):
        server.publish("bill:1", {"i": i, "s": "\u001e\n"})
    pubs = [client.wait_for("pub")["data"] for _ in range(3)]
    assert pubs == [{"channel": "bill:1", "offset": i + 1, "data": {"i": i, "s": "\u001e\n"}} for i in range(3)]
    assert client.wait_for("done")["pubs"] == 3
    assert not [e for e in client.events if e["event"] == "disconnect"]
    time.sleep(0.2)
    # the session ended because the client left, never a ping timeout or a protocol error
    assert [reason for reason, _ in server.closed] in ([], ["client left"])


def test_refused_token_is_a_connect_error(server, node_client):
    client = node_client(server.url, token="bad", channels=["bill:1"], reconnection=False)
    assert client.wait_for("connect_error")["message"] == "invalid token"


def test_drain_sends_reconnect_then_a_transport_close_and_the_client_comes_back(server, node_client):
    client = node_client(server.url, token="good", channels=["bill:7"], transports=["websocket"], recover=True)
    client.wait_for("ack")
    server.publish("bill:7", "one")
    client.wait_for("pub")
    server.close_all("drain", 100)
    assert client.wait_for("reconnect")["data"] == {"reason": "drain", "after_ms": 100}
    assert client.wait_for("disconnect")["reason"] == "transport close"   # not "io server disconnect"
    client.wait_for("connect")
    ack = client.wait_for("ack")
    assert ack["request"] == {"channel": "bill:7", "recover": {"epoch": "ref", "offset": 1}}


def test_python_socketio_over_long_polling_survives_pings(server):
    async def scenario() -> tuple[dict, dict]:
        client = socketio.AsyncClient(reconnection=False)
        received: asyncio.Queue = asyncio.Queue()
        client.on("pub", received.put_nowait)
        await client.connect(server.url, transports=["polling"], auth={"token": "good"}, wait_timeout=10)
        ack = await client.call("subscribe", {"channel": "user:5"}, timeout=10)
        await asyncio.sleep(1.2)                  # four ping rounds over polling
        assert client.connected
        await asyncio.get_running_loop().run_in_executor(None, server.publish, "user:5", {"n": 1})
        pub = await asyncio.wait_for(received.get(), 10)
        refused = await client.call("subscribe", {"channel": "user:5"}, timeout=10)
        await client.disconnect()
        return ack, pub, refused

    ack, pub, refused = asyncio.run(scenario())
    assert ack == {"ok": True, "epoch": "ref", "offset": 0}
    assert pub == {"channel": "user:5", "offset": 1, "data": {"n": 1}}
    assert refused == {"ok": False, "code": 409, "message": "already subscribed"}


def test_raw_polling_as_the_compliance_suite_does(server):
    base = server.url + "/socket.io/?EIO=4&transport=polling"
    status, body = http("GET", base)
    assert status == 200 and body[:1] == b"0"
    handshake = json.loads(body[1:])
    assert handshake["upgrades"] == ["websocket"]
    assert (handshake["pingInterval"], handshake["pingTimeout"], handshake["maxPayload"]) == (300, 400, 65536)
    sid_url = f"{base}&sid={handshake['sid']}"
    assert http("POST", sid_url, b'40{"token":"good"}') == (200, b"ok")
    status, body = http("GET", sid_url)
    assert status == 200 and body.startswith(b'40{"sid":')
    assert http("GET", sid_url) == (200, b"2")          # the server's ping, after pingInterval
    assert http("POST", sid_url, b"3") == (200, b"ok")
    # no pong this time: pingInterval + pingTimeout later the session is gone
    assert http("GET", sid_url) == (200, b"2")
    time.sleep(0.6)
    status, body = http("GET", sid_url)
    assert (status, json.loads(body)) == (400, {"code": 1, "message": "Session ID unknown"})
    assert ("ping timeout", 1011) in server.closed


@pytest.mark.parametrize("query, method, code", [
    ("EIO=4&transport=abc", "GET", 0),
    ("EIO=3&transport=polling", "GET", 5),
    ("EIO=4&transport=polling", "POST", 2),
    ("EIO=4&transport=polling&sid=0.AAAAAAAAAAAAAAAAAAAA", "GET", 1),
])
def test_raw_errors_are_engine_io_json(server, query, method, code):
    status, body = http(method, f"{server.url}/socket.io/?{query}", b"" if method == "POST" else None)
    assert status == 400 and json.loads(body)["code"] == code


def test_raw_bad_packet_ends_the_session(server):
    base = server.url + "/socket.io/?EIO=4&transport=polling"
    sid = json.loads(http("GET", base)[1][1:])["sid"]
    status, body = http("POST", f"{base}&sid={sid}", b"abc")
    assert status == 400 and json.loads(body)["code"] == 3
    assert http("GET", f"{base}&sid={sid}")[0] == 400

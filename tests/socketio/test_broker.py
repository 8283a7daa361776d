"""Socket.IO against a real ``broker serve`` (PROTOCOL.md §4), with clients no
one here wrote: python-socketio's AsyncClient and socket.io-client (Node),
beside the native protocol's clients, on one shard and on several."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
import socketio

from tests.integration.wsclient import NativeClient

pytestmark = pytest.mark.timeout(90)

FAST_PINGS = """
[limits]
ping_interval = 1.0
ping_timeout = 1.0
"""


def http(method: str, url: str, body: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class PySocketIO:
    """python-socketio's AsyncClient on a loop of its own thread-less run:
    each call runs to completion with ``asyncio.run``-like helpers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.client = socketio.AsyncClient(reconnection=False, engineio_logger=bool(os.environ.get("SIO_DEBUG")))
        self.pubs: list[dict[str, Any]] = []
        self.events: list[tuple[str, Any]] = []
        self.client.on("pub", self.pubs.append)
        self.client.on("unsubscribed", lambda data: self.events.append(("unsubscribed", data)))
        self.client.on("reconnect", lambda data: self.events.append(("reconnect", data)))
        self.client.on("disconnect", lambda *reason: self.events.append(("disconnect", reason)))
        self.client.on("connect_error", lambda data: self.events.append(("connect_error", data)))

    def run(self, coro: Any, timeout: float = 10.0) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def connect(self, url: str, token: str | None = None, transports: list[str] | None = None) -> None:
        self.run(self.client.connect(url, auth={"token": token} if token else {},
                                     transports=transports or ["websocket"], wait_timeout=5))

    def call(self, event: str, data: dict[str, Any]) -> Any:
        return self.run(self.client.call(event, data, timeout=5))

    def wait_pubs(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        async def wait() -> None:
            while len(self.pubs) < count:
                await asyncio.sleep(0.02)
        self.run(wait(), timeout)
        return self.pubs[:count]

    def sleep(self, seconds: float) -> None:
        self.run(asyncio.sleep(seconds), seconds + 5)

    def refused(self, url: str, token: str | None = None) -> str:
        """Connect, expecting a refusal: the CONNECT_ERROR's message."""
        with pytest.raises(socketio.exceptions.ConnectionError):
            self.connect(url, token)
        return next(data for name, data in self.events if name == "connect_error")["message"]

    def close(self) -> None:
        if self.loop.is_closed():
            return
        try:
            self.run(self.client.disconnect())
            self.run(asyncio.sleep(0.05))
            http_session = self.client.eio.http
            if http_session is not None and not http_session.closed:
                self.run(http_session.close())
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.run(asyncio.sleep(0))
        finally:
            self.loop.close()




@pytest.mark.parametrize("transports", [["websocket"], ["polling", "websocket"], ["polling"]])
def test_python_client_subscribes_and_receives_beside_a_native_client(broker, pyclient, transports):
    sio = pyclient()
    sio.connect(broker.url, token=broker.token("alice"), transports=transports)
    assert sio.client.transport() == transports[-1]
    reply = sio.call("subscribe", {"channel": "bill:7"})
    with NativeClient(broker.ws_url) as native:
        native_reply = native.subscribe("bill:7")
        assert reply == {"ok": True, "epoch": native_reply["epoch"], "offset": 0}
        for i in range(20):
            broker.publish("bill:7", {"i": i, "text": "é\n\u001e"})
        pubs = sio.wait_pubs(20)
        natives = native.pubs(20)
    assert [p["offset"] for p in pubs] == list(range(1, 21))
    assert pubs == [{"channel": n["channel"], "offset": n["offset"], "data": n["data"]} for n in natives]
    assert sio.call("unsubscribe", {"channel": "bill:7"}) == {"ok": True}
    broker.publish("bill:7", "after")
    assert sio.call("subscribe", {"channel": "bill:7"})["offset"] == 21
    assert len(sio.pubs) == 20


def test_auth_refused_and_anonymous_only_when_allowed(broker_factory, pyclient, node_client):
    strict = broker_factory("--shards", "1")
    assert pyclient().refused(strict.url, token=strict.token("alice")[:-4] + "AAAA") == \
        "token signature is invalid"
    assert pyclient().refused(strict.url).startswith("authentication required")
    assert pyclient().refused(strict.url, token=strict.token("alice", ttl=-60)) == "token expired"
    refused = node_client(strict.url, token="not-a-jwt", channels=["bill:1"], reconnection=False)
    assert refused.wait_for("connect_error")["message"] == "malformed token"
    accepted = pyclient()
    accepted.connect(strict.url, token=strict.token("alice"))
    assert accepted.call("subscribe", {"channel": "user:alice"})["ok"] is True


def test_error_acks_use_the_native_codes(broker, pyclient):
    sio = pyclient()
    sio.connect(broker.url, token=broker.token("alice"))
    refused = sio.call("subscribe", {"channel": "user:bob"})
    assert refused["ok"] is False and refused["code"] == 403
    assert sio.call("subscribe", {"channel": "user:alice"})["ok"] is True
    assert sio.call("subscribe", {"channel": "user:alice"})["code"] == 409
    assert sio.call("subscribe", {"channel": "no spaces"})["code"] == 400
    anonymous = pyclient()
    anonymous.connect(broker.url)
    assert anonymous.call("subscribe", {"channel": "user:alice"})["code"] == 401
    assert anonymous.call("subscribe", {"channel": "bill:1"})["ok"] is True


def test_recover_after_a_dropped_connection_acks_first_then_missed_then_new(broker, pyclient):
    first = pyclient()
    first.connect(broker.url)
    ack = first.call("subscribe", {"channel": "bill:9"})
    broker.publish("bill:9", 1)
    assert first.wait_pubs(1)[0]["offset"] == 1
    first.close()
    for i in range(2, 5):
        broker.publish("bill:9", i)
    again = pyclient()
    again.connect(broker.url)
    reply = again.call("subscribe", {"channel": "bill:9", "recover": {"epoch": ack["epoch"], "offset": 1}})
    assert reply == {"ok": True, "epoch": ack["epoch"], "offset": 4, "recovered": True}
    broker.publish("bill:9", 5)
    assert [(p["offset"], p["data"]) for p in again.wait_pubs(4)] == [(2, 2), (3, 3), (4, 4), (5, 5)]
    lost = again.call("subscribe", {"channel": "bill:8", "recover": {"epoch": "gone", "offset": 3}})
    assert lost["recovered"] is False


@pytest.mark.parametrize("transports", [["websocket"], ["polling", "websocket"]])
def test_socket_io_client_from_npm_receives_in_order(broker, node_client, transports):
    client = node_client(broker.url, token=broker.token("carol"), channels=["bill:3"],
                         transports=transports, count=5, timeout=20000)
    connected = client.wait_for("connect")["transport"]
    assert connected in transports   # the upgrade may complete before the CONNECT answer
    assert client.wait_for("ack")["data"]["ok"] is True
    if connected != transports[-1] and not any(e["event"] == "upgrade" for e in client.events):
        client.wait_for("upgrade")
    for i in range(5):
        broker.publish("bill:3", {"i": i})
    assert [client.wait_for("pub")["data"]["offset"] for _ in range(5)] == [1, 2, 3, 4, 5]
    assert client.wait_for("done")["pubs"] == 5


def test_other_namespaces_binary_and_malformed_packets(broker, pyclient):
    sio = pyclient()
    sio.connect(broker.url)
    # another namespace: CONNECT_ERROR, and the session on "/" goes on
    with pytest.raises(socketio.exceptions.ConnectionError):
        other = pyclient()
        other.run(other.client.connect(broker.url, namespaces=["/admin"], transports=["websocket"],
                                       wait_timeout=3))
    assert sio.call("subscribe", {"channel": "bill:1"})["ok"] is True
    # raw Engine.IO over polling: a binary packet and a malformed one end the session, not the shard
    status, body = http("GET", broker.url + "/socket.io/?EIO=4&transport=polling")
    sid = json.loads(body[1:])["sid"]
    assert http("POST", f"{broker.url}/socket.io/?EIO=4&transport=polling&sid={sid}", b"40")[0] == 200
    status, body = http("POST", f"{broker.url}/socket.io/?EIO=4&transport=polling&sid={sid}", b"bAAAA")
    assert status == 400
    assert http("GET", f"{broker.url}/socket.io/?EIO=4&transport=polling&sid={sid}")[0] == 400
    status, body = http("GET", broker.url + "/socket.io/?EIO=4&transport=polling")
    sid = json.loads(body[1:])["sid"]
    http("POST", f"{broker.url}/socket.io/?EIO=4&transport=polling&sid={sid}", b"40")
    http("GET", f"{broker.url}/socket.io/?EIO=4&transport=polling&sid={sid}")   # the CONNECT answer
    assert http("POST", f"{broker.url}/socket.io/?EIO=4&transport=polling&sid={sid}", b'42["subscribe",')[0] == 200
    status, body = http("GET", f"{broker.url}/socket.io/?EIO=4&transport=polling&sid={sid}")
    assert (status, body) in ((200, b"1"), (400, body))   # closed: the close packet, or gone
    # Engine.IO request errors as engine.io answers them
    status, body = http("GET", broker.url + "/socket.io/?EIO=4&transport=carrier-pigeon")
    assert (status, json.loads(body)["code"]) == (400, 0)
    assert http("GET", broker.url + "/socket.io/?EIO=4&transport=polling&sid=0.aaaaaaaaaaaaaaaaaaaa") == \
        (400, b'{"code":1,"message":"Session ID unknown"}')
    assert http("GET", broker.url + "/socket.io/?EIO=3&transport=polling")[0] == 400
    # the shard is still there for everyone
    sio.sleep(0.2)
    broker.publish("bill:1", "still here")
    assert sio.wait_pubs(1)[0]["data"] == "still here"


def test_ping_timeout_ends_a_silent_session(broker_factory, tmp_path):
    config = tmp_path / "fast.toml"
    config.write_text(FAST_PINGS)
    broker = broker_factory("--shards", "1", "--allow-anonymous", "--config", str(config))
    status, body = http("GET", broker.url + "/socket.io/?EIO=4&transport=polling")
    opened = json.loads(body[1:])
    assert (opened["pingInterval"], opened["pingTimeout"], opened["maxPayload"]) == (1000, 1000, 65536)
    url = f"{broker.url}/socket.io/?EIO=4&transport=polling&sid={opened['sid']}"
    assert http("GET", url) == (200, b"2")           # the server pings ...
    time.sleep(3.5)                                   # ... and this client never answers
    assert http("GET", url) == (400, b'{"code":1,"message":"Session ID unknown"}')


def test_drain_sends_reconnect_then_closes_the_transport(broker_factory, node_client, pyclient):
    broker = broker_factory("--shards", "1", "--allow-anonymous")
    client = node_client(broker.url, channels=["bill:5"], transports=["websocket"], timeout=20000)
    client.wait_for("ack")
    sio = pyclient()
    sio.connect(broker.url, transports=["polling"])
    sio.call("subscribe", {"channel": "bill:5"})
    sio.sleep(0.3)   # its next poll is parked
    broker.process.send_signal(signal.SIGTERM)
    reconnect = client.wait_for("reconnect")["data"]
    assert reconnect["reason"] and isinstance(reconnect["after_ms"], int)
    assert client.wait_for("disconnect")["reason"] == "transport close"  # socket.io-client reconnects itself
    sio.sleep(0.5)
    assert ("reconnect", {"reason": reconnect["reason"], "after_ms": reconnect["after_ms"]}) in sio.events
    assert broker.process.wait(20) == 0


# -- several shards: a session's requests land anywhere ---------------------------

def test_polling_requests_on_new_connections_reach_the_owner_shard(broker_factory):
    """Each request on its own TCP connection: SO_REUSEPORT spreads them over
    the four shards (all on the owner by chance: (1/4)^40), and every one is
    answered by the session's shard."""
    broker = broker_factory("--shards", "4", "--allow-anonymous")
    status, body = http("GET", broker.url + "/socket.io/?EIO=4&transport=polling")
    url = f"{broker.url}/socket.io/?EIO=4&transport=polling&sid={json.loads(body[1:])['sid']}"
    assert http("POST", url, b"40") == (200, b"ok")
    assert http("GET", url)[1].startswith(b"40{")
    assert http("POST", url, b'420["subscribe",{"channel":"bill:4"}]') == (200, b"ok")
    assert json.loads(http("GET", url)[1][3:])[0]["ok"] is True
    for i in range(40):
        assert http("POST", url, b"6") == (200, b"ok"), i   # noop: answered by the owner
    broker.publish("bill:4", {"n": 1})
    assert http("GET", url) == (200, b'42["pub",{"channel":"bill:4","offset":1,"data":{"n":1}}]')


@pytest.mark.parametrize("transports", [["polling"], ["polling", "websocket"]])
def test_clients_on_several_shards_beside_native_ones(broker_factory, pyclient, node_client, transports):
    broker = broker_factory("--shards", "3", "--allow-anonymous")
    nodes = [node_client(broker.url, channels=["bill:6"], transports=transports, count=30, timeout=30000)
             for _ in range(3)]
    pys = [pyclient() for _ in range(3)]
    for sio in pys:
        sio.connect(broker.url, transports=transports)
        assert sio.call("subscribe", {"channel": "bill:6"})["ok"] is True
    for client in nodes:
        assert client.wait_for("ack", timeout=15)["data"]["ok"] is True
    with NativeClient(broker.ws_url) as native:
        native.subscribe("bill:6")
        for i in range(30):
            broker.publish("bill:6", {"i": i})
        expected = [{"channel": p["channel"], "offset": p["offset"], "data": p["data"]} for p in native.pubs(30)]
    for sio in pys:
        assert sio.wait_pubs(30, timeout=20) == expected
    for client in nodes:
        assert [client.wait_for("pub", timeout=15)["data"] for _ in range(30)] == expected

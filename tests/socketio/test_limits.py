"""PROTOCOL.md §4 "The limits of §1 apply to Socket.IO sessions too", over a
real ``broker serve``: a Socket.IO client on the WebSocket transport that
stops reading is cut as a slow consumer (1013) like a native one, and a
session whose JWT expires without a refresh is closed (1008) while a
refreshed one lives on. Raw Engine.IO frames, so the client can stop
reading and the close code is read off the wire."""
from __future__ import annotations

import json
import time

import pytest

from tests.integration.wsclient import RawSocket, handshake_request

pytestmark = pytest.mark.timeout(90)


class RawEngineIO:
    """A Socket.IO client on a bare WebSocket (``transport=websocket``)."""

    def __init__(self, port: int, token: str | None = None) -> None:
        self.raw = RawSocket(port, timeout=10)
        self.raw.send(handshake_request(port, path="/socket.io/?EIO=4&transport=websocket"))
        status, _, _ = self.raw.read_head()
        assert status == 101
        opened = self.text()
        assert opened.startswith("0") and "sid" in json.loads(opened[1:])
        self.send("40" + (json.dumps({"token": token}) if token else ""))
        connected = self.text()
        assert connected.startswith("40{"), connected
        self._ack = 0

    def send(self, text: str) -> None:
        self.raw.send(RawSocket.frame(0x1, text.encode()))

    def text(self) -> str:
        """The next text frame (Engine.IO pings are answered and skipped)."""
        while True:
            opcode, payload = self.raw.read_frame()
            if opcode == 0x8:
                raise EOFError(f"closed: {int.from_bytes(payload[:2], 'big')}")
            if opcode != 0x1:
                continue
            text = payload.decode()
            if text == "2":
                self.send("3")
                continue
            return text

    def call(self, event: str, data: dict[str, object]) -> object:
        """Emit with an ack; the ack's argument (events in between are skipped)."""
        self._ack += 1
        self.send(f"42{self._ack}" + json.dumps([event, data]))
        prefix = f"43{self._ack}"
        while True:
            text = self.text()
            if text.startswith(prefix):
                return json.loads(text[len(prefix):])[0]

    def pub(self) -> dict[str, object]:
        while True:
            text = self.text()
            if text.startswith('42["pub"'):
                event: dict[str, object] = json.loads(text[2:])[1]
                return event


def test_a_socketio_client_that_stops_reading_is_cut_as_a_slow_consumer(broker_factory, tmp_path):
    config = tmp_path / "small.toml"
    config.write_text("[limits]\noutbound_buffer_bytes = 65536\n")
    broker = broker_factory("--shards", "1", "--allow-anonymous", "--config", str(config))
    slow = RawEngineIO(broker.port)
    ack = slow.call("subscribe", {"channel": "bill:slow"})
    assert isinstance(ack, dict) and ack["ok"] is True and ack["offset"] == 0
    payload = "x" * 16000
    cut = False
    for i in range(3000):       # the slow client reads nothing from here on
        broker.publish("bill:slow", payload)
        if i % 50 == 49 and broker.api("GET", "/api/stats")[1]["shards"][0]["slow_consumers"] >= 1:
            cut = True
            break
    assert cut, "the Socket.IO client that never reads was not cut"
    _, stats = broker.api("GET", "/api/stats")
    assert stats["shards"][0]["slow_consumers"] == 1 and stats["shards"][0]["connections"] == 0
    # it finds, after the data it could take, the same close as a native client
    slow.raw.sock.settimeout(10)
    assert slow.raw.close_code() == 1013


def test_a_socketio_session_whose_token_expires_is_closed_unless_refreshed(broker_factory):
    broker = broker_factory("--shards", "1")
    expiring = RawEngineIO(broker.port, token=broker.token("ann", ttl=2))
    refreshing = RawEngineIO(broker.port, token=broker.token("bob", ttl=2))
    ack = refreshing.call("refresh", {"token": broker.token("bob", ttl=60)})
    assert isinstance(ack, dict) and ack["ok"] is True and ack["exp"] > time.time() + 50
    denied = refreshing.call("refresh", {"token": broker.token("ann", ttl=60)})
    assert isinstance(denied, dict) and denied["ok"] is False and denied["code"] == 403
    assert refreshing.call("subscribe", {"channel": "bill:7"})["ok"] is True  # type: ignore[index]
    started = time.monotonic()
    expiring.raw.sock.settimeout(10)
    assert expiring.raw.close_code() == 1008           # exp passed, no refresh: closed
    assert time.monotonic() - started < 6
    time.sleep(1.5)                                     # well past bob's first token's exp
    broker.publish("bill:7", "still here")
    assert refreshing.pub()["data"] == "still here"
    _, stats = broker.api("GET", "/api/stats")
    assert stats["shards"][0]["connections"] == 1

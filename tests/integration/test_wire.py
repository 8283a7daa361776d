"""Handshake refusals and RFC 6455 violations, with raw sockets."""
import json
import time

import pytest

from .wsclient import NativeClient, RawSocket, handshake_request

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def strict_broker(broker_factory, tmp_path):
    config = tmp_path / "limits.toml"
    config.write_text("[limits]\nhandshake_timeout = 0.5\nmax_message_size = 1024\n")
    return broker_factory("--shards", "1", "--allow-anonymous", "--config", str(config))


def test_wrong_version_is_426_with_version_header(broker):
    raw = RawSocket(broker.port)
    raw.send(handshake_request(broker.port, version="8"))
    status, headers, body = raw.read_head()
    assert status == 426 and headers["sec-websocket-version"] == "13"
    assert "error" in json.loads(body)


def test_malformed_upgrade_is_400(broker):
    raw = RawSocket(broker.port)
    raw.send(handshake_request(broker.port, key="short"))
    status, _, body = raw.read_head()
    assert status == 400 and "Sec-WebSocket-Key" in json.loads(body)["error"]
    raw = RawSocket(broker.port)
    raw.send(b"GARBAGE / HTTP/1.1\r\n\r\n")
    assert raw.read_head()[0] == 400


def test_too_many_headers_is_431(broker):
    raw = RawSocket(broker.port)
    extra = "".join(f"X-Filler-{i}: {'v' * 20}\r\n" for i in range(200))
    raw.send(handshake_request(broker.port, extra=extra))
    assert raw.read_head()[0] == 431


def test_slow_handshake_is_disconnected(strict_broker):
    raw = RawSocket(strict_broker.port)
    raw.send(b"GET /ws HTTP/1.1\r\nHost: x\r\n")  # never finishes the head
    started = time.monotonic()
    assert raw.sock.recv(100) == b""  # the server hung up
    assert time.monotonic() - started < 5


def test_binary_message_closes_1003(broker):
    raw = RawSocket(broker.port)
    raw.upgrade(broker.port)
    raw.send(RawSocket.frame(0x2, b"\x00\x01"))
    assert raw.close_code() == 1003


def test_message_over_limit_closes_1009_also_when_fragmented(strict_broker):
    raw = RawSocket(strict_broker.port)
    raw.upgrade(strict_broker.port)
    raw.send(RawSocket.frame(0x1, b"x" * 2000))
    assert raw.close_code() == 1009
    raw = RawSocket(strict_broker.port)
    raw.upgrade(strict_broker.port)
    raw.send(RawSocket.frame(0x1, b"x" * 600, fin=False) + RawSocket.frame(0x0, b"y" * 600))
    assert raw.close_code() == 1009


def test_fragmented_text_message_is_reassembled(broker):
    raw = RawSocket(broker.port)
    raw.upgrade(broker.port)
    command = b'{"id":7,"op":"ping"}'
    raw.send(RawSocket.frame(0x1, command[:5], fin=False) + RawSocket.frame(0x9, b"hi")
             + RawSocket.frame(0x0, command[5:]))
    frames = [raw.read_frame(), raw.read_frame()]
    assert (0xA, b"hi") in frames  # the ping in the middle was answered
    assert (0x1, b'{"id":7,"op":"pong"}') in frames


@pytest.mark.parametrize("frame", [
    RawSocket.frame(0x1, b'{"op":"ping"}', mask=False),           # unmasked client frame
    RawSocket.frame(0x3, b"x"),                                    # reserved opcode
    RawSocket.frame(0x1, b'{"op":"ping"}', rsv=0b010),             # RSV2 set
    RawSocket.frame(0x9, b"p" * 126),                              # control frame > 125
    RawSocket.frame(0x9, b"p", fin=False),                         # fragmented control frame
    RawSocket.frame(0x0, b"orphan"),                               # continuation without start
], ids=["unmasked", "reserved-opcode", "rsv-bit", "big-control", "fragmented-control", "orphan-cont"])
def test_rfc6455_violations_close_1002(broker, frame):
    raw = RawSocket(broker.port)
    raw.upgrade(broker.port)
    raw.send(frame)
    assert raw.close_code() == 1002


def test_invalid_utf8_closes_1007(broker):
    raw = RawSocket(broker.port)
    raw.upgrade(broker.port)
    raw.send(RawSocket.frame(0x1, b'{"op":"ping","x":"\xff\xfe"}'))
    assert raw.close_code() == 1007


def test_a_misbehaving_client_does_not_hurt_others(broker):
    with NativeClient(broker.ws_url) as good:
        good.subscribe("bill:3")
        for frame in (RawSocket.frame(0x2, b"x"), RawSocket.frame(0x1, b"\xff"),
                      RawSocket.frame(0x1, b"x", mask=False)):
            raw = RawSocket(broker.port)
            raw.upgrade(broker.port)
            raw.send(frame)
            raw.close_code()
            raw.close()
        broker.publish("bill:3", "still here")
        assert good.pubs(1)[0]["data"] == "still here"


def test_permessage_deflate_is_negotiated_without_context_takeover(broker):
    client = NativeClient(broker.ws_url, compression="deflate")
    try:
        extensions = client.ws.response.headers.get("Sec-WebSocket-Extensions", "")
        assert "permessage-deflate" in extensions and "server_no_context_takeover" in extensions
        client.subscribe("bill:77")
        broker.publish("bill:77", {"text": "compress me " * 50})
        assert client.pubs(1)[0]["data"]["text"].startswith("compress me")
    finally:
        client.close()


def test_http_to_ws_path_without_upgrade_is_426(broker):
    status, body = broker.api("GET", "/ws")
    assert status == 426 and "error" in body

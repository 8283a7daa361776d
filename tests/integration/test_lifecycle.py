"""Stopping, slow consumers and other things that end connections."""
import signal

import pytest
from websockets.exceptions import ConnectionClosed

from .wsclient import NativeClient, RawSocket

pytestmark = pytest.mark.timeout(60)


def test_sigterm_drains_clients_and_exits_0(broker):
    with NativeClient(broker.ws_url) as c:
        c.subscribe("bill:1")
        broker.publish("bill:1", "before")
        assert c.pubs(1)[0]["data"] == "before"
        broker.process.send_signal(signal.SIGTERM)
        message = c.recv()
        assert message["op"] == "reconnect" and message["after_ms"] >= 0 and message["reason"]
        with pytest.raises(ConnectionClosed) as closed:
            c.recv()
        assert closed.value.rcvd.code == 1012
    assert broker.process.wait(20) == 0


def test_sigint_also_exits_0(broker):
    assert broker.stop(signal.SIGINT) == 0


def test_slow_consumer_is_closed_1013_and_counted(broker_factory, tmp_path):
    config = tmp_path / "small.toml"
    config.write_text("[limits]\noutbound_buffer_bytes = 65536\n")
    broker = broker_factory("--shards", "1", "--allow-anonymous", "--config", str(config))
    raw = RawSocket(broker.port)
    raw.upgrade(broker.port)
    raw.send(RawSocket.frame(0x1, b'{"id":1,"op":"subscribe","channel":"bill:flood"}'))
    with NativeClient(broker.ws_url) as healthy:
        healthy.subscribe("bill:flood")
        payload = "x" * 4000
        closed = False
        for i in range(6000):
            broker.publish("bill:flood", payload)
            stats = broker.api("GET", "/api/stats")[1] if i % 100 == 99 else None
            if stats and stats["shards"][0]["slow_consumers"] >= 1:
                closed = True
                break
        assert closed, "the reader that never reads was not cut"
        # the healthy client got everything, in order
        received = healthy.pubs(i + 1, timeout=20)
        assert [p["offset"] for p in received] == list(range(1, i + 2))
    # the slow one finds a 1013 close after the data it could take
    raw.sock.settimeout(10)
    assert raw.close_code() == 1013

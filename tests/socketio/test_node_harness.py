"""The real-client harness works: socket.io-client (node/client.js) and
python-socketio against the Node socket.io baseline server, over polling
with the upgrade and over WebSocket alone. (The broker's own Socket.IO
endpoint is tested with the same clients once the shard serves it.)"""
from __future__ import annotations

import asyncio

import pytest
import socketio


@pytest.mark.parametrize("transports, first, upgraded", [
    (["polling", "websocket"], "polling", True),     # socket.io-client's default: polling, then upgrade
    (["websocket"], "websocket", False),
])
def test_node_client_subscribes_and_prints_publications(node_client, socketio_baseline,
                                                        transports, first, upgraded):
    socketio_baseline.publish("bill:1", {"before": True})      # offset 1, before the client
    client = node_client(socketio_baseline.url, channels=["bill:1"], transports=transports,
                         count=2, timeout=20000)
    connect = client.wait_for("connect")
    assert connect["transport"] == first and connect["sid"]
    ack = client.wait_for("ack")
    assert ack["for"] == "subscribe" and ack["request"] == {"channel": "bill:1"}
    assert ack["data"] == {"ok": True, "epoch": "baseline", "offset": 1}
    if upgraded and not any(e["event"] == "upgrade" for e in client.events):   # it may come before the ack
        client.wait_for("upgrade")
    assert [e["transport"] for e in client.events if e["event"] == "upgrade"] == (["websocket"] if upgraded else [])
    for i in (2, 3):
        assert socketio_baseline.publish("bill:1", {"n": i, "text": "é\n"})["offset"] == i
    pubs = [client.wait_for("pub")["data"] for _ in range(2)]
    assert pubs == [{"channel": "bill:1", "offset": i, "data": {"n": i, "text": "é\n"}} for i in (2, 3)]
    assert client.wait_for("done") == {"event": "done", "pubs": 2}
    assert client.close() == 0


def test_node_client_emits_commands_from_stdin(node_client, socketio_baseline):
    client = node_client(socketio_baseline.url, channels=["bill:2"], transports=["websocket"])
    client.wait_for("ack")
    client.emit("subscribe", {"channel": "bill:2"})
    assert client.wait_for("ack")["data"] == {"ok": False, "code": 409, "message": "already subscribed"}
    client.emit("unsubscribe", {"channel": "bill:2"})
    assert client.wait_for("ack") == {"event": "ack", "for": "unsubscribe", "request": {"channel": "bill:2"},
                                      "data": {"ok": True}}
    assert client.close() == 0
    assert client.wait_for("done") == {"event": "done", "pubs": 0}


def test_node_client_times_out_with_exit_1(node_client, socketio_baseline):
    client = node_client(socketio_baseline.url, channels=["bill:3"], count=5, timeout=1500)
    client.wait_for("ack")
    assert client.wait_for("timeout", timeout=10) == {"event": "timeout", "pubs": 0}
    assert client.process.wait(10) == 1


def test_node_client_reports_a_refused_connection(node_client):
    from broker.testing import free_port
    client = node_client(f"http://127.0.0.1:{free_port()}", reconnection=False, exit_on_connect_error=True)
    assert client.wait_for("connect_error")["message"]
    assert client.process.wait(10) == 1


@pytest.mark.parametrize("transports", [["polling", "websocket"], ["websocket"]])
def test_python_socketio_client_against_the_baseline(socketio_baseline, transports):
    async def scenario() -> list:
        client = socketio.AsyncClient(reconnection=False)
        received: asyncio.Queue = asyncio.Queue()
        client.on("pub", received.put_nowait)
        await client.connect(socketio_baseline.url, transports=transports, wait_timeout=10)
        ack = await client.call("subscribe", {"channel": "user:9"}, timeout=10)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, socketio_baseline.publish, "user:9", [1, "two"])
        pub = await asyncio.wait_for(received.get(), 10)
        await client.disconnect()
        return [ack, pub]

    ack, pub = asyncio.run(scenario())
    assert ack == {"ok": True, "epoch": "baseline", "offset": 0}
    assert pub == {"channel": "user:9", "offset": 1, "data": [1, "two"]}

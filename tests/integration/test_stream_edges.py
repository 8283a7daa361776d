"""The backend stream's edges: commands the broker refuses (its Sans-I/O
parser, in-process), and the publishers' stream link when the broker is
unreachable, answers the upgrade with text, replies out of contract, or
cuts the stream mid-call (a peer on real sockets that misbehaves so)."""
from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from websockets.sync.server import ServerConnection, serve

from broker import AsyncPublisher, Publisher
from broker.adapters.stream.protocol import MAX_BROADCAST, StreamCommand, parse_stream_message
from broker.config import Config
from broker.errors import ProtocolViolation, PublishError
from broker.testing import free_port

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("line, code, words", [
    ("[1, 2]", 400, "a command must be a JSON object"),
    ('{"op": "publish", "id": "7", "channel": "bill:1", "data": 1}', 400, "id must be an integer"),
    ('{"op": "broadcast", "id": 1, "channels": [], "data": 1}', 400, "non-empty list of channels"),
    ('{"op": "broadcast", "id": 1, "channels": "bill:1", "data": 1}', 400, "non-empty list of channels"),
    ('{"op": "publish", "id": 2, "channel": "bill:1", "data": 1e999}', 400, "data is not valid JSON"),
])
def test_refused_commands_say_why(line, code, words):
    [refused] = parse_stream_message(Config(), line)
    assert isinstance(refused, ProtocolViolation)
    assert refused.code == code and words in refused.message


def test_a_broadcast_over_the_limit_is_refused_whole_with_its_id():
    def broadcast(count: int) -> str:
        return json.dumps({"op": "broadcast", "id": 9, "channels": [f"bill:{i}" for i in range(count)], "data": 1})

    [refused] = parse_stream_message(Config(), broadcast(MAX_BROADCAST + 1))
    assert isinstance(refused, ProtocolViolation) and refused.code == 413
    assert refused.command_id == 9  # type: ignore[attr-defined]
    [accepted] = parse_stream_message(Config(), broadcast(MAX_BROADCAST))
    assert isinstance(accepted, StreamCommand) and len(accepted.channels) == MAX_BROADCAST


@contextmanager
def peer(handler: Callable[[ServerConnection], None]) -> Iterator[str]:
    """A WebSocket server on a free port running ``handler`` per connection; its http:// URL."""
    with serve(handler, "127.0.0.1", 0) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.socket.getsockname()[1]}"
        finally:
            server.shutdown()


def odd_reply(ws: ServerConnection) -> None:
    for _ in ws:
        ws.send('{"op": "pong"}')


def cut(ws: ServerConnection) -> None:
    """Read one command and drop the TCP connection without a close frame."""
    ws.recv()
    ws.socket.close()


def test_publisher_stream_unreachable_odd_reply_and_cut():
    closed = f"http://127.0.0.1:{free_port()}"
    with Publisher(closed, api_key="k", stream=True, timeout=5) as publisher:
        with pytest.raises(PublishError) as info:
            publisher.publish("bill:1", 1)
    assert info.value.status == 0 and "cannot open the backend stream" in str(info.value.body["error"])
    with peer(odd_reply) as url, Publisher(url, api_key="k", stream=True, timeout=5) as publisher:
        with pytest.raises(PublishError) as info:
            publisher.publish("bill:1", 1)
        assert info.value.body == {"error": "unexpected stream reply 'pong'"}
    with peer(cut) as url, Publisher(url, api_key="k", stream=True, timeout=5) as publisher:
        with pytest.raises(PublishError) as info:
            publisher.publish("bill:1", 1)
        assert info.value.status == 0 and "backend stream lost" in info.value.body["error"]


class _TextGateway(BaseHTTPRequestHandler):
    """A proxy in front of the broker answering the upgrade with text."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b"Bad Gateway"
        self.send_response(502)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_an_upgrade_answered_with_text_is_a_publish_error_with_its_status():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _TextGateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with Publisher(f"http://127.0.0.1:{server.server_port}", stream=True, timeout=5) as publisher:
            with pytest.raises(PublishError) as info:
                publisher.publish("bill:1", 1)
    finally:
        server.shutdown()
        server.server_close()
    assert (info.value.status, info.value.body) == (502, {"error": "HTTP 502"})


def test_async_publisher_reuses_its_stream_and_fails_calls_in_flight_when_it_is_cut(broker):
    async def main() -> None:
        async with AsyncPublisher(broker.url, api_key=broker.api_key, stream=True) as publisher:
            first = await publisher.publish("bill:seq", 1)
            second = await publisher.publish("bill:seq", 2)   # the same stream, already open
            assert (first["offset"], second["offset"]) == (1, 2)
        with peer(cut) as url:
            async with AsyncPublisher(url, api_key="k", stream=True, timeout=5) as publisher:
                with pytest.raises(PublishError) as info:
                    await publisher.publish("bill:1", 1)
                assert info.value.status == 0 and "backend stream lost" in info.value.body["error"]
    asyncio.run(main())

"""broker.client where the other side misbehaves: frames it cannot use, a
resubscribe refused, API replies that are not what the contract says, and
calls made in the wrong order. Scripted servers send the exact bytes."""
from __future__ import annotations

import asyncio
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from broker.client import AsyncPublisher, Client, Publication, Publisher
from broker.errors import PublishError

from .test_client import Collector, Scripted, commands, lines, pub, run

pytestmark = [pytest.mark.timeout(30)]


async def subscribed(server: Scripted, client: Client, got: Collector, channel: str = "bill:1",
                     handler: Any = None) -> tuple[ServerConnection, asyncio.Future[dict[str, Any]]]:
    subscribing = asyncio.ensure_future(client.subscribe(channel, handler or got, on_lost=got.on_lost))
    ws = await server.accept()
    [sub] = await commands(ws)
    await ws.send(lines({"id": sub["id"], "op": "subscribed", "channel": channel, "epoch": "e1", "offset": 0}))
    return ws, subscribing


def test_lines_the_client_cannot_use_are_skipped_and_a_failing_handler_does_not_stop_delivery(caplog):
    calls: list[int] = []

    def handler(publication: Publication) -> None:
        calls.append(publication.offset)
        if publication.offset == 1:
            raise RuntimeError("a bug in the application's handler")
        got(publication)

    got = Collector()

    async def main() -> None:
        async with Scripted() as server, Client(server.url) as client:
            ws, subscribing = await subscribed(server, client, got, handler=handler)
            await subscribing
            frame = "\n".join(["", "not json", "[1, 2]", '{"op": "error", "code": 500, "message": "oops"}',
                               '{"op": "future-op"}', lines(pub(1), pub(2))])
            await ws.send(frame)
            await got.wait_count(1)

    with caplog.at_level(logging.DEBUG, logger="broker.client"):
        run(main())
    assert calls == [1, 2] and got.offsets == [2]
    text = caplog.text
    assert "ignoring a line that is not JSON" in text and "broker error: 500 oops" in text
    assert "subscription handler" in text and "a bug in the application's handler" in text


def test_a_recover_refused_for_good_loses_the_channel_and_a_busy_broker_is_asked_again():
    async def main() -> None:
        got = Collector()
        async with Scripted() as server, Client(server.url, backoff_initial=0.01, backoff_max=0.02) as client:
            ws, subscribing = await subscribed(server, client, got)
            await subscribing
            ws2, subscribing2 = await _second(server, client, got, ws)
            await subscribing2
            # bill:1: the broker is busy (503), then accepts the retried recover.
            await ws.send(lines({"op": "unsubscribed", "channel": "bill:1", "reason": "epoch changed"}))
            [recover] = await commands(ws)
            await ws.send(lines({"id": recover["id"], "op": "error", "code": 503, "message": "busy"}))
            [again] = await commands(ws)
            assert again["op"] == "subscribe" and again["channel"] == "bill:1" and again["id"] != recover["id"]
            await ws.send(lines({"id": again["id"], "op": "subscribed", "channel": "bill:1", "epoch": "e2",
                                 "offset": 0, "recovered": False}, pub(1)))
            await got.wait(lambda: got.offsets == [1])
            assert client.position("bill:1") == ("e2", 1)
            # bill:2: refused for good (403): on_lost, and the client forgets the channel.
            await ws.send(lines({"op": "unsubscribed", "channel": "bill:2", "reason": "epoch changed"}))
            [recover] = await commands(ws)
            await ws.send(lines({"id": recover["id"], "op": "error", "code": 403, "message": "forbidden"}))
            await got.wait(lambda: any(channel == "bill:2" and "forbidden" in reason
                                       for channel, reason in got.lost))
            assert client.position("bill:2") is None and client.subscriptions == ["bill:1"]

    run(main())


async def _second(server: Scripted, client: Client, got: Collector,
                  ws: ServerConnection) -> tuple[ServerConnection, asyncio.Future[dict[str, Any]]]:
    """Subscribe bill:2 on the same connection."""
    subscribing = asyncio.ensure_future(client.subscribe("bill:2", got, on_lost=got.on_lost))
    [sub] = await commands(ws)
    await ws.send(lines({"id": sub["id"], "op": "subscribed", "channel": "bill:2", "epoch": "e1", "offset": 0}))
    return ws, subscribing


def test_calls_in_the_wrong_order_say_so():
    async def main() -> None:
        async with Scripted() as server:
            client = Client(server.url)
            assert not client.connected and client.position("bill:1") is None
            with pytest.raises(ConnectionError, match="not connected"):
                await client.subscribe("bill:1", lambda pub: None)
            await client.connect()
            await server.accept()
            assert client.connected
            with pytest.raises(RuntimeError, match="called twice"):
                await client.connect()
            await client.close()

    run(main())


@pytest.mark.parametrize(("status", "body", "message"), [
    (500, "", "HTTP 500"),
    (500, "upstream exploded\n", "upstream exploded"),
    (403, '["not", "an", "object"]', "['not', 'an', 'object']"),
])
def test_a_refused_upgrade_reports_the_body_whatever_its_shape(status, body, message):
    async def main() -> None:
        def refuse(connection: ServerConnection, request: Any) -> Any:
            return connection.respond(status, body)

        async with serve(lambda ws: ws.wait_closed(), "127.0.0.1", 0, process_request=refuse) as server:
            port = server.sockets[0].getsockname()[1]
            with pytest.raises(Exception) as refused:
                await Client(f"ws://127.0.0.1:{port}/ws", reconnect=False).connect()
            assert message in str(refused.value)

    run(main())


class _Scripted(BaseHTTPRequestHandler):
    """Answers every request with the next (status, body) of the server's script."""

    def do_POST(self) -> None:  # http.server calls it by this name
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status, body = self.server.script.pop(0)  # type: ignore[attr-defined]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def api_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    server.script = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_api_replies_outside_the_contract_become_publish_errors(api_server):
    api_server.script[:] = [(502, b"Bad Gateway from a proxy"), (400, b'"just a string"'), (200, b"[1]")]
    url = f"http://127.0.0.1:{api_server.server_address[1]}"
    with Publisher(url, api_key="k") as publisher:
        with pytest.raises(PublishError) as error:
            publisher.publish("bill:1", 1)
        assert error.value.status == 502 and error.value.body == {"error": "Bad Gateway from a proxy"}
        with pytest.raises(PublishError) as error:
            publisher.publish("bill:1", 1)
        assert error.value.status == 400 and error.value.body == {"error": "just a string"}
        with pytest.raises(PublishError) as error:
            publisher.publish("bill:1", 1)
        assert error.value.status == 200 and "unexpected reply [1]" in error.value.body["error"]
    with pytest.raises(ValueError, match="http:// or https://"):
        Publisher("ws://127.0.0.1:1")


def test_async_publish_batch_against_the_broker(broker):
    async def main() -> dict[str, Any]:
        async with AsyncPublisher(broker.url, api_key=broker.api_key) as publisher:
            return await publisher.publish_batch([("bill:1", {"n": 1}), ("bill:2", 2), ("bill:1", 3)])

    results = run(main())["results"]
    assert [(r["channel"], r["offset"]) for r in results] == [("bill:1", 1), ("bill:2", 1), ("bill:1", 2)]
    status, history = broker.api("GET", "/api/history?channel=bill:1")
    assert [p["data"] for p in history["publications"]] == [{"n": 1}, 3]

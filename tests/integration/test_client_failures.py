"""broker.client when the connection fails under it: HTTP answers cut short,
split, or never sent; a broker that closes the WebSocket right after a frame
the client must answer, or right after the upgrade; a token refused on
reconnect; calls in flight when the connection goes. Raw socket servers
write the exact bytes (a frame and the close in one write), so the
interleavings are exact; the backend-stream publishers run against a real
broker."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

import pytest

from broker.client import AsyncPublisher, Client, Publisher
from broker.errors import AuthError, PublishError
from broker.testing import free_port

from .test_client import Collector, Scripted, commands, lines, pub, run

pytestmark = [pytest.mark.timeout(30)]


# -- the publishers over the backend stream (a real broker) -------------------------------

def test_stream_publishers_broadcast_batch_and_shortcuts(broker):
    with Publisher(broker.url, api_key=broker.api_key, stream=True) as publisher:
        results = publisher.broadcast(["bill:1", "bill:2"], {"n": 1})["results"]
        assert [(r["channel"], r["offset"]) for r in results] == [("bill:1", 1), ("bill:2", 1)]

    async def main() -> list[dict[str, Any]]:
        async with AsyncPublisher(broker.url, api_key=broker.api_key, stream=True) as publisher:
            return [await publisher.broadcast(["bill:1", "bill:3"], 2),
                    await publisher.publish_batch([("bill:1", 3), ("bill:3", 4)]),
                    await publisher.broadcast_bill_update(1, {"n": 5}),
                    await publisher.send_user_notification(7, {"n": 6})]

    broadcast, batch, bill, user = run(main())
    assert [(r["channel"], r["offset"]) for r in broadcast["results"]] == [("bill:1", 2), ("bill:3", 1)]
    assert [(r["channel"], r["offset"]) for r in batch["results"]] == [("bill:1", 3), ("bill:3", 2)]
    assert (bill["channel"], bill["offset"]) == ("bill:1", 4)
    assert (user["channel"], user["offset"]) == ("user:7", 1)
    status, history = broker.api("GET", "/api/history?channel=bill:1")
    assert [p["data"] for p in history["publications"]] == [{"n": 1}, 2, 3, {"n": 5}]


# -- the HTTP publishers against a raw server ---------------------------------------------

Step = Callable[[socket.socket], None]


class RawHttp:
    """Accepts connections in a thread; each request (read whole) gets the
    next step of the script, which writes what it likes to the socket."""

    def __init__(self, *script: Step) -> None:
        self.script = list(script)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self.script:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            while self.script:
                while b"\r\n\r\n" not in buffer:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                while len(buffer) < length:
                    buffer += conn.recv(65536)
                buffer = buffer[length:]
                self.requests += 1
                step = self.script.pop(0)
                step(conn)
                if conn.fileno() < 0:
                    return

    def close(self) -> None:
        self.listener.close()


def close(conn: socket.socket) -> None:
    conn.close()


def reply(body: bytes, *extra: str, split: bool = False, length: bool = True) -> Step:
    def step(conn: socket.socket) -> None:
        headers = "".join(f"{h}\r\n" for h in extra)
        if length:
            headers += f"Content-Length: {len(body)}\r\n"
        head = f"HTTP/1.1 200 OK\r\n{headers}\r\n".encode()
        if split:   # headers first, the body a moment later
            conn.sendall(head)
            threading.Event().wait(0.1)
            conn.sendall(body)
        else:
            conn.sendall(head + body)
        if not length:
            conn.close()
    return step


def cut_short(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"chan")
    conn.close()


OK = b'{"channel":"bill:1","epoch":"e","offset":1}'


def test_sync_publisher_a_fresh_connection_closed_without_an_answer_is_unreachable():
    server = RawHttp(close)
    try:
        with Publisher(server.url, api_key="k") as publisher, pytest.raises(PublishError) as error:
            publisher.publish("bill:1", 1)
        assert error.value.status == 0 and "cannot reach the broker" in error.value.body["error"]
        assert server.requests == 1   # not retried: the connection was new
    finally:
        server.close()


def test_sync_publisher_over_https_to_nothing_is_unreachable():
    with Publisher(f"https://127.0.0.1:{free_port()}", api_key="k") as publisher, \
            pytest.raises(PublishError) as error:
        publisher.publish("bill:1", 1)
    assert error.value.status == 0 and isinstance(error.value.__cause__, OSError)


def test_async_publisher_reads_split_and_unframed_answers_and_fails_cut_or_silent_ones():
    server = RawHttp(reply(OK, split=True), reply(OK, length=False), close, cut_short, reply(OK))

    async def main() -> None:
        async with AsyncPublisher(server.url, api_key="k") as publisher:
            assert (await publisher.publish("bill:1", 1))["offset"] == 1   # body in a second read
            assert (await publisher.publish("bill:1", 2))["offset"] == 1   # body ends with the connection
            assert publisher._writer is None                                 # which is not kept
            with pytest.raises(PublishError) as silent:                     # a new connection, no answer
                await publisher.publish("bill:1", 3)
            assert silent.value.status == 0 and "cannot reach" in silent.value.body["error"]
            with pytest.raises(PublishError) as cut:
                await publisher.publish("bill:1", 4)
            assert "in the middle of a response" in cut.value.body["error"]
            assert (await publisher.publish("bill:1", 5))["offset"] == 1    # and it goes on

    try:
        run(main())
        assert server.requests == 5
    finally:
        server.close()


def test_async_publisher_call_cancelled_while_waiting_drops_the_connection():
    hold = threading.Event()
    server = RawHttp(lambda conn: hold.wait(10), reply(OK))

    async def main() -> None:
        async with AsyncPublisher(server.url, api_key="k") as publisher:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(publisher.publish("bill:1", 1), 0.3)
            assert publisher._writer is None          # its state is unknown: closed
            hold.set()
            assert (await publisher.publish("bill:1", 2))["offset"] == 1

    try:
        run(main())
    finally:
        hold.set()
        server.close()


# -- the WebSocket client against a raw server --------------------------------------------

class RawWs:
    """A WebSocket server at the byte level: the test reads the client's
    (masked) frames and writes any bytes, e.g. a frame and a close at once."""

    def __init__(self) -> None:
        self.then = b""   # bytes the next upgrade is answered together with
        self.accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def __aenter__(self) -> RawWs:
        self.server = await asyncio.start_server(self._handshake, "127.0.0.1", 0)
        self.url = f"ws://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/ws"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:"))
        accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        then, self.then = self.then, b""
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n" + then)
        await self.accepted.put((reader, writer))

    async def accept(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The next connection (upgraded, and sent ``then`` with the upgrade)."""
        return await asyncio.wait_for(self.accepted.get(), 5)


def text(message: str) -> bytes:
    payload = message.encode()
    if len(payload) < 126:
        return bytes([0x81, len(payload)]) + payload
    return bytes([0x81, 126]) + struct.pack("!H", len(payload)) + payload


CLOSE = b"\x88\x02\x03\xe8"   # close, 1000


async def read_commands(reader: asyncio.StreamReader) -> list[dict[str, Any]]:
    first, second = await asyncio.wait_for(reader.readexactly(2), 5)
    assert first == 0x81 and second & 0x80   # a masked text frame
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
    mask = await reader.readexactly(4)
    data = bytes(b ^ mask[i % 4] for i, b in enumerate(await reader.readexactly(length)))
    return [json.loads(line) for line in data.decode().split("\n")]


def subscribed(command: dict[str, Any], offset: int = 0, **extra: Any) -> dict[str, Any]:
    return {"id": command["id"], "op": "subscribed", "channel": command["channel"], "epoch": "e1",
            "offset": offset, **extra}


def test_a_gap_and_a_lost_stream_just_before_the_close_are_recovered_after_reconnecting():
    async def main() -> None:
        got = Collector()
        async with RawWs() as server, Client(server.url, backoff_initial=0.01, backoff_max=0.05) as client:
            reader, writer = await server.accept()
            subscribing = [asyncio.ensure_future(client.subscribe(channel, got, on_lost=got.on_lost))
                           for channel in ("bill:1", "bill:2")]
            one = (await read_commands(reader))[0]
            two = (await read_commands(reader))[0]
            writer.write(text(lines(subscribed(one), subscribed(two))))
            await asyncio.gather(*subscribing)
            # bill:1 skips 2 (the client asks again) and is then ended (already recovering);
            # bill:2 is ended; and the close comes in the same write: neither request gets out.
            writer.write(text(lines(pub(1), pub(3),
                                    {"op": "unsubscribed", "channel": "bill:1", "reason": "x"},
                                    {"op": "unsubscribed", "channel": "bill:2", "reason": "epoch changed"}))
                         + CLOSE)
            writer.close()
            reader, writer = await server.accept()
            recovers = {c["channel"]: c for c in await read_commands(reader)}
            assert recovers["bill:1"]["recover"] == {"epoch": "e1", "offset": 1}
            assert recovers["bill:2"]["recover"] == {"epoch": "e1", "offset": 0}
            writer.write(text(lines(subscribed(recovers["bill:1"], 3, recovered=True), pub(2), pub(3),
                                    subscribed(recovers["bill:2"], 0, recovered=True))))
            await got.wait_count(3)
            assert got.offsets == [1, 2, 3] and got.lost == [] and client.reconnects == 1
            writer.close()   # so that the client's close does not wait for a closing handshake

    run(main())


def test_a_connection_closed_right_after_the_upgrade_is_opened_again():
    async def main() -> None:
        got = Collector()
        async with RawWs() as server, Client(server.url, backoff_initial=0.01, backoff_max=0.05) as client:
            reader, writer = await server.accept()
            subscribing = asyncio.ensure_future(client.subscribe("bill:1", got))
            writer.write(text(lines(subscribed((await read_commands(reader))[0]))))
            await subscribing
            server.then = CLOSE                          # gone before the client can resubscribe
            writer.write(CLOSE)
            writer.close()
            _, gone = await server.accept()
            gone.close()
            reader, writer = await server.accept()
            [recover] = await read_commands(reader)
            assert recover["recover"] == {"epoch": "e1", "offset": 0}
            writer.write(text(lines(subscribed(recover, 1, recovered=True), pub(1))))
            await got.wait_count(1)
            assert client.reconnects >= 1
            writer.close()

    run(main())


def test_frames_the_client_cannot_handle_are_logged_and_odd_replies_tolerated(caplog):
    async def main() -> None:
        got = Collector()
        async with Scripted() as server, Client(server.url) as client:
            subscribing = asyncio.ensure_future(client.subscribe("bill:1", got, on_lost=got.on_lost))
            ws = await server.accept()
            [sub] = await commands(ws)
            # an id that is not a key at all; then a subscribed without an offset
            await ws.send(lines({"id": [1], "op": "pong"}))
            await ws.send(lines({"id": sub["id"], "op": "subscribed", "channel": "bill:1", "epoch": "e1",
                                 "offset": None}, pub(1)))
            assert (await subscribing)["offset"] is None
            await got.wait_count(1)
            assert client.position("bill:1") == ("e1", 1)
            # ended by the server; unsubscribed by the application before the recover is answered
            await ws.send(lines({"op": "unsubscribed", "channel": "bill:1", "reason": "x"}))
            [recover] = await commands(ws)
            unsubscribing = asyncio.ensure_future(client.unsubscribe("bill:1"))
            [unsub] = await commands(ws)
            await ws.send(lines(subscribed(recover, 1, recovered=True), pub(2),
                                {"id": unsub["id"], "op": "unsubscribed", "channel": "bill:1"}))
            await unsubscribing
            assert got.offsets == [1] and got.lost == [] and client.subscriptions == []

    with caplog.at_level(logging.ERROR, logger="broker.client"):
        run(main())
    assert "failed to handle a frame from the broker" in caplog.text


def test_a_call_in_flight_fails_when_the_connection_goes_and_a_refused_token_stops_the_client(caplog):
    async def main() -> None:
        async with Scripted() as server:
            client = Client(server.url, backoff_initial=0.01, backoff_max=0.05)
            await client.connect()
            ws = await server.accept()
            pinging = asyncio.ensure_future(client.ping())
            await commands(ws)
            server.refuse = 401                   # the token is refused from now on
            await ws.close()
            with pytest.raises(ConnectionError, match="connection lost"):
                await pinging
            await asyncio.wait_for(client._closed.wait(), 5)
            with pytest.raises(AuthError, match="bad token"):
                await client.ping()
            await client.close()

    with caplog.at_level(logging.ERROR, logger="broker.client"):
        run(main())
    assert "refused the token on reconnect" in caplog.text


def test_close_cancels_a_handler_that_is_still_running():
    started = asyncio.Event()
    cancelled: list[bool] = []

    async def slow(publication: Any) -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def main() -> None:
        async with Scripted() as server:
            client = Client(server.url)
            await client.connect()
            subscribing = asyncio.ensure_future(client.subscribe("bill:1", slow))
            ws = await server.accept()
            [sub] = await commands(ws)
            await ws.send(lines({"id": sub["id"], "op": "subscribed", "channel": "bill:1", "epoch": "e1",
                                 "offset": 0}, pub(1)))
            await subscribing
            await asyncio.wait_for(started.wait(), 5)
            await client.close()
            assert client._dispatcher is not None and client._dispatcher.cancelled()

    run(main())
    assert cancelled == [True]

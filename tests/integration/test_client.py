"""broker.client against a real `broker serve` (the `broker` fixture), and
the recovery logic against a scripted WebSocket server (exact frames)."""
from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from broker.client import AsyncPublisher, Client, Publication, Publisher
from broker.errors import AuthError, ProtocolViolation, PublishError
from broker.testing import free_port

pytestmark = [pytest.mark.timeout(20), pytest.mark.filterwarnings("ignore::jwt.InsecureKeyLengthWarning")]


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 15))  # type: ignore[arg-type]


class Collector:
    """A handler that records publications and lets a test wait for N."""

    def __init__(self) -> None:
        self.items: list[Publication] = []
        self.lost: list[tuple[str, str]] = []
        self._changed = asyncio.Event()

    def __call__(self, publication: Publication) -> None:
        self.items.append(publication)
        self._changed.set()

    async def on_lost(self, channel: str, reason: str) -> None:  # async on purpose
        self.lost.append((channel, reason))
        self._changed.set()

    async def wait(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def wait_count(self, n: int, timeout: float = 5.0) -> None:
        await self.wait(lambda: len(self.items) >= n, timeout)

    @property
    def offsets(self) -> list[int]:
        return [p.offset for p in self.items]


# -- against the real broker ------------------------------------------------------

def test_publish_reaches_subscriber(broker):
    async def main() -> None:
        got = Collector()
        async with Client(broker.ws_url) as client:
            reply = await client.subscribe("bill:1", got)
            assert reply["op"] == "subscribed" and reply["channel"] == "bill:1"
            assert isinstance(reply["epoch"], str) and reply["offset"] == 0
            with Publisher(broker.url, api_key=broker.api_key) as publisher:
                for n in range(3):
                    published = publisher.publish("bill:1", {"n": n, "text": "line\nbreak"})
                    assert published["offset"] == n + 1 and published["epoch"] == reply["epoch"]
            await got.wait_count(3)
            assert got.items == [Publication("bill:1", n + 1, {"n": n, "text": "line\nbreak"}) for n in range(3)]
            assert client.position("bill:1") == (reply["epoch"], 3)
            assert 0 < await client.ping() < 5  # a real round trip, in seconds
            await client.unsubscribe("bill:1")
            assert client.subscriptions == []
            broker.publish("bill:1", {"n": 99})
            await client.ping()  # a round trip after the publish: nothing more arrived
            await asyncio.sleep(0.1)
            assert len(got.items) == 3
    run(main())


def test_publisher_methods(broker):
    with Publisher(broker.url, api_key=broker.api_key) as publisher:
        first = publisher.publish("bill:7", {"v": 1})
        assert first["channel"] == "bill:7" and first["offset"] == 1
        connection = publisher._conn
        assert publisher.broadcast_bill_update(7, {"v": 2})["offset"] == 2
        assert publisher._conn is connection  # one keep-alive connection
        assert publisher.send_user_notification("alice", {"hello": True})["channel"] == "user:alice"
        results = publisher.broadcast(["user:1", "user:2"], {"all": 1})["results"]
        assert [(r["channel"], r["offset"]) for r in results] == [("user:1", 1), ("user:2", 1)]
        history = publisher.history("bill:7")
        assert history["offset"] == 2
        assert [(p["offset"], p["data"]) for p in history["publications"]] == [(1, {"v": 1}), (2, {"v": 2})]
        assert [p["offset"] for p in publisher.history("bill:7", since=1)["publications"]] == [2]
        assert [p["offset"] for p in publisher.history("bill:7", limit=1)["publications"]] == [1]
        stats = publisher.get_stats()
        assert stats["published"] >= 5 and len(stats["shards"]) == 1
        with pytest.raises(PublishError) as info:
            publisher.broadcast(["user:1", "not a channel"], {})
        assert info.value.status == 400 and "error" in info.value.body
        assert publisher.history("user:1")["offset"] == 1  # refused whole
        # The server dropping an idle keep-alive connection is survived.
        publisher._conn.sock.shutdown(socket.SHUT_RDWR)
        assert publisher.publish("bill:7", {"v": 3})["offset"] == 3

    with Publisher(broker.url, api_key="wrong") as publisher:
        with pytest.raises(PublishError) as info:
            publisher.publish("bill:1", {})
        assert info.value.status == 401 and isinstance(info.value.body, dict) and info.value.body["error"]
    with Publisher(broker.url) as publisher:  # no key at all
        with pytest.raises(PublishError) as info:
            publisher.get_stats()
        assert info.value.status == 401

    with Publisher(f"http://127.0.0.1:{free_port()}", timeout=2) as publisher:
        with pytest.raises(PublishError) as info:
            publisher.publish("bill:1", {})
        assert info.value.status == 0 and "cannot reach" in info.value.body["error"]
        assert isinstance(info.value.__cause__, OSError)


def test_async_publisher(broker):
    async def main() -> None:
        async with AsyncPublisher(broker.url, api_key=broker.api_key) as publisher:
            replies = await asyncio.gather(*(publisher.publish("bill:9", {"n": n}) for n in range(5)))
            assert sorted(r["offset"] for r in replies) == [1, 2, 3, 4, 5]
            assert (await publisher.broadcast_bill_update("9", {"n": 5}))["offset"] == 6
            assert (await publisher.send_user_notification(3, {"x": 1}))["channel"] == "user:3"
            assert len((await publisher.broadcast(["user:4", "user:5"], 1))["results"]) == 2
            history = await publisher.history("bill:9", since=4, limit=10)
            assert [p["offset"] for p in history["publications"]] == [5, 6]
            assert (await publisher.get_stats())["published"] >= 9
            writer = publisher._writer
            await publisher.publish("bill:9", {})
            assert publisher._writer is writer  # kept alive
            writer.transport.abort()  # dropped under our feet: reconnect once
            assert (await publisher.publish("bill:9", {}))["offset"] == 8
        async with AsyncPublisher(broker.url, api_key="nope") as publisher:
            with pytest.raises(PublishError) as info:
                await publisher.publish("bill:9", {})
            assert info.value.status == 401
        async with AsyncPublisher(f"http://127.0.0.1:{free_port()}") as publisher:
            with pytest.raises(PublishError) as info:
                await publisher.get_stats()
            assert info.value.status == 0
    run(main())


def test_tokens_and_errors(broker):
    async def main() -> None:
        async with Client(broker.ws_url, token=broker.token("alice")) as alice:
            got = Collector()
            await alice.subscribe("user:alice", got)
            with pytest.raises(ProtocolViolation) as info:
                await alice.subscribe("user:bob", got)
            assert info.value.code == 403
            assert alice.subscriptions == ["user:alice"]
            with pytest.raises(ProtocolViolation) as info:
                await alice.subscribe("nowhere:1", got)
            assert info.value.code == 404
            with pytest.raises(ProtocolViolation) as info:
                await alice.publish("bill:1", {"not": "allowed"})
            assert info.value.code == 403
            with pytest.raises(ProtocolViolation) as info:
                await alice.subscribe("user:alice", got)  # already subscribed
            assert info.value.code == 409
            Publisher(broker.url, api_key=broker.api_key).send_user_notification("alice", {"hi": 1})
            await got.wait_count(1)
            assert got.items[0].data == {"hi": 1}

        # A token from a callable (e.g. refreshed before each connection).
        async def fresh_token() -> str:
            return broker.token("carol")
        async with Client(broker.ws_url, token=fresh_token) as carol:
            await carol.subscribe("user:carol", Collector())

        async with Client(broker.ws_url) as anonymous:
            with pytest.raises(ProtocolViolation) as info:
                await anonymous.subscribe("user:alice", Collector())
            assert info.value.code == 401

        for token in ("garbage", broker.token("alice", ttl=-10)):
            started = time.monotonic()
            with pytest.raises(AuthError):
                await Client(broker.ws_url, token=token).connect()
            assert time.monotonic() - started < 2  # refused at once, no retry loop
    run(main())


async def miss_while_away(broker, client, got, channel: str, values: list) -> None:
    """Subscribe, receive values[0], break the connection, publish the rest.
    The publishes are sync calls that block the event loop, so the client
    cannot even notice the break before they are all stored."""
    await client.subscribe(channel, got, on_lost=got.on_lost)
    broker.publish(channel, values[0])
    await got.wait_count(1)
    client._ws.transport.abort()
    with Publisher(broker.url, api_key=broker.api_key) as publisher:
        for value in values[1:]:
            publisher.publish(channel, value)


def test_recovery_after_broken_connection(broker):
    async def main() -> None:
        got = Collector()
        async with Client(broker.ws_url, backoff_initial=0.05) as client:
            await miss_while_away(broker, client, got, "bill:5", [{"n": n} for n in range(11)])
            await got.wait_count(11)
            await client.ping()
            assert got.offsets == list(range(1, 12))
            assert [p.data["n"] for p in got.items] == list(range(11))
            assert got.lost == []
            assert client.reconnects == 1
            broker.publish("bill:5", {"n": 11})
            await got.wait_count(12)
            assert got.offsets[-1] == 12
    run(main())


def test_on_lost_when_history_cannot_cover(broker_factory, tmp_path):
    config = tmp_path / "small-history.toml"
    config.write_text("[namespaces.bill]\nhistory_size = 3\n")
    broker = broker_factory("--shards", "1", "--allow-anonymous", "--config", str(config))

    async def main() -> None:
        got = Collector()
        async with Client(broker.ws_url, backoff_initial=0.05) as client:
            await miss_while_away(broker, client, got, "bill:8", [{"n": n} for n in range(1, 12)])
            await got.wait(lambda: got.lost)
            assert got.lost[0][0] == "bill:8" and got.lost[0][1]
            assert len(got.lost) == 1
            assert got.offsets == [1]  # nothing old delivered
            status, history = broker.api("GET", "/api/history?channel=bill:8&since=11")
            assert status == 200 and history["offset"] == 11
            assert client.position("bill:8") == (history["epoch"], 11)  # re-joined at the broker's position
            broker.publish("bill:8", {"n": 12})
            await got.wait_count(2)
            assert got.items[1] == Publication("bill:8", 12, {"n": 12})
    run(main())


# -- against a scripted server: exact frames ---------------------------------------

class Scripted:
    """A WebSocket server whose connections the test drives by hand."""

    def __init__(self, refuse: int | None = None) -> None:
        self.connections: asyncio.Queue[ServerConnection] = asyncio.Queue()
        self.refuse = refuse

    async def __aenter__(self) -> Scripted:
        def process_request(connection: ServerConnection, request: Any) -> Any:
            if self.refuse:
                return connection.respond(self.refuse, json.dumps({"error": "bad token"}) + "\n")
            return None
        self.server = await serve(self._handler, "127.0.0.1", 0, process_request=process_request)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"ws://127.0.0.1:{port}/ws"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _handler(self, ws: ServerConnection) -> None:
        await self.connections.put(ws)
        await ws.wait_closed()

    async def accept(self) -> ServerConnection:
        return await asyncio.wait_for(self.connections.get(), 5)


async def commands(ws: ServerConnection) -> list[dict[str, Any]]:
    """The next client message, split into its NDJSON commands."""
    text = await asyncio.wait_for(ws.recv(), 5)
    return [json.loads(line) for line in text.split("\n")]


def lines(*messages: dict[str, Any]) -> str:
    return "\n".join(json.dumps(m) for m in messages)


def pub(offset: int, channel: str = "bill:1") -> dict[str, Any]:
    return {"op": "pub", "channel": channel, "offset": offset, "data": {"o": offset}}


def test_duplicates_dropped_and_gap_recovered():
    async def main() -> None:
        got = Collector()
        async with Scripted() as server:
            async with Client(server.url) as client:
                subscribing = asyncio.ensure_future(client.subscribe("bill:1", got, on_lost=got.on_lost))
                ws = await server.accept()
                [sub] = await commands(ws)
                assert sub == {"id": sub["id"], "op": "subscribe", "channel": "bill:1"}
                # Reply and publications in ONE frame; a duplicate, then a gap.
                await ws.send(lines({"id": sub["id"], "op": "subscribed", "channel": "bill:1",
                                     "epoch": "e1", "offset": 5}, pub(6), pub(6), pub(5), pub(8), pub(9)))
                assert (await subscribing)["offset"] == 5
                unsub, recover = await commands(ws)
                assert unsub["op"] == "unsubscribe" and unsub["channel"] == "bill:1"
                assert recover["op"] == "subscribe" and recover["recover"] == {"epoch": "e1", "offset": 6}
                await ws.send(lines({"id": unsub["id"], "op": "unsubscribed", "channel": "bill:1"},
                                    {"id": recover["id"], "op": "subscribed", "channel": "bill:1",
                                     "epoch": "e1", "offset": 9, "recovered": True},
                                    pub(7), pub(8), pub(9), pub(10)))
                await got.wait_count(5)
                assert got.offsets == [6, 7, 8, 9, 10]
                assert got.lost == []
    run(main())


def test_lost_stream_resubscribes_and_calls_on_lost():
    async def main() -> None:
        got = Collector()
        async with Scripted() as server:
            async with Client(server.url) as client:
                subscribing = asyncio.ensure_future(client.subscribe("bill:1", got, on_lost=got.on_lost))
                ws = await server.accept()
                [sub] = await commands(ws)
                await ws.send(lines({"id": sub["id"], "op": "subscribed", "channel": "bill:1",
                                     "epoch": "e1", "offset": 0}, pub(1)))
                await subscribing
                await ws.send(lines({"op": "unsubscribed", "channel": "bill:1", "reason": "epoch changed"}))
                [recover] = await commands(ws)
                assert recover["recover"] == {"epoch": "e1", "offset": 1}
                await ws.send(lines({"id": recover["id"], "op": "subscribed", "channel": "bill:1",
                                     "epoch": "e2", "offset": 0, "recovered": False}, pub(1)))
                await got.wait(lambda: len(got.items) == 2 and got.lost)
                assert got.lost == [("bill:1", "epoch changed")]
                assert got.offsets == [1, 1]  # the new epoch starts again
                assert client.position("bill:1") == ("e2", 1)
    run(main())


def test_reconnect_message_waits_then_recovers():
    async def main() -> None:
        got = Collector()
        async with Scripted() as server:
            async with Client(server.url, backoff_initial=0.05) as client:
                subscribing = asyncio.ensure_future(client.subscribe("bill:1", got))
                ws = await server.accept()
                [sub] = await commands(ws)
                await ws.send(lines({"id": sub["id"], "op": "subscribed", "channel": "bill:1",
                                     "epoch": "e1", "offset": 3}, pub(4)))
                await subscribing
                await ws.send(lines({"op": "reconnect", "reason": "drain", "after_ms": 300}))
                await ws.close(1012, "drain")
                closed = time.monotonic()
                # A command issued meanwhile waits for the new connection.
                pinging = asyncio.ensure_future(client.ping())
                ws2 = await server.accept()
                assert time.monotonic() - closed >= 0.28
                [recover] = await commands(ws2)
                assert recover["recover"] == {"epoch": "e1", "offset": 4}
                await ws2.send(lines({"id": recover["id"], "op": "subscribed", "channel": "bill:1",
                                      "epoch": "e1", "offset": 5, "recovered": True}, pub(5)))
                [ping] = await commands(ws2)
                assert ping["op"] == "ping"
                await ws2.send(lines({"id": ping["id"], "op": "pong"}))
                await pinging
                await got.wait_count(2)
                assert got.offsets == [4, 5]
                assert client.reconnects == 1
    run(main())


def test_upgrade_refused_raises_auth_error():
    async def main() -> None:
        async with Scripted(refuse=401) as server:
            with pytest.raises(AuthError, match="bad token"):
                await Client(server.url, token="x").connect()
        async with Scripted(refuse=503) as server:
            with pytest.raises(ConnectionError):
                await Client(server.url).connect()
    run(main())


def test_no_reconnect_mode_fails_commands():
    async def main() -> None:
        async with Scripted() as server:
            client = await Client(server.url, reconnect=False).connect()
            ws = await server.accept()
            await ws.close(1011)
            await asyncio.sleep(0.1)
            with pytest.raises(ConnectionError):
                await client.ping()
            await client.close()
    run(main())


# -- the CLI's API commands against the real broker ---------------------------------

@pytest.mark.timeout(60)  # six CLI processes; each imports the package afresh
def test_cli_publish_and_stats(broker):
    import os
    import subprocess
    import sys

    def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
        return subprocess.run([sys.executable, "-m", "broker", *args], env={**clean, **env},
                              capture_output=True, text=True, timeout=15)

    result = cli("publish", "--url", broker.url, "--api-key", broker.api_key, "bill:3", '{"a": [1, 2]}')
    assert result.returncode == 0, result.stderr
    status, history = broker.api("GET", "/api/history?channel=bill:3")
    assert status == 200 and history["publications"] == [{"offset": 1, "data": {"a": [1, 2]}}]
    assert json.loads(result.stdout) == {"channel": "bill:3", "epoch": history["epoch"], "offset": 1}
    result = cli("publish", "bill:3", "2", BROKER_URL=broker.url, BROKER_API_KEY=broker.api_key)
    assert result.returncode == 0 and json.loads(result.stdout)["offset"] == 2
    result = cli("publish", "--url", broker.url, "--api-key", "wrong", "bill:3", "{}")
    assert result.returncode == 1
    assert "error" in json.loads(result.stderr)
    result = cli("stats", "--url", broker.url, "--api-key", broker.api_key)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("node ") and "published 2" in lines[1]
    assert lines[3].split()[:3] == ["shard", "pid", "up"]
    assert lines[4].split()[0] == "0" and lines[4].split()[2] == "yes"
    result = cli("stats", "--json", "--url", broker.url, "--api-key", broker.api_key)
    assert json.loads(result.stdout)["published"] == 2

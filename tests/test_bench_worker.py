"""The bench's worker coroutines (broker/bench/worker.py) run in this process
against servers the test scripts: what a receiver or publisher does when the
server fragments or compresses frames, closes, refuses, answers badly or
resets the connection. The worker's parent pipe is a queue pair, so each
scenario is a list of commands and the replies it got back."""
from __future__ import annotations

import asyncio
import json
import queue
import resource
import time
import zlib
from array import array
from typing import Any

from picows import WSCloseCode, WSMsgType, WSListener, WSUpgradeResponse, WSUpgradeResponseWithListener
from picows import ws_create_server

from broker.bench import worker
from broker.bench.worker import (SLOT_PUBLISHED, Receiver, SocketIOReceiver, _drain,
                                 raise_nofile_limit)
from broker.sockets import free_port


class Conn:
    """The worker's end of the parent pipe: commands in, replies out;
    ``EOF`` among the commands is the parent going away."""

    EOF = ("__eof__",)

    def __init__(self, *commands: tuple[Any, ...]) -> None:
        self.commands: queue.Queue[tuple[Any, ...]] = queue.Queue()
        for command in commands:
            self.commands.put(command)
        self.replies: list[tuple[Any, ...]] = []

    def recv(self) -> tuple[Any, ...]:
        command = self.commands.get(timeout=30)
        if command is self.EOF:
            raise EOFError
        return command

    def send(self, reply: tuple[Any, ...]) -> None:
        self.replies.append(reply)

    def reply(self, kind: str) -> Any:
        return next(body for name, *body in self.replies if name == kind)[0]


# -- receivers ----------------------------------------------------------------------------

def _deflated(payload: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    out = packer.compress(payload) + packer.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def _pub(channel: str, offset: int) -> bytes:
    return b'{"op":"pub","channel":"%s","offset":%d,"data":{"ts":%d,"seq":0}}' % (
        channel.encode(), offset, time.monotonic_ns())


class _ScriptedBroker(WSListener):
    """Speaks enough of the native protocol: bill:1 gets three publications
    (one fragmented, one compressed), then a reconnect op and a 1012 close;
    on the recovering subscribe it sends the fourth. user:0 is refused."""

    handshakes = 0

    def on_ws_connected(self, transport: Any) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        if frame.msg_type is not WSMsgType.TEXT:
            return
        msg = json.loads(frame.get_payload_as_bytes())
        channel = msg["channel"]
        if channel == "user:0":
            transport.send(WSMsgType.TEXT, b'{"id":1,"op":"error","code":403,"message":"not yours"}')
        elif "recover" in msg:
            transport.send(WSMsgType.TEXT, b'{"id":2,"op":"subscribed","channel":"bill:1","epoch":"e1",'
                                           b'"offset":4,"recovered":true}\n' + _pub(channel, 4))
        else:
            transport.send(WSMsgType.TEXT, b'{"id":1,"op":"subscribed","channel":"bill:1","epoch":"e1","offset":0}')
            first = _pub(channel, 1)
            transport.send(WSMsgType.TEXT, first[:20], fin=False)
            transport.send(WSMsgType.CONTINUATION, first[20:], fin=True)
            transport.send(WSMsgType.TEXT, _deflated(_pub(channel, 2)), rsv1=True)
            transport.send(WSMsgType.TEXT, _pub(channel, 3) + b'\n{"op":"unsubscribed","reason":"test"}')
            # once the worker has the connection (a reconnect op before that is not followed)
            asyncio.get_running_loop().call_later(0.3, self.migrate, transport)

    def migrate(self, transport: Any) -> None:
        transport.send(WSMsgType.TEXT, b'{"op":"reconnect","reason":"deploy","after_ms":0}')
        transport.send_close(WSCloseCode.SERVICE_RESTART)


def _receiver_server() -> Any:
    seen = {"handshakes": 0}

    def factory(request: Any) -> Any:
        seen["handshakes"] += 1
        if seen["handshakes"] == 4:   # the first reconnection attempt is turned away
            return WSUpgradeResponseWithListener(WSUpgradeResponse.create_error_response(503), None)
        return _ScriptedBroker()
    return factory, seen


def test_receivers_follow_fragments_deflate_close_and_reconnect_against_a_scripted_server():
    spec = {"fanout_connections": 1, "user_connections": 1}
    conn = Conn(("connect",))
    progress = [0] * worker.SLOTS

    async def main() -> None:
        factory, seen = _receiver_server()
        server = await ws_create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        params = {"spec": spec, "indices": [0, 1, 2], "ws_url": f"ws://127.0.0.1:{port}/ws", "deflate": True}
        task = asyncio.ensure_future(worker._receivers(conn, progress, 0, params))
        deadline = time.monotonic() + 20
        while progress[worker.SLOT_RECEIVED] < 4 and time.monotonic() < deadline:  # the 4th after reconnecting
            await asyncio.sleep(0.02)
        conn.commands.put(("drain", {"bill:1": 4}, 20))
        conn.commands.put(("close",))
        await asyncio.wait_for(task, 30)
        server.close()
        assert seen["handshakes"] >= 5   # three connections, a refused retry, the reconnection

    asyncio.run(main())
    assert conn.replies[0][0] == "ready"
    connected = conn.reply("connected")
    assert (connected["connected"], connected["failed"]) == (2, 1)   # bill:1 and the idle one; user:0 refused
    assert any("not yours" in error for error in connected["errors"])
    report = conn.reply("report")
    counts = report["counts"]
    assert (counts["received"], counts["gaps"], counts["duplicates"], counts["expected"]) == (4, 0, 0, 4)
    assert (counts["reconnects"], counts["reconnected"], counts["unsubscribed"]) == (1, 1, 1)
    assert report["close_codes"] == {}   # the 1012 close was followed by a reconnection
    assert any("unsubscribed" in error for error in report["errors"])
    assert len(array("q", report["latencies"])) == 4
    assert conn.reply("closed") >= 0
    assert progress[worker.SLOT_CONNECTED] == 2


def test_receivers_count_connections_that_cannot_connect_and_exit_when_the_parent_goes():
    conn = Conn(("connect",), Conn.EOF)
    params = {"spec": {"fanout_connections": 2, "user_connections": 0}, "indices": [0, 1],
              "ws_url": f"ws://127.0.0.1:{free_port()}/ws"}
    asyncio.run(asyncio.wait_for(worker._receivers(conn, [0] * worker.SLOTS, 0, params), 30))
    connected = conn.reply("connected")
    assert (connected["connected"], connected["failed"]) == (0, 2)
    assert [name for name, *_ in conn.replies] == ["ready", "connected"]   # EOF: no "closed" reply


def test_drain_gives_up_when_nothing_arrives():
    async def main() -> float:
        r = Receiver("bill:1", array("q"))
        r.start = r.last = 0
        started = time.monotonic()
        await _drain([r], {"bill:1": 5}, 10)
        return time.monotonic() - started
    assert 3.0 <= asyncio.run(main()) < 9   # quiet for 3 s, well before the 10 s timeout


def test_receiver_slow_path_edges():
    r = Receiver("bill:1", array("q"))
    r.feed(b'{"id":1,"op":"subscribed","channel":"bill:1","epoch":"e","offset":0}', 0)
    r.feed(b'{"op":"pub","channel":"bill:1","offset":1,"data":{"seq":1,"ts":"late"}}', 5)  # ts last, not an int
    r.feed(b'{"op":"pub","channel":"bill:1","offset":1,"data":{}}', 5)                  # a duplicate
    r.feed(b'{"channel":"bill:1","op":"pub","offset":1}', 5)                             # slow-path duplicate
    r.feed(b"[1,2]", 5)
    r.recovering = True
    r.feed(b'{"id":2,"op":"subscribed","channel":"bill:1","epoch":"other","offset":1,"recovered":true}', 9)
    assert (r.received, r.duplicates) == (1, 2) and len(r.latencies) == 0
    assert any("not an object" in e for e in r.errors)
    assert any("not recovered" in e for e in r.errors)


class _Sent:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, _msg_type: object, data: bytes) -> None:
        self.sent.append(data)


def test_socketio_receiver_idle_refused_and_other_packets():
    loop = asyncio.new_event_loop()
    try:
        idle_ready = loop.create_future()
        idle = SocketIOReceiver(None, array("q"), idle_ready)
        idle.on_ws_connected(_Sent())
        idle.feed(b"0{}", 0)
        idle.feed(b"40", 0)
        assert idle_ready.done() and idle_ready.exception() is None
        assert idle.transport.sent == [b"40"]

        refused_ready = loop.create_future()
        refused = SocketIOReceiver("user:1", array("q"), refused_ready)
        refused.feed(b'44{"message":"bad token"}', 0)
        assert isinstance(refused_ready.exception(), RuntimeError) and "bad token" in refused.errors[0]

        r = SocketIOReceiver("bill:1", array("q"))
        r.feed(b'42["unsubscribed",{"channel":"bill:1"}]\n42["reconnect",{}]\n6\n99', 0)
        assert (r.unsubscribed, r.reconnects) == (1, 1)
        assert r.errors[-1].startswith("unexpected packet")
    finally:
        loop.close()


def test_raise_nofile_limit_raises_the_soft_limit_to_the_hard_one():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, hard) // 2, hard))
        assert raise_nofile_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- publisher ---------------------------------------------------------------------------

class _ScriptedHttp(asyncio.Protocol):
    """One answer per request, in turn: a good 200, a 200 without an offset,
    a 503, a 200 that closes the connection, garbage, a reset."""

    count = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if b"\r\n\r\n" not in data:
            return
        turn = _ScriptedHttp.count % 6
        _ScriptedHttp.count += 1
        if turn == 0:
            body = b'{"offset":%d}' % _ScriptedHttp.count
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        elif turn == 1:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        elif turn == 2:
            self.transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy")
        elif turn == 3:
            self.transport.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 12\r\n\r\n{\"offset\":1}")
            self.transport.close()
        elif turn == 4:
            self.transport.write(b"NOT HTTP AT ALL\r\n\r\n")
        else:
            self.transport.abort()


def _run_publisher(params: dict[str, Any], budget: float = 20) -> tuple[dict[str, Any], list[int]]:
    conn = Conn(("publish", budget), ("close",))
    progress = [0] * worker.SLOTS
    asyncio.run(asyncio.wait_for(worker._publisher(conn, progress, 0, params), 60))
    assert [name for name, *_ in conn.replies][:2] == ["ready", "published"]
    return conn.reply("published"), progress


def _stream(total: int) -> dict[str, Any]:
    return {"name": "w", "rate": 500.0, "total": total, "channels": 0, "http_conns": 1, "seed": 1}


def test_publisher_counts_each_kind_of_bad_http_answer():
    async def serve() -> tuple[Any, int]:
        server = await asyncio.get_running_loop().create_server(_ScriptedHttp, "127.0.0.1", 0)
        return server, server.sockets[0].getsockname()[1]

    loop = asyncio.new_event_loop()
    _ScriptedHttp.count = 0
    server, port = loop.run_until_complete(serve())
    import threading
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        published, progress = _run_publisher({"http_host": "127.0.0.1", "http_port": port, "api_key": "k",
                                              "streams": [_stream(12)]})
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        server.close()
        loop.close()
    # per round of six: two 200s with an offset count as ok, one 200 without one too; 503, garbage, reset fail
    assert (published["ok"], published["failed"]) == (6, 6)
    statuses = published["statuses"]
    assert statuses["200 without offset"] == 2 and statuses["503 busy"] == 2
    assert statuses.get("ConnectionError", 0) + statuses.get("ConnectionResetError", 0) == 2
    assert sum(statuses.values()) == 8   # and two parser errors
    assert published["finals"]["bill:1"] == 7
    assert progress[SLOT_PUBLISHED] == 6


def test_publisher_to_a_refused_port_fails_every_publication():
    published, _ = _run_publisher({"http_host": "127.0.0.1", "http_port": free_port(), "streams": [_stream(3)]})
    assert (published["ok"], published["failed"]) == (0, 3)
    assert published["statuses"] == {"ConnectionRefusedError": 3}


class _ScriptedStream(WSListener):
    """The backend stream, one answer per command in turn: published, an
    error, a binary frame then published, a close (the command is lost);
    six commands are two rounds less the last two turns."""

    count = 0

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        if frame.msg_type is not WSMsgType.TEXT:
            return
        assert frame.get_payload_as_bytes().startswith(b'{"op":"publish","channel":"bill:1"')
        turn = _ScriptedStream.count % 4
        _ScriptedStream.count += 1
        if turn == 0:
            transport.send(WSMsgType.TEXT, b'{"op":"published","offset":%d}' % _ScriptedStream.count)
        elif turn == 1:
            transport.send(WSMsgType.TEXT, b'{"op":"error","code":503,"message":"busy"}')
        elif turn == 2:
            transport.send(WSMsgType.BINARY, b"ignored")
            transport.send(WSMsgType.TEXT, b'{"op":"published","offset":%d}' % _ScriptedStream.count)
        else:
            transport.send_close(WSCloseCode.GOING_AWAY)


def test_publisher_over_the_backend_stream_recovers_from_errors_and_closes():
    result: dict[str, Any] = {}

    async def main() -> None:
        _ScriptedStream.count = 0
        server = await ws_create_server(lambda request: _ScriptedStream(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        conn = Conn(("publish", 20), ("exit",))
        await asyncio.wait_for(worker._publisher(conn, [0] * worker.SLOTS, 0, {
            "http_host": "127.0.0.1", "http_port": port, "api_key": "k", "publish_over": "stream",
            "streams": [_stream(6)]}), 30)
        result.update(conn.reply("published"))
        server.close()

    asyncio.run(main())
    assert (result["ok"], result["failed"]) == (3, 3)
    assert result["finals"] == {"bill:1": 5}
    assert result["statuses"]["503 " + '{"op":"error","code":503,"message":"busy"}'] == 2
    assert result["statuses"]["ConnectionError"] == 1


class _AnswerInThrees(WSListener):
    """Answers nothing until three commands are in, then all three in one
    message: a publisher that waited for each reply would never finish."""

    def __init__(self) -> None:
        self.waiting: list[bytes] = []

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        if frame.msg_type is WSMsgType.TEXT:
            self.waiting.append(b'{"op":"published","offset":%d}' % (len(self.waiting) + 1))
            if len(self.waiting) == 3:
                transport.send(WSMsgType.TEXT, b"\n".join(self.waiting))
                self.waiting = []


def test_stream_publisher_pipelines_its_commands_on_one_connection():
    result: dict[str, Any] = {}
    connections = []

    async def main() -> None:
        server = await ws_create_server(lambda request: connections.append(1) or _AnswerInThrees(),
                                        "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        conn = Conn(("publish", 20), ("exit",))
        stream = {**_stream(9), "http_conns": 4}  # HTTP would use 4 connections; the stream uses one
        await asyncio.wait_for(worker._publisher(conn, [0] * worker.SLOTS, 0, {
            "http_host": "127.0.0.1", "http_port": 1, "api_key": "k", "publish_over": "stream",
            "stream_url": f"ws://127.0.0.1:{port}/ws", "streams": [stream]}), 30)
        result.update(conn.reply("published"))
        server.close()

    asyncio.run(main())
    assert (result["ok"], result["failed"]) == (9, 0) and connections == [1]
    assert result["finals"] == {"bill:1": 3}


def test_command_reader_thread_ends_once_the_loop_is_gone():
    import threading

    conn = Conn()
    try:
        asyncio.run(worker._receivers(conn, [0] * worker.SLOTS, 0, {}))   # no spec: the worker dies at once
    except KeyError:
        pass
    else:
        raise AssertionError("a worker without a spec should fail")
    readers = [t for t in threading.enumerate() if t.name == "commands" and t.is_alive()]
    assert readers
    conn.commands.put(("drain", {}, 1))        # arrives after the loop closed
    for reader in readers:
        reader.join(10)
    assert not any(t.is_alive() for t in readers)

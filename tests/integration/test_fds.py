"""One descriptor per WebSocket: the C flush writes to the socket's own fd,
which the shard never dups nor closes, and takes back before the transport
closes the socket. Real broker processes; descriptors counted in /proc."""
from __future__ import annotations

import asyncio
import collections
import http.client
import json
import os
import socket
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import psutil
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

pytestmark = pytest.mark.timeout(180)


def shard_pids(broker: Any) -> list[int]:
    """The shard processes (children of ``broker serve``), as their stats name them."""
    _, stats = broker.api("GET", "/api/stats")
    pids = [int(shard["pid"]) for shard in stats["shards"]]
    children = psutil.Process(broker.process.pid).children(recursive=True)
    assert set(pids) <= {child.pid for child in children}
    return pids


def shard_pid(broker: Any) -> int:
    (pid,) = shard_pids(broker)
    return pid


def slow_consumers(broker: Any) -> int:
    return sum(shard["slow_consumers"] for shard in broker.api("GET", "/api/stats")[1]["shards"])


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def connections(broker: Any) -> int:
    return int(broker.api("GET", "/api/stats")[1]["shards"][0]["connections"])


# ------------------------------------------------------------------ clients
@dataclass
class Client:
    """One subscriber of ``channel`` over the native protocol or Socket.IO
    (over a WebSocket from the start, or upgraded from long-polling). Every
    publication it reads must be of its channel, offsets contiguous."""

    port: int
    kind: str                  # "native", "native-deflate", "sio", "sio-upgrade"
    channel: str
    ws: ClientConnection | None = None
    offset: int = -1           # the last offset seen (the subscribe reply's first)
    received: int = 0
    errors: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None
    closed_code: int | None = None
    small_buffer: bool = False  # a tiny receive buffer: a client that stops reading is cut soon

    async def _connect(self, url: str, **options: Any) -> ClientConnection:
        if not self.small_buffer:
            return await connect(url, open_timeout=20, **options)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: no autotuning
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
        return await connect(url, open_timeout=20, sock=sock, **options)

    async def open(self) -> None:
        if self.kind.startswith("native"):
            self.ws = await self._connect(f"ws://127.0.0.1:{self.port}/ws", max_size=None,
                                          compression="deflate" if self.kind == "native-deflate" else None)
            await self.ws.send(json.dumps({"id": 1, "op": "subscribe", "channel": self.channel}))
            first, *rest = str(await asyncio.wait_for(self.ws.recv(), 20)).split("\n")
            reply = json.loads(first)
            assert reply.get("op") == "subscribed", reply
            self.offset = reply["offset"]
            for line in rest:  # publications flushed with the reply, in one frame
                self._pub(json.loads(line))
        else:
            self.ws = await self._sio_transport()
            await self.ws.send("40")
            assert str(await asyncio.wait_for(self.ws.recv(), 20)).startswith("40{")
            await self.ws.send('421["subscribe",' + json.dumps({"channel": self.channel}) + "]")
            ack = str(await asyncio.wait_for(self.ws.recv(), 20))
            assert ack.startswith("431["), ack
            body = json.loads(ack[3:])[0]
            assert body["ok"], body
            self.offset = body["offset"]
        self.reader = asyncio.ensure_future(self._read())

    async def _sio_transport(self) -> ClientConnection:
        base = f"127.0.0.1:{self.port}/socket.io/?EIO=4"
        if self.kind == "sio":
            ws = await self._connect(f"ws://{base}&transport=websocket", max_size=None, compression=None)
            assert str(await asyncio.wait_for(ws.recv(), 20)).startswith("0{")
            return ws
        # Long-polling first (its HTTP connection closed at once), then the upgrade.
        opened = await asyncio.to_thread(_get, f"http://{base}&transport=polling")
        sid = json.loads(opened[1:])["sid"]
        ws = await self._connect(f"ws://{base}&transport=websocket&sid={sid}", max_size=None, compression=None)
        await ws.send("2probe")
        assert await asyncio.wait_for(ws.recv(), 20) == "3probe"
        await ws.send("5")
        return ws

    async def _read(self) -> None:
        assert self.ws is not None
        try:
            async for frame in self.ws:
                text = str(frame)
                if self.kind.startswith("native"):
                    for line in text.split("\n"):
                        self._pub(json.loads(line))
                elif text == "2":
                    await self.ws.send("3")
                elif text.startswith('42["pub",'):
                    self._pub({"op": "pub", **json.loads(text[2:])[1]})
                elif text not in ("6",):
                    self.errors.append(f"unexpected Socket.IO packet {text[:80]!r}")
        except ConnectionClosed as exc:
            self.closed_code = exc.rcvd.code if exc.rcvd is not None else None
        except Exception as exc:  # bytes that belong to another connection end up here
            self.errors.append(f"{type(exc).__name__}: {exc}")
        else:
            self.closed_code = self.ws.close_code

    def _pub(self, message: dict[str, Any]) -> None:
        if message.get("op") != "pub":
            if message.get("op") != "error":
                self.errors.append(f"unexpected message {message}")
            return
        if message["channel"] != self.channel:
            self.errors.append(f"{self.channel} received {message['channel']} offset {message['offset']}")
            return
        if message["offset"] != self.offset + 1:
            self.errors.append(f"{self.channel}: offset {message['offset']} after {self.offset}")
        self.offset = message["offset"]
        self.received += 1

    async def wait_received(self, count: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.received < count and not self.errors:
            assert time.monotonic() < deadline, f"{self.channel} ({self.kind}) got {self.received} of {count}"
            assert self.reader is not None and not self.reader.done(), f"{self.channel} closed early"
            await asyncio.sleep(0.01)

    async def end(self, how: str, broker: Any = None) -> None:
        """Close as a client would (``close``), vanish (``abort``: no closing
        handshake), or be closed by the server: 1008 (``bad``: too many bad
        commands; native only) or 1013 (``slow``: stops reading while its
        channel gets big publications; needs ``small_buffer``)."""
        assert self.ws is not None and self.reader is not None
        if how == "slow":
            self.ws.transport.pause_reading()
            await asyncio.to_thread(_burst_until_cut, broker, self.channel)
            self.ws.transport.resume_reading()
        elif how == "close":
            await self.ws.close()
        elif how == "abort":
            self.ws.transport.abort()
        else:
            for _ in range(12):
                await self.ws.send("not json")
        await asyncio.wait_for(self.reader, 20)
        if how in ("bad", "slow"):
            assert self.closed_code == (1008 if how == "bad" else 1013), (how, self.closed_code)


def _burst_until_cut(broker: Any, channel: str) -> None:
    """Big publications to ``channel`` until the shard cut a slow consumer."""
    cut = slow_consumers(broker)
    pad = "x" * 32768
    for sent in range(4000):
        status, _ = broker.api("POST", "/api/publish", {"channel": channel, "data": {"pad": pad}})
        assert status == 200
        if sent % 10 == 9 and slow_consumers(broker) > cut:
            return
    raise AssertionError(f"{channel}: never cut as a slow consumer")


def _get(url: str) -> str:
    request = urllib.request.Request(url, headers={"Connection": "close"})
    with urllib.request.urlopen(request, timeout=20) as response:
        return str(response.read().decode())


class Publisher(threading.Thread):
    """Publishes to every channel in turn over one keep-alive connection
    until stopped; remembers each channel's last offset."""

    def __init__(self, broker: Any, channels: list[str]) -> None:
        super().__init__(daemon=True)
        self.broker = broker
        self.channels = channels
        self.last: dict[str, int] = {}
        self.count = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.broker.port, timeout=20)
            headers = {"Authorization": f"apikey {self.broker.api_key}", "Content-Type": "application/json"}
            while not self.stop.is_set():
                for channel in self.channels:
                    body = json.dumps({"channel": channel, "data": {"for": channel, "n": self.count}})
                    conn.request("POST", "/api/publish", body, headers)
                    response = conn.getresponse()
                    reply = json.loads(response.read())
                    assert response.status == 200, reply
                    self.last[channel] = reply["offset"]
                    self.count += 1
            conn.close()
        except BaseException as exc:  # reported by the test
            self.error = exc


# -------------------------------------------------------------------- tests
KINDS = ("native", "native-deflate", "sio", "sio-upgrade")


def test_each_websocket_holds_one_descriptor(broker_factory):
    broker = broker_factory("--shards", "1", "--allow-anonymous")
    pid = shard_pid(broker)
    per_kind = 40
    total = per_kind * len(KINDS)

    async def scenario() -> tuple[int, int]:
        before = open_fds(pid)
        clients = [Client(broker.port, kind, f"bill:{i}") for kind in KINDS for i in range(per_kind)]
        for client in clients:
            await client.open()
        deadline = time.monotonic() + 20
        while await asyncio.to_thread(connections, broker) != total:
            assert time.monotonic() < deadline, "the shard never counted every connection"
            await asyncio.sleep(0.05)
        # Each one receives through the C flush, then the count is taken.
        for i in range(per_kind):
            await asyncio.to_thread(broker.api, "POST", "/api/publish", {"channel": f"bill:{i}", "data": 1})
        for client in clients:
            await client.wait_received(1)
        after = open_fds(pid)
        for client in clients:
            assert not client.errors, client.errors
            await client.end("close")
        return before, after

    before, after = asyncio.run(scenario())
    per_connection = (after - before) / total
    print(f"\nshard {pid}: {before} fds idle, {after} with {total} WebSockets: {per_connection:.2f} each")
    # Before: a socket and its dup (2 each). Now the socket alone, give or
    # take a few the process opens or closes on its own (the API's
    # keep-alive connection, lazily opened files).
    assert total - 4 <= after - before <= total + 8
    deadline = time.monotonic() + 20
    while open_fds(pid) > before + 8:  # closed sockets give their descriptors back
        assert time.monotonic() < deadline, open_fds(pid)
        time.sleep(0.05)


@pytest.mark.parametrize("shards", [1, 2])
def test_reused_descriptor_numbers_never_get_another_connections_bytes(broker_factory, tmp_path, shards):
    """Connections close (client close, vanished peer, server 1008 and 1013) and new
    ones take their descriptor numbers while every channel is published to:
    no client ever reads a publication of another channel, and each reads
    its own in order; those that stay read every one. On two shards, a
    Socket.IO upgrade that SO_REUSEPORT gives to the other shard is handed
    (SCM_RIGHTS) to its session's shard, and the sender's number is reused."""
    config = tmp_path / "small-buffers.toml"
    config.write_text("[limits]\noutbound_buffer_bytes = 65536\n")
    broker = broker_factory("--shards", str(shards), "--allow-anonymous", "--config", str(config))
    pids = shard_pids(broker)
    stayers = [Client(broker.port, KINDS[i % 4], f"bill:{100 + i}") for i in range(8)]
    slots = 8
    churn_channels = [f"bill:{200 + j}" for j in range(slots)]
    publisher = Publisher(broker, [c.channel for c in stayers] + churn_channels)
    ended: list[Client] = []
    fd_numbers: set[tuple[int, int]] = set()
    kinds: collections.Counter[str] = collections.Counter()

    async def churn(slot: int, until: float) -> None:
        round_ = 0
        while time.monotonic() < until:
            kind = KINDS[(slot + round_) % 4]
            if slot == 0:  # one slot at a time is a slow consumer: the cut is counted
                how = ("slow", "close")[round_ % 2]
            elif kind.startswith("native"):
                how = ("close", "abort", "bad")[(slot + round_) % 3]
            else:
                how = ("close", "abort")[(slot + round_) % 2]
            client = Client(broker.port, kind, churn_channels[slot], small_buffer=how == "slow")
            await client.open()
            fd_numbers.update((pid, int(name)) for pid in pids for name in os.listdir(f"/proc/{pid}/fd"))
            await client.wait_received(3)
            await client.end(how, broker)
            kinds[how] += 1
            ended.append(client)
            round_ += 1

    async def scenario() -> None:
        for client in stayers:
            await client.open()
        publisher.start()
        await asyncio.gather(*(churn(slot, time.monotonic() + 10) for slot in range(slots)))
        publisher.stop.set()
        await asyncio.to_thread(publisher.join, 30)
        assert publisher.error is None, publisher.error
        for client in stayers:
            final = publisher.last[client.channel]
            deadline = time.monotonic() + 30
            while client.offset < final and not client.errors:
                assert time.monotonic() < deadline, f"{client.channel}: {client.offset} of {final}"
                await asyncio.sleep(0.02)
            assert client.reader is not None and not client.reader.done()
            await client.end("close")

    asyncio.run(scenario())
    print(f"\n{len(ended)} connections ended and replaced ({dict(kinds)}), {publisher.count} publications, "
          f"{len(fd_numbers)} descriptor numbers seen")
    assert len(ended) >= 4 * slots, "too little churn"
    assert set(kinds) == {"close", "abort", "bad", "slow"}
    # The kernel hands out the lowest free number: far fewer numbers than
    # connections means new connections got the numbers of closed ones.
    assert len(fd_numbers) < len(ended)
    for client in stayers + ended:
        assert not client.errors, (client.kind, client.errors)
    for client in stayers:
        assert client.offset == publisher.last[client.channel]

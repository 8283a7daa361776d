"""Requests between the shards of one generation, over one stream socket
per pair of shards (DESIGN.md "Processes").

A request and its answer used to cross ZeroMQ (DEALER → ROUTER → DEALER):
each message woke the sender's and the receiver's ZeroMQ I/O threads
before it woke the receiving loop, and each ``zmq_send`` and readiness
check was a few system calls of its own. Requests never cross generations
and need no topic filtering or reconnection magic, so a plain Unix (or
loopback TCP) stream read by the event loop itself carries them: one write
by the sender, one wake-up and one read by the receiver.

Each shard listens at its ``req`` endpoint (``ipc://PATH`` is a Unix socket
at PATH, ``tcp://HOST:PORT`` a TCP port) and connects to each peer's at
start, and again on use after a failure. A message is a list of byte frames:
``!II`` (bytes after the first field, frame count), the frames' lengths
(``!I`` each), then the frames. Replies go back on the connection the
request came in on, in order.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import Callable
from typing import cast

__all__ = ["PeerLinks", "encode", "Decoder", "listen", "parse_address", "RECONNECT_DELAY"]

log = logging.getLogger("broker.peerlink")

_HEAD = struct.Struct("!II")
RECONNECT_DELAY = 0.05  # seconds between tries to reach a peer that is not (yet) listening


def encode(frames: list[bytes]) -> bytes:
    """One message on the wire."""
    count = len(frames)
    lengths = [len(frame) for frame in frames]
    head = struct.pack(f"!II{count}I", 4 + 4 * count + sum(lengths), count, *lengths)
    return head + b"".join(frames)


class Decoder:
    """Splits a byte stream into the messages ``encode`` made."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[list[bytes]]:
        """The messages completed by ``data`` (the rest waits for more)."""
        if self._buffer:
            self._buffer += data
            view: bytes | bytearray = self._buffer
        else:
            view = data
        messages, pos, end = [], 0, len(view)
        while end - pos >= 8:
            size, count = _HEAD.unpack_from(view, pos)
            stop = pos + 4 + size
            if stop > end:
                break
            frame = pos + 8 + 4 * count
            frames = []
            for length in struct.unpack_from(f"!{count}I", view, pos + 8):
                frames.append(bytes(view[frame:frame + length]))
                frame += length
            messages.append(frames)
            pos = stop
        if view is self._buffer:
            del self._buffer[:pos]
        elif pos < end:
            self._buffer += view[pos:]
        return messages


def parse_address(address: str) -> str | tuple[str, int]:
    """``ipc://PATH`` → PATH (a Unix socket); ``tcp://HOST:PORT`` → (HOST, PORT)."""
    kind, _, where = address.partition("://")
    if kind == "ipc":
        return where
    if kind == "tcp":
        host, _, port = where.rpartition(":")
        return host, int(port)
    raise ValueError(f"unsupported peer address {address!r} (ipc:// or tcp://)")


def listen(address: str) -> socket.socket:
    """A listening socket at ``address`` (a stale Unix socket file, left by a
    shard that died, is replaced)."""
    where = parse_address(address)
    if isinstance(where, str):
        try:
            os.unlink(where)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(where)
    sock.listen(64)
    sock.setblocking(False)
    return sock


class _Link(asyncio.Protocol):
    """One connection: messages in go to ``on_message``; ``send`` writes."""

    def __init__(self, on_message: Callable[[_Link, list[bytes]], None],
                 on_lost: Callable[[_Link], None] | None = None) -> None:
        self.on_message = on_message
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self._decoder = Decoder()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        for frames in self._decoder.feed(data):
            self.on_message(self, frames)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.on_lost is not None:
            self.on_lost(self)

    def send(self, frames: list[bytes]) -> bool:
        """Write one message; False when the connection is gone."""
        if self.transport is None or self.transport.is_closing():
            return False
        self.transport.write(encode(frames))
        return True


class PeerLinks:
    """This shard's end of the request links: a listener for the peers'
    requests and one outgoing connection per peer, made at once and again
    on use after a failure.

    ``serve(frames)`` answers a request message with the reply message
    (None: no reply); ``on_reply(frames)`` receives the peers' replies;
    ``on_connected(peer)`` says a connection to ``peer`` is up."""

    def __init__(self, shard_id: int, addresses: list[str], loop: asyncio.AbstractEventLoop,
                 serve: Callable[[list[bytes]], list[bytes] | None],
                 on_reply: Callable[[list[bytes]], None],
                 on_connected: Callable[[int], None] = lambda peer: None) -> None:
        self.loop = loop
        self.serve = serve
        self.on_reply = on_reply
        self.on_connected = on_connected
        self.addresses = {peer: address for peer, address in enumerate(addresses) if peer != shard_id}
        self._listener = listen(addresses[shard_id])
        self._accepted: set[_Link] = set()
        self._server: asyncio.AbstractServer | None = None
        self._starting: asyncio.Task[None] | None = loop.create_task(self._start())
        self._links: dict[int, _Link] = {}
        self._connecting: dict[int, asyncio.Task[None]] = {}
        self._closed = False
        for peer in self.addresses:  # ahead of the first request; one that fails is retried on use
            self._connecting[peer] = loop.create_task(self._connect(peer))

    @property
    def peers(self) -> list[int]:
        return sorted(self.addresses)

    async def _start(self) -> None:
        def accepted() -> _Link:
            link = _Link(self._on_request, self._accepted.discard)
            self._accepted.add(link)
            return link

        if self._listener.family == socket.AF_UNIX:
            self._server = await self.loop.create_unix_server(accepted, sock=self._listener)
        else:
            self._server = await self.loop.create_server(accepted, sock=self._listener)
        self._starting = None

    def _on_request(self, link: _Link, frames: list[bytes]) -> None:
        reply = self.serve(frames)
        if reply is not None:
            link.send(reply)

    def _on_reply(self, link: _Link, frames: list[bytes]) -> None:
        self.on_reply(frames)

    def send(self, peer: int, frames: list[bytes]) -> bool:
        """Send a request message to ``peer``; False when it cannot be
        reached now (a connection is then being made: try again shortly)."""
        link = self._links.get(peer)
        if link is not None and link.send(frames):
            return True
        if peer not in self._connecting and not self._closed:
            self._connecting[peer] = self.loop.create_task(self._connect(peer))
        return False

    async def _connect(self, peer: int) -> None:
        where = parse_address(self.addresses[peer])

        def lost(link: _Link) -> None:
            if self._links.get(peer) is link:
                del self._links[peer]

        try:
            if isinstance(where, str):
                _, link = await self.loop.create_unix_connection(lambda: _Link(self._on_reply, lost), where)
            else:
                _, link = await self.loop.create_connection(lambda: _Link(self._on_reply, lost), *where)
            if self._closed and link.transport is not None:
                link.transport.close()
            elif not self._closed:
                self._links[peer] = link
                self.on_connected(peer)  # what waits for this peer goes now, not at the next retry
        except OSError as exc:
            log.debug("peer %d not reachable yet: %s", peer, exc)
            await asyncio.sleep(RECONNECT_DELAY)  # the next send tries again, not sooner
        finally:
            self._connecting.pop(peer, None)

    def close(self) -> None:
        self._closed = True
        for task in [*self._connecting.values(), *([self._starting] if self._starting else [])]:
            task.cancel()
        if self._server is not None:
            self._server.close()
        else:
            self._listener.close()
        for link in [*self._links.values(), *self._accepted]:
            if link.transport is not None:
                link.transport.abort()
        self._links.clear()
        self._accepted.clear()

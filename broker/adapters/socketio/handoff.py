"""Passing a TCP connection to the shard that owns its Engine.IO session.

SO_REUSEPORT spreads one polling session's requests (and its WebSocket
upgrade) over the host's shards, but the session lives on one: the owner
named by its sid. A shard that receives a request for another shard's
session gives the whole connection away: the request, re-encoded as
HTTP/1.1 bytes, and a dup of its socket (SCM_RIGHTS) in one datagram on the
owner's unix socket ``<run_dir>/handoff-<shard>.sock``. The owner adopts the
socket as one of its own connections and feeds it the request, so it is
answered (or upgraded) there, and later requests on that keep-alive
connection go straight to the owner. Decision and measurements:
docs/socketio.md "Several shards".
"""
from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
from typing import Any
from collections.abc import Callable

__all__ = ["Handoff", "handoff_path"]

log = logging.getLogger("broker.handoff")

#: largest request passed on: a polling POST of ``maxPayload`` plus its head
MAX_DATAGRAM = 1 << 20


def handoff_path(run_dir: str, shard: int) -> str:
    return os.path.join(run_dir, f"handoff-{shard}.sock")


class Handoff:
    """This shard's end: it receives connections for its sessions and sends
    those of other shards' sessions to them."""

    def __init__(self, run_dir: str, shard: int, loop: asyncio.AbstractEventLoop,
                 protocol_factory: Callable[[], Any]) -> None:
        self.run_dir = run_dir
        self.loop = loop
        self.protocol_factory = protocol_factory
        self.sent = 0
        self.received = 0
        self.failed = 0
        path = handoff_path(run_dir, shard)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self._inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._inbox.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MAX_DATAGRAM)
        self._inbox.bind(path)
        self._inbox.setblocking(False)
        self._outbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._outbox.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MAX_DATAGRAM)
        self._outbox.settimeout(1.0)   # a local datagram: waits only if the owner's queue is full
        loop.add_reader(self._inbox.fileno(), self._receive)

    def send(self, shard: int, connection: Any, request: Any) -> bool:
        """Give ``connection`` (which carried ``request``) to ``shard``; False
        when it cannot move (TLS, the owner unreachable): answer here instead."""
        data = request.encode()
        if len(data) > MAX_DATAGRAM:
            return False
        sock = connection.detach()
        if sock is None:
            return False
        try:
            # sendmsg, not socket.send_fds: before Python 3.12 that drops the address
            self._outbox.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [sock.fileno()]))],
                               0, handoff_path(self.run_dir, shard))
        except OSError as exc:
            # The connection is already let go: the client sees it close and
            # retries (engine.io-client does), reaching some shard again.
            self.failed += 1
            log.warning("handoff to shard %d failed: %s", shard, exc)
            sock.close()
            return True
        sock.close()
        self.sent += 1
        return True

    def _receive(self) -> None:
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self._inbox, MAX_DATAGRAM, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("handoff receive failed: %s", exc)
                return
            if not fds:
                continue
            for extra in fds[1:]:
                os.close(extra)
            self.received += 1
            sock = socket.socket(fileno=fds[0])
            sock.setblocking(False)
            self.loop.create_task(self._adopt(sock, data))

    async def _adopt(self, sock: socket.socket, request: bytes) -> None:
        try:
            _transport, connection = await self.loop.connect_accepted_socket(self.protocol_factory, sock)
        except OSError:
            sock.close()
            return
        connection.data_received(request)

    def close(self) -> None:
        self.loop.remove_reader(self._inbox.fileno())
        path = self._inbox.getsockname()
        self._inbox.close()
        self._outbox.close()
        try:
            if isinstance(path, str) and path:
                os.unlink(path)
        except OSError:
            pass

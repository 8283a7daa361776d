"""The load generator's NATS side: receivers over NATS's WebSocket listener
and a publisher over its TCP client port, both speaking the NATS text
protocol (INFO, CONNECT, SUB, PUB, MSG, PING/PONG).

NATS has no offsets, so the publisher numbers each channel's publications
itself (``seq`` 1, 2, 3, ... per channel, in the same JSON ``data`` the
broker's targets get) and receivers count gaps and duplicates on that
``seq``: one publisher connection per stream keeps a channel's messages in
order (NATS orders the messages of one connection). Channel names are used
as subjects as they are: ``bill:1`` and ``user:42`` are valid NATS subjects
(only ``.``, ``*``, ``>`` and whitespace are special).
"""
from __future__ import annotations

import asyncio
import time
from array import array
from collections import Counter
from typing import Any

from .worker import Receiver, publication_data

try:  # as in worker: the receivers need picows, the module's pure parts do not
    from picows import WSMsgType
except ImportError:  # pragma: no cover - picows comes with the test extra
    WSMsgType = None  # type: ignore[misc,assignment]

__all__ = ["NatsReceiver", "publish_streams", "CONNECT"]

CONNECT = b'CONNECT {"verbose":false,"pedantic":false}\r\n'

_monotonic_ns = time.monotonic_ns


class NatsReceiver(Receiver):
    """One NATS client over WebSocket, subscribed to (at most) one subject.

    It answers the server's INFO with CONNECT, SUB and a PING; the PONG
    means the subscription is in place (the server handles a connection's
    commands in order), so ``start`` is 0: every publication of the run
    comes after it. The frames are a byte stream (a MSG may span frames, a
    frame may carry many), so ``feed`` keeps what is left of a message.
    """

    __slots__ = ("_buffer", "_hello")

    def __init__(self, channel: str | None, latencies: array[int], ready: asyncio.Future[None] | None = None) -> None:
        super().__init__(channel, latencies, ready)
        self._buffer = b""
        self._hello = CONNECT + (b"SUB %s 1\r\n" % channel.encode() if channel else b"") + b"PING\r\n"

    def on_ws_connected(self, transport: Any) -> None:
        self.transport = transport    # INFO comes first

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        msg_type = frame.msg_type
        if msg_type in (WSMsgType.BINARY, WSMsgType.TEXT, WSMsgType.CONTINUATION):
            if frame.rsv1:
                self.errors.append("compressed frame (not offered by this server)")
                return
            self.feed(frame.get_payload_as_bytes(), _monotonic_ns())
        else:
            super().on_ws_frame(transport, frame)

    def _send(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.send(WSMsgType.BINARY, data)

    def feed(self, payload: bytes, now_ns: int) -> None:
        """Account the protocol bytes of one frame."""
        buf = self._buffer + payload if self._buffer else payload
        size = len(buf)
        pos = 0
        append = self.latencies.append
        while pos < size:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            if buf.startswith(b"MSG ", pos):
                # MSG <subject> <sid> [reply-to] <#bytes>\r\n<payload>\r\n
                start = eol + 2
                end = start + int(buf[buf.rfind(b" ", pos, eol) + 1:eol])
                if end + 2 > size:
                    break
                pos = end + 2
                if self.start is None:
                    self.early += 1
                    continue
                seq_at = buf.find(b'"seq":', start, end) + 6
                if seq_at < 6 or not self._count(int(buf[seq_at:buf.find(b",", seq_at, end)])):
                    continue
                if buf.startswith(b'{"ts":', start):   # publication_data puts ts first
                    try:
                        append(now_ns - int(buf[start + 6:buf.find(b",", start + 6, end)]))
                    except ValueError:
                        pass
            else:
                self._control(buf[pos:eol])
                pos = eol + 2
        self._buffer = buf[pos:]

    def _control(self, line: bytes) -> None:
        if line == b"PING":
            self._send(b"PONG\r\n")
        elif line == b"PONG":
            if self.start is None:
                if self.channel:
                    self.start = self.last = 0
                self._resolve(None)
        elif line.startswith(b"INFO "):
            if self._hello:
                hello, self._hello = self._hello, b""
                self._send(hello)
        elif line.startswith(b"-ERR"):
            message = line[5:85].decode("utf-8", "replace")
            self.errors.append(f"nats error {message}")
            self._resolve(RuntimeError(f"nats error {message}"))
        elif line and line != b"+OK":
            self.errors.append(f"unexpected line: {line[:80]!r}")


class _NatsConnection(asyncio.Protocol):
    """The publisher's TCP client connection: CONNECT once INFO came,
    pipelined PUBs (no reply each), PING/PONG to know the server has read
    everything sent before."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.info: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pongs: list[asyncio.Future[None]] = []
        self.errors: Counter[str] = Counter()
        self.closed = False
        self._buffer = b""
        self._writable = asyncio.Event()
        self._writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self._buffer + data
        *lines, self._buffer = buf.split(b"\r\n")
        for line in lines:
            if line.startswith(b"INFO ") and not self.info.done():
                assert self.transport is not None
                self.transport.write(CONNECT)
                self.info.set_result(None)
            elif line == b"PING" and self.transport is not None:
                self.transport.write(b"PONG\r\n")
            elif line == b"PONG" and self.pongs:
                waiter = self.pongs.pop(0)
                if not waiter.done():
                    waiter.set_result(None)
            elif line.startswith(b"-ERR"):
                self.errors[line[:60].decode("utf-8", "replace")] += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._writable.set()
        error = exc or ConnectionError("nats connection closed")
        for waiter in [self.info, *self.pongs]:
            if not waiter.done():
                waiter.set_exception(error)
        self.pongs = []

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    async def writable(self) -> None:
        await self._writable.wait()
        if self.closed:
            raise ConnectionError("nats connection closed")

    def ping(self) -> asyncio.Future[None]:
        assert self.transport is not None
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pongs.append(waiter)
        self.transport.write(b"PING\r\n")
        return waiter


async def _publish_stream(stream: Any, host: str, port: int, t0: float, deadline: float, state: dict[str, int],
                          finals: dict[str, int], statuses: Counter[str]) -> None:
    """One stream's schedule on one connection: publication i is written at
    t0 + i/rate (open loop, nothing awaited between them), then a PING whose
    PONG says the server read them all."""
    loop = asyncio.get_running_loop()
    try:
        _, conn = await asyncio.wait_for(loop.create_connection(_NatsConnection, host, port), 10)
        await asyncio.wait_for(conn.info, 10)
    except Exception as exc:
        state["failed"] += stream.total
        statuses[f"connect {type(exc).__name__}"] += 1
        return
    assert conn.transport is not None
    written = 0
    try:
        while stream.next < stream.total and time.monotonic() < deadline:
            i = stream.next
            stream.next += 1
            delay = t0 + i / stream.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif i % 64 == 0:
                await asyncio.sleep(0)      # behind schedule: still let the loop read
            await conn.writable()
            channel = stream.channel()
            seq = finals.get(channel, 0) + 1
            finals[channel] = seq
            data = publication_data(seq, _monotonic_ns())
            conn.transport.write(b"PUB %s %d\r\n%s\r\n" % (channel.encode(), len(data), data))
            written += 1
            state["ok"] += 1
        await asyncio.wait_for(conn.ping(), 30)
    except Exception as exc:
        statuses[f"{type(exc).__name__}: {str(exc)[:60]}"] += 1
        # what was written but not confirmed counts as failed
        state["ok"] -= written
        state["failed"] += written
    finally:
        statuses.update(conn.errors)
        conn.transport.close()


async def publish_streams(streams: list[Any], host: str, port: int, t0: float, deadline: float,
                          state: dict[str, int], finals: dict[str, int], statuses: Counter[str]) -> None:
    """Every stream at once, one NATS connection each."""
    await asyncio.gather(*(_publish_stream(s, host, port, t0, deadline, state, finals, statuses) for s in streams))

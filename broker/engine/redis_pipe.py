"""One connection to one Redis node for the engine's script calls.

A loop turn's calls are written as one packed write the moment the turn
ends, and the replies, which Redis sends in command order, are matched to
their batch as they are parsed (``data_received``): no Task, no pool
checkout, no coroutine per reply. So a publication is acknowledged a few
loop turns after it arrived, not a dozen, and batches from consecutive
turns may be in flight together on the one connection.

redis-py opens the connection (TLS, AUTH, SELECT: whatever the URL asks
for); its transport is then handed to this protocol. A batch not answered
within ``timeout`` fails, with everything behind it, and the connection is
closed (its replies could no longer be matched): the next call opens a new
one.
"""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

from redis.exceptions import ResponseError

__all__ = ["Pipe", "Reader", "adopt"]

_HiredisReader: Any
try:
    from hiredis import Reader as _HiredisReader
except ImportError:  # pragma: no cover - hiredis is the [redis] extra
    _HiredisReader = None


class _PyReader:
    """RESP2 replies in Python (what hiredis.Reader does in C): ``feed``
    bytes, ``gets`` a reply or False when none is complete yet."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._pos = 0

    def feed(self, data: bytes) -> None:
        if self._pos:
            del self._buffer[:self._pos]
            self._pos = 0
        self._buffer += data

    def gets(self) -> Any:
        try:
            reply, self._pos = self._parse(self._pos)
        except IndexError:  # incomplete
            return False
        return reply

    def _parse(self, pos: int) -> tuple[Any, int]:
        buf = self._buffer
        end = buf.find(b"\r\n", pos)
        if end < 0:
            raise IndexError
        kind, line = buf[pos:pos + 1], bytes(buf[pos + 1:end])
        pos = end + 2
        if kind == b"+":
            return line, pos
        if kind == b"-":
            return ResponseError(line.decode(errors="replace")), pos
        if kind == b":":
            return int(line), pos
        if kind == b"$":
            size = int(line)
            if size < 0:
                return None, pos
            if len(buf) < pos + size + 2:
                raise IndexError
            return bytes(buf[pos:pos + size]), pos + size + 2
        if kind == b"*":
            count = int(line)
            if count < 0:
                return None, pos
            items = []
            for _ in range(count):
                item, pos = self._parse(pos)
                items.append(item)
            return items, pos
        raise ValueError(f"not a RESP2 reply: {bytes(buf[pos - len(line) - 3:pos])!r}")


def Reader() -> Any:
    """A RESP2 reply parser: hiredis's where installed (errors as ResponseError)."""
    if _HiredisReader is not None:
        return _HiredisReader(replyError=ResponseError)
    return _PyReader()


async def adopt(make_connection: Callable[[], Any], protocol: asyncio.Protocol,
                timeout: float) -> tuple[asyncio.Transport, Any]:
    """Open a connection with redis-py (TLS, AUTH, SELECT: whatever the URL
    asks for), then hand its transport to ``protocol``. Returns the
    transport and an object to keep while it is in use (redis-py's stream
    writer, whose ``__del__`` would close it)."""
    conn = make_connection()
    try:
        await asyncio.wait_for(conn.connect(), timeout)
    except BaseException:
        try:
            await conn.disconnect()
        except Exception:
            pass
        raise
    writer = conn._writer
    conn._reader = conn._writer = None  # ours from here on: redis-py must not close it
    transport: asyncio.Transport = writer.transport
    transport.set_protocol(protocol)
    return transport, writer


class _Batch:
    __slots__ = ("count", "replies", "future", "sent")

    def __init__(self, count: int, future: asyncio.Future[list[Any]], sent: float) -> None:
        self.count = count
        self.replies: list[Any] = []
        self.future = future
        self.sent = sent


class Pipe(asyncio.Protocol):
    """Pipelined requests on one connection; ``request`` answers with the
    batch's replies in order (a failed call's reply is a ResponseError)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, make_connection: Callable[[], Any],
                 timeout: float, name: str) -> None:
        self.loop = loop
        self.timeout = timeout
        self.name = name
        self.closed = False
        self.transport: asyncio.Transport | None = None
        self._reader = Reader()
        self._batches: deque[_Batch] = deque()
        self._unsent: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None
        self._keep: Any = None  # redis-py's stream writer: its __del__ would close our transport
        self._opening = loop.create_task(self._open(make_connection))

    def request(self, payload: bytes, count: int) -> asyncio.Future[list[Any]]:
        future: asyncio.Future[list[Any]] = self.loop.create_future()
        if self.closed:
            future.set_exception(ConnectionError(f"Redis connection {self.name} is closed"))
            return future
        self._batches.append(_Batch(count, future, self.loop.time()))
        if self.transport is not None:
            self.transport.write(payload)
        else:
            self._unsent.append(payload)  # connecting: sent once it is open
        if self._timer is None:
            self._timer = self.loop.call_later(self.timeout, self._check_deadline)
        return future

    async def _open(self, make_connection: Callable[[], Any]) -> None:
        try:
            transport, self._keep = await adopt(make_connection, self, self.timeout)
        except Exception as exc:  # unreachable, refused, bad password, TLS: every waiting call fails
            self.fail(ConnectionError(f"cannot connect to Redis {self.name}: {exc or type(exc).__name__}"))
            return
        if self.closed:
            transport.close()
            return
        self.transport = transport
        if self._unsent:
            transport.write(b"".join(self._unsent))
            self._unsent.clear()

    # ------------------------------------------------------------ protocol
    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        batches = self._batches
        while True:
            reply = reader.gets()
            if reply is False:
                return
            if not batches:  # a reply nobody asked for: the stream is out of step
                self.fail(ConnectionError(f"Redis {self.name} sent a reply nobody asked for"))
                return
            head = batches[0]
            head.replies.append(reply)
            if len(head.replies) == head.count:
                batches.popleft()
                if not head.future.done():
                    head.future.set_result(head.replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(ConnectionError(f"Redis connection {self.name} lost: {exc or 'closed'}"))

    def _check_deadline(self) -> None:
        self._timer = None
        if not self._batches or self.closed:
            return
        late = self._batches[0].sent + self.timeout - self.loop.time()
        if late <= 0:
            self.fail(TimeoutError(f"Redis {self.name} did not answer within {self.timeout:g}s"))
        else:
            self._timer = self.loop.call_later(late, self._check_deadline)

    def fail(self, exc: Exception) -> None:
        """Close for good: every unanswered batch gets ``exc``."""
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batches, self._batches = self._batches, deque()
        for batch in batches:
            if not batch.future.done():
                batch.future.set_exception(exc)
        self._unsent.clear()
        if self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        self._opening.cancel()
        self.fail(ConnectionError(f"Redis connection {self.name} closed"))

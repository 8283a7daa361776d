"""The publishers' side of the backend stream (PROTOCOL.md §3, ``/api/stream``).

One WebSocket per publisher, opened on first use. Commands are pipelined:
each call sends its command at once and waits for its reply, and since the
broker answers in command order, replies are matched first in, first out.
A stream that breaks fails the calls in flight with ``PublishError(0, ...)``
(their outcome is unknown, as with an HTTP request cut mid-way) and the next
call opens a new one.
"""
from __future__ import annotations

import asyncio
import collections
import json
import ssl
import threading
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect as async_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import ClientConnection as SyncConnection, connect as sync_connect

from .errors import PublishError

__all__ = ["AsyncStreamLink", "StreamLink", "stream_url", "stream_reply"]


def stream_url(http_url: str) -> str:
    """``http://host:port/prefix`` → ``ws://host:port/prefix/api/stream``."""
    parts = urlsplit(http_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/api/stream", "", ""))


def stream_reply(message: dict[str, Any]) -> dict[str, Any]:
    """A stream reply as the HTTP API would answer it, or PublishError."""
    op = message.pop("op", None)
    message.pop("id", None)
    if op == "error":
        raise PublishError(int(message.get("code", 0)), {"error": message.get("message", "")})
    if op not in ("published", "broadcasted"):
        raise PublishError(0, {"error": f"unexpected stream reply {op!r}"})
    return message


def _refused(url: str, exc: BaseException) -> PublishError:
    if isinstance(exc, InvalidStatus):
        try:
            body = json.loads(exc.response.body)
        except ValueError:
            body = {"error": f"HTTP {exc.response.status_code}"}
        return PublishError(exc.response.status_code, body)
    return PublishError(0, {"error": f"cannot open the backend stream at {url}: {exc or type(exc).__name__}"})


class AsyncStreamLink:
    """The stream for ``AsyncPublisher(stream=True)``: pipelined calls."""

    def __init__(self, http_url: str, api_key: str | None, timeout: float) -> None:
        self.url = stream_url(http_url)
        self.headers = {"Authorization": f"apikey {api_key}"} if api_key else {}
        self.timeout = timeout
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: collections.deque[asyncio.Future[dict[str, Any]]] = collections.deque()
        self._opening = asyncio.Lock()

    async def call(self, command: dict[str, Any]) -> dict[str, Any]:
        return stream_reply((await self.call_many([command]))[0])

    async def call_many(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send many commands in one frame; their raw replies, in order."""
        ws = await self._link()
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        self._waiting.extend(futures)
        # Queued synchronously, in call order: replies come back in this order.
        asyncio.ensure_future(self._write(ws, "\n".join(
            json.dumps(c, separators=(",", ":"), ensure_ascii=False) for c in commands)))
        async with asyncio.timeout(self.timeout):
            return [await future for future in futures]

    async def _write(self, ws: ClientConnection, text: str) -> None:
        try:
            await ws.send(text)
        except ConnectionClosed as exc:
            self._fail(exc)

    async def _link(self) -> ClientConnection:
        if self._ws is not None:
            return self._ws
        async with self._opening:
            if self._ws is None:
                try:
                    self._ws = await async_connect(
                        self.url, additional_headers=self.headers, open_timeout=self.timeout,
                        max_size=None, ssl=ssl.create_default_context() if self.url.startswith("wss") else None)
                except (OSError, InvalidHandshake, TimeoutError) as exc:
                    raise _refused(self.url, exc) from exc
                self._reader = asyncio.ensure_future(self._read(self._ws))
            return self._ws

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for frame in ws:
                for line in str(frame).split("\n"):
                    if self._waiting:
                        future = self._waiting.popleft()
                        if not future.done():
                            future.set_result(json.loads(line))
        except ConnectionClosed as exc:
            self._fail(exc)
            return
        self._fail(ConnectionResetError("the broker closed the backend stream"))

    def _fail(self, exc: BaseException) -> None:
        if self._ws is None:
            return
        self._ws = None
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(PublishError(0, {"error": f"backend stream lost: {exc}"}))

    async def aclose(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None


class StreamLink:
    """The stream for ``Publisher(stream=True)``: one call at a time, thread-safe."""

    def __init__(self, http_url: str, api_key: str | None, timeout: float) -> None:
        self.url = stream_url(http_url)
        self.headers = {"Authorization": f"apikey {api_key}"} if api_key else {}
        self.timeout = timeout
        self._ws: SyncConnection | None = None
        self._lock = threading.Lock()

    def call(self, command: dict[str, Any]) -> dict[str, Any]:
        return stream_reply(self.call_many([command])[0])

    def call_many(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        with self._lock:
            if self._ws is None:
                try:
                    self._ws = sync_connect(self.url, additional_headers=self.headers,
                                            open_timeout=self.timeout, max_size=None).__enter__()
                except (OSError, InvalidHandshake, TimeoutError) as exc:
                    raise _refused(self.url, exc) from exc
            ws = self._ws
            try:
                ws.send("\n".join(json.dumps(c, separators=(",", ":"), ensure_ascii=False)
                                  for c in commands))
                replies: list[dict[str, Any]] = []
                while len(replies) < len(commands):
                    replies.extend(json.loads(line) for line in str(ws.recv(timeout=self.timeout)).split("\n"))
                return replies
            except (ConnectionClosed, TimeoutError, OSError) as exc:
                self._ws = None
                ws.close()
                raise PublishError(0, {"error": f"backend stream lost: {exc}"}) from exc

    def close(self) -> None:
        with self._lock:
            if self._ws is not None:
                self._ws.close()
                self._ws = None

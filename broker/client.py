"""Python clients of the broker (PROTOCOL.md §1 and §3).

- ``Publisher``: the server API for application backends, synchronous, one
  keep-alive HTTP/1.1 connection (``http.client``).
- ``AsyncPublisher``: the same calls as coroutines (asyncio streams and
  httptools' response parser), one request in flight at a time.
- ``Client``: a WebSocket subscriber that reconnects with backoff and
  recovers what it missed (``recover`` with the last epoch and offset).

Errors (``broker.errors``): an API error status raises
``PublishError(status, body)``; a broker that cannot be reached at all raises
``PublishError(0, {"error": ...})`` with the OS error as ``__cause__``, so
one ``except PublishError`` covers "not published". The WebSocket client
raises ``AuthError`` when the upgrade is refused (401/403),
``ProtocolViolation(code, message)`` for an ``error`` reply and
``ConnectionError`` when the connection is gone. docs/client.md has more.
"""
from __future__ import annotations

import asyncio
import http.client
import inspect
import json
import logging
import random
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import httptools
from websockets.asyncio.client import ClientConnection, connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from broker.errors import AuthError, ProtocolViolation, PublishError
from broker.streamlink import AsyncStreamLink, StreamLink, stream_reply

__all__ = ["Publisher", "AsyncPublisher", "Client", "Publication"]

logger = logging.getLogger("broker.client")

DEFAULT_URL = "http://127.0.0.1:8765"
DEFAULT_WS_URL = "ws://127.0.0.1:8765/ws"


def _compact(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _decode_reply(status: int, raw: bytes) -> dict[str, Any]:
    """The JSON reply of an API call, or PublishError for an error status."""
    try:
        body: Any = json.loads(raw) if raw else {}
    except ValueError:
        body = {"error": raw.decode("utf-8", "replace").strip() or f"HTTP {status}"}
    if not 200 <= status < 300:
        if not isinstance(body, dict):
            body = {"error": body}
        raise PublishError(status, body)
    if not isinstance(body, dict):
        raise PublishError(status, {"error": f"unexpected reply {body!r}"})
    return body


class _Api:
    """What both publishers share: URL parsing and request shaping."""

    def __init__(self, url: str, api_key: str | None, timeout: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"broker URL must be http:// or https://, got {url!r}")
        self.url = url
        self.api_key = api_key
        self.timeout = timeout
        self._tls = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._tls else 80)
        self._prefix = parts.path.rstrip("/")
        netloc = parts.netloc.rpartition("@")[2]
        self._host_header = netloc

    def _headers(self, body: bytes | None) -> dict[str, str]:
        headers = {"Host": self._host_header, "Accept": "application/json"}
        if self.api_key is not None:
            headers["Authorization"] = f"apikey {self.api_key}"
        if body is not None:
            headers["Content-Type"] = "application/json"
            headers["Content-Length"] = str(len(body))
        return headers

    def _unreachable(self, exc: BaseException) -> PublishError:
        reason = str(exc) or type(exc).__name__
        error = PublishError(0, {"error": f"cannot reach the broker at {self.url}: {reason}"})
        error.__cause__ = exc
        return error

    # Each call names (method, path, body); the transports run it.
    def _publish(self, channel: str, data: object) -> tuple[str, str, bytes | None]:
        return "POST", "/api/publish", _compact({"channel": channel, "data": data})

    def _broadcast(self, channels: Iterable[str], data: object) -> tuple[str, str, bytes | None]:
        return "POST", "/api/broadcast", _compact({"channels": list(channels), "data": data})

    def _batch(self, publications: Iterable[tuple[str, object]]) -> tuple[str, str, bytes | None]:
        items = [{"channel": channel, "data": data} for channel, data in publications]
        return "POST", "/api/publish/batch", _compact({"publications": items})

    def _bill(self, bill_id: object, update: object) -> tuple[str, str, bytes | None]:
        return "POST", f"/api/bills/{quote(str(bill_id), safe='')}/updates", _compact(update)

    def _notify(self, user_id: object, notification: object) -> tuple[str, str, bytes | None]:
        return "POST", f"/api/users/{quote(str(user_id), safe='')}/notifications", _compact(notification)

    def _history(self, channel: str, since: int, limit: int | None) -> tuple[str, str, bytes | None]:
        query: dict[str, object] = {"channel": channel, "since": since}
        if limit is not None:
            query["limit"] = limit
        return "GET", f"/api/history?{urlencode(query)}", None

    def _stats(self) -> tuple[str, str, bytes | None]:
        return "GET", "/api/stats", None

    # The same calls as backend-stream commands (PROTOCOL.md §3, /api/stream).
    @staticmethod
    def _publish_command(channel: str, data: object) -> dict[str, Any]:
        return {"op": "publish", "channel": channel, "data": data}

    @staticmethod
    def _broadcast_command(channels: Iterable[str], data: object) -> dict[str, Any]:
        return {"op": "broadcast", "channels": list(channels), "data": data}

    @staticmethod
    def _batch_results(replies: list[dict[str, Any]]) -> dict[str, Any]:
        """Batch replies shaped as /api/publish/batch answers; the first error raises."""
        return {"results": [stream_reply(reply) for reply in replies]}


class Publisher(_Api):
    """The server API (PROTOCOL.md §3), synchronous and thread-safe.

    One keep-alive connection, opened on first use; a keep-alive connection
    the server dropped while idle is reopened once, transparently.
    """

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 10.0,
                 stream: bool = False) -> None:
        super().__init__(url, api_key, timeout)
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()
        # stream=True: publications go over the backend stream (one WebSocket)
        self._stream = StreamLink(url, api_key, timeout) if stream else None

    def publish(self, channel: str, data: object) -> dict[str, Any]:
        """``{"channel","epoch","offset"}`` once the publication is stored."""
        if self._stream is not None:
            return self._stream.call(self._publish_command(channel, data))
        return self._call(*self._publish(channel, data))

    def broadcast(self, channels: Iterable[str], data: object) -> dict[str, Any]:
        """``{"results": [{"channel","offset"}, ...]}``; all or nothing."""
        if self._stream is not None:
            return self._stream.call(self._broadcast_command(channels, data))
        return self._call(*self._broadcast(channels, data))

    def publish_batch(self, publications: Iterable[tuple[str, object]]) -> dict[str, Any]:
        """Many ``(channel, data)`` publications in one request:
        ``{"results": [{"channel","epoch","offset"}, ...]}`` in order; all or
        nothing over HTTP (over the stream, each is its own command)."""
        if self._stream is not None:
            return self._batch_results(self._stream.call_many(
                [self._publish_command(channel, data) for channel, data in publications]))
        return self._call(*self._batch(publications))

    def broadcast_bill_update(self, bill_id: object, update: object) -> dict[str, Any]:
        """Publish ``update`` to ``bill:<bill_id>``."""
        if self._stream is not None:
            return self.publish(f"bill:{bill_id}", update)
        return self._call(*self._bill(bill_id, update))

    def send_user_notification(self, user_id: object, notification: object) -> dict[str, Any]:
        """Publish ``notification`` to ``user:<user_id>``."""
        if self._stream is not None:
            return self.publish(f"user:{user_id}", notification)
        return self._call(*self._notify(user_id, notification))

    def history(self, channel: str, since: int = 0, limit: int | None = None) -> dict[str, Any]:
        """The retained publications of ``channel`` after offset ``since``."""
        return self._call(*self._history(channel, since, limit))

    def get_stats(self) -> dict[str, Any]:
        return self._call(*self._stats())

    def close(self) -> None:
        with self._lock:
            self._drop()
        if self._stream is not None:
            self._stream.close()

    def __enter__(self) -> "Publisher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        if self._conn is not None:
            return self._conn, True
        if self._tls:
            self._conn = http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout,
                                                     context=ssl.create_default_context())
        else:
            self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
        return self._conn, False

    def _call(self, method: str, path: str, body: bytes | None) -> dict[str, Any]:
        headers = self._headers(body)
        headers.pop("Host")  # http.client sends its own
        with self._lock:
            while True:
                conn, reused = self._connection()
                try:
                    conn.request(method, self._prefix + path, body=body, headers=headers)
                    response = conn.getresponse()
                    raw = response.read()
                except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                    # An idle keep-alive connection the server closed: the
                    # request never reached it, so one retry on a new one.
                    self._drop()
                    if reused:
                        continue
                    raise self._unreachable(exc) from exc
                except (OSError, http.client.HTTPException) as exc:
                    self._drop()
                    raise self._unreachable(exc) from exc
                if response.will_close:
                    self._drop()
                return _decode_reply(response.status, raw)


class _ResponseReader:
    """httptools callbacks collecting one HTTP response."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.body = bytearray()
        self.headers_done = False
        self.complete = False
        self.length_known = False
        self.keep_alive = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self.length_known = True

    def on_headers_complete(self) -> None:
        self.headers_done = True
        # Asked here: after the message the parser no longer knows.
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


class AsyncPublisher(_Api):
    """``Publisher`` for asyncio: the same methods, as coroutines.

    One keep-alive connection; calls wait for each other (one request in
    flight). A cancelled call closes the connection (its state is unknown).
    """

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 10.0,
                 stream: bool = False) -> None:
        super().__init__(url, api_key, timeout)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()
        # stream=True: publications go over the backend stream, pipelined
        # (concurrent calls do not wait for each other's replies).
        self._stream = AsyncStreamLink(url, api_key, timeout) if stream else None

    async def publish(self, channel: str, data: object) -> dict[str, Any]:
        if self._stream is not None:
            return await self._stream.call(self._publish_command(channel, data))
        return await self._call(*self._publish(channel, data))

    async def broadcast(self, channels: Iterable[str], data: object) -> dict[str, Any]:
        if self._stream is not None:
            return await self._stream.call(self._broadcast_command(channels, data))
        return await self._call(*self._broadcast(channels, data))

    async def publish_batch(self, publications: Iterable[tuple[str, object]]) -> dict[str, Any]:
        if self._stream is not None:
            return self._batch_results(await self._stream.call_many(
                [self._publish_command(channel, data) for channel, data in publications]))
        return await self._call(*self._batch(publications))

    async def broadcast_bill_update(self, bill_id: object, update: object) -> dict[str, Any]:
        if self._stream is not None:
            return await self.publish(f"bill:{bill_id}", update)
        return await self._call(*self._bill(bill_id, update))

    async def send_user_notification(self, user_id: object, notification: object) -> dict[str, Any]:
        if self._stream is not None:
            return await self.publish(f"user:{user_id}", notification)
        return await self._call(*self._notify(user_id, notification))

    async def history(self, channel: str, since: int = 0, limit: int | None = None) -> dict[str, Any]:
        return await self._call(*self._history(channel, since, limit))

    async def get_stats(self) -> dict[str, Any]:
        return await self._call(*self._stats())

    async def aclose(self) -> None:
        async with self._lock:
            self._drop()
        if self._stream is not None:
            await self._stream.aclose()

    async def __aenter__(self) -> "AsyncPublisher":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _drop(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def _call(self, method: str, path: str, body: bytes | None) -> dict[str, Any]:
        head = f"{method} {self._prefix}{path} HTTP/1.1\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in self._headers(body).items())
        request = (head + "\r\n").encode("latin-1") + (body or b"")
        async with self._lock:
            while True:
                reused = self._writer is not None
                try:
                    async with asyncio.timeout(self.timeout):
                        status, raw, keep_alive = await self._exchange(request)
                except _StaleConnection as exc:
                    self._drop()
                    if reused:
                        continue
                    raise self._unreachable(exc.__cause__ or exc) from exc
                except (OSError, TimeoutError, httptools.HttpParserError) as exc:
                    self._drop()
                    raise self._unreachable(exc) from exc
                except BaseException:
                    self._drop()
                    raise
                if not keep_alive:
                    self._drop()
                return _decode_reply(status, raw)

    async def _exchange(self, request: bytes) -> tuple[int, bytes, bool]:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(
                self._host, self._port, ssl=ssl.create_default_context() if self._tls else None)
        assert self._reader is not None
        response = _ResponseReader()
        try:
            self._writer.write(request)
            await self._writer.drain()
            chunk = await self._reader.read(65536)
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise _StaleConnection() from exc
        if not chunk:
            raise _StaleConnection() from ConnectionResetError("connection closed by the broker")
        while True:
            response.parser.feed_data(chunk)
            if response.complete:
                break
            chunk = await self._reader.read(65536)
            if not chunk:
                if response.headers_done and not response.length_known:
                    break  # body delimited by the end of the connection
                raise ConnectionResetError("connection closed in the middle of a response")
        keep_alive = response.complete and response.keep_alive
        return response.parser.get_status_code(), bytes(response.body), keep_alive


class _StaleConnection(Exception):
    """The connection was closed before any byte of the response."""


# --------------------------------------------------------------------------
# WebSocket client

@dataclass(frozen=True)
class Publication:
    """One publication of a subscribed channel."""

    channel: str
    offset: int
    data: Any


Handler = Callable[[Publication], Any]
LostHandler = Callable[[str, str], Any]


class _Subscription:
    __slots__ = ("channel", "handler", "on_lost", "epoch", "offset", "active", "recovering", "lost_reason")

    def __init__(self, channel: str, handler: Handler, on_lost: LostHandler | None) -> None:
        self.channel = channel
        self.handler = handler
        self.on_lost = on_lost
        self.epoch: str | None = None      # known once subscribed
        self.offset = 0                    # last offset delivered (or skipped by a lost stream)
        self.active = False                # publications are accepted
        self.recovering = False            # a subscribe with recover is in flight
        self.lost_reason: str | None = None


@dataclass
class _Pending:
    future: asyncio.Future[dict[str, Any]] | None
    on_reply: Callable[[dict[str, Any]], None] | None = None


_RETRYABLE = (429, 503)


class Client:
    """A WebSocket subscriber (PROTOCOL.md §1) that survives disconnects.

    ``token`` is a JWT, or a callable (sync or async) returning a fresh one
    for every (re)connection, or None for an anonymous connection. Handlers
    run one at a time in arrival order on a dispatcher task, so a handler
    may await the client itself; a slow handler delays later ones, not the
    connection.
    """

    def __init__(self, url: str = DEFAULT_WS_URL,
                 token: str | Callable[[], str | Awaitable[str]] | None = None, *,
                 reconnect: bool = True, backoff_initial: float = 0.1, backoff_max: float = 5.0,
                 request_timeout: float | None = 10.0, open_timeout: float = 10.0) -> None:
        self.url = url
        self.token = token
        self.reconnect = reconnect
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.request_timeout = request_timeout
        self.open_timeout = open_timeout
        self.reconnects = 0                  # successful reconnections so far
        # (monotonic time the connection was lost, time it was open again), per reconnection
        self.reconnected: list[tuple[float, float]] = []
        self._ws: ClientConnection | None = None
        self._subs: dict[str, _Subscription] = {}
        self._pending: dict[int, _Pending] = {}
        self._next_id = 0
        self._connected = asyncio.Event()
        self._closed = asyncio.Event()       # set when the client stops for good
        self._closing = False
        self._fatal: BaseException | None = None
        self._reconnect_after: float | None = None
        self._reader: asyncio.Task[None] | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[tuple[Callable[..., Any], tuple[Any, ...]]] = asyncio.Queue()
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- public API ----------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def subscriptions(self) -> list[str]:
        return list(self._subs)

    def position(self, channel: str) -> tuple[str, int] | None:
        """(epoch, last offset) the client holds for ``channel``."""
        sub = self._subs.get(channel)
        if sub is None or sub.epoch is None:
            return None
        return sub.epoch, sub.offset

    async def connect(self) -> "Client":
        """Open the connection; AuthError when the broker refuses the token."""
        if self._reader is not None:
            raise RuntimeError("Client.connect() called twice")
        self._closing = False
        await self._open()
        self._connected.set()
        self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch_loop())
        self._reader = asyncio.get_running_loop().create_task(self._run())
        return self

    async def subscribe(self, channel: str, handler: Handler, *,
                        on_lost: LostHandler | None = None) -> dict[str, Any]:
        """Subscribe; returns the ``subscribed`` reply. ``handler(Publication)``
        gets every publication in offset order; ``on_lost(channel, reason)``
        is called when publications were lost for good (refetch state)."""
        if channel in self._subs:
            raise ProtocolViolation(409, f"already subscribed to {channel!r}")
        sub = _Subscription(channel, handler, on_lost)
        self._subs[channel] = sub
        try:
            return await self._command({"op": "subscribe", "channel": channel},
                                       on_reply=lambda reply: self._on_subscribed(sub, reply, None))
        except BaseException:
            if self._subs.get(channel) is sub and not sub.active:
                del self._subs[channel]
            raise

    async def unsubscribe(self, channel: str) -> dict[str, Any]:
        """Stop receiving ``channel``; returns the ``unsubscribed`` reply."""
        self._subs.pop(channel, None)
        return await self._command({"op": "unsubscribe", "channel": channel})

    async def publish(self, channel: str, data: object) -> dict[str, Any]:
        """Publish from the client (only where the namespace allows it)."""
        return await self._command({"op": "publish", "channel": channel, "data": data})

    async def ping(self) -> float:
        """Round trip of a protocol ``ping``, in seconds."""
        start = time.monotonic()
        await self._command({"op": "ping"})
        return time.monotonic() - start

    async def close(self) -> None:
        """Close the connection and stop reconnecting; pending calls fail."""
        self._closing = True
        self._closed.set()
        self._connected.clear()
        ws = self._ws
        if ws is not None:
            await ws.close()
        for task in (self._reader, self._dispatcher, *self._tasks):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        for task in (self._reader, self._dispatcher):
            if task is not None and task is not asyncio.current_task():
                try:
                    await task
                except BaseException:
                    pass
        if self._ws is not ws and self._ws is not None:
            await self._ws.close()  # opened by a reconnect racing with close()
        self._fail_pending(ConnectionError("client closed"))

    async def __aenter__(self) -> "Client":
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- connection ----------------------------------------------------------

    async def _token(self) -> str | None:
        token = self.token() if callable(self.token) else self.token
        if inspect.isawaitable(token):
            token = await token
        return token  # type: ignore[return-value]

    async def _open(self) -> None:
        token = await self._token()
        headers = {"Authorization": f"Bearer {token}"} if token else None
        try:
            self._ws = await ws_connect(self.url, additional_headers=headers, open_timeout=self.open_timeout,
                                        max_size=64 * 1024 * 1024, max_queue=64)
        except InvalidStatus as exc:
            status = exc.response.status_code
            message = _error_text(exc.response.body) or f"HTTP {status}"
            if status in (401, 403):
                raise AuthError(message) from exc
            raise ConnectionError(f"broker refused the WebSocket upgrade: HTTP {status}: {message}") from exc
        except InvalidHandshake as exc:
            raise ConnectionError(f"WebSocket handshake failed: {exc}") from exc
        except TimeoutError as exc:
            raise ConnectionError(f"timed out connecting to {self.url}") from exc
        self._reconnect_after = None

    async def _run(self) -> None:
        """Read frames; on a disconnect, reconnect and recover."""
        while True:
            ws = self._ws
            assert ws is not None
            try:
                async for message in ws:
                    if isinstance(message, str):
                        try:
                            await self._handle_frame(message)
                        except Exception:
                            logger.exception("failed to handle a frame from the broker")
            except ConnectionClosed:
                pass
            self._connected.clear()
            self._fail_pending(ConnectionError(
                f"connection lost (close code {ws.close_code}: {ws.close_reason or 'no reason'})"))
            if self._closing:
                return
            if not self.reconnect:
                self._stop(ConnectionError("connection lost and reconnect=False"))
                return
            lost_at = time.monotonic()
            if not await self._reconnect_loop(ws.close_code):
                return
            self.reconnects += 1
            self.reconnected.append((lost_at, time.monotonic()))
            # Resubscribe before waiting commands may go: they come after.
            try:
                await self._resubscribe_all()
            except ConnectionError:
                continue  # lost again at once: the loop above sees it closed
            self._connected.set()

    async def _reconnect_loop(self, close_code: int | None) -> bool:
        attempt = 0 if close_code != 1013 else 1
        while not self._closing:
            if self._reconnect_after is not None:
                # The server asked (op "reconnect"): about after_ms, plus jitter.
                after = self._reconnect_after
                delay = after + random.uniform(0, max(self.backoff_initial, after / 4))
                self._reconnect_after = None
            else:
                # Exponential backoff with full jitter.
                delay = random.uniform(0, min(self.backoff_max, self.backoff_initial * 2 ** attempt))
            await asyncio.sleep(delay)
            try:
                await self._open()
                return True
            except AuthError as exc:
                logger.error("broker refused the token on reconnect: %s", exc)
                self._stop(exc)
                return False
            except (OSError, ConnectionError) as exc:
                attempt += 1
                logger.info("reconnect to %s failed (%s); attempt %d", self.url, exc, attempt)
        return False

    async def _resubscribe_all(self) -> None:
        lines = []
        for sub in list(self._subs.values()):
            if sub.epoch is None:
                continue  # its first subscribe failed with the old connection
            lines.append(self._recover_command(sub))
        if lines:
            await self._send("\n".join(lines))

    def _stop(self, reason: BaseException) -> None:
        """Stop for good: later (and waiting) commands raise ``reason``."""
        self._fatal = reason
        self._closing = True
        self._closed.set()
        self._fail_pending(reason)

    def _recover_command(self, sub: _Subscription, reason: str | None = None) -> str:
        """A subscribe-with-recover line for ``sub``, registered for its reply."""
        sub.active = False
        sub.recovering = True
        sub.lost_reason = reason
        command_id = self._new_id()
        self._pending[command_id] = _Pending(
            None, on_reply=lambda reply: self._on_subscribed(sub, reply, command_id))
        return json.dumps({"id": command_id, "op": "subscribe", "channel": sub.channel,
                           "recover": {"epoch": sub.epoch, "offset": sub.offset}},
                          separators=(",", ":"))

    # -- commands ------------------------------------------------------------

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def _command(self, command: dict[str, Any],
                       on_reply: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        command_id = None
        try:
            async with asyncio.timeout(self.request_timeout):
                await self._wait_connected()
                command_id = self._new_id()
                future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
                self._pending[command_id] = _Pending(future, on_reply)
                await self._send(json.dumps({"id": command_id, **command}, separators=(",", ":")))
                return await future
        finally:
            if command_id is not None:
                self._pending.pop(command_id, None)

    def _check_usable(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self._reader is None or self._closing:
            raise ConnectionError("client is not connected (call connect())")

    async def _wait_connected(self) -> None:
        """Return at once when connected; while reconnecting, wait for it."""
        self._check_usable()
        while not self._connected.is_set():
            waiters = {asyncio.ensure_future(self._connected.wait()), asyncio.ensure_future(self._closed.wait())}
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
            self._check_usable()

    async def _send(self, text: str) -> None:
        ws = self._ws
        if ws is None:
            raise ConnectionError("not connected")
        try:
            await ws.send(text)
        except ConnectionClosed as exc:
            raise ConnectionError(f"connection lost: {exc}") from exc

    def _fail_pending(self, exc: BaseException) -> None:
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            if entry.future is not None and not entry.future.done():
                entry.future.set_exception(exc)

    # -- incoming ------------------------------------------------------------

    async def _handle_frame(self, text: str) -> None:
        for line in text.split("\n"):
            if not line.strip():
                continue
            try:
                message = json.loads(line)
            except ValueError:
                logger.warning("ignoring a line that is not JSON: %.200r", line)
                continue
            if not isinstance(message, dict):
                continue
            op = message.get("op")
            if op == "pub":
                await self._on_publication(message)
            elif "id" in message:
                entry = self._pending.pop(message["id"], None)
                if entry is not None:
                    self._on_reply(entry, message)
            elif op == "unsubscribed":
                await self._on_stream_lost(message)
            elif op == "reconnect":
                after_ms = message.get("after_ms", 0)
                self._reconnect_after = max(0.0, after_ms / 1000) if isinstance(after_ms, (int, float)) else 0.0
            elif op == "error":
                logger.warning("broker error: %s %s", message.get("code"), message.get("message"))
            else:
                logger.debug("ignoring message %.200r", line)

    def _on_reply(self, entry: _Pending, message: dict[str, Any]) -> None:
        if entry.on_reply is not None:
            entry.on_reply(message)
        if entry.future is None or entry.future.done():
            return
        if message.get("op") == "error":
            entry.future.set_exception(ProtocolViolation(int(message.get("code", 0) or 0),
                                                         str(message.get("message", "error"))))
        else:
            entry.future.set_result(message)

    def _on_subscribed(self, sub: _Subscription, reply: dict[str, Any], recover_id: int | None) -> None:
        """A (re)subscribe reply, handled in stream order: the publications
        after it in the same frame must see the new position."""
        if self._subs.get(sub.channel) is not sub:
            return  # unsubscribed meanwhile
        if reply.get("op") == "error":
            code = reply.get("code")
            if recover_id is None:
                return  # the caller of subscribe() gets the error
            if code in _RETRYABLE:
                self._spawn(self._retry_recover(sub))
                return
            del self._subs[sub.channel]
            self._lost(sub, f"resubscribe refused: {code} {reply.get('message', '')}".strip())
            return
        epoch = reply.get("epoch")
        offset = reply.get("offset")
        if not isinstance(offset, int):
            offset = 0
        recovering, sub.recovering = sub.recovering, False
        sub.active = True
        if not recovering:
            sub.epoch, sub.offset = epoch, offset
        elif reply.get("recovered") is True and epoch == sub.epoch:
            pass  # the missed publications follow, from sub.offset + 1
        else:
            sub.epoch, sub.offset = epoch, offset
            self._lost(sub, sub.lost_reason or "missed publications are no longer in the history")
        sub.lost_reason = None

    async def _retry_recover(self, sub: _Subscription) -> None:
        await asyncio.sleep(random.uniform(self.backoff_initial, self.backoff_max))
        if self._subs.get(sub.channel) is sub and self._connected.is_set():
            try:
                await self._send(self._recover_command(sub, sub.lost_reason))
            except ConnectionError:
                pass  # the reconnect path resubscribes

    async def _on_publication(self, message: dict[str, Any]) -> None:
        sub = self._subs.get(message.get("channel"))  # type: ignore[arg-type]
        offset = message.get("offset")
        if sub is None or not sub.active or not isinstance(offset, int):
            return  # not (yet) ours, or a recovery is in flight and will resend it
        if offset <= sub.offset:
            return  # a duplicate (already delivered before a recovery)
        if offset > sub.offset + 1:
            # A gap: never skip silently; ask for the missed ones.
            logger.info("gap on %s (%d after %d): recovering", sub.channel, offset, sub.offset)
            await self._resubscribe(sub, None)
            return
        sub.offset = offset
        self._queue.put_nowait((sub.handler, (Publication(sub.channel, offset, message.get("data")),)))

    async def _on_stream_lost(self, message: dict[str, Any]) -> None:
        """``{"op":"unsubscribed","channel":..,"reason":..}`` without an id:
        the server ended our subscription; resubscribe with recover. If the
        history covers the gap nothing was lost; otherwise on_lost is called
        with the server's reason."""
        sub = self._subs.get(message.get("channel"))  # type: ignore[arg-type]
        if sub is None or sub.recovering:
            return
        reason = str(message.get("reason") or "stream lost")
        sub.active = False
        command = self._recover_command(sub, reason)
        try:
            await self._send(command)
        except ConnectionError:
            pass  # the reconnect path resubscribes

    async def _resubscribe(self, sub: _Subscription, reason: str | None) -> None:
        unsubscribe_id = self._new_id()
        self._pending[unsubscribe_id] = _Pending(None)
        lines = [json.dumps({"id": unsubscribe_id, "op": "unsubscribe", "channel": sub.channel}),
                 self._recover_command(sub, reason)]
        try:
            await self._send("\n".join(lines))
        except ConnectionError:
            pass  # the reconnect path resubscribes

    def _lost(self, sub: _Subscription, reason: str) -> None:
        logger.info("channel %s lost publications: %s", sub.channel, reason)
        if sub.on_lost is not None:
            self._queue.put_nowait((sub.on_lost, (sub.channel, reason)))

    # -- handlers --------------------------------------------------------------

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _dispatch_loop(self) -> None:
        while True:
            function, args = await self._queue.get()
            try:
                result = function(*args)
                if inspect.isawaitable(result):
                    await result
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("subscription handler %r failed", function)


def _error_text(body: bytes | None) -> str:
    if not body:
        return ""
    try:
        parsed = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()
    if isinstance(parsed, dict) and "error" in parsed:
        return str(parsed["error"])
    return str(parsed)

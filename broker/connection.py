"""One TCP connection: an asyncio.Protocol that owns only the transport.

HTTP phase: httptools parses request heads and bodies (keep-alive and
pipelining work); an Upgrade goes to the WebSocket endpoint its host names
for the path (the native protocol at ``/ws``), anything else to the host's
HTTP handler. WebSocket phase: websockets' Sans-I/O ``Protocol`` parses
client frames (masking, control frames, 1002, 1009); this class only
reassembles text messages, checks UTF-8 (1007) and refuses binary (1003),
and hands each text message to the endpoint's handler (a session). What a
session sends as data goes through the shard's outbound table, so replies
and publications share one ordered, bounded buffer and one frame per flush.

Nothing here knows a protocol or the shard: the host and the handlers are
the small interfaces below.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import logging
import socket
from typing import Any, Protocol as Interface
from collections.abc import Callable, Coroutine

import httptools
from websockets.frames import Frame, Opcode
from websockets.protocol import OPEN, Protocol, Side

from . import eager
from .config import Config
from .handshake import Accepted
from .httpmsg import Request, Response, error_response
from .pressure import InboundGate, Liveness, liveness
from .tls import is_tls

__all__ = ["Connection", "ConnectionHost", "WebSocketEndpoint", "WebSocketHandler"]

log = logging.getLogger("broker.connection")

CLOSE_GRACE = 5.0  # seconds to wait for the client's close frame before dropping


class WebSocketHandler(Interface):
    """What an upgraded connection drives: a session of some protocol."""

    def handle_text(self, text: str) -> Coroutine[Any, Any, None]:
        """One complete text message (handled in order, one at a time)."""
        ...

    def wire_paused(self, paused: bool) -> None:
        """The transport holds unsent bytes (True) or drained them (False)."""

    def wire_flush(self) -> None:
        """Write what is pending now: a close frame follows."""

    def wire_closing(self) -> None:
        """A close frame went out or came in: nothing more may be sent."""

    def wire_lost(self) -> None:
        """The TCP connection is gone."""


class WebSocketEndpoint(Interface):
    """One upgrade path: its handshake rules, then a handler per connection."""

    @property
    def max_message_size(self) -> int:
        """Largest client message (after reassembly and decompression): 1009 beyond."""
        ...

    def negotiate(self, request: Request) -> Accepted | Response:
        """Accept the upgrade (with its response bytes) or refuse it."""
        ...

    def open(self, conn: Connection, accepted: Accepted) -> WebSocketHandler:
        """The upgrade response is out: start serving ``conn``."""
        ...


class ConnectionHost(Interface):
    """What a connection needs from the process serving it (the shard)."""

    config: Config
    loop: asyncio.AbstractEventLoop

    def handle_http(self, request: Request) -> Coroutine[Any, Any, Response]:
        """Answer one plain HTTP request."""
        ...

    def websocket_endpoint(self, path: str) -> WebSocketEndpoint | None:
        """The endpoint serving upgrades at ``path``, or None (404)."""
        ...

    def admission_refusal(self, ip: str) -> Response | None:
        """Why no new WebSocket from ``ip`` is accepted now (draining, full,
        overloaded, too many from that address), or None: then the host
        counts it until ``release(ip)``."""
        ...

    def release(self, ip: str) -> None:
        """A WebSocket that ``admission_refusal`` admitted is gone."""


class Connection(asyncio.Protocol):
    __slots__ = (
        "host", "transport", "parser", "ws", "handler", "deflate", "window_bits",
        "paused", "closing", "timer", "ip", "admitted", "last_received", "pinged_at", "_gate",
        "_url", "_headers", "_head_bytes", "_body", "_body_size",
        "_refused", "_work", "_busy", "_suspended", "_last_request", "_fragments", "__weakref__",
    )

    def __init__(self, host: ConnectionHost) -> None:
        self.host = host
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.ws: Protocol | None = None
        self.handler: WebSocketHandler | None = None  # the session, once upgraded
        self.deflate = False
        self.window_bits = 15
        self.paused = False
        self.closing = False
        self.timer: asyncio.TimerHandle | None = None
        self.ip = ""
        self.admitted = False              # counted by the host's per-IP table
        self.last_received = 0.0           # loop time of the last bytes from the peer
        self.pinged_at: float | None = None
        self._gate: InboundGate | None = None
        self._url = b""
        self._headers: dict[str, str] = {}
        self._head_bytes = 0
        self._body: list[bytes] = []
        self._body_size = 0
        self._refused: Response | None = None
        self._work: collections.deque[tuple[Callable[[], Coroutine[Any, Any, Any]],
                                            Callable[[Any, BaseException | None], None]]] = collections.deque()
        self._busy = False
        self._suspended = False
        self._last_request = 0.0
        self._fragments: list[bytes] | None = None

    # ----------------------------------------------------------- transport
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._last_request = self.host.loop.time()
        peer = transport.get_extra_info("peername")
        self.ip = peer[0] if isinstance(peer, tuple) else str(peer or "")
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # A peer that vanished without a FIN is found by the kernel too.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self._arm_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self.closing = True
        if self.handler is not None:
            self.handler.wire_lost()
        if self.admitted:
            self.admitted = False
            self.host.release(self.ip)
        self.transport = None

    def pause_writing(self) -> None:
        self.paused = True
        if self.handler is not None:
            self.handler.wire_paused(True)

    def resume_writing(self) -> None:
        self.paused = False
        if self.handler is not None:
            self.handler.wire_paused(False)

    def socket_fd(self) -> int:
        """The socket's own descriptor for the shard's direct flush (-1
        without one). The shard never closes it; the transport closes it only
        after ``connection_lost`` returns, and every session forgets it
        there (or earlier, at ``wire_closing``), so a number reused by a new
        connection is never written to by mistake."""
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        return sock.fileno() if sock is not None else -1

    def detach(self) -> socket.socket | None:
        """Give this TCP connection up to another process (a request for a
        session that lives there): a dup of its socket for the caller to
        send on, and close, while this side lets go without a FIN or RST (a
        closed fd whose socket has another reference does not end it).
        None where it cannot move: TLS (its state is in this process), an
        upgraded connection, no socket. Only a connection that was never
        upgraded moves, so no C flush holds its descriptor."""
        transport = self.transport
        if transport is None or self.ws is not None or is_tls(transport):
            return None
        sock = transport.get_extra_info("socket")
        if sock is None:
            return None
        moved: socket.socket = sock.dup()
        transport.pause_reading()
        self.transport = None
        self.parser = None
        self._work.clear()
        self._cancel_timer()
        transport.abort()
        return moved

    def data_received(self, data: bytes) -> None:
        if self.ws is not None:
            self.last_received = self.host.loop.time()  # any frame counts as alive
            self._ws_data(data)
            return
        if self.parser is None:
            return  # refused; waiting for the close
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgrade(data[upgrade.args[0]:] if upgrade.args else b"")
        except httptools.HttpParserCallbackError:
            if self._refused is not None:
                self._refuse(self._refused)
            else:  # pragma: no cover - a bug in a callback
                log.exception("HTTP callback failed")
                self._refuse(error_response(500, "internal error"))
        except httptools.HttpParserError as exc:
            self._refuse(error_response(400, f"malformed HTTP request: {exc}"))

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def _arm_timer(self) -> None:
        self._cancel_timer()
        self.timer = self.host.loop.call_later(self.host.config.limits.handshake_timeout,
                                                self._timed_out)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _timed_out(self) -> None:
        """Close a connection that sat idle (or mid-request) for the handshake
        timeout. Requests only record their time; the timer re-arms itself."""
        self.timer = None
        if self.ws is not None or self.transport is None:
            return
        timeout = self.host.config.limits.handshake_timeout
        idle = self.host.loop.time() - self._last_request
        if idle < timeout or self._busy:
            self.timer = self.host.loop.call_later(max(timeout - idle, 0.05), self._timed_out)
            return
        self.transport.close()

    # -------------------------------------------------- httptools callbacks
    def on_message_begin(self) -> None:
        self._head_bytes = 0  # the request line and headers: never the body
        self._url = b""
        self._headers = {}
        self._body = []
        self._body_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > self.host.config.limits.max_header_bytes:
            self._refuse_in_callback(431, "request header fields too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        limits = self.host.config.limits
        self._head_bytes += len(name) + len(value) + 4
        if len(self._headers) >= limits.max_header_count or self._head_bytes > limits.max_header_bytes:
            self._refuse_in_callback(431, "request header fields too large")
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self._headers[key] = f"{self._headers[key]}, {text}" if key in self._headers else text

    def _refuse_in_callback(self, status: int, message: str) -> None:
        """Stop httptools mid-request; data_received answers ``status`` and closes."""
        self._refused = error_response(status, message)
        raise _Refuse

    def on_headers_complete(self) -> None:
        length = self._headers.get("content-length")
        limit = self.host.config.limits.max_body_size
        if length is not None and length.isdigit() and int(length) > limit:
            self._refuse_in_callback(413, f"body larger than {limit} bytes")

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        limit = self.host.config.limits.max_body_size
        if self._body_size > limit:
            self._refuse_in_callback(413, f"body larger than {limit} bytes")
        self._body.append(body)

    def on_message_complete(self) -> None:
        assert self.parser is not None
        if self.parser.should_upgrade():
            return  # handled by HttpParserUpgrade in data_received
        request = self._request(keep_alive=self.parser.should_keep_alive())
        self._last_request = self.host.loop.time()
        self._enqueue(lambda: self.host.handle_http(request),
                      lambda response, error: self._answer(request, response, error))

    def _request(self, keep_alive: bool) -> Request:
        raw = self._url
        if raw[:1] == b"/" and b"?" not in raw and b"#" not in raw:
            path, query = raw.decode("latin-1"), ""  # the usual origin-form path: no parser needed
        else:
            url = httptools.parse_url(raw) if raw else None
            path = url.path.decode("latin-1") if url and url.path else "/"
            query = url.query.decode("latin-1") if url and url.query else ""
        method = self.parser.get_method().decode() if self.parser else "GET"
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        return Request(method, path, query, self._headers, body, keep_alive, self.ip, self)

    # One queue of work per connection (HTTP requests, WebSocket messages):
    # handled strictly in order, each eagerly; only work that suspends (a
    # remote home shard) holds the queue, inside a task, until it ends.
    def _enqueue(self, make: Callable[[], Coroutine[Any, Any, Any]],
                 done: Callable[[Any, BaseException | None], None]) -> None:
        self._work.append((make, done))
        if not self._busy:
            self._run_work()
        elif self._work:
            self._gate_inbound()

    def _gate_inbound(self) -> None:
        """Stop reading while unprocessed work piles up (a flood waits in the
        client's socket, not in our memory); read again once it drained."""
        if self._gate is None:
            self._gate = InboundGate(self.host.config.limits.inbound_pending_commands)
        decision = self._gate.update(len(self._work))
        if decision is not None and self.transport is not None and not self.transport.is_closing():
            if decision:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def _run_work(self) -> None:
        while self._work and self.transport is not None and not self._busy:
            make, done = self._work.popleft()
            self._busy = True
            self._suspended = False
            if not eager.start(self.host.loop, make(), functools.partial(self._work_done, done)):
                self._suspended = True
                return

    def _work_done(self, done: Callable[[Any, BaseException | None], None],
                   result: Any, error: BaseException | None) -> None:
        self._busy = False
        done(result, error)
        if self._suspended and self._work:
            self._run_work()
        if self._gate is not None and self._gate.paused:
            self._gate_inbound()

    def _answer(self, request: Request, response: Response | None, error: BaseException | None) -> None:
        if error is not None or response is None:  # never crash the shard on one request
            log.error("API handler failed for %s %s", request.method, request.path, exc_info=error)
            response = error_response(500, "internal error")
        if self.transport is None:
            return
        keep_alive = request.keep_alive and not response.close
        self.transport.write(response.encode(keep_alive))
        if not keep_alive:
            self.parser = None
            self._work.clear()  # requests pipelined after "Connection: close" get no answer
            self.transport.close()

    def _refuse(self, response: Response) -> None:
        """Answer an HTTP error and close: the request cannot be trusted further."""
        self.parser = None
        if self.transport is not None:
            self.transport.write(response.encode(keep_alive=False))
            self.transport.close()

    # ----------------------------------------------------------- upgrade
    def _upgrade(self, rest: bytes) -> None:
        request = self._request(keep_alive=False)
        endpoint = self.host.websocket_endpoint(request.path)
        if endpoint is None:
            self._refuse(error_response(404, f"no WebSocket endpoint at {request.path}"))
            return
        outcome = endpoint.negotiate(request)
        if isinstance(outcome, Response):
            self._refuse(outcome)
            return
        refusal = self.host.admission_refusal(self.ip)
        if refusal is not None:
            self._refuse(refusal)
            return
        self.admitted = True
        self._accept(endpoint, outcome, rest)

    def _accept(self, endpoint: WebSocketEndpoint, accepted: Accepted, rest: bytes) -> None:
        assert self.transport is not None
        self._cancel_timer()
        self.parser = None
        self._headers = {}
        ws = Protocol(Side.SERVER, state=OPEN, max_size=endpoint.max_message_size, logger=log)
        if accepted.deflate is not None:
            ws.extensions = [accepted.deflate]
            self.deflate = True
            self.window_bits = accepted.window_bits
        self.ws = ws
        if not is_tls(self.transport):
            # Pause as soon as the transport holds any byte: the shard's flush
            # writes to the socket directly, which is only safe behind an empty
            # transport buffer (otherwise frames would overtake queued bytes).
            # Through TLS every byte goes through the transport anyway.
            self.transport.set_write_buffer_limits(high=0)
        self.transport.write(accepted.response)
        self.last_received = self.host.loop.time()
        self.handler = endpoint.open(self, accepted)
        if rest:
            self._ws_data(rest)

    # ------------------------------------------------------ WebSocket phase
    def _ws_data(self, data: bytes) -> None:
        ws = self.ws
        assert ws is not None
        ws.receive_data(data)
        for frame in ws.events_received():
            if not isinstance(frame, Frame):  # a server-side Protocol yields frames only
                continue
            opcode = frame.opcode
            if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
                if opcode is Opcode.BINARY:
                    self.close(1003, "binary messages are not accepted")
                    break
                if frame.fin:
                    self._text_message(bytes(frame.data))
                else:
                    self._fragments = [bytes(frame.data)]
            elif opcode is Opcode.CONT:
                if self._fragments is None:  # websockets rejects this already
                    continue
                self._fragments.append(bytes(frame.data))
                if frame.fin:
                    data_, self._fragments = b"".join(self._fragments), None
                    self._text_message(data_)
            # PING/PONG/CLOSE: websockets answers and tracks state itself.
            if self.closing:
                break
        self._write_protocol_output()

    def _write_protocol_output(self) -> None:
        ws = self.ws
        if ws is None or self.transport is None:
            return
        for chunk in ws.data_to_send():
            if chunk:
                self.transport.write(chunk)
            else:  # websockets asks to half-close: the closing handshake is over
                self._stop_sending()
                self.transport.close()
                return
        if ws.close_expected() and not self.closing:
            # The peer sent close (or broke the protocol) and websockets
            # answered it: let the peer close the TCP connection first.
            self._stop_sending()
            self.timer = self.host.loop.call_later(CLOSE_GRACE, self._abort)

    def _text_message(self, payload: bytes) -> None:
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            self.close(1007, "invalid UTF-8 in a text message")
            return
        handler = self.handler
        assert handler is not None
        self._enqueue(lambda: handler.handle_text(text), self._message_done)

    def _message_done(self, result: None, error: BaseException | None) -> None:
        if error is not None:  # a bug, not the client's fault: end this connection only
            log.error("command handling failed", exc_info=error)
            self.close(1011, "internal error")

    def _stop_sending(self) -> None:
        """A close frame is out (ours or websockets' answer to the peer's):
        no data frame may follow, so the session stops now, before any
        scheduled flush could write to the socket behind the close."""
        if not self.closing:
            self.closing = True
            if self.handler is not None:
                self.handler.wire_closing()

    def close(self, code: int, reason: str = "") -> None:
        """Flush what is pending, then start the closing handshake."""
        if self.closing or self.ws is None or self.transport is None:
            return
        if self.ws.state is not OPEN:
            # The peer's close frame was already read (in the same chunk as
            # the message that led here): websockets answers it; ours would
            # be a second close frame.
            self._stop_sending()
            return
        handler = self.handler
        if handler is not None:
            handler.wire_flush()
        self.ws.send_close(code, reason)
        for chunk in self.ws.data_to_send():
            if chunk:
                self.transport.write(chunk)
        self._stop_sending()
        self._cancel_timer()
        self.timer = self.host.loop.call_later(CLOSE_GRACE, self._abort)

    def _abort(self) -> None:
        self.timer = None
        if self.transport is not None:
            self.transport.abort()

    def check_alive(self, now: float) -> None:
        """Ping a connection silent for ``limits.ping_interval``; drop one
        that stays silent ``limits.ping_timeout`` after the ping (1011)."""
        ws = self.ws
        if ws is None or self.closing or self.transport is None:
            return
        limits = self.host.config.limits
        action = liveness(self.last_received, self.pinged_at, now,
                          limits.ping_interval, limits.ping_timeout)
        if action is Liveness.PING:
            self.pinged_at = now
            ws.send_ping(b"")
            self._write_protocol_output()
        elif action is Liveness.DROP:
            self.close(1011, "ping timeout")
            self._cancel_timer()
            self._abort()  # a silent peer will not answer the close either


class _Refuse(Exception):
    """Raised inside an httptools callback to stop parsing; ``_refused`` says why."""

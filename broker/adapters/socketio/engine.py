"""One Engine.IO v4 session, Sans-I/O (PROTOCOL.md §4, docs/socketio.md).

A session outlives its transports: it starts on HTTP long-polling (a GET to
receive, a POST to send, each possibly on another TCP connection, possibly
reaching another shard first) or on a WebSocket, and may move from polling to
a WebSocket. So the state lives here, apart from any socket: the caller feeds
requests, messages and the clock in, and carries out the ``Effect`` objects
that come back (answer this request, park it, answer the parked poll, write
to the probing WebSocket, hand a Socket.IO packet up, end the session).

Outbound packets do not pass through this object: the session writes its own
control packets (open, ping, close) into an ``Outbox`` — the session's
outbound buffer, one ``\\n``-terminated line per packet, which the shard also
fills with Socket.IO packets and publications — and the caller drains that
buffer (a WebSocket: the shard's C flush writes one text frame per line;
polling: the answer to the parked GET, see ``flush_poll``).

Times are seconds on the caller's monotonic clock; ``next_deadline()`` says
when ``tick()`` has something to do.
"""
from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import parse_qs

from ..._fastpath import RingBuffer
from ...errors import SocketIOError
from ...jsoncodec import encode_json
from . import packets as pk

__all__ = [
    "POLLING", "WEBSOCKET", "TRANSPORTS",
    "UNKNOWN_TRANSPORT", "UNKNOWN_SID", "BAD_HANDSHAKE_METHOD", "BAD_REQUEST", "FORBIDDEN",
    "UNSUPPORTED_PROTOCOL_VERSION", "ERROR_MESSAGES",
    "HttpResponse", "error_response", "too_large_response", "OK_RESPONSE",
    "new_sid", "shard_of_sid", "new_socket_id",
    "EngineRequest", "parse_request",
    "EngineConfig", "Outbox", "LineOutbox", "EngineSession",
    "Effect", "Reply", "Park", "AnswerPoll", "ProbeSend", "ProbeClose", "Upgraded",
    "Message", "Closed", "Released",
]

POLLING = "polling"
WEBSOCKET = "websocket"
TRANSPORTS = (POLLING, WEBSOCKET)

# The error codes and messages of engine.io's server (its ``Server.errors``):
# clients and tools read the code from the JSON body.
UNKNOWN_TRANSPORT = 0
UNKNOWN_SID = 1
BAD_HANDSHAKE_METHOD = 2
BAD_REQUEST = 3
FORBIDDEN = 4
UNSUPPORTED_PROTOCOL_VERSION = 5
ERROR_MESSAGES = {
    UNKNOWN_TRANSPORT: "Transport unknown",
    UNKNOWN_SID: "Session ID unknown",
    BAD_HANDSHAKE_METHOD: "Bad handshake method",
    BAD_REQUEST: "Bad request",
    FORBIDDEN: "Forbidden",
    UNSUPPORTED_PROTOCOL_VERSION: "Unsupported protocol version",
}

_TEXT = b"text/plain; charset=UTF-8"
_JSON = b"application/json"


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """An HTTP answer for the caller to write (it adds the framing headers)."""

    status: int
    body: bytes
    content_type: bytes = _TEXT


def error_response(code: int, message: str | None = None, status: int | None = None) -> HttpResponse:
    """An Engine.IO error answer: ``{"code":N,"message":"..."}``, HTTP 400
    (403 for FORBIDDEN) unless ``status`` says otherwise (503 when overloaded)."""
    if status is None:
        status = 403 if code == FORBIDDEN else 400
    return HttpResponse(status, encode_json({"code": code, "message": message or ERROR_MESSAGES[code]}),
                        _JSON)


def too_large_response() -> HttpResponse:
    """A POST body over ``maxPayload`` (decided from Content-Length when it can be)."""
    return error_response(BAD_REQUEST, "Payload too large", 413)


#: the answer to an accepted polling POST
OK_RESPONSE = HttpResponse(200, b"ok")
_NOOP_RESPONSE = HttpResponse(200, b"6")


# -- Session ids ---------------------------------------------------------------
# "<shard>.<20 url-safe random characters>": any shard reads the owner from
# the prefix and hands the request to it; the random part (120 bits) is what
# makes the id unguessable.

_SID = re.compile(r"(0|[1-9][0-9]{0,5})\.[A-Za-z0-9_-]{20}")


def new_sid(shard: int) -> str:
    """A fresh Engine.IO session id owned by ``shard``."""
    if type(shard) is not int or not 0 <= shard <= 999999:
        raise ValueError(f"shard must be an integer in [0, 999999]: {shard!r}")
    return f"{shard}.{secrets.token_urlsafe(15)}"


def shard_of_sid(sid: str) -> int | None:
    """The shard that owns ``sid``; None when it is not one of ours."""
    if not isinstance(sid, str) or _SID.fullmatch(sid) is None:
        return None
    return int(sid.partition(".")[0])


def new_socket_id() -> str:
    """A Socket.IO socket id (the CONNECT answer's ``sid``), distinct from the
    Engine.IO session id as Socket.IO v5 wants."""
    return secrets.token_urlsafe(15)


# -- Requests ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class EngineRequest:
    """A checked request to ``/socket.io/``: a handshake when ``sid`` is None,
    else for the session ``sid`` owned by ``shard``."""

    method: str
    transport: str
    sid: str | None = None
    shard: int | None = None


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    if values is None:
        return None
    if len(values) != 1:
        raise SocketIOError(f"query parameter {name!r} given {len(values)} times")
    return values[0]


def parse_request(method: str, query: str | bytes, websocket_upgrade: bool = False) -> EngineRequest:
    """Check a request's method and query (``EIO``, ``transport``, ``sid``)
    as engine.io's server does; raises ``SocketIOError`` whose
    ``engine_code`` is the error to answer (``error_response``)."""
    if isinstance(query, (bytes, bytearray)):
        query = bytes(query).decode("latin-1")
    try:
        fields = parse_qs(query, keep_blank_values=True, max_num_fields=32)
    except ValueError as exc:
        raise SocketIOError(f"bad query string: {exc}") from None
    transport = _one(fields, "transport")
    if transport not in TRANSPORTS:
        raise SocketIOError(f"unknown transport {transport!r}", UNKNOWN_TRANSPORT)
    if _one(fields, "EIO") != "4":
        raise SocketIOError("only Engine.IO protocol 4 is supported (EIO=4)", UNSUPPORTED_PROTOCOL_VERSION)
    if websocket_upgrade and transport != WEBSOCKET:
        raise SocketIOError("a WebSocket upgrade needs transport=websocket")
    if transport == WEBSOCKET and not websocket_upgrade:
        raise SocketIOError("transport=websocket needs a WebSocket upgrade request")
    sid = _one(fields, "sid")
    if sid is None:
        if method != "GET":
            raise SocketIOError(f"a handshake is a GET, not {method}", BAD_HANDSHAKE_METHOD)
        return EngineRequest(method, transport)
    shard = shard_of_sid(sid)
    if shard is None:
        raise SocketIOError("Session ID unknown", UNKNOWN_SID)
    if method not in ("GET", "POST") or (websocket_upgrade and method != "GET"):
        raise SocketIOError(f"method {method} is not used by Engine.IO")
    return EngineRequest(method, transport, sid, shard)


# -- Effects -------------------------------------------------------------------

class Effect:
    """Something the caller must do; each session call returns them in order."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Reply(Effect):
    """Answer the HTTP request being handled with ``response``."""

    response: HttpResponse


@dataclass(frozen=True, slots=True)
class Park(Effect):
    """Hold the GET being handled: it is answered later by an ``AnswerPoll``."""


@dataclass(frozen=True, slots=True)
class AnswerPoll(Effect):
    """Answer the parked GET with ``response``; nothing is parked after it."""

    response: HttpResponse


@dataclass(frozen=True, slots=True)
class ProbeSend(Effect):
    """Send ``data`` as a text message on the probing (upgrading) WebSocket."""

    data: bytes


@dataclass(frozen=True, slots=True)
class ProbeClose(Effect):
    """The upgrade failed: close the probing WebSocket; the session goes on
    over polling."""


@dataclass(frozen=True, slots=True)
class Upgraded(Effect):
    """The probing WebSocket is now the session's transport: what is pending
    in the outbox goes out on it from now on (flush it now)."""


@dataclass(frozen=True, slots=True)
class Message(Effect):
    """An Engine.IO message from the client: the text of one Socket.IO packet
    (``packets.decode_socketio``)."""

    data: str


@dataclass(frozen=True, slots=True)
class Closed(Effect):
    """The session has ended for the layers above: end its subscriptions,
    queue nothing more. On a WebSocket transport, write what is pending, then
    close the WebSocket with ``code`` (1000 client close, 1003 binary, 1008
    protocol error, 1009 too large, 1011 ping timeout, 1013 slow consumer,
    or the caller's own code)."""

    reason: str
    code: int


@dataclass(frozen=True, slots=True)
class Released(Effect):
    """Forget the session id: every later request for it is UNKNOWN_SID.
    (Always right after ``Closed``; the two are apart so that the layer above
    and the session table can each take their own.)"""


# -- The session ---------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Engine.IO timing and size limits. ``max_payload`` is announced to the
    client (it batches polling POSTs up to it) and enforced on POST bodies and
    WebSocket messages; the broker uses ``limits.max_message_size``."""

    ping_interval: float = 25.0
    ping_timeout: float = 20.0
    max_payload: int = 65536
    upgrade_timeout: float = 10.0     # a probe WebSocket must send "5" within it

    def __post_init__(self) -> None:
        for name in ("ping_interval", "ping_timeout", "upgrade_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        if self.max_payload < 1:
            raise ValueError("max_payload must be >= 1")


class Outbox(Protocol):
    """A session's outbound buffer of ``\\n``-terminated packets (the shard's
    ``OutboundTable`` slot of the session, through ``SessionHost``;
    ``LineOutbox`` elsewhere)."""

    def append(self, data: bytes) -> bool:
        """One ``\\n``-terminated packet, all or nothing; False when it does
        not fit (a slow consumer)."""
        ...

    def take_payload(self) -> bytes:
        """Everything pending as a polling payload (packets joined by the
        record separator); empties the buffer."""
        ...

    def __len__(self) -> int:
        """Pending bytes."""
        ...


class LineOutbox:
    """An ``Outbox`` on a ``RingBuffer`` of its own (tests, the reference
    wiring); ``take()`` returns the raw lines (one WebSocket frame each)."""

    __slots__ = ("buffer",)

    def __init__(self, capacity: int) -> None:
        self.buffer = RingBuffer(capacity)

    def append(self, data: bytes) -> bool:
        return bool(self.buffer.append(data))

    def take(self) -> bytes:
        return bytes(self.buffer.take())

    def take_payload(self) -> bytes:
        pending = self.take()
        return pk.polling_body(pending) if pending else b""

    def __len__(self) -> int:
        return len(self.buffer)


_OPEN, _CLOSED = "open", "closed"
_PING = pk.encode_engine(pk.PING) + pk.PACKET_END
_CLOSE = pk.encode_engine(pk.CLOSE) + pk.PACKET_END
_PROBE_ANSWER = pk.encode_engine(pk.PONG, "probe")


class EngineSession:
    """The Engine.IO state of one client session.

    Created on a handshake: ``transport`` is the transport of that request;
    the ``open`` packet is queued in ``outbox`` at once (over polling, the
    handshake GET is then handled like any poll: ``on_poll``).

    The server pings every ``ping_interval`` (counted from the open, then
    from each pong) and a ping left without a pong for ``ping_timeout`` ends
    the session, as engine.io does; only a pong counts, not other traffic.
    """

    __slots__ = ("sid", "config", "outbox", "transport", "state", "upgrading", "probed",
                 "parked", "next_ping_at", "pong_deadline", "upgrade_deadline", "close_reason")

    def __init__(self, sid: str, transport: str, config: EngineConfig, outbox: Outbox, now: float) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {transport!r}")
        self.sid = sid
        self.config = config
        self.outbox = outbox
        self.transport = transport
        self.state = _OPEN
        self.upgrading = False          # a probe WebSocket is open
        self.probed = False             # ... and its "2probe" was answered
        self.parked = False             # a polling GET waits for data
        self.next_ping_at: float | None = now + config.ping_interval
        self.pong_deadline: float | None = None
        self.upgrade_deadline: float | None = None
        self.close_reason: str | None = None
        upgrades = [WEBSOCKET] if transport == POLLING else []
        packet = pk.open_packet(sid, upgrades, round(config.ping_interval * 1000),
                                round(config.ping_timeout * 1000), config.max_payload)
        if not outbox.append(packet + pk.PACKET_END):
            raise ValueError("the outbox cannot hold the open packet")

    # -- state --------------------------------------------------------------
    @property
    def open(self) -> bool:
        """True until the session has ended."""
        return self.state == _OPEN

    def next_deadline(self) -> float | None:
        """When ``tick`` has something to do next (None: nothing scheduled)."""
        if self.state != _OPEN:
            return None
        times = [t for t in (self.next_ping_at, self.pong_deadline, self.upgrade_deadline) if t is not None]
        return min(times) if times else None

    def tick(self, now: float) -> list[Effect]:
        """Send the ping that is due, end a session whose pong is late, give up
        an upgrade that takes too long."""
        if self.state != _OPEN:
            return []
        effects: list[Effect] = []
        if self.upgrading and self.upgrade_deadline is not None and now >= self.upgrade_deadline:
            effects += self._abort_upgrade()
        if self.pong_deadline is not None and now >= self.pong_deadline:
            return effects + self._end("ping timeout", 1011, now)
        if self.next_ping_at is not None and now >= self.next_ping_at:
            self.next_ping_at = None
            self.pong_deadline = now + self.config.ping_timeout
            if not self.outbox.append(_PING):
                return effects + self._end("slow consumer", 1013, now, overflow=True)
            effects += self.flush_poll()
        return effects

    # -- output -------------------------------------------------------------
    def queue(self, packet: bytes, now: float) -> list[Effect]:
        """Queue one encoded packet (an ack, an event) for the client; over
        polling a parked GET is answered with it. The shard's fan-out appends
        to the same buffer directly and then calls ``flush_poll``."""
        if self.state != _OPEN:
            return []
        if not self.outbox.append(packet + pk.PACKET_END):
            return self._end("slow consumer", 1013, now, overflow=True)
        return self.flush_poll()

    def flush_poll(self) -> list[Effect]:
        """Data is pending: answer the parked GET with it (polling only; a
        WebSocket session's outbox is written by the caller's flush)."""
        if not self.parked or self.transport != POLLING or not len(self.outbox):
            return []
        self.parked = False
        return [AnswerPoll(self._poll_answer())]

    def _poll_answer(self) -> HttpResponse:
        return HttpResponse(200, self.outbox.take_payload())

    # -- polling ------------------------------------------------------------
    def on_poll(self, now: float) -> list[Effect]:
        """A polling GET for this session."""
        if self.state != _OPEN:
            return [Reply(error_response(UNKNOWN_SID))]
        if self.transport != POLLING:
            return [Reply(error_response(BAD_REQUEST, "the session has moved to websocket"))]
        if self.parked:
            # Two GETs at once break packet order: engine.io ends the session
            # (the parked GET gets the close packet, this one a 400).
            effects = self._end("overlapping polls", 1008, now)
            return effects + [Reply(error_response(BAD_REQUEST, "overlapping polls"))]
        if self.probed:
            return [Reply(_NOOP_RESPONSE)]   # upgrading: polling is over
        if len(self.outbox):
            return [Reply(self._poll_answer())]
        self.parked = True
        return [Park()]

    def on_poll_aborted(self, now: float) -> list[Effect]:
        """The parked GET's connection closed before it was answered (the
        client went away): engine.io ends the session."""
        if not self.parked:
            return []
        self.parked = False
        return self._end("poll connection closed", 1006, now)

    def on_post(self, body: bytes, now: float) -> list[Effect]:
        """A polling POST's body: the client's packets, all or nothing."""
        if self.state != _OPEN:
            return [Reply(error_response(UNKNOWN_SID))]
        if self.transport != POLLING:
            return [Reply(error_response(BAD_REQUEST, "the session has moved to websocket"))]
        if len(body) > self.config.max_payload:
            return self._end("payload too large", 1009, now) + [Reply(too_large_response())]
        try:
            received = pk.decode_payload(body)
        except SocketIOError as exc:
            return self._end(exc.message, 1008, now) + [Reply(error_response(BAD_REQUEST, exc.message))]
        effects = self._receive(received, now)
        return effects + [Reply(OK_RESPONSE)]

    # -- WebSocket ----------------------------------------------------------
    def on_ws_message(self, data: str | bytes, now: float) -> list[Effect]:
        """A message on the session's WebSocket (after a WebSocket handshake
        or a completed upgrade)."""
        if self.state != _OPEN or self.transport != WEBSOCKET:
            return []
        if not isinstance(data, str):
            return self._end("binary messages are not supported", 1003, now)
        if len(data) > self.config.max_payload:   # characters <= bytes: never a false refusal
            return self._end("message too large", 1009, now)
        try:
            packet = pk.decode_engine(data)
        except SocketIOError as exc:
            return self._end(exc.message, 1008, now)
        return self._receive([packet], now)

    def on_transport_closed(self, now: float) -> list[Effect]:
        """The session's WebSocket is gone (closed by the peer or failed)."""
        if self.transport != WEBSOCKET:
            return []
        return self._end("transport close", 1006, now)

    def _receive(self, received: list[pk.EnginePacket], now: float) -> list[Effect]:
        effects: list[Effect] = []
        for packet in received:
            if self.state != _OPEN:
                break
            kind = packet.type
            if kind == pk.MESSAGE:
                effects.append(Message(packet.data))
            elif kind == pk.PONG:
                self.pong_deadline = None
                self.next_ping_at = now + self.config.ping_interval
            elif kind == pk.CLOSE:
                effects += self._end("client close", 1000, now, by_client=True)
            elif kind == pk.PING:
                effects += self._end("ping from the client (Engine.IO 4: the server pings)", 1008, now)
            # open, upgrade and noop from a client carry nothing: ignored, as engine.io does
        return effects

    # -- upgrade ------------------------------------------------------------
    def on_probe_open(self, now: float) -> list[Effect]:
        """A WebSocket upgrade request names this session: [] to accept it
        (complete the upgrade, feed its messages to ``on_probe_message``), or
        a ``Reply`` with the error to answer instead."""
        if self.state != _OPEN:
            return [Reply(error_response(UNKNOWN_SID))]
        if self.transport != POLLING or self.upgrading:
            return [Reply(error_response(BAD_REQUEST, "the session is already upgraded or upgrading"))]
        self.upgrading = True
        self.probed = False
        self.upgrade_deadline = now + self.config.upgrade_timeout
        return []

    def on_probe_message(self, data: str | bytes, now: float) -> list[Effect]:
        """A message on the probing WebSocket: ``2probe`` is answered with
        ``3probe`` (and the parked GET with a noop, so the client can pause
        polling); ``5`` completes the upgrade; anything else fails it."""
        if not self.upgrading or self.state != _OPEN:
            return []
        try:
            packet = pk.decode_engine(data)  # type: ignore[arg-type]
        except SocketIOError:
            return self._abort_upgrade()
        effects: list[Effect] = []
        if packet == (pk.PING, "probe") and not self.probed:
            self.probed = True
            effects.append(ProbeSend(_PROBE_ANSWER))
            if self.parked:
                self.parked = False
                effects.append(AnswerPoll(_NOOP_RESPONSE))
            return effects
        if packet.type == pk.UPGRADE:
            self.upgrading = self.probed = False
            self.upgrade_deadline = None
            self.transport = WEBSOCKET
            if self.parked:
                self.parked = False
                effects.append(AnswerPoll(_NOOP_RESPONSE))
            effects.append(Upgraded())
            return effects
        return self._abort_upgrade()

    def on_probe_closed(self, now: float) -> list[Effect]:
        """The probing WebSocket closed before the upgrade completed: the
        session goes on over polling."""
        self.upgrading = self.probed = False
        self.upgrade_deadline = None
        return []

    def _abort_upgrade(self) -> list[Effect]:
        self.upgrading = self.probed = False
        self.upgrade_deadline = None
        return [ProbeClose()]

    # -- ending -------------------------------------------------------------
    def close(self, now: float, reason: str = "server close", code: int = 1000) -> list[Effect]:
        """End the session from the server side (drain, auth expiry, a
        Socket.IO protocol error). Over polling the client gets Engine.IO's
        close packet after what is pending; over WebSocket the caller writes
        what is pending and closes with ``code``."""
        return self._end(reason, code, now)

    def _end(self, reason: str, code: int, now: float, by_client: bool = False,
             overflow: bool = False) -> list[Effect]:
        if self.state != _OPEN:
            return []
        self.close_reason = reason
        self.next_ping_at = self.pong_deadline = None
        effects: list[Effect] = []
        if self.upgrading:
            effects += self._abort_upgrade()
        closed = Closed(reason, code)
        if self.transport == WEBSOCKET:
            self.state = _CLOSED
            return effects + [closed, Released()]
        if by_client:
            # The client said goodbye: a parked GET ends with a noop (engine.io).
            if self.parked:
                self.parked = False
                effects.append(AnswerPoll(_NOOP_RESPONSE))
            self.state = _CLOSED
            return effects + [closed, Released()]
        # The server ends it: a parked GET takes what is pending and the close
        # packet; without one, the next request finds the id unknown (400),
        # which engine.io-client also takes as the end. Either way the id is
        # released now, as engine.io does.
        self.state = _CLOSED
        if self.parked:
            self.parked = False
            if overflow or not self.outbox.append(_CLOSE):
                self.outbox.take_payload()   # full: nothing pending can go out in order
                answer = HttpResponse(200, b"1")
            else:
                answer = self._poll_answer()
            effects.append(AnswerPoll(answer))
        return effects + [closed, Released()]

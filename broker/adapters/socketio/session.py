"""The Socket.IO adapter on a shard (PROTOCOL.md §4): Engine.IO sessions over
WebSocket and HTTP long-polling, Socket.IO's namespace "/" above them.

``SocketIOEndpoint`` serves ``/socket.io/``: WebSocket upgrades (a new
session with ``transport=websocket``, or the probe of a polling session's
upgrade) through ``broker.connection``, and polling GETs and POSTs through
``handle_http``. Each session is a ``SocketIOSession``: it feeds requests and
messages to the Sans-I/O ``EngineSession`` and ``SocketIOConnection`` and
carries out their effects, as ``tests/socketio/reference_server.py`` does.

Output: every outbound packet is one ``\\n``-terminated line in the
session's slot of the shard's outbound table, publications included
(``SocketIOAdapter.pub_line``, built once per shard). While polling the slot
is ``FRAMING_POLLING`` (the C flush hands it back: ``write_pending`` answers
the parked GET with ``take_payload``); on a WebSocket it is
``FRAMING_EIO_WS`` and the C flush writes one frame per packet itself.

A request for a session owned by another shard (the sid names its owner)
is passed to that shard by ``handoff`` when the process has one.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, ClassVar

from ..._fastpath import FRAMING_EIO_WS, FRAMING_POLLING, text_frame
from ...auth import ANONYMOUS, verify_token
from ...errors import AuthError, EngineUnavailable, ProtocolViolation, SocketIOError
from ...handshake import Accepted, negotiate
from ...httpmsg import Request, Response
from ...pressure import TokenBucket
from ...tls import is_tls
from ..native.protocol import BadCommandBudget
from ..session import Adapter, Session, SessionHost, refresh_identity
from . import engine as eio
from . import events as ev
from . import packets as pk

if TYPE_CHECKING:
    from ...connection import Connection

__all__ = ["SocketIOAdapter", "SOCKETIO", "SocketIOEndpoint", "SocketIOSession", "engine_config", "PATH"]

#: where Socket.IO clients connect (socket.io-client's default ``path``)
PATH = "/socket.io/"

#: packets in one polling answer: python-engineio clients refuse a payload of
#: more (their ``max_decode_packets``); the rest waits for the next GET.
MAX_POLL_PACKETS = 16

# Close codes that must never be put in a close frame (RFC 6455 §7.4.1).
_RESERVED_CODES = frozenset({1005, 1006, 1015})


class SocketIOAdapter(Adapter):
    name: ClassVar[str] = "socketio"

    def pub_line(self, channel: str, offset: int, data_json: bytes) -> bytes:
        return pk.pub_packet(channel, offset, data_json) + pk.PACKET_END


SOCKETIO = SocketIOAdapter()


def engine_config(config: Any) -> eio.EngineConfig:
    """Engine.IO's timing and size from the broker's ``[limits]``."""
    limits = config.limits
    return eio.EngineConfig(ping_interval=limits.ping_interval, ping_timeout=limits.ping_timeout,
                            max_payload=limits.max_message_size)


def _http(response: eio.HttpResponse) -> Response:
    return Response(response.status, response.body, content_type=response.content_type.decode())


def _engine_error(code: int, message: str | None = None, status: int | None = None) -> Response:
    return _http(eio.error_response(code, message, status))


@dataclass(slots=True)
class SocketIOAccepted(Accepted):
    """An accepted upgrade at ``/socket.io/``: a new WebSocket session
    (``session`` None) or the probe of ``session``'s upgrade."""

    session: SocketIOSession | None = None


class SocketIOEndpoint:
    """``/socket.io/`` on one shard: its sessions by sid, the WebSocket
    endpoint (``negotiate``/``open``) and the polling requests (``handle_http``)."""

    def __init__(self, host: SessionHost) -> None:
        self.host = host
        self.sessions: dict[str, SocketIOSession] = {}
        #: set by a multi-shard worker (``handoff.Handoff``): passes a request
        #: for another shard's session, with its connection, to that shard.
        self.handoff: Any = None

    @property
    def max_message_size(self) -> int:
        return self.host.config.limits.max_message_size

    def _overloaded(self) -> Response | None:
        """Why no new session is accepted now (503, as PROTOCOL.md §1/§3)."""
        host: Any = self.host
        if getattr(host, "draining", False):
            return _engine_error(eio.BAD_REQUEST, "draining: reconnect to another node", 503)
        watch = getattr(host, "watch", None)
        if watch is not None and watch.level >= 3:
            return _engine_error(eio.BAD_REQUEST, "overloaded: over the memory budget", 503)
        if getattr(host, "websocket_count", 0) >= host.config.limits.max_connections:
            return _engine_error(eio.BAD_REQUEST, "overloaded: too many sessions on this shard", 503)
        return None

    # ------------------------------------------------------------ WebSocket
    def negotiate(self, request: Request) -> Accepted | Response:
        try:
            req = eio.parse_request(request.method, request.query_string, websocket_upgrade=True)
        except SocketIOError as exc:
            return _engine_error(exc.engine_code, exc.message)
        session = None
        if req.sid is not None:
            owned = self._owned(req, request)
            if isinstance(owned, Response):
                return owned
            session = owned
        elif (refusal := self._overloaded()) is not None:
            return refusal
        accepted = negotiate(request, self.host.config, lambda _request, _config: ANONYMOUS)
        if isinstance(accepted, Response):
            return accepted
        if session is not None:
            for effect in session.engine.on_probe_open(self.host.loop.time()):
                if isinstance(effect, eio.Reply):
                    return _http(effect.response)
        fields = {name: getattr(accepted, name) for name in accepted.__dataclass_fields__}
        return SocketIOAccepted(**fields, session=session)

    def open(self, conn: Connection, accepted: Accepted) -> WireHandler:
        session = getattr(accepted, "session", None)
        if session is None:
            session = SocketIOSession(self.host, self, eio.WEBSOCKET, conn)
        else:
            session.probe = conn
        return WireHandler(session, conn)

    # ------------------------------------------------------------- polling
    async def handle_http(self, request: Request) -> Response:
        """One polling request: a handshake GET, a poll GET or a POST."""
        try:
            req = eio.parse_request(request.method, request.query_string)
        except SocketIOError as exc:
            return _engine_error(exc.engine_code, exc.message)
        if req.sid is None:
            refusal = self._overloaded()
            if refusal is not None:
                return refusal
            fresh = SocketIOSession(self.host, self, eio.POLLING)
            return await fresh.poll()
        session = self._owned(req, request)
        if isinstance(session, Response):
            return session
        if req.method == "GET":
            return await session.poll()
        return await session.post(request.body)

    def _owned(self, req: eio.EngineRequest, request: Request) -> SocketIOSession | Response:
        """The session a request names, here; handed to its shard when it
        lives on another; "Session ID unknown" when it lives nowhere."""
        if req.shard is None:
            return _engine_error(eio.UNKNOWN_SID)
        if req.shard != self.host.id:
            return self._hand_off(req.shard, request)
        session = self.sessions.get(req.sid) if req.sid is not None else None
        return session if session is not None else _engine_error(eio.UNKNOWN_SID)

    def _hand_off(self, shard: int, request: Request) -> Response:
        """Pass the request and its connection to the shard owning the
        session; what is returned here is only written when that fails."""
        if self.handoff is not None and request.connection is not None:
            if self.handoff.send(shard, request.connection, request):
                return Response(204)   # never written: the connection went to ``shard``
        return _engine_error(eio.UNKNOWN_SID)


class WireHandler:
    """One WebSocket of a session (its transport, or the probe of an
    upgrade), as ``broker.connection`` drives it."""

    __slots__ = ("session", "conn")

    def __init__(self, session: SocketIOSession, conn: Connection) -> None:
        self.session = session
        self.conn = conn

    def handle_text(self, text: str) -> Coroutine[Any, Any, None]:
        return self.session.ws_text(self.conn, text)

    def wire_paused(self, paused: bool) -> None:
        self.session.ws_paused(self.conn, paused)

    def wire_flush(self) -> None:
        if self.conn is self.session.conn:
            self.session.host.flush_session(self.session, force=True)

    def wire_closing(self) -> None:
        self.session.ws_gone(self.conn, lost=False)

    def wire_lost(self) -> None:
        self.session.ws_gone(self.conn, lost=True)


class _SlotOutbox:
    """The session's slot of the shard's outbound table as the engine's
    ``Outbox``: appends go through ``SessionHost.queue`` (which schedules
    the flush and cuts a slow consumer)."""

    __slots__ = ("session",)

    def __init__(self, session: SocketIOSession) -> None:
        self.session = session

    def append(self, data: bytes) -> bool:
        session = self.session
        if session.closing or session.cid < 0:
            return False
        session.host.queue(session, data)
        return not session.closing

    def take_payload(self) -> bytes:
        """At most ``MAX_POLL_PACKETS`` packets; the rest stays pending, in
        order, for the next GET."""
        session = self.session
        payload = session.host.take_payload(session, pk.RECORD_SEPARATOR)
        if payload.count(pk.RECORD_SEPARATOR) < MAX_POLL_PACKETS:
            return payload
        packets = payload.split(pk.RECORD_SEPARATOR)
        session.host.queue(session, pk.PACKET_END.join(packets[MAX_POLL_PACKETS:]) + pk.PACKET_END)
        return pk.RECORD_SEPARATOR.join(packets[:MAX_POLL_PACKETS])

    def __len__(self) -> int:
        return self.session.host.pending_bytes(self.session)


class SocketIOSession(Session):
    """One Socket.IO client: an Engine.IO session and its namespace "/"."""

    __slots__ = ("host", "endpoint", "engine", "sio", "conn", "probe", "parked", "_budget", "_bucket")

    adapter: ClassVar[Adapter] = SOCKETIO

    def __init__(self, host: SessionHost, endpoint: SocketIOEndpoint, transport: str,
                 conn: Connection | None = None) -> None:
        super().__init__(ANONYMOUS)    # the CONNECT packet's token decides (``_connect``)
        self.host = host
        self.endpoint = endpoint
        self.conn = conn               # the WebSocket transport, once there is one
        self.probe: Connection | None = None
        self.parked: asyncio.Future[Response] | None = None
        self._budget: BadCommandBudget | None = None
        self._bucket: TokenBucket | None = None
        if conn is None:
            host.open_session(self, framing=FRAMING_POLLING)
        else:
            host.open_session(self, framing=FRAMING_EIO_WS,
                              window_bits=conn.window_bits if conn.deflate else 0)
            host.set_paused(self, conn.paused)
        now = host.loop.time()
        shard = getattr(host, "id", 0)
        self.engine = eio.EngineSession(eio.new_sid(shard), transport, engine_config(host.config),
                                        _SlotOutbox(self), now)
        self.sio = ev.SocketIOConnection(now)
        endpoint.sessions[self.engine.sid] = self
        if conn is not None:
            # Last, so that nothing can fail between lending the C flush the
            # socket and the handler (ws_gone) that takes it back.
            host.set_fd(self, self._fd_of(conn))

    @staticmethod
    def _fd_of(conn: Connection) -> int:
        """The socket's own descriptor for the C flush (forgotten in
        ``ws_gone``, before the transport closes it); none through TLS,
        where every byte goes through the transport."""
        return -1 if conn.transport is None or is_tls(conn.transport) else conn.socket_fd()

    # ------------------------------------------------------------ effects
    def _apply(self, effects: list[eio.Effect]) -> tuple[Response | None, list[str]]:
        """Carry out the engine's effects; returns the answer to the request
        being handled and the Socket.IO packets to handle, in order."""
        reply: Response | None = None
        messages: list[str] = []
        for effect in effects:
            kind = type(effect)
            if kind is eio.Message:
                messages.append(effect.data)  # type: ignore[attr-defined]
            elif kind is eio.Reply:
                reply = _http(effect.response)  # type: ignore[attr-defined]
            elif kind is eio.AnswerPoll:
                parked, self.parked = self.parked, None
                if parked is not None and not parked.done():
                    parked.set_result(_http(effect.response))  # type: ignore[attr-defined]
            elif kind is eio.ProbeSend:
                probe = self.probe
                if probe is not None and probe.transport is not None:
                    probe.transport.write(text_frame(effect.data))  # type: ignore[attr-defined]
            elif kind is eio.ProbeClose:
                probe, self.probe = self.probe, None
                if probe is not None:
                    probe.close(1000, "upgrade failed")
            elif kind is eio.Upgraded:
                self._upgraded()
            elif kind is eio.Closed:
                self._closed(effect.reason, effect.code)  # type: ignore[attr-defined]
            elif kind is eio.Released:
                self.endpoint.sessions.pop(self.engine.sid, None)
                if self.conn is None:
                    self.host.session_closed(self)
        return reply, messages

    def _upgraded(self) -> None:
        """The probe is the transport now: the C flush writes to it."""
        conn, self.probe = self.probe, None
        assert conn is not None
        self.conn = conn
        self.host.set_framing(self, FRAMING_EIO_WS, conn.window_bits if conn.deflate else 0)
        self.host.set_fd(self, self._fd_of(conn))
        self.host.set_paused(self, conn.paused)
        self.host.flush_session(self)

    def _closed(self, reason: str, code: int) -> None:
        probe, self.probe = self.probe, None
        if probe is not None:
            probe.close(1000, "session closed")
        if self.conn is not None and self.engine.transport == eio.WEBSOCKET:
            # Connection.close writes what is pending first (wire_flush).
            self.conn.close(1000 if code in _RESERVED_CODES else code, reason[:120])
        self.host.close_session(self)

    async def _handle(self, effects: list[eio.Effect]) -> Response | None:
        reply, messages = self._apply(effects)
        for text in messages:
            if self.closing or not self.engine.open:
                break
            await self._socketio(text)
        return reply

    # ------------------------------------------------------------ polling
    async def poll(self) -> Response:
        effects = self.engine.on_poll(self.host.loop.time())
        if any(type(e) is eio.Park for e in effects):
            waiting: asyncio.Future[Response] = self.host.loop.create_future()
            self.parked = waiting
            self._apply(effects)
            return await waiting
        reply, _ = self._apply(effects)
        return reply or _engine_error(eio.BAD_REQUEST)

    async def post(self, body: bytes) -> Response:
        reply = await self._handle(self.engine.on_post(body, self.host.loop.time()))
        return reply or _http(eio.OK_RESPONSE)

    # ---------------------------------------------------------- WebSocket
    async def ws_text(self, conn: Connection, text: str) -> None:
        now = self.host.loop.time()
        if conn is self.probe:
            self._apply(self.engine.on_probe_message(text, now))
        elif conn is self.conn:
            await self._handle(self.engine.on_ws_message(text, now))

    def ws_paused(self, conn: Connection, paused: bool) -> None:
        if conn is self.conn:
            self.host.set_paused(self, paused)
            if not paused:
                self.host.flush_session(self)

    def ws_gone(self, conn: Connection, lost: bool) -> None:
        now = self.host.loop.time()
        if conn is self.probe:
            self.probe = None
            self._apply(self.engine.on_probe_closed(now))
        elif conn is self.conn:
            # The transport closes the socket once this returns: the C flush
            # must not hold its number (a new connection may get it) whatever
            # the engine's effects do below.
            self.host.set_fd(self, -1)
            self._apply(self.engine.on_transport_closed(now))
            self.closing = True
            self.host.close_session(self)
            if lost:
                self.endpoint.sessions.pop(self.engine.sid, None)
                self.host.session_closed(self)

    # ---------------------------------------------------------- Socket.IO
    def _send(self, packet: bytes) -> None:
        self.host.queue(self, packet + pk.PACKET_END)

    async def _socketio(self, text: str) -> None:
        outcome = self.sio.on_message(text)
        kind = type(outcome)
        if kind is ev.Request:
            if not self._over_rate(outcome.ack_id):  # type: ignore[union-attr]
                await self._request(outcome)  # type: ignore[arg-type]
        elif kind is ev.Connect:
            self._connect(outcome)  # type: ignore[arg-type]
        elif kind is ev.Refused:
            self._bad_command(outcome.ack_id, outcome.code, outcome.message)  # type: ignore[union-attr]
        elif kind is ev.Send:
            self._send(outcome.packet)  # type: ignore[union-attr]
        elif kind is ev.Leave:
            self.close(1000, "client left")
        else:
            self.close(1008, f"Socket.IO protocol error: {outcome.message}")  # type: ignore[union-attr]

    def _connect(self, connect: ev.Connect) -> None:
        """PROTOCOL.md §4 Auth: the JWT of ``auth.token``, or anonymous where allowed."""
        config = self.host.config
        if connect.token is None:
            if connect.auth is not None and connect.auth.get("token") is not None:
                self._send(self.sio.refuse("auth.token must be a string (a JWT)"))
                return
            if not config.allow_anonymous:
                self._send(self.sio.refuse("authentication required: connect with auth {token: <JWT>}"))
                return
            identity = ANONYMOUS
        else:
            try:
                identity = verify_token(connect.token, config)
            except AuthError as exc:
                self._send(self.sio.refuse(str(exc)))
                return
        self.identity = identity
        self._send(self.sio.accept(eio.new_socket_id()))

    async def _request(self, req: ev.Request) -> None:
        ack = req.ack_id
        try:
            if req.event == "subscribe":
                assert req.channel is not None
                outcome = await self.host.subscribe(self, req.channel, req.recover)
                if ack is not None:
                    self._send(ev.ack_subscribed(ack, outcome.position.epoch, outcome.position.offset,
                                                 outcome.recovered))
                for offset, data_json in outcome.missed:
                    self.host.queue(self, SOCKETIO.pub_line(req.channel, offset, data_json))
            elif req.event == "unsubscribe":
                assert req.channel is not None
                self.host.unsubscribe(self, req.channel)
                if ack is not None:
                    self._send(ev.ack_ok(ack))
            elif req.event == "publish":
                assert req.channel is not None and req.data_json is not None
                position = await self.host.client_publish(self, req.channel, req.data_json)
                if ack is not None:
                    self._send(ev.ack_ok(ack, offset=position.offset))
            elif req.event == "refresh":
                assert req.token is not None
                exp = self._refresh(req.token)
                if ack is not None:
                    self._send(ev.ack_ok(ack, exp=exp))
        except ProtocolViolation as exc:
            if exc.code == 400:
                self._bad_command(ack, exc.code, exc.message)
            elif ack is not None:
                self._send(ev.ack_error(ack, exc.code, exc.message))
        except EngineUnavailable as exc:
            if ack is not None:
                self._send(ev.ack_error(ack, 503, f"{exc.label}: {exc}"))

    def _refresh(self, token: str) -> int | None:
        """A newer token for the same user (PROTOCOL.md §1 ``refresh``)."""
        return refresh_identity(self, token, self.host.config)

    # ------------------------------------------------------------- limits
    def _over_rate(self, ack_id: int | None) -> bool:
        now = time.monotonic()
        rate = self.host.config.limits.commands_per_second
        if self._bucket is None:
            self._bucket = TokenBucket(rate, now=now)
        if self._bucket.take(now):
            return False
        self._bad_command(ack_id, 429, f"rate limited: more than {rate} commands per second")
        return True

    def _bad_command(self, ack_id: int | None, code: int, message: str) -> None:
        """An error ack; too many bad commands in the window close the session."""
        self.host.bad_commands += 1
        if ack_id is not None:
            self._send(ev.ack_error(ack_id, code, message))
        if self._budget is None:
            limits = self.host.config.limits
            self._budget = BadCommandBudget(limits.bad_command_budget, limits.bad_command_window)
        if self._budget.spend(time.monotonic()):
            self.close(1008, "too many bad commands")

    def tick(self, now: float, wall: float) -> None:
        if self.closing or not self.engine.open:
            return
        if self.sio.connect_overdue(now):
            self.close(1008, "no CONNECT in time")
            return
        deadline = self.engine.next_deadline()
        if deadline is not None and now >= deadline:
            self._apply(self.engine.tick(now))
        expires = self.identity.expires
        if expires is not None and wall > expires + self.host.config.jwt.leeway and not self.closing:
            self.close(1008, "token expired: refresh it before exp")

    # ------------------------------------------------- events from the shard
    def stream_lost(self, channel: str, reason: str) -> None:
        self._send(ev.unsubscribed_event(channel, reason))

    def reconnect(self, reason: str, after_ms: int) -> None:
        self._send(ev.reconnect_event(reason, after_ms))
        self.close(1012, reason)

    def close(self, code: int, reason: str) -> None:
        self._apply(self.engine.close(self.host.loop.time(), reason, code))

    def abort(self) -> None:
        if self.conn is not None and self.conn.transport is not None:
            self.conn.transport.abort()
        elif self.engine.open:
            self.close(1012, "server shutting down")

    def write_pending(self, force: bool = False) -> None:
        if self.engine.transport == eio.POLLING:
            self._apply(self.engine.flush_poll())
            return
        conn = self.conn
        if conn is None or conn.transport is None or (conn.paused and not force):
            return
        frames = self.host.take_frames(self)
        if frames:
            conn.transport.write(frames)

    def write_tail(self, rest: bytes | None) -> None:
        transport = self.conn.transport if self.conn is not None else None
        if transport is None:
            return
        if rest is None:
            transport.abort()
        else:
            transport.write(rest)

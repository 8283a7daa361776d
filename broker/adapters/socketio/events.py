"""Socket.IO v5 on the namespace "/": the broker's events (PROTOCOL.md §4), Sans-I/O.

Above the Engine.IO session (``engine``), below the shard. The text of each
Engine.IO message goes to ``SocketIOConnection.on_message``, which returns
what it means for the broker:

* ``Connect``: the client asks to join "/" with its auth payload; the caller
  checks the token, then queues ``accept(socket_id)`` or ``refuse(message)``;
* ``Request``: a checked command event (subscribe, unsubscribe, refresh,
  publish) with the ack id to answer (``ack_*`` below; None: no answer);
* ``Refused``: a well-formed packet the broker refuses (unknown event, bad
  arguments): answer ``ack_error`` when it has an ack id; it counts toward
  the bad-command budget like a native error 400;
* ``Send``: a packet to queue as is (a CONNECT to another namespace is
  answered with CONNECT_ERROR "Invalid namespace", as socket.io does);
* ``Leave``: the client sent DISCONNECT: end the session;
* ``Violation``: a packet that breaks Socket.IO (malformed, or anything but
  CONNECT before the connect): close the session, as socket.io does.

Everything the server sends is built here once per packet (acks, events);
publications are ``packets.pub_packet``, built once per shard.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...channels import validate_channel
from ...errors import ProtocolViolation, SocketIOError
from ...jsoncodec import encode_json
from . import packets as pk

__all__ = ["EVENTS", "CONNECT_TIMEOUT", "Connect", "Request", "Refused", "Send", "Leave", "Violation",
           "SocketIOConnection", "ack_subscribed", "ack_ok", "ack_error", "unsubscribed_event",
           "reconnect_event"]

#: the events a client may emit, each with one object argument
EVENTS = frozenset({"subscribe", "unsubscribe", "refresh", "publish"})
#: seconds a client has, after the Engine.IO handshake, to CONNECT (socket.io's connectTimeout)
CONNECT_TIMEOUT = 45.0


@dataclass(frozen=True, slots=True)
class Connect:
    """The client asks to join "/". ``token`` is ``auth["token"]`` when it is a
    string (None: no token given: anonymous, where the config allows it)."""

    auth: dict[str, Any] | None
    token: str | None


@dataclass(frozen=True, slots=True)
class Request:
    """A command event, its arguments checked. ``recover`` (subscribe) is
    (epoch, offset); ``data_json`` (publish) is the data, encoded once."""

    event: str
    ack_id: int | None
    channel: str | None = None
    recover: tuple[str, int] | None = None
    token: str | None = None
    data_json: bytes | None = None


@dataclass(frozen=True, slots=True)
class Refused:
    """A packet the broker refuses with ``code`` (400 bad event or arguments)."""

    ack_id: int | None
    code: int
    message: str


@dataclass(frozen=True, slots=True)
class Send:
    """A packet to queue for the client as it is."""

    packet: bytes


@dataclass(frozen=True, slots=True)
class Leave:
    """The client left the namespace (DISCONNECT)."""


@dataclass(frozen=True, slots=True)
class Violation:
    """The client broke Socket.IO: close the session."""

    message: str


Outcome = Connect | Request | Refused | Send | Leave | Violation

_AWAITING, _CONNECTING, _CONNECTED, _GONE = range(4)


class SocketIOConnection:
    """The namespace "/" of one Engine.IO session.

    A CONNECT is answered once (``accept`` or ``refuse``) before the next is
    read; after a refusal the client may CONNECT again on the same session
    (socket.io-client does, when the page calls ``socket.connect()``).
    """

    __slots__ = ("state", "socket_id", "connect_deadline")

    def __init__(self, now: float, connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self.state = _AWAITING
        self.socket_id: str | None = None
        self.connect_deadline = now + connect_timeout

    @property
    def connected(self) -> bool:
        return self.state == _CONNECTED

    def connect_overdue(self, now: float) -> bool:
        """True when no CONNECT was accepted in time: close the session."""
        return self.state in (_AWAITING, _CONNECTING) and now >= self.connect_deadline

    def on_message(self, text: str) -> Outcome:
        """What one Socket.IO packet (an Engine.IO message's text) asks for."""
        if self.state == _GONE:
            return Violation("the client has left the namespace")
        try:
            packet = pk.decode_socketio(text)
        except SocketIOError as exc:
            return Violation(exc.message)
        if packet.type == pk.CONNECT:
            if packet.namespace != "/":
                return Send(pk.connect_error_packet("Invalid namespace", packet.namespace))
            if self.state != _AWAITING:
                return Violation("CONNECT while already connected or connecting")
            self.state = _CONNECTING
            auth = packet.data
            token = auth.get("token") if auth is not None else None
            return Connect(auth, token if isinstance(token, str) else None)
        if self.state != _CONNECTED or packet.namespace != "/":
            return Violation(f"packet for namespace {packet.namespace!r}, which is not connected")
        if packet.type == pk.DISCONNECT:
            self.state = _GONE
            return Leave()
        if packet.type == pk.EVENT:
            return _request(packet.data, packet.id)
        if packet.type == pk.ACK:   # the server asks for none; socket.io ignores a stray one
            return Refused(None, 400, "unexpected ACK: the server asked for none")
        return Violation("a client does not send CONNECT_ERROR")

    def accept(self, socket_id: str) -> bytes:
        """The CONNECT is accepted: the packet to queue (``40{"sid":...}``)."""
        if self.state != _CONNECTING:
            raise RuntimeError("accept() answers a Connect")
        self.state = _CONNECTED
        self.socket_id = socket_id
        return pk.connect_packet(socket_id)

    def refuse(self, message: str, data: Any = None) -> bytes:
        """The CONNECT is refused (``44{"message":...}``); the client may try again."""
        if self.state != _CONNECTING:
            raise RuntimeError("refuse() answers a Connect")
        self.state = _AWAITING
        return pk.connect_error_packet(message, data=data)


def _object_arg(args: list[Any], event: str) -> dict[str, Any]:
    if len(args) != 1 or not isinstance(args[0], dict):
        raise ProtocolViolation(400, f"{event} takes one object argument")
    return args[0]


def _request(data: list[Any], ack_id: int | None) -> Request | Refused:
    event, args = data[0], data[1:]
    try:
        if event not in EVENTS:
            raise ProtocolViolation(400, f"unknown event {event!r}")
        arg = _object_arg(args, event)
        if event == "refresh":
            token = arg.get("token")
            if not isinstance(token, str) or not token:
                raise ProtocolViolation(400, "refresh needs a token")
            return Request(event, ack_id, token=token)
        channel = validate_channel(arg.get("channel"))
        if event == "publish":
            if "data" not in arg:
                raise ProtocolViolation(400, "publish needs data")
            try:
                data_json = encode_json(arg["data"])
            except ValueError as exc:   # 1e999 decodes to inf, which is no JSON
                raise ProtocolViolation(400, f"data is not valid JSON: {exc}") from None
            return Request(event, ack_id, channel, data_json=data_json)
        recover = None
        if event == "subscribe" and arg.get("recover") is not None:
            given = arg["recover"]
            epoch = given.get("epoch") if isinstance(given, dict) else None
            offset = given.get("offset") if isinstance(given, dict) else None
            if not isinstance(epoch, str) or type(offset) is not int or offset < 0:
                raise ProtocolViolation(400, "recover needs a string epoch and a non-negative integer offset")
            recover = (epoch, offset)
        return Request(event, ack_id, channel, recover)
    except ProtocolViolation as exc:
        return Refused(ack_id, exc.code, exc.message)


# -- answers and server events -------------------------------------------------

def ack_subscribed(ack_id: int, epoch: str, offset: int, recovered: bool | None = None) -> bytes:
    """``{"ok":true,"epoch":..,"offset":..}``, with ``recovered`` when recovery was asked."""
    body: dict[str, Any] = {"ok": True, "epoch": epoch, "offset": offset}
    if recovered is not None:
        body["recovered"] = recovered
    return pk.ack_packet(ack_id, body)


def ack_ok(ack_id: int, **fields: Any) -> bytes:
    """``{"ok":true, ...fields}`` (unsubscribe: none; refresh: ``exp``; publish: ``offset``)."""
    return pk.ack_packet(ack_id, {"ok": True, **fields})


def ack_error(ack_id: int, code: int, message: str) -> bytes:
    """``{"ok":false,"code":C,"message":..}`` with the codes of PROTOCOL.md §1."""
    return pk.ack_packet(ack_id, {"ok": False, "code": code, "message": message})


def unsubscribed_event(channel: str, reason: str) -> bytes:
    """A lost stream: the event ``unsubscribed``."""
    return pk.event_packet("unsubscribed", {"channel": channel, "reason": reason})


def reconnect_event(reason: str, after_ms: int) -> bytes:
    """Drain or migration: the event ``reconnect``; the Engine.IO session closes after it."""
    return pk.event_packet("reconnect", {"reason": reason, "after_ms": after_ms})

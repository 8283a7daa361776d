"""Engine.IO v4 and Socket.IO v5 packets, Sans-I/O (PROTOCOL.md §4).

Text only. Engine.IO sends binary data as raw WebSocket binary frames or as
``b``-prefixed base64 packets in a polling payload, and Socket.IO as
BINARY_EVENT / BINARY_ACK packets with attachments; the broker carries JSON
and refuses all of them with a ``SocketIOError`` that names the problem.
Every malformed input raises ``SocketIOError`` and nothing else.

Outbound packets are bytes. The broker keeps a session's outbound packets in
one buffer (the shard's ``OutboundTable`` slot), each followed by
``PACKET_END`` (``\\n``), like every other protocol's lines: a polling answer
is those lines joined by ``RECORD_SEPARATOR`` (``\\x1e``), and over WebSocket
each line is its own text frame (the fastpath's ``FRAMING_EIO_WS``). Neither
byte ever occurs inside a packet we encode: JSON escapes every control
character (``\\n``, ``\\u001e``).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from ...errors import SocketIOError
from ...jsoncodec import decode_json, encode_json

__all__ = [
    # Engine.IO
    "OPEN", "CLOSE", "PING", "PONG", "MESSAGE", "UPGRADE", "NOOP",
    "RECORD_SEPARATOR", "PACKET_END", "EnginePacket", "encode_engine", "decode_engine",
    "encode_payload", "decode_payload", "open_packet", "polling_body", "split_pending",
    # Socket.IO
    "CONNECT", "DISCONNECT", "EVENT", "ACK", "CONNECT_ERROR", "BINARY_EVENT", "BINARY_ACK",
    "RESERVED_EVENTS", "MAX_ACK_ID", "SocketIOPacket", "encode_socketio", "decode_socketio",
    "connect_packet", "connect_error_packet", "disconnect_packet", "event_packet",
    "ack_packet", "pub_packet",
]

# -- Engine.IO -----------------------------------------------------------------

OPEN, CLOSE, PING, PONG, MESSAGE, UPGRADE, NOOP = range(7)
_ENGINE_TYPES = "0123456"

RECORD_SEPARATOR = b"\x1e"
#: ends each packet in a session's outbound buffer (one line per packet)
PACKET_END = b"\n"
_RS = "\x1e"


class EnginePacket(NamedTuple):
    """One Engine.IO packet: its type (``OPEN`` … ``NOOP``) and its text."""

    type: int
    data: str = ""


def encode_engine(packet_type: int, data: str | bytes = b"") -> bytes:
    """One Engine.IO packet as bytes: the type digit, then the data."""
    if type(packet_type) is not int or not 0 <= packet_type <= 6:
        raise ValueError(f"unknown Engine.IO packet type {packet_type!r}")
    return _ENGINE_TYPES[packet_type].encode() + (data.encode() if isinstance(data, str) else data)


def decode_engine(text: str) -> EnginePacket:
    """One Engine.IO packet from its text (a WebSocket text message or one
    record of a polling payload)."""
    if not isinstance(text, str):
        raise SocketIOError("binary Engine.IO packets are not supported")
    if not text:
        raise SocketIOError("empty Engine.IO packet")
    first = text[0]
    if first == "b":
        raise SocketIOError("binary (base64) Engine.IO packets are not supported")
    packet_type = _ENGINE_TYPES.find(first)
    if packet_type < 0:
        raise SocketIOError(f"unknown Engine.IO packet type {first!r}")
    return EnginePacket(packet_type, text[1:])


def encode_payload(packets: Iterable[bytes]) -> bytes:
    """A polling payload: encoded packets joined by the record separator."""
    packets = list(packets)
    if not packets:
        raise ValueError("a polling payload holds at least one packet")
    for packet in packets:
        if not packet or RECORD_SEPARATOR in packet:
            raise ValueError("an encoded packet is non-empty and holds no record separator")
    return RECORD_SEPARATOR.join(packets)


def decode_payload(body: bytes | str) -> list[EnginePacket]:
    """The packets of a polling POST body, in order (all or nothing: one bad
    packet refuses the whole payload)."""
    if isinstance(body, (bytes, bytearray, memoryview)):
        try:
            body = bytes(body).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SocketIOError(f"polling payload is not valid UTF-8 (byte {exc.start})") from None
    elif not isinstance(body, str):
        raise SocketIOError("a polling payload is text")
    if not body:
        raise SocketIOError("empty polling payload")
    return [decode_engine(record) for record in body.split(_RS)]


def open_packet(sid: str, upgrades: list[str], ping_interval_ms: int, ping_timeout_ms: int,
                max_payload: int) -> bytes:
    """The handshake's ``open`` packet (times in milliseconds, size in bytes)."""
    return b"0" + encode_json({"sid": sid, "upgrades": upgrades, "pingInterval": ping_interval_ms,
                               "pingTimeout": ping_timeout_ms, "maxPayload": max_payload})


def _check_pending(pending: bytes) -> None:
    if not pending or pending[-1:] != PACKET_END:
        raise ValueError("pending packets are non-empty and each ends with a newline")


def polling_body(pending: bytes) -> bytes:
    """The body of a polling answer from buffered packets (each followed by
    ``PACKET_END``): the packets joined by the record separator (what the
    shard's ``take_payload(session, RECORD_SEPARATOR)`` returns)."""
    _check_pending(pending)
    return pending[:-1].replace(PACKET_END, RECORD_SEPARATOR)


def split_pending(pending: bytes) -> list[bytes]:
    """Buffered packets one by one (for WebSocket: one text frame each)."""
    _check_pending(pending)
    return pending[:-1].split(PACKET_END)


# -- Socket.IO -----------------------------------------------------------------

CONNECT, DISCONNECT, EVENT, ACK, CONNECT_ERROR, BINARY_EVENT, BINARY_ACK = range(7)

#: event names a client may not send (socket.io-parser refuses them too)
RESERVED_EVENTS = frozenset({"connect", "connect_error", "disconnect", "disconnecting",
                             "newListener", "removeListener"})
#: ack ids are JavaScript numbers: integers up to 2**53 - 1
MAX_ACK_ID = 2 ** 53 - 1
_MAX_ACK_DIGITS = len(str(MAX_ACK_ID))
_DIGITS = frozenset("0123456789")


@dataclass(frozen=True, slots=True)
class SocketIOPacket:
    """One Socket.IO packet. ``data`` None means no payload (JSON null is
    never a valid payload); ``id`` is the ack id of an EVENT (optional) or
    an ACK (required)."""

    type: int
    namespace: str = "/"
    data: Any = None
    id: int | None = None


def _check_packet(packet_type: int, data: Any, ack_id: int | None) -> None:
    """The payload and ack-id rules of Socket.IO v5 (as socket.io-parser)."""
    if packet_type == CONNECT:
        ok = data is None or isinstance(data, dict)
        what = "a CONNECT payload must be an object"
    elif packet_type == DISCONNECT:
        ok = data is None
        what = "a DISCONNECT packet has no payload"
    elif packet_type == EVENT:
        ok = isinstance(data, list) and bool(data) and (
            (isinstance(data[0], str) and data[0] not in RESERVED_EVENTS)
            or (type(data[0]) in (int, float)))
        what = "an EVENT payload must be a non-empty array starting with a (non-reserved) event name"
    elif packet_type == ACK:
        ok = isinstance(data, list)
        what = "an ACK payload must be an array"
        if ok and ack_id is None:
            ok, what = False, "an ACK needs an ack id"
    elif packet_type == CONNECT_ERROR:
        ok = isinstance(data, (str, dict))
        what = "a CONNECT_ERROR payload must be a string or an object"
    else:
        raise SocketIOError(f"unknown Socket.IO packet type {packet_type!r}")
    if not ok:
        raise SocketIOError(what)
    if ack_id is not None and packet_type not in (EVENT, ACK):
        raise SocketIOError("only EVENT and ACK packets carry an ack id")


def decode_socketio(text: str) -> SocketIOPacket:
    """One Socket.IO packet from the text of an Engine.IO message packet:
    ``<type>[<namespace>,][<ack id>][<JSON payload>]``."""
    if not isinstance(text, str):
        raise SocketIOError("binary Socket.IO packets are not supported")
    if not text:
        raise SocketIOError("empty Socket.IO packet")
    first = text[0]
    if first in ("5", "6"):
        raise SocketIOError("binary Socket.IO packets (BINARY_EVENT, BINARY_ACK) are not supported")
    if first not in ("0", "1", "2", "3", "4"):
        raise SocketIOError(f"unknown Socket.IO packet type {first!r}")
    packet_type = ord(first) - 48
    end = len(text)
    i = 1
    namespace = "/"
    if i < end and text[i] == "/":
        comma = text.find(",", i)
        if comma < 0:
            namespace, i = text[i:], end
        else:
            namespace, i = text[i:comma], comma + 1
    ack_id = None
    j = i
    while j < end and text[j] in _DIGITS:
        j += 1
    if j > i:
        if j - i > _MAX_ACK_DIGITS or int(text[i:j]) > MAX_ACK_ID:
            raise SocketIOError(f"ack id larger than {MAX_ACK_ID}")
        ack_id = int(text[i:j])
        i = j
    data = None
    if i < end:
        try:
            data = decode_json(text[i:])
        except ValueError as exc:
            raise SocketIOError(f"invalid JSON payload in Socket.IO packet: {exc}") from None
        if data is None:
            raise SocketIOError("a Socket.IO payload is never null")
    _check_packet(packet_type, data, ack_id)
    return SocketIOPacket(packet_type, namespace, data, ack_id)


def _head(packet_type: int, namespace: str, ack_id: int | None) -> bytes:
    head = b"%d" % packet_type
    if namespace != "/":
        if not namespace.startswith("/") or "," in namespace or "\x1e" in namespace:
            raise ValueError(f"a namespace starts with '/' and holds no ',' or record separator: {namespace!r}")
        head += namespace.encode() + b","
    if ack_id is not None:
        if type(ack_id) is not int or not 0 <= ack_id <= MAX_ACK_ID:
            raise ValueError(f"an ack id is an integer in [0, {MAX_ACK_ID}]: {ack_id!r}")
        head += b"%d" % ack_id
    return head


def encode_socketio(packet: SocketIOPacket) -> bytes:
    """The text of one Socket.IO packet (without the Engine.IO ``4``)."""
    if packet.type in (BINARY_EVENT, BINARY_ACK):
        raise ValueError("binary Socket.IO packets are not supported")
    _check_packet(packet.type, packet.data, packet.id)
    head = _head(packet.type, packet.namespace, packet.id)
    return head if packet.data is None else head + encode_json(packet.data)


# Server packets, ready for the wire: Engine.IO message ("4") + Socket.IO packet.

def connect_packet(socket_id: str, namespace: str = "/") -> bytes:
    """CONNECT accepted: ``40{"sid":"..."}``."""
    return b"4" + _head(CONNECT, namespace, None) + encode_json({"sid": socket_id})


def connect_error_packet(message: str, namespace: str = "/", data: Any = None) -> bytes:
    """CONNECT refused: ``44{"message":"..."}`` (with ``data`` when given)."""
    body: dict[str, Any] = {"message": message}
    if data is not None:
        body["data"] = data
    return b"4" + _head(CONNECT_ERROR, namespace, None) + encode_json(body)


def disconnect_packet(namespace: str = "/") -> bytes:
    """The server leaves the namespace: ``41`` (socket.io-client will not
    reconnect by itself after it)."""
    return b"4" + _head(DISCONNECT, namespace, None)


def event_packet(event: str, *args: Any, namespace: str = "/") -> bytes:
    """An event from the server: ``42["event",...args]``."""
    if not isinstance(event, str) or event in RESERVED_EVENTS:
        raise ValueError(f"not a valid event name: {event!r}")
    return b"4" + _head(EVENT, namespace, None) + encode_json([event, *args])


def ack_packet(ack_id: int, *args: Any, namespace: str = "/") -> bytes:
    """The answer to an event that asked for one: ``43<id>[...args]``."""
    return b"4" + _head(ACK, namespace, ack_id) + encode_json(list(args))


def pub_packet(channel: str, offset: int, data_json: bytes) -> bytes:
    """The ``pub`` event of one publication, built once per shard and shared
    by every Socket.IO subscriber: ``data_json`` (already compact JSON) is
    inserted verbatim, never re-encoded. Channel names are validated ASCII
    without quotes or backslashes, so they need no escaping."""
    return b'42["pub",{"channel":"%s","offset":%d,"data":%s}]' % (channel.encode(), offset, data_json)

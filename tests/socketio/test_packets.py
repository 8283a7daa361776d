"""Engine.IO v4 / Socket.IO v5 packets (broker.adapters.socketio.packets).

Wire examples are the protocol documents' own (engine.io-protocol and
socket.io-protocol READMEs); garbage must raise SocketIOError and nothing else.
"""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.adapters.socketio import packets as pk
from broker.errors import ProtocolViolation, SocketIOError

# -- Engine.IO -----------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("0{\"sid\":\"x\"}", (pk.OPEN, "{\"sid\":\"x\"}")),
    ("1", (pk.CLOSE, "")),
    ("2", (pk.PING, "")),
    ("2probe", (pk.PING, "probe")),
    ("3probe", (pk.PONG, "probe")),
    ("4hello", (pk.MESSAGE, "hello")),
    ("4€€€", (pk.MESSAGE, "€€€")),
    ("5", (pk.UPGRADE, "")),
    ("6", (pk.NOOP, "")),
])
def test_engine_packet_decodes_the_documented_examples(text, expected):
    assert pk.decode_engine(text) == expected


def test_engine_packet_encodes_type_digit_then_data():
    assert pk.encode_engine(pk.PONG, "probe") == b"3probe"
    assert pk.encode_engine(pk.MESSAGE, b'2["a"]') == b'42["a"]'
    assert pk.encode_engine(pk.NOOP) == b"6"
    with pytest.raises(ValueError):
        pk.encode_engine(7)


@pytest.mark.parametrize("text, problem", [
    ("", "empty"),
    ("7", "unknown Engine.IO packet type '7'"),
    ("x", "unknown Engine.IO packet type 'x'"),
    ("abc", "unknown Engine.IO packet type 'a'"),
    ("٣", "unknown Engine.IO packet type"),            # a non-ASCII digit is no type
    ("bAQIDBA==", "binary (base64)"),
])
def test_engine_packet_garbage_names_the_problem(text, problem):
    with pytest.raises(SocketIOError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        pk.decode_engine(text)


def test_binary_websocket_message_is_refused():
    with pytest.raises(SocketIOError, match="binary Engine.IO packets are not supported"):
        pk.decode_engine(b"\x01\x02")  # type: ignore[arg-type]


def test_payload_round_trip_with_the_record_separator():
    body = pk.encode_payload([b"4hello", b"2", b"4world"])
    assert body == b"4hello\x1e2\x1e4world"
    assert pk.decode_payload(body) == [(pk.MESSAGE, "hello"), (pk.PING, ""), (pk.MESSAGE, "world")]
    assert pk.decode_payload("42[\"hello\"]\x1e42[\"world\"]") == [
        (pk.MESSAGE, '2["hello"]'), (pk.MESSAGE, '2["world"]')]


@pytest.mark.parametrize("body, problem", [
    (b"", "empty polling payload"),
    (b"4hello\x1e", "empty Engine.IO packet"),          # trailing separator: an empty record
    (b"4hello\x1ebAQIDBA==", r"binary \(base64\)"),
    (b"4ok\x1e9", "unknown Engine.IO packet type '9'"),
    (b"4\xff\xfe", "not valid UTF-8 \\(byte 1\\)"),
])
def test_payload_garbage_names_the_problem(body, problem):
    with pytest.raises(SocketIOError, match=problem):
        pk.decode_payload(body)


def test_encode_payload_refuses_what_would_not_decode():
    with pytest.raises(ValueError):
        pk.encode_payload([])
    with pytest.raises(ValueError):
        pk.encode_payload([b"4a\x1eb"])
    with pytest.raises(ValueError):
        pk.encode_payload([b""])


def test_open_packet_has_the_handshake_fields_in_ms_and_bytes():
    packet = pk.open_packet("3.abc", ["websocket"], 25000, 20000, 65536)
    assert packet[:1] == b"0"
    assert json.loads(packet[1:]) == {"sid": "3.abc", "upgrades": ["websocket"], "pingInterval": 25000,
                                      "pingTimeout": 20000, "maxPayload": 65536}


def test_buffered_packets_become_a_polling_body_or_frames():
    pending = b"2\n" + pk.pub_packet("bill:1", 1, b"{}") + b"\n"
    assert pk.polling_body(pending) == b'2\x1e42["pub",{"channel":"bill:1","offset":1,"data":{}}]'
    assert pk.split_pending(pending) == [b"2", b'42["pub",{"channel":"bill:1","offset":1,"data":{}}]']
    for bad in (b"", b"2", b"2\x1e"):
        with pytest.raises(ValueError):
            pk.polling_body(bad)


# -- Socket.IO -----------------------------------------------------------------

@pytest.mark.parametrize("text, packet", [
    ("0", pk.SocketIOPacket(pk.CONNECT)),
    ('0{"token":"123"}', pk.SocketIOPacket(pk.CONNECT, data={"token": "123"})),
    ('0/admin,{"sid":"oSO0OpakMV_3jnilAAAA"}',
     pk.SocketIOPacket(pk.CONNECT, "/admin", {"sid": "oSO0OpakMV_3jnilAAAA"})),
    ("0/admin,", pk.SocketIOPacket(pk.CONNECT, "/admin")),
    ("0/admin", pk.SocketIOPacket(pk.CONNECT, "/admin")),                 # no comma at the end: accepted
    ('4{"message":"Not authorized"}', pk.SocketIOPacket(pk.CONNECT_ERROR, data={"message": "Not authorized"})),
    ('2["foo"]', pk.SocketIOPacket(pk.EVENT, data=["foo"])),
    ('2/admin,["bar"]', pk.SocketIOPacket(pk.EVENT, "/admin", ["bar"])),
    ('212["foo"]', pk.SocketIOPacket(pk.EVENT, data=["foo"], id=12)),
    ('3/admin,13["bar"]', pk.SocketIOPacket(pk.ACK, "/admin", ["bar"], 13)),
    ("312[]", pk.SocketIOPacket(pk.ACK, data=[], id=12)),
    ("1", pk.SocketIOPacket(pk.DISCONNECT)),
    ("1/admin,", pk.SocketIOPacket(pk.DISCONNECT, "/admin")),
    ('2[1,2]', pk.SocketIOPacket(pk.EVENT, data=[1, 2])),                  # numeric event names are legal
])
def test_socketio_decodes_the_documented_examples(text, packet):
    assert pk.decode_socketio(text) == packet


def test_socketio_encodes_like_socket_io_parser():
    assert pk.encode_socketio(pk.SocketIOPacket(pk.CONNECT)) == b"0"
    assert pk.encode_socketio(pk.SocketIOPacket(pk.EVENT, "/admin", ["bar"])) == b'2/admin,["bar"]'
    assert pk.encode_socketio(pk.SocketIOPacket(pk.ACK, "/admin", ["bar"], 13)) == b'3/admin,13["bar"]'
    assert pk.encode_socketio(pk.SocketIOPacket(pk.DISCONNECT, "/admin")) == b"1/admin,"
    assert pk.encode_socketio(pk.SocketIOPacket(pk.EVENT, data=["é", "\x1e"])) == '2["é","\\u001e"]'.encode()


@pytest.mark.parametrize("text, problem", [
    ("", "empty Socket.IO packet"),
    ("7", "unknown Socket.IO packet type '7'"),
    ("x", "unknown Socket.IO packet type 'x'"),
    ('51-["baz",{"_placeholder":true,"num":0}]', "binary Socket.IO packets"),
    ('61-15["bar",{"_placeholder":true,"num":0}]', "binary Socket.IO packets"),
    ("2", "EVENT payload must be a non-empty array"),
    ("2[]", "EVENT payload must be a non-empty array"),
    ('2{"a":1}', "EVENT payload must be a non-empty array"),
    ('2["connect"]', "non-reserved"),
    ('2["disconnect",1]', "non-reserved"),
    ("2[true]", "EVENT payload"),
    ("2[null]", "EVENT payload"),
    ("3[]", "an ACK needs an ack id"),
    ("31", "ACK payload must be an array"),
    ('31{"a":1}', "ACK payload must be an array"),
    ('0["x"]', "CONNECT payload must be an object"),
    ("0null", "never null"),
    ('1{}', "DISCONNECT packet has no payload"),
    ("4", "CONNECT_ERROR payload"),
    ('012{}', "only EVENT and ACK packets carry an ack id"),
    ('2["a"', "invalid JSON"),
    ("2[NaN]", "invalid JSON"),
    ("2[Infinity]", "invalid JSON"),
    ('2["a"]x', "invalid JSON"),
    ("2" + "[" * 100_000 + "]" * 100_000, "invalid JSON"),
    ("2" + "9" * 17 + '["a"]', "ack id larger than"),
    ("29007199254740992[\"a\"]", "ack id larger than"),
])
def test_socketio_garbage_names_the_problem(text, problem):
    with pytest.raises(SocketIOError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        pk.decode_socketio(text)


def test_largest_ack_id_is_javascripts_largest_safe_integer():
    assert pk.decode_socketio(f'2{pk.MAX_ACK_ID}["a"]').id == 2 ** 53 - 1
    with pytest.raises(ValueError):
        pk.encode_socketio(pk.SocketIOPacket(pk.ACK, data=[], id=2 ** 53))


def test_socketio_error_is_a_protocol_violation_with_code_400():
    with pytest.raises(ProtocolViolation) as info:
        pk.decode_socketio("9")
    assert info.value.code == 400
    assert isinstance(info.value, ValueError)


def test_encode_refuses_packets_that_would_not_decode():
    for packet in (pk.SocketIOPacket(pk.EVENT, data=[]),
                   pk.SocketIOPacket(pk.ACK, data=[]),                     # no id
                   pk.SocketIOPacket(pk.CONNECT, "admin"),                 # no leading slash
                   pk.SocketIOPacket(pk.CONNECT, "/a,b"),
                   pk.SocketIOPacket(pk.CONNECT, "/a\x1eb"),
                   pk.SocketIOPacket(pk.BINARY_EVENT, data=["x"]),
                   pk.SocketIOPacket(pk.CONNECT, data={"a": 1}, id=3)):
        with pytest.raises(ValueError):
            pk.encode_socketio(packet)


def test_server_packets_are_engine_messages():
    assert pk.connect_packet("abc") == b'40{"sid":"abc"}'
    assert pk.connect_packet("abc", "/admin") == b'40/admin,{"sid":"abc"}'
    assert pk.connect_error_packet("Not authorized") == b'44{"message":"Not authorized"}'
    assert pk.connect_error_packet("no", data={"code": 401}) == b'44{"message":"no","data":{"code":401}}'
    assert pk.disconnect_packet() == b"41"
    assert pk.event_packet("unsubscribed", {"channel": "bill:1", "reason": "x"}) == \
        b'42["unsubscribed",{"channel":"bill:1","reason":"x"}]'
    assert pk.ack_packet(7, {"ok": True}) == b'437[{"ok":true}]'
    assert pk.ack_packet(7) == b"437[]"
    with pytest.raises(ValueError):
        pk.event_packet("connect")


def test_pub_packet_inserts_the_data_bytes_verbatim():
    data_json = b'{"b":1,"a":[1.50,"\\u00e9"]}'   # not what json.dumps would write: proof of no re-encoding
    packet = pk.pub_packet("bill:42", 18, data_json)
    assert packet == b'42["pub",{"channel":"bill:42","offset":18,"data":' + data_json + b"}]"
    decoded = pk.decode_socketio(pk.decode_engine(packet.decode()).data)
    assert decoded == pk.SocketIOPacket(pk.EVENT, data=[
        "pub", {"channel": "bill:42", "offset": 18, "data": {"b": 1, "a": [1.5, "é"]}}])


# -- properties ----------------------------------------------------------------

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 63) | st.floats(allow_nan=False, allow_infinity=False)
    | _text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_text, children, max_size=4),
    max_leaves=20)
_namespace = st.just("/") | st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters=",\x1e"),
                                    max_size=12).map(lambda s: "/" + s)
_ack_id = st.integers(0, pk.MAX_ACK_ID)
_event_name = _text.filter(lambda s: s not in pk.RESERVED_EVENTS)

_packets = st.one_of(
    st.builds(pk.SocketIOPacket, st.just(pk.CONNECT), _namespace,
              st.none() | st.dictionaries(_text, _json, max_size=4)),
    st.builds(pk.SocketIOPacket, st.just(pk.DISCONNECT), _namespace),
    st.builds(lambda ns, name, args, ack: pk.SocketIOPacket(pk.EVENT, ns, [name, *args], ack),
              _namespace, _event_name, st.lists(_json, max_size=4), st.none() | _ack_id),
    st.builds(lambda ns, args, ack: pk.SocketIOPacket(pk.ACK, ns, args, ack),
              _namespace, st.lists(_json, max_size=4), _ack_id),
    st.builds(pk.SocketIOPacket, st.just(pk.CONNECT_ERROR), _namespace,
              _text | st.dictionaries(_text, _json, max_size=3)),
)


@settings(max_examples=150, deadline=None)
@given(_packets)
def test_socketio_round_trip(packet):
    text = pk.encode_socketio(packet).decode()
    assert pk.decode_socketio(text) == packet
    # and inside an Engine.IO message, inside a polling payload
    wire = pk.encode_payload([pk.encode_engine(pk.MESSAGE, text), b"3"])
    assert pk.RECORD_SEPARATOR not in pk.encode_engine(pk.MESSAGE, text)
    message, pong = pk.decode_payload(wire)
    assert pong == (pk.PONG, "")
    assert pk.decode_socketio(message.data) == packet


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x1e"), max_size=20)),
    min_size=1, max_size=6))
def test_engine_payload_round_trip(items):
    body = pk.encode_payload([pk.encode_engine(t, d) for t, d in items])
    assert pk.decode_payload(body) == [pk.EnginePacket(t, d) for t, d in items]
    assert pk.decode_payload(body.decode()) == [pk.EnginePacket(t, d) for t, d in items]


@settings(max_examples=80, deadline=None)
@given(st.from_regex(r"[a-z]{1,8}:[A-Za-z0-9_\-:.@]{1,20}", fullmatch=True), st.integers(0, 2 ** 62), _json)
def test_pub_packet_decodes_to_the_pub_event(channel, offset, data):
    data_json = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
    packet = pk.decode_socketio(pk.decode_engine(pk.pub_packet(channel, offset, data_json).decode()).data)
    assert packet == pk.SocketIOPacket(pk.EVENT, data=["pub", {"channel": channel, "offset": offset, "data": data}])


_garbage_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet="0123456789/,[]{}\"-:ab\x1e", max_size=40),
    st.builds(lambda head, body: head + body, st.sampled_from(["0", "1", "2", "3", "4", "5", "6", "2/x,", "21"]),
              st.text(alphabet="[]{}\",:0123456789.eE-+tfnulrsa\\", max_size=30)),
)


@settings(max_examples=500, deadline=None)
@given(_garbage_text)
def test_socketio_garbage_raises_only_socketio_error(text):
    try:
        packet = pk.decode_socketio(text)
    except SocketIOError as exc:
        assert exc.message
    else:
        assert isinstance(packet, pk.SocketIOPacket)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=60) | _garbage_text.map(str.encode))
def test_payload_garbage_raises_only_socketio_error(body):
    try:
        decoded = pk.decode_payload(body)
    except SocketIOError as exc:
        assert exc.message
    else:
        assert decoded and all(0 <= p.type <= 6 for p in decoded)
        for packet in decoded:
            try:
                pk.decode_socketio(packet.data)
            except SocketIOError:
                pass

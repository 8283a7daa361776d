"""Socket.IO namespace "/" and the broker's events (broker.adapters.socketio.events)."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.adapters.socketio import events as ev
from broker.adapters.socketio import packets as pk
from broker.adapters.socketio.events import (
    Connect,
    Leave,
    Refused,
    Request,
    Send,
    Violation,
)


def connected() -> ev.SocketIOConnection:
    conn = ev.SocketIOConnection(0.0)
    assert conn.on_message('0{"token":"jwt"}') == Connect({"token": "jwt"}, "jwt")
    assert conn.accept("sock1") == b'40{"sid":"sock1"}'
    assert conn.connected and conn.socket_id == "sock1"
    return conn


def test_connect_with_and_without_a_token():
    conn = ev.SocketIOConnection(0.0)
    assert conn.on_message("0") == Connect(None, None)
    conn2 = ev.SocketIOConnection(0.0)
    assert conn2.on_message('0{"token":5,"x":1}') == Connect({"token": 5, "x": 1}, None)


def test_refused_connect_may_be_tried_again():
    conn = ev.SocketIOConnection(0.0)
    conn.on_message('0{"token":"expired"}')
    assert conn.refuse("token expired") == b'44{"message":"token expired"}'
    assert not conn.connected
    assert isinstance(conn.on_message('0{"token":"fresh"}'), Connect)
    conn.accept("s")
    assert conn.connected


def test_connect_answered_once():
    conn = ev.SocketIOConnection(0.0)
    with pytest.raises(RuntimeError):
        conn.accept("s")
    conn.on_message("0")
    assert isinstance(conn.on_message("0"), Violation)           # a second CONNECT before the answer
    conn.accept("s")
    assert isinstance(conn.on_message("0"), Violation)           # and after it
    with pytest.raises(RuntimeError):
        conn.refuse("no")


def test_other_namespaces_are_invalid():
    conn = ev.SocketIOConnection(0.0)
    assert conn.on_message("0/admin,") == Send(b'44/admin,{"message":"Invalid namespace"}')
    conn = connected()
    assert isinstance(conn.on_message('2/admin,["subscribe",{"channel":"bill:1"}]'), Violation)


@pytest.mark.parametrize("text", ['2["subscribe",{"channel":"bill:1"}]', "1", "garbage", "", "51-[]"])
def test_nothing_but_connect_before_the_connect(text):
    assert isinstance(ev.SocketIOConnection(0.0).on_message(text), Violation)


def test_connect_timeout():
    conn = ev.SocketIOConnection(10.0)
    assert not conn.connect_overdue(54.9)
    assert conn.connect_overdue(55.0)
    conn.on_message("0")
    assert conn.connect_overdue(55.0)                            # still waiting for its auth answer
    conn.accept("s")
    assert not conn.connect_overdue(1000.0)


@pytest.mark.parametrize("text, expected", [
    ('21["subscribe",{"channel":"bill:42"}]', Request("subscribe", 1, "bill:42")),
    ('2["subscribe",{"channel":"bill:42"}]', Request("subscribe", None, "bill:42")),
    ('22["subscribe",{"channel":"bill:42","recover":{"epoch":"e1","offset":17}}]',
     Request("subscribe", 2, "bill:42", ("e1", 17))),
    ('22["subscribe",{"channel":"bill:42","recover":null}]', Request("subscribe", 2, "bill:42")),
    ('23["unsubscribe",{"channel":"bill:42"}]', Request("unsubscribe", 3, "bill:42")),
    ('24["refresh",{"token":"jwt2"}]', Request("refresh", 4, token="jwt2")),
    ('25["publish",{"channel":"room:7","data":{"b":[1, 2.5,"é"]}}]',
     Request("publish", 5, "room:7", data_json='{"b":[1,2.5,"é"]}'.encode())),
])
def test_events_become_requests(text, expected):
    assert connected().on_message(text) == expected


@pytest.mark.parametrize("text, message", [
    ('27["nope",{}]', "unknown event 'nope'"),
    ('27[5,{}]', "unknown event 5"),
    ('27["subscribe"]', "subscribe takes one object argument"),
    ('27["subscribe",{"channel":"bill:1"},2]', "subscribe takes one object argument"),
    ('27["subscribe","bill:1"]', "subscribe takes one object argument"),
    ('27["subscribe",{}]', "channel must be a non-empty string"),
    ('27["subscribe",{"channel":"no namespace"}]', "channel must be 'namespace:rest'"),
    ('27["subscribe",{"channel":"bill:1","recover":{"epoch":"e"}}]', "recover needs"),
    ('27["subscribe",{"channel":"bill:1","recover":{"epoch":"e","offset":-1}}]', "recover needs"),
    ('27["subscribe",{"channel":"bill:1","recover":[1]}]', "recover needs"),
    ('27["refresh",{}]', "refresh needs a token"),
    ('27["publish",{"channel":"room:1"}]', "publish needs data"),
    ('27["publish",{"channel":"room:1","data":1e999}]', "data is not valid JSON"),
])
def test_bad_events_are_refused_with_400(text, message):
    outcome = connected().on_message(text)
    assert isinstance(outcome, Refused)
    assert (outcome.ack_id, outcome.code) == (7, 400)
    assert message in outcome.message


def test_stray_ack_is_refused_without_an_answer():
    assert connected().on_message("39[]") == Refused(None, 400, "unexpected ACK: the server asked for none")


def test_disconnect_leaves_for_good():
    conn = connected()
    assert conn.on_message("1") == Leave()
    assert isinstance(conn.on_message('2["subscribe",{"channel":"bill:1"}]'), Violation)


def test_answers_are_acks_with_the_protocol_shapes():
    def body(packet: bytes) -> tuple[int, list]:
        decoded = pk.decode_socketio(pk.decode_engine(packet.decode()).data)
        assert decoded.type == pk.ACK
        return decoded.id, decoded.data

    assert body(ev.ack_subscribed(1, "e1", 17)) == (1, [{"ok": True, "epoch": "e1", "offset": 17}])
    assert body(ev.ack_subscribed(2, "e1", 20, recovered=True)) == \
        (2, [{"ok": True, "epoch": "e1", "offset": 20, "recovered": True}])
    assert body(ev.ack_ok(3)) == (3, [{"ok": True}])
    assert body(ev.ack_ok(6, exp=1700000000)) == (6, [{"ok": True, "exp": 1700000000}])
    assert body(ev.ack_error(4, 403, "not yours")) == (4, [{"ok": False, "code": 403, "message": "not yours"}])
    assert ev.unsubscribed_event("bill:1", "epoch changed") == \
        b'42["unsubscribed",{"channel":"bill:1","reason":"epoch changed"}]'
    assert json.loads(ev.reconnect_event("drain", 500)[2:]) == ["reconnect", {"reason": "drain", "after_ms": 500}]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.sampled_from(["0", '0{"token":"t"}', "1", '21["subscribe",{"channel":"bill:1"}]', "39[]", "0/x,",
                     '2["refresh",{"token":"x"}]', "2[]", "accept", "refuse"]),
    st.text(max_size=20)), max_size=15))
def test_any_sequence_gives_an_outcome_and_never_raises(messages):
    conn = ev.SocketIOConnection(0.0)
    waiting = False
    for text in messages:
        if text in ("accept", "refuse"):
            if waiting:
                conn.accept("s") if text == "accept" else conn.refuse("no")
                waiting = False
            continue
        outcome = conn.on_message(text)
        assert isinstance(outcome, (Connect, Request, Refused, Send, Leave, Violation))
        if isinstance(outcome, Connect):
            waiting = True
        if isinstance(outcome, Request):
            assert conn.connected and outcome.event in ev.EVENTS

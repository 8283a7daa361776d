"""The Engine.IO v4 session state machine (broker.adapters.socketio.engine).

Scenarios follow the Engine.IO protocol document and its compliance test
suite (socketio/engine.io-protocol, test-suite/test-suite.js): handshake,
polling, heartbeat, close, upgrade, and engine.io's error answers. The
outbox is a LineOutbox on the fastpath's real RingBuffer.
"""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.adapters.socketio import engine as eio
from broker.adapters.socketio import packets as pk
from broker.adapters.socketio.engine import (
    AnswerPoll,
    Closed,
    Message,
    Park,
    ProbeClose,
    ProbeSend,
    Released,
    Reply,
    Upgraded,
)
from broker.errors import SocketIOError

CONFIG = eio.EngineConfig(ping_interval=25.0, ping_timeout=20.0, max_payload=1000, upgrade_timeout=10.0)


def ok(body: bytes) -> eio.HttpResponse:
    return eio.HttpResponse(200, body)


def error(code: int, status: int = 400) -> tuple[int, int]:
    return status, code


def error_of(effect: Reply | AnswerPoll) -> tuple[int, int]:
    response = effect.response
    assert response.content_type == b"application/json"
    body = json.loads(response.body)
    assert set(body) == {"code", "message"} and body["message"]
    return response.status, body["code"]


def polling_session(now: float = 0.0, capacity: int = 1 << 16) -> eio.EngineSession:
    """A polling session whose handshake GET has been answered."""
    session = eio.EngineSession(eio.new_sid(0), eio.POLLING, CONFIG, eio.LineOutbox(capacity), now)
    [reply] = session.on_poll(now)
    assert reply.response.body.startswith(b"0{")
    return session


def websocket_session(now: float = 0.0) -> eio.EngineSession:
    session = eio.EngineSession(eio.new_sid(0), eio.WEBSOCKET, CONFIG, eio.LineOutbox(1 << 16), now)
    session.outbox.take()   # the open packet, written by the caller's flush
    return session


# -- requests ------------------------------------------------------------------

def test_handshake_request():
    assert eio.parse_request("GET", "EIO=4&transport=polling&t=N8hyd6w") == eio.EngineRequest("GET", "polling")
    assert eio.parse_request("GET", b"EIO=4&transport=websocket", websocket_upgrade=True) == \
        eio.EngineRequest("GET", "websocket")


def test_session_request_names_the_owning_shard():
    sid = eio.new_sid(7)
    request = eio.parse_request("POST", f"EIO=4&transport=polling&sid={sid}")
    assert request == eio.EngineRequest("POST", "polling", sid, 7)


@pytest.mark.parametrize("method, query, upgrade, code", [
    ("GET", "EIO=4", False, eio.UNKNOWN_TRANSPORT),
    ("GET", "EIO=4&transport=abc", False, eio.UNKNOWN_TRANSPORT),
    ("GET", "EIO=4&transport=flashsocket", False, eio.UNKNOWN_TRANSPORT),
    ("GET", "transport=polling", False, eio.UNSUPPORTED_PROTOCOL_VERSION),
    ("GET", "EIO=abc&transport=polling", False, eio.UNSUPPORTED_PROTOCOL_VERSION),
    ("GET", "EIO=3&transport=polling", False, eio.UNSUPPORTED_PROTOCOL_VERSION),
    ("POST", "EIO=4&transport=polling", False, eio.BAD_HANDSHAKE_METHOD),
    ("PUT", "EIO=4&transport=polling", False, eio.BAD_HANDSHAKE_METHOD),
    ("GET", "EIO=4&transport=websocket", False, eio.BAD_REQUEST),          # websocket without an upgrade
    ("GET", "EIO=4&transport=polling", True, eio.BAD_REQUEST),             # an upgrade on polling
    ("GET", "EIO=4&transport=polling&transport=polling", False, eio.BAD_REQUEST),
    ("GET", "EIO=4&transport=polling&sid=nope", False, eio.UNKNOWN_SID),
    ("GET", "EIO=4&transport=polling&sid=0.abc", False, eio.UNKNOWN_SID),
    ("GET", "EIO=4&transport=polling&sid=a&sid=b", False, eio.BAD_REQUEST),
    ("DELETE", "EIO=4&transport=polling&sid=" + "0." + "a" * 20, False, eio.BAD_REQUEST),
])
def test_bad_requests_get_engine_io_error_codes(method, query, upgrade, code):
    with pytest.raises(SocketIOError) as info:
        eio.parse_request(method, query, upgrade)
    assert info.value.engine_code == code
    assert error_of(Reply(eio.error_response(info.value.engine_code, info.value.message)))[1] == code


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["GET", "POST", "PUT", "OPTIONS", ""]),
       st.text(max_size=80) | st.binary(max_size=80)
       | st.lists(st.sampled_from(["EIO=4", "EIO=3", "transport=polling", "transport=websocket", "sid=0.",
                                   "sid=1." + "A" * 20, "t=x", "%ff", "&", "=", "sid"]), max_size=6).map("&".join),
       st.booleans())
def test_any_request_is_parsed_or_refused_with_a_code(method, query, upgrade):
    try:
        request = eio.parse_request(method, query, upgrade)
    except SocketIOError as exc:
        assert exc.engine_code in eio.ERROR_MESSAGES and exc.message
    else:
        assert request.transport in eio.TRANSPORTS
        assert (request.sid is None) == (request.shard is None)


def test_error_responses_are_engine_io_json():
    response = eio.error_response(eio.UNKNOWN_SID)
    assert (response.status, json.loads(response.body)) == (400, {"code": 1, "message": "Session ID unknown"})
    assert eio.error_response(eio.FORBIDDEN).status == 403
    assert eio.error_response(eio.BAD_REQUEST, "overloaded", status=503).status == 503
    assert json.loads(eio.error_response(eio.UNKNOWN_TRANSPORT).body)["message"] == "Transport unknown"
    too_large = eio.too_large_response()
    assert (too_large.status, json.loads(too_large.body)["code"]) == (413, eio.BAD_REQUEST)


def test_sid_encodes_its_shard_and_is_unguessable():
    sids = {eio.new_sid(12) for _ in range(1000)}
    assert len(sids) == 1000
    for sid in sids:
        assert eio.shard_of_sid(sid) == 12
        assert len(sid) == 23 and all(c.isalnum() or c in "._-" for c in sid)
    assert eio.shard_of_sid(eio.new_sid(0)) == 0
    for bad in ("", "12", "12.short", "x." + "a" * 20, "01." + "a" * 20, "-1." + "a" * 20,
                "1." + "a" * 19 + "/", 12):
        assert eio.shard_of_sid(bad) is None          # type: ignore[arg-type]
    with pytest.raises(ValueError):
        eio.new_sid(-1)
    assert eio.new_socket_id() != eio.new_socket_id()


# -- handshake -----------------------------------------------------------------

def test_polling_handshake_answers_the_open_packet():
    outbox = eio.LineOutbox(1 << 16)
    session = eio.EngineSession("5.abcdefghijklmnopqrst", eio.POLLING, CONFIG, outbox, 100.0)
    [reply] = session.on_poll(100.0)
    assert reply.response.status == 200
    assert reply.response.content_type == b"text/plain; charset=UTF-8"
    body = reply.response.body
    assert body[:1] == b"0"
    assert json.loads(body[1:]) == {"sid": "5.abcdefghijklmnopqrst", "upgrades": ["websocket"],
                                    "pingInterval": 25000, "pingTimeout": 20000, "maxPayload": 1000}
    assert len(outbox) == 0


def test_websocket_handshake_queues_the_open_packet_without_upgrades():
    outbox = eio.LineOutbox(1 << 16)
    eio.EngineSession("5.abcdefghijklmnopqrst", eio.WEBSOCKET, CONFIG, outbox, 0.0)
    [packet] = pk.split_pending(outbox.take())
    assert json.loads(packet[1:])["upgrades"] == []


# -- polling -------------------------------------------------------------------

def test_poll_parks_until_something_is_queued():
    session = polling_session()
    assert session.on_poll(1.0) == [Park()]
    assert session.queue(pk.connect_packet("abc"), 1.5) == [AnswerPoll(ok(b'40{"sid":"abc"}'))]
    assert session.flush_poll() == []                     # nothing parked any more


def test_poll_takes_everything_pending_at_once():
    session = polling_session()
    session.queue(b"4test1", 0.1)
    session.queue(b"4test2", 0.1)
    assert session.on_poll(0.2) == [Reply(ok(b"4test1\x1e4test2"))]


def test_fan_out_appends_to_the_outbox_then_flushes_the_parked_poll():
    session = polling_session()
    session.on_poll(1.0)
    session.outbox.append(pk.pub_packet("bill:1", 1, b"{}") + pk.PACKET_END)
    session.outbox.append(pk.pub_packet("bill:1", 2, b"[]") + pk.PACKET_END)
    assert session.flush_poll() == [AnswerPoll(ok(
        b'42["pub",{"channel":"bill:1","offset":1,"data":{}}]\x1e42["pub",{"channel":"bill:1","offset":2,"data":[]}]'))]


def test_post_hands_messages_up_in_order_and_answers_ok():
    session = polling_session()
    effects = session.on_post(b'40{"token":"t"}\x1e42["subscribe",{"channel":"bill:1"}]\x1e6', 1.0)
    assert effects == [Message('0{"token":"t"}'), Message('2["subscribe",{"channel":"bill:1"}]'),
                       Reply(eio.OK_RESPONSE)]
    assert eio.OK_RESPONSE.body == b"ok"


def test_bad_post_is_refused_whole_and_ends_the_session():
    session = polling_session()
    session.on_poll(1.0)
    effects = session.on_post(b"4hello\x1eabc", 2.0)
    assert effects[:3] == [AnswerPoll(ok(b"1")), Closed("unknown Engine.IO packet type 'a'", 1008), Released()]
    assert error_of(effects[3]) == error(eio.BAD_REQUEST)
    assert not any(isinstance(e, Message) for e in effects)
    [reply] = session.on_poll(3.0)
    assert error_of(reply) == error(eio.UNKNOWN_SID)


@pytest.mark.parametrize("body", [b"bAQIDBA==", b"4\xff", b""])
def test_binary_or_broken_posts_are_bad_requests(body):
    session = polling_session()
    effects = session.on_post(body, 1.0)
    assert [type(e) for e in effects] == [Closed, Released, Reply]
    assert error_of(effects[-1]) == error(eio.BAD_REQUEST)


def test_oversized_post_is_413_and_ends_the_session():
    session = polling_session()
    effects = session.on_post(b"4" + b"x" * CONFIG.max_payload, 1.0)
    assert effects[:2] == [Closed("payload too large", 1009), Released()]
    assert effects[2] == Reply(eio.too_large_response())
    # at the limit exactly, it is fine
    session = polling_session()
    assert session.on_post(b"4" + b"x" * (CONFIG.max_payload - 1), 1.0)[-1] == Reply(eio.OK_RESPONSE)


def test_overlapping_polls_end_the_session():
    # test-suite: the first poll gets "1", the second a 400, the sid is then unknown
    session = polling_session()
    assert session.on_poll(1.0) == [Park()]
    effects = session.on_poll(1.005)
    assert effects[:3] == [AnswerPoll(ok(b"1")), Closed("overlapping polls", 1008), Released()]
    assert error_of(effects[3]) == error(eio.BAD_REQUEST)
    assert error_of(session.on_poll(2.0)[0]) == error(eio.UNKNOWN_SID)
    assert error_of(session.on_post(b"3", 2.0)[0]) == error(eio.UNKNOWN_SID)


def test_client_close_answers_the_parked_poll_with_a_noop():
    # test-suite "forcefully closes the session": the pending poll gets "6"
    session = polling_session()
    session.on_poll(1.0)
    assert session.on_post(b"1", 1.1) == [AnswerPoll(ok(b"6")), Closed("client close", 1000), Released(),
                                          Reply(eio.OK_RESPONSE)]
    assert error_of(session.on_poll(1.2)[0]) == error(eio.UNKNOWN_SID)


def test_messages_after_a_close_packet_are_dropped():
    session = polling_session()
    effects = session.on_post(b"42[\"a\"]\x1e1\x1e42[\"b\"]", 1.0)
    assert effects == [Message('2["a"]'), Closed("client close", 1000), Released(), Reply(eio.OK_RESPONSE)]


def test_aborted_poll_ends_the_session():
    session = polling_session()
    assert session.on_poll_aborted(1.0) == []        # nothing parked: nothing happens
    session.on_poll(1.0)
    assert session.on_poll_aborted(2.0) == [Closed("poll connection closed", 1006), Released()]


def test_server_close_gives_the_parked_poll_pending_packets_then_close():
    session = polling_session()
    session.on_poll(1.0)
    session.outbox.append(pk.event_packet("reconnect", {"reason": "drain", "after_ms": 500}) + pk.PACKET_END)
    effects = session.close(2.0, "drain", 1012)
    assert effects == [AnswerPoll(ok(b'42["reconnect",{"reason":"drain","after_ms":500}]\x1e1')),
                       Closed("drain", 1012), Released()]
    assert session.close(3.0) == []                   # once only
    assert session.queue(b"42[\"late\"]", 3.0) == []


def test_server_close_without_a_parked_poll_releases_the_sid():
    session = polling_session()
    assert session.close(2.0, "expired", 1008) == [Closed("expired", 1008), Released()]
    assert error_of(session.on_poll(2.1)[0]) == error(eio.UNKNOWN_SID)


# -- heartbeat -----------------------------------------------------------------

def test_server_pings_every_interval_and_a_pong_reschedules():
    session = polling_session(now=0.0)
    assert session.next_deadline() == 25.0
    assert session.on_poll(1.0) == [Park()]
    assert session.tick(24.9) == []
    assert session.tick(25.0) == [AnswerPoll(ok(b"2"))]
    assert session.next_deadline() == 45.0            # the pong deadline
    assert session.on_post(b"3", 30.0) == [Reply(eio.OK_RESPONSE)]
    assert session.next_deadline() == 55.0            # interval counted from the pong
    assert session.tick(54.0) == []
    assert session.on_poll(54.5) == [Park()]
    assert session.tick(55.0) == [AnswerPoll(ok(b"2"))]


def test_other_traffic_does_not_replace_the_pong():
    session = polling_session(now=0.0)
    session.tick(25.0)
    session.on_post(b'42["x"]', 30.0)
    assert session.on_poll(31.0) == [Reply(ok(b"2"))]
    assert session.on_poll(31.1) == [Park()]
    assert session.tick(44.9) == []
    assert session.tick(45.0) == [AnswerPoll(ok(b"1")), Closed("ping timeout", 1011), Released()]
    assert session.next_deadline() is None


def test_ping_timeout_without_a_parked_poll_makes_the_sid_unknown():
    # test-suite "closes the session upon ping timeout" (polling): the next GET is a 400
    session = polling_session(now=0.0)
    session.tick(25.0)
    assert session.tick(45.0) == [Closed("ping timeout", 1011), Released()]
    assert error_of(session.on_poll(45.1)[0]) == error(eio.UNKNOWN_SID)


def test_ping_from_the_client_is_the_wrong_direction():
    session = polling_session()
    effects = session.on_post(b"2", 1.0)
    assert [type(e) for e in effects] == [Closed, Released, Reply]
    assert effects[0].code == 1008 and "ping" in effects[0].reason


# -- WebSocket -----------------------------------------------------------------

def test_websocket_messages_pongs_and_close():
    session = websocket_session()
    assert session.on_ws_message('42["subscribe",{"channel":"bill:1"}]', 1.0) == \
        [Message('2["subscribe",{"channel":"bill:1"}]')]
    assert session.tick(25.0) == []                   # the ping is in the outbox for the caller's flush
    assert session.outbox.take() == b"2\n"
    assert session.on_ws_message("3", 26.0) == []
    assert session.next_deadline() == 51.0
    assert session.on_ws_message("6", 27.0) == []     # a noop is nothing
    assert session.on_ws_message("1", 28.0) == [Closed("client close", 1000), Released()]
    assert session.on_ws_message('42["x"]', 29.0) == []


@pytest.mark.parametrize("message, code, reason", [
    (b"\x01\x02", 1003, "binary messages are not supported"),
    ("abc", 1008, "unknown Engine.IO packet type 'a'"),
    ("", 1008, "empty Engine.IO packet"),
    ("bAQID", 1008, "binary (base64) Engine.IO packets are not supported"),
    ("2", 1008, "ping from the client (Engine.IO 4: the server pings)"),
    ("4" + "x" * CONFIG.max_payload, 1009, "message too large"),
])
def test_websocket_protocol_errors_end_the_session(message, code, reason):
    session = websocket_session()
    assert session.on_ws_message(message, 1.0) == [Closed(reason, code), Released()]


def test_websocket_ping_timeout_and_transport_close():
    session = websocket_session()
    session.tick(25.0)
    assert session.tick(45.0) == [Closed("ping timeout", 1011), Released()]
    session = websocket_session()
    assert session.on_transport_closed(1.0) == [Closed("transport close", 1006), Released()]
    assert session.on_transport_closed(1.0) == []


def test_websocket_session_refuses_polling_requests_and_probes():
    session = websocket_session()
    assert error_of(session.on_poll(1.0)[0]) == error(eio.BAD_REQUEST)
    assert error_of(session.on_post(b"4x", 1.0)[0]) == error(eio.BAD_REQUEST)
    assert error_of(session.on_probe_open(1.0)[0]) == error(eio.BAD_REQUEST)
    assert session.open


# -- upgrade -------------------------------------------------------------------

def test_upgrade_from_polling_to_websocket():
    session = polling_session()
    assert session.on_poll(1.0) == [Park()]
    assert session.on_probe_open(1.1) == []
    assert session.on_probe_message("2probe", 1.2) == [ProbeSend(b"3probe"), AnswerPoll(ok(b"6"))]
    assert session.on_poll(1.25) == [Reply(ok(b"6"))]  # polling is over while upgrading
    session.queue(pk.event_packet("hello"), 1.3)        # waits for the new transport
    assert session.on_probe_message("5", 1.4) == [Upgraded()]
    assert session.transport == eio.WEBSOCKET
    assert pk.split_pending(session.outbox.take()) == [b'42["hello"]']
    assert session.on_ws_message("4hello", 1.5) == [Message("hello")]
    # test-suite "ignores HTTP requests with same sid after upgrade"
    assert error_of(session.on_poll(1.6)[0]) == error(eio.BAD_REQUEST)
    # "ignores WebSocket connection with same sid after upgrade"
    assert error_of(session.on_probe_open(1.7)[0]) == error(eio.BAD_REQUEST)
    assert session.open


def test_upgrade_packet_right_after_the_probe_answers_a_parked_poll():
    session = polling_session()
    session.on_probe_open(1.0)
    session.on_probe_message("2probe", 1.1)
    session.on_poll(1.15)
    assert session.on_poll(1.2) == [Reply(ok(b"6"))]
    session2 = polling_session()
    session2.on_poll(1.0)
    session2.on_probe_open(1.0)
    assert session2.on_probe_message("5", 1.1) == [AnswerPoll(ok(b"6")), Upgraded()]


def test_second_probe_while_upgrading_is_refused():
    session = polling_session()
    session.on_probe_open(1.0)
    assert error_of(session.on_probe_open(1.1)[0]) == error(eio.BAD_REQUEST)


@pytest.mark.parametrize("message", ["4hello", "2", "3probe", "garbage", b"\x00", ""])
def test_a_bad_probe_fails_the_upgrade_and_polling_goes_on(message):
    session = polling_session()
    session.on_probe_open(1.0)
    assert session.on_probe_message(message, 1.1) == [ProbeClose()]
    assert session.transport == eio.POLLING and session.open
    assert session.on_probe_message("5", 1.2) == []     # that probe is over
    assert session.on_poll(1.3) == [Park()]
    assert session.on_probe_open(1.4) == []            # a new try is welcome


def test_upgrade_times_out():
    session = polling_session()
    session.on_probe_open(1.0)
    session.on_probe_message("2probe", 1.1)
    assert session.next_deadline() == 11.0
    assert session.tick(10.9) == []
    assert session.tick(11.0) == [ProbeClose()]
    assert session.on_poll(11.1) == [Park()]            # back to polling


def test_probe_closed_by_the_client_leaves_polling():
    session = polling_session()
    session.on_probe_open(1.0)
    session.on_probe_message("2probe", 1.1)
    assert session.on_probe_closed(1.2) == []
    assert session.on_poll(1.3) == [Park()]


def test_session_end_during_upgrade_closes_the_probe_too():
    session = polling_session()
    session.on_probe_open(1.0)
    assert session.close(2.0, "drain", 1012) == [ProbeClose(), Closed("drain", 1012), Released()]


# -- slow consumers ------------------------------------------------------------

def test_outbox_overflow_is_a_slow_consumer():
    session = polling_session(capacity=256)
    session.on_poll(1.0)
    effects = session.queue(b"4" + b"x" * 300, 2.0)
    assert effects == [AnswerPoll(ok(b"1")), Closed("slow consumer", 1013), Released()]


def test_overflowing_ping_on_websocket_is_a_slow_consumer():
    session = eio.EngineSession(eio.new_sid(0), eio.WEBSOCKET, CONFIG, eio.LineOutbox(256), 0.0)
    session.outbox.append(b"x" * (256 - len(session.outbox)))
    assert session.tick(25.0) == [Closed("slow consumer", 1013), Released()]


def test_config_is_checked():
    for bad in ({"ping_interval": 0}, {"ping_timeout": -1}, {"max_payload": 0}, {"upgrade_timeout": 0}):
        with pytest.raises(ValueError):
            eio.EngineConfig(**bad)


# -- any sequence --------------------------------------------------------------

_client_text = st.one_of(
    st.sampled_from(["2probe", "5", "3", "3probe", "1", "6", "4hi", '40{"token":"x"}', "2", "0", "b", ""]),
    st.text(max_size=12))
_operations = st.lists(st.one_of(
    st.tuples(st.just("poll")), st.tuples(st.just("abort")),
    st.tuples(st.just("post"), st.binary(max_size=20) | _client_text.map(str.encode)
              | st.lists(_client_text, min_size=1, max_size=3).map(lambda ps: "\x1e".join(ps).encode())),
    st.tuples(st.just("probe_open")), st.tuples(st.just("probe"), _client_text | st.binary(max_size=4)),
    st.tuples(st.just("probe_closed")), st.tuples(st.just("ws"), _client_text | st.binary(max_size=4)),
    st.tuples(st.just("ws_closed")), st.tuples(st.just("queue")), st.tuples(st.just("close")),
    st.tuples(st.just("advance"), st.floats(0, 30)),
), max_size=40)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(eio.TRANSPORTS), _operations)
def test_any_sequence_keeps_the_invariants(transport, operations):
    """Whatever the client does, in any order: no exception, at most one
    parked GET answered once, Closed then Released exactly once, nothing
    handed up after the end, every answer a valid polling body or error."""
    now = 0.0
    session = eio.EngineSession(eio.new_sid(1), transport, CONFIG, eio.LineOutbox(4096), now)
    parked = released = closed = False
    for op, *args in operations:
        if op == "advance":
            now += args[0]
            effects = session.tick(now)
        elif op == "poll":
            effects = session.on_poll(now)
        elif op == "abort":
            effects = session.on_poll_aborted(now)
            if effects:
                parked = False
        elif op == "post":
            effects = session.on_post(args[0], now)
        elif op == "probe_open":
            effects = session.on_probe_open(now)
        elif op == "probe":
            effects = session.on_probe_message(args[0], now)
        elif op == "probe_closed":
            effects = session.on_probe_closed(now)
        elif op == "ws":
            effects = session.on_ws_message(args[0], now)
        elif op == "ws_closed":
            effects = session.on_transport_closed(now)
        elif op == "queue":
            effects = session.queue(pk.event_packet("e", 1), now)
        else:
            effects = session.close(now, "server", 1000)
        for effect in effects:
            if isinstance(effect, Park):
                assert not parked and not closed
                parked = True
            elif isinstance(effect, AnswerPoll):
                assert parked
                parked = False
                assert effect.response.status == 200
                pk.decode_payload(effect.response.body)
            elif isinstance(effect, Reply):
                if effect.response.status == 200 and effect.response.body != b"ok":
                    pk.decode_payload(effect.response.body)
                else:
                    assert effect.response.status in (200, 400, 413)
            elif isinstance(effect, Message):
                assert not closed
            elif isinstance(effect, Closed):
                assert not closed
                closed = True
            elif isinstance(effect, Released):
                assert closed and not released
                released = True
        assert session.open == (not closed)
        assert released == closed
        if closed:
            assert not session.parked
        assert session.parked == parked
        if session.open:
            assert session.next_deadline() is not None

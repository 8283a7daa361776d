"""The native protocol's text layer, bytes in and bytes out (no sockets)."""
import json

import pytest
from hypothesis import given, strategies as st

from broker.auth import Identity
from broker.channels import check_client_publish, check_subscribe, validate_channel
from broker.config import Config, Namespace
from broker.errors import ProtocolViolation
from broker.adapters.native.protocol import (BadCommandBudget, Command, error_line, parse_message, pub_line, reply_line)
from broker.jsoncodec import encode_json


def test_parse_batched_commands_keeps_order_and_marks_bad_lines():
    text = "\n".join([
        '{"id":1,"op":"subscribe","channel":"bill:1","recover":{"epoch":"e","offset":3}}',
        "nonsense",
        '{"id":2,"op":"fly"}',
        '{"id":3,"op":"publish","channel":"room:1","data":{"b":[1,2]}}',
        '{"op":"ping"}',
    ])
    items = parse_message(text)
    assert items[0] == Command("subscribe", 1, "bill:1", None, ("e", 3))
    assert isinstance(items[1], ProtocolViolation) and items[1].code == 400
    assert isinstance(items[2], ProtocolViolation) and items[2].command_id == 2
    assert items[3].data_json == b'{"b":[1,2]}'
    assert items[4] == Command("ping")


@pytest.mark.parametrize("line", [
    '{"id":"1","op":"ping"}', '{"id":true,"op":"ping"}', '[1]', '{"op":"subscribe"}',
    '{"op":"subscribe","channel":"no-namespace"}', '{"op":"publish","channel":"a:b"}',
    '{"op":"subscribe","channel":"a:b","recover":{"epoch":1,"offset":0}}',
    '{"op":"subscribe","channel":"a:b","recover":{"epoch":"e","offset":-1}}',
    '{"op":"publish","channel":"a:b","data":NaN}', '[' * 100000,
])
def test_malformed_commands_are_400(line):
    (item,) = parse_message(line)
    assert isinstance(item, ProtocolViolation) and item.code == 400


def test_lines_encode_compactly_with_one_trailing_newline():
    assert reply_line(4, "published", channel="room:7", offset=21) == \
        b'{"id":4,"op":"published","channel":"room:7","offset":21}\n'
    assert error_line(None, 409, "already") == b'{"op":"error","code":409,"message":"already"}\n'
    assert pub_line("bill:42", 18, b'{"a":"\xc3\xa9"}') == \
        b'{"op":"pub","channel":"bill:42","offset":18,"data":{"a":"\xc3\xa9"}}\n'


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner), max_leaves=20))
def test_encoded_data_round_trips_and_has_no_raw_newline(value):
    encoded = encode_json(value)
    assert b"\n" not in encoded
    assert json.loads(pub_line("bill:1", 1, encoded))["data"] == value


def test_bad_command_budget_slides():
    budget = BadCommandBudget(3, 10.0)
    assert [budget.spend(t) for t in (0, 1, 2)] == [False, False, False]
    assert budget.spend(3) is True
    assert budget.spend(20) is False  # the old ones left the window


@pytest.mark.parametrize("name", ["bill:1", "user:a-b_c.d@e", "x:", "room:1:2"])
def test_valid_channel_names(name):
    assert validate_channel(name) == name


@pytest.mark.parametrize("name", ["", "nocolon", "bill:a b", "bill:é", ":x", "a" * 250 + ":" + "b" * 10, 5])
def test_invalid_channel_names(name):
    with pytest.raises(ProtocolViolation):
        validate_channel(name)


def test_namespace_permissions():
    config = Config()
    config.namespaces["room"] = Namespace("room", subscribe="authenticated", client_publish=True)
    anon = Identity(None, frozenset(), True)
    alice = Identity("alice")
    guest = Identity("guest", frozenset({"user:alice"}))
    codes = {}
    for who, identity in (("anon", anon), ("alice", alice), ("guest", guest)):
        for channel in ("bill:1", "user:alice", "room:1", "zzz:1"):
            try:
                check_subscribe(config, identity, channel)
                codes[who, channel] = 200
            except ProtocolViolation as exc:
                codes[who, channel] = exc.code
    assert codes == {
        ("anon", "bill:1"): 200, ("anon", "user:alice"): 401, ("anon", "room:1"): 401, ("anon", "zzz:1"): 404,
        ("alice", "bill:1"): 200, ("alice", "user:alice"): 200, ("alice", "room:1"): 200, ("alice", "zzz:1"): 404,
        ("guest", "bill:1"): 200, ("guest", "user:alice"): 200, ("guest", "room:1"): 200, ("guest", "zzz:1"): 404,
    }
    check_client_publish(config, alice, "room:1")
    with pytest.raises(ProtocolViolation) as denied:
        check_client_publish(config, alice, "bill:1")
    assert denied.value.code == 403

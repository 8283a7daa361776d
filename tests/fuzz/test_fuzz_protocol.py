"""Fuzz the native protocol's text layer (broker.adapters.native.protocol.parse_message):
whatever a client sends, each non-blank line becomes one Command or one
ProtocolViolation(400) in order, and nothing else is ever raised."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.channels import validate_channel
from broker.errors import ProtocolViolation
from broker.adapters.native.protocol import OPS, Command, parse_message
from broker.jsoncodec import decode_json

from .conftest import FUZZ_PROFILE, examples
from .strategies import JSON, commands

settings.load_profile(FUZZ_PROFILE)


def _check(items: list, text: str) -> None:
    lines = [line for line in text.split("\n") if line.strip()]
    assert len(items) == len(lines)
    for item in items:
        if isinstance(item, ProtocolViolation):
            assert item.code in (400, 404)
            continue
        assert isinstance(item, Command) and item.op in OPS
        assert item.id is None or type(item.id) is int
        if item.op != "ping":
            assert validate_channel(item.channel) == item.channel
        if item.op == "publish":
            decode_json(item.data_json)  # stored data is valid JSON
            assert b"\n" not in item.data_json  # compact: one line on the wire


@settings(max_examples=examples(300))
@given(st.text())
def test_any_text_parses_without_raising(text):
    _check(parse_message(text), text)


@settings(max_examples=examples(100))
@given(st.lists(commands(), min_size=1, max_size=6))
def test_commands_field_by_field(objs):
    text = "\n".join(json.dumps(obj) for obj in objs)
    items = parse_message(text)
    _check(items, text)
    for obj, item in zip(objs, items, strict=False):
        if isinstance(item, Command):
            if item.op == "publish":
                assert decode_json(item.data_json) == obj["data"]
            if "id" in obj and obj["id"] is not None:
                assert item.id == obj["id"]


@settings(max_examples=examples(100))
@given(JSON)
def test_publish_data_round_trips(data):
    items = parse_message(json.dumps({"id": 1, "op": "publish", "channel": "room:1", "data": data}))
    assert isinstance(items[0], Command) and decode_json(items[0].data_json) == data


@settings(max_examples=examples(200))
@given(st.binary(max_size=200))
def test_any_utf8_decodable_bytes(raw):
    text = raw.decode("utf-8", "replace")
    _check(parse_message(text), text)


@pytest.mark.parametrize("text", ['{"op":[]}', '{"op":{}}', '{"id":1,"op":["ping"]}'])
def test_regression_unhashable_op(text):
    items = parse_message(text)
    assert isinstance(items[0], ProtocolViolation) and items[0].code == 400

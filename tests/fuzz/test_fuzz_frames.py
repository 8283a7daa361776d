"""Fuzz the frame layer as the broker configures it (websockets' Sans-I/O
Protocol in state OPEN, its max_size, permessage-deflate without context
takeover, the connection's reassembly and UTF-8 check; see
broker.testing.inbound_pipeline): any bytes, split anywhere, never raise,
and a close carries one of the codes PROTOCOL.md §1 names."""
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.adapters.native.protocol import parse_message
from broker.testing import inbound_pipeline

from .conftest import FUZZ_PROFILE, examples
from .strategies import chunked, commands, fragmented, frames

settings.load_profile(FUZZ_PROFILE)

CLOSE_CODES = {None, 1000, 1002, 1003, 1007, 1009}
LIMIT = 4096


def _same(a, b) -> bool:
    return [repr(x) for x in a] == [repr(x) for x in b]


@settings(max_examples=examples(300))
@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=8), st.booleans())
def test_any_bytes_split_anywhere(data, cuts, compression):
    result = inbound_pipeline(chunked(data, cuts), max_size=LIMIT, compression=compression)
    assert result.echoed or result.close_code in CLOSE_CODES


@settings(max_examples=examples(100))
@given(st.lists(frames(), min_size=1, max_size=8), st.lists(st.integers(0, 5000), max_size=8), st.booleans())
def test_any_frame_sequence(sequence, cuts, compression):
    data = b"".join(sequence)
    result = inbound_pipeline(chunked(data, cuts), max_size=LIMIT, compression=compression)
    assert result.echoed or result.close_code in CLOSE_CODES


@settings(max_examples=examples(80))
@given(st.data(), st.lists(commands(), min_size=1, max_size=5), st.lists(st.integers(0, 5000), max_size=8))
def test_valid_messages_arrive_whole_however_fragmented_and_split(data, objs, cuts):
    text = "\n".join(json.dumps(obj) for obj in objs)
    payload = text.encode()
    wire = data.draw(fragmented(payload))
    result = inbound_pipeline(chunked(wire, cuts), max_size=1 << 20)
    assert result.close_code is None
    assert _same(result.commands, parse_message(text))


@settings(max_examples=examples(200))
@given(st.data(), st.text(max_size=300), st.integers(0, 10_000), st.integers(0, 255))
def test_one_flipped_byte_never_raises(data, text, where, value):
    wire = bytearray(data.draw(fragmented(text.encode())))
    wire[where % len(wire)] = value
    result = inbound_pipeline([bytes(wire)], max_size=LIMIT)
    assert result.echoed or result.close_code in CLOSE_CODES


@settings(max_examples=examples(100))
@given(st.integers(LIMIT + 1, 200_000), st.lists(st.integers(0, 10_000), max_size=4))
def test_a_deflate_bomb_is_1009(size, cuts):
    import zlib

    from .strategies import client_frame

    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = (compressor.compress(b"x" * size) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]
    wire = client_frame(0x1, body, rsv=4)
    assert inbound_pipeline(chunked(wire, cuts), max_size=LIMIT, compression=True).close_code == 1009


def test_regression_a_client_close_with_an_application_code_is_echoed():
    """Found by tools/fuzz_commands.py (crash-542d905...): a client close
    with code 4096 is answered with 4096; that is RFC 6455 §5.5.1, not an
    error, so the fuzz properties accept an echo of any valid client code."""
    import struct

    from .strategies import client_frame

    result = inbound_pipeline([client_frame(0x8, struct.pack("!H", 4096))], max_size=LIMIT)
    assert (result.close_code, result.echoed) == (4096, True)

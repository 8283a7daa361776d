"""WebSocket frames and permessage-deflate, compiled and pure (the ``frames``
fixture); frames are checked with websockets' own parser, as a client would
read them."""
from __future__ import annotations

import json
import os
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from broker._fastpath import load

FIXTURE_SETTINGS = settings(
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    deadline=None,
    max_examples=60,
)
SYNC_TAIL = b"\x00\x00\xff\xff"


def parse(data: bytes, *, compressed: bool = False) -> Frame:
    """One server frame parsed by websockets (a client: unmasked frames)."""
    extensions = []
    if compressed:
        extensions.append(PerMessageDeflate(
            remote_no_context_takeover=True, local_no_context_takeover=False,
            remote_max_window_bits=15, local_max_window_bits=15,
        ))
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=False, extensions=extensions)
    with pytest.raises(StopIteration) as stop:
        next(parser)
    assert reader.at_eof(), "bytes left after the frame"
    return stop.value.value


def inflate(data: bytes) -> bytes:
    return zlib.decompressobj(-15).decompress(data + SYNC_TAIL)


def decode_header(data: bytes) -> tuple[int, int, int]:
    """(first byte, payload length, header size), checking minimal encoding."""
    b0, b1 = data[0], data[1]
    assert not b1 & 0x80, "server frames are unmasked"
    n = b1 & 0x7F
    if n < 126:
        return b0, n, 2
    if n == 126:
        (length,) = struct.unpack("!H", data[2:4])
        assert length >= 126
        return b0, length, 4
    (length,) = struct.unpack("!Q", data[2:10])
    assert 65536 <= length < 2**63
    return b0, length, 10


# --------------------------------------------------------------------------
# headers and frames


def test_opcodes(frames):
    assert (frames.OP_CONT, frames.OP_TEXT, frames.OP_BINARY) == (0, 1, 2)
    assert (frames.OP_CLOSE, frames.OP_PING, frames.OP_PONG) == (8, 9, 10)


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 2**20, 2**32, 2**63 - 1])
def test_frame_header_lengths(frames, length):
    header = frames.frame_header(length)
    b0, parsed, size = decode_header(header)
    assert (b0, parsed, size) == (0x81, length, len(header))
    assert size == (2 if length < 126 else 4 if length < 65536 else 10)


@pytest.mark.parametrize("length", [0, 125, 126, 65535, 65536, 2**20])
def test_frames_parse_with_websockets(frames, length):
    payload = (b"0123456789abcdef" * (length // 16 + 1))[:length]
    frame = parse(frames.frame_header(length) + payload)
    assert frame.opcode is Opcode.TEXT and frame.fin and not frame.rsv1
    assert frame.data == payload
    assert parse(frames.text_frame(payload)).data == payload


def test_frame_header_bits(frames):
    assert frames.frame_header(3, frames.OP_BINARY) == b"\x82\x03"
    assert frames.frame_header(3, fin=False) == b"\x01\x03"
    assert frames.frame_header(3, frames.OP_CONT, fin=True) == b"\x80\x03"
    assert frames.frame_header(3, rsv1=True) == b"\xc1\x03"
    assert frames.frame_header(2, frames.OP_CLOSE) == b"\x88\x02"
    assert frames.frame_header(0, frames.OP_PING) == b"\x89\x00"
    assert frames.frame_header(125, frames.OP_PONG) == b"\x8a\x7d"
    assert frames.frame_header(300, frames.OP_TEXT, True, True) == b"\xc1\x7e\x01\x2c"
    frame = parse(frames.frame_header(2, frames.OP_CLOSE) + b"\x03\xe8")
    assert frame.opcode is Opcode.CLOSE and frame.data == b"\x03\xe8"


def test_frame_header_errors(frames):
    for args in ((-1,), (2**63,), (5, 3), (5, 11), (5, 16), (5, -1),
                 (126, frames.OP_PING), (1, frames.OP_CLOSE, False),
                 (1, frames.OP_PONG, True, True)):
        with pytest.raises(ValueError):
            frames.frame_header(*args)
    for args in ((1.0,), ("5",), (5, 1.0)):
        with pytest.raises(TypeError):
            frames.frame_header(*args)


def test_text_frame(frames):
    assert frames.text_frame(b"") == b"\x81\x00"
    assert frames.text_frame(b"hi") == b"\x81\x02hi"
    assert frames.text_frame(bytearray(b"hi")) == b"\x81\x02hi"
    assert frames.text_frame(memoryview(b"xhi")[1:]) == b"\x81\x02hi"
    assert frames.text_frame(b"hi", rsv1=True) == b"\xc1\x02hi"
    with pytest.raises(TypeError):
        frames.text_frame("hi")


@FIXTURE_SETTINGS
@given(payload=st.text(max_size=300).map(lambda s: s.encode()))
def test_text_frame_round_trip(frames, payload):
    frame = parse(frames.text_frame(payload))
    assert frame.opcode is Opcode.TEXT and frame.fin
    assert frame.data == payload


def test_ndjson_batch(frames):
    assert frames.ndjson_batch([b'{"a":1}']) == b'{"a":1}'
    assert frames.ndjson_batch([b"a", bytearray(b"b"), memoryview(b"c")]) == b"a\nb\nc"
    assert frames.ndjson_batch(line for line in [b"x", b"y"]) == b"x\ny"
    assert frames.ndjson_batch((b"x", b"")) == b"x\n"
    with pytest.raises(ValueError):
        frames.ndjson_batch([])
    with pytest.raises(ValueError):
        frames.ndjson_batch(iter([]))
    with pytest.raises(ValueError):
        frames.ndjson_batch([b"a", b"b\nc"])
    with pytest.raises(ValueError):
        frames.ndjson_batch([b"\n"])
    with pytest.raises(TypeError):
        frames.ndjson_batch(["text"])


@FIXTURE_SETTINGS
@given(lines=st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")), min_size=1))
def test_ndjson_batch_matches_join(frames, lines):
    assert frames.ndjson_batch(lines) == b"\n".join(lines)


def parse_all(data: bytes, count: int) -> list[Frame]:
    """``count`` server frames from ``data``, parsed by websockets as a client
    would; the data must hold exactly those."""
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    frames = []
    for _ in range(count):
        with pytest.raises(StopIteration) as stop:
            next(Frame.parse(reader.read_exact, mask=False))
        frames.append(stop.value.value)
    with pytest.raises(StopIteration) as stop:
        next(reader.at_eof())
    assert stop.value.value is True
    return frames


def test_batch_frame_strips_exactly_the_last_newline(frames):
    assert frames.batch_frame(b"a\n") == b"\x81\x01a"
    assert frames.batch_frame(b"\n") == b"\x81\x00"
    assert frames.batch_frame(b"a\n\n") == b"\x81\x02a\n"
    assert frames.batch_frame(bytearray(b'{"a":1}\n{"b":2}\n')) == b'\x81\x0f{"a":1}\n{"b":2}'
    for bad in (b"", b"a", b"a\nb"):
        with pytest.raises(ValueError):
            frames.batch_frame(bad)
    big = b"x" * 70000 + b"\n"
    frame = parse(frames.batch_frame(big))
    assert frame.data == big[:-1]


# --------------------------------------------------------------------------
# Deflater


def test_deflater_arguments(frames):
    d = frames.Deflater()
    assert (d.level, d.window_bits) == (6, 15)
    assert frames.Deflater(1, 8).window_bits == 9  # zlib has no raw 8-bit window
    for level, bits in ((10, 15), (-2, 15), (6, 7), (6, 16)):
        with pytest.raises(ValueError):
            frames.Deflater(level, bits)
    with pytest.raises(TypeError):
        frames.Deflater().compress("text")


def test_deflater_empty_and_independent_messages(frames):
    d = frames.Deflater()
    assert d.compress(b"") == b"\x00"  # RFC 7692 §7.2.3.6
    first = d.compress(b'{"op":"pub","data":1}')
    d.compress(b'{"op":"pub","data":1}' * 50)
    assert d.compress(b'{"op":"pub","data":1}') == first  # no context takeover
    assert not first.endswith(SYNC_TAIL)
    assert inflate(first) == b'{"op":"pub","data":1}'


_payloads = st.one_of(
    st.binary(max_size=3000),
    st.lists(st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=20),
                             max_size=5), max_size=30).map(
        lambda items: "\n".join(json.dumps(i) for i in items).encode()),
)


@FIXTURE_SETTINGS
@given(payload=_payloads, level=st.integers(-1, 9), window_bits=st.integers(8, 15))
def test_deflater_round_trip(frames, payload, level, window_bits):
    d = frames.Deflater(level, window_bits)
    out = d.compress(payload)
    assert zlib.decompressobj(-max(window_bits, 9)).decompress(out + SYNC_TAIL) == payload
    assert inflate(out) == payload


@settings(deadline=None, max_examples=60)
@given(payload=_payloads, level=st.integers(-1, 9), window_bits=st.integers(8, 15))
def test_deflater_compiled_and_pure_byte_identical(payload, level, window_bits):
    outs = [load("frames", impl).Deflater(level, window_bits).compress(payload)
            for impl in ("compiled", "pure")]
    assert outs[0] == outs[1]


@pytest.mark.parametrize("level", [0, 1, 6, 9])
def test_deflater_large_payloads_identical(level):
    rng_bytes = os.urandom(70_000)
    text = json.dumps([{"seq": i, "v": "x" * (i % 50)} for i in range(4000)]).encode()
    for payload in (rng_bytes, text, rng_bytes + text):
        outs = [load("frames", impl).Deflater(level).compress(payload)
                for impl in ("compiled", "pure")]
        assert outs[0] == outs[1]
        assert inflate(outs[0]) == payload


def test_compressed_frame_decodes_in_websockets(frames):
    payload = b"\n".join(json.dumps({"op": "pub", "ch": "news", "o": i}).encode()
                         for i in range(200))
    data = frames.text_frame(frames.Deflater().compress(payload), rsv1=True)
    frame = parse(data, compressed=True)
    assert frame.opcode is Opcode.TEXT and frame.fin and not frame.rsv1
    assert frame.data == payload
    shared = frames.SharedFrames(frames.Deflater(9, 12))
    frame = parse(shared.batch_frame(payload + b"\n", True), compressed=True)
    assert frame.data == payload


# --------------------------------------------------------------------------
# SharedFrames


def test_shared_frames_cache(frames):
    shared = frames.SharedFrames(frames.Deflater())
    pending = b'{"op":"pub","data":[1,2,3]}\n' * 20
    first = shared.batch_frame(pending, True)
    for _ in range(1000):
        assert shared.batch_frame(pending, True) is first
    assert shared.compressions == 1
    # an equal batch from another connection (a different bytes object) hits too
    assert shared.batch_frame(bytes(bytearray(pending)), True) is first
    assert parse(first, compressed=True).data == pending[:-1]
    plain = shared.batch_frame(pending, False)
    assert plain == frames.batch_frame(pending)
    assert shared.batch_frame(pending, False) is plain
    assert shared.compressions == 1
    shared.clear()
    again = shared.batch_frame(pending, True)
    assert again == first and again is not first
    assert shared.compressions == 2
    shared.batch_frame(b"other\n", True)
    assert shared.compressions == 3


def test_shared_frames_errors(frames):
    shared = frames.SharedFrames(None)
    assert shared.batch_frame(b"a\n", False) == b"\x81\x01a"
    with pytest.raises(ValueError):
        shared.batch_frame(b"a\n", True)
    shared = frames.SharedFrames(frames.Deflater())
    for bad in (b"", b"no newline"):
        with pytest.raises(ValueError):
            shared.batch_frame(bad, True)
    assert shared.compressions == 0
    with pytest.raises(TypeError):
        shared.batch_frame(bytearray(b"a\n"), False)  # the cache key must be hashable


def test_shared_frames_with_the_other_deflater():
    compiled, pure = load("frames", "compiled"), load("frames", "pure")
    pending = b'{"x":1}\n{"y":2}\n'
    expected = compiled.SharedFrames(compiled.Deflater()).batch_frame(pending, True)
    for shared in (compiled.SharedFrames(pure.Deflater()), pure.SharedFrames(compiled.Deflater()),
                   pure.SharedFrames(pure.Deflater())):
        assert shared.batch_frame(pending, True) == expected
        assert shared.compressions == 1

"""OutboundTable framing kinds and compression: what flush writes is decoded
by a real WebSocket client (websockets, permessage-deflate negotiated), and
take_frames / take_payload give the same bytes to callers that write
themselves. Every test runs on both implementations (the ``ringbuf``
fixture); the property test checks they produce identical bytes."""
from __future__ import annotations

import random
import socket
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker._fastpath import load

from .wire import Peer, read_all

LINES = [b'{"op":"pub","channel":"bill:1","offset":%d,"data":{"text":"%s"}}' % (i, b"x" * i)
         for i in range(1, 6)]


@pytest.fixture
def peers():
    made: list[Peer] = []

    def make(**kwargs) -> Peer:
        peer = Peer(**kwargs)
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.close()


def table_with(ringbuf, peer: Peer, framing: int, cid: int = 1, capacity: int = 1 << 20):
    table = ringbuf.OutboundTable(capacity)
    table.open(cid, framing)
    table.set_framing(cid, framing, peer.window_bits)
    table.set_fd(cid, peer.fd)
    return table


def append_lines(table, cid: int, lines: list[bytes]) -> None:
    for line in lines:
        assert table.append(cid, line + b"\n")


# --------------------------------------------------------------------------
# Framing kinds on the wire


@pytest.mark.parametrize("window", [None, 15, 10, 9])
def test_native_is_one_frame_of_the_joined_lines(ringbuf, peers, window):
    peer = peers(compress=window is not None, server_max_window_bits=window)
    table = table_with(ringbuf, peer, ringbuf.FRAMING_NATIVE)
    append_lines(table, 1, LINES)
    assert table.flush() == ([], [])
    (frame,) = peer.frames()
    assert frame.data == b"\n".join(LINES)
    assert peer.raw[0] == (0xC1 if window else 0x81)  # FIN, RSV1 when compressed, text
    assert table.pending(1) == 0 and table.total_pending == 0
    assert table.frames_written == 1 and table.lines_written == len(LINES)
    assert table.bytes_written == len(peer.raw)
    assert table.compressions == (1 if window else 0)


@pytest.mark.parametrize("window", [None, 15, 9])
def test_eio_ws_is_one_frame_per_line(ringbuf, peers, window):
    peer = peers(compress=window is not None, server_max_window_bits=window)
    table = table_with(ringbuf, peer, ringbuf.FRAMING_EIO_WS)
    packets = [b'42["pub",{"channel":"bill:1","offset":%d}]' % i for i in range(3)] + [b""]
    append_lines(table, 1, packets)
    assert table.flush() == ([], [])
    assert peer.messages() == packets  # an empty line is an empty frame
    assert table.frames_written == 4 and table.lines_written == 4
    assert table.batch_histogram()[1] == 4
    assert table.bytes_written == len(peer.raw)
    assert table.compressions == (4 if window else 0)


def test_a_large_compressed_message_respects_a_small_window(ringbuf, peers):
    # The client inflates with the 512-byte window it asked for: a frame
    # compressed with a larger window would not decode.
    peer = peers(compress=True, server_max_window_bits=9)
    table = table_with(ringbuf, peer, ringbuf.FRAMING_NATIVE)
    rng = random.Random(5)
    # Repeats 2,100 bytes apart: a 32 KiB window would refer back to them.
    blocks = [bytes(rng.choice(b"abcdefghijklmnop") for _ in range(700)) for _ in range(3)]
    lines = blocks * 5
    append_lines(table, 1, lines)
    assert table.flush() == ([], [])
    assert peer.messages() == [b"\n".join(lines)]
    # websockets inflates a message in one call, where the output itself is
    # history and the window is never checked; inflating 256 bytes at a time
    # checks it (zlib: "invalid distance too far back").
    assert strict_inflate(frame_payload(peer.raw), 9) == b"\n".join(lines)


def frame_payload(frame: bytes) -> bytes:
    length, start = frame[1] & 0x7F, 2
    if length == 126:
        length, start = int.from_bytes(frame[2:4], "big"), 4
    elif length == 127:
        length, start = int.from_bytes(frame[2:10], "big"), 10
    assert len(frame) == start + length
    return frame[start:]


def strict_inflate(payload: bytes, window_bits: int) -> bytes:
    inflater = zlib.decompressobj(-window_bits)
    out = inflater.decompress(payload + b"\x00\x00\xff\xff", 256)
    while inflater.unconsumed_tail:
        out += inflater.decompress(inflater.unconsumed_tail, 256)
    return out


def test_polling_is_always_deferred_and_taken_as_a_payload(ringbuf, peers):
    peer = peers()
    table = table_with(ringbuf, peer, ringbuf.FRAMING_POLLING)
    append_lines(table, 1, [b"4hello", b"42[\"pub\",1]"])
    assert table.flush() == ([1], [])  # even with an fd
    assert read_all(peer.client_sock) == b""
    with pytest.raises(ValueError):
        table.take_frames(1)
    assert table.take_payload(1) == b'4hello\x1e42["pub",1]'
    assert table.pending(1) == 0 and table.total_pending == 0
    assert table.frames_written == 1 and table.lines_written == 2
    assert table.bytes_written == len(b'4hello\x1e42["pub",1]')
    append_lines(table, 1, [b"a", b"", b"c"])
    assert table.take_payload(1, sep=b"--") == b"a----c"
    assert table.take_payload(1) == b""
    with pytest.raises(TypeError):
        table.take_payload(1, sep="x")


def test_compressed_connections_are_written_not_deferred(ringbuf, peers):
    plain, deflate = peers(), peers(compress=True)
    table = ringbuf.OutboundTable(1 << 16)
    for cid, peer in ((1, plain), (2, deflate)):
        table.open(cid)
        table.set_framing(cid, ringbuf.FRAMING_NATIVE, peer.window_bits)
        table.set_fd(cid, peer.fd)
    table.append_many([1, 2], LINES[0] + b"\n")
    assert table.flush() == ([], [])
    assert plain.messages() == deflate.messages() == [LINES[0]]
    assert plain.raw[0] == 0x81 and deflate.raw[0] == 0xC1


# --------------------------------------------------------------------------
# Shared compression


def test_one_compression_serves_every_connection(ringbuf, peers):
    clients = [peers(compress=True) for _ in range(40)]
    small = [peers(compress=True, server_max_window_bits=10) for _ in range(5)]
    table = ringbuf.OutboundTable(1 << 16)
    for cid, peer in enumerate(clients + small):
        table.open(cid, ringbuf.FRAMING_EIO_WS if cid % 2 else ringbuf.FRAMING_NATIVE)
        table.set_framing(cid, table.framing_of(cid)[0], peer.window_bits)
        table.set_fd(cid, peer.fd)
    table.append_many(list(range(45)), LINES[2] + b"\n")
    assert table.flush() == ([], [])
    # One message, two windows (15 and 10): two compressions for 45 connections,
    # whatever their framing (one line is the same message in both).
    assert table.compressions == 2
    for peer in clients + small:
        assert peer.messages() == [LINES[2]]
    assert table.frames_written == 45
    # The shared results live for one flush: the next one compresses again.
    table.append_many(list(range(40)), LINES[2] + b"\n")
    table.flush()
    assert table.compressions == 3


def test_lines_shared_between_batches_are_compressed_once(ringbuf, peers):
    a, b = peers(compress=True), peers(compress=True)
    table = ringbuf.OutboundTable(1 << 16)
    for cid, peer in ((1, a), (2, b)):
        table.open(cid, ringbuf.FRAMING_EIO_WS)
        table.set_framing(cid, ringbuf.FRAMING_EIO_WS, 15)
        table.set_fd(cid, peer.fd)
    append_lines(table, 1, [LINES[0], LINES[1]])
    append_lines(table, 2, [LINES[1], LINES[0], LINES[3]])
    table.flush()
    assert table.compressions == 3  # three distinct packets
    assert a.messages() == [LINES[0], LINES[1]]
    assert b.messages() == [LINES[1], LINES[0], LINES[3]]


def test_past_the_budget_a_compression_serves_one_write(ringbuf, peers):
    # Budget 0: nothing is kept, so every connection compresses its own
    # packets, and what is written still decodes (no entry outlives its write).
    clients = [peers(compress=True) for _ in range(4)]
    table = ringbuf.OutboundTable(1 << 16, shared_budget=0)
    for cid, peer in enumerate(clients):
        table.open(cid, ringbuf.FRAMING_EIO_WS)
        table.set_framing(cid, ringbuf.FRAMING_EIO_WS, 15)
        table.set_fd(cid, peer.fd)
        append_lines(table, cid, [LINES[0], LINES[1], LINES[0]])
    assert table.flush() == ([], [])
    assert table.compressions == 12
    for peer in clients:
        assert peer.messages() == [LINES[0], LINES[1], LINES[0]]
    # A budget that holds exactly the first message and its frame.
    table = ringbuf.OutboundTable(1 << 16, shared_budget=len(LINES[0]) + 80)
    for cid in range(4):
        table.open(cid, ringbuf.FRAMING_EIO_WS)
        table.set_framing(cid, ringbuf.FRAMING_EIO_WS, 15)
        append_lines(table, cid, [LINES[0], LINES[4]])
    frames = {table.take_frames(cid) for cid in range(4)}
    assert len(frames) == 1
    assert table.compressions == 1 + 4  # LINES[0] shared, LINES[4] past the budget
    with pytest.raises(ValueError):
        ringbuf.OutboundTable(10, shared_budget=-1)


def test_take_frames_share_compressions_until_the_next_flush(ringbuf):
    table = ringbuf.OutboundTable(1 << 16)
    for cid in range(10):  # no fd: TLS connections, written by the caller
        table.open(cid)
        table.set_framing(cid, ringbuf.FRAMING_NATIVE, 15)
    table.append_many(list(range(10)), LINES[0] + b"\n")
    deferred, tails = table.flush()
    assert sorted(deferred) == list(range(10)) and tails == []
    frames = {table.take_frames(cid) for cid in deferred}
    assert len(frames) == 1 and table.compressions == 1
    assert table.frames_written == 10


# --------------------------------------------------------------------------
# Changing framing, partial writes, failures


def test_framing_changes_mid_stream_keep_pending_lines(ringbuf, peers):
    peer = peers(compress=True)
    table = ringbuf.OutboundTable(1 << 16)
    table.open(1, ringbuf.FRAMING_POLLING)
    table.set_fd(1, peer.fd)
    append_lines(table, 1, [b"40", b'42["a"]'])
    assert table.flush() == ([1], [])  # polling: the long-poll would answer
    assert table.framing_of(1) == (ringbuf.FRAMING_POLLING, 0)
    # The session upgrades to WebSocket (compressed): pending packets go out
    # one per frame, in order, followed by new ones.
    table.set_framing(1, ringbuf.FRAMING_EIO_WS, 15)
    append_lines(table, 1, [b'42["b"]'])
    assert table.flush() == ([], [])
    assert peer.messages() == [b"40", b'42["a"]', b'42["b"]']
    table.set_framing(1, ringbuf.FRAMING_NATIVE, 0)
    append_lines(table, 1, [b"x", b"y"])
    table.set_framing(1, ringbuf.FRAMING_NATIVE, 12)
    append_lines(table, 1, [b"z"])
    table.flush()
    assert peer.messages() == [b"x\ny\nz"]
    assert table.framing_of(1) == (ringbuf.FRAMING_NATIVE, 12)


@pytest.mark.parametrize("framing", ["FRAMING_NATIVE", "FRAMING_EIO_WS"])
def test_partial_write_of_compressed_frames_returns_the_exact_rest(ringbuf, peers, framing):
    peer = peers(compress=True, sndbuf=4096)
    table = table_with(ringbuf, peer, getattr(ringbuf, framing), capacity=1 << 23)
    rng = random.Random(7)
    # Incompressible lines, so the compressed frames overrun the socket buffer.
    lines = [rng.randbytes(3000).hex().encode() for _ in range(400)]
    append_lines(table, 1, lines)
    deferred, tails = table.flush()
    assert deferred == []
    ((cid, rest),) = tails
    assert cid == 1 and rest
    expected = [b"\n".join(lines)] if framing == "FRAMING_NATIVE" else lines
    assert peer.messages(rest) == expected
    assert table.pending(1) == 0
    assert table.bytes_written == len(peer.raw)  # a partial frame counts as written


def test_paused_compressed_connection_stays_pending(ringbuf, peers):
    peer = peers(compress=True)
    table = table_with(ringbuf, peer, ringbuf.FRAMING_EIO_WS)
    table.set_paused(1, True)
    append_lines(table, 1, [b"a"])
    assert table.flush() == ([1], [])
    assert table.pending(1) == 2 and table.compressions == 0
    table.set_paused(1, False)
    append_lines(table, 1, [b"b"])
    assert table.flush() == ([], [])
    assert peer.messages() == [b"a", b"b"]


@pytest.mark.parametrize("window", [0, 15])
def test_a_broken_socket_is_reported(ringbuf, peers, window):
    peer = peers(compress=bool(window))
    table = table_with(ringbuf, peer, ringbuf.FRAMING_EIO_WS)
    peer.client_sock.close()
    append_lines(table, 1, [b"a", b"b"])
    assert table.flush() == ([], [(1, None)])
    assert table.pending(1) == 0 and table.frames_written == 0


def test_more_frames_than_one_writev_takes(ringbuf, peers):
    # 3,000 one-line frames are 6,000 iovecs: more than IOV_MAX in one call.
    peer = peers()
    table = table_with(ringbuf, peer, ringbuf.FRAMING_EIO_WS)
    packets = [b"%d" % i for i in range(3000)]
    append_lines(table, 1, packets)
    deferred, tails = table.flush()
    assert deferred == [] and tails == []
    assert peer.messages() == packets
    assert table.frames_written == 3000


# --------------------------------------------------------------------------
# take_frames is what flush writes


@pytest.mark.parametrize("framing", ["FRAMING_NATIVE", "FRAMING_EIO_WS"])
@pytest.mark.parametrize("window", [0, 9, 15])
def test_take_frames_equals_what_flush_writes(ringbuf, peers, framing, window):
    peer = peers()
    kind = getattr(ringbuf, framing)
    table = ringbuf.OutboundTable(1 << 20)
    for cid in (1, 2):
        table.open(cid, kind)
        table.set_framing(cid, kind, window)
    table.set_fd(1, peer.fd)
    lines = LINES + [b"", LINES[0] * 30]
    for cid in (1, 2):
        append_lines(table, cid, lines)
    assert table.flush() == ([2], [])
    written = read_all(peer.client_sock)
    counters = (table.frames_written, table.lines_written, table.bytes_written)
    taken = table.take_frames(2)
    assert taken == written
    assert (table.frames_written, table.lines_written, table.bytes_written) == (
        2 * counters[0], 2 * counters[1], 2 * counters[2])
    assert table.pending(2) == 0 and table.take_frames(2) == b""


def test_set_framing_checks_its_arguments(ringbuf):
    table = ringbuf.OutboundTable(1 << 10)
    with pytest.raises(ValueError):
        table.open(1, 3)
    assert not table.is_open(1)
    table.open(1)
    assert table.framing_of(1) == (ringbuf.FRAMING_NATIVE, 0)
    for framing, window in ((3, 0), (-1, 0), (ringbuf.FRAMING_NATIVE, 8),
                            (ringbuf.FRAMING_NATIVE, 16), (ringbuf.FRAMING_EIO_WS, -1),
                            (ringbuf.FRAMING_POLLING, 15)):
        with pytest.raises(ValueError):
            table.set_framing(1, framing, window)
    assert table.framing_of(1) == (ringbuf.FRAMING_NATIVE, 0)
    with pytest.raises(TypeError):
        table.set_framing(1, 1.0)
    for missing in (2, -1, 2**32):
        with pytest.raises(KeyError):
            table.set_framing(missing, ringbuf.FRAMING_NATIVE)
        with pytest.raises(KeyError):
            table.framing_of(missing)
        with pytest.raises(KeyError):
            table.take_frames(missing)
        with pytest.raises(KeyError):
            table.take_payload(missing)
    table.set_framing(1, ringbuf.FRAMING_EIO_WS, 11)
    table.close(1)
    table.open(1)  # a reopened id starts afresh
    assert table.framing_of(1) == (ringbuf.FRAMING_NATIVE, 0)
    with pytest.raises(ValueError):
        ringbuf.OutboundTable(10, deflate_level=10)


def test_framing_constants_are_exported():
    import broker._fastpath as fastpath

    assert (fastpath.FRAMING_NATIVE, fastpath.FRAMING_EIO_WS, fastpath.FRAMING_POLLING) == (0, 1, 2)
    for impl in ("compiled", "pure"):
        module = load("ringbuf", impl)
        assert (module.FRAMING_NATIVE, module.FRAMING_EIO_WS, module.FRAMING_POLLING) == (0, 1, 2)


# --------------------------------------------------------------------------
# Compiled and twin: identical bytes



def _random_line(seed: int, size: int, alphabet: bytes) -> bytes:
    rng = random.Random(seed)
    return bytes(rng.choice(alphabet) for _ in range(size))


# Hypothesis' own binaries are mostly short; seeded lines of up to 700
# bytes (some very compressible) and repeated lines (lines * 2) put matches
# further back than a small window reaches.
line_strategy = st.one_of(
    st.binary(max_size=40),
    st.builds(_random_line, st.integers(0, 2**16), st.integers(0, 700),
              st.sampled_from([b"ab", b"abcdefghijklmnop", bytes(range(256))])),
).map(lambda line: line.replace(b"\n", b" "))
lines_strategy = st.tuples(
    st.lists(line_strategy, min_size=1, max_size=8), st.sampled_from([1, 2]),
).map(lambda drawn: drawn[0] * drawn[1])


@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(st.tuples(lines_strategy,
                                  st.sampled_from([0, 1, 2]),
                                  st.sampled_from([0, 9, 12, 15])),
                        min_size=1, max_size=4),
       level=st.sampled_from([-1, 0, 1, 6, 9]),
       budget=st.sampled_from([0, 500, 1 << 22]))
def test_compiled_and_twin_write_identical_bytes(batches, level, budget):
    outputs = []
    for impl in ("compiled", "pure"):
        ringbuf = load("ringbuf", impl)
        table = ringbuf.OutboundTable(1 << 20, deflate_level=level, shared_budget=budget)
        a, b = socket.socketpair()
        a.setblocking(False)
        try:
            table.open(1)
            table.open(2)
            table.set_fd(1, a.fileno())
            out = []
            for lines, framing, window in batches:
                window = 0 if framing == ringbuf.FRAMING_POLLING else window
                for cid in (1, 2):
                    table.set_framing(cid, framing, window)
                    append_lines(table, cid, lines)
                deferred, tails = table.flush()
                assert tails == []
                if framing == ringbuf.FRAMING_POLLING:
                    out.append(table.take_payload(1))
                    out.append(table.take_payload(2, b","))
                else:
                    out.append(read_all(b))
                    out.append(table.take_frames(2))
                    assert out[-1] == out[-2]
            counters = (table.frames_written, table.lines_written, table.bytes_written,
                        table.compressions, table.batch_histogram())
            outputs.append((out, counters))
        finally:
            a.close()
            b.close()
    assert outputs[0] == outputs[1]

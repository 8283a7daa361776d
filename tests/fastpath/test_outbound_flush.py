"""OutboundTable.flush: one writev per dirty connection, on real sockets."""
import socket

import pytest
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader


def parse_frames(data: bytes) -> list[Frame]:
    reader = StreamReader()
    reader.feed_data(data)
    frames = []
    while True:
        parser = Frame.parse(reader.read_exact, mask=False)
        try:
            next(parser)
        except StopIteration as done:
            frames.append(done.value)
            continue
        return frames


def read_all(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    out = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    yield a, b
    a.close()
    b.close()


def test_dirty_connections_get_one_frame_each(ringbuf, pair):
    a, b = pair
    table = ringbuf.OutboundTable(1 << 16)
    table.open(1)
    table.set_fd(1, a.fileno())
    table.append_many([1], b'{"n":1}\n')
    table.append_many([1], b'{"n":2}\n')
    deferred, tails = table.flush()
    assert deferred == [] and tails == []
    (frame,) = parse_frames(read_all(b))
    assert frame.opcode is Opcode.TEXT and frame.fin
    assert frame.data == b'{"n":1}\n{"n":2}'  # no trailing newline on the wire
    assert table.pending(1) == 0 and table.total_pending == 0
    assert table.frames_written == 1 and table.lines_written == 2
    assert table.batch_histogram()[2] == 1  # bit_length(2) == 2
    assert table.flush() == ([], [])  # nothing dirty any more


def test_without_fd_or_while_paused_the_caller_writes(ringbuf, pair):
    a, b = pair
    table = ringbuf.OutboundTable(1 << 16)
    for cid in (1, 2, 3):
        table.open(cid)
    table.set_fd(2, a.fileno())
    table.set_fd(3, a.fileno())
    table.set_paused(3, True)
    table.append_many([1, 2, 3], b"x\n")
    deferred, tails = table.flush()
    assert sorted(deferred) == [1, 3] and tails == []
    assert table.pending(1) == 2 and table.pending(3) == 2 and table.pending(2) == 0
    table.set_paused(3, False)
    table.append(3, b"y\n")
    assert table.flush() == ([], [])
    assert [f.data for f in parse_frames(read_all(b))] == [b"x", b"x\ny"]


def test_partial_write_returns_the_exact_rest(ringbuf, pair):
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    table = ringbuf.OutboundTable(1 << 22)
    table.open(7)
    table.set_fd(7, a.fileno())
    line = b"z" * 1000 + b"\n"
    for _ in range(2000):
        table.append(7, line)
    deferred, tails = table.flush()
    assert deferred == []
    (cid, rest), = tails
    assert cid == 7 and rest
    sent = read_all(b)
    (frame,) = parse_frames(sent + rest)
    assert frame.data == (line * 2000)[:-1]
    assert table.pending(7) == 0


def test_a_broken_socket_is_reported(ringbuf, pair):
    a, b = pair
    b.close()
    table = ringbuf.OutboundTable(1 << 16)
    table.open(1)
    table.set_fd(1, a.fileno())
    table.append(1, b"x\n")
    assert table.flush() == ([], [(1, None)])
    assert table.pending(1) == 0


def test_closed_connection_is_forgotten(ringbuf, pair):
    a, b = pair
    table = ringbuf.OutboundTable(1 << 16)
    table.open(1)
    table.set_fd(1, a.fileno())
    table.append(1, b"x\n")
    table.close(1)
    assert table.flush() == ([], [])
    assert read_all(b) == b""


@pytest.mark.parametrize("size", [0, 124, 125, 126, 65535, 65536, 70000])
def test_header_lengths(ringbuf, pair, size):
    a, b = pair
    table = ringbuf.OutboundTable(1 << 20)
    table.open(1)
    table.set_fd(1, a.fileno())
    table.append(1, b"a" * size + b"\n")
    deferred, tails = table.flush()
    data = read_all(b) + (tails[0][1] if tails else b"")
    (frame,) = parse_frames(data)
    assert frame.data == b"a" * size

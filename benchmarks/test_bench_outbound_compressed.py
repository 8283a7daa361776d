"""Fan-out of one publication to 5,000 WebSocket connections on real sockets,
plain vs permessage-deflate (window 15), compiled vs twin: one round =
append_many + flush() writing every connection's frame to its socket. The
peers' ends are drained (read and discarded) between rounds, untimed.

Read compressed/plain within an implementation (the goal: compressed fan-out
at >= 0.8x the plain rate) and compiled/twin within a setting. The
compressed rows compress the publication once per flush (asserted).
The ``python-path`` row is how compressed connections were served before
the C flush learned compression (deferred, then per connection: take,
SharedFrames.batch_frame, a write from Python), for comparison."""
import os
import socket
from array import array

import pytest

from broker._fastpath import load

CONNS = 5000
ROUNDS = 40
LINE = b'{"op":"pub","channel":"bill:1","offset":1,"data":{"status":"passed","text":"' + b"x" * 120 + b'"}}\n'


@pytest.fixture(scope="module")
def sockets():
    pairs = [socket.socketpair() for _ in range(CONNS)]
    for server, client in pairs:
        server.setblocking(False)
        client.setblocking(False)
    yield pairs
    for server, client in pairs:
        server.close()
        client.close()


def drain(pairs) -> None:
    """The peers read everything pending and throw it away."""
    for _, client in pairs:
        try:
            while client.recv(1 << 16):
                pass
        except BlockingIOError:
            pass


@pytest.mark.parametrize("window_bits", [0, 15], ids=["plain", "deflate15"])
def test_fanout_5000_sockets(benchmark, ringbuf, sockets, window_bits):
    benchmark.group = "fanout-5000-sockets"
    table = ringbuf.OutboundTable(1 << 20)
    ids = array("I", range(CONNS))
    for cid, (server, _) in zip(ids, sockets, strict=True):
        table.open(cid)
        table.set_framing(cid, ringbuf.FRAMING_NATIVE, window_bits)
        table.set_fd(cid, server.fileno())

    def cycle():
        table.append_many(ids, LINE)
        deferred, tails = table.flush()
        assert not deferred and not tails

    drain(sockets)
    benchmark.pedantic(cycle, setup=lambda: drain(sockets), rounds=ROUNDS, iterations=1)
    drain(sockets)
    assert table.total_pending == 0
    assert table.compressions == (table.frames_written // CONNS if window_bits else 0)


def test_fanout_5000_sockets_python_path(benchmark, ringbuf, sockets):
    benchmark.group = "fanout-5000-sockets"
    benchmark.name = benchmark.name.replace("python_path", "python-path")
    frames = load("frames", "pure" if ringbuf.__name__.endswith("_py") else "compiled")
    shared = frames.SharedFrames(frames.Deflater(6, 15))
    table = ringbuf.OutboundTable(1 << 20)
    ids = array("I", range(CONNS))
    fds = [server.fileno() for server, _ in sockets]
    for cid in ids:
        table.open(cid)  # no fd: flush defers every connection

    def cycle():
        table.append_many(ids, LINE)
        deferred, _ = table.flush()
        for cid in deferred:
            payload = table.take(cid)
            frame = shared.batch_frame(payload, True)
            os.write(fds[cid], frame)
            table.count_frame(len(frame), payload.count(b"\n"))
        shared.clear()

    drain(sockets)
    benchmark.pedantic(cycle, setup=lambda: drain(sockets), rounds=ROUNDS, iterations=1)
    drain(sockets)
    assert table.total_pending == 0
    assert shared.compressions == table.frames_written // CONNS  # once per flush

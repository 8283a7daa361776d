"""The fan-out + flush cycle, compiled vs twin, plain vs compressed: append
one line to 5,000 connections, then flush() writes each one's frame with
writev. Every fd is /dev/null, so the syscall is as cheap as it gets and the
loop (and, compressed, the shared compression: once per flush) shows.
benchmarks/test_bench_outbound_compressed.py does the same on real sockets."""
import os
from array import array

import pytest

CONNS = 5000
LINE = b'{"op":"pub","channel":"bill:1","offset":1,"data":{"status":"passed","text":"' + b"x" * 120 + b'"}}\n'


@pytest.fixture
def devnull():
    fd = os.open(os.devnull, os.O_WRONLY)
    yield fd
    os.close(fd)


@pytest.mark.parametrize("window_bits", [0, 15], ids=["plain", "deflate15"])
def test_fanout_and_flush_5000(benchmark, ringbuf, devnull, window_bits):
    benchmark.group = "fanout-5000-devnull"
    table = ringbuf.OutboundTable(1 << 20)
    ids = array("I", range(CONNS))
    for cid in ids:
        table.open(cid)
        table.set_framing(cid, ringbuf.FRAMING_NATIVE, window_bits)
        table.set_fd(cid, devnull)

    def cycle():
        table.append_many(ids, LINE)
        deferred, tails = table.flush()
        assert not deferred and not tails

    benchmark(cycle)
    assert table.total_pending == 0
    assert table.compressions == (table.frames_written // CONNS if window_bits else 0)

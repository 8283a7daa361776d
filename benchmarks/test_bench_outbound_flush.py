"""The fan-out + flush cycle, compiled vs twin: append one line to 5,000
connections, then flush() writes each one's frame with writev. Every fd is
/dev/null, so the syscall is as cheap as it gets and the loop shows."""
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


def test_fanout_and_flush_5000(benchmark, ringbuf, devnull):
    table = ringbuf.OutboundTable(1 << 20)
    ids = array("I", range(CONNS))
    for cid in ids:
        table.open(cid)
        table.set_fd(cid, devnull)

    def cycle():
        table.append_many(ids, LINE)
        deferred, tails = table.flush()
        assert not deferred and not tails

    benchmark(cycle)
    assert table.total_pending == 0

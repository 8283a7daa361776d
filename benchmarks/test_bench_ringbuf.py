"""Ring buffers on the outbound path, compiled vs pure (same session).

Compare the ``ringbuf-compiled`` and ``ringbuf-pure`` rows of each test:
    python -m pytest benchmarks/test_bench_ringbuf.py --benchmark-enable -q -p no:cacheprovider
"""
from __future__ import annotations

from array import array

LINE = (b'{"op":"pub","ch":"news.eu","o":123456,"data":{"id":42,"text":"'
        + b"x" * 120 + b'"}}\n')[:199] + b"\n"
FANOUT = 5_000
CAPACITY = 1 << 20


def test_ringbuffer_append_take(benchmark, ringbuf):
    """One connection: ten ~200-byte lines appended, then one take (a flush)."""
    rb = ringbuf.RingBuffer(CAPACITY)
    append, take = rb.append, rb.take

    def cycle():
        for _ in range(10):
            append(LINE)
        return take()

    assert len(benchmark(cycle)) == 10 * len(LINE)


def _table(ringbuf):
    table = ringbuf.OutboundTable(CAPACITY)
    for cid in range(FANOUT):
        table.open(cid)
    return table, array("I", range(FANOUT))


def test_append_many_fanout_and_flush(benchmark, ringbuf):
    """One 200-byte line to 5,000 connections, then take_dirty + take of each."""
    table, ids = _table(ringbuf)

    def publish_and_flush():
        overflow = table.append_many(ids, LINE)
        take = table.take
        total = 0
        for cid in table.take_dirty():
            total += len(take(cid))
        return overflow, total

    assert benchmark(publish_and_flush) == ([], FANOUT * len(LINE))


def test_append_many_fanout_only(benchmark, ringbuf):
    """Just the fan-out: one append_many of a 200-byte line to 5,000 ids
    (buffers drained outside the timing)."""
    table, ids = _table(ringbuf)

    def drain():
        take = table.take
        for cid in table.take_dirty():
            take(cid)

    result = benchmark.pedantic(lambda: table.append_many(ids, LINE), setup=drain,
                                rounds=300, iterations=1, warmup_rounds=5)
    assert result == []
    assert table.total_pending == FANOUT * len(LINE)

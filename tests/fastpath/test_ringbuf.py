"""RingBuffer and OutboundTable, compiled and pure (the ``ringbuf`` fixture),
checked against simple models (bytearray / dict) and against each other."""
from __future__ import annotations

import random
from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker._fastpath import load

FIXTURE_SETTINGS = settings(
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    deadline=None,
    max_examples=150,
)

U32_MAX = 2**32 - 1


# --------------------------------------------------------------------------
# RingBuffer


def test_constructor(ringbuf):
    rb = ringbuf.RingBuffer(100)
    assert rb.capacity == 100
    assert len(rb) == 0
    assert rb.allocated == 0
    for bad in (0, -1):
        with pytest.raises(ValueError):
            ringbuf.RingBuffer(bad)
    for bad in ("10", 1.5, None):
        with pytest.raises(TypeError):
            ringbuf.RingBuffer(bad)


def test_append_peek_take(ringbuf):
    rb = ringbuf.RingBuffer(10)
    assert rb.append(b"hello") is True
    assert rb.append(bytearray(b"12345")) is True
    assert len(rb) == 10
    assert rb.append(b"x") is False  # all-or-nothing
    assert rb.peek() == b"hello12345"
    assert rb.peek(3) == b"hel"
    assert rb.peek(0) == b""
    assert rb.peek(99) == b"hello12345"
    assert rb.peek(-5) == b"hello12345"
    assert len(rb) == 10
    assert rb.take() == b"hello12345"
    assert len(rb) == 0 and rb.allocated == 0
    assert rb.take() == b""


def test_append_is_all_or_nothing(ringbuf):
    rb = ringbuf.RingBuffer(8)
    assert rb.append(b"12345")
    assert rb.append(b"6789") is False
    assert rb.peek() == b"12345"
    assert rb.append(b"678")
    assert rb.append(b"") is True  # empty always fits, even when full
    assert rb.peek() == b"12345678"
    assert rb.append(b"123456789") is False


def test_buffer_types(ringbuf):
    rb = ringbuf.RingBuffer(64)
    assert rb.append(memoryview(b"abc"))
    assert rb.append(array("I", [1]))  # raw bytes of any buffer
    assert len(rb) == 7
    assert rb.peek() == b"abc" + array("I", [1]).tobytes()
    with pytest.raises(TypeError):
        rb.append("text")
    with pytest.raises(TypeError):
        rb.append(5)
    assert len(rb) == 7


def test_consume(ringbuf):
    rb = ringbuf.RingBuffer(16)
    rb.append(b"abcdef")
    rb.consume(2)
    assert rb.peek() == b"cdef"
    rb.consume(0)
    assert rb.peek() == b"cdef"
    with pytest.raises(ValueError):
        rb.consume(5)
    with pytest.raises(ValueError):
        rb.consume(-1)
    assert rb.peek() == b"cdef"
    rb.consume(4)
    assert len(rb) == 0 and rb.allocated == 0


def test_allocation_on_demand_doubling_capped(ringbuf):
    min_alloc = ringbuf.MIN_ALLOC
    rb = ringbuf.RingBuffer(1000)
    assert rb.allocated == 0
    rb.append(b"x")
    assert rb.allocated == min_alloc
    rb.append(b"x" * min_alloc)  # min_alloc + 1 pending
    assert rb.allocated == 2 * min_alloc
    rb.append(b"x" * 500)
    expected = min_alloc
    while expected < len(rb):
        expected *= 2
    assert rb.allocated == min(expected, 1000)
    assert len(rb) <= rb.allocated <= rb.capacity
    rb.clear()
    assert rb.allocated == 0 and len(rb) == 0
    rb.append(b"y" * 3)
    rb.consume(3)
    assert rb.allocated == 0
    small = ringbuf.RingBuffer(10)
    small.append(b"a")
    assert small.allocated == 10  # never more than the capacity


def test_wraparound_and_growth_while_wrapped(ringbuf):
    min_alloc = ringbuf.MIN_ALLOC
    rb = ringbuf.RingBuffer(10_000)
    model = bytearray()
    first = bytes(range(min_alloc - 4))
    rb.append(first)
    model += first
    rb.consume(min_alloc - 14)  # head near the end of the storage
    del model[: min_alloc - 14]
    chunk = bytes(range(100, 140))  # wraps around the end
    rb.append(chunk)
    model += chunk
    assert rb.allocated == min_alloc
    assert rb.peek() == bytes(model)
    assert rb.peek(12) == bytes(model[:12])
    grow = bytes(range(200, 256)) * 3  # grows while wrapped
    rb.append(grow)
    model += grow
    assert rb.allocated > min_alloc
    assert rb.peek() == bytes(model)
    rb.consume(7)
    del model[:7]
    assert rb.take() == bytes(model)


_rb_ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.binary(max_size=90)),
        st.tuples(st.just("peek"), st.integers(-2, 140)),
        st.tuples(st.just("consume"), st.integers(-1, 140)),
        st.tuples(st.just("take"), st.none()),
        st.tuples(st.just("clear"), st.none()),
    ),
    max_size=60,
)


def _is_alloc_size(allocated: int, capacity: int, min_alloc: int) -> bool:
    if allocated == capacity:
        return True
    a = min_alloc
    while a < allocated:
        a *= 2
    return a == allocated


@FIXTURE_SETTINGS
@given(capacity=st.integers(1, 130), ops=_rb_ops)
def test_ringbuffer_matches_bytearray_model(ringbuf, capacity, ops):
    rb = ringbuf.RingBuffer(capacity)
    model = bytearray()
    for op, arg in ops:
        if op == "append":
            fits = len(model) + len(arg) <= capacity
            assert rb.append(arg) is fits
            if fits:
                model += arg
        elif op == "peek":
            expected = bytes(model) if arg < 0 else bytes(model[:arg])
            assert rb.peek(arg) == expected
        elif op == "consume":
            if 0 <= arg <= len(model):
                rb.consume(arg)
                del model[:arg]
            else:
                with pytest.raises(ValueError):
                    rb.consume(arg)
        elif op == "take":
            assert rb.take() == bytes(model)
            model.clear()
        else:
            rb.clear()
            model.clear()
        assert len(rb) == len(model)
        assert rb.peek() == bytes(model)
        if model:
            assert len(model) <= rb.allocated <= capacity
            assert _is_alloc_size(rb.allocated, capacity, ringbuf.MIN_ALLOC)
        else:
            assert rb.allocated == 0


@settings(deadline=None, max_examples=100)
@given(capacity=st.integers(1, 300), ops=_rb_ops)
def test_ringbuffer_implementations_agree(capacity, ops):
    bufs = [load("ringbuf", impl).RingBuffer(capacity) for impl in ("compiled", "pure")]
    for op, arg in ops:
        results = []
        for rb in bufs:
            try:
                out = getattr(rb, op)(*(() if arg is None else (arg,)))
            except ValueError as exc:
                out = type(exc)
            results.append((out, len(rb), rb.allocated))
        assert results[0] == results[1]


# --------------------------------------------------------------------------
# OutboundTable


def test_table_open_close(ringbuf):
    t = ringbuf.OutboundTable(100)
    assert t.capacity == 100 and len(t) == 0 and t.total_pending == 0
    t.open(1)
    t.open(0)
    t.open(U32_MAX)
    assert len(t) == 3
    assert t.is_open(1) and t.is_open(0) and t.is_open(U32_MAX)
    assert not t.is_open(2) and not t.is_open(-1) and not t.is_open(2**32)
    with pytest.raises(ValueError):
        t.open(1)
    for bad in (-1, 2**32, 2**70):
        with pytest.raises(ValueError):
            t.open(bad)
    with pytest.raises(TypeError):
        t.open(1.0)
    with pytest.raises(TypeError):
        t.is_open("1")
    t.close(1)
    t.close(1)  # unknown: no error
    t.close(12345)
    t.close(-3)
    assert not t.is_open(1) and len(t) == 2
    t.open(1)  # reopen is fine
    assert t.pending(1) == 0
    with pytest.raises(ValueError):
        ringbuf.OutboundTable(0)


def test_table_append_take(ringbuf):
    t = ringbuf.OutboundTable(10)
    t.open(7)
    assert t.append(7, b"abc\n") is True
    assert t.append(7, memoryview(b"de\n")) is True
    assert t.pending(7) == 7 and t.total_pending == 7
    assert t.append(7, b"xyzw") is False  # 11 > 10: nothing written
    assert t.pending(7) == 7
    assert t.take(7) == b"abc\nde\n"
    assert t.pending(7) == 0 and t.total_pending == 0
    assert t.take(7) == b""
    for method, args in (("append", (8, b"x")), ("pending", (8,)), ("take", (8,)),
                         ("append", (-1, b"x")), ("take", (2**40,))):
        with pytest.raises(KeyError):
            getattr(t, method)(*args)
    t.append(7, b"12345")
    t.close(7)
    assert t.total_pending == 0
    t.open(3)
    with pytest.raises(TypeError):
        t.append(3, "str")


def test_take_dirty_order_once_and_closed_excluded(ringbuf):
    t = ringbuf.OutboundTable(100)
    for cid in (1, 2, 3, 4):
        t.open(cid)
    assert t.take_dirty() == []
    t.append(3, b"a")
    t.append(1, b"b")
    t.append(3, b"c")
    t.append(2, b"")  # no bytes: not dirty
    t.append(4, b"d")
    t.close(4)
    assert t.take_dirty() == [3, 1]
    assert t.take_dirty() == []
    t.append(2, b"x")
    t.take(2)  # taking does not undirty
    assert t.take_dirty() == [2]
    # closed then reopened: dirty again only once it receives bytes, at its new place
    t.append(1, b"x")
    t.append(2, b"x")
    t.close(1)
    t.open(1)
    assert t.take_dirty() == [2]
    t.append(1, b"x")
    t.append(2, b"y")
    t.close(1)
    t.open(1)
    t.append(1, b"z")
    assert t.take_dirty() == [2, 1]
    assert t.take(1) == b"z"


def test_append_many_kinds_of_ids(ringbuf):
    line = b'{"op":"pub"}\n'
    for ids in (
        [1, 2, 3, 99],
        (1, 2, 3, 99),
        array("I", [1, 2, 3, 99]),
        memoryview(array("I", [1, 2, 3, 99])),
        memoryview(array("I", [1, 2, 3, 99]).tobytes()).cast("I"),
        memoryview(array("I", [1, 0, 2, 0, 3, 0, 99, 0]))[::2],  # strided
        array("q", [1, 2, 3, 99]),  # not uint32: iterated as ints
        (i for i in [1, 2, 3, 99]),
        range(1, 4),
    ):
        t = ringbuf.OutboundTable(100)
        for cid in (1, 2, 3):
            t.open(cid)
        assert t.append_many(ids, line) == []
        assert [t.pending(c) for c in (1, 2, 3)] == [len(line)] * 3, ids
        assert t.take_dirty() == [1, 2, 3]
        assert t.total_pending == 3 * len(line)
    t = ringbuf.OutboundTable(100)
    t.open(1)
    with pytest.raises(TypeError):
        t.append_many([1.0], line)
    with pytest.raises(TypeError):
        t.append_many([1], "text")
    assert t.append_many([-1, 2**32, 2**80, 1], bytearray(line)) == []  # out of range: not open
    assert t.pending(1) == len(line)


def test_append_many_overflow_untouched(ringbuf):
    t = ringbuf.OutboundTable(10)
    for cid in range(5):
        t.open(cid)
    t.append(1, b"123456")
    t.append(3, b"1234567890")
    for ids in (array("I", [0, 1, 2, 3, 4, 42]), [0, 1, 2, 3, 4, 42]):
        overflow = t.append_many(ids, b"abcd\n")
        assert overflow == [1, 3]
        assert t.take(1) == b"123456" and t.take(3) == b"1234567890"
        assert [t.take(c) for c in (0, 2, 4)] == [b"abcd\n"] * 3
        t.append(1, b"123456")
        t.append(3, b"1234567890")
    t.take_dirty()
    # duplicates are appended per occurrence, and overflow per occurrence
    assert t.append_many(array("I", [0, 0, 0]), b"1234") == [0]
    assert t.take(0) == b"12341234"
    assert t.append_many([0], b"") == []
    assert t.take_dirty() == [0]
    assert t.append_many([], b"x") == []


def test_many_ids_hash_growth_and_shrink(ringbuf):
    rng = random.Random(1)
    ids = set()
    while len(ids) < 3000:
        ids.add(rng.choice([rng.getrandbits(32), rng.getrandbits(12) << 20, rng.getrandbits(10)]))
    ids = list(ids)
    t = ringbuf.OutboundTable(64)
    for cid in ids:
        t.open(cid)
    assert len(t) == len(ids)
    assert t.append_many(array("I", ids), b"x") == []
    closed = set(rng.sample(ids, 2900))
    for cid in closed:
        t.close(cid)
    alive = [c for c in ids if c not in closed]
    assert len(t) == len(alive)
    assert all(t.is_open(c) for c in alive)
    assert not any(t.is_open(c) for c in closed)
    assert all(t.pending(c) == 1 for c in alive)
    assert t.total_pending == len(alive)
    assert t.take_dirty() == [c for c in ids if c not in closed]
    for cid in closed:
        t.open(cid)
    assert len(t) == len(ids) and all(t.pending(c) == 0 for c in closed)


_cids = st.one_of(st.integers(0, 6), st.sampled_from([2**31, U32_MAX, 2**20, 2**20 + 1]))
_table_ops = st.lists(
    st.one_of(
        st.tuples(st.just("open"), _cids),
        st.tuples(st.just("close"), _cids),
        st.tuples(st.just("append"), _cids, st.binary(max_size=12)),
        st.tuples(st.just("append_many"), st.lists(_cids, max_size=8), st.binary(max_size=12),
                  st.booleans()),
        st.tuples(st.just("take"), _cids),
        st.tuples(st.just("pending"), _cids),
        st.tuples(st.just("take_dirty"),),
    ),
    max_size=60,
)


@FIXTURE_SETTINGS
@given(capacity=st.integers(1, 40), ops=_table_ops)
def test_table_matches_dict_model(ringbuf, capacity, ops):
    t = ringbuf.OutboundTable(capacity)
    bufs: dict[int, bytearray] = {}
    dirty: list[int] = []
    for op, *args in ops:
        if op == "open":
            (cid,) = args
            if cid in bufs:
                with pytest.raises(ValueError):
                    t.open(cid)
            else:
                t.open(cid)
                bufs[cid] = bytearray()
        elif op == "close":
            (cid,) = args
            t.close(cid)
            bufs.pop(cid, None)
            if cid in dirty:
                dirty.remove(cid)
        elif op == "append":
            cid, data = args
            if cid not in bufs:
                with pytest.raises(KeyError):
                    t.append(cid, data)
                continue
            fits = len(bufs[cid]) + len(data) <= capacity
            assert t.append(cid, data) is fits
            if fits and data:
                bufs[cid] += data
                if cid not in dirty:
                    dirty.append(cid)
        elif op == "append_many":
            ids, data, as_array = args
            expected = []
            for cid in ids:
                if cid not in bufs:
                    continue
                if len(bufs[cid]) + len(data) > capacity:
                    expected.append(cid)
                elif data:
                    bufs[cid] += data
                    if cid not in dirty:
                        dirty.append(cid)
            assert t.append_many(array("I", ids) if as_array else ids, data) == expected
        elif op in ("take", "pending"):
            (cid,) = args
            if cid not in bufs:
                with pytest.raises(KeyError):
                    getattr(t, op)(cid)
            elif op == "take":
                assert t.take(cid) == bytes(bufs[cid])
                bufs[cid].clear()
            else:
                assert t.pending(cid) == len(bufs[cid])
        else:
            assert t.take_dirty() == dirty
            dirty = []
        assert len(t) == len(bufs)
        assert t.total_pending == sum(map(len, bufs.values()))
    for cid, data in bufs.items():
        assert t.is_open(cid)
        assert t.take(cid) == bytes(data)
    assert t.total_pending == 0

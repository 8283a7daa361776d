"""HistoryWindow: both implementations against a list model.

Every test gets the module through the ``history`` fixture (compiled, then
pure). Expiry rule both promise: an entry stamped ``t`` is gone at ``now``
when ``max_age > 0 and now - t > max_age``.
"""
from __future__ import annotations

import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


class Model:
    def __init__(self, max_count: int, max_age: float, last_offset: int = 0) -> None:
        self.max_count = max_count
        self.max_age = max_age
        self.last = last_offset
        self.items: list[tuple[int, bytes, float]] = []

    def trim(self, now: float) -> int:
        if self.max_age <= 0:
            return 0
        keep = [item for item in self.items if not now - item[2] > self.max_age]
        dropped = len(self.items) - len(keep)
        self.items = keep
        return dropped

    def append(self, offset: int, data: bytes, now: float) -> None:
        assert offset == self.last + 1
        self.last = offset
        if self.max_count == 0:
            return
        self.trim(now)
        self.items.append((offset, data, now))
        del self.items[: max(0, len(self.items) - self.max_count)]

    @property
    def first(self) -> int:
        return self.items[0][0] if self.items else self.last + 1

    def covers(self, offset: int, now: float) -> bool:
        self.trim(now)
        retained = {item[0] for item in self.items}
        return all(o in retained for o in range(offset + 1, self.last + 1))

    def since(self, offset: int, now: float, limit: int | None) -> list:
        self.trim(now)
        out = [(o, d) for o, d, _ in self.items if o > offset]
        return out if limit is None else out[:limit]

    def resize(self, max_count: int) -> None:
        self.max_count = max_count
        del self.items[: max(0, len(self.items) - max_count)]


def check(window, model: Model) -> None:
    assert len(window) == len(model.items)
    assert window.last_offset == model.last
    assert window.first_offset == model.first
    assert window.nbytes == sum(len(d) for _, d, _ in model.items)


op = st.one_of(
    st.tuples(st.just("append"), st.integers(1, 40)),
    st.tuples(st.just("bad_append"), st.sampled_from([-1, 0, 2, 5])),
    st.tuples(st.just("covers"), st.integers(-3, 6)),
    st.tuples(st.just("since"), st.integers(-3, 6), st.none() | st.integers(0, 5)),
    st.tuples(st.just("trim")),
    st.tuples(st.just("resize"), st.integers(0, 8)),
)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    max_count=st.sampled_from([0, 1, 2, 3, 5, 8, 20]),
    max_age=st.sampled_from([0, 0.5, 1.0, 2.5, 10.0]),
    last_offset=st.sampled_from([0, 41, -5]),
    steps=st.lists(
        st.tuples(st.sampled_from([0.0, 0.0, 0.25, 0.5, 1.0, 3.0]), op), max_size=60
    ),
)
def test_matches_model(history, max_count, max_age, last_offset, steps):
    window = history.HistoryWindow(max_count, max_age, last_offset)
    model = Model(max_count, max_age, last_offset)
    now = 1000.0
    for dt, (kind, *args) in steps:
        now += dt
        if kind == "append":
            offset = model.last + 1
            data = bytes([offset % 256]) * args[0]
            window.append(offset, data, now)
            model.append(offset, data, now)
        elif kind == "bad_append":
            with pytest.raises(ValueError):
                window.append(model.last + 1 + args[0] if args[0] else model.last, b"x", now)
        elif kind == "covers":
            offset = model.last - args[0]
            assert window.covers(offset, now) == model.covers(offset, now)
        elif kind == "since":
            offset = model.last - args[0]
            assert window.since(offset, now, args[1]) == model.since(offset, now, args[1])
        elif kind == "trim":
            assert window.trim(now) == model.trim(now)
        else:
            window.resize(args[0])
            model.resize(args[0])
            assert window.max_count == args[0]
        check(window, model)


def test_count_bound_evicts_oldest(history):
    window = history.HistoryWindow(3, 0)
    for offset in range(1, 11):
        window.append(offset, str(offset).encode(), 0.0)
    assert window.first_offset == 8 and window.last_offset == 10 and len(window) == 3
    assert window.since(0, 0.0) == [(8, b"8"), (9, b"9"), (10, b"10")]
    assert window.nbytes == 4
    assert window.covers(7, 0.0) and window.covers(10, 0.0)
    assert not window.covers(6, 0.0)
    # Nothing reads a clock: no age bound, any now.
    assert window.since(8, 1e12) == [(9, b"9"), (10, b"10")]


def test_age_bound_uses_the_given_now(history):
    window = history.HistoryWindow(100, 5.0, last_offset=10)
    window.append(11, b"a", 100.0)
    window.append(12, b"bb", 103.0)
    window.append(13, b"ccc", 104.0)
    assert window.covers(10, 105.0)  # 105 - 100 == 5: still retained
    assert not window.covers(10, 105.5)  # offset 11 expired
    assert window.first_offset == 12 and window.nbytes == 5
    assert window.covers(11, 105.5)
    assert window.since(0, 108.5) == [(13, b"ccc")]
    assert window.trim(109.5) == 1
    assert len(window) == 0 and window.first_offset == 14 and window.nbytes == 0
    assert window.trim(200.0) == 0
    assert window.covers(13, 200.0) and not window.covers(12, 200.0)
    window.append(14, b"d", 300.0)  # append trims too
    assert window.since(13, 300.0) == [(14, b"d")]


def test_since_limit_semantics(history):
    window = history.HistoryWindow(100, 0)
    for offset in range(1, 101):
        window.append(offset, b"%d" % offset, 1.0)
    assert [o for o, _ in window.since(90, 1.0)] == list(range(91, 101))
    assert [o for o, _ in window.since(90, 1.0, 3)] == [91, 92, 93]
    assert window.since(90, 1.0, 0) == []
    assert len(window.since(90, 1.0, 10**30)) == 10
    assert window.since(100, 1.0) == [] and window.since(500, 1.0, 5) == []
    assert len(window.since(-(10**30), 1.0)) == 100
    assert window.since(10**30, 1.0) == []
    assert window.covers(10**30, 1.0) and not window.covers(-(10**30), 1.0)
    with pytest.raises(ValueError):
        window.since(90, 1.0, -1)
    with pytest.raises(TypeError):
        window.since(90, 1.0, 2.0)
    with pytest.raises(TypeError):
        window.since(90.0, 1.0)


def test_append_errors_leave_state(history):
    window = history.HistoryWindow(4, 0, last_offset=7)
    assert window.first_offset == 8 and window.last_offset == 7 and len(window) == 0
    for bad in (7, 9, 0, -8, 10**20):
        with pytest.raises(ValueError):
            window.append(bad, b"x", 0.0)
    with pytest.raises(TypeError):
        window.append(8.0, b"x", 0.0)
    with pytest.raises(TypeError):
        window.append(8, "text", 0.0)
    with pytest.raises(TypeError):
        window.append(8, bytearray(b"x"), 0.0)
    assert window.last_offset == 7 and len(window) == 0 and window.nbytes == 0
    window.append(8, b"ok", 0)
    assert window.since(7, 0) == [(8, b"ok")]


def test_max_count_zero_keeps_nothing(history):
    window = history.HistoryWindow(0, 0)
    for offset in range(1, 6):
        window.append(offset, b"data", float(offset))
    assert window.last_offset == 5 and window.first_offset == 6
    assert len(window) == 0 and window.nbytes == 0 and window.since(0, 9.0) == []
    assert window.covers(5, 9.0) and not window.covers(4, 9.0)


def test_resize_shrinks_and_grows(history):
    window = history.HistoryWindow(10, 0)
    for offset in range(1, 11):
        window.append(offset, b"x" * offset, 0.0)
    window.resize(4)
    assert window.max_count == 4 and window.first_offset == 7
    assert window.nbytes == 7 + 8 + 9 + 10
    window.append(11, b"y", 0.0)
    assert [o for o, _ in window.since(0, 0.0)] == [8, 9, 10, 11]
    window.resize(6)
    for offset in range(12, 16):
        window.append(offset, b"z", 0.0)
    assert [o for o, _ in window.since(0, 0.0)] == list(range(10, 16))
    window.resize(0)
    assert len(window) == 0 and window.nbytes == 0 and window.first_offset == 16
    window.resize(2)
    window.append(16, b"a", 0.0)
    assert window.since(0, 0.0) == [(16, b"a")]
    for bad in (-1,):
        with pytest.raises(ValueError):
            window.resize(bad)
    with pytest.raises(TypeError):
        window.resize(2.0)


def test_constructor_validation(history):
    with pytest.raises(ValueError):
        history.HistoryWindow(-1, 0)
    with pytest.raises(ValueError):
        history.HistoryWindow(1, -0.5)
    with pytest.raises(ValueError):
        history.HistoryWindow(1, float("nan"))
    with pytest.raises(TypeError):
        history.HistoryWindow(1.5, 0)
    with pytest.raises(TypeError):
        history.HistoryWindow(1, 0, 1.0)
    with pytest.raises(OverflowError):
        history.HistoryWindow(1, 0, 2**63)
    window = history.HistoryWindow(2, 1, last_offset=2**63 - 2)
    window.append(2**63 - 1, b"last", 0.0)
    with pytest.raises(OverflowError):
        window.append(2**63, b"x", 0.0)
    assert window.max_age == 1.0 and window.since(0, 0.0) == [(2**63 - 1, b"last")]


def test_references_are_held_and_released(history):
    payload = bytes(range(256)) * 3  # a unique object
    base = sys.getrefcount(payload)
    window = history.HistoryWindow(2, 0)
    window.append(1, payload, 0.0)
    assert sys.getrefcount(payload) == base + 1
    got = window.since(0, 0.0)
    assert got[0][1] is payload
    del got
    window.append(2, b"b", 0.0)
    window.append(3, b"c", 0.0)  # evicts payload
    assert sys.getrefcount(payload) == base
    window.append(4, payload, 0.0)
    window.resize(0)
    assert sys.getrefcount(payload) == base
    window.resize(3)
    window.append(5, payload, 0.0)
    window.append(6, payload, 0.0)
    assert sys.getrefcount(payload) == base + 2
    del window
    assert sys.getrefcount(payload) == base


def test_large_window_wraps(history):
    window = history.HistoryWindow(1000, 0)
    for offset in range(1, 5001):
        window.append(offset, b"%d" % offset, 0.0)
        if offset % 997 == 0:
            got = window.since(offset - 10, 0.0)
            assert got == [(o, b"%d" % o) for o in range(offset - 9, offset + 1)]
    assert window.first_offset == 4001 and len(window) == 1000
    assert window.since(4500, 0.0, 2) == [(4501, b"4501"), (4502, b"4502")]

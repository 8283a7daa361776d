"""HistoryWindow, compiled vs twin: appending to a full window (every
append evicts the oldest) and the recovery read ``since``."""
from __future__ import annotations

import itertools

import pytest

WINDOW = 100
BATCH = 1_000
NOW = 1_000.0


def _full(history, max_age=0.0):
    window = history.HistoryWindow(WINDOW, max_age)
    for offset in range(1, WINDOW + 1):
        window.append(offset, b'{"op":"pub","data":%d}' % offset, NOW)
    return window


@pytest.mark.benchmark(group="history: 1k appends to a full window (count-bounded)")
def test_append_full_window(benchmark, history):
    window = _full(history)
    append = window.append
    offsets = itertools.count(WINDOW + 1)
    data = b'{"op":"pub","channel":"news","offset":1,"data":{"x":1}}'

    def appends():
        for offset in itertools.islice(offsets, BATCH):
            append(offset, data, NOW)

    benchmark(appends)
    assert len(window) == WINDOW and window.nbytes == WINDOW * len(data)


@pytest.mark.benchmark(group="history: 1k appends, count- and age-bounded")
def test_append_full_window_aged(benchmark, history):
    window = _full(history, max_age=300.0)
    append = window.append
    offsets = itertools.count(WINDOW + 1)
    data = b'{"op":"pub","channel":"news","offset":1,"data":{"x":1}}'

    def appends():
        for offset in itertools.islice(offsets, BATCH):
            append(offset, data, NOW + offset * 1e-3)

    benchmark(appends)
    assert len(window) == WINDOW


@pytest.mark.benchmark(group="history: since() of 10 from a 100-entry window")
def test_since_10(benchmark, history):
    window = _full(history)
    got = benchmark(window.since, WINDOW - 10, NOW)
    assert [offset for offset, _ in got] == list(range(WINDOW - 9, WINDOW + 1))


@pytest.mark.benchmark(group="history: covers() + since(limit=10)")
def test_recovery(benchmark, history):
    window = _full(history, max_age=300.0)

    def recover():
        if window.covers(50, NOW):
            return window.since(50, NOW, 10)
        return None

    assert len(benchmark(recover)) == 10

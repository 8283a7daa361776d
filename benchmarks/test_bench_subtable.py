"""SubscriptionTable, compiled vs twin: the fan-out lookup and churn.

The fan-out asks ``subscribers(channel)`` once per publication and hands the
result to ``OutboundTable.append_many`` (a C loop over a uint32 buffer): the
compiled module answers with a zero-copy view, the twin with a copy.
"""
from __future__ import annotations

import pytest

SUBSCRIBERS = 5_000
CHURN = 1_000


@pytest.fixture
def hot_table(subtable):
    """5,000 connections on channel "hot", each also on 3 of 50 others."""
    table = subtable.SubscriptionTable()
    for cid in range(SUBSCRIBERS):
        table.add(cid, "hot")
        for k in range(3):
            table.add(cid, f"room:{(cid * 7 + k * 13) % 50}")
    assert table.count("hot") == SUBSCRIBERS
    return table


# A lookup costs tens of nanoseconds: the fast cases run LOOKUPS of them
# per benchmark call so the harness's own per-call overhead does not drown
# the difference (divide the times by LOOKUPS for one lookup).
LOOKUPS = 100


@pytest.mark.benchmark(group="subtable: 100 x subscribers() of a 5k channel")
def test_subscribers_lookup(benchmark, hot_table):
    subscribers = hot_table.subscribers
    repeat = range(LOOKUPS)

    def lookups():
        for _ in repeat:
            ids = subscribers("hot")
        return ids

    assert len(benchmark(lookups)) == SUBSCRIBERS


@pytest.mark.benchmark(group="subtable: 1 x subscribers() of a 5k channel")
def test_subscribers_lookup_single(benchmark, hot_table):
    assert len(benchmark(hot_table.subscribers, "hot")) == SUBSCRIBERS


@pytest.mark.benchmark(group="subtable: 1 x subscribers() + sum over 5k ids")
def test_subscribers_lookup_sum(benchmark, hot_table):
    # Consuming every id in Python dominates: both implementations match.
    subscribers = hot_table.subscribers

    def lookup_sum():
        return sum(subscribers("hot"))

    assert benchmark(lookup_sum) == SUBSCRIBERS * (SUBSCRIBERS - 1) // 2


@pytest.mark.benchmark(group="subtable: 100 x subscribers() of an unknown channel")
def test_subscribers_unknown(benchmark, hot_table):
    subscribers = hot_table.subscribers
    repeat = range(LOOKUPS)

    def lookups():
        for _ in repeat:
            ids = subscribers("nobody")
        return ids

    assert len(benchmark(lookups)) == 0


@pytest.mark.benchmark(group="subtable: churn, 1k conns x 3 channels add+remove_connection")
def test_churn(benchmark, subtable):
    table = subtable.SubscriptionTable()
    for cid in range(10_000, 15_000):  # a populated shard
        table.add(cid, f"room:{cid % 50}")
    channels = [f"room:{k}" for k in range(50)]
    add = table.add
    remove_connection = table.remove_connection

    def churn():
        for cid in range(CHURN):
            add(cid, channels[cid % 50])
            add(cid, channels[(cid + 17) % 50])
            add(cid, "lobby")
        for cid in range(CHURN):
            remove_connection(cid)

    benchmark(churn)
    assert table.subscriptions == 5_000 and len(table) == 50


@pytest.mark.benchmark(group="subtable: churn, 1k single add+remove")
def test_add_remove(benchmark, subtable):
    table = subtable.SubscriptionTable()
    for cid in range(10_000, 15_000):
        table.add(cid, "lobby")
    add = table.add
    remove = table.remove

    def churn():
        for cid in range(CHURN):
            add(cid, "lobby")
        for cid in range(CHURN):
            remove(cid, "lobby")

    benchmark(churn)
    assert table.count("lobby") == 5_000

"""SubscriptionTable: both implementations against a dict-of-sets model.

Every test gets the module through the ``subtable`` fixture (compiled, then
pure); ``test_twins_agree_exactly`` drives both side by side and also checks
what the model leaves open (the order of ``subscribers``).
"""
from __future__ import annotations

import random
from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker._fastpath import load

MAX_CID = 2**32 - 1


class Model:
    """channel -> set of cids, cid -> channels in subscribe order, and the
    id interning (LIFO free list) both implementations promise."""

    def __init__(self) -> None:
        self.subs: dict[str, set[int]] = {}
        self.chans: dict[int, list[str]] = {}
        self.ids: dict[str, int] = {}
        self.names: list[str | None] = []
        self.free: list[int] = []

    def _intern(self, channel: str) -> None:
        if self.free:
            cidx = self.free.pop()
            self.names[cidx] = channel
        else:
            cidx = len(self.names)
            self.names.append(channel)
        self.ids[channel] = cidx

    def _release(self, channel: str) -> None:
        cidx = self.ids.pop(channel)
        self.names[cidx] = None
        self.free.append(cidx)
        del self.subs[channel]

    def add(self, cid: int, channel: str) -> bool:
        if cid in self.subs.get(channel, ()):
            return False
        if channel not in self.subs:
            self._intern(channel)
            self.subs[channel] = set()
        self.subs[channel].add(cid)
        self.chans.setdefault(cid, []).append(channel)
        return True

    def remove(self, cid: int, channel: str) -> bool:
        if cid not in self.subs.get(channel, ()):
            return False
        self.subs[channel].discard(cid)
        self.chans[cid].remove(channel)
        if not self.chans[cid]:
            del self.chans[cid]
        if not self.subs[channel]:
            self._release(channel)
        return True

    def remove_connection(self, cid: int) -> list[str]:
        channels = self.chans.pop(cid, [])
        for channel in channels:
            self.subs[channel].discard(cid)
        for channel in channels:
            if not self.subs[channel]:
                self._release(channel)
        return channels


def check(table, model: Model, cids, channels) -> None:
    """Every observable of ``table`` matches ``model``."""
    for channel in channels:
        expected = sorted(model.subs.get(channel, ()))
        view = table.subscribers(channel)
        assert sorted(array("I", view)) == expected
        assert len(view) == len(expected)
        assert table.count(channel) == len(expected)
        assert table.channel_id(channel) == model.ids.get(channel, -1)
        for cid in cids:
            assert table.is_subscribed(cid, channel) == (cid in model.subs.get(channel, ()))
    for cid in cids:
        assert table.channels_of(cid) == model.chans.get(cid, [])
    assert table.channels() == list(model.ids)
    assert len(table) == len(model.subs)
    assert table.subscriptions == sum(len(s) for s in model.subs.values())
    assert table.connections == len(model.chans)


def apply(table, model: Model, op) -> None:
    kind, cid, channel = op
    if kind == "add":
        assert table.add(cid, channel) == model.add(cid, channel)
    elif kind == "remove":
        assert table.remove(cid, channel) == model.remove(cid, channel)
    else:
        assert table.remove_connection(cid) == model.remove_connection(cid)


CIDS = [0, 1, 2, 7, 1000, MAX_CID]
CHANNELS = ["a", "b", "news", "chat:é", ""]

ops_strategy = st.lists(
    st.tuples(
        st.sampled_from(["add", "add", "add", "remove", "drop"]),
        st.sampled_from(CIDS),
        st.sampled_from(CHANNELS),
    ),
    max_size=60,
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=ops_strategy)
def test_matches_model(subtable, ops):
    table = subtable.SubscriptionTable()
    model = Model()
    for op in ops:
        apply(table, model, op)
        check(table, model, CIDS, CHANNELS)


def test_many_connections_against_model(subtable):
    """Grows and shrinks the compiled hash table and channel arrays."""
    rng = random.Random(20240611)
    table = subtable.SubscriptionTable()
    model = Model()
    cids = rng.sample(range(2**32), 3000) + list(range(500))
    channels = [f"ch{i}" for i in range(40)]
    for cid in cids:
        for channel in rng.sample(channels, rng.randint(1, 6)):
            apply(table, model, ("add", cid, channel))
    check(table, model, cids[:50], channels)
    rng.shuffle(cids)
    for i, cid in enumerate(cids):
        if i % 3:
            apply(table, model, ("drop", cid, None))
        else:
            for channel in list(model.chans.get(cid, []))[::2]:
                apply(table, model, ("remove", cid, channel))
        if i % 500 == 0:
            check(table, model, cids[i : i + 20], channels)
    check(table, model, cids[:100], channels)
    for cid in cids:
        apply(table, model, ("drop", cid, None))
    check(table, model, cids[:10], channels)
    assert (len(table), table.subscriptions, table.connections) == (0, 0, 0)


def test_big_channel_swap_remove(subtable):
    table = subtable.SubscriptionTable()
    cids = list(range(10, 20010))
    for cid in cids:
        assert table.add(cid, "big")
    assert table.add(5, "other")
    random.Random(7).shuffle(cids)
    remaining = set(cids)
    for i, cid in enumerate(cids):
        assert table.remove(cid, "big")
        remaining.discard(cid)
        if i % 2500 == 0 or len(remaining) < 5:
            assert sorted(table.subscribers("big")) == sorted(remaining)
    assert table.channel_id("big") == -1
    assert table.channels() == ["other"]
    assert list(table.subscribers("other")) == [5]


def test_subscribers_buffer(subtable):
    table = subtable.SubscriptionTable()
    for cid in (3, MAX_CID, 0, 42):
        table.add(cid, "room")
    ids = table.subscribers("room")
    view = memoryview(ids)  # what OutboundTable.append_many consumes
    assert view.format == "I" and view.itemsize == 4 and view.ndim == 1
    assert view.nbytes == 16 and len(ids) == 4
    copied = array("I", ids)
    assert sorted(copied) == [0, 3, 42, MAX_CID]
    assert sorted(view.tolist()) == [0, 3, 42, MAX_CID]
    assert bytes(view) == copied.tobytes()
    assert sum(ids) == 3 + MAX_CID + 42
    empty = table.subscribers("nobody")
    assert len(empty) == 0 and memoryview(empty).format == "I"
    assert array("I", empty) == array("I")


def test_compiled_subscribers_is_a_read_only_view():
    table = load("subtable", "compiled").SubscriptionTable()
    table.add(1, "x")
    table.add(2, "x")
    view = table.subscribers("x")
    assert isinstance(view, memoryview) and view.readonly
    assert view.obj is None  # owns nothing, keeps nothing alive: do NOT store
    with pytest.raises(TypeError):
        view[0] = 9
    assert array("I", view) == array("I", [1, 2])
    # Zero-copy and cached: the same view answers until the channel changes.
    assert table.subscribers("x") is view
    table.add(3, "y")
    assert table.subscribers("x") is view  # another channel changed
    table.add(3, "x")
    fresh = table.subscribers("x")
    assert fresh is not view and sorted(fresh) == [1, 2, 3]
    table.remove(1, "x")
    assert sorted(table.subscribers("x")) == [2, 3]
    # A user release()ing a view does not break later lookups.
    with table.subscribers("x") as released:
        pass
    with pytest.raises(ValueError):  # released: the view itself is no longer usable
        released.tolist()
    assert sorted(table.subscribers("x")) == [2, 3]
    table.subscribers("nobody").release()
    assert table.subscribers("nobody").tolist() == []
    table.remove_connection(2)
    table.remove_connection(3)
    assert table.subscribers("x").tolist() == []


def test_pure_subscribers_is_a_copy():
    table = load("subtable", "pure").SubscriptionTable()
    table.add(1, "x")
    ids = table.subscribers("x")
    assert isinstance(ids, array) and ids.typecode == "I"
    table.add(2, "x")
    assert list(ids) == [1]


def test_channel_ids_are_interned_and_reused(subtable):
    table = subtable.SubscriptionTable()
    assert table.channel_id("a") == -1
    table.add(1, "a")
    table.add(1, "b")
    table.add(2, "c")
    assert [table.channel_id(c) for c in "abc"] == [0, 1, 2]
    assert table.remove(1, "a")
    assert table.channel_id("a") == -1 and len(table) == 2
    table.add(3, "d")
    assert table.channel_id("d") == 0
    assert table.remove_connection(1) == ["b"]
    assert table.remove_connection(2) == ["c"]
    table.add(4, "e")
    table.add(4, "f")
    assert [table.channel_id("e"), table.channel_id("f")] == [2, 1]
    table.add(4, "g")
    assert table.channel_id("g") == 3
    assert table.channels() == ["d", "e", "f", "g"]


def test_remove_connection_order_and_unknowns(subtable):
    table = subtable.SubscriptionTable()
    for channel in ("z", "a", "m"):
        table.add(9, channel)
    table.add(8, "a")
    assert table.channels_of(9) == ["z", "a", "m"]
    assert table.remove(9, "a")
    assert table.channels_of(9) == ["z", "m"]
    assert table.add(9, "a")
    assert table.channels_of(9) == ["z", "m", "a"]
    assert not table.remove(9, "nope") and not table.remove(77, "a")
    assert not table.remove(8, "z")
    assert table.remove_connection(77) == []
    assert table.remove_connection(9) == ["z", "m", "a"]
    assert table.channels() == ["a"] and table.connections == 1
    assert table.count("z") == 0 and table.channels_of(9) == []


def test_conn_id_range_and_types(subtable):
    table = subtable.SubscriptionTable()
    assert table.add(MAX_CID, "x") and table.add(0, "x")
    for method, args in (
        (table.add, ("x",)),
        (table.remove, ("x",)),
        (table.is_subscribed, ("x",)),
        (table.remove_connection, ()),
        (table.channels_of, ()),
    ):
        for bad in (-1, 2**32, 2**70):
            with pytest.raises(OverflowError):
                method(bad, *args)
        for bad in (1.0, 1.5, "1", None):
            with pytest.raises(TypeError):
                method(bad, *args)
    assert table.add(True, "x")  # an int
    assert table.channels_of(1) == ["x"]
    with pytest.raises(TypeError):
        table.add(3, b"bytes")
    with pytest.raises(TypeError):
        table.add(3, None)
    assert table.channels() == ["x"] and table.subscriptions == 3
    assert table.channel_id(b"bytes") == -1 and table.count(None) == 0
    assert len(table.subscribers(42)) == 0


def test_str_subclass_channels_are_stored_as_str(subtable):
    class Name(str):
        pass

    table = subtable.SubscriptionTable()
    assert table.add(1, Name("room"))
    assert type(table.channels()[0]) is str
    assert type(table.channels_of(1)[0]) is str
    assert not table.add(1, "room")
    assert table.add(2, Name("room"))
    assert table.count("room") == 2 and table.remove(1, Name("room"))
    assert type(table.remove_connection(2)[0]) is str


def test_twins_agree_exactly():
    """Same ops, same everything, including subscriber order and ids."""
    compiled = load("subtable", "compiled").SubscriptionTable()
    pure = load("subtable", "pure").SubscriptionTable()
    rng = random.Random(99)
    cids = list(range(60))
    channels = [f"c{i}" for i in range(12)]
    for step in range(4000):
        roll = rng.random()
        cid = rng.choice(cids)
        channel = rng.choice(channels)
        if roll < 0.6:
            assert compiled.add(cid, channel) == pure.add(cid, channel)
        elif roll < 0.95:
            assert compiled.remove(cid, channel) == pure.remove(cid, channel)
        else:
            assert compiled.remove_connection(cid) == pure.remove_connection(cid)
        if step % 50 == 0:
            for channel in channels:
                assert list(compiled.subscribers(channel)) == list(pure.subscribers(channel))
                assert compiled.channel_id(channel) == pure.channel_id(channel)
            for cid in cids:
                assert compiled.channels_of(cid) == pure.channels_of(cid)
            assert compiled.channels() == pure.channels()
            assert (len(compiled), compiled.subscriptions, compiled.connections) == (
                len(pure),
                pure.subscriptions,
                pure.connections,
            )

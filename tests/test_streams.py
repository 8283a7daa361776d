"""The stream machinery (broker/engine/streams.py) driven directly: a real
MemoryEngine is the source's sequencer, and the test decides what the live
stream delivers, when, and whether the source answers — so gaps, duplicates,
epoch changes and the races around awaits are exact."""
import asyncio

import pytest

from broker.config import Config
from broker.engine.base import Position
from broker.engine.memory import MemoryEngine
from broker.engine.streams import EPOCH_CHANGED, Streams
from broker.errors import EngineUnavailable


class Source:
    """A StreamSource over a MemoryEngine; ``gate`` holds answers back."""

    def __init__(self) -> None:
        self.home = MemoryEngine(Config())
        self.joined: set[str] = set()
        self.gate: asyncio.Event | None = None
        self.down = False
        self.fetches = 0

    async def _answer(self) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise EngineUnavailable("down")

    async def join(self, channel: str) -> Position:
        self.joined.add(channel)
        await self._answer()
        return self.home.position_now(channel)

    def leave(self, channel: str) -> None:
        self.joined.discard(channel)

    async def position(self, channel: str) -> Position:
        await self._answer()
        return self.home.position_now(channel)

    async def fetch(self, channel: str, since: int, limit: int):
        self.fetches += 1
        await self._answer()
        return self.home.history_now(channel, since, limit)

    def publish(self, channel: str, count: int) -> list[tuple[str, int, bytes]]:
        out = []
        for _ in range(count):
            position = self.home.publish_now(channel, b'{"n":%d}' % (self.home.position_now(channel).offset + 1))
            out.append((position.epoch, position.offset, b'{"n":%d}' % position.offset))
        return out


def make(source: Source | None = None, **options):
    source = source or Source()
    streams = Streams(source, catch_up_timeout=0.5, **options)
    delivered: list[int] = []
    lost: list[str] = []
    streams.deliver = lambda channel, offset, data: delivered.append(offset)
    streams.lost = lambda channel, reason: lost.append(reason)
    return source, streams, delivered, lost


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def offer(streams: Streams, items, channel: str = "bill:1") -> None:
    for epoch, offset, data in items:
        streams.offer(channel, epoch, offset, data)


def test_gap_is_repaired_before_anything_newer_and_duplicates_are_dropped():
    async def main():
        source, streams, delivered, lost = make()
        assert (await streams.position("bill:1")).offset == 0
        items = source.publish("bill:1", 8)
        offer(streams, [items[0], items[1], items[4], items[5]])   # 3 and 4 lost on the way
        offer(streams, [items[6]])                                  # arrives during the repair
        await settle()
        offer(streams, [items[5], items[7]])                        # a duplicate, then live
        assert delivered == [1, 2, 3, 4, 5, 6, 7, 8]
        assert lost == [] and streams.repairs == 1

    asyncio.run(main())


def test_what_arrives_while_joining_waits_and_older_is_dropped():
    async def main():
        source, streams, delivered, lost = make()
        before = source.publish("bill:1", 2)
        source.gate = asyncio.Event()
        waiting = asyncio.ensure_future(streams.position("bill:1"))
        await settle()
        offer(streams, before)                  # predates the position: dropped
        source.gate.set()
        position = await waiting
        assert position.offset == 2
        offer(streams, source.publish("bill:1", 1))
        assert delivered == [3] and lost == []

    asyncio.run(main())


def test_another_epoch_loses_the_stream_and_the_subscribers_are_told():
    async def main():
        source, streams, delivered, lost = make()
        await streams.position("bill:1")
        source.home = MemoryEngine(Config())   # the sequencer lost its data
        offer(streams, source.publish("bill:1", 1))
        assert lost == [EPOCH_CHANGED] and "bill:1" not in source.joined
        position = await streams.position("bill:1")   # a new subscriber gets the new epoch
        assert position == source.home.position_now("bill:1")

    asyncio.run(main())


def test_a_subscriber_never_attaches_to_a_stream_lost_while_it_waited():
    async def main():
        source, streams, delivered, lost = make()
        old = await streams.position("bill:1")
        offer(streams, source.publish("bill:1", 2))
        source.gate = asyncio.Event()
        recovering = asyncio.ensure_future(streams.recover("bill:1", old.epoch, 0))
        await settle()                              # its history fetch waits at the gate
        source.home = MemoryEngine(Config())
        offer(streams, source.publish("bill:1", 1))  # another epoch: the stream is lost
        assert lost == [EPOCH_CHANGED]
        source.gate.set()
        recovery = await recovering
        # The subscriber is answered from a fresh, current cursor (the new
        # epoch), not by the lost one it started with.
        assert recovery.recovered is False and recovery.position.epoch != old.epoch
        assert streams.cursors["bill:1"].epoch == recovery.position.epoch
        assert "bill:1" in source.joined

    asyncio.run(main())


def test_client_ahead_of_a_lagging_cursor_is_recovered_not_refused():
    async def main():
        source, streams, delivered, lost = make()
        position = await streams.position("bill:1")
        items = source.publish("bill:1", 5)
        offer(streams, items[:2])                  # this host has delivered 1..2; 3..5 in flight
        # The client saw 4 on another host: it must not hear recovered:false.
        recovery = await streams.recover("bill:1", position.epoch, 4)
        assert recovery.recovered is True
        assert recovery.position.offset >= 4
        assert [offset for offset, _ in recovery.publications] == list(range(5, recovery.position.offset + 1))
        assert delivered[:2] == [1, 2] and lost == []

    asyncio.run(main())


def test_client_ahead_of_the_source_itself_is_not_recovered():
    async def main():
        source, streams, delivered, lost = make()
        position = await streams.position("bill:1")
        source.publish("bill:1", 2)
        recovery = await streams.recover("bill:1", position.epoch, 9)
        assert recovery.recovered is False and recovery.publications == []

    asyncio.run(main())


def test_unreachable_source_stalls_the_repair_until_resync():
    async def main():
        source, streams, delivered, lost = make(stall_when_unreachable=True)
        await streams.position("bill:1")
        items = source.publish("bill:1", 4)
        source.down = True
        offer(streams, [items[0], items[3]])      # gap 2..3 while the source is down
        await settle()
        assert delivered == [1] and lost == []    # waiting, not lost
        source.down = False
        streams.resync()                          # the source is back
        await settle()
        assert delivered == [1, 2, 3, 4] and lost == []

    asyncio.run(main())


def test_resync_fetches_what_was_in_flight_when_the_stream_broke():
    async def main():
        source, streams, delivered, lost = make()
        await streams.position("bill:1")
        items = source.publish("bill:1", 3)
        offer(streams, items[:1])                 # 2 and 3 died with the connection
        streams.resync()
        await settle()
        assert delivered == [1, 2, 3] and lost == []

    asyncio.run(main())


def test_release_and_sweep_stop_following():
    async def main():
        source, streams, delivered, lost = make()
        await streams.position("bill:1")
        await streams.position("bill:2")
        streams.release("bill:1")
        assert source.joined == {"bill:2"}
        assert streams.sweep(lambda channel: False) == 1
        assert source.joined == set() and streams.cursors == {}

    asyncio.run(main())


def test_join_failure_answers_unavailable_and_leaves_nothing_behind():
    async def main():
        source, streams, delivered, lost = make()
        source.down = True
        with pytest.raises(EngineUnavailable):
            await streams.position("bill:1")
        assert streams.cursors == {} and source.joined == set()

    asyncio.run(main())


def test_our_own_publication_is_delivered_early_only_when_it_is_next():
    async def main():
        source, streams, delivered, lost = make()
        await streams.position("bill:1")
        items = source.publish("bill:1", 3)
        streams.offer_if_next("bill:1", *items[1])   # 2 before 1: not next, left to the stream
        streams.offer_if_next("bill:1", *items[0])   # next: delivered now
        offer(streams, items)                        # the stream: 1 is a duplicate, then 2, 3
        assert delivered == [1, 2, 3] and lost == [] and streams.repairs == 0

    asyncio.run(main())

"""The stream machinery's answers when the world changes during an await
(broker/engine/streams.py): a cursor lost or released while the source is
asked something, a repair that meets another epoch or an unreachable
source, a client ahead of a lagging copy that cannot be caught up. Each
source call can be held back on its own and run a hook just before it
answers, so every interleaving here is exact."""
from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from broker.config import Config
from broker.engine.base import Position
from broker.engine.memory import MemoryEngine
from broker.engine.streams import ATTEMPTS, EPOCH_CHANGED, Streams
from broker.errors import EngineUnavailable

from .test_streams import Source, offer, settle
from .test_streams import make as make_streams

CH = "bill:1"


class HeldSource(Source):
    """A Source whose join/position/fetch each wait on their own gate and
    run a one-shot hook (``hooks[name]``) right before answering."""

    def __init__(self) -> None:
        super().__init__()
        self.gates: dict[str, asyncio.Event] = {}
        self.hooks: dict[str, list[Callable[[], None]]] = {"join": [], "position": [], "fetch": []}
        self.calls: dict[str, int] = {"join": 0, "position": 0, "fetch": 0}

    async def _held(self, name: str) -> None:
        self.calls[name] += 1
        gate = self.gates.get(name)
        if gate is not None:
            await gate.wait()
        if self.hooks[name]:
            self.hooks[name].pop(0)()

    async def join(self, channel: str) -> Position:
        await self._held("join")
        return await super().join(channel)

    async def position(self, channel: str) -> Position:
        await self._held("position")
        return await super().position(channel)

    async def fetch(self, channel: str, since: int, limit: int):
        await self._held("fetch")
        return await super().fetch(channel, since, limit)


def make(**options):
    """``test_streams.make`` over a source whose calls can be held back."""
    return make_streams(HeldSource(), **options)


def lose_soon(streams: Streams, channel: str = CH) -> Callable[[], None]:
    """A hook for join: right after the cursor goes live (before its
    subscriber resumes), a publication of another epoch loses it."""
    loop = asyncio.get_running_loop()
    return lambda: loop.call_soon(streams.offer, channel, "another-epoch", 1, b"{}")


def test_a_stream_lost_every_time_it_goes_live_answers_unavailable():
    async def main():
        source, streams, delivered, lost = make()
        source.hooks["join"] = [lose_soon(streams) for _ in range(2 * ATTEMPTS)]
        with pytest.raises(EngineUnavailable, match="keeps being lost"):
            await streams.position(CH)
        with pytest.raises(EngineUnavailable, match="keeps being lost"):
            await streams.recover(CH, "e", 0)
        assert source.calls["join"] == 2 * ATTEMPTS and lost == [EPOCH_CHANGED] * (2 * ATTEMPTS)
        assert streams.cursors == {}

    asyncio.run(main())


def test_recover_retries_on_a_fresh_cursor_when_the_stream_is_lost_while_asking_the_source():
    async def main():
        source, streams, delivered, lost = make()
        first = await streams.position(CH)
        items = source.publish(CH, 3)
        offer(streams, items[:1])
        # The client saw 3 elsewhere; while this shard asks the source, the stream is lost.
        source.hooks["position"] = [lambda: streams.offer(CH, "another-epoch", 9, b"{}")]
        recovery = await streams.recover(CH, first.epoch, 3)
        assert lost == [EPOCH_CHANGED] and source.calls["join"] == 2
        # The fresh cursor starts where the source stands: nothing to recover.
        assert recovery.recovered is True and recovery.position.offset == 3 and recovery.publications == []

    asyncio.run(main())


def test_live_stream_catching_up_while_the_source_answers_needs_no_repair():
    async def main():
        source, streams, delivered, lost = make()
        first = await streams.position(CH)
        items = source.publish(CH, 3)
        offer(streams, items[:1])
        source.hooks["position"] = [lambda: offer(streams, items[1:])]
        recovery = await streams.recover(CH, first.epoch, 3)
        assert recovery.recovered is True and recovery.publications == []
        assert delivered == [1, 2, 3] and streams.repairs == 0 and source.calls["fetch"] == 0

    asyncio.run(main())


def test_a_copy_that_cannot_catch_up_in_time_refuses_the_client():
    async def main():
        source, streams, delivered, lost = make()
        first = await streams.position(CH)
        items = source.publish(CH, 5)
        offer(streams, items[:2])
        source.gates["fetch"] = asyncio.Event()          # the repair towards 5 hangs
        with pytest.raises(EngineUnavailable, match="behind the client"):
            await streams.recover(CH, first.epoch, 4)
        assert streams.cursors[CH].waiters == [] and delivered == [1, 2]
        source.gates["fetch"].set()                      # the repair ends after all
        await settle()
        assert delivered == [1, 2, 3, 4, 5] and lost == []

    asyncio.run(main())


def test_a_stream_lost_during_catch_up_wakes_the_client_who_retries():
    async def main():
        source, streams, delivered, lost = make()
        first = await streams.position(CH)
        items = source.publish(CH, 5)
        offer(streams, items[:2])
        source.gates["fetch"] = asyncio.Event()
        recovering = asyncio.ensure_future(streams.recover(CH, first.epoch, 4))
        await settle()
        assert len(streams.cursors[CH].waiters) == 1
        source.home = MemoryEngine(Config())             # the repair will meet another epoch
        source.publish(CH, 1)
        source.gates["fetch"].set()
        recovery = await asyncio.wait_for(recovering, 5)
        assert lost == [EPOCH_CHANGED]
        assert recovery.recovered is False and recovery.position == source.home.position_now(CH)

    asyncio.run(main())


def test_history_trimmed_past_the_client_is_not_recovered():
    async def main():
        source, streams, delivered, lost = make()
        first = await streams.position(CH)
        kept = Config().namespaces["bill"].history_size
        offer(streams, source.publish(CH, kept + 20))
        recovery = await streams.recover(CH, first.epoch, 2)
        assert recovery.recovered is False and recovery.position.offset == kept + 20

    asyncio.run(main())


def test_client_ahead_of_a_stalled_repair_resumes_it():
    async def main():
        source, streams, delivered, lost = make(stall_when_unreachable=True)
        first = await streams.position(CH)
        items = source.publish(CH, 4)
        source.down = True
        offer(streams, [items[0], items[3]])   # gap 2..3, the source is down: stalled
        await settle()
        assert streams.cursors[CH].stalled and delivered == [1]
        source.down = False
        recovery = await streams.recover(CH, first.epoch, 3)   # its catch-up resumes the repair
        assert recovery.recovered is True and delivered == [1, 2, 3, 4] and lost == []

    asyncio.run(main())


def test_client_ahead_during_a_repair_rechecks_the_source_after_it():
    async def main():
        source, streams, delivered, lost = make()
        first = await streams.position(CH)
        items = source.publish(CH, 6)
        source.gates["fetch"] = asyncio.Event()
        offer(streams, [items[0], items[2]])       # a repair up to 2 starts, held
        await settle()
        recovering = asyncio.ensure_future(streams.recover(CH, first.epoch, 5))
        await settle()
        assert streams.cursors[CH].recheck         # 4..6 only the source knows of
        source.gates["fetch"].set()
        recovery = await asyncio.wait_for(recovering, 5)
        assert recovery.recovered is True and delivered == [1, 2, 3, 4, 5, 6] and lost == []
        assert streams.repairs == 2

    asyncio.run(main())


def test_resync_skips_unwanted_streams_and_marks_a_repair_in_progress():
    async def main():
        source, streams, delivered, lost = make()
        await streams.position(CH)
        await streams.position("bill:2")
        items = source.publish(CH, 4)
        source.publish("bill:2", 2)
        source.gates["fetch"] = asyncio.Event()
        offer(streams, [items[0], items[2]])      # bill:1 is repairing, held
        await settle()
        streams.resync(CH.__eq__)                 # bill:2 is not wanted; bill:1 rechecks after its repair
        assert streams.cursors[CH].recheck and streams.cursors["bill:2"].state == 1
        streams.offer("user:9", "e", 1, b"{}")    # nobody follows it: ignored
        source.gates["fetch"].set()
        await settle()
        assert delivered == [1, 2, 3, 4] and lost == [] and "user:9" not in streams.cursors
        assert streams.cursors["bill:2"].offset == 0   # never resynced

    asyncio.run(main())


def test_backlog_after_a_repair_stops_at_a_loss_and_requeues_behind_a_new_gap():
    async def main():
        source, streams, delivered, lost = make()
        await streams.position(CH)
        items = source.publish(CH, 8)
        source.gates["fetch"] = asyncio.Event()
        offer(streams, [items[0], items[3]])              # repair 2..3, held; 4 waits
        offer(streams, [items[6], items[7]])              # 7 will be a new gap, 8 waits behind it
        await settle()
        source.gates["fetch"].set()
        await settle()
        assert delivered == [1, 2, 3, 4, 5, 6, 7, 8] and streams.repairs == 2 and lost == []

        source.gates["fetch"] = asyncio.Event()
        more = source.publish(CH, 2)
        offer(streams, [more[1]])                          # repair of 9, held
        streams.offer(CH, "another-epoch", 11, b"{}")      # waits, then loses the stream
        offer(streams, [source.publish(CH, 1)[0]])         # 11: after the loss, never fed
        source.gates["fetch"].set()
        await settle()
        assert delivered[8:] == [9, 10] and lost == [EPOCH_CHANGED] and CH not in streams.cursors

    asyncio.run(main())


def test_a_cursor_released_during_its_repair_is_left_alone():
    async def main():
        source, streams, delivered, lost = make()
        await streams.position(CH)
        items = source.publish(CH, 3)
        source.gates["fetch"] = asyncio.Event()
        offer(streams, [items[0], items[2]])
        await settle()
        streams.release(CH)                                # the last subscriber left
        source.gates["fetch"].set()
        await settle()
        assert delivered == [1] and lost == [] and streams.cursors == {}

    asyncio.run(main())


def test_resync_against_an_unreachable_source_loses_or_stalls():
    async def main():
        source, streams, delivered, lost = make()
        await streams.position(CH)
        source.down = True
        streams.resync()
        await settle()
        assert len(lost) == 1 and lost[0].startswith("source unreachable") and streams.cursors == {}

        source, streams, delivered, lost = make(stall_when_unreachable=True)
        await streams.position(CH)
        source.down = True
        streams.resync()
        await settle()
        assert lost == [] and streams.cursors[CH].stalled
        source.down = False
        offer(streams, source.publish(CH, 2)[1:])          # 2 arrives: 1 was in flight
        streams.resync()
        await settle()
        assert delivered == [1, 2] and lost == []

    asyncio.run(main())


def test_resync_of_a_cursor_released_or_replaced_meanwhile():
    async def main():
        source, streams, delivered, lost = make()
        await streams.position(CH)
        source.gates["position"] = asyncio.Event()
        streams.resync()
        await settle()
        streams.release(CH)                 # released while the source is asked
        source.down = True                  # and the source fails: nothing left to lose
        source.gates["position"].set()
        await settle()
        assert lost == [] and streams.lost_streams == 0

        source.down = False
        del source.gates["position"]
        await streams.position(CH)
        source.gates["position"] = asyncio.Event()
        streams.resync()
        await settle()
        streams.release(CH)                 # released while the source is asked; it answers
        source.gates["position"].set()
        await settle()
        assert lost == [] and source.calls["fetch"] == 0

        del source.gates["position"]
        await streams.position(CH)
        source.home = MemoryEngine(Config())   # the source restarted without its data
        streams.resync()
        await settle()
        assert lost == [EPOCH_CHANGED] and streams.cursors == {}

    asyncio.run(main())

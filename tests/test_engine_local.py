"""The in-process engines around their main paths: MemoryEngine compacting
its journal (scheduled by the shard, or at the idle sweep) and answering
503 when the journal cannot be written; the Engine base class's defaults
for engines that keep no extra state; ClusterEngine's history of a channel
homed elsewhere, a restarted home's resync and an unknown request."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from broker.config import Config
from broker.engine.base import Engine, Position, Recovery
from broker.engine.journal import Journal
from broker.engine.memory import MemoryEngine
from broker.errors import EngineUnavailable

from .test_cluster_engine import channel_homed_on, make, stream


def nobody(channel: str) -> bool:
    return False


def small_history() -> Config:
    config = Config(shards=1)
    config.namespaces["bill"].history_size = 5   # the journal holds more than is retained
    return config


def journaled(tmp_path, max_bytes: int = 2000) -> tuple[MemoryEngine, list[Callable[[], None]]]:
    engine = MemoryEngine(small_history(), journal=Journal(str(tmp_path / "journal"), max_bytes=max_bytes))
    scheduled: list[Callable[[], None]] = []
    engine.schedule = scheduled.append
    return engine, scheduled


def reopened(tmp_path, engine: MemoryEngine) -> MemoryEngine:
    engine._journal.close()
    return MemoryEngine(small_history(), journal=Journal(str(tmp_path / "journal")))


def test_a_growing_journal_schedules_one_compaction_that_keeps_the_state(tmp_path):
    engine, scheduled = journaled(tmp_path)
    for n in range(60):
        engine.publish_now(f"bill:{n % 3}", b'{"n":%d,"pad":"%s"}' % (n, b"x" * 40))
    assert len(scheduled) == 1                    # once, however many appends follow
    journal = engine._journal
    before = journal.size
    scheduled.pop()()
    assert journal.size < before and not journal.needs_compaction
    engine.publish_now("bill:0", b'{"n":60}')
    replacement = reopened(tmp_path, engine)
    for n in range(3):
        assert replacement.position_now(f"bill:{n}") == engine.position_now(f"bill:{n}")
        assert replacement.history_now(f"bill:{n}", 0, 100) == engine.history_now(f"bill:{n}", 0, 100)


def test_without_a_scheduler_the_idle_sweep_compacts(tmp_path):
    engine, _ = journaled(tmp_path)
    engine.schedule = None
    for n in range(60):
        engine.publish_now("bill:1", b'{"n":%d,"pad":"%s"}' % (n, b"x" * 40))
    before = engine._journal.size
    assert engine.sweep(nobody) == 0              # bill:1 still has history
    assert engine._journal.size < before
    assert reopened(tmp_path, engine).position_now("bill:1").offset == 60


def test_a_journal_that_cannot_be_written_answers_unavailable_and_the_sweep_goes_on(tmp_path, caplog):
    engine, _ = journaled(tmp_path, max_bytes=1 << 20)
    engine.position_now("bill:empty")
    engine._journal.close()                       # e.g. the disk went away
    with pytest.raises(EngineUnavailable, match="cannot write the journal"):
        engine.publish_now("bill:1", b"1")
    with caplog.at_level(logging.WARNING, logger="broker.engine.memory"):
        assert engine.sweep(nobody) == 1          # dropped here even though not journaled
    assert "idle sweep" in caplog.text and "cannot write the journal" in caplog.text


def test_memory_engine_async_calls_and_defaults():
    async def main() -> None:
        engine = MemoryEngine(Config(shards=1))
        engine.compact()                          # no journal: nothing to do
        positions = await engine.publish_many([("bill:1", b"1"), ("bill:2", b"2"), ("bill:1", b"3")])
        assert [p.offset for p in positions] == [1, 1, 2]
        first = positions[0]
        recovery = await engine.recover("bill:1", first.epoch, 1)
        assert recovery.recovered and recovery.publications == [(2, b"3")]
        assert await engine.history("bill:1", 0, 10) == (Position(first.epoch, 2), [(1, b"1"), (2, b"3")])
        assert await engine.presence("bill:1") is None    # only the Redis engine tracks presence

    asyncio.run(main())


class Minimal(Engine):
    """An engine implementing only what is abstract, over a MemoryEngine."""

    def __init__(self) -> None:
        self.store = MemoryEngine(Config(shards=1))

    async def publish(self, channel: str, data_json: bytes) -> Position:
        return self.store.publish_now(channel, data_json)

    async def position(self, channel: str) -> Position:
        return self.store.position_now(channel)

    async def recover(self, channel: str, epoch: str, offset: int) -> Recovery:
        return self.store.recover_now(channel, epoch, offset)

    async def history(self, channel: str, since: int, limit: int):
        return self.store.history_now(channel, since, limit)

    def ready(self) -> bool:
        return True


def test_base_engine_defaults_keep_nothing_extra():
    engine = Minimal()
    positions = asyncio.run(engine.publish_many([("bill:1", b"1"), ("bill:1", b"2")]))
    assert [p.offset for p in positions] == [1, 2]
    assert engine.sweep(nobody) == 0 and engine.rebound() == 0 and engine.stats() == {}
    engine.release("bill:1")
    engine.resync_home(0)
    engine.fence()
    assert asyncio.run(engine.presence("bill:1")) is None
    assert asyncio.run(engine.close()) is None


def test_cluster_history_from_the_home_resync_after_a_home_restart_and_unknown_requests():
    async def main() -> None:
        home, engine, delivered, lost = make()
        assert engine.deliver is engine.local.deliver and engine.lost is engine.streams.lost
        channel = channel_homed_on(0)
        start = await engine.position(channel)
        for n in range(3):
            home.local.publish_now(channel, b"%d" % n)
        position, publications = await engine.history(channel, 1, 10)   # asked of the home shard
        assert position == Position(start.epoch, 3) and publications == [(2, b"1"), (3, b"2")]
        stream(home, engine, channel, [1])          # 2 and 3 died with the old home process
        engine.resync_home(0)
        for _ in range(20):
            await asyncio.sleep(0)
        assert delivered == [1, 2, 3] and lost == []
        assert home._on_request(b"NOPE", []) == [b"err", b"unknown request NOPE"]

    asyncio.run(main())

"""The Redis engine against a real redis-server (started on a free port):
the round trip of one publication, and publications per second when many
arrive in the same loop turn (pipelined: one round trip for the batch),
in the same run so the ratio is what counts; and the CPU one shard spends
to follow a channel over its SSUBSCRIBE link (the fan-in group: this
process's CPU time, Redis's excluded).

    python -m pytest benchmarks/test_bench_redis.py --benchmark-enable --benchmark-columns=median,ops
"""
from __future__ import annotations

import asyncio
import time

import pytest

from broker.config import Config
from broker.engine.redis import RedisEngine
from broker.server import new_loop
from tests.redis_helpers import RedisServer

BATCH = 1_000
DATA = b'{"bill":42,"title":"An act to improve the benchmarks","ts":1700000000000000000,"x":"' + b"y" * 100 + b'"}'


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    loop = new_loop()  # uvloop, as in a shard
    engine = RedisEngine(Config(redis_url=server.url), loop)

    async def ready() -> None:
        while not engine.ready():
            await asyncio.sleep(0.05)

    loop.run_until_complete(asyncio.wait_for(ready(), 10))
    yield engine, loop
    loop.run_until_complete(engine.close())
    loop.close()
    server.stop()


@pytest.mark.benchmark(group="redis engine: 1k publications")
def test_publish_one_round_trip_each(benchmark, engine):
    """1,000 publications, each awaited before the next (1 round trip each)."""
    redis_engine, loop = engine

    async def one_by_one() -> None:
        for _ in range(BATCH):
            await redis_engine.publish("bill:bench-seq", DATA)

    benchmark.pedantic(lambda: loop.run_until_complete(one_by_one()), rounds=5, iterations=1)


@pytest.mark.benchmark(group="redis engine: 1k publications")
def test_publish_pipelined(benchmark, engine):
    """1,000 publications issued in one loop turn (one pipeline)."""
    redis_engine, loop = engine
    channels = [f"bill:bench-{i % 50}" for i in range(BATCH)]

    async def together() -> None:
        positions = await asyncio.gather(*(redis_engine.publish(c, DATA) for c in channels))
        assert len(positions) == BATCH

    benchmark.pedantic(lambda: loop.run_until_complete(together()), rounds=5, iterations=1)


@pytest.fixture(scope="module")
def follower(engine):
    """A second engine on the same Redis and loop: another shard that follows a channel."""
    _, loop = engine
    config = engine[0].config
    other = RedisEngine(config, loop)
    received = {"count": 0}

    def deliver(channel: str, offset: int, data: bytes) -> None:
        received["count"] += 1

    other.deliver = deliver

    async def ready() -> None:
        while not other.ready():
            await asyncio.sleep(0.05)
        await other.position("bill:bench-followed")  # SSUBSCRIBE: from now on its copy arrives here

    loop.run_until_complete(asyncio.wait_for(ready(), 10))
    yield other, received
    loop.run_until_complete(other.close())


@pytest.mark.benchmark(group="redis engine: 1k publications on one channel, fan-in (CPU time)",
                        timer=time.process_time)
def test_publish_pipelined_nobody_follows(benchmark, engine):
    """1,000 publications to one channel in one loop turn; no shard follows it."""
    redis_engine, loop = engine

    async def together() -> None:
        await asyncio.gather(*(redis_engine.publish("bill:bench-unfollowed", DATA) for _ in range(BATCH)))

    benchmark.pedantic(lambda: loop.run_until_complete(together()), rounds=5, iterations=1)


@pytest.mark.benchmark(group="redis engine: 1k publications on one channel, fan-in (CPU time)",
                        timer=time.process_time)
def test_publish_pipelined_another_shard_follows(benchmark, engine, follower):
    """The same, followed by another shard (over its SSUBSCRIBE link), until
    it has delivered all 1,000: the difference is one shard's fan-in cost."""
    redis_engine, loop = engine
    _, received = follower

    async def together() -> None:
        target = received["count"] + BATCH
        await asyncio.gather(*(redis_engine.publish("bill:bench-followed", DATA) for _ in range(BATCH)))
        while received["count"] < target:
            await asyncio.sleep(0)

    benchmark.pedantic(lambda: loop.run_until_complete(together()), rounds=5, iterations=1)

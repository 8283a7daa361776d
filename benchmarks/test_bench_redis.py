"""The Redis engine against a real redis-server (started on a free port):
the round trip of one publication, and publications per second when many
arrive in the same loop turn (pipelined: one round trip for the batch),
in the same run so the ratio is what counts.

    python -m pytest benchmarks/test_bench_redis.py --benchmark-enable --benchmark-columns=median,ops
"""
from __future__ import annotations

import asyncio

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

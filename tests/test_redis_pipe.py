"""The engine's pipelined Redis connection, against a real redis-server:
replies matched to their batches in order (hiredis's parser and the
Python one), errors per call, and a Redis that stops answering."""
from __future__ import annotations


import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from broker.engine.redis_pipe import Pipe, _PyReader
from broker.engine.redis_store import pack_command
from broker.server import new_loop
from tests.redis_helpers import RedisServer

pytestmark = pytest.mark.timeout(60)

REPLIES = (b"+OK\r\n:42\r\n$-1\r\n*3\r\n$5\r\nhello\r\n:-7\r\n*1\r\n$0\r\n\r\n"
           b"-NOSCRIPT No matching script\r\n*-1\r\n")
PARSED = [b"OK", 42, None, [b"hello", -7, [b""]], "NOSCRIPT No matching script", None]


def test_the_python_reader_parses_resp2_fed_one_byte_at_a_time():
    reader = _PyReader()
    replies = []
    for i in range(len(REPLIES)):
        reader.feed(REPLIES[i:i + 1])
        while (reply := reader.gets()) is not False:
            replies.append(str(reply) if isinstance(reply, ResponseError) else reply)
    assert replies == PARSED


@pytest.fixture
def server(tmp_path):
    redis = RedisServer(tmp_path).start()
    yield redis
    redis.stop()


def _pipe(loop, url: str, timeout: float = 2.0) -> Pipe:
    pool = Redis.from_url(url, protocol=2).connection_pool
    return Pipe(loop, lambda: pool.connection_class(**pool.connection_kwargs), timeout, "test")


def test_batches_get_their_own_replies_in_order_and_errors_per_call(server):
    loop = new_loop()

    async def run() -> None:
        pipe = _pipe(loop, server.url)
        first = pipe.request(b"".join(pack_command(("INCR", "n")) for _ in range(3)), 3)  # sent while connecting
        await first
        second = pipe.request(pack_command(("INCR", "n")) + pack_command(("HGET", "n", "x")), 2)
        third = pipe.request(pack_command(("INCR", "n")), 1)
        assert await first == [1, 2, 3]
        offset, error = await second
        assert offset == 4 and isinstance(error, ResponseError) and "WRONGTYPE" in str(error)
        assert await third == [5]
        assert not pipe.closed
        pipe.close()
        with pytest.raises(ConnectionError):
            await pipe.request(pack_command(("PING",)), 1)

    loop.run_until_complete(run())
    loop.close()


def test_a_redis_that_stops_answering_fails_the_batch_and_closes_the_pipe(server):
    loop = new_loop()

    async def run() -> None:
        pipe = _pipe(loop, server.url, timeout=0.5)
        assert await pipe.request(pack_command(("PING",)), 1) == [b"PONG"]
        server.pause()
        try:
            with pytest.raises(TimeoutError):
                await pipe.request(pack_command(("PING",)), 1)
            assert pipe.closed  # its replies could no longer be matched
        finally:
            server.resume()
        fresh = _pipe(loop, server.url)
        assert await fresh.request(pack_command(("PING",)), 1) == [b"PONG"]
        fresh.close()

    loop.run_until_complete(run())
    loop.close()


def test_a_redis_that_is_not_there_fails_every_waiting_batch(server):
    loop = new_loop()
    server.stop()

    async def run() -> None:
        pipe = _pipe(loop, server.url)
        with pytest.raises(ConnectionError, match="cannot connect"):
            await pipe.request(pack_command(("PING",)), 1)
        assert pipe.closed

    loop.run_until_complete(run())
    loop.close()

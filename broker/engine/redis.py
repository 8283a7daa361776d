"""The Redis engine: many hosts, one sequence per channel.

Redis sequences every channel and keeps its history (``RedisStore``: one
atomic script per publication), so offsets, epochs and history are the same
on every host, and any shard of any host may publish straight to Redis.
Each shard follows the channels its connections subscribe to over sharded
pub/sub (``Links``); its cursors (``Streams``) keep each copy gapless and
repair gaps from the history in Redis. Local subscribers are fed from that
stream only, so a publication reaches the publishing host's clients in the
same order and with the same offsets as everyone else's.

When Redis is unreachable, ``ready()`` is False: publishes and subscribes
answer 503, connected clients stay connected. When it returns, every stream
is checked against Redis: missed publications are fetched from history; a
channel whose history was lost (a new epoch) is a lost stream, which its
subscribers are told about (then they recover and learn ``recovered:false``).
"""
from __future__ import annotations

import asyncio
import json
import logging
import zlib
from typing import Any, Callable

from ..config import Config
from .base import Engine, Position, Recovery
from .redis_pubsub import Links
from .redis_store import Codec, RedisStore
from .streams import Streams

__all__ = ["RedisEngine", "RedisSource"]

log = logging.getLogger("broker.engine.redis")


class RedisSource:
    """Redis as the ``StreamSource`` of ``Streams``: join = SSUBSCRIBE,
    confirmed, then the channel's position (so every publication after it
    reaches the link)."""

    def __init__(self, store: RedisStore, links: Links) -> None:
        self.store = store
        self.links = links
        self.keys = store.keys

    async def join(self, channel: str) -> Position:
        await self.links.subscribe(self.keys.topic(channel))
        return (await self.store.read(channel, 0, 0))[0]

    def leave(self, channel: str) -> None:
        self.links.unsubscribe(self.keys.topic(channel))

    async def position(self, channel: str) -> Position:
        return (await self.store.read(channel, 0, 0))[0]

    async def fetch(self, channel: str, since: int, limit: int) -> tuple[Position, list[tuple[int, bytes]]]:
        return await self.store.read(channel, since, limit)


class RedisEngine(Engine):
    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop | None = None,
                 router: Any = None) -> None:
        self.config = config
        self.loop = loop or asyncio.get_event_loop()
        self.store = RedisStore(config, self.loop)
        self.keys = self.store.keys
        self.links = Links(self.loop, self.store.client, self._on_message, self._on_restored,
                           config.redis.timeout, config.redis.reconnect_backoff_max)
        self.streams = Streams(RedisSource(self.store, self.links),
                               catch_up_timeout=config.redis.timeout, stall_when_unreachable=True)
        self.store.on_recovered = self._on_recovered
        self.malformed = 0
        # The shard's own stats, for another shard's /api/stats (set by the shard).
        self.stats_provider: Callable[[], dict[str, Any]] = dict
        self.router = router
        if router is not None:
            router.on_request = self._on_request
        self.store.start()

    # The shard sets ``deliver`` and ``lost``; the cursors call them.
    @property
    def deliver(self):  # type: ignore[override]
        return self.streams.deliver

    @deliver.setter
    def deliver(self, fn) -> None:  # type: ignore[override]
        self.streams.deliver = fn

    @property
    def lost(self):  # type: ignore[override]
        return self.streams.lost

    @lost.setter
    def lost(self, fn) -> None:  # type: ignore[override]
        self.streams.lost = fn

    # ------------------------------------------------------------ Engine API
    async def publish(self, channel: str, data_json: bytes) -> Position:
        return await self.store.publish(channel, data_json)

    async def position(self, channel: str) -> Position:
        return await self.streams.position(channel)

    async def recover(self, channel: str, epoch: str, offset: int) -> Recovery:
        return await self.streams.recover(channel, epoch, offset)

    async def history(self, channel: str, since: int, limit: int) -> tuple[Position, list[tuple[int, bytes]]]:
        return await self.store.read(channel, since, limit)

    def ready(self) -> bool:
        return self.store.healthy and self.links.up

    def release(self, channel: str) -> None:
        self.streams.release(channel)

    def sweep(self, is_active: Callable[[str], bool]) -> int:
        return self.streams.sweep(is_active)

    def stats(self) -> dict[str, int]:
        return {**self.streams.stats(), **self.store.stats(),
                "redis_reconnects": self.links.reconnects, "redis_malformed": self.malformed}

    async def close(self) -> None:
        await self.links.close()
        await self.store.close()
        if self.router is not None:
            self.router.close()

    # --------------------------------------------------------------- stream
    def _on_message(self, topic: bytes, payload: bytes) -> None:
        """One publication from Redis: ``epoch:offset:`` then the codec's payload."""
        try:
            epoch, offset, data = payload.split(b":", 2)
            channel = self.keys.channel_of(topic)
            self.streams.offer(channel, epoch.decode(), int(offset), Codec.decode(data))
        except (ValueError, UnicodeDecodeError, zlib.error) as exc:  # not ours: never let it stop the link
            self.malformed += 1
            log.warning("malformed publication on %r: %s", topic, exc)

    def _on_restored(self, topics: set[bytes]) -> None:
        """A link is back: repair the channels it carries from history (if
        Redis does not answer commands yet, its recovery resyncs everything)."""
        if not self.store.healthy:
            return
        channels = {self.keys.channel_of(topic) for topic in topics}
        self.streams.resync(channels.__contains__)

    def _on_recovered(self) -> None:
        """Redis answers again (after an outage or a pause): every stream is
        checked, since publications may have been lost on the way."""
        self.streams.resync()

    # ------------------------------------------------- serving other shards
    def _on_request(self, verb: bytes, args: list[bytes]) -> list[bytes]:
        from ..router import ERR, OK

        if verb == b"STATS":
            return [OK, json.dumps(self.stats_provider()).encode()]
        return [ERR, b"unknown request " + verb]

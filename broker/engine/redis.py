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
import os
import socket
import zlib
from typing import Any
from collections.abc import Callable

from .. import eager
from ..config import Config
from .base import DeliverFn, Engine, Position, Recovery
from .redis_pubsub import Links
from .redis_store import Codec, RedisStore
from .streams import Streams

__all__ = ["RedisEngine", "RedisSource", "shard_presence"]

log = logging.getLogger("broker.engine.redis")


def shard_presence(shard: Any) -> Callable[[str], tuple[int, list[str]]]:
    """A shard's subscribers of a channel and their user ids, for presence
    (read from its subscription tables and its sessions' identities)."""
    def read(channel: str) -> tuple[int, list[str]]:
        count, users = 0, set()
        for table in shard._tables.values():  # one per adapter
            ids = list(table.subscribers(channel))  # a copy: the view must not be kept
            count += len(ids)
            for cid in ids:
                identity = getattr(shard.sessions[cid], "identity", None)
                if identity is not None and identity.user is not None:
                    users.add(identity.user)
        return count, sorted(users)
    return read


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
        # Presence: ``local_presence(channel) -> (subscribers, user ids)`` of
        # this shard (set by whoever builds the shard); each shard keeps its
        # own entry per channel in Redis, refreshed before it expires.
        self.local_presence: Callable[[str], tuple[int, list[str]]] | None = None
        self.presence_id = f"{socket.gethostname()}:{os.getpid()}"
        self._presence_sent: dict[str, tuple[bytes, float]] = {}
        self.store.start()
        self._presence_task = self.loop.create_task(self._presence_loop())

    # The shard sets ``deliver`` and ``lost``; the cursors call them.
    @property
    def deliver(self) -> DeliverFn:
        return self.streams.deliver

    @deliver.setter
    def deliver(self, fn: DeliverFn) -> None:
        self.streams.deliver = fn

    @property
    def lost(self) -> Callable[[str, str], None]:
        return self.streams.lost

    @lost.setter
    def lost(self, fn: Callable[[str, str], None]) -> None:
        self.streams.lost = fn

    # ------------------------------------------------------------ Engine API
    async def publish(self, channel: str, data_json: bytes) -> Position:
        position = await self.store.publish(channel, data_json)
        # Our own subscribers need not wait for the pub/sub copy (which then
        # is a duplicate) when this is exactly the next offset they expect.
        self.streams.offer_if_next(channel, position.epoch, position.offset, data_json)
        return position

    async def publish_many(self, items: list[tuple[str, bytes]]) -> list[Position]:
        """Every item in one pipelined write: the store batches the calls of
        one loop turn, and it sends them in call order (so per channel too)."""
        loop = self.loop
        return list(await asyncio.gather(*(eager.begin(loop, self.publish(channel, data))
                                           for channel, data in items)))

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

    async def presence(self, channel: str) -> dict[str, object] | None:
        entries = await self.store.presence_read(channel)
        subscribers, users = 0, set[str]()
        for value in entries.values():
            try:
                entry = json.loads(value)
                subscribers += int(entry["n"])
                users.update(str(user) for user in entry["u"])
            except (ValueError, KeyError, TypeError):
                self.malformed += 1
        return {"channel": channel, "subscribers": subscribers, "users": sorted(users)}

    async def _presence_loop(self) -> None:
        """Write this shard's presence entries that changed (or are due for a
        refresh), and remove those of channels it no longer follows."""
        ttl = self.config.redis.presence_ttl
        interval = min(1.0, ttl / 3)
        while True:
            await asyncio.sleep(interval)
            if self.local_presence is None or not self.store.healthy:
                continue
            now = self.loop.time()
            writes = []
            for channel in list(self.streams.cursors):
                count, users = self.local_presence(channel)
                value = json.dumps({"n": count, "u": users}, separators=(",", ":")).encode()
                sent = self._presence_sent.get(channel)
                if count and (sent is None or sent[0] != value or now - sent[1] > ttl / 3):
                    self._presence_sent[channel] = (value, now)
                    writes.append(self.store.presence_set(channel, self.presence_id, value, ttl))
                elif not count and sent is not None:
                    del self._presence_sent[channel]
                    writes.append(self.store.presence_set(channel, self.presence_id, b"", ttl))
            for channel in [c for c in self._presence_sent if c not in self.streams.cursors]:
                del self._presence_sent[channel]
                writes.append(self.store.presence_set(channel, self.presence_id, b"", ttl))
            for result in await asyncio.gather(*writes, return_exceptions=True):
                if isinstance(result, BaseException):
                    self._presence_sent.clear()  # rewrite everything once Redis answers
                    break

    async def close(self) -> None:
        self._presence_task.cancel()
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
        except Exception:  # delivering failed: one message must not cost the whole link
            log.exception("delivering a publication of %r failed", topic)

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

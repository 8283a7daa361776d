"""The engine of one shard among several on a host.

Each channel has a home shard (a stable hash of its name) that sequences
it with its own ``MemoryEngine``. A publication that enters elsewhere is
forwarded to the home shard, which stores it, answers with its offset and
sends it on the ZeroMQ stream to the shards that subscribed to it.

For a channel homed elsewhere a shard follows the home's stream through
the one stream machinery (``broker.engine.streams.Streams``, shared with the
Redis engine): ``HomeSource`` is the home shard as its source (join =
subscribe the topic, then a sync on the stream itself; history = ``HIST``
requests). Duplicates are dropped, gaps repaired from the home's history,
and an epoch change or a gap the history lost ends the stream for the local
subscribers (``lost``) — never silently skipped.
"""
from __future__ import annotations

import asyncio

import json
import zlib
from typing import Any
from collections.abc import Callable

from .. import eager
from ..config import Config
from ..router import ERR, OK, Router
from .base import DeliverFn, Engine, Position, Recovery
from .memory import MemoryEngine
from .streams import LIVE, Streams

__all__ = ["ClusterEngine", "HomeSource", "home_of"]


def home_of(channel: str, shards: int) -> int:
    """The shard that sequences ``channel``: stable across processes and restarts."""
    return zlib.crc32(channel.encode()) % shards


class HomeSource:
    """The home shards of a host as the ``StreamSource`` of ``Streams``."""

    def __init__(self, router: Router, shards: int) -> None:
        self.router = router
        self.shards = shards

    async def join(self, channel: str) -> Position:
        # The sync answer travels on the channel's own stream, after the
        # subscription: every publication after it follows on the same pipe.
        self.router.subscribe(channel)
        epoch, offset = await self.router.sync(home_of(channel, self.shards), channel)
        return Position(epoch, offset)

    def leave(self, channel: str) -> None:
        self.router.unsubscribe(channel)

    async def position(self, channel: str) -> Position:
        epoch, offset = await self.router.sync(home_of(channel, self.shards), channel)
        return Position(epoch, offset)

    async def fetch(self, channel: str, since: int, limit: int) -> tuple[Position, list[tuple[int, bytes]]]:
        epoch, last, *flat = await self.router.request(
            home_of(channel, self.shards), b"HIST", channel.encode(), b"%d" % since, b"%d" % max(1, limit))
        publications = [(int(flat[i]), flat[i + 1]) for i in range(0, len(flat), 2)]
        return Position(epoch.decode(), int(last)), publications


class ClusterEngine(Engine):
    def __init__(self, config: Config, shard_id: int, shards: int, router: Router,
                 local: MemoryEngine | None = None) -> None:
        self.config = config
        self.id = shard_id
        self.shards = shards
        self.router = router
        self.local = local or MemoryEngine(config)
        self.local.forward = router.publish
        self.streams = Streams(HomeSource(router, shards), catch_up_timeout=config.cluster.request_timeout)
        # The shard's own stats, for another shard's /api/stats (set by the shard).
        self.stats_provider: Callable[[], dict[str, Any]] = dict
        router.on_publication = self._on_publication
        router.on_sync_request = self._on_sync_request
        router.on_request = self._on_request

    # The shard sets ``deliver`` and ``lost``: channels homed here deliver
    # through the memory engine, the others through their streams.
    @property
    def deliver(self) -> DeliverFn:
        return self.local.deliver

    @deliver.setter
    def deliver(self, fn: DeliverFn) -> None:
        self.local.deliver = fn
        self.streams.deliver = fn

    @property
    def lost(self) -> Callable[[str, str], None]:
        return self.streams.lost

    @lost.setter
    def lost(self, fn: Callable[[str, str], None]) -> None:
        self.streams.lost = fn

    @property
    def repairs(self) -> int:
        return self.streams.repairs

    @property
    def lost_streams(self) -> int:
        return self.streams.lost_streams

    def home(self, channel: str) -> int:
        return home_of(channel, self.shards)

    # ------------------------------------------------------------ Engine API
    async def publish(self, channel: str, data_json: bytes) -> Position:
        home = self.home(channel)
        if home == self.id:
            return self.local.publish_now(channel, data_json)
        epoch, offset = await self.router.request(home, b"PUB", channel.encode(), data_json)
        return Position(epoch.decode(), int(offset))

    async def publish_many(self, items: list[tuple[str, bytes]]) -> list[Position]:
        """Many publications (a broadcast, a batch): one request per home
        shard carrying all of its items, every home at once, instead of one
        round trip per channel in series. Order holds per channel."""
        by_home: dict[int, list[int]] = {}
        for index, (channel, _) in enumerate(items):
            by_home.setdefault(self.home(channel), []).append(index)
        positions: list[Position | None] = [None] * len(items)
        for index in by_home.pop(self.id, []):
            positions[index] = self.local.publish_now(*items[index])

        async def remote(home: int, indices: list[int]) -> None:
            args = [part for i in indices for part in (items[i][0].encode(), items[i][1])]
            reply = await self.router.request(home, b"PUBM", *args)
            for n, i in enumerate(indices):
                positions[i] = Position(reply[2 * n].decode(), int(reply[2 * n + 1]))

        if by_home:
            # Each home's request is queued now, in call order (a pipelined
            # stream's next command may publish to one of these channels).
            loop = asyncio.get_running_loop()
            await asyncio.gather(*(eager.begin(loop, remote(home, indices)) for home, indices in by_home.items()))
        return positions  # type: ignore[return-value]  # every index was filled

    async def position(self, channel: str) -> Position:
        if self.home(channel) == self.id:
            return self.local.position_now(channel)
        return await self.streams.position(channel)

    async def recover(self, channel: str, epoch: str, offset: int) -> Recovery:
        if self.home(channel) == self.id:
            return self.local.recover_now(channel, epoch, offset)
        return await self.streams.recover(channel, epoch, offset)

    async def history(self, channel: str, since: int, limit: int) -> tuple[Position, list[tuple[int, bytes]]]:
        if self.home(channel) == self.id:
            return self.local.history_now(channel, since, limit)
        return await self.streams.source.fetch(channel, since, limit)

    def ready(self) -> bool:
        return True

    def release(self, channel: str) -> None:
        self.streams.release(channel)

    def sweep(self, is_active: Callable[[str], bool]) -> int:
        """Forget idle state. A channel homed here is idle only when no shard
        follows it: ``is_active`` knows this shard's subscribers, the XPUB
        knows which channels other shards subscribed to. Dropping a channel
        only another shard follows would give its next publication a new
        epoch, and that shard would declare a stream lost that lost nothing.

        A cursor with no local subscriber left (its subscribe was abandoned
        while the cursor synced, so ``release`` never came) is released here,
        or the home would keep the channel for nobody."""
        router = self.router
        router.read_subscriptions()
        swept = self.local.sweep(lambda channel: is_active(channel) or router.followed(channel))
        return swept + self.streams.sweep(is_active)

    def rebound(self) -> int:
        return self.local.rebound()

    def scale_history(self, fraction: float) -> int:
        return self.local.scale_history(fraction)

    def delivered(self, channel: str) -> Position | None:
        """Where this shard's copy of ``channel`` stands (the last offset
        delivered here), or None when it does not follow it."""
        if self.home(channel) == self.id:
            state = self.local._channels.get(channel)
            return None if state is None else Position(state.epoch, state.window.last_offset)
        cursor = self.streams.cursors.get(channel)
        return Position(cursor.epoch, cursor.offset) if cursor is not None and cursor.state == LIVE else None

    def fence(self, fenced: bool = True) -> None:
        self.local.fence(fenced)

    def stats(self) -> dict[str, int]:
        return {**self.local.stats(), **self.streams.stats(),
                "zmq_hwm_drops": self.router.hwm_drops,
                "requests_failed": self.router.requests_failed}

    async def close(self) -> None:
        self.router.close()

    # -------------------------------------------------------------- streams
    def _on_publication(self, topic: bytes, epoch: bytes, offset: int, data: bytes) -> None:
        self.streams.offer(topic[:-1].decode(), epoch.decode(), offset, data)

    def resync_home(self, home: int) -> None:
        """The home shard ``home`` was restarted: check every stream it sequences
        (publications may have been lost in flight with the old process)."""
        self.streams.resync(lambda channel: self.home(channel) == home)

    # ------------------------------------------------- serving other shards
    def _on_sync_request(self, home: int, channel: str) -> tuple[str, int]:
        position = self.local.position_now(channel)
        return position.epoch, position.offset

    def _on_request(self, verb: bytes, args: list[bytes]) -> Any:
        if verb == b"PUB":
            channel, data = args[0].decode(), args[1]
            position = self.local.publish_now(channel, data)
            return [OK, position.epoch.encode(), b"%d" % position.offset]
        if verb == b"PUBM":
            out: list[bytes] = [OK]
            for i in range(0, len(args), 2):
                position = self.local.publish_now(args[i].decode(), args[i + 1])
                out += [position.epoch.encode(), b"%d" % position.offset]
            return out
        if verb == b"HIST":
            position, publications = self.local.history_now(args[0].decode(), int(args[1]), int(args[2]))
            flat = [item for offset, data in publications for item in (b"%d" % offset, data)]
            return [OK, position.epoch.encode(), b"%d" % position.offset, *flat]
        if verb == b"STATS":
            return [OK, json.dumps(self.stats_provider()).encode()]
        return [ERR, b"unknown request " + verb]

"""The engine of one shard among several on a host.

Each channel has a home shard (a stable hash of its name) that sequences
it with its own ``MemoryEngine``. A publication that enters elsewhere is
forwarded to the home shard, which stores it, answers with its offset and
sends it on the ZeroMQ stream to the shards that subscribed to it.

For a channel homed elsewhere a shard keeps a *cursor*: the epoch and the
last offset it has delivered locally. The cursor makes the stream gapless:
a publication older than the cursor is a duplicate and dropped; one that
skips ahead makes the shard fetch the gap from the home shard's history
before delivering anything newer; an epoch change (the home lost its
history) or a gap the history no longer covers ends the stream for the
local subscribers, who are told (``lost``) — never silently skipped.
"""
from __future__ import annotations

import asyncio
import json
import logging
import zlib
from typing import Any, Callable

from ..config import Config
from ..errors import EngineUnavailable
from ..router import ERR, OK, Router
from .base import Engine, Position, Recovery
from .memory import MemoryEngine

__all__ = ["ClusterEngine", "home_of"]

log = logging.getLogger("broker.engine.cluster")

SYNCING, LIVE, REPAIRING = 0, 1, 2
FETCH_LIMIT = 1000  # publications per history request while repairing


def home_of(channel: str, shards: int) -> int:
    """The shard that sequences ``channel``: stable across processes and restarts."""
    return zlib.crc32(channel.encode()) % shards


class _Cursor:
    __slots__ = ("epoch", "offset", "state", "ready", "backlog", "pending")

    def __init__(self, ready: "asyncio.Future[None]") -> None:
        self.epoch = ""
        self.offset = 0
        self.state = SYNCING
        self.ready = ready          # resolved once the cursor is LIVE the first time
        self.backlog: list[tuple[str, int, bytes]] = []
        self.pending = 0            # subscribes awaiting this cursor


class ClusterEngine(Engine):
    def __init__(self, config: Config, shard_id: int, shards: int, router: Router,
                 local: MemoryEngine | None = None) -> None:
        self.config = config
        self.id = shard_id
        self.shards = shards
        self.router = router
        self.local = local or MemoryEngine(config)
        self.local.forward = router.publish
        self._cursors: dict[str, _Cursor] = {}
        self.repairs = 0
        self.lost_streams = 0
        # The shard's own stats, for another shard's /api/stats (set by the shard).
        self.stats_provider: Callable[[], dict[str, Any]] = dict
        router.on_publication = self._on_publication
        router.on_sync_request = self._on_sync_request
        router.on_request = self._on_request

    # The shard sets ``deliver``; local publications go through the memory engine.
    @property
    def deliver(self):  # type: ignore[override]
        return self.local.deliver

    @deliver.setter
    def deliver(self, fn) -> None:  # type: ignore[override]
        self.local.deliver = fn

    def home(self, channel: str) -> int:
        return home_of(channel, self.shards)

    # ------------------------------------------------------------ Engine API
    async def publish(self, channel: str, data_json: bytes) -> Position:
        home = self.home(channel)
        if home == self.id:
            return self.local.publish_now(channel, data_json)
        epoch, offset = await self.router.request(home, b"PUB", channel.encode(), data_json)
        return Position(epoch.decode(), int(offset))

    async def position(self, channel: str) -> Position:
        if self.home(channel) == self.id:
            return self.local.position_now(channel)
        cursor = await self._live(channel)
        return Position(cursor.epoch, cursor.offset)

    async def recover(self, channel: str, epoch: str, offset: int) -> Recovery:
        home = self.home(channel)
        if home == self.id:
            return self.local.recover_now(channel, epoch, offset)
        cursor = await self._live(channel)
        cursor.pending += 1
        try:
            recovery = await self._recover_remote(home, channel, cursor, epoch, offset)
        finally:
            cursor.pending -= 1
        if self._cursors.get(channel) is not cursor:
            # The stream was lost meanwhile (its subscribers were told): this
            # subscriber joins it again from where it stands now.
            cursor = await self._live(channel)
            return Recovery(Position(cursor.epoch, cursor.offset), False)
        return recovery

    async def _recover_remote(self, home: int, channel: str, cursor: _Cursor,
                              epoch: str, offset: int) -> Recovery:
        """Missed publications up to the cursor (what the live stream has
        delivered here): everything after it reaches the client live."""
        if epoch == cursor.epoch and offset > cursor.offset:
            await self._catch_up(home, channel, cursor, offset)
        if epoch != cursor.epoch or offset > cursor.offset:
            return Recovery(Position(cursor.epoch, cursor.offset), False)
        # Up to the cursor as it is when the fetch ends: what it moved on by
        # meanwhile was delivered live to the others, not to this subscriber.
        collected = await self._history_range(home, channel, cursor.epoch, offset,
                                              lambda: cursor.offset)
        if isinstance(collected, str):
            return Recovery(Position(cursor.epoch, cursor.offset), False)
        return Recovery(Position(cursor.epoch, cursor.offset), True,
                        [p for p in collected if p[0] <= cursor.offset])

    async def _catch_up(self, home: int, channel: str, cursor: _Cursor, offset: int) -> None:
        """A client knows ``offset`` (seen through another shard) before the
        stream brought it here. If the home has it in the same epoch, wait
        (at most the request timeout) for the cursor to get there, rather
        than tell the client it lost something it did not."""
        try:
            home_epoch, last, _ = await self._fetch(home, channel, offset, 1)
        except EngineUnavailable:
            return
        if home_epoch != cursor.epoch or last < offset:
            return
        # Polled: this is a reconnect racing the stream, rare enough that the
        # hot path (_advance) should not pay for waking waiters.
        give_up = asyncio.get_running_loop().time() + self.config.cluster.request_timeout
        while (cursor.offset < offset and self._cursors.get(channel) is cursor
               and asyncio.get_running_loop().time() < give_up):
            await asyncio.sleep(0.005)

    async def _history_range(self, home: int, channel: str, epoch: str, since: int,
                             upto: Callable[[], int]) -> list[tuple[int, bytes]] | str:
        """Every publication after ``since`` up to ``upto()`` (re-read after
        each page) from the home shard's history, or why they cannot all be
        had. EngineUnavailable when the home does not answer."""
        collected: list[tuple[int, bytes]] = []
        while since < upto():
            remote_epoch, _last, page = await self._fetch(home, channel, since,
                                                          min(FETCH_LIMIT, upto() - since))
            if remote_epoch != epoch:
                return "epoch changed: the channel's history was lost"
            if not page or page[0][0] != since + 1:
                return "missed publications are no longer in the history"
            collected.extend(page)
            since = page[-1][0]
        return collected

    async def history(self, channel: str, since: int, limit: int) -> tuple[Position, list[tuple[int, bytes]]]:
        home = self.home(channel)
        if home == self.id:
            return self.local.history_now(channel, since, limit)
        epoch, last, publications = await self._fetch(home, channel, since, limit)
        return Position(epoch, last), publications

    def ready(self) -> bool:
        return True

    def release(self, channel: str) -> None:
        cursor = self._cursors.get(channel)
        if cursor is not None and cursor.pending == 0 and cursor.state != SYNCING:
            del self._cursors[channel]
            self.router.unsubscribe(channel)

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
        for channel in [c for c in self._cursors if not is_active(c)]:
            self.release(channel)
            swept += channel not in self._cursors
        return swept

    def stats(self) -> dict[str, int]:
        return {**self.local.stats(), "remote_channels": len(self._cursors),
                "zmq_hwm_drops": self.router.hwm_drops, "repairs": self.repairs,
                "lost_streams": self.lost_streams, "requests_failed": self.router.requests_failed}

    async def close(self) -> None:
        self.router.close()

    # ------------------------------------------------------------- cursors
    async def _live(self, channel: str) -> _Cursor:
        cursor = self._cursors.get(channel)
        if cursor is None:
            cursor = self._cursors[channel] = _Cursor(asyncio.get_running_loop().create_future())
            self.router.subscribe(channel)
            asyncio.get_running_loop().create_task(self._sync(channel, cursor))
        if not cursor.ready.done():
            cursor.pending += 1
            try:
                await asyncio.shield(cursor.ready)
            finally:
                cursor.pending -= 1
        return cursor

    async def _sync(self, channel: str, cursor: _Cursor) -> None:
        try:
            epoch, offset = await self.router.sync(self.home(channel), channel)
        except EngineUnavailable as exc:
            if self._cursors.get(channel) is cursor:
                del self._cursors[channel]
                self.router.unsubscribe(channel)
            cursor.ready.set_exception(exc)
            cursor.ready.exception()  # retrieved: waiters re-raise it themselves
            return
        cursor.epoch, cursor.offset, cursor.state = epoch, offset, LIVE
        cursor.ready.set_result(None)

    def _on_publication(self, topic: bytes, epoch_bytes: bytes, offset: int, data: bytes) -> None:
        channel = topic[:-1].decode()
        cursor = self._cursors.get(channel)
        if cursor is None or cursor.state == SYNCING:
            return  # the sync answer, not this message, says where the stream starts
        epoch = epoch_bytes.decode()
        if cursor.state == REPAIRING:
            cursor.backlog.append((epoch, offset, data))
            return
        self._advance(channel, cursor, epoch, offset, data)

    def _advance(self, channel: str, cursor: _Cursor, epoch: str, offset: int, data: bytes) -> None:
        if epoch != cursor.epoch:
            self._lose(channel, "epoch changed: the channel's history was lost")
        elif offset <= cursor.offset:
            return  # duplicate of what was delivered already
        elif offset == cursor.offset + 1:
            cursor.offset = offset
            self.local.deliver(channel, offset, data)
        else:
            cursor.state = REPAIRING
            cursor.backlog.append((epoch, offset, data))
            asyncio.get_running_loop().create_task(self._repair(channel, cursor, offset - 1))

    async def _repair(self, channel: str, cursor: _Cursor, upto: int) -> None:
        """Fetch (cursor.offset, upto] from the home shard's history, deliver
        it, then what queued meanwhile."""
        self.repairs += 1
        try:
            missed = await self._history_range(self.home(channel), channel, cursor.epoch,
                                               cursor.offset, lambda: upto)
        except EngineUnavailable as exc:
            missed = f"home shard unreachable: {exc}"
        if self._cursors.get(channel) is not cursor:
            return
        if isinstance(missed, str):
            self._lose(channel, missed)
            return
        for offset, data in missed:
            if offset > upto:
                break
            cursor.offset = offset
            self.local.deliver(channel, offset, data)
        backlog, cursor.backlog = cursor.backlog, []
        cursor.state = LIVE
        for epoch, offset, data in backlog:
            if self._cursors.get(channel) is not cursor or cursor.state != LIVE:
                if cursor.state == REPAIRING:
                    cursor.backlog.append((epoch, offset, data))
                continue
            self._advance(channel, cursor, epoch, offset, data)

    def resync_home(self, home: int) -> None:
        """The home shard ``home`` was restarted: check every cursor on it
        (publications may have been lost in flight with the old process)."""
        loop = asyncio.get_running_loop()
        for channel, cursor in list(self._cursors.items()):
            if self.home(channel) == home and cursor.state == LIVE:
                cursor.state = REPAIRING
                loop.create_task(self._resync(channel, cursor))

    async def _resync(self, channel: str, cursor: _Cursor) -> None:
        try:
            epoch, offset = await self.router.sync(self.home(channel), channel)
        except EngineUnavailable as exc:
            self._lose(channel, f"home shard unreachable: {exc}")
            return
        if self._cursors.get(channel) is not cursor:
            return
        if epoch != cursor.epoch or offset < cursor.offset:
            self._lose(channel, "epoch changed: the channel's history was lost")
            return
        await self._repair(channel, cursor, offset)

    def _lose(self, channel: str, reason: str) -> None:
        if self._cursors.pop(channel, None) is None:
            return
        self.lost_streams += 1
        self.router.unsubscribe(channel)
        log.warning("stream of %s lost on shard %d: %s", channel, self.id, reason)
        self.lost(channel, reason)

    async def _fetch(self, home: int, channel: str, since: int,
                     limit: int) -> tuple[str, int, list[tuple[int, bytes]]]:
        epoch, last, *flat = await self.router.request(home, b"HIST", channel.encode(),
                                                       b"%d" % since, b"%d" % max(1, limit))
        publications = [(int(flat[i]), flat[i + 1]) for i in range(0, len(flat), 2)]
        return epoch.decode(), int(last), publications

    # ------------------------------------------------- serving other shards
    def _on_sync_request(self, home: int, channel: str) -> tuple[str, int]:
        position = self.local.position_now(channel)
        return position.epoch, position.offset

    def _on_request(self, verb: bytes, args: list[bytes]) -> Any:
        if verb == b"PUB":
            channel, data = args[0].decode(), args[1]
            position = self.local.publish_now(channel, data)
            return [OK, position.epoch.encode(), b"%d" % position.offset]
        if verb == b"HIST":
            position, publications = self.local.history_now(args[0].decode(), int(args[1]), int(args[2]))
            flat = [item for offset, data in publications for item in (b"%d" % offset, data)]
            return [OK, position.epoch.encode(), b"%d" % position.offset, *flat]
        if verb == b"STATS":
            return [OK, json.dumps(self.stats_provider()).encode()]
        return [ERR, b"unknown request " + verb]

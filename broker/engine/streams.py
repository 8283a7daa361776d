"""One stream machinery: a shard's gapless copy of channels sequenced elsewhere.

A *source* sequences channels and keeps their history (Redis for many
hosts; a home shard over ZeroMQ on one host) and offers their publications
on a live stream that may drop, duplicate or delay messages. For each
channel with local subscribers, ``Streams`` keeps a *cursor*: the epoch and
the last offset delivered locally.

- Joining: the source subscribes the live stream first, then names the
  position after which every publication will reach ``offer``. What arrives
  while joining waits in a backlog; what is not newer than the position
  is dropped.
- Live: the next offset is delivered; an older one is a duplicate; one that
  skips ahead is a gap, fetched from the source's history before anything
  newer is delivered (what arrives meanwhile waits in the backlog).
- Another epoch, or a gap the history no longer covers: the stream is lost
  for the local subscribers (``lost``), never silently skipped.
- ``resync``: after a reconnect (or a restarted home) each cursor asks the
  source where the channel stands and repairs what it missed.

Every await may see the world change: after one, a cursor is used only if
it is still the channel's current one (a lost or released cursor never
answers a subscriber, who then retries on a fresh cursor).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, Protocol

from ..errors import EngineUnavailable
from .base import DeliverFn, Position, Recovery

__all__ = ["StreamSource", "Streams", "EPOCH_CHANGED", "HISTORY_GONE"]

log = logging.getLogger("broker.engine.streams")

SYNCING, LIVE, REPAIRING = 0, 1, 2
FETCH_LIMIT = 1000   # publications per history request while repairing
ATTEMPTS = 3         # fresh cursors a subscriber tries before answering 503
EPOCH_CHANGED = "epoch changed: the channel's history was lost"
HISTORY_GONE = "missed publications are no longer in the history"


class StreamSource(Protocol):
    """Where channels are sequenced: what ``Streams`` needs of it."""

    def join(self, channel: str) -> Awaitable[Position]:
        """Subscribe the live stream of ``channel``; resolves to the position
        after which every publication will be offered (EngineUnavailable if not)."""

    def leave(self, channel: str) -> None:
        """Stop the live stream of ``channel``."""

    def position(self, channel: str) -> Awaitable[Position]:
        """Where the channel stands at the source now (it is joined)."""

    def fetch(self, channel: str, since: int,
              limit: int) -> Awaitable[tuple[Position, list[tuple[int, bytes]]]]:
        """Retained publications after ``since``, oldest first, at most ``limit``."""


class _Cursor:
    __slots__ = ("epoch", "offset", "state", "ready", "backlog", "pending", "waiters", "recheck",
                 "stalled")

    def __init__(self, ready: "asyncio.Future[None]") -> None:
        self.epoch = ""
        self.offset = 0
        self.state = SYNCING
        self.ready = ready          # resolved once the cursor is LIVE the first time
        self.backlog: list[tuple[str, int, bytes]] = []
        self.pending = 0            # subscribes using this cursor right now
        self.waiters: list[tuple[int, asyncio.Future[None]]] = []  # (offset, woken when delivered)
        self.recheck = False        # resync once the repair in progress is done
        self.stalled = False        # a repair found the source unreachable; the next resync resumes it


class Streams:
    """The cursors of one shard over one source (see the module docstring)."""

    def __init__(self, source: StreamSource, catch_up_timeout: float = 2.0,
                 stall_when_unreachable: bool = False) -> None:
        self.source = source
        self.catch_up_timeout = catch_up_timeout
        # A source that calls resync() when it is reachable again (Redis)
        # lets a repair that cannot reach it wait for that; otherwise the
        # stream is lost at once and its subscribers recover.
        self.stall_when_unreachable = stall_when_unreachable
        self.cursors: dict[str, _Cursor] = {}
        self.deliver: DeliverFn = lambda channel, offset, data: None
        self.lost: Callable[[str, str], None] = lambda channel, reason: None
        self.repairs = 0
        self.lost_streams = 0
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------- subscribers
    async def position(self, channel: str) -> Position:
        """The position a new subscriber starts from: what was delivered here."""
        for _ in range(ATTEMPTS):
            cursor = await self._live(channel)
            if self.cursors.get(channel) is cursor:
                return Position(cursor.epoch, cursor.offset)
        raise EngineUnavailable(f"the stream of {channel!r} keeps being lost")

    async def recover(self, channel: str, epoch: str, offset: int) -> Recovery:
        """Missed publications up to the cursor; newer ones reach the client live."""
        for _ in range(ATTEMPTS):
            cursor = await self._live(channel)
            if self.cursors.get(channel) is not cursor:
                continue
            cursor.pending += 1
            try:
                recovery = await self._recover(channel, cursor, epoch, offset)
            finally:
                cursor.pending -= 1
            if recovery is not None and self.cursors.get(channel) is cursor:
                return recovery
        raise EngineUnavailable(f"the stream of {channel!r} keeps being lost")

    async def _recover(self, channel: str, cursor: _Cursor, epoch: str,
                       offset: int) -> Recovery | None:
        """None when the cursor stopped being current during an await."""
        if epoch != cursor.epoch:
            return Recovery(Position(cursor.epoch, cursor.offset), False)
        if offset > cursor.offset:
            # The client saw more than this shard has delivered yet (it came
            # from another host, or this copy lags): that is not a failed
            # recovery unless the source itself has never reached its offset.
            truth = await self.source.position(channel)
            if self.cursors.get(channel) is not cursor:
                return None
            if truth.epoch != epoch or offset > truth.offset:
                return Recovery(Position(cursor.epoch, cursor.offset), False)
            if not await self._catch_up(channel, cursor, offset, truth.offset):
                if self.cursors.get(channel) is not cursor:
                    return None
                raise EngineUnavailable(f"this shard's copy of {channel!r} is behind the client")
        # Up to the cursor as it is when the fetch ends: what it moved on by
        # meanwhile was delivered live to the others, not to this subscriber.
        collected = await self._history_range(channel, cursor.epoch, offset, lambda: cursor.offset)
        if self.cursors.get(channel) is not cursor:
            return None
        position = Position(cursor.epoch, cursor.offset)
        if isinstance(collected, str):
            return Recovery(position, False)
        return Recovery(position, True, [p for p in collected if p[0] <= cursor.offset])

    async def _catch_up(self, channel: str, cursor: _Cursor, offset: int, truth: int) -> bool:
        """Wait until ``offset`` is delivered here; repair towards ``truth``
        when the live stream is not bringing it. False on timeout or loss."""
        if cursor.offset >= offset:
            return True
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        cursor.waiters.append((offset, woken))
        if cursor.state == LIVE:
            self._start_repair(channel, cursor, truth)
        elif cursor.stalled:
            self.resync(channel.__eq__)
        else:
            cursor.recheck = True  # after the repair in progress, up to the source's position
        try:
            await asyncio.wait_for(asyncio.shield(woken), self.catch_up_timeout)
        except asyncio.TimeoutError:
            return False
        finally:
            if (offset, woken) in cursor.waiters:
                cursor.waiters.remove((offset, woken))
        return cursor.offset >= offset

    def release(self, channel: str) -> None:
        """The last local subscriber left: stop following the channel."""
        cursor = self.cursors.get(channel)
        if cursor is not None and cursor.pending == 0 and cursor.state != SYNCING:
            self._drop(channel, cursor)

    def sweep(self, is_active: Callable[[str], bool]) -> int:
        """Release cursors nobody subscribes to (a subscribe that failed after
        the cursor was made leaves one); returns how many."""
        idle = [channel for channel, cursor in self.cursors.items()
                if cursor.pending == 0 and cursor.state != SYNCING and not is_active(channel)]
        for channel in idle:
            self._drop(channel, self.cursors[channel])
        return len(idle)

    def stats(self) -> dict[str, int]:
        return {"remote_channels": len(self.cursors), "repairs": self.repairs,
                "lost_streams": self.lost_streams}

    # ------------------------------------------------------------- stream
    def offer(self, channel: str, epoch: str, offset: int, data: bytes) -> None:
        """A publication from the live stream (any order, maybe duplicated)."""
        cursor = self.cursors.get(channel)
        if cursor is None:
            return
        if cursor.state != LIVE:
            cursor.backlog.append((epoch, offset, data))
        elif offset == cursor.offset + 1 and epoch == cursor.epoch:
            self._deliver(channel, cursor, offset, data)
        else:
            self._advance(channel, cursor, epoch, offset, data)

    def offer_if_next(self, channel: str, epoch: str, offset: int, data: bytes) -> None:
        """A publication known by another way than the stream (the source's
        answer to our own publish): delivered now only if it is exactly the
        next one of a live cursor; otherwise the stream brings it."""
        cursor = self.cursors.get(channel)
        if (cursor is not None and cursor.state == LIVE and offset == cursor.offset + 1
                and epoch == cursor.epoch):
            self._deliver(channel, cursor, offset, data)

    def resync(self, wanted: Callable[[str], bool] = lambda channel: True) -> None:
        """Check the ``wanted`` streams against the source: what was in flight
        when the connection broke (or the home died) is fetched from history."""
        for channel, cursor in list(self.cursors.items()):
            if not wanted(channel):
                continue
            if cursor.state == LIVE:
                cursor.state = REPAIRING
                self._spawn(self._resync(channel, cursor))
            elif cursor.stalled:
                cursor.stalled = False
                self._spawn(self._resync(channel, cursor))
            elif cursor.state == REPAIRING:
                cursor.recheck = True

    # ---------------------------------------------------------- internals
    def _spawn(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _live(self, channel: str) -> _Cursor:
        cursor = self.cursors.get(channel)
        if cursor is None:
            cursor = self.cursors[channel] = _Cursor(asyncio.get_running_loop().create_future())
            self._spawn(self._sync(channel, cursor))
        if not cursor.ready.done():
            cursor.pending += 1
            try:
                await asyncio.shield(cursor.ready)
            finally:
                cursor.pending -= 1
        return cursor

    async def _sync(self, channel: str, cursor: _Cursor) -> None:
        try:
            position = await self.source.join(channel)
            if self.cursors.get(channel) is not cursor:
                raise EngineUnavailable(f"the stream of {channel!r} was lost while joining")
        except EngineUnavailable as exc:
            if self.cursors.get(channel) is cursor:
                del self.cursors[channel]
                self.source.leave(channel)
            cursor.ready.set_exception(exc)
            cursor.ready.exception()  # retrieved: waiters re-raise it themselves
            return
        cursor.epoch, cursor.offset, cursor.state = position.epoch, position.offset, LIVE
        # What arrived while joining: another epoch predates the position
        # (the source answered after it), so it is not a change of epoch.
        backlog = [item for item in cursor.backlog if item[0] == position.epoch]
        cursor.backlog = []
        cursor.ready.set_result(None)
        self._drain(channel, cursor, backlog)

    def _deliver(self, channel: str, cursor: _Cursor, offset: int, data: bytes) -> None:
        cursor.offset = offset
        self.deliver(channel, offset, data)
        if cursor.waiters:
            for target, woken in cursor.waiters:
                if target <= offset and not woken.done():
                    woken.set_result(None)

    def _advance(self, channel: str, cursor: _Cursor, epoch: str, offset: int, data: bytes) -> None:
        if epoch != cursor.epoch:
            self._lose(channel, cursor, EPOCH_CHANGED)
        elif offset <= cursor.offset:
            return  # duplicate of what was delivered already
        elif offset == cursor.offset + 1:
            self._deliver(channel, cursor, offset, data)
        else:
            cursor.backlog.append((epoch, offset, data))
            self._start_repair(channel, cursor, offset - 1)

    def _drain(self, channel: str, cursor: _Cursor, backlog: list[tuple[str, int, bytes]]) -> None:
        """Feed queued publications in order; if a new gap starts a repair,
        the rest queue behind it again."""
        for epoch, offset, data in backlog:
            if self.cursors.get(channel) is not cursor:
                return
            if cursor.state != LIVE:
                cursor.backlog.append((epoch, offset, data))
                continue
            self._advance(channel, cursor, epoch, offset, data)

    def _start_repair(self, channel: str, cursor: _Cursor, upto: int) -> None:
        cursor.state = REPAIRING
        self._spawn(self._repair(channel, cursor, upto))

    async def _repair(self, channel: str, cursor: _Cursor, upto: int) -> None:
        """Fetch (cursor.offset, upto] from history, deliver it, then what queued meanwhile."""
        if upto > cursor.offset:
            self.repairs += 1
        try:
            missed = await self._history_range(channel, cursor.epoch, cursor.offset, lambda: upto)
        except EngineUnavailable as exc:
            missed = f"history unreachable: {exc}"
            if self.stall_when_unreachable and self.cursors.get(channel) is cursor:
                cursor.stalled = True
                return
        if self.cursors.get(channel) is not cursor:
            return
        if isinstance(missed, str):
            self._lose(channel, cursor, missed)
            return
        for offset, data in missed:
            if offset > upto:
                break
            if offset > cursor.offset:
                self._deliver(channel, cursor, offset, data)
        backlog, cursor.backlog = cursor.backlog, []
        cursor.state = LIVE
        self._drain(channel, cursor, backlog)
        if cursor.recheck and cursor.state == LIVE and self.cursors.get(channel) is cursor:
            cursor.recheck = False
            cursor.state = REPAIRING
            await self._resync(channel, cursor)

    async def _resync(self, channel: str, cursor: _Cursor) -> None:
        try:
            truth = await self.source.position(channel)
        except EngineUnavailable as exc:
            if self.stall_when_unreachable:
                cursor.stalled = True
            else:
                self._lose(channel, cursor, f"source unreachable: {exc}")
            return
        if self.cursors.get(channel) is not cursor:
            return
        if truth.epoch != cursor.epoch or truth.offset < cursor.offset:
            self._lose(channel, cursor, EPOCH_CHANGED)
            return
        await self._repair(channel, cursor, truth.offset)

    async def _history_range(self, channel: str, epoch: str, since: int,
                             upto: Callable[[], int]) -> list[tuple[int, bytes]] | str:
        """Every publication after ``since`` up to ``upto()`` (re-read after
        each page), or why they cannot all be had."""
        collected: list[tuple[int, bytes]] = []
        while since < upto():
            position, page = await self.source.fetch(channel, since, min(FETCH_LIMIT, upto() - since))
            if position.epoch != epoch:
                return EPOCH_CHANGED
            if not page or page[0][0] != since + 1:
                return HISTORY_GONE
            collected.extend(page)
            since = page[-1][0]
        return collected

    def _drop(self, channel: str, cursor: _Cursor) -> None:
        del self.cursors[channel]
        self.source.leave(channel)
        for _, woken in cursor.waiters:
            if not woken.done():
                woken.set_result(None)  # its subscriber sees the cursor is gone and retries

    def _lose(self, channel: str, cursor: _Cursor, reason: str) -> None:
        if self.cursors.get(channel) is not cursor:
            return
        self.lost_streams += 1
        self._drop(channel, cursor)
        log.warning("stream of %s lost: %s", channel, reason)
        self.lost(channel, reason)

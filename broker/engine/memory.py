"""The embedded single-host engine: channel state lives in this process.

Each channel gets an epoch when its state is created; if the state is ever
dropped (idle sweep) and created again, the new epoch tells clients their
old offsets mean nothing now (``recovered: false``), never a silent jump.
"""
from __future__ import annotations

import secrets
import time
from typing import Callable

from .._fastpath import HistoryWindow
from ..config import Config
from .base import DeliverFn, Engine, Position, Recovery

__all__ = ["MemoryEngine"]


class _ChannelState:
    __slots__ = ("epoch", "window")

    def __init__(self, epoch: str, window: HistoryWindow) -> None:
        self.epoch = epoch
        self.window = window


class MemoryEngine(Engine):
    def __init__(self, config: Config, deliver: DeliverFn | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._clock = clock
        self._channels: dict[str, _ChannelState] = {}
        self._epoch_base = secrets.token_hex(4)
        self._created = 0
        self.deliver = deliver or (lambda channel, offset, data: None)

    def _state(self, channel: str) -> _ChannelState:
        state = self._channels.get(channel)
        if state is None:
            namespace = self._config.namespaces.get(channel.partition(":")[0])
            size, ttl = (namespace.history_size, namespace.history_ttl) if namespace else (0, 0.0)
            self._created += 1
            state = _ChannelState(f"{self._epoch_base}{self._created:x}", HistoryWindow(size, ttl))
            self._channels[channel] = state
        return state

    def publish_now(self, channel: str, data_json: bytes) -> Position:
        """Synchronous publish: the in-process fast path used by the shard."""
        state = self._state(channel)
        offset = state.window.last_offset + 1
        state.window.append(offset, data_json, self._clock())
        self.deliver(channel, offset, data_json)
        return Position(state.epoch, offset)

    def position_now(self, channel: str) -> Position:
        state = self._state(channel)
        return Position(state.epoch, state.window.last_offset)

    def recover_now(self, channel: str, epoch: str, offset: int) -> Recovery:
        state = self._state(channel)
        window = state.window
        position = Position(state.epoch, window.last_offset)
        if epoch != state.epoch or offset > window.last_offset:
            return Recovery(position, False)
        now = self._clock()
        if not window.covers(offset, now):
            return Recovery(position, False)
        return Recovery(position, True, window.since(offset, now))

    async def publish(self, channel: str, data_json: bytes) -> Position:
        return self.publish_now(channel, data_json)

    async def position(self, channel: str) -> Position:
        return self.position_now(channel)

    async def recover(self, channel: str, epoch: str, offset: int) -> Recovery:
        return self.recover_now(channel, epoch, offset)

    async def history(self, channel: str, since: int, limit: int) -> tuple[Position, list[tuple[int, bytes]]]:
        state = self._state(channel)
        return (Position(state.epoch, state.window.last_offset),
                state.window.since(since, self._clock(), limit))

    def ready(self) -> bool:
        return True

    def sweep(self, is_active: Callable[[str], bool]) -> int:
        """Drop state of channels with no retained history and no local
        subscriber; returns how many. Their next publication starts a new epoch."""
        now = self._clock()
        idle = [name for name, state in self._channels.items()
                if not is_active(name) and (state.window.trim(now) >= 0 and len(state.window) == 0)]
        for name in idle:
            del self._channels[name]
        return len(idle)

    def stats(self) -> dict[str, int]:
        return {"channels": len(self._channels),
                "history_bytes": sum(s.window.nbytes for s in self._channels.values())}

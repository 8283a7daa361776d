"""The embedded single-host engine: channel state lives in this process.

A channel's epoch names one sequence of its offsets. The idle sweep drops
the state of a channel nobody follows once its history is empty. When such
a channel is created again:

- if it had publications (last offset > 0), it gets a new epoch: its old
  offsets must never be reused, so clients holding them learn
  ``recovered: false``, never a silent jump;
- if it never had one (last offset 0), nothing was lost, and it gets the
  same epoch back: a client or a following shard at (epoch, 0) continues.

Without per-channel memory: the epoch of a new state is the engine's
random base plus a generation counter of the channel's bucket (a hash of
its name), and dropping a channel that had publications bumps its
bucket's generation. A bump can give a never-published neighbour in the
same bucket a new epoch too; that costs its clients a needless
``recovered: false``, never a wrong ``true`` (docs/decisions.md, issue 7).
"""
from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable

from .._fastpath import HistoryWindow
from ..config import Config
from ..errors import EngineUnavailable
from .base import DeliverFn, Engine, Position, Recovery
from .journal import ChannelLog, Journal

__all__ = ["EPOCH_BUCKETS", "MemoryEngine"]

log = logging.getLogger("broker.engine.memory")

EPOCH_BUCKETS = 4096  # generation counters for the epochs of re-created channels


class _ChannelState:
    __slots__ = ("epoch", "window")

    def __init__(self, epoch: str, window: HistoryWindow) -> None:
        self.epoch = epoch
        self.window = window


class MemoryEngine(Engine):
    """Channel state in this process; with a ``journal``, every state change
    is written there first, so a replacement process continues the channels
    (same epochs, offsets and history) after this one dies."""

    def __init__(self, config: Config, deliver: DeliverFn | None = None,
                 clock: Callable[[], float] = time.monotonic, journal: Journal | None = None) -> None:
        self._config = config
        self._clock = clock
        self._channels: dict[str, _ChannelState] = {}
        self._epoch_base = secrets.token_hex(4)  # a new process never repeats an old epoch
        self._history_fraction = 1.0  # below 1 under memory pressure (scale_history)
        self._generations = [0] * EPOCH_BUCKETS
        self._journal = journal
        self._compaction_due = False
        # How to run compaction soon, outside the publish in progress
        # (the shard sets loop.call_soon); without it, the idle sweep compacts.
        self.schedule: Callable[[Callable[[], None]], object] | None = None
        if journal is not None:
            self._restore(journal.load(keep=lambda channel: self._bounds(channel)[0]))
        self.deliver = deliver or (lambda channel, offset, data: None)
        # Called with (channel, epoch, offset, data) before local delivery: the
        # cluster engine sends the publication on to other shards here.
        self.forward: Callable[[str, str, int, bytes], None] | None = None

    def _bounds(self, channel: str) -> tuple[int, float]:
        namespace = self._config.namespace_for(channel)
        if namespace is None:
            return 0, 0.0
        size = namespace.history_size
        if self._history_fraction < 1.0 and size:
            size = max(1, int(size * self._history_fraction))
        return size, namespace.history_ttl

    def scale_history(self, fraction: float) -> int:
        """Keep ``fraction`` of each history size (at least one publication):
        the oldest go first; a recovery from before them answers
        ``recovered: false``, as for any history that ran out."""
        if fraction == self._history_fraction:
            return 0
        self._history_fraction = fraction
        return self.rebound()

    def _restore(self, logs: dict[str, ChannelLog]) -> None:
        for log in logs.values():
            size, ttl = self._bounds(log.channel)
            window = HistoryWindow(size, ttl, log.last_offset - len(log.publications))
            for offset, data, ts in log.publications:
                window.append(offset, data, ts)
            self._channels[log.channel] = _ChannelState(log.epoch, window)

    def _state(self, channel: str) -> _ChannelState:
        state = self._channels.get(channel)
        if state is None:
            size, ttl = self._bounds(channel)
            state = _ChannelState(self._new_epoch(channel), HistoryWindow(size, ttl))
            self._write(Journal.record_channel, channel, state.epoch, 0)
            self._channels[channel] = state
        return state

    fenced = False

    def _new_epoch(self, channel: str) -> str:
        """The epoch of a new state: the same as the channel's previous state
        in this process unless that one had publications (see the module doc)."""
        return f"{self._epoch_base}{self._generations[hash(channel) % EPOCH_BUCKETS]:x}"

    def _write(self, method: Callable[..., None], *args: object) -> None:
        """Journal first: what is not written is not acknowledged."""
        if self.fenced:
            raise EngineUnavailable("a deploy is handing this channel over: retry shortly")
        if self._journal is None:
            return
        try:
            method(self._journal, *args)
        except OSError as exc:
            raise EngineUnavailable(f"cannot write the journal: {exc}") from exc
        if not self._compaction_due and self._journal.needs_compaction:
            self._compaction_due = True
            if self.schedule is not None:
                self.schedule(self.compact)

    def compact(self) -> None:
        """Rewrite the journal with just the retained state. Publications keep
        the time of the compaction (their age limit restarts from it)."""
        self._compaction_due = False
        if self._journal is None:
            return
        now = self._clock()
        self._journal.rewrite(
            ChannelLog(name, state.epoch, state.window.last_offset,
                       [(offset, data, now) for offset, data in state.window.since(0, now)])
            for name, state in self._channels.items())

    def publish_now(self, channel: str, data_json: bytes) -> Position:
        """Synchronous publish: the in-process fast path used by the shard."""
        state = self._state(channel)
        offset = state.window.last_offset + 1
        now = self._clock()
        self._write(Journal.record_publication, channel, state.epoch, offset, data_json, now)
        state.window.append(offset, data_json, now)
        if self.forward is not None:
            self.forward(channel, state.epoch, offset, data_json)
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

    def history_now(self, channel: str, since: int, limit: int) -> tuple[Position, list[tuple[int, bytes]]]:
        state = self._state(channel)
        return (Position(state.epoch, state.window.last_offset),
                state.window.since(since, self._clock(), limit))

    async def history(self, channel: str, since: int, limit: int) -> tuple[Position, list[tuple[int, bytes]]]:
        return self.history_now(channel, since, limit)

    def ready(self) -> bool:
        return True

    def sweep(self, is_active: Callable[[str], bool]) -> int:
        """Drop the state of channels with no retained history that nobody
        follows (``is_active`` is False: no subscriber here, and for a home
        shard none on any other shard either); returns how many. A dropped
        channel that had publications gets a new epoch when it is created
        again; one that never had any keeps its epoch."""
        now = self._clock()
        idle = []
        for name, state in self._channels.items():
            if not is_active(name):
                state.window.trim(now)  # age out what expired before judging "empty"
                if len(state.window) == 0:
                    idle.append(name)
        for name in idle:
            state = self._channels.pop(name)
            if state.window.last_offset > 0:
                self._generations[hash(name) % EPOCH_BUCKETS] += 1
            try:
                self._write(Journal.record_drop, name)
            except EngineUnavailable as exc:
                # Harmless to miss: a replacement would restore the empty
                # state it describes. The sweep must not die of it.
                log.warning("idle sweep: %s", exc)
        if self._compaction_due:
            self.compact()
        return len(idle)

    def rebound(self) -> int:
        """Apply the namespaces' current history size and TTL to the channels
        that exist (a runtime reload); returns how many windows changed. A new
        TTL rebuilds the window: its publications' age restarts now."""
        now = self._clock()
        changed = 0
        for name, state in self._channels.items():
            size, ttl = self._bounds(name)
            window = state.window
            if window.max_age != ttl:
                kept = window.since(0, now)[-size:] if size else []
                fresh = HistoryWindow(size, ttl, window.last_offset - len(kept))
                for offset, data in kept:
                    fresh.append(offset, data, now)
                state.window = fresh
            elif window.max_count != size:
                window.resize(size)
            else:
                continue
            changed += 1
        return changed

    def fence(self, fenced: bool = True) -> None:
        """While fenced (a deploy hands this state over), nothing is written:
        publications and new channels answer EngineUnavailable (503)."""
        self.fenced = fenced

    def stats(self) -> dict[str, int]:
        return {"channels": len(self._channels),
                "history_bytes": sum(s.window.nbytes for s in self._channels.values())}

"""A shard's watch over its limits (PROTOCOL.md §1 "Liveness and limits",
§3 "Memory budget"): the once-a-second tick that pings silent connections
and closes expired ones, the memory budget's degradation levels and what
each level does, and the per-IP connection count at the upgrade.

The decisions are ``broker.pressure``'s (Sans-I/O); this module owns the
timer and acts on the shard through the small ``Watched`` interface.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import os
import resource
import time
from typing import TYPE_CHECKING, Protocol

import psutil

from .adapters.session import Session
from .config import Config
from .fdlimit import EmfileReporter
from .httpmsg import Response, error_response
from .pressure import Degradation, IpConnectionTable, MemoryThresholds, Transition, shard_budget

if TYPE_CHECKING:
    from .engine.base import Engine
    from _ctypes import CFuncPtr  # what a CDLL attribute is (ctypes only re-exports it privately)

__all__ = ["Watch", "Watched", "TICK"]

log = logging.getLogger("broker.watch")

TICK = 1.0  # seconds between liveness/expiry checks

# From level 1 on, channels keep this fraction of their history size in
# memory (the oldest publications go; recoveries from before them answer
# recovered:false), and all of it again once the level is back to 0.
HISTORY_UNDER_PRESSURE = 0.25

# A connection is a candidate for a level-2 cut once its transport has held
# unsent bytes this long: a reader whose socket a burst filled drains it as
# soon as the loop turns; one that does not read stays held.
HELD_FOR = 0.05
OVER_BUDGET_HELD_FOR = 0.01

# Descriptors kept free for plain HTTP (/healthz, /readyz, the API), the
# journal, ZeroMQ and the handoffs, whatever the WebSockets take.
FD_RESERVE = 64
# A WebSocket holds one descriptor: its socket, which the C flush writes to
# directly (the shard lends it, never dups it; see Shard.set_fd).
FDS_PER_WEBSOCKET = 1


def websocket_capacity(reserve: int = FD_RESERVE) -> int:
    """WebSockets this process can hold before the reserve is touched:
    refused with a 503 beyond it rather than reset by an EMFILE accept."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:  # pragma: no cover - no procfs
        open_now = 32
    return max(0, (soft - open_now - reserve) // FDS_PER_WEBSOCKET)


def _malloc_trim() -> CFuncPtr | None:
    """glibc's malloc_trim: hands freed heap pages back to the system, so
    RSS falls when memory does (else the allocator keeps them)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return None


_TRIM = _malloc_trim()


def release_memory(collect: bool = True) -> None:
    """Return freed heap to the system (after collecting cycles, unless
    ``collect`` is False: a full collection costs more than the trim)."""
    if collect:
        gc.collect()
    if _TRIM is not None:
        _TRIM(0)


class Watched(Protocol):
    """What the watch needs from its shard."""

    config: Config
    loop: asyncio.AbstractEventLoop
    sessions: list[Session | None]
    engine: Engine

    @property
    def websocket_count(self) -> int:
        """Open sessions."""
        ...

    def pending_bytes(self, session: Session) -> int:
        """Bytes queued for ``session``."""
        ...

    def held_back(self, for_at_least: float = 0.0) -> list[Session]:
        """Open sessions whose transport has held unsent bytes that long."""
        ...

    def flush_now(self) -> int:
        """Write what every session can take now; the bytes still pending."""
        ...

    def shed(self, session: Session, reason: str) -> None:
        """Drop what is queued for ``session`` and end it now (1013)."""
        ...



class Watch:
    """The shard's limits in force: ticks, memory levels, IPs."""

    def __init__(self, shard: Watched, shards: int = 1, ip_table_path: str | None = None,
                 shard_id: int = 0) -> None:
        self.shard = shard
        config = shard.config
        self.degradation = Degradation(shard_budget(config.memory_limit_mb, shards),
                                       _thresholds(config))
        self.budget_bytes = (config.memory_limit_mb or 0) * 2**20
        self.ips = IpConnectionTable(ip_table_path, shard_id, shards)
        self.cut_for_memory = 0
        self.refused_for_memory = 0
        self.refused_per_ip = 0
        self.websocket_capacity = websocket_capacity()
        self._peak_sessions = 0  # since memory was last returned to the system
        self.fd_refusals = EmfileReporter()
        self._process = psutil.Process(os.getpid())
        self._next_memory_check = 0.0
        # Between the timed checks, the outbound buffers growing by this much
        # triggers a check at once (``note_pending``): a flood fills them far
        # faster than once a second.
        self._pending_step = max(1 << 20, self.degradation.budget // 16)
        self._pending_mark = self._pending_step
        self._checking = False
        self._timer: asyncio.TimerHandle | None = shard.loop.call_later(TICK, self._tick)

    @property
    def level(self) -> int:
        return self.degradation.level

    # ---------------------------------------------------------- admission
    def refusal(self, ip: str) -> Response | None:
        """The upgrade refused at level 3 (503) or over ``connections_per_ip``
        (429); else None, and the connection is counted until ``release``."""
        if self.level >= 3:
            self.refused_for_memory += 1
            return error_response(503, "overloaded: the shard is over its memory budget; try again later",
                                  headers=(("Retry-After", "5"),))
        if self.shard.websocket_count >= self.websocket_capacity:
            if self.fd_refusals.record(time.monotonic()):
                log.warning("shard: file descriptors' worth of WebSockets (%d, %d each) reached; %d upgrades "
                            "refused with 503 since the last report; raise the hard RLIMIT_NOFILE",
                            self.websocket_capacity, FDS_PER_WEBSOCKET, self.fd_refusals.since_last_log())
            return error_response(503, "out of file descriptors: no more WebSockets on this shard",
                                  headers=(("Retry-After", "5"),))
        limit = self.shard.config.limits.connections_per_ip
        if not self.ips.try_acquire(ip, limit):
            self.refused_per_ip += 1
            return error_response(429, f"too many connections from {ip} (limit {limit})",
                                  headers=(("Retry-After", "5"),))
        return None

    def release(self, ip: str) -> None:
        self.ips.release(ip)

    # --------------------------------------------------------------- tick
    def _tick(self) -> None:
        shard = self.shard
        now = shard.loop.time()
        wall = time.time()
        for session in list(shard.sessions):
            if session is not None and not session.closing:
                session.tick(now, wall)
        if now >= self._next_memory_check:
            self._next_memory_check = now + shard.config.memory.check_interval
            self.check_memory()
        self._return_memory_after_a_wave()
        self._timer = shard.loop.call_later(TICK, self._tick)

    def _return_memory_after_a_wave(self) -> None:
        """When a wave of connections has gone (half of the peak, and at
        least a few hundred), hand the freed heap back: without it the
        allocator keeps the pages and RSS only ever grows (issue 13's soak)."""
        count = self.shard.websocket_count
        if count > self._peak_sessions:
            self._peak_sessions = count
        elif self._peak_sessions - count >= 256 and count <= self._peak_sessions // 2:
            release_memory(collect=False)
            self._peak_sessions = count

    def note_pending(self, pending: int) -> None:
        """``pending``: the bytes the shard's outbound buffers hold now
        (after a delivery or a flush). Grown by a step since the last
        check, with a budget in force: flush at once (a burst delivered in
        one loop turn must not pile up in the buffers of clients that read,
        nor be taken for theirs), then check the memory."""
        if self._checking or self.degradation.budget <= 0:
            return
        if pending >= self._pending_mark:
            self._checking = True
            try:
                pending = self.shard.flush_now()
                self.check_memory(collect=False)
            finally:
                self._checking = False
            self._pending_mark = pending + self._pending_step
        elif pending + self._pending_step < self._pending_mark:
            self._pending_mark = pending + self._pending_step

    def check_memory(self, collect: bool = True) -> None:
        """Measure RSS, move between levels (logged once per change), act
        (``collect``: a full garbage collection too, on the timed checks)."""
        if self.degradation.budget <= 0:
            return
        try:
            rss = self._process.memory_info().rss
        except psutil.Error:  # pragma: no cover - our own process
            return
        self._changed(self.degradation.update(rss))
        level = self.degradation.level
        if level >= 2:
            if not self._checking:
                self._checking = True
                try:
                    self.shard.flush_now()  # whoever can take its bytes now is not cut
                finally:
                    self._checking = False
            cut = self._cut_heaviest()
        else:
            cut = 0
        if level >= 1 and (collect or cut):  # a trim costs: not at every step of a burst
            release_memory(collect)

    def _cut_heaviest(self) -> int:
        """Level 2: among the connections that are not keeping up (their
        transport holds unsent bytes), the ones with the most pending bytes
        go first (1013): at each check, as many as hold the excess of RSS
        over the level-2 threshold, and at least a tenth of them, among
        those holding at least a quarter of what the heaviest holds and
        held back for ``HELD_FOR`` seconds. A client that reads what it is
        sent is not cut: its bytes go out at the next flush, or as soon as
        the loop turns after a burst filled its socket. The cut ones' queued bytes are dropped and their sockets
        closed at once: a client that does not read would hold them until
        the close grace ends."""
        shard = self.shard
        degradation = self.degradation
        # Over the budget itself, a non-reader grows RSS by its share of
        # every publication while it waits to qualify: qualify sooner.
        held_for = HELD_FOR if degradation.rss < degradation.budget else OVER_BUDGET_HELD_FOR
        loaded = [(shard.pending_bytes(s), s) for s in shard.held_back(held_for)]
        if not loaded:
            return 0
        loaded.sort(key=lambda item: item[0], reverse=True)
        # A reader caught paused for a moment holds far less than the flood:
        # only those holding a quarter of the heaviest's bytes are candidates.
        floor = loaded[0][0] // 4
        loaded = [(n, s) for n, s in loaded if n >= floor]
        excess = degradation.rss - degradation.thresholds.level2 * degradation.budget
        at_least = max(1, len(loaded) // 10)
        freed = cut = 0
        for pending, session in loaded:
            if cut >= at_least and freed >= excess:
                break
            freed += pending
            cut += 1
            shard.shed(session, "overloaded: the shard is over its memory budget")
        self.cut_for_memory += cut
        return cut

    def reconfigure(self, config: Config) -> None:
        """A runtime reload's ``[memory]`` thresholds (the budget itself
        changes only with a deploy: a new process). The level is re-decided
        from the last measurement at once."""
        self._changed(self.degradation.reconfigure(self.degradation.budget, _thresholds(config)))

    def _changed(self, transition: Transition | None) -> None:
        """A change of level, from a measurement or a reload: logged once;
        crossing level 1 shrinks the history windows or gives them back."""
        if transition is None:
            return
        (log.warning if transition.rising else log.info)("shard: %s", transition.message())
        if (transition.old >= 1) != (transition.new >= 1):
            fraction = HISTORY_UNDER_PRESSURE if transition.new >= 1 else 1.0
            resized = self.shard.engine.scale_history(fraction)
            log.info("shard: history windows at %d%% of their size (%d channels resized)",
                     round(fraction * 100), resized)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.ips.close()


def _thresholds(config: Config) -> MemoryThresholds:
    memory = config.memory
    return MemoryThresholds(memory.level1, memory.level2, memory.level3, memory.hysteresis)

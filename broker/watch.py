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
from .pressure import Degradation, IpConnectionTable, MemoryThresholds, shard_budget

if TYPE_CHECKING:
    from _ctypes import CFuncPtr  # what a CDLL attribute is (ctypes only re-exports it privately)

__all__ = ["Watch", "Watched", "TICK"]

log = logging.getLogger("broker.watch")

TICK = 1.0  # seconds between liveness/expiry checks

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

    @property
    def websocket_count(self) -> int:
        """Open sessions."""
        ...

    def pending_bytes(self, session: Session) -> int:
        """Bytes queued for ``session``."""
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

    def check_memory(self) -> None:
        """Measure RSS, move between levels (logged once per change), act."""
        if self.degradation.budget <= 0:
            return
        try:
            rss = self._process.memory_info().rss
        except psutil.Error:  # pragma: no cover - our own process
            return
        transition = self.degradation.update(rss)
        if transition is not None:
            (log.warning if transition.rising else log.info)("shard: %s", transition.message())
        level = self.degradation.level
        if level >= 1:
            release_memory()
        if level >= 2:
            self._cut_heaviest()

    def _cut_heaviest(self) -> None:
        """Level 2: the connections with the most pending bytes go first
        (1013), a tenth of those with any pending at each check."""
        shard = self.shard
        loaded = [(shard.pending_bytes(s), s) for s in shard.sessions
                  if s is not None and not s.closing]
        loaded = [(n, s) for n, s in loaded if n > 0]
        if not loaded:
            return
        loaded.sort(key=lambda item: item[0], reverse=True)
        for _, session in loaded[:max(1, len(loaded) // 10)]:
            self.cut_for_memory += 1
            session.close(1013, "overloaded: the shard is over its memory budget")

    def reconfigure(self, config: Config, shards: int) -> None:
        """New limits or thresholds (a reload)."""
        transition = self.degradation.reconfigure(shard_budget(config.memory_limit_mb, shards),
                                                  _thresholds(config))
        self.budget_bytes = (config.memory_limit_mb or 0) * 2**20
        if transition is not None:
            log.info("shard: %s", transition.message())

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.ips.close()


def _thresholds(config: Config) -> MemoryThresholds:
    memory = config.memory
    return MemoryThresholds(memory.level1, memory.level2, memory.level3, memory.hysteresis)

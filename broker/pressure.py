"""Limits and memory budgets (PROTOCOL.md §1 "Liveness and limits", §3
"Memory budget"), Sans-I/O.

No asyncio, no sockets, no clock of its own: every decision takes ``now``
(seconds, any monotonic origin) or the measured RSS from the caller, so
each rule is testable with numbers alone. The shard owns the timers and
the I/O; it asks these objects what to do.

- ``TokenBucket``: one connection's ``commands_per_second`` (burst = rate).
- ``Degradation``: one shard's memory level 0-3 from its RSS and its share
  of the budget, with hysteresis; a change is reported once.
- ``IpConnectionTable``: connections per client IP across the host's
  shards, without locks: a shared file (mmap) with one row per shard, each
  shard writing only its own row.
- ``liveness``: after how much silence a connection is pinged, then dropped.
- ``InboundGate``: when to pause and resume reading a connection whose
  unprocessed commands pile up.
"""
from __future__ import annotations

import enum
import ipaddress
import mmap
import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "TokenBucket",
    "MemoryThresholds",
    "Degradation",
    "Transition",
    "shard_budget",
    "IpConnectionTable",
    "IP_TABLE_FILE",
    "ip_slot",
    "Liveness",
    "liveness",
    "next_liveness_check",
    "InboundGate",
    "LEVEL_NAMES",
]


# ---------------------------------------------------------------- rate limit

class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst`` (default: the
    rate, so a client may send one second's worth at once). A command takes
    one token; none left means refuse it (error 429)."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float | None = None, now: float = 0.0) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else rate)
        if self.burst < 1:
            raise ValueError("burst must be >= 1")
        self.tokens = self.burst
        self.stamp = now

    def take(self, now: float, n: float = 1.0) -> bool:
        """Spend ``n`` tokens at ``now``: True when allowed, False (nothing
        spent) when the bucket holds fewer. A clock going backwards refills
        nothing."""
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.stamp = now
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False


# ------------------------------------------------------------- memory budget

LEVEL_NAMES = ("normal", "elevated", "high", "critical")


@dataclass(frozen=True, slots=True)
class MemoryThresholds:
    """Fractions of a shard's budget where levels 1, 2 and 3 begin; a level
    is left only when RSS falls ``hysteresis`` (a fraction of the budget)
    below the threshold that raised it, so a shard hovering at a boundary
    does not flap. Same meaning as the ``[memory]`` config section."""

    level1: float = 0.75
    level2: float = 0.85
    level3: float = 0.95
    hysteresis: float = 0.05

    def __post_init__(self) -> None:
        if not 0 < self.level1 < self.level2 < self.level3:
            raise ValueError("thresholds must satisfy 0 < level1 < level2 < level3")
        if not 0 <= self.hysteresis < self.level1:
            raise ValueError("hysteresis must be >= 0 and below level1")

    def levels(self) -> tuple[float, float, float]:
        return (self.level1, self.level2, self.level3)


@dataclass(frozen=True, slots=True)
class Transition:
    """One change of level: log it once, count it, act on the new level."""

    old: int
    new: int
    rss: int
    budget: int

    @property
    def rising(self) -> bool:
        return self.new > self.old

    def message(self) -> str:
        share = self.rss / self.budget * 100 if self.budget else 0.0
        return (f"memory {'rising' if self.rising else 'falling'}: degradation "
                f"{self.old} ({LEVEL_NAMES[self.old]}) -> {self.new} ({LEVEL_NAMES[self.new]}), "
                f"rss {self.rss / 2**20:.1f} MiB = {share:.0f}% of {self.budget / 2**20:.1f} MiB")


def shard_budget(memory_limit_mb: int | None, shards: int) -> int:
    """One shard's share of ``--memory-limit-mb`` (all shards together), in
    bytes; 0 when there is no budget."""
    if not memory_limit_mb:
        return 0
    return memory_limit_mb * 2**20 // max(1, shards)


class Degradation:
    """A shard's degradation level from its RSS against its budget.

    Rising: the level becomes the highest whose threshold RSS has reached,
    at once (a jump from 0 to 3 is one transition). Falling: the level
    drops only to the highest whose threshold minus the hysteresis RSS still
    reaches. ``update`` returns a ``Transition`` exactly when the level
    changes, else None. A budget of 0 means no budget: always level 0.
    """

    __slots__ = ("budget", "thresholds", "level", "rss")

    def __init__(self, budget: int, thresholds: MemoryThresholds | None = None) -> None:
        if budget < 0:
            raise ValueError("budget must be >= 0")
        self.budget = budget
        self.thresholds = thresholds or MemoryThresholds()
        self.level = 0
        self.rss = 0

    def _level_for(self, rss: int, minus: float) -> int:
        level = 0
        for i, fraction in enumerate(self.thresholds.levels(), start=1):
            if rss >= (fraction - minus) * self.budget:
                level = i
        return level

    def update(self, rss: int) -> Transition | None:
        """Feed one RSS measurement (bytes)."""
        self.rss = rss
        if self.budget <= 0:
            new = 0
        else:
            new = self._level_for(rss, 0.0)
            if new <= self.level:  # not rising: leave a level only below its threshold minus the gap
                new = min(self.level, self._level_for(rss, self.thresholds.hysteresis))
        if new == self.level:
            return None
        old, self.level = self.level, new
        return Transition(old, new, rss, self.budget)

    def reconfigure(self, budget: int, thresholds: MemoryThresholds) -> Transition | None:
        """New budget or thresholds (a reload): re-decide from the last RSS."""
        self.budget = budget
        self.thresholds = thresholds
        return self.update(self.rss)


# ------------------------------------------------------- connections per IP

#: The table's file name in the run dir (one per broker node).
IP_TABLE_FILE = "ip-connections"

_MAGIC = b"BRKIPT01"
_HEADER = struct.Struct("<8sII")   # magic, shards, slots
_HEADER_SIZE = 64                  # keeps the counters 64-byte aligned
DEFAULT_SLOTS = 65536


def ip_slot(ip: str, slots: int) -> int:
    """The table column of a client address: a hash that every process
    computes alike (Python's ``hash`` is salted per process, so it cannot be
    used). An IPv4-mapped IPv6 address counts as its IPv4 address."""
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        key = address.packed
    except ValueError:  # not an address (a unix socket path): count it by its text
        key = ip.encode("utf-8", "surrogateescape")
    return zlib.crc32(key) % slots


class IpConnectionTable:
    """Connections per client IP, summed over every shard of a host.

    The file at ``path`` holds a ``shards`` × ``slots`` array of uint32
    counters after a small header. Shard ``shard_id`` writes only row
    ``shard_id``, from its one event loop thread, so no lock is needed;
    ``count`` sums a column over all rows (aligned 32-bit loads and stores
    do not tear). Opening zeroes the shard's own row: a replacement process
    starts with none of its dead predecessor's connections.

    Two addresses may share a slot (crc32 modulo ``slots``); they then share
    a limit, so the table can only refuse early, never admit more. Two
    shards admitting the same address at the same moment can each see room
    for one more: the limit may be passed by at most ``shards - 1``.

    ``path=None`` keeps the table in this process only (one shard, embedded).
    """

    def __init__(self, path: str | None, shard_id: int, shards: int,
                 slots: int = DEFAULT_SLOTS) -> None:
        if not 0 <= shard_id < shards:
            raise ValueError(f"shard_id {shard_id} not in 0..{shards - 1}")
        if slots < 1:
            raise ValueError("slots must be >= 1")
        self.path = path
        self.shard_id = shard_id
        self.shards = shards
        self.slots = slots
        size = _HEADER_SIZE + shards * slots * 4
        self._mmap: mmap.mmap | None = None
        if path is None:
            buffer: bytearray | mmap.mmap = bytearray(size)
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                current = os.fstat(fd).st_size
                if current not in (0, size):
                    raise ValueError(f"{path}: {current} bytes, expected {size} "
                                     f"({shards} shards x {slots} slots)")
                if current == 0:
                    os.ftruncate(fd, size)  # concurrent openers extend to the same size: harmless
                self._mmap = buffer = mmap.mmap(fd, size)
            finally:
                os.close(fd)
            magic, file_shards, file_slots = _HEADER.unpack_from(buffer, 0)
            if magic == _MAGIC and (file_shards, file_slots) != (shards, slots):
                raise ValueError(f"{path}: made for {file_shards} shards x {file_slots} slots")
        _HEADER.pack_into(buffer, 0, _MAGIC, shards, slots)  # same bytes from every opener
        # None once closed (close() checks it, so a second close is a no-op).
        self._table: npt.NDArray[np.uint32] | None = np.frombuffer(
            buffer, dtype=np.uint32, offset=_HEADER_SIZE).reshape(shards, slots)
        self._row: npt.NDArray[np.uint32] = self._table[shard_id]
        self._row[:] = 0
        # The upgrade path reads a column: plain uint32 views and a slot cache
        # cost a fraction of numpy's per-call overhead and of parsing the address.
        self._rows = [memoryview(self._table[i]).cast("B").cast("I") for i in range(shards)]
        self._own = self._rows[shard_id]
        self._slots: dict[str, int] = {}

    def _slot(self, ip: str) -> int:
        slot = self._slots.get(ip)
        if slot is None:
            if len(self._slots) >= 4096:
                self._slots.clear()
            slot = self._slots[ip] = ip_slot(ip, self.slots)
        return slot

    def count(self, ip: str) -> int:
        """Connections from ``ip`` on every shard (approximately: see above)."""
        slot = self._slot(ip)
        return sum(row[slot] for row in self._rows)

    def local(self, ip: str) -> int:
        """Connections from ``ip`` on this shard."""
        return int(self._own[self._slot(ip)])

    def try_acquire(self, ip: str, limit: int) -> bool:
        """Count one more connection from ``ip`` unless the host already has
        ``limit`` of them (then answer the upgrade 429 and call nothing else)."""
        slot = self._slot(ip)
        if sum(row[slot] for row in self._rows) >= limit:
            return False
        self._own[slot] += 1
        return True

    def release(self, ip: str) -> None:
        """One connection from ``ip`` counted by ``try_acquire`` ended."""
        if self._table is None:  # closed: a connection that outlived the shard's watch
            return
        slot = self._slot(ip)
        if self._own[slot] > 0:
            self._own[slot] -= 1

    def close(self) -> None:
        """Zero this shard's row (its connections are gone) and unmap."""
        if self._table is None:
            return
        self._row[:] = 0
        for row in self._rows:
            row.release()
        self._rows = []
        self._own = None  # type: ignore[assignment]
        self._row = None  # type: ignore[assignment]
        self._table = None
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None

    def __enter__(self) -> IpConnectionTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------- liveness

class Liveness(enum.Enum):
    NOTHING = "nothing"
    PING = "ping"      # send a WebSocket Ping now, remember when
    DROP = "drop"      # the ping went unanswered: close 1011 / abort


def liveness(last_received: float, pinged_at: float | None, now: float,
             interval: float, timeout: float) -> Liveness:
    """What to do with a connection that last sent a frame at
    ``last_received`` and was last pinged at ``pinged_at`` (None: never).

    A ping not newer than the last received frame was answered (any frame
    counts), so the caller need not reset ``pinged_at`` on receipt. Equal
    times count as answered: the loop's clock is coarse (uvloop reads a
    millisecond clock once per iteration), and a loopback pong often comes
    back within the same reading as its ping.
    Silence of ``interval`` seconds: ping; ``timeout`` more after the ping:
    drop. A late check still pings first, so a client always gets its full
    ``timeout`` to answer.
    """
    if pinged_at is not None and pinged_at > last_received:
        return Liveness.DROP if now - pinged_at >= timeout else Liveness.NOTHING
    return Liveness.PING if now - last_received >= interval else Liveness.NOTHING


def next_liveness_check(last_received: float, pinged_at: float | None,
                        interval: float, timeout: float) -> float:
    """When (same clock as the arguments) ``liveness`` can next say
    something other than NOTHING: a timer for one connection, or the
    earliest of many for a sweep."""
    if pinged_at is not None and pinged_at > last_received:
        return pinged_at + timeout
    return last_received + interval


# ------------------------------------------------------------------ inbound

class InboundGate:
    """Bounds a connection's unprocessed commands: reading pauses when
    ``pending`` reaches ``high`` and resumes once it is down to ``low``
    (default half), so a flood waits in the client's socket, not in ours."""

    __slots__ = ("high", "low", "paused")

    def __init__(self, high: int, low: int | None = None) -> None:
        if high < 1:
            raise ValueError("high must be >= 1")
        self.high = high
        self.low = high // 2 if low is None else low
        if not 0 <= self.low < high:
            raise ValueError("low must be in 0..high-1")
        self.paused = False

    def update(self, pending: int) -> bool | None:
        """Feed the current count: True = pause reading now, False = resume
        reading now, None = leave it as it is."""
        if not self.paused and pending >= self.high:
            self.paused = True
            return True
        if self.paused and pending <= self.low:
            self.paused = False
            return False
        return None

"""File descriptors: how many connections a process can hold.

Every TCP connection costs at least one descriptor, and the soft
RLIMIT_NOFILE is often 1024 while the hard limit is far higher. A broker
that keeps the soft default refuses its 1000th client with EMFILE, silently
(issue 13). So each process (supervisor and shards) raises its soft limit
to the hard one at start and logs the capacity it got; at EMFILE the
``EmfileReporter`` says when to log (once per interval, not per refused
accept) and keeps the count for /metrics.
"""
from __future__ import annotations

import logging
import resource
from dataclasses import dataclass

__all__ = ["FdCapacity", "raise_nofile_limit", "log_capacity", "EmfileReporter"]

_NR_OPEN = "/proc/sys/fs/nr_open"  # Linux: the kernel's ceiling for RLIMIT_NOFILE


@dataclass(frozen=True, slots=True)
class FdCapacity:
    before: int      # soft limit found at start
    soft: int        # soft limit now
    hard: int        # hard limit (RLIM_INFINITY shown as the kernel's ceiling)

    @property
    def raised(self) -> bool:
        return self.soft > self.before


def _ceiling(hard: int) -> int:
    if hard != resource.RLIM_INFINITY:
        return hard
    try:  # pragma: no cover - Linux caps a hard RLIMIT_NOFILE at fs.nr_open: it is never RLIM_INFINITY
        with open(_NR_OPEN, encoding="ascii") as fh:
            return int(fh.read())
    except (OSError, ValueError):  # pragma: no cover - as above
        return 1 << 20


def raise_nofile_limit() -> FdCapacity:
    """Raise the soft RLIMIT_NOFILE to the hard limit (an unlimited hard
    limit counts as the kernel's ``nr_open``). Never lowers it; when the
    kernel refuses, keeps what there is."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _ceiling(hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # pragma: no cover - Linux lets a process raise its soft limit to its hard one
            target = soft
    else:
        target = soft if soft != resource.RLIM_INFINITY else _ceiling(soft)
    return FdCapacity(before=soft if soft != resource.RLIM_INFINITY else target,
                      soft=target, hard=_ceiling(hard))


def log_capacity(log: logging.Logger, who: str, capacity: FdCapacity) -> None:
    """One line at start: the descriptors this process may hold."""
    if capacity.raised:
        log.info("%s: file descriptor limit raised from %d to %d (hard %d)",
                 who, capacity.before, capacity.soft, capacity.hard)
    else:
        log.info("%s: file descriptor limit %d (hard %d)", who, capacity.soft, capacity.hard)
    if capacity.soft < 4096:
        log.warning("%s: only %d file descriptors: at most about %d connections; "
                    "raise the hard limit (ulimit -Hn, LimitNOFILE=)", who, capacity.soft,
                    max(0, capacity.soft - 64))


class EmfileReporter:
    """Counts accepts refused for lack of descriptors; ``record`` answers
    True at most once per ``interval`` seconds (then log it, with ``count``)."""

    __slots__ = ("interval", "count", "_logged_at", "_logged_count")

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self.count = 0
        self._logged_at: float | None = None
        self._logged_count = 0

    def record(self, now: float) -> bool:
        self.count += 1
        if self._logged_at is None or now - self._logged_at >= self.interval:
            self._logged_at = now
            return True
        return False

    def since_last_log(self) -> int:
        """Refusals since the previous True from ``record`` (for the log line)."""
        n, self._logged_count = self.count - self._logged_count, self.count
        return n

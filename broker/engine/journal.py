"""Append-only channel journal: what a home shard needs to come back after SIGKILL.

One file per home shard, in a memory-backed directory the supervisor owns
(tmpfs, e.g. ``/dev/shm/broker-XXXX/``). The shard appends one record per
state change (channel created or reset, publication, channel dropped); the
replacement process replays the file (``load``) and continues every channel
with the same epoch, offsets and retained history. ``rewrite`` compacts.

Durability is the process's death, not the host's: records are written with
one ``os.write`` each and never fsynced (tmpfs has nothing to sync to). A
record is in the file once its ``os.write`` returned, so a publication
acknowledged after ``record_publication`` returned survives SIGKILL.

File format (little-endian; ``docs/journal.md``)::

    file header  b"BRKJ" u32 version (1)
    record       u8 magic 0xB5 | u8 type | u32 payload length | u32 crc
                 | payload
    crc          crc32 over the type byte then the payload
    payload      u16 channel length, u16 epoch length, channel, epoch (UTF-8)
                 then by type:
      1 CHANNEL  i64 last_offset            (state created/reset: start offset)
      2 PUB      i64 offset, f64 ts, data   (data: the rest of the payload)
      3 DROP     (nothing; epoch empty)

``load`` stops at the first record that is short, has a bad magic or a bad
crc, cuts the file back to the end of the last good record and logs a
warning: a torn tail (the write the kill interrupted) never raises, and
records after a corrupt one are dropped.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

__all__ = ["Journal", "ChannelLog", "JournalError", "FORMAT_VERSION", "read_journal"]

log = logging.getLogger("broker.journal")

FORMAT_VERSION = 1
_FILE_MAGIC = b"BRKJ"
_FILE_HEADER = _FILE_MAGIC + struct.pack("<I", FORMAT_VERSION)
_MAGIC = 0xB5
_T_CHANNEL = 1
_T_PUB = 2
_T_DROP = 3

_HDR = struct.Struct("<BBII")      # magic, type, payload length, crc
_NAMES = struct.Struct("<HH")      # channel length, epoch length
_CHAN = struct.Struct("<q")        # last_offset
_PUB = struct.Struct("<qd")        # offset, ts
_HDR_SIZE = _HDR.size
_NAMES_SIZE = _NAMES.size
_PUB_SIZE = _PUB.size
_MAX_NAME = 0xFFFF
_MAX_PAYLOAD = 0xFFFFFFFF
_CHUNK = 1 << 20                   # rewrite writes in chunks of about this size

# crc32 of the type byte alone: the seed each record's crc continues from.
_SEED = {t: zlib.crc32(bytes([t])) for t in (_T_CHANNEL, _T_PUB, _T_DROP)}
_crc32 = zlib.crc32
_write = os.write


class JournalError(Exception):
    """The file is not a journal this code can read (not a torn tail)."""


@dataclass(slots=True)
class ChannelLog:
    """A channel's state as the journal holds it. ``publications`` are
    ``(offset, data, ts)``, oldest first, contiguous, ending at
    ``last_offset`` when non-empty; ``ts`` is the ``time.monotonic()`` the
    engine stamped (valid across processes of one boot)."""

    channel: str
    epoch: str
    last_offset: int
    publications: list[tuple[int, bytes, float]] = field(default_factory=list)


def _names(channel: str, epoch: str) -> bytes:
    cb = channel.encode()
    eb = epoch.encode()
    if len(cb) > _MAX_NAME or len(eb) > _MAX_NAME:
        raise ValueError("channel and epoch must each encode to at most 65535 bytes")
    return _NAMES.pack(len(cb), len(eb)) + cb + eb


def _record(rtype: int, payload: bytes) -> bytes:
    if len(payload) > _MAX_PAYLOAD:
        raise ValueError(f"journal record too large ({len(payload)} bytes)")
    return _HDR.pack(_MAGIC, rtype, len(payload), _crc32(payload, _SEED[rtype])) + payload


class Journal:
    """``Journal(path, max_bytes=64 MiB)``: opens (creates) ``path`` for appends.

    One writer per journal: an exclusive ``flock`` on ``path + ".lock"`` is
    held until ``close()`` (the kernel drops it when the process dies), so a
    second Journal on the same path raises ``BlockingIOError``. If the file
    already has content, call ``load()`` (or ``rewrite()``) before appending:
    an append after an unrepaired torn tail would be unreadable.

    Every ``record_*`` is one ``os.write``; on failure (disk full, ...) the
    file is cut back to its last complete record and ``OSError`` is raised,
    so the caller never acknowledges something the journal does not hold.
    """

    def __init__(self, path: str, max_bytes: int = 64 << 20) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes!r}")
        self.path = os.fspath(path)
        self.max_bytes = int(max_bytes)
        self.truncated = 0          # bytes the last load() cut away
        self._lock_fd = -1
        self._fd = -1               # the open file (read, truncate, close)
        self._wfd = -1              # where appends go; -1 when refused
        self._why = "journal is closed"
        self._base = 0              # size right after the last rewrite()
        # channel -> (epoch, names bytes, crc seed through the names)
        self._cache: dict[str, tuple[str, bytes, int]] = {}
        lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise BlockingIOError(errno.EWOULDBLOCK,
                                  f"journal {self.path} is held by another writer") from None
        except BaseException:
            os.close(lock_fd)
            raise
        self._lock_fd = lock_fd
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            self._size = os.fstat(self._fd).st_size
            if self._size == 0:
                self._write_all(_FILE_HEADER)
                self._wfd = self._fd
            else:
                self._why = f"journal {self.path} has content: call load() before appending"
            try:  # a rewrite() the previous writer did not finish
                os.unlink(self.path + ".tmp")
            except FileNotFoundError:
                pass
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------- appends

    def record_channel(self, channel: str, epoch: str, last_offset: int) -> None:
        """A channel state was created (or reset): its epoch and the offset
        before its first publication."""
        entry = self._cache.get(channel)
        if entry is None or entry[0] != epoch:
            entry = self._entry(channel, epoch)
        self._append(_T_CHANNEL, entry[1] + _CHAN.pack(last_offset))

    def record_publication(self, channel: str, epoch: str, offset: int, data: bytes, ts: float) -> None:
        """Publication ``offset`` of ``channel`` (``epoch``); returns once it
        is in the file. Raises OSError when it could not be written."""
        entry = self._cache.get(channel)
        if entry is None or entry[0] != epoch:
            entry = self._entry(channel, epoch)
        names = entry[1]
        fixed = _PUB.pack(offset, ts)
        size = len(names) + _PUB_SIZE + len(data)
        if size > _MAX_PAYLOAD:
            raise ValueError(f"publication too large for the journal ({len(data)} bytes)")
        self._write_record(_HDR.pack(_MAGIC, _T_PUB, size, _crc32(data, _crc32(fixed, entry[2])))
                           + names + fixed + data)

    def record_drop(self, channel: str) -> None:
        """The engine forgot ``channel`` (idle sweep)."""
        self._cache.pop(channel, None)
        self._append(_T_DROP, _names(channel, ""))

    def _entry(self, channel: str, epoch: str) -> tuple[str, bytes, int]:
        names = _names(channel, epoch)
        entry = (epoch, names, _crc32(names, _SEED[_T_PUB]))
        self._cache[channel] = entry
        return entry

    def _append(self, rtype: int, payload: bytes) -> None:
        self._write_record(_record(rtype, payload))

    def _write_record(self, rec: bytes) -> None:
        """One os.write of a whole record; a short write is completed or undone."""
        try:
            n = _write(self._wfd, rec)
        except OSError as exc:
            self._failed(exc)
        if n != len(rec):
            self._finish(rec, n)
        self._size += len(rec)

    def _failed(self, exc: OSError) -> None:
        if self._wfd == -1:
            raise OSError(errno.EBADF, self._why) from None
        self._repair()
        raise exc

    def _finish(self, rec: bytes, n: int) -> None:
        """Complete a short write, or cut the partial record away and raise."""
        view = memoryview(rec)
        try:
            while n < len(rec):
                written = _write(self._wfd, view[n:])
                if written <= 0:
                    raise OSError(errno.EIO, f"journal {self.path}: write made no progress")
                n += written
        except OSError:
            self._repair()
            raise

    def _repair(self) -> None:
        """Cut the file back to the end of the last complete record; if even
        that fails, refuse further appends (a later good record after a torn
        one would be unreadable)."""
        try:
            os.ftruncate(self._fd, self._size)
        except OSError as exc:
            self._wfd = -1
            self._why = f"journal {self.path}: could not cut a partial record away ({exc}); rewrite() needed"
            log.error("%s", self._why)

    def _write_all(self, data: bytes, fd: int | None = None) -> None:
        fd = self._fd if fd is None else fd
        view = memoryview(data)
        while view:
            written = _write(fd, view)
            if written <= 0:
                raise OSError(errno.EIO, f"journal {self.path}: write made no progress")
            view = view[written:]
        if fd == self._fd:
            self._size += len(data)

    # ---------------------------------------------------------------- state

    @property
    def size(self) -> int:
        """Bytes in the file (header included)."""
        return self._size

    @property
    def needs_compaction(self) -> bool:
        """``size > max_bytes``, and also more than twice what the last
        ``rewrite()`` wrote: a retained state larger than ``max_bytes`` does
        not make every append ask for another compaction."""
        return self._size > self.max_bytes and self._size > 2 * self._base

    @property
    def closed(self) -> bool:
        return self._fd == -1

    def close(self) -> None:
        if self._fd != -1:
            os.close(self._fd)
        self._fd = self._wfd = -1
        self._why = "journal is closed"
        if self._lock_fd != -1:
            os.close(self._lock_fd)   # releases the flock
            self._lock_fd = -1

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Journal {self.path!r} size={self._size} closed={self.closed}>"

    # ---------------------------------------------------------------- replay

    def load(self, keep: Callable[[str], int] | None = None) -> dict[str, ChannelLog]:
        """Replay the file: every channel's epoch, last offset and
        publications (at most ``keep(channel)`` most recent ones per channel
        when ``keep`` is given; ``keep`` is asked each time a channel state
        starts). A torn or corrupt tail is cut away with a warning. Appends
        are allowed afterwards."""
        if self._fd == -1:
            raise ValueError("journal is closed")
        fd = self._fd
        size = os.fstat(fd).st_size
        chunks = []
        pos = 0
        while pos < size:
            chunk = os.pread(fd, min(size - pos, 1 << 30), pos)
            if not chunk:
                break
            chunks.append(chunk)
            pos += len(chunk)
        buf = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        n = len(buf)

        if n < len(_FILE_HEADER):
            if buf != _FILE_HEADER[:n]:
                raise JournalError(f"{self.path} is not a broker journal")
            states: dict[str, list] = {}
            good, reason = 0, "torn file header" if n else ""
        else:
            if buf[:4] != _FILE_MAGIC:
                raise JournalError(f"{self.path} is not a broker journal")
            version = struct.unpack_from("<I", buf, 4)[0]
            if version != FORMAT_VERSION:
                raise JournalError(f"{self.path}: journal format {version} unsupported "
                                   f"(this code reads {FORMAT_VERSION})")
            states, good, reason = _replay(buf, keep)

        self.truncated = n - good
        if good < n:
            log.warning("journal %s: %s at byte %d; cut %d byte(s) away (records after it are dropped)",
                        self.path, reason, good, n - good)
            os.ftruncate(fd, good)
        self._size = good
        if good == 0:
            self._write_all(_FILE_HEADER)
        self._wfd = fd
        return {name: ChannelLog(name, st[0], st[1], list(st[2])) for name, st in states.items()}

    # ---------------------------------------------------------------- compaction

    def rewrite(self, channels: Iterable[ChannelLog]) -> None:
        """Replace the file by one holding exactly ``channels``: written to
        ``path + ".tmp"`` then ``os.replace``d over ``path`` (a crash leaves
        either the old or the new file whole). Later appends go to the new
        file. On error the old file stays in use and OSError is raised."""
        if self._fd == -1:
            raise ValueError("journal is closed")
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
        total = 0
        try:
            parts = [_FILE_HEADER]
            pending = len(_FILE_HEADER)
            for entry in channels:
                pubs = entry.publications
                start = entry.last_offset - len(pubs)
                names = _names(entry.channel, entry.epoch)
                rec = _record(_T_CHANNEL, names + _CHAN.pack(start))
                parts.append(rec)
                pending += len(rec)
                seed = _crc32(names, _SEED[_T_PUB])
                expected = start
                for offset, data, ts in pubs:
                    expected += 1
                    if offset != expected:
                        raise ValueError(f"{entry.channel}: publications must be contiguous and end at "
                                         f"last_offset {entry.last_offset} (got offset {offset}, "
                                         f"expected {expected})")
                    fixed = _PUB.pack(offset, ts)
                    plen = len(names) + _PUB_SIZE + len(data)
                    if plen > _MAX_PAYLOAD:
                        raise ValueError(f"publication too large for the journal ({len(data)} bytes)")
                    parts.append(_HDR.pack(_MAGIC, _T_PUB, plen, _crc32(data, _crc32(fixed, seed))))
                    parts.append(names)
                    parts.append(fixed)
                    parts.append(data)
                    pending += _HDR_SIZE + plen
                if pending >= _CHUNK:
                    self._write_all(b"".join(parts), fd)
                    total += pending
                    parts.clear()
                    pending = 0
            if parts:
                self._write_all(b"".join(parts), fd)
                total += pending
            os.replace(tmp, self.path)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        old, self._fd, self._wfd = self._fd, fd, fd
        self._size = self._base = total
        os.close(old)


def _replay(buf: bytes, keep: Callable[[str], int] | None) -> tuple[dict[str, list], int, str]:
    """Replay the records of ``buf`` (after the file header). Returns the
    states (channel -> [epoch, last_offset, deque of (offset, data, ts)]),
    the end of the last good record and why replay stopped before the end."""
    n = len(buf)
    view = memoryview(buf)
    states: dict[str, list] = {}
    names_cache: dict[bytes, tuple[str, str]] = {}
    hdr_unpack = _HDR.unpack_from
    names_unpack = _NAMES.unpack_from
    pub_unpack = _PUB.unpack_from
    chan_unpack = _CHAN.unpack_from
    crc32 = _crc32
    seeds = _SEED
    anomalies = 0
    first_anomaly = ""
    pos = len(_FILE_HEADER)
    reason = ""
    last_key = b""
    last_names: tuple[str, str] | None = None

    def new_state(channel: str, epoch: str, last: int) -> list:
        if keep is None:
            pubs: deque = deque()
        else:
            pubs = deque(maxlen=max(0, int(keep(channel))))
        state = [epoch, last, pubs]
        states[channel] = state
        return state

    while pos < n:
        if pos + _HDR_SIZE > n:
            reason = "torn record header"
            break
        magic, rtype, plen, crc = hdr_unpack(buf, pos)
        if magic != _MAGIC:
            reason = "bad record magic"
            break
        start = pos + _HDR_SIZE
        end = start + plen
        if end > n:
            reason = "torn record"
            break
        seed = seeds.get(rtype)
        if seed is None:
            reason = f"unknown record type {rtype}"
            break
        if crc32(view[start:end], seed) != crc:
            reason = "bad record crc"
            break
        if plen < _NAMES_SIZE:
            reason = "malformed record"
            break
        clen, elen = names_unpack(buf, start)
        body = start + _NAMES_SIZE + clen + elen
        if body > end:
            reason = "malformed record"
            break
        if body - start == len(last_key) and buf.startswith(last_key, start):
            names = last_names          # same channel as the previous record: no copy
        else:
            last_key = buf[start:body]
            names = names_cache.get(last_key)
        if names is None:
            try:
                names = (buf[start + _NAMES_SIZE:start + _NAMES_SIZE + clen].decode(),
                         buf[start + _NAMES_SIZE + clen:body].decode())
            except UnicodeDecodeError:
                reason = "malformed record"
                break
            names_cache[last_key] = names
        last_names = names
        channel, epoch = names
        if rtype == _T_PUB:
            if body + _PUB_SIZE > end:
                reason = "malformed record"
                break
            offset, ts = pub_unpack(buf, body)
            state = states.get(channel)
            if state is None or state[0] != epoch or offset != state[1] + 1:
                # Not the continuation of the channel's state (never written
                # by a correct engine): start over at this publication, so
                # nothing older can be claimed as covered.
                anomalies += 1
                if not first_anomaly:
                    first_anomaly = f"{channel!r} offset {offset} at byte {pos}"
                state = new_state(channel, epoch, offset - 1)
            state[2].append((offset, buf[body + _PUB_SIZE:end], ts))
            state[1] = offset
        elif rtype == _T_CHANNEL:
            if body + _CHAN.size != end:
                reason = "malformed record"
                break
            new_state(channel, epoch, chan_unpack(buf, body)[0])
        else:  # _T_DROP
            if body != end:
                reason = "malformed record"
                break
            states.pop(channel, None)
        pos = end

    if anomalies:
        log.warning("journal: %d publication(s) did not continue their channel's state "
                    "(first: %s); history restarted there", anomalies, first_anomaly)
    return states, pos, reason


def read_journal(path: str) -> dict[str, ChannelLog]:
    """Every channel a journal holds, read without taking its writer's lock
    and without repairing it (a deploy's new generation reads the fenced old
    generation's journals this way). A torn tail is ignored."""
    with open(path, "rb") as fh:
        buf = fh.read()
    if len(buf) < len(_FILE_HEADER):
        return {}
    if buf[:4] != _FILE_MAGIC or struct.unpack_from("<I", buf, 4)[0] != FORMAT_VERSION:
        raise JournalError(f"{path} is not a broker journal of format {FORMAT_VERSION}")
    states, _good, _reason = _replay(buf, None)
    return {name: ChannelLog(name, st[0], st[1], list(st[2])) for name, st in states.items()}

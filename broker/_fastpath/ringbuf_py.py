"""Bounded per-connection byte buffers for the outbound path (pure twin).

Same names and behaviour as the compiled ``ringbuf`` (see its docstring and
docs/architecture.md). Storage is a bytearray; ``RingBuffer.allocated``
reports the storage the compiled ring would hold under the same policy
(``MIN_ALLOC`` on the first append, doubled up to the capacity, 0 once
drained), so both implementations report identical numbers. The flush
encodes with ``frames_py`` (same zlib parameters as the compiled module, so
compressed frames are byte-identical) and shares compressions in a dict.
"""
from __future__ import annotations

import os

import sys
from array import array
from operator import index as _index
from typing import SupportsIndex, cast

from collections.abc import Iterable

from .frames_py import Deflater, frame_header

__all__ = ["RingBuffer", "OutboundTable", "MIN_ALLOC", "SHARED_BUDGET",
           "FRAMING_NATIVE", "FRAMING_EIO_WS", "FRAMING_POLLING"]

MIN_ALLOC = 64
SHARED_BUDGET = 1 << 22  # default: bytes of messages + frames one flush keeps
FRAMING_NATIVE = 0   # all pending lines as ONE text frame, joined by \n
FRAMING_EIO_WS = 1   # one text frame per pending line (an Engine.IO packet)
FRAMING_POLLING = 2  # never written by flush: a long-poll answers it
_FRAMINGS = (FRAMING_NATIVE, FRAMING_EIO_WS, FRAMING_POLLING)
_IOV_MAX = 1024      # iovecs per writev (Linux, macOS)

_U32_MAX = 0xFFFFFFFF
# 1-D buffers of native-order 4-byte unsigned ints are read as ids directly
# (array('I'), uint32 memoryviews, ...); the compiled module accepts the same.
_NATIVE = "<" if sys.byteorder == "little" else ">!"
_U32_PREFIXES = frozenset(("", "@", "=", *_NATIVE))

Buffer = bytes | bytearray | memoryview


def _ssize(n: object) -> int:
    """n as an int that fits a C Py_ssize_t (OverflowError otherwise)."""
    # The casts below only tell mypy what operator.index checks at run time:
    # anything without __index__ raises TypeError, as in the compiled module.
    n = _index(cast(SupportsIndex, n))
    if not -sys.maxsize - 1 <= n <= sys.maxsize:
        raise OverflowError(f"{n} does not fit a C ssize_t")
    return n


def _capacity(capacity: object) -> int:
    cap = _ssize(capacity)
    if cap <= 0:
        raise ValueError(f"capacity must be > 0, not {cap}")
    return cap


def _nbytes(data: Buffer) -> int:
    if type(data) is bytes or type(data) is bytearray:
        return len(data)
    with memoryview(data) as view:
        if not view.c_contiguous:
            raise BufferError("data must be a C-contiguous buffer")
        return view.nbytes


def _grown(alloc: int, need: int, cap: int) -> int:
    a = alloc if alloc > 0 else MIN_ALLOC
    while a < need:
        if a > (cap >> 1):
            return cap
        a <<= 1
    return a if a < cap else cap


def _check_framing(framing: object, window_bits: object) -> tuple[int, int]:
    f = _index(cast(SupportsIndex, framing))
    w = _index(cast(SupportsIndex, window_bits))
    if f not in _FRAMINGS:
        raise ValueError(f"unknown framing {f!r}")
    if w != 0 and not 9 <= w <= 15:
        raise ValueError(f"window_bits must be 0 (uncompressed) or 9..15, not {w}")
    if w and f == FRAMING_POLLING:
        raise ValueError("a polling connection is not compressed by the table")
    return f, w


def _cid_or_none(cid: object) -> int | None:
    cid = _index(cast(SupportsIndex, cid))
    return cid if 0 <= cid <= _U32_MAX else None


class RingBuffer:
    """One bounded byte buffer: ``RingBuffer(capacity)`` (capacity > 0 bytes)."""

    __slots__ = ("_buf", "_capacity", "_allocated")

    def __init__(self, capacity: int) -> None:
        self._capacity = _capacity(capacity)
        self._buf = bytearray()
        self._allocated = 0

    def __len__(self) -> int:
        return len(self._buf)

    def __repr__(self) -> str:
        return (f"<RingBuffer len={len(self._buf)} capacity={self._capacity}"
                f" allocated={self._allocated}>")

    @property
    def capacity(self) -> int:
        """Maximum pending bytes."""
        return self._capacity

    @property
    def allocated(self) -> int:
        """Bytes of storage held (0 when empty)."""
        return self._allocated

    def append(self, data: Buffer) -> bool:
        """Append all of ``data`` and return True, or nothing and return False
        when ``len(self) + len(data) > capacity``."""
        n = _nbytes(data)
        size = len(self._buf)
        if n > self._capacity - size:
            return False
        if n:
            if size + n > self._allocated:
                self._allocated = _grown(self._allocated, size + n, self._capacity)
            self._buf += data
        return True

    def peek(self, n: int = -1) -> bytes:
        """The first ``n`` pending bytes (all when n < 0), not consumed."""
        n = _ssize(n)
        if n < 0 or n >= len(self._buf):
            return bytes(self._buf)
        return bytes(self._buf[:n])

    def consume(self, n: int) -> None:
        """Drop the first ``n`` pending bytes (ValueError if n < 0 or n > len)."""
        n = _ssize(n)
        size = len(self._buf)
        if n < 0 or n > size:
            raise ValueError(f"cannot consume {n} of {size} pending bytes")
        if n == size:
            self.clear()
        elif n:
            del self._buf[:n]

    def take(self) -> bytes:
        """All pending bytes; the buffer is then empty (storage released)."""
        data = bytes(self._buf)
        self.clear()
        return data

    def clear(self) -> None:
        """Drop all pending bytes and release the storage."""
        self._buf = bytearray()
        self._allocated = 0


def _u32_ids(cids: object) -> Iterable[int] | None:
    """The ids of a 1-D uint32 buffer, or None when cids is not one."""
    try:
        view = memoryview(cids)  # type: ignore[arg-type]
    except TypeError:
        return None
    with view:
        fmt = view.format
        if (view.ndim != 1 or view.itemsize != 4 or fmt[-1:] not in ("I", "L")
                or fmt[:-1] not in _U32_PREFIXES):
            return None
        ids = array("I")
        ids.frombytes(view.tobytes())
        return ids


class OutboundTable:
    """One bounded ring buffer per open connection:
    ``OutboundTable(capacity, deflate_level=6, shared_budget=SHARED_BUDGET)``.

    ``deflate_level`` is zlib's level for compressed connections;
    ``shared_budget`` bounds the bytes (messages + their frames) that one
    flush keeps to share compressions: past it, a new compression serves
    only the connection being written."""

    __slots__ = ("_bufs", "_dirty", "_capacity", "_total", "_fds", "_paused",
                 "frames_written", "bytes_written", "lines_written", "_batch",
                 "_framing", "_level", "_deflaters", "_shared", "_shared_bytes",
                 "_budget", "compressions")

    def __init__(self, capacity: int, deflate_level: int = 6,
                 shared_budget: int = SHARED_BUDGET) -> None:
        self._capacity = _capacity(capacity)
        level = _index(deflate_level)
        if not -1 <= level <= 9:
            raise ValueError(f"deflate_level must be in -1..9, not {level}")
        budget = _ssize(shared_budget)
        if budget < 0:
            raise ValueError(f"shared_budget must be >= 0, not {budget}")
        self._budget = budget
        self._shared_bytes = 0
        self._level = level
        self._framing: dict[int, tuple[int, int]] = {}  # only non-default ones
        self._deflaters: dict[int, Deflater] = {}
        # (window bits, message) -> compressed frame; lives until the end of
        # a flush (take_frames' entries until the next flush starts).
        self._shared: dict[tuple[int, bytes], bytes] = {}
        self.compressions = 0
        self._bufs: dict[int, bytearray] = {}
        self._dirty: dict[int, None] = {}  # insertion order = first-dirtied order
        self._total = 0
        self._fds: dict[int, int] = {}
        self._paused: set[int] = set()
        self.frames_written = 0
        self.bytes_written = 0
        self.lines_written = 0
        self._batch = [0] * _BATCH_BUCKETS

    def __len__(self) -> int:
        return len(self._bufs)

    def __repr__(self) -> str:
        return (f"<OutboundTable open={len(self._bufs)} total_pending={self._total}"
                f" capacity={self._capacity}>")

    @property
    def capacity(self) -> int:
        """Maximum pending bytes per connection."""
        return self._capacity

    @property
    def total_pending(self) -> int:
        """Pending bytes over all open connections."""
        return self._total

    def open(self, cid: int, framing: int = FRAMING_NATIVE) -> None:
        """Start buffering for ``cid``, uncompressed, in ``framing``
        (ValueError if already open or an unknown framing)."""
        f, _ = _check_framing(framing, 0)
        c = _cid_or_none(cid)
        if c is None:
            raise ValueError(f"conn id {cid!r} is outside [0, 2**32)")
        if c in self._bufs:
            raise ValueError(f"conn id {cid!r} is already open")
        self._bufs[c] = bytearray()
        if f != FRAMING_NATIVE:
            self._framing[c] = (f, 0)

    def close(self, cid: int) -> None:
        """Stop buffering for ``cid``, dropping its pending bytes (no error if unknown)."""
        cid = _index(cid)
        buf = self._bufs.pop(cid, None)
        if buf is not None:
            self._total -= len(buf)
            self._dirty.pop(cid, None)
            self._fds.pop(cid, None)
            self._paused.discard(cid)
            self._framing.pop(cid, None)

    def is_open(self, cid: int) -> bool:
        return _index(cid) in self._bufs

    def _get(self, cid: int) -> bytearray:
        buf = self._bufs.get(_index(cid))
        if buf is None:
            raise KeyError(cid)
        return buf

    def append(self, cid: int, data: Buffer) -> bool:
        """Append all of ``data`` to ``cid``'s buffer (True) or nothing when it
        would overflow (False). KeyError if ``cid`` is not open."""
        buf = self._get(cid)
        n = _nbytes(data)
        if n > self._capacity - len(buf):
            return False
        if n:
            buf += data
            self._total += n
            cid = _index(cid)
            if cid not in self._dirty:
                self._dirty[cid] = None
        return True

    def append_many(self, cids: object, data: Buffer) -> list[int]:
        """Append ``data`` to every open id of ``cids`` (a uint32 buffer or a
        sequence of ints; ids not open are skipped). Returns the ids whose
        buffer would overflow: nothing was written to them."""
        n = _nbytes(data)
        ids = None
        if type(cids) is not list and type(cids) is not tuple:
            ids = _u32_ids(cids)
        if ids is None:
            ids = map(_index, cids)  # type: ignore[call-overload]
        overflow: list[int] = []
        if n == 0:
            for _ in ids:  # same errors (non-int ids) as a real pass
                pass
            return overflow
        get = self._bufs.get
        dirty = self._dirty
        room = self._capacity - n
        written = 0
        for cid in ids:
            buf = get(cid)
            if buf is None:
                continue
            if len(buf) > room:
                overflow.append(cid)
                continue
            buf += data
            written += 1
            if cid not in dirty:
                dirty[cid] = None
        self._total += written * n
        return overflow

    def pending(self, cid: int) -> int:
        """Pending bytes of ``cid`` (KeyError if not open)."""
        return len(self._get(cid))

    def take(self, cid: int) -> bytes:
        """All pending bytes of ``cid``, which is then empty (KeyError if not open)."""
        buf = self._get(cid)
        if not buf:
            return b""
        data = bytes(buf)
        self._total -= len(data)
        self._bufs[_index(cid)] = bytearray()
        return data

    def take_dirty(self) -> list[int]:
        """Ids that received bytes since the last call, each once, in
        first-dirtied order; closed ones excluded."""
        ids = list(self._dirty)
        self._dirty.clear()
        return ids

    # -- direct writes: the flush pass ---------------------------------------

    def set_fd(self, cid: int, fd: int) -> None:
        """Let ``flush`` write ``cid``'s frames to socket ``fd`` itself (-1:
        the caller writes them, via ``take``). The fd must stay open while
        set: the caller sets -1 (or ``close(cid)``) before its socket can be
        closed, or a reused number would get another connection's bytes."""
        self._get(cid)
        if fd < 0:
            self._fds.pop(_index(cid), None)
        else:
            self._fds[_index(cid)] = fd

    def set_paused(self, cid: int, paused: bool) -> None:
        """While paused (its transport holds unsent bytes), ``flush`` leaves
        ``cid``'s lines pending: writing past the transport would reorder."""
        c = _index(cid)
        if c not in self._bufs:
            return
        if paused:
            self._paused.add(c)
        else:
            self._paused.discard(c)

    def count_frame(self, nbytes: int, lines: int) -> None:
        """Count a frame the caller wrote itself (same counters as ``flush``)."""
        self._batch[min(lines.bit_length(), _BATCH_BUCKETS - 1)] += 1
        self.lines_written += lines
        self.frames_written += 1
        self.bytes_written += nbytes

    def batch_histogram(self) -> list[int]:
        """Frames by lines per frame: index i counts frames with bit_length(lines) == i."""
        return list(self._batch)

    def set_framing(self, cid: int, framing: int, window_bits: int = 0) -> None:
        """How ``flush`` and ``take_frames`` encode ``cid``'s lines from now
        on: ``framing`` one of FRAMING_*, ``window_bits`` 0 (uncompressed)
        or 9..15 (permessage-deflate, no context takeover, that server
        window). Lines already pending go out in the new framing. KeyError
        if not open; ValueError for other values (a polling connection is
        never compressed here)."""
        kind = _check_framing(framing, window_bits)
        self._get(cid)
        if kind == (FRAMING_NATIVE, 0):
            self._framing.pop(_index(cid), None)
        else:
            self._framing[_index(cid)] = kind

    def framing_of(self, cid: int) -> tuple[int, int]:
        """``(framing, window_bits)`` of ``cid`` (KeyError if not open)."""
        self._get(cid)
        return self._framing.get(_index(cid), (FRAMING_NATIVE, 0))

    # -- encoding: the frames of one connection --------------------------------

    def _compressed_frame(self, message: bytes, window_bits: int) -> bytes:
        key = (window_bits, message)
        frame = self._shared.get(key)
        if frame is None:
            deflater = self._deflaters.get(window_bits)
            if deflater is None:
                deflater = self._deflaters[window_bits] = Deflater(self._level, window_bits)
            payload = deflater.compress(message)
            frame = frame_header(len(payload), rsv1=True) + payload
            self.compressions += 1
            size = len(message) + len(frame)
            if self._shared_bytes + size <= self._budget:  # else: this write only
                self._shared[key] = frame
                self._shared_bytes += size
        return frame

    def _clear_shared(self) -> None:
        self._shared.clear()
        self._shared_bytes = 0

    def _encode(self, pending: bytearray, framing: int, window_bits: int) -> list[bytes]:
        """The frames of ``pending`` (``\\n``-terminated lines) as a list of
        buffers to write in order."""
        body = bytes(pending[:-1])  # without the final newline
        messages = [body] if framing == FRAMING_NATIVE else body.split(b"\n")
        if window_bits:
            return [self._compressed_frame(m, window_bits) for m in messages]
        parts: list[bytes] = []
        for message in messages:
            parts.append(frame_header(len(message)))
            if message:
                parts.append(message)
        return parts

    def _count_encoded(self, framing: int, size: int, lines: int) -> None:
        if framing == FRAMING_NATIVE:
            self.count_frame(size, lines)
        else:  # one frame per line
            self.frames_written += lines
            self.lines_written += lines
            self.bytes_written += size
            self._batch[1] += lines

    def _drop(self, cid: int, buf: bytearray) -> None:
        self._total -= len(buf)
        self._bufs[cid] = bytearray()

    def take_frames(self, cid: int) -> bytes:
        """The frames of ``cid``'s pending lines, exactly as ``flush`` would
        write them (framing and compression), for a caller that writes
        itself (TLS, no fd); the buffer is then empty. Counted as ``flush``
        counts. ValueError for a polling connection (``take_payload``)."""
        buf = self._get(cid)
        cid = _index(cid)
        framing, window_bits = self._framing.get(cid, (FRAMING_NATIVE, 0))
        if framing == FRAMING_POLLING:
            raise ValueError(f"conn id {cid!r} is polling: use take_payload")
        if not buf:
            return b""
        data = b"".join(self._encode(buf, framing, window_bits))
        self._count_encoded(framing, len(data), buf.count(b"\n", 0, len(buf) - 1) + 1)
        self._drop(cid, buf)
        return data

    def take_payload(self, cid: int, sep: Buffer = b"\x1e") -> bytes:
        """``cid``'s pending lines without their newlines, joined by ``sep``
        (an Engine.IO long-poll payload); the buffer is then empty. Counted
        as one frame of that many lines."""
        buf = self._get(cid)
        sep = bytes(memoryview(sep))
        if not buf:
            return b""
        lines = bytes(buf[:-1]).split(b"\n")
        data = sep.join(lines)
        self.count_frame(len(data), len(lines))
        self._drop(_index(cid), buf)
        return data

    # -- the flush pass ------------------------------------------------------

    def flush(self) -> tuple[list[int], list[tuple[int, bytes | None]]]:
        """Write every dirty connection's pending lines in its framing.

        Pending bytes must be ``\\n``-terminated lines. For each dirty id with
        an fd, not paused and not polling: its frames (``take_frames``'
        bytes) in one writev (more past IOV_MAX buffers); its buffer is then
        empty. A compressed message is compressed once per window size for
        every connection of this flush that sends it. Returns ``(deferred,
        tails)``: ``deferred`` lists the dirty ids the caller must write
        itself (no fd, paused or polling; their bytes stay pending),
        ``tails`` lists ``(cid, rest)`` where the socket took only part of
        the frames — ``rest`` (bytes) must go to the transport next, before
        anything else — or ``(cid, None)`` when the socket failed.
        """
        deferred: list[int] = []
        tails: list[tuple[int, bytes | None]] = []
        self._clear_shared()  # what take_frames shared since the last flush
        try:
            for cid in self.take_dirty():
                buf = self._bufs[cid]
                if not buf:
                    continue
                fd = self._fds.get(cid)
                framing, window_bits = self._framing.get(cid, (FRAMING_NATIVE, 0))
                if fd is None or cid in self._paused or framing == FRAMING_POLLING:
                    deferred.append(cid)
                    continue
                parts = self._encode(buf, framing, window_bits)
                size = sum(map(len, parts))
                if len(parts) > _IOV_MAX:
                    parts = [b"".join(parts)]
                try:
                    sent = os.writev(fd, parts)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    sent = -1
                if sent < 0:
                    tails.append((cid, None))
                else:
                    if sent < size:
                        tails.append((cid, b"".join(parts)[sent:]))
                    self._count_encoded(framing, size, buf.count(b"\n", 0, len(buf) - 1) + 1)
                self._drop(cid, buf)
        finally:
            self._clear_shared()
        return deferred, tails


_BATCH_BUCKETS = 16

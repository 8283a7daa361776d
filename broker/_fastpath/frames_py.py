"""WebSocket server frames and permessage-deflate (pure twin).

Same names and behaviour as the compiled ``frames`` (see its docstring and
docs/architecture.md); compressed output is byte-identical to it for the
same level and window (Python's zlib: raw deflate, memLevel 8, default
strategy; level 0 writes the stored blocks directly in both).
"""
from __future__ import annotations

import zlib
from operator import index as _index
from typing import Protocol
from collections.abc import Iterable

__all__ = [
    "OP_CONT", "OP_TEXT", "OP_BINARY", "OP_CLOSE", "OP_PING", "OP_PONG",
    "frame_header", "text_frame", "ndjson_batch", "batch_frame",
    "Deflater", "SharedFrames",
]

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_OPCODES = frozenset((OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG))
_SYNC_TAIL = b"\x00\x00\xff\xff"
_MEM_LEVEL = 8  # zlib's DEF_MEM_LEVEL
_MAX_STORED = 65535

Buffer = bytes | bytearray | memoryview


def _as_bytes(data: Buffer) -> bytes:
    if type(data) is bytes:
        return data
    with memoryview(data) as view:
        if not view.c_contiguous:
            raise BufferError("data must be a C-contiguous buffer")
        return view.tobytes()


def _header(length: int, opcode: int, fin: bool, rsv1: bool) -> bytes:
    b0 = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    if length < 126:
        return bytes((b0, length))
    if length < 65536:
        return bytes((b0, 126)) + length.to_bytes(2, "big")
    return bytes((b0, 127)) + length.to_bytes(8, "big")


def frame_header(length: int, opcode: int = OP_TEXT, fin: bool = True,
                 rsv1: bool = False) -> bytes:
    """An unmasked server frame header (RFC 6455 §5.2) for ``length`` payload bytes."""
    op = _index(opcode)
    if op not in _OPCODES:
        raise ValueError(f"invalid opcode {op!r}")
    fin = bool(fin)
    rsv1 = bool(rsv1)
    length = _index(length)
    if length < 0 or length >= 2 ** 63:
        raise ValueError(f"frame length {length} is outside [0, 2**63)")
    if op >= OP_CLOSE and (length > 125 or not fin or rsv1):
        raise ValueError("control frames are unfragmented, <= 125 bytes, without RSV1")
    return _header(length, op, fin, rsv1)


def text_frame(payload: Buffer, rsv1: bool = False) -> bytes:
    """One unfragmented text frame (header + payload); RSV1 marks it compressed."""
    payload = _as_bytes(payload)
    return _header(len(payload), OP_TEXT, True, bool(rsv1)) + payload


def ndjson_batch(lines: Iterable[Buffer]) -> bytes:
    """Lines joined by one ``\\n`` (ValueError: no line, or a line containing ``\\n``)."""
    seq = list(lines)
    if not seq:
        raise ValueError("ndjson_batch needs at least one line")
    for i, line in enumerate(seq):
        line = seq[i] = _as_bytes(line)
        if b"\n" in line:
            raise ValueError(f"line {i} contains a newline")
    return b"\n".join(seq)


def _check_pending(pending: bytes) -> None:
    if not pending.endswith(b"\n"):
        raise ValueError("pending must be non-empty and end with a newline")


def batch_frame(pending: Buffer) -> bytes:
    """The text frame of ``pending`` (``\\n``-terminated lines) without its final ``\\n``."""
    pending = _as_bytes(pending)
    _check_pending(pending)
    return _header(len(pending) - 1, OP_TEXT, True, False) + pending[:-1]


def _stored(payload: bytes) -> bytes:
    """Level 0: non-final stored blocks of <= 65535 bytes, then the first
    byte of the sync-flush empty block (what one sync-flushed zlib call
    emits, independent of zlib's output-buffer sizing)."""
    out = bytearray()
    for i in range(0, len(payload), _MAX_STORED):
        block = payload[i:i + _MAX_STORED]
        k = len(block)
        out += b"\x00" + k.to_bytes(2, "little") + (k ^ 0xFFFF).to_bytes(2, "little")
        out += block
    out += b"\x00"
    return bytes(out)


class Deflater:
    """permessage-deflate without server context takeover (RFC 7692 §7.2.1).

    ``Deflater(level=6, window_bits=15)``; every ``compress`` is an
    independent raw-deflate message, sync-flushed, trailing 00 00 ff ff
    removed. window_bits 8 means 9 (zlib has no raw 8-bit window).
    """

    __slots__ = ("_level", "_window_bits")

    def __init__(self, level: int = 6, window_bits: int = 15) -> None:
        level = _index(level)
        window_bits = _index(window_bits)
        if not -1 <= level <= 9:
            raise ValueError(f"level must be in -1..9, not {level}")
        if not 8 <= window_bits <= 15:
            raise ValueError(f"window_bits must be in 8..15, not {window_bits}")
        if window_bits == 8:
            window_bits = 9  # zlib refuses raw deflate with an 8-bit window
        self._level = level
        self._window_bits = window_bits

    @property
    def level(self) -> int:
        return self._level

    @property
    def window_bits(self) -> int:
        return self._window_bits

    def __repr__(self) -> str:
        return f"<Deflater level={self._level} window_bits={self._window_bits}>"

    def compress(self, payload: Buffer) -> bytes:
        """The permessage-deflate payload of one message (independent of the others)."""
        payload = _as_bytes(payload)
        if self._level == 0:
            return _stored(payload)
        # A fresh compressor per message: no context takeover.
        c = zlib.compressobj(self._level, zlib.DEFLATED, -self._window_bits, _MEM_LEVEL)
        data = c.compress(payload) + c.flush(zlib.Z_SYNC_FLUSH)
        if data.endswith(_SYNC_TAIL):
            data = data[:-4]
        return data


class _Compressor(Protocol):
    def compress(self, payload: bytes) -> bytes: ...


class SharedFrames:
    """Frames of flushed batches, built (and compressed) once per distinct
    ``pending`` until ``clear()``: ``SharedFrames(deflater)``."""

    __slots__ = ("_deflater", "_plain", "_compressed", "_compressions")

    def __init__(self, deflater: _Compressor | None) -> None:
        self._deflater = deflater
        self._plain: dict[bytes, bytes] = {}
        self._compressed: dict[bytes, bytes] = {}
        self._compressions = 0

    @property
    def deflater(self) -> _Compressor | None:
        return self._deflater

    @property
    def compressions(self) -> int:
        """Real compressions since creation (cache misses with compress=True)."""
        return self._compressions

    def __repr__(self) -> str:
        return (f"<SharedFrames cached={len(self._plain) + len(self._compressed)}"
                f" compressions={self._compressions}>")

    def batch_frame(self, pending: bytes, compress: bool) -> bytes:
        """The frame of ``pending`` (see ``batch_frame``); compressed (RSV1) when
        ``compress``. The same object for the same pending until ``clear()``."""
        cache = self._compressed if compress else self._plain
        frame = cache.get(pending)
        if frame is not None:
            return frame
        data = _as_bytes(pending)
        _check_pending(data)
        if not compress:
            frame = _header(len(data) - 1, OP_TEXT, True, False) + data[:-1]
        elif self._deflater is None:
            raise ValueError("SharedFrames has no deflater")
        else:
            frame = text_frame(self._deflater.compress(data[:-1]), True)
            self._compressions += 1
        cache[pending] = frame
        return frame

    def clear(self) -> None:
        """Forget every cached frame (call once per flush)."""
        self._plain.clear()
        self._compressed.clear()

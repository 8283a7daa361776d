# distutils: libraries = z
"""WebSocket server frames and permessage-deflate (compiled).

Contract: docs/architecture.md, "Fastpath contracts / frames". The pure
twin is ``frames_py``; both behave identically and, for the same level and
window, produce byte-identical compressed output (both are zlib, raw
deflate, memLevel 8, default strategy).

Choices where the contract is silent (same in the twin):
- payloads are any C-contiguous bytes-like object (str is a TypeError);
  text payloads are not UTF-8 checked (the broker builds them from JSON).
- ``frame_header``: ValueError for a length outside [0, 2**63), an opcode
  other than the six OP_* values, or a control frame (CLOSE/PING/PONG) that
  is fragmented, longer than 125 bytes or has RSV1 (RFC 6455 §5.5, RFC 7692
  §6.1).
- ``ndjson_batch`` accepts any iterable of bytes-like lines; an empty line
  is allowed.
- ``batch_frame``: ValueError when ``pending`` is empty or does not end
  with ``\\n``.
- ``Deflater(level, window_bits)``: level -1..9, window_bits 8..15; zlib
  cannot make raw deflate streams with an 8-bit window, so 8 means 9
  (``.window_bits`` reports 9). The 512-byte window is what an 8-bit
  negotiation gets from zlib-based servers; do not accept
  ``server_max_window_bits=8`` from a client that cannot inflate with 9.
  An empty payload compresses to b"\\x00" (RFC 7692 §7.2.3.6). Level 0
  writes the stored blocks directly (blocks of 65535 bytes, exactly what a
  single sync-flushed zlib call emits): zlib's own level-0 block sizes depend
  on its caller's output-buffer sizes, which would break byte identity.
- ``SharedFrames(deflater)``: ``pending`` must be hashable bytes (the
  cache key); ``deflater`` may be None when nothing is compressed
  (compress=True then raises ValueError). Any object with a
  ``compress(payload) -> bytes`` method serves as the deflater.
"""
from broker._fastpath.pmdeflate cimport (
    Compressor,
    _compress,
    _compressor_free,
    _compressor_init,
    _compressor_trim,
)
from broker._fastpath.wsheader cimport _header_size, _write_header
cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memchr, memcpy

from operator import index as _index

__all__ = [
    "OP_CONT", "OP_TEXT", "OP_BINARY", "OP_CLOSE", "OP_PING", "OP_PONG",
    "frame_header", "text_frame", "ndjson_batch", "batch_frame",
    "Deflater", "SharedFrames",
]


cdef enum:
    _OP_CONT = 0x0
    _OP_TEXT = 0x1
    _OP_BINARY = 0x2
    _OP_CLOSE = 0x8
    _OP_PING = 0x9
    _OP_PONG = 0xA
    _MAX_HEADER = 10           # server frames are never masked

OP_CONT = _OP_CONT
OP_TEXT = _OP_TEXT
OP_BINARY = _OP_BINARY
OP_CLOSE = _OP_CLOSE
OP_PING = _OP_PING
OP_PONG = _OP_PONG

cdef bytes _EMPTY = b""
cdef bytes _TEXT_EMPTY_FRAME = b"\x81\x00"


cdef inline int _check_opcode(object opcode) except -1:
    op = _index(opcode)
    if op not in (_OP_CONT, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG):
        raise ValueError(f"invalid opcode {op!r}")
    return op


cdef bytes _frame(const char* payload, Py_ssize_t n, bint rsv1):
    """One unfragmented text frame: header + n payload bytes, one allocation."""
    cdef Py_ssize_t h = _header_size(n)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, h + n)
    cdef char* p = PyBytes_AS_STRING(out)
    _write_header(<unsigned char*>p, <unsigned long long>n, _OP_TEXT, True, rsv1)
    if n:
        memcpy(p + h, payload, <size_t>n)
    return out


def frame_header(length, opcode=OP_TEXT, fin=True, rsv1=False):
    """An unmasked server frame header (RFC 6455 §5.2) for ``length`` payload bytes."""
    cdef unsigned char buf[_MAX_HEADER]
    cdef Py_ssize_t h
    cdef int op = _check_opcode(opcode)
    cdef bint f = fin
    cdef bint r = rsv1
    length = _index(length)
    if length < 0 or length >= 2 ** 63:
        raise ValueError(f"frame length {length} is outside [0, 2**63)")
    if op >= _OP_CLOSE and (length > 125 or not f or r):
        raise ValueError("control frames are unfragmented, <= 125 bytes, without RSV1")
    h = _write_header(buf, <unsigned long long>length, op, f, r)
    return PyBytes_FromStringAndSize(<char*>buf, h)


def text_frame(payload, rsv1=False):
    """One unfragmented text frame (header + payload); RSV1 marks it compressed."""
    cdef Py_buffer view
    cdef bint r = rsv1
    if type(payload) is bytes:
        return _frame(PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload), r)
    PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
    try:
        return _frame(<const char*>view.buf, view.len, r)
    finally:
        PyBuffer_Release(&view)


def ndjson_batch(lines):
    """Lines joined by one ``\\n`` (ValueError: no line, or a line containing ``\\n``)."""
    cdef list seq = list(lines) if type(lines) is not list else lines
    cdef Py_ssize_t count = len(seq)
    cdef Py_ssize_t total, i, n
    cdef Py_buffer view
    cdef bytes out
    cdef char* p
    if count == 0:
        raise ValueError("ndjson_batch needs at least one line")
    # Pass 1: sizes and newline check (bytes items without a buffer export).
    total = count - 1
    for i in range(count):
        line = seq[i]
        if type(line) is bytes:
            n = PyBytes_GET_SIZE(line)
            if n and memchr(PyBytes_AS_STRING(line), b'\n', <size_t>n) != NULL:
                raise ValueError(f"line {i} contains a newline")
        else:
            PyObject_GetBuffer(line, &view, PyBUF_SIMPLE)
            n = view.len
            try:
                if n and memchr(view.buf, b'\n', <size_t>n) != NULL:
                    raise ValueError(f"line {i} contains a newline")
            finally:
                PyBuffer_Release(&view)
        total += n
    out = PyBytes_FromStringAndSize(NULL, total)
    p = PyBytes_AS_STRING(out)
    for i in range(count):
        line = seq[i]
        if i:
            p[0] = b'\n'
            p += 1
        if type(line) is bytes:
            n = PyBytes_GET_SIZE(line)
            memcpy(p, PyBytes_AS_STRING(line), <size_t>n)
        else:
            PyObject_GetBuffer(line, &view, PyBUF_SIMPLE)
            n = view.len
            if p + n > PyBytes_AS_STRING(out) + total:  # resized by another thread
                PyBuffer_Release(&view)
                raise RuntimeError("a line changed size during ndjson_batch")
            memcpy(p, view.buf, <size_t>n)
            PyBuffer_Release(&view)
        p += n
    return out


cdef inline int _check_pending(const char* p, Py_ssize_t n) except -1:
    if n == 0 or p[n - 1] != b'\n':
        raise ValueError("pending must be non-empty and end with a newline")
    return 0


def batch_frame(pending):
    """The text frame of ``pending`` (``\\n``-terminated lines) without its final ``\\n``."""
    cdef Py_buffer view
    if type(pending) is bytes:
        _check_pending(PyBytes_AS_STRING(pending), PyBytes_GET_SIZE(pending))
        return _frame(PyBytes_AS_STRING(pending), PyBytes_GET_SIZE(pending) - 1, False)
    PyObject_GetBuffer(pending, &view, PyBUF_SIMPLE)
    try:
        _check_pending(<const char*>view.buf, view.len)
        return _frame(<const char*>view.buf, view.len - 1, False)
    finally:
        PyBuffer_Release(&view)



@cython.final
cdef class Deflater:
    """permessage-deflate without server context takeover (RFC 7692 §7.2.1).

    ``Deflater(level=6, window_bits=15)``; every ``compress`` is an
    independent raw-deflate message, sync-flushed, trailing 00 00 ff ff
    removed.
    """

    cdef Compressor _c
    cdef readonly int level
    cdef readonly int window_bits

    def __cinit__(self, level=6, window_bits=15):
        level = _index(level)
        window_bits = _index(window_bits)
        if not -1 <= level <= 9:
            raise ValueError(f"level must be in -1..9, not {level}")
        if not 8 <= window_bits <= 15:
            raise ValueError(f"window_bits must be in 8..15, not {window_bits}")
        if window_bits == 8:
            window_bits = 9  # zlib refuses raw deflate with an 8-bit window
        self.level = level
        self.window_bits = window_bits
        _compressor_init(&self._c, level, window_bits)

    def __dealloc__(self):
        _compressor_free(&self._c)

    def __repr__(self):
        return f"<Deflater level={self.level} window_bits={self.window_bits}>"

    cdef bytes _compressed_frame(self, const char* data, Py_ssize_t n):
        """Compress and frame (text, RSV1) with one bytes allocation."""
        cdef Py_ssize_t clen, h
        cdef bytes out
        cdef char* p
        try:
            clen = _compress(&self._c, data, n)
            out = PyBytes_FromStringAndSize(NULL, _header_size(clen) + clen)
            p = PyBytes_AS_STRING(out)
            h = _write_header(<unsigned char*>p, <unsigned long long>clen, _OP_TEXT, True, True)
            memcpy(p + h, self._c.out, <size_t>clen)
            return out
        finally:
            _compressor_trim(&self._c)

    def compress(self, payload):
        """The permessage-deflate payload of one message (independent of the others)."""
        cdef Py_buffer view
        cdef Py_ssize_t clen
        PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
        try:
            clen = _compress(&self._c, <const char*>view.buf, view.len)
            return PyBytes_FromStringAndSize(<char*>self._c.out, clen)
        finally:
            PyBuffer_Release(&view)
            _compressor_trim(&self._c)


@cython.final
cdef class SharedFrames:
    """Frames of flushed batches, built (and compressed) once per distinct
    ``pending`` until ``clear()``: ``SharedFrames(deflater)``."""

    cdef object _deflater
    cdef dict _plain
    cdef dict _compressed
    cdef readonly Py_ssize_t compressions

    def __cinit__(self, deflater):
        self._deflater = deflater
        self._plain = {}
        self._compressed = {}
        self.compressions = 0

    @property
    def deflater(self):
        return self._deflater

    def __repr__(self):
        return (f"<SharedFrames cached={len(self._plain) + len(self._compressed)}"
                f" compressions={self.compressions}>")

    def batch_frame(self, pending, compress):
        """The frame of ``pending`` (see ``batch_frame``); compressed (RSV1) when
        ``compress``. The same object for the same pending until ``clear()``."""
        cdef dict cache = self._compressed if compress else self._plain
        cdef object frame = cache.get(pending)
        cdef Py_buffer view
        if frame is not None:
            return frame
        PyObject_GetBuffer(pending, &view, PyBUF_SIMPLE)
        try:
            _check_pending(<const char*>view.buf, view.len)
            if not compress:
                frame = _frame(<const char*>view.buf, view.len - 1, False)
            elif self._deflater is None:
                raise ValueError("SharedFrames has no deflater")
            elif type(self._deflater) is Deflater:
                frame = (<Deflater>self._deflater)._compressed_frame(
                    <const char*>view.buf, view.len - 1)
                self.compressions += 1
            else:
                frame = text_frame(self._deflater.compress(
                    PyBytes_FromStringAndSize(<const char*>view.buf, view.len - 1)), True)
                self.compressions += 1
        finally:
            PyBuffer_Release(&view)
        cache[pending] = frame
        return frame

    def clear(self):
        """Forget every cached frame (call once per flush)."""
        self._plain.clear()
        self._compressed.clear()

"""permessage-deflate compression without context takeover (RFC 7692
§7.2.1), shared by frames.pyx (``Deflater``) and ringbuf.pyx (the flush's
shared compressions) as inline C, like wsheader.pxd: no call between
modules. Each module that cimports this links zlib (``# distutils:
libraries = z`` at its top). The pure twins use Python's zlib with the same
parameters, so the output is byte-identical.
"""
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from libc.string cimport memcpy, memset


cdef extern from "zlib.h":
    ctypedef unsigned char Bytef
    ctypedef unsigned int uInt
    ctypedef unsigned long uLong
    ctypedef struct z_stream:
        Bytef* next_in
        uInt avail_in
        Bytef* next_out
        uInt avail_out
        char* msg
    int deflateInit2(z_stream* strm, int level, int method, int windowBits,
                     int memLevel, int strategy)
    int deflate(z_stream* strm, int flush)
    int deflateReset(z_stream* strm)
    int deflateEnd(z_stream* strm)
    uLong deflateBound(z_stream* strm, uLong sourceLen)
    int Z_OK
    int Z_BUF_ERROR
    int Z_MEM_ERROR
    int Z_NO_FLUSH
    int Z_SYNC_FLUSH
    int Z_DEFLATED
    int Z_DEFAULT_STRATEGY


cdef enum:
    _MEM_LEVEL = 8             # zlib's DEF_MEM_LEVEL, what Python's zlib uses
    _CHUNK = 1 << 30           # stays inside zlib's uInt counters
    _KEEP_SCRATCH = 1 << 20    # scratch output kept between messages


ctypedef struct Compressor:
    z_stream strm
    bint ready          # strm initialised (deflateEnd needed)
    unsigned char* out  # scratch output of the last message
    Py_ssize_t outcap
    int level
    int window_bits     # 9..15 (8 is mapped to 9 by the caller)


cdef inline int _compressor_init(Compressor* c, int level, int window_bits) except -1:
    """Set up ``c`` (zeroed or freed before): raw deflate, memLevel 8."""
    cdef int rc
    memset(c, 0, sizeof(Compressor))
    c.level = level
    c.window_bits = window_bits
    rc = deflateInit2(&c.strm, level, Z_DEFLATED, -window_bits, _MEM_LEVEL, Z_DEFAULT_STRATEGY)
    if rc == Z_MEM_ERROR:
        raise MemoryError()
    if rc != Z_OK:
        raise ValueError(f"deflateInit2 failed ({rc})")
    c.ready = True
    return 0


cdef inline void _compressor_free(Compressor* c) noexcept:
    if c.ready:
        deflateEnd(&c.strm)
        c.ready = False
    PyMem_Free(c.out)
    c.out = NULL
    c.outcap = 0


cdef inline int _compressor_grow(Compressor* c, Py_ssize_t need) except -1:
    cdef unsigned char* p
    if need <= c.outcap:
        return 0
    p = <unsigned char*>PyMem_Realloc(c.out, <size_t>need)
    if p == NULL:
        raise MemoryError()
    c.out = p
    c.outcap = need
    return 0


cdef inline void _compressor_trim(Compressor* c) noexcept:
    """Give back a scratch buffer that one large message grew."""
    if c.outcap > _KEEP_SCRATCH:
        PyMem_Free(c.out)
        c.out = NULL
        c.outcap = 0


cdef inline Py_ssize_t _compress_stored(Compressor* c, const char* data, Py_ssize_t n) except -1:
    """Level 0: non-final stored blocks of <= 65535 bytes, then the first
    byte of the sync-flush empty block; what zlib emits for one
    sync-flushed call, but independent of zlib's output-buffer sizing."""
    cdef Py_ssize_t nblocks = (n + 65534) // 65535
    cdef Py_ssize_t done = 0
    cdef Py_ssize_t k
    cdef unsigned char* o
    _compressor_grow(c, n + 5 * nblocks + 1)
    o = c.out
    while n > 0:
        k = n if n < 65535 else 65535
        o[done] = 0
        o[done + 1] = <unsigned char>(k & 0xFF)
        o[done + 2] = <unsigned char>(k >> 8)
        o[done + 3] = <unsigned char>(~k & 0xFF)
        o[done + 4] = <unsigned char>((~k >> 8) & 0xFF)
        memcpy(o + done + 5, data, <size_t>k)
        done += 5 + k
        data += k
        n -= k
    o[done] = 0
    return done + 1


cdef inline Py_ssize_t _compress(Compressor* c, const char* data, Py_ssize_t n) except -1:
    """One independent message into ``c.out``: raw deflate, sync flush,
    trailing 00 00 ff ff removed. Returns the compressed length."""
    cdef z_stream* s = &c.strm
    cdef Py_ssize_t done = 0
    cdef Py_ssize_t consumed = 0
    cdef Py_ssize_t chunk, room
    cdef int flush, rc
    if c.level == 0:
        return _compress_stored(c, data, n)
    deflateReset(s)
    # deflateBound covers a Z_FINISH stream; + 16 covers the sync marker.
    _compressor_grow(c, <Py_ssize_t>deflateBound(s, <uLong>n) + 16)
    while True:
        chunk = n - consumed
        if chunk > _CHUNK:
            chunk = _CHUNK
            flush = Z_NO_FLUSH
        else:
            flush = Z_SYNC_FLUSH
        s.next_in = <Bytef*>(data + consumed)
        s.avail_in = <uInt>chunk
        while True:
            if c.outcap - done < 64:
                _compressor_grow(c, c.outcap * 2)
            room = c.outcap - done
            if room > _CHUNK:
                room = _CHUNK
            s.next_out = c.out + done
            s.avail_out = <uInt>room
            rc = deflate(s, flush)
            done += room - s.avail_out
            if rc != Z_OK and rc != Z_BUF_ERROR:
                raise RuntimeError(f"deflate failed ({rc})")
            if s.avail_out != 0:
                break
        consumed += chunk - s.avail_in
        if flush == Z_SYNC_FLUSH and s.avail_in == 0:
            break
    if (done >= 4 and c.out[done - 4] == 0 and c.out[done - 3] == 0
            and c.out[done - 2] == 0xFF and c.out[done - 1] == 0xFF):
        done -= 4
    return done

# distutils: libraries = z
"""Bounded per-connection byte buffers for the outbound path (compiled).

Contract: docs/architecture.md, "Fastpath contracts / ringbuf". The pure
twin is ``ringbuf_py``; both must behave identically (tests run on both).

Storage is a C ring (PyMem_Malloc/Realloc/Free): allocated on the first
non-empty append, grown by doubling (from ``MIN_ALLOC`` bytes) up to the
capacity, released as soon as the buffer drains, so an idle connection holds
no storage. ``OutboundTable`` keeps one such ring per open connection in a
dense C array, indexed by a C open-addressing hash keyed by the uint32 conn
id; ``append_many`` is a C loop over a uint32 buffer (one lookup and at most
two memcpy per id, no Python object per id) and dirty connections are tracked
with a flag per entry plus a C array of ids.

Choices where the contract is silent (same in the twin):
- data is any C-contiguous bytes-like object (its raw bytes); str is a
  TypeError.
- ``peek(n)``: any negative n means "all"; n > len gives all pending bytes.
- appending b"" always succeeds, writes nothing and does not dirty.
- ``take_dirty`` reports ids that received bytes since the previous call;
  ``take`` does not undirty; ``close`` does (a reopened id is dirty again
  only after it receives bytes, at its new position).
- ``open`` raises ValueError for an id outside [0, 2**32); ``append``,
  ``pending`` and ``take`` raise KeyError for an id that is not open (or out
  of range); ``is_open`` is False and ``close`` a no-op for such ids.
- ``append_many(cids, data)``: a 1-D buffer of 4-byte unsigned ints
  (array('I'), a uint32 memoryview, numpy uint32, ...) is read directly;
  anything else (list, tuple, other buffers, iterables) is iterated as ints.
  Duplicate ids are appended to once per occurrence.

The flush pass encodes each connection's pending lines in its framing kind
(FRAMING_*), compressed or not, and writes them with writev on its socket.
A compressed message is looked up in a small C hash table (keyed by the
message bytes and the window size) before it is compressed, so one
publication fanned out to many connections is compressed once per flush;
the table lives until the end of the flush (entries made by ``take_frames``
between two flushes live until the next flush starts).
"""
cimport cython
from cpython.buffer cimport (
    PyBUF_FORMAT,
    PyBUF_SIMPLE,
    PyBUF_STRIDES,
    PyBuffer_Release,
    PyObject_CheckBuffer,
    PyObject_GetBuffer,
)
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.number cimport PyNumber_Index
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memchr, memcmp, memcpy, memmove, memset
from libc.errno cimport errno, EAGAIN, EINTR

cdef extern from "<errno.h>":
    int EWOULDBLOCK
from posix.uio cimport iovec, writev

from broker._fastpath.pmdeflate cimport Compressor, _compress, _compressor_free, _compressor_init, _compressor_trim
from broker._fastpath.wsheader cimport _header_size, _write_header

from operator import index as _index

__all__ = ["RingBuffer", "OutboundTable", "MIN_ALLOC", "SHARED_BUDGET",
           "FRAMING_NATIVE", "FRAMING_EIO_WS", "FRAMING_POLLING"]

cdef enum:
    # First allocation of a ring's storage (then doubled, capped at capacity).
    _MIN_ALLOC = 64
    _MIN_SLOTS_LOG2 = 3   # smallest hash table: 8 slots
    _MIN_ENTRIES = 8
    _MIN_DIRTY = 64
    _MAX_OPEN = 0x3FFFFFFF
    _BATCH_BUCKETS = 16   # lines-per-frame histogram: bucket = bit_length(lines)
    _NATIVE = 0           # all pending lines as ONE text frame, joined by \n
    _EIO_WS = 1           # one text frame per pending line (an Engine.IO packet)
    _POLLING = 2          # never written by flush: a long-poll answers it
    _IOV_MAX = 1024       # Linux's and macOS's limit of iovecs per writev
    _MIN_SHARED = 16      # smallest shared-compression table (slots)
    _KEEP_SHARED = 256    # larger tables are released after a flush
    _SHARED_BUDGET = 1 << 22  # default: bytes of messages + frames one flush keeps
    _KEEP_IOV = 4096      # larger iovec scratch is released after a flush

MIN_ALLOC = _MIN_ALLOC
SHARED_BUDGET = _SHARED_BUDGET
FRAMING_NATIVE = _NATIVE
FRAMING_EIO_WS = _EIO_WS
FRAMING_POLLING = _POLLING

cdef uint32_t _one = 1
cdef bint _LITTLE_ENDIAN = (<unsigned char*>&_one)[0] == 1

cdef bytes _EMPTY = b""


# --------------------------------------------------------------------------
# The C ring shared by RingBuffer and OutboundTable.

ctypedef struct Ring:
    char* buf
    Py_ssize_t alloc
    Py_ssize_t head
    Py_ssize_t size


cdef inline Py_ssize_t _grown(Py_ssize_t alloc, Py_ssize_t need, Py_ssize_t cap) noexcept nogil:
    """Storage size for ``need`` bytes: doubling from alloc (or MIN_ALLOC), <= cap."""
    cdef Py_ssize_t a = alloc if alloc > 0 else _MIN_ALLOC
    while a < need:
        if a > (cap >> 1):
            return cap
        a <<= 1
    return a if a < cap else cap


cdef inline int _ring_reserve(Ring* r, Py_ssize_t need, Py_ssize_t cap) except -1:
    """Make room for ``need`` bytes in total (need <= cap)."""
    cdef Py_ssize_t newalloc, first
    cdef char* nb
    if need <= r.alloc:
        return 0
    newalloc = _grown(r.alloc, need, cap)
    nb = <char*>PyMem_Realloc(r.buf, <size_t>newalloc)
    if nb == NULL:
        raise MemoryError()
    if r.head + r.size > r.alloc:
        # Wrapped: move the head segment to the end of the larger storage.
        first = r.alloc - r.head
        memmove(nb + newalloc - first, nb + r.head, <size_t>first)
        r.head = newalloc - first
    r.buf = nb
    r.alloc = newalloc
    return 0


cdef inline void _ring_release(Ring* r) noexcept:
    if r.buf != NULL:
        PyMem_Free(r.buf)
    r.buf = NULL
    r.alloc = 0
    r.head = 0
    r.size = 0


cdef inline int _ring_write(Ring* r, const char* src, Py_ssize_t n, Py_ssize_t cap) except -1:
    """Append n > 0 bytes; the caller checked size + n <= cap."""
    cdef Py_ssize_t tail, first
    _ring_reserve(r, r.size + n, cap)
    tail = r.head + r.size
    if tail >= r.alloc:
        tail -= r.alloc
    first = r.alloc - tail
    if first >= n:
        memcpy(r.buf + tail, src, <size_t>n)
    else:
        memcpy(r.buf + tail, src, <size_t>first)
        memcpy(r.buf, src + first, <size_t>(n - first))
    r.size += n
    return 0


cdef inline void _ring_copy(Ring* r, char* dst, Py_ssize_t n) noexcept:
    """Copy the first n <= size pending bytes to dst."""
    cdef Py_ssize_t first = r.alloc - r.head
    if first >= n:
        memcpy(dst, r.buf + r.head, <size_t>n)
    else:
        memcpy(dst, r.buf + r.head, <size_t>first)
        memcpy(dst + first, r.buf, <size_t>(n - first))


cdef inline bytes _ring_peek(Ring* r, Py_ssize_t n):
    cdef bytes out
    if n <= 0:
        return _EMPTY
    if r.head + n <= r.alloc:
        return PyBytes_FromStringAndSize(r.buf + r.head, n)
    out = PyBytes_FromStringAndSize(NULL, n)
    _ring_copy(r, PyBytes_AS_STRING(out), n)
    return out


cdef inline void _ring_consume(Ring* r, Py_ssize_t n) noexcept:
    r.size -= n
    if r.size == 0:
        _ring_release(r)
        return
    r.head += n
    if r.head >= r.alloc:
        r.head -= r.alloc


cdef inline int _ring_linearize(Ring* r) except -1:
    """Make the pending bytes one contiguous run at buf + head."""
    cdef char* nb
    if r.head + r.size <= r.alloc:
        return 0
    nb = <char*>PyMem_Malloc(<size_t>r.alloc)
    if nb == NULL:
        raise MemoryError()
    _ring_copy(r, nb, r.size)
    PyMem_Free(r.buf)
    r.buf = nb
    r.head = 0
    return 0


cdef inline bytes _ring_take(Ring* r):
    cdef bytes out = _ring_peek(r, r.size)
    _ring_release(r)
    return out


# --------------------------------------------------------------------------
# RingBuffer


@cython.final
@cython.freelist(16)
cdef class RingBuffer:
    """One bounded byte buffer: ``RingBuffer(capacity)`` (capacity > 0 bytes)."""

    cdef Ring _r
    cdef Py_ssize_t _capacity

    def __cinit__(self, capacity):
        cdef Py_ssize_t cap = _index(capacity)
        if cap <= 0:
            raise ValueError(f"capacity must be > 0, not {cap}")
        self._r.buf = NULL
        self._r.alloc = 0
        self._r.head = 0
        self._r.size = 0
        self._capacity = cap

    def __dealloc__(self):
        _ring_release(&self._r)

    def __len__(self):
        return self._r.size

    def __repr__(self):
        return (f"<RingBuffer len={self._r.size} capacity={self._capacity}"
                f" allocated={self._r.alloc}>")

    @property
    def capacity(self):
        """Maximum pending bytes."""
        return self._capacity

    @property
    def allocated(self):
        """Bytes of storage held (0 when empty)."""
        return self._r.alloc

    cdef inline bint _append(self, const char* p, Py_ssize_t n) except -1:
        if n > self._capacity - self._r.size:
            return False
        if n > 0:
            _ring_write(&self._r, p, n, self._capacity)
        return True

    def append(self, data):
        """Append all of ``data`` and return True, or nothing and return False
        when ``len(self) + len(data) > capacity``."""
        cdef Py_buffer view
        if type(data) is bytes:
            return self._append(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            return self._append(<const char*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    def peek(self, Py_ssize_t n=-1):
        """The first ``n`` pending bytes (all when n < 0), not consumed."""
        if n < 0 or n > self._r.size:
            n = self._r.size
        return _ring_peek(&self._r, n)

    def consume(self, Py_ssize_t n):
        """Drop the first ``n`` pending bytes (ValueError if n < 0 or n > len)."""
        if n < 0 or n > self._r.size:
            raise ValueError(f"cannot consume {n} of {self._r.size} pending bytes")
        if n > 0:
            _ring_consume(&self._r, n)

    def take(self):
        """All pending bytes; the buffer is then empty (storage released)."""
        return _ring_take(&self._r)

    def clear(self):
        """Drop all pending bytes and release the storage."""
        _ring_release(&self._r)


# --------------------------------------------------------------------------
# OutboundTable

ctypedef struct Entry:
    Ring ring
    uint32_t cid
    Py_ssize_t dirty      # position in the dirty array, -1 when clean
    int fd                # socket written by flush(), -1: the caller writes (take())
    unsigned char paused  # the transport holds unsent bytes: flush() must wait
    unsigned char framing # _NATIVE, _EIO_WS or _POLLING
    unsigned char wbits   # 0: uncompressed; 9..15: permessage-deflate window

ctypedef struct Shared:
    # One compressed message of the current flush; the message bytes (the
    # key, keylen bytes) and then its whole frame (header + compressed
    # payload, framelen bytes) follow this struct in the same allocation.
    uint64_t hash
    Py_ssize_t keylen
    Py_ssize_t framelen
    int wbits

ctypedef struct Slot:
    uint32_t key
    int32_t idx           # index into entries, -1 when the slot is empty



cdef inline bint _u32_format(Py_buffer* view) noexcept:
    """True for a 1-D buffer of native-order 4-byte unsigned ints."""
    cdef const char* f = view.format
    if view.ndim != 1 or view.itemsize != 4 or f == NULL:
        return False
    if f[0] == b'@' or f[0] == b'=':
        f += 1
    elif f[0] == b'<':
        if not _LITTLE_ENDIAN:
            return False
        f += 1
    elif f[0] == b'>' or f[0] == b'!':
        if _LITTLE_ENDIAN:
            return False
        f += 1
    return (f[0] == b'I' or f[0] == b'L') and f[1] == 0



cdef inline char* _shared_key(Shared* s) noexcept nogil:
    return <char*>(s + 1)


cdef inline char* _shared_frame(Shared* s) noexcept nogil:
    return <char*>(s + 1) + s.keylen


cdef inline uint64_t _hash(const char* p, Py_ssize_t n, int wbits) noexcept nogil:
    """A fast 64-bit hash of n bytes (8 at a time) and the window size."""
    cdef uint64_t h = (<uint64_t>0x9E3779B97F4A7C15) ^ (<uint64_t>n * 31 + <uint64_t>wbits)
    cdef uint64_t w
    while n >= 8:
        memcpy(&w, p, 8)
        h = (h ^ w) * (<uint64_t>0xFF51AFD7ED558CCD)
        h ^= h >> 29
        p += 8
        n -= 8
    w = 0
    memcpy(&w, p, <size_t>n)
    h = (h ^ w) * (<uint64_t>0xC4CEB9FE1A85EC53)
    h ^= h >> 32
    return h


cdef inline int _check_framing(int framing, int window_bits) except -1:
    if framing != _NATIVE and framing != _EIO_WS and framing != _POLLING:
        raise ValueError(f"unknown framing {framing!r}")
    if window_bits != 0 and not 9 <= window_bits <= 15:
        raise ValueError(f"window_bits must be 0 (uncompressed) or 9..15, not {window_bits}")
    if window_bits and framing == _POLLING:
        raise ValueError("a polling connection is not compressed by the table")
    return 0


cdef inline int64_t _as_cid(object cid) except -2:
    """cid as a C integer; -1 when it is an int outside [0, 2**32)."""
    cdef long long v
    if type(cid) is not int:
        cid = PyNumber_Index(cid)  # TypeError for floats, str, ...
    try:
        v = cid
    except OverflowError:
        return -1
    if v < 0 or v > 0xFFFFFFFF:
        return -1
    return v


@cython.final
cdef class OutboundTable:
    """One bounded ring buffer per open connection:
    ``OutboundTable(capacity, deflate_level=6, shared_budget=SHARED_BUDGET)``.

    ``deflate_level`` is zlib's level for compressed connections;
    ``shared_budget`` bounds the bytes (messages + their frames) that one
    flush keeps to share compressions: past it, a new compression serves
    only the connection being written."""

    cdef Entry* _entries
    cdef Py_ssize_t _n
    cdef Py_ssize_t _ecap
    cdef Slot* _slots
    cdef uint32_t _mask
    cdef int _shift
    cdef int64_t* _dirty
    cdef Py_ssize_t _ndirty
    cdef Py_ssize_t _dcap
    cdef Py_ssize_t _capacity
    cdef Py_ssize_t _total
    cdef public long long frames_written
    cdef public long long bytes_written
    cdef public long long lines_written
    cdef public long long compressions
    cdef long long _batch[_BATCH_BUCKETS]
    cdef int _level
    # One zlib compressor per window size in use (index: window bits).
    cdef Compressor _comp[16]
    # Shared compressions of the current flush: open addressing, linear probing.
    cdef Shared** _stab
    cdef Py_ssize_t _smask
    cdef Py_ssize_t _scount
    cdef Shared* _slast      # last hit: a fan-out asks for the same message again and again
    cdef Py_ssize_t _sbytes  # bytes held by the shared entries (messages + frames)
    cdef Py_ssize_t _sbudget
    # Compressions past the budget: they serve one connection's write only.
    cdef Shared** _tmp
    cdef Py_ssize_t _ntmp
    cdef Py_ssize_t _tmpcap
    # Scratch of the frames being written: iovecs, and headers of plain frames.
    cdef iovec* _iov
    cdef Py_ssize_t _iovcap
    cdef unsigned char* _hdr
    cdef Py_ssize_t _hdrcap

    def __cinit__(self, capacity, deflate_level=6, shared_budget=SHARED_BUDGET):
        cdef Py_ssize_t cap = _index(capacity)
        cdef int level = _index(deflate_level)
        cdef Py_ssize_t budget = _index(shared_budget)
        if cap <= 0:
            raise ValueError(f"capacity must be > 0, not {cap}")
        if not -1 <= level <= 9:
            raise ValueError(f"deflate_level must be in -1..9, not {level}")
        if budget < 0:
            raise ValueError(f"shared_budget must be >= 0, not {budget}")
        self._sbudget = budget
        self._sbytes = 0
        self._tmp = NULL
        self._ntmp = self._tmpcap = 0
        self._capacity = cap
        self._level = level
        self._entries = NULL
        self._slots = NULL
        self._dirty = NULL
        self._stab = NULL
        self._slast = NULL
        self._iov = NULL
        self._hdr = NULL
        self._smask = self._scount = self._iovcap = self._hdrcap = 0
        self._n = self._ecap = self._ndirty = self._dcap = self._total = 0
        self.frames_written = self.bytes_written = self.lines_written = 0
        self.compressions = 0
        memset(self._batch, 0, sizeof(self._batch))
        memset(self._comp, 0, sizeof(self._comp))
        self._rehash(_MIN_SLOTS_LOG2)

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self._entries != NULL:
            for i in range(self._n):
                _ring_release(&self._entries[i].ring)
            PyMem_Free(self._entries)
        PyMem_Free(self._slots)
        PyMem_Free(self._dirty)
        self._shared_clear()
        self._free_tmp()
        PyMem_Free(self._tmp)
        PyMem_Free(self._stab)
        PyMem_Free(self._iov)
        PyMem_Free(self._hdr)
        for i in range(16):
            _compressor_free(&self._comp[i])

    # -- the hash (open addressing, linear probing, backward-shift delete) --

    cdef inline uint32_t _home(self, uint32_t cid) noexcept nogil:
        return <uint32_t>(cid * <uint32_t>2654435769U) >> self._shift

    cdef inline Py_ssize_t _slot_of(self, uint32_t cid) noexcept nogil:
        cdef uint32_t h = self._home(cid)
        cdef Slot* s
        while True:
            s = &self._slots[h]
            if s.idx < 0:
                return -1
            if s.key == cid:
                return h
            h = (h + 1) & self._mask

    cdef inline Entry* _find(self, uint32_t cid) noexcept nogil:
        cdef uint32_t h = self._home(cid)
        cdef Slot* s
        while True:
            s = &self._slots[h]
            if s.idx < 0:
                return NULL
            if s.key == cid:
                return &self._entries[s.idx]
            h = (h + 1) & self._mask

    cdef int _rehash(self, int log2) except -1:
        cdef Py_ssize_t nslots = (<Py_ssize_t>1) << log2
        cdef Slot* slots = <Slot*>PyMem_Malloc(<size_t>nslots * sizeof(Slot))
        cdef Py_ssize_t i
        cdef uint32_t h
        if slots == NULL:
            raise MemoryError()
        for i in range(nslots):
            slots[i].idx = -1
        PyMem_Free(self._slots)
        self._slots = slots
        self._mask = <uint32_t>(nslots - 1)
        self._shift = 32 - log2
        for i in range(self._n):
            h = self._home(self._entries[i].cid)
            while slots[h].idx >= 0:
                h = (h + 1) & self._mask
            slots[h].key = self._entries[i].cid
            slots[h].idx = <int32_t>i
        return 0

    cdef int _log2_for(self, Py_ssize_t n) noexcept:
        """Smallest table keeping the load at most 1/2 for n entries."""
        cdef int log2 = _MIN_SLOTS_LOG2
        while ((<Py_ssize_t>1) << log2) < 2 * n:
            log2 += 1
        return log2

    cdef int _delete_slot(self, uint32_t i) noexcept nogil:
        cdef uint32_t j = i
        cdef uint32_t k
        self._slots[i].idx = -1
        while True:
            j = (j + 1) & self._mask
            if self._slots[j].idx < 0:
                return 0
            k = self._home(self._slots[j].key)
            # Leave slot j where it is when its home lies cyclically in (i, j].
            if i <= j:
                if i < k and k <= j:
                    continue
            elif i < k or k <= j:
                continue
            self._slots[i] = self._slots[j]
            self._slots[j].idx = -1
            i = j

    # -- dirty ids --

    cdef inline int _mark_dirty(self, Entry* e) except -1:
        cdef int64_t* nd
        cdef Py_ssize_t ncap
        if e.dirty >= 0:
            return 0
        if self._ndirty == self._dcap:
            ncap = self._dcap * 2 if self._dcap else _MIN_DIRTY
            nd = <int64_t*>PyMem_Realloc(self._dirty, <size_t>ncap * sizeof(int64_t))
            if nd == NULL:
                raise MemoryError()
            self._dirty = nd
            self._dcap = ncap
        self._dirty[self._ndirty] = e.cid
        e.dirty = self._ndirty
        self._ndirty += 1
        return 0

    cdef inline Entry* _get(self, object cid) except? NULL:
        cdef int64_t c = _as_cid(cid)
        cdef Entry* e = NULL
        if c >= 0:
            e = self._find(<uint32_t>c)
        if e == NULL:
            raise KeyError(cid)
        return e

    cdef inline int _append_to(self, Entry* e, const char* p, Py_ssize_t n) except -1:
        """1 written (or n == 0), 0 refused (would overflow)."""
        if n > self._capacity - e.ring.size:
            return 0
        if n > 0:
            _ring_write(&e.ring, p, n, self._capacity)
            self._total += n
            self._mark_dirty(e)
        return 1

    # -- API --

    def __len__(self):
        return self._n

    def __repr__(self):
        return (f"<OutboundTable open={self._n} total_pending={self._total}"
                f" capacity={self._capacity}>")

    @property
    def capacity(self):
        """Maximum pending bytes per connection."""
        return self._capacity

    @property
    def total_pending(self):
        """Pending bytes over all open connections."""
        return self._total

    def open(self, cid, framing=FRAMING_NATIVE):
        """Start buffering for ``cid``, uncompressed, in ``framing``
        (ValueError if already open or an unknown framing)."""
        cdef int64_t c = _as_cid(cid)
        cdef uint32_t h
        cdef Entry* ne
        cdef Entry* e
        cdef Py_ssize_t ncap
        cdef int f = _index(framing)
        _check_framing(f, 0)
        if c < 0:
            raise ValueError(f"conn id {cid!r} is outside [0, 2**32)")
        if self._find(<uint32_t>c) != NULL:
            raise ValueError(f"conn id {cid!r} is already open")
        if self._n >= _MAX_OPEN:
            raise OverflowError("too many open connections")
        if self._n == self._ecap:
            ncap = self._ecap * 2 if self._ecap else _MIN_ENTRIES
            ne = <Entry*>PyMem_Realloc(self._entries, <size_t>ncap * sizeof(Entry))
            if ne == NULL:
                raise MemoryError()
            self._entries = ne
            self._ecap = ncap
        if 2 * (self._n + 1) > <Py_ssize_t>self._mask + 1:
            self._rehash(self._log2_for(self._n + 1))
        e = &self._entries[self._n]
        e.ring.buf = NULL
        e.ring.alloc = e.ring.head = e.ring.size = 0
        e.cid = <uint32_t>c
        e.dirty = -1
        e.fd = -1
        e.paused = False
        e.framing = <unsigned char>f
        e.wbits = 0
        h = self._home(<uint32_t>c)
        while self._slots[h].idx >= 0:
            h = (h + 1) & self._mask
        self._slots[h].key = <uint32_t>c
        self._slots[h].idx = <int32_t>self._n
        self._n += 1

    def close(self, cid):
        """Stop buffering for ``cid``, dropping its pending bytes (no error if unknown)."""
        cdef int64_t c = _as_cid(cid)
        cdef Py_ssize_t pos, idx, last
        cdef Entry* e
        cdef Entry* ne
        if c < 0:
            return
        pos = self._slot_of(<uint32_t>c)
        if pos < 0:
            return
        idx = self._slots[pos].idx
        e = &self._entries[idx]
        self._total -= e.ring.size
        _ring_release(&e.ring)
        if e.dirty >= 0:
            self._dirty[e.dirty] = -1
        self._delete_slot(<uint32_t>pos)
        last = self._n - 1
        if idx != last:
            self._entries[idx] = self._entries[last]
            pos = self._slot_of(self._entries[idx].cid)
            self._slots[pos].idx = <int32_t>idx
        self._n = last
        # Give memory back after a mass close (hysteresis: shrink at 1/8).
        if self._mask + 1 > (1 << _MIN_SLOTS_LOG2) and 8 * self._n < <Py_ssize_t>self._mask + 1:
            self._rehash(self._log2_for(2 * self._n))
        if self._ecap > _MIN_ENTRIES and 4 * self._n < self._ecap:
            ne = <Entry*>PyMem_Realloc(self._entries, <size_t>(self._ecap // 2) * sizeof(Entry))
            if ne != NULL:
                self._entries = ne
                self._ecap //= 2

    def is_open(self, cid):
        cdef int64_t c = _as_cid(cid)
        return c >= 0 and self._find(<uint32_t>c) != NULL

    def append(self, cid, data):
        """Append all of ``data`` to ``cid``'s buffer (True) or nothing when it
        would overflow (False). KeyError if ``cid`` is not open."""
        cdef Entry* e = self._get(cid)
        cdef Py_buffer view
        if type(data) is bytes:
            return self._append_to(e, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data)) == 1
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            return self._append_to(e, <const char*>view.buf, view.len) == 1
        finally:
            PyBuffer_Release(&view)

    cdef list _append_u32(self, Py_buffer* ids, const char* p, Py_ssize_t n):
        cdef list overflow = []
        cdef Py_ssize_t i
        cdef Py_ssize_t count = ids.shape[0]
        cdef Py_ssize_t stride = ids.strides[0] if ids.strides != NULL else 4
        cdef const char* at = <const char*>ids.buf
        cdef uint32_t cid
        cdef Entry* e
        cdef Py_ssize_t cap = self._capacity
        if n == 0:
            return overflow
        for i in range(count):
            cid = (<const uint32_t*>at)[0]
            at += stride
            e = self._find(cid)
            if e == NULL:
                continue
            if n > cap - e.ring.size:
                overflow.append(cid)
                continue
            _ring_write(&e.ring, p, n, cap)
            self._total += n
            if e.dirty < 0:
                self._mark_dirty(e)
        return overflow

    cdef list _append_objects(self, object cids, const char* p, Py_ssize_t n):
        cdef list overflow = []
        cdef int64_t c
        cdef Entry* e
        for cid in cids:
            c = _as_cid(cid)
            if c < 0:
                continue
            e = self._find(<uint32_t>c)
            if e == NULL:
                continue
            if self._append_to(e, p, n) == 0:
                overflow.append(c)
        return overflow

    cdef list _append_many(self, object cids, const char* p, Py_ssize_t n):
        cdef Py_buffer ids
        if type(cids) is not list and type(cids) is not tuple and PyObject_CheckBuffer(cids):
            PyObject_GetBuffer(cids, &ids, PyBUF_FORMAT | PyBUF_STRIDES)
            try:
                if _u32_format(&ids):
                    return self._append_u32(&ids, p, n)
            finally:
                PyBuffer_Release(&ids)
        return self._append_objects(cids, p, n)

    def append_many(self, cids, data):
        """Append ``data`` to every open id of ``cids`` (a uint32 buffer or a
        sequence of ints; ids not open are skipped). Returns the ids whose
        buffer would overflow: nothing was written to them."""
        cdef Py_buffer view
        if type(data) is bytes:
            return self._append_many(cids, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            return self._append_many(cids, <const char*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    def pending(self, cid):
        """Pending bytes of ``cid`` (KeyError if not open)."""
        return self._get(cid).ring.size

    def take(self, cid):
        """All pending bytes of ``cid``, which is then empty (KeyError if not open)."""
        cdef Entry* e = self._get(cid)
        self._total -= e.ring.size
        return _ring_take(&e.ring)

    def take_dirty(self):
        """Ids that received bytes since the last call, each once, in
        first-dirtied order; closed ones excluded."""
        cdef list out = []
        cdef Py_ssize_t i
        cdef int64_t c
        cdef Entry* e
        for i in range(self._ndirty):
            c = self._dirty[i]
            if c < 0:
                continue
            e = self._find(<uint32_t>c)
            if e != NULL:
                e.dirty = -1
                out.append(c)
        self._ndirty = 0
        if self._dcap > 4096 and 4 * len(out) < self._dcap:
            PyMem_Free(self._dirty)
            self._dirty = NULL
            self._dcap = 0
        return out

    # -- direct writes: the flush pass ---------------------------------------

    def set_fd(self, cid, int fd):
        """Let ``flush`` write ``cid``'s frames to socket ``fd`` itself (-1:
        the caller writes them, via ``take``). The fd must stay open while
        set: the caller sets -1 (or ``close(cid)``) before its socket can be
        closed, or a reused number would get another connection's bytes."""
        self._get(cid).fd = fd

    def set_paused(self, cid, paused):
        """While paused (its transport holds unsent bytes), ``flush`` leaves
        ``cid``'s lines pending: writing past the transport would reorder."""
        cdef int64_t c = _as_cid(cid)
        cdef Entry* e = self._find(<uint32_t>c) if c >= 0 else NULL
        if e != NULL:
            e.paused = bool(paused)

    cdef void _count_frame(self, Py_ssize_t nbytes, Py_ssize_t lines) noexcept:
        cdef int bucket = 0
        self.lines_written += lines
        while lines > 0 and bucket < _BATCH_BUCKETS - 1:
            lines >>= 1
            bucket += 1
        self._batch[bucket] += 1
        self.frames_written += 1
        self.bytes_written += nbytes

    def count_frame(self, Py_ssize_t nbytes, Py_ssize_t lines):
        """Count a frame the caller wrote itself (same counters as ``flush``)."""
        self._count_frame(nbytes, lines)

    def batch_histogram(self):
        """Frames by lines per frame: index i counts frames with bit_length(lines) == i."""
        return [self._batch[i] for i in range(_BATCH_BUCKETS)]

    def set_framing(self, cid, framing, window_bits=0):
        """How ``flush`` and ``take_frames`` encode ``cid``'s lines from now
        on: ``framing`` one of FRAMING_*, ``window_bits`` 0 (uncompressed)
        or 9..15 (permessage-deflate, no context takeover, that server
        window). Lines already pending go out in the new framing. KeyError
        if not open; ValueError for other values (a polling connection is
        never compressed here)."""
        cdef int f = _index(framing)
        cdef int w = _index(window_bits)
        _check_framing(f, w)
        cdef Entry* e = self._get(cid)
        e.framing = <unsigned char>f
        e.wbits = <unsigned char>w

    def framing_of(self, cid):
        """``(framing, window_bits)`` of ``cid`` (KeyError if not open)."""
        cdef Entry* e = self._get(cid)
        return (e.framing, e.wbits)

    # -- encoding: the frames of one connection --------------------------------

    cdef int _reserve(self, Py_ssize_t niov, Py_ssize_t nheaders) except -1:
        """Scratch for niov iovecs and nheaders plain-frame headers."""
        cdef iovec* iov
        cdef unsigned char* hdr
        cdef Py_ssize_t ncap
        if niov > self._iovcap:
            ncap = niov if niov > 64 else 64
            iov = <iovec*>PyMem_Realloc(self._iov, <size_t>ncap * sizeof(iovec))
            if iov == NULL:
                raise MemoryError()
            self._iov = iov
            self._iovcap = ncap
        if 10 * nheaders > self._hdrcap:
            ncap = 10 * nheaders if nheaders > 32 else 320
            hdr = <unsigned char*>PyMem_Realloc(self._hdr, <size_t>ncap)
            if hdr == NULL:
                raise MemoryError()
            self._hdr = hdr
            self._hdrcap = ncap
        return 0

    cdef void _release_scratch(self) noexcept:
        """After a flush: give back scratch that a huge batch grew."""
        cdef int i
        if self._iovcap > _KEEP_IOV:
            PyMem_Free(self._iov)
            self._iov = NULL
            self._iovcap = 0
            PyMem_Free(self._hdr)
            self._hdr = NULL
            self._hdrcap = 0
        for i in range(9, 16):
            _compressor_trim(&self._comp[i])

    cdef void _shared_clear(self) noexcept:
        """Forget every shared compression (end of a flush)."""
        cdef Py_ssize_t i
        if self._stab == NULL:
            return
        if self._scount:
            for i in range(self._smask + 1):
                if self._stab[i] != NULL:
                    PyMem_Free(self._stab[i])
                    self._stab[i] = NULL
        self._scount = 0
        self._sbytes = 0
        self._slast = NULL
        if self._smask + 1 > _KEEP_SHARED:
            PyMem_Free(self._stab)
            self._stab = NULL
            self._smask = 0

    cdef void _free_tmp(self) noexcept:
        """Free the compressions made past the budget (their write is done)."""
        cdef Py_ssize_t i
        for i in range(self._ntmp):
            PyMem_Free(self._tmp[i])
        self._ntmp = 0
        if self._tmpcap > 64:
            PyMem_Free(self._tmp)
            self._tmp = NULL
            self._tmpcap = 0

    cdef int _keep_tmp(self, Shared* s) except -1:
        cdef Shared** tmp
        cdef Py_ssize_t ncap
        if self._ntmp == self._tmpcap:
            ncap = 2 * self._tmpcap if self._tmpcap else 16
            tmp = <Shared**>PyMem_Realloc(self._tmp, <size_t>ncap * sizeof(Shared*))
            if tmp == NULL:
                PyMem_Free(s)
                raise MemoryError()
            self._tmp = tmp
            self._tmpcap = ncap
        self._tmp[self._ntmp] = s
        self._ntmp += 1
        return 0

    cdef int _shared_grow(self) except -1:
        cdef Py_ssize_t nslots = (self._smask + 1) * 2 if self._stab != NULL else _MIN_SHARED
        cdef Shared** tab = <Shared**>PyMem_Malloc(<size_t>nslots * sizeof(Shared*))
        cdef Py_ssize_t i, j
        cdef Shared* s
        if tab == NULL:
            raise MemoryError()
        memset(tab, 0, <size_t>nslots * sizeof(Shared*))
        if self._stab != NULL:
            for i in range(self._smask + 1):
                s = self._stab[i]
                if s == NULL:
                    continue
                j = <Py_ssize_t>(s.hash & <uint64_t>(nslots - 1))
                while tab[j] != NULL:
                    j = (j + 1) & (nslots - 1)
                tab[j] = s
            PyMem_Free(self._stab)
        self._stab = tab
        self._smask = nslots - 1
        return 0

    cdef Shared* _shared(self, const char* p, Py_ssize_t n, int wbits) except NULL:
        """The compressed frame of message p[:n] for window ``wbits``:
        compressed on the first request of this flush, then reused. Past the
        budget, a new compression is kept only until ``_free_tmp``."""
        cdef Shared* s = self._slast
        cdef uint64_t h
        cdef Py_ssize_t i, clen, hlen
        cdef Compressor* comp
        if (s != NULL and s.keylen == n and s.wbits == wbits
                and memcmp(_shared_key(s), p, <size_t>n) == 0):
            return s
        if self._stab == NULL or 2 * (self._scount + 1) > self._smask + 1:
            self._shared_grow()
        h = _hash(p, n, wbits)
        i = <Py_ssize_t>(h & <uint64_t>self._smask)
        while True:
            s = self._stab[i]
            if s == NULL:
                break
            if (s.hash == h and s.keylen == n and s.wbits == wbits
                    and memcmp(_shared_key(s), p, <size_t>n) == 0):
                self._slast = s
                return s
            i = (i + 1) & self._smask
        comp = &self._comp[wbits]
        if not comp.ready:
            _compressor_init(comp, self._level, wbits)
        clen = _compress(comp, p, n)
        hlen = _header_size(clen)
        s = <Shared*>PyMem_Malloc(sizeof(Shared) + <size_t>(n + hlen + clen))
        if s == NULL:
            raise MemoryError()
        s.hash = h
        s.keylen = n
        s.framelen = hlen + clen
        s.wbits = wbits
        memcpy(_shared_key(s), p, <size_t>n)
        _write_header(<unsigned char*>_shared_frame(s), <unsigned long long>clen, 1, True, True)
        memcpy(_shared_frame(s) + hlen, comp.out, <size_t>clen)
        self.compressions += 1
        if self._sbytes + n + s.framelen > self._sbudget:
            self._keep_tmp(s)
            return s
        self._stab[i] = s
        self._scount += 1
        self._sbytes += n + s.framelen
        self._slast = s
        return s

    cdef inline Py_ssize_t _add_message(self, Py_ssize_t niov, Py_ssize_t k,
                                        const char* p, Py_ssize_t n, int wbits,
                                        Py_ssize_t* size) except -1:
        """Append the iovecs of one message's frame (header k of the scratch
        for a plain one); returns the new iovec count."""
        cdef Shared* s
        cdef unsigned char* hdr
        cdef Py_ssize_t hlen
        if wbits:
            s = self._shared(p, n, wbits)
            self._iov[niov].iov_base = _shared_frame(s)
            self._iov[niov].iov_len = <size_t>s.framelen
            size[0] += s.framelen
            return niov + 1
        hdr = self._hdr + 10 * k
        hlen = _write_header(hdr, <unsigned long long>n, 1, True, False)
        self._iov[niov].iov_base = hdr
        self._iov[niov].iov_len = <size_t>hlen
        niov += 1
        if n:
            self._iov[niov].iov_base = <void*>p
            self._iov[niov].iov_len = <size_t>n
            niov += 1
        size[0] += hlen + n
        return niov

    cdef Py_ssize_t _encode(self, Entry* e, Py_ssize_t* size, Py_ssize_t* lines) except -1:
        """Fill the iovec scratch with the frames of e's pending lines (not
        consumed; they must stay put until written). Returns the iovec
        count; size = wire bytes, lines = lines (the frames: 1 when native,
        ``lines`` when one per line)."""
        cdef Ring* r = &e.ring
        cdef const char* data
        cdef const char* p
        cdef const char* q
        cdef const char* end
        cdef Py_ssize_t n, nlines, niov = 0, k = 0
        cdef int wbits = e.wbits
        _ring_linearize(r)
        data = r.buf + r.head
        n = r.size - 1  # without the final newline
        nlines = 1 + _count_newlines(data, n)
        lines[0] = nlines
        size[0] = 0
        if e.framing == _NATIVE:
            self._reserve(2, 1)
            return self._add_message(0, 0, data, n, wbits, size)
        self._reserve(2 * nlines, 0 if wbits else nlines)
        p = data
        end = data + n
        while True:
            q = <const char*>memchr(p, 10, <size_t>(end - p)) if p < end else NULL
            if q == NULL:
                return self._add_message(niov, k, p, end - p, wbits, size)
            niov = self._add_message(niov, k, p, q - p, wbits, size)
            k += 1
            p = q + 1

    cdef void _count_encoded(self, Entry* e, Py_ssize_t size, Py_ssize_t lines) noexcept:
        if e.framing == _NATIVE:
            self._count_frame(size, lines)
        else:  # one frame per line
            self.frames_written += lines
            self.lines_written += lines
            self.bytes_written += size
            self._batch[1] += lines

    cdef inline void _drop(self, Entry* e) noexcept:
        self._total -= e.ring.size
        _ring_release(&e.ring)

    def take_frames(self, cid):
        """The frames of ``cid``'s pending lines, exactly as ``flush`` would
        write them (framing and compression), for a caller that writes
        itself (TLS, no fd); the buffer is then empty. Counted as ``flush``
        counts. ValueError for a polling connection (``take_payload``)."""
        cdef Entry* e = self._get(cid)
        cdef Py_ssize_t niov, size, lines
        cdef bytes out
        if e.framing == _POLLING:
            raise ValueError(f"conn id {cid!r} is polling: use take_payload")
        if e.ring.size == 0:
            return _EMPTY
        try:
            niov = self._encode(e, &size, &lines)
            out = PyBytes_FromStringAndSize(NULL, size)
            _copy_iov_from(self._iov, <int>niov, 0, PyBytes_AS_STRING(out))
        finally:
            self._free_tmp()
        self._count_encoded(e, size, lines)
        self._drop(e)
        return out

    def take_payload(self, cid, sep=b"\x1e"):
        """``cid``'s pending lines without their newlines, joined by ``sep``
        (an Engine.IO long-poll payload); the buffer is then empty. Counted
        as one frame of that many lines."""
        cdef Entry* e = self._get(cid)
        cdef Py_buffer view
        cdef const char* data
        cdef const char* p
        cdef const char* q
        cdef const char* end
        cdef char* o
        cdef Py_ssize_t n, nlines, total
        cdef bytes out
        PyObject_GetBuffer(sep, &view, PyBUF_SIMPLE)
        try:
            if e.ring.size == 0:
                return _EMPTY
            _ring_linearize(&e.ring)
            data = e.ring.buf + e.ring.head
            n = e.ring.size - 1
            nlines = 1 + _count_newlines(data, n)
            total = n + (nlines - 1) * (view.len - 1)
            out = PyBytes_FromStringAndSize(NULL, total)
            o = PyBytes_AS_STRING(out)
            p = data
            end = data + n
            while True:
                q = <const char*>memchr(p, 10, <size_t>(end - p)) if p < end else NULL
                if q == NULL:
                    memcpy(o, p, <size_t>(end - p))
                    break
                memcpy(o, p, <size_t>(q - p))
                o += q - p
                memcpy(o, view.buf, <size_t>view.len)
                o += view.len
                p = q + 1
        finally:
            PyBuffer_Release(&view)
        self._count_frame(total, nlines)
        self._drop(e)
        return out

    # -- the flush pass ------------------------------------------------------

    def flush(self):
        """Write every dirty connection's pending lines in its framing.

        Pending bytes must be ``\\n``-terminated lines. For each dirty id with
        an fd, not paused and not polling: its frames (``take_frames``'
        bytes) in one writev (more past IOV_MAX iovecs); its buffer is then
        empty. A compressed message is compressed once per window size for
        every connection of this flush that sends it. Returns ``(deferred,
        tails)``: ``deferred`` lists the dirty ids the caller must write
        itself (no fd, paused or polling; their bytes stay pending),
        ``tails`` lists ``(cid, rest)`` where the socket took only part of
        the frames — ``rest`` (bytes) must go to the transport next, before
        anything else — or ``(cid, None)`` when the socket failed.
        """
        cdef list deferred = []
        cdef list tails = []
        cdef Py_ssize_t i = 0
        cdef Py_ssize_t j, niov, size, lines, sent
        cdef int64_t c
        cdef Entry* e
        cdef bytes rest
        self._shared_clear()  # what take_frames shared since the last flush
        try:
            while i < self._ndirty:
                c = self._dirty[i]
                if c < 0:
                    i += 1
                    continue
                e = self._find(<uint32_t>c)
                if e == NULL:
                    i += 1
                    continue
                if e.ring.size == 0:
                    e.dirty = -1
                    i += 1
                    continue
                if e.fd < 0 or e.paused or e.framing == _POLLING:
                    deferred.append(c)
                    e.dirty = -1
                    i += 1
                    continue
                niov = self._encode(e, &size, &lines)
                sent = _writev_all(e.fd, self._iov, niov)
                if sent == size:
                    pass
                elif sent >= 0:
                    rest = PyBytes_FromStringAndSize(NULL, size - sent)
                    _copy_iov_from(self._iov, <int>niov, sent, PyBytes_AS_STRING(rest))
                    tails.append((c, rest))
                else:
                    tails.append((c, None))
                self._free_tmp()
                if sent >= 0:
                    self._count_encoded(e, size, lines)
                self._drop(e)
                e.dirty = -1
                i += 1
        finally:
            # Normally every id was handled; after an error (MemoryError) the
            # ids not handled yet stay dirty, at the front of the array.
            j = 0
            while i < self._ndirty:
                c = self._dirty[i]
                i += 1
                if c < 0:
                    continue
                e = self._find(<uint32_t>c)
                if e == NULL or e.dirty < 0:
                    continue
                self._dirty[j] = c
                e.dirty = j
                j += 1
            self._ndirty = j
            self._free_tmp()
            self._shared_clear()
            self._release_scratch()
        return deferred, tails


cdef Py_ssize_t _writev_all(int fd, iovec* iov, Py_ssize_t niov) noexcept:
    """writev all of iov, IOV_MAX at a time, until the socket takes less:
    the bytes written, or -1 when the socket failed (not EAGAIN)."""
    cdef Py_ssize_t done = 0
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t cnt, want, sent, j
    while i < niov:
        cnt = niov - i
        if cnt > _IOV_MAX:
            cnt = _IOV_MAX
        want = 0
        for j in range(i, i + cnt):
            want += <Py_ssize_t>iov[j].iov_len
        while True:
            sent = writev(fd, iov + i, <int>cnt)
            if sent >= 0 or errno != EINTR:
                break
        if sent < 0:
            if errno == EAGAIN or errno == EWOULDBLOCK:
                return done
            return -1
        done += sent
        if sent < want:
            return done
        i += cnt
    return done


cdef inline Py_ssize_t _count_newlines(const char* p, Py_ssize_t n) noexcept:
    cdef Py_ssize_t count = 0
    cdef const char* end = p + n
    cdef const char* hit
    while p < end:
        hit = <const char*>memchr(p, 10, <size_t>(end - p))
        if hit == NULL:
            break
        count += 1
        p = hit + 1
    return count


cdef inline void _copy_iov_from(iovec* iov, int niov, Py_ssize_t skip, char* out) noexcept:
    """Copy the bytes of iov after the first ``skip`` into out."""
    cdef int j
    cdef Py_ssize_t length
    cdef const char* base
    for j in range(niov):
        length = <Py_ssize_t>iov[j].iov_len
        base = <const char*>iov[j].iov_base
        if skip >= length:
            skip -= length
            continue
        memcpy(out, base + skip, <size_t>(length - skip))
        out += length - skip
        skip = 0

"""SubscriptionTable, compiled: channel -> local connection ids, per shard.

Layout (no Python object per subscription):

* channels are interned to small ints (``_ids``: str -> id, ``_names``:
  id -> str or None); an id goes on a LIFO free list when its channel's last
  subscriber leaves and is handed to the next new channel;
* per channel, a growable C array of uint32 conn ids (``conns``) plus a
  parallel array ``slots`` (for ``conns[i]``, where this channel sits in that
  connection's own entry array) so the swap-remove that keeps ``conns``
  dense is O(1);
* per connection (an open-addressing hash table keyed by the uint32 cid), a
  small C array of ``(channel id, index in the channel's conns)`` in
  subscribe order: removing a connection never scans a channel.

``subscribers(channel)`` is a zero-copy, read-only ``memoryview`` (format
``'I'``) of the channel's ``conns`` array: the fan-out hands it straight to
``OutboundTable.append_many``. It is valid only until the next add/remove on
this table (or the table's death); do NOT store it. The view object is
cached per channel and handed out again until the channel's array changes,
so the lookup allocates nothing in the steady state.

The pure-Python twin is ``subtable_py``; both behave the same, including the
order of ``subscribers()`` and the channel ids handed out.
"""
from cpython.long cimport PyLong_Check
from cpython.object cimport PyObject
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.unicode cimport PyUnicode_FromObject
from libc.stdint cimport uint32_t
from libc.string cimport memset

__all__ = ["SubscriptionTable"]


cdef extern from "Python.h":
    # Py_buffer with a raw ``obj`` (the view owns no reference: obj = NULL).
    ctypedef struct RawBuffer "Py_buffer":
        void *buf
        PyObject *obj
        Py_ssize_t len
        Py_ssize_t itemsize
        int readonly
        int ndim
        char *format
        Py_ssize_t *shape
        Py_ssize_t *strides
        Py_ssize_t *suboffsets
        void *internal
    object PyMemoryView_FromBuffer(RawBuffer *view)
    # CPython (non-limited API): a memoryview's state, to tell whether a
    # cached view was release()d by its user.
    ctypedef struct PyMemoryViewObject:
        int flags
    int _Py_MEMORYVIEW_RELEASED
    void Py_INCREF(PyObject *o)
    void Py_XDECREF(PyObject *o)


cdef struct Chan:
    uint32_t *conns   # subscriber conn ids, dense, unordered (swap-remove)
    uint32_t *slots   # slots[i]: index of this channel in conns[i]'s entries
    PyObject *view    # cached subscribers() memoryview, NULL once stale
    uint32_t n
    uint32_t cap


cdef struct Entry:
    uint32_t chan     # channel id
    uint32_t index    # position of the connection in that channel's conns


cdef struct Conn:
    Entry *entries    # NULL: empty hash slot; else subscribe order
    uint32_t cid
    uint32_t n
    uint32_t cap


cdef extern from "Python.h":
    long long PyLong_AsLongLongAndOverflow(object obj, int *overflow) except? -1


cdef inline uint32_t _cid(object value) except? 0xFFFFFFFFU:
    """A conn id: an int in [0, 2**32) (no float/__int__ truncation)."""
    cdef int overflow = 0
    cdef long long v
    if not PyLong_Check(value):
        raise TypeError(f"conn id must be an int, not {type(value).__name__}")
    v = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow or v < 0 or v > 0xFFFFFFFFLL:
        raise OverflowError(f"conn id {value} is outside [0, 2**32)")
    return <uint32_t>v


cdef uint32_t _EMPTY[1]
_EMPTY[0] = 0
cdef char *_FORMAT_I = b"I"


cdef object _uint32_view(uint32_t *data, uint32_t n):
    """A read-only memoryview (format 'I') of ``data[:n]``, owning nothing."""
    cdef RawBuffer buf
    buf.buf = <void *>data
    buf.len = <Py_ssize_t>n * <Py_ssize_t>sizeof(uint32_t)
    buf.obj = NULL
    buf.itemsize = sizeof(uint32_t)
    buf.readonly = 1
    buf.ndim = 1
    buf.format = _FORMAT_I
    buf.shape = NULL
    buf.strides = NULL
    buf.suboffsets = NULL
    buf.internal = NULL
    return PyMemoryView_FromBuffer(&buf)


cdef inline bint _live(PyObject *view) noexcept:
    return view != NULL and not (
        (<PyMemoryViewObject *>view).flags & _Py_MEMORYVIEW_RELEASED
    )


cdef inline void _stale(Chan *ch) noexcept:
    """The channel's array changes: forget its cached view."""
    cdef PyObject *view = ch.view
    if view != NULL:
        ch.view = NULL
        Py_XDECREF(view)  # a memoryview owning nothing: runs no user code


cdef object _EMPTY_VIEW = _uint32_view(_EMPTY, 0)

cdef enum:
    CHAN_MIN_CAP = 4      # first allocation of a channel's arrays
    CONN_MIN_CAP = 2      # first allocation of a connection's entries
    TABLE_MIN_SIZE = 16   # connection hash table slots (a power of two)


cdef inline size_t _hash(uint32_t x) noexcept nogil:
    # murmur3 fmix32: cids are often sequential, spread them.
    x ^= x >> 16
    x *= 0x85EBCA6BU
    x ^= x >> 13
    x *= 0xC2B2AE35U
    x ^= x >> 16
    return x


cdef class SubscriptionTable:
    """Channel -> subscribed local connection ids (see the module docstring).

    ``add(cid, channel) -> bool``, ``remove(cid, channel) -> bool``,
    ``remove_connection(cid) -> list[str]``, ``subscribers(channel)``,
    ``count(channel)``, ``channels_of(cid)``, ``is_subscribed(cid, channel)``,
    ``channel_id(channel)``, ``channels()``, ``len()``, ``.subscriptions``,
    ``.connections``. Conn ids are ints in ``[0, 2**32)`` (OverflowError
    otherwise); channels are str.
    """

    cdef dict _ids         # channel -> id (channels with >= 1 subscriber)
    cdef list _names       # id -> channel, or None when the id is free
    cdef list _free        # free ids, reused LIFO
    cdef Chan *_chans      # indexed by channel id, len(_names) in use
    cdef Py_ssize_t _chans_cap
    cdef Conn *_table      # open addressing, linear probing, size 2**k
    cdef size_t _mask
    cdef size_t _used      # occupied hash slots == connections
    cdef Py_ssize_t _subs  # (cid, channel) pairs

    def __cinit__(self):
        self._ids = {}
        self._names = []
        self._free = []
        self._chans = NULL
        self._chans_cap = 0
        self._table = <Conn *>PyMem_Malloc(TABLE_MIN_SIZE * sizeof(Conn))
        if self._table == NULL:
            raise MemoryError()
        memset(self._table, 0, TABLE_MIN_SIZE * sizeof(Conn))
        self._mask = TABLE_MIN_SIZE - 1
        self._used = 0
        self._subs = 0

    def __dealloc__(self):
        cdef Py_ssize_t i
        cdef size_t j
        if self._chans != NULL:
            for i in range(self._chans_cap):
                _stale(&self._chans[i])
                PyMem_Free(self._chans[i].conns)
                PyMem_Free(self._chans[i].slots)
            PyMem_Free(self._chans)
            self._chans = NULL
        if self._table != NULL:
            for j in range(self._mask + 1):
                PyMem_Free(self._table[j].entries)
            PyMem_Free(self._table)
            self._table = NULL

    # ------------------------------------------------------------------
    # connection hash table

    cdef inline Py_ssize_t _find(self, uint32_t cid) noexcept:
        cdef size_t i = _hash(cid) & self._mask
        cdef Conn *t = self._table
        while t[i].entries != NULL:
            if t[i].cid == cid:
                return <Py_ssize_t>i
            i = (i + 1) & self._mask
        return -1

    cdef int _rehash(self, size_t size) except -1:
        """Move every connection into a fresh table of ``size`` slots."""
        cdef Conn *old = self._table
        cdef size_t old_size = self._mask + 1
        cdef Conn *new = <Conn *>PyMem_Malloc(size * sizeof(Conn))
        cdef size_t i, j
        if new == NULL:
            raise MemoryError()
        memset(new, 0, size * sizeof(Conn))
        for i in range(old_size):
            if old[i].entries != NULL:
                j = _hash(old[i].cid) & (size - 1)
                while new[j].entries != NULL:
                    j = (j + 1) & (size - 1)
                new[j] = old[i]
        self._table = new
        self._mask = size - 1
        PyMem_Free(old)
        return 0

    cdef Py_ssize_t _insert(self, uint32_t cid) except -1:
        """Index of a new, empty (n == 0) record for ``cid`` (not present)."""
        cdef Entry *entries
        cdef size_t i
        if (self._used + 1) * 2 > self._mask + 1:
            self._rehash((self._mask + 1) * 2)
        entries = <Entry *>PyMem_Malloc(CONN_MIN_CAP * sizeof(Entry))
        if entries == NULL:
            raise MemoryError()
        i = _hash(cid) & self._mask
        while self._table[i].entries != NULL:
            i = (i + 1) & self._mask
        self._table[i].entries = entries
        self._table[i].cid = cid
        self._table[i].n = 0
        self._table[i].cap = CONN_MIN_CAP
        self._used += 1
        return <Py_ssize_t>i

    cdef void _delete(self, Py_ssize_t slot) noexcept:
        """Free the record at ``slot`` (backward-shift deletion)."""
        cdef Conn *t = self._table
        cdef size_t mask = self._mask
        cdef size_t i = <size_t>slot
        cdef size_t j = i
        cdef size_t k
        PyMem_Free(t[i].entries)
        while True:
            j = (j + 1) & mask
            if t[j].entries == NULL:
                break
            k = _hash(t[j].cid) & mask
            # Leave t[j] where it is when its home k lies cyclically in (i, j].
            if i <= j:
                if i < k <= j:
                    continue
            elif i < k or k <= j:
                continue
            t[i] = t[j]
            i = j
        t[i].entries = NULL
        t[i].n = 0
        t[i].cap = 0
        self._used -= 1
        if self._mask + 1 > TABLE_MIN_SIZE and self._used * 8 < self._mask + 1:
            try:
                self._rehash((self._mask + 1) // 2)
            except MemoryError:  # keep the bigger table
                pass

    cdef int _conn_reserve(self, Conn *conn) except -1:
        cdef uint32_t cap
        cdef Entry *entries
        if conn.n < conn.cap:
            return 0
        cap = conn.cap * 2
        entries = <Entry *>PyMem_Realloc(conn.entries, cap * sizeof(Entry))
        if entries == NULL:
            raise MemoryError()
        conn.entries = entries
        conn.cap = cap
        return 0

    # ------------------------------------------------------------------
    # channels

    cdef Py_ssize_t _new_channel(self, str channel) except -1:
        """Intern ``channel`` (not present): an id whose Chan is empty."""
        cdef Py_ssize_t cidx, cap
        cdef Chan *chans
        if self._free:
            cidx = self._free[len(self._free) - 1]
        else:
            cidx = len(self._names)
            if cidx >= 0xFFFFFFFF:
                raise OverflowError("too many channels")
            if cidx >= self._chans_cap:
                cap = self._chans_cap * 2 if self._chans_cap else 16
                chans = <Chan *>PyMem_Realloc(self._chans, cap * sizeof(Chan))
                if chans == NULL:
                    raise MemoryError()
                memset(chans + self._chans_cap, 0, (cap - self._chans_cap) * sizeof(Chan))
                self._chans = chans
                self._chans_cap = cap
        # Python-level bookkeeping first; nothing C-side changes until it holds.
        self._ids[channel] = cidx
        if cidx == len(self._names):
            try:
                self._names.append(channel)
            except BaseException:
                del self._ids[channel]
                raise
        else:
            self._names[cidx] = channel
            self._free.pop()
        return cidx

    cdef int _release_channel(self, uint32_t cidx) except -1:
        """The channel ``cidx`` has no subscriber left: free its id."""
        cdef Chan *ch = &self._chans[cidx]
        _stale(ch)
        PyMem_Free(ch.conns)
        PyMem_Free(ch.slots)
        ch.conns = NULL
        ch.slots = NULL
        ch.n = 0
        ch.cap = 0
        name = self._names[cidx]
        self._names[cidx] = None
        del self._ids[name]
        self._free.append(cidx)
        return 0

    cdef int _chan_reserve(self, Chan *ch) except -1:
        cdef uint32_t cap
        cdef uint32_t *p
        _stale(ch)  # add() is about to change the array
        if ch.n < ch.cap:
            return 0
        cap = ch.cap * 2 if ch.cap else CHAN_MIN_CAP
        p = <uint32_t *>PyMem_Realloc(ch.conns, cap * sizeof(uint32_t))
        if p == NULL:
            raise MemoryError()
        ch.conns = p
        p = <uint32_t *>PyMem_Realloc(ch.slots, cap * sizeof(uint32_t))
        if p == NULL:
            raise MemoryError()  # conns is bigger than needed: harmless
        ch.slots = p
        ch.cap = cap
        return 0

    cdef void _chan_shrink(self, Chan *ch) noexcept:
        """Give memory back once a channel is down to a quarter of it."""
        cdef uint32_t cap = ch.cap // 2
        cdef uint32_t *p
        if ch.cap <= 64 or ch.n * 4 > ch.cap:
            return
        _stale(ch)
        p = <uint32_t *>PyMem_Realloc(ch.conns, cap * sizeof(uint32_t))
        if p == NULL:
            return
        ch.conns = p
        p = <uint32_t *>PyMem_Realloc(ch.slots, cap * sizeof(uint32_t))
        if p == NULL:
            # conns shrank, slots did not; cap must fit both.
            ch.cap = cap
            return
        ch.slots = p
        ch.cap = cap

    cdef void _unlink(self, uint32_t cidx, uint32_t index) noexcept:
        """Swap-remove position ``index`` of channel ``cidx``'s conns."""
        cdef Chan *ch = &self._chans[cidx]
        cdef uint32_t last = ch.n - 1
        cdef uint32_t moved
        cdef Py_ssize_t slot
        _stale(ch)
        if index != last:
            moved = ch.conns[last]
            ch.conns[index] = moved
            ch.slots[index] = ch.slots[last]
            slot = self._find(moved)
            self._table[slot].entries[ch.slots[index]].index = index
        ch.n = last

    # ------------------------------------------------------------------
    # API

    def add(self, cid, channel):
        """Subscribe ``cid`` to ``channel``; False if it already was."""
        cdef uint32_t key = _cid(cid)
        cdef object found = self._ids.get(channel)
        cdef Py_ssize_t cidx, slot
        cdef uint32_t i
        cdef bint new_channel = False
        cdef Chan *ch
        cdef Conn *conn
        if found is None:
            if not isinstance(channel, str):
                raise TypeError(f"channel must be str, not {type(channel).__name__}")
            # Own an exact str (a subclass's __hash__/__eq__ could run code
            # in the middle of C bookkeeping).
            channel = PyUnicode_FromObject(channel)
            cidx = self._new_channel(channel)
            new_channel = True
            slot = self._find(key)
        else:
            cidx = found
            slot = self._find(key)
            if slot >= 0:
                conn = &self._table[slot]
                for i in range(conn.n):
                    if conn.entries[i].chan == cidx:
                        return False
        try:
            if slot < 0:
                slot = self._insert(key)
            ch = &self._chans[cidx]
            conn = &self._table[slot]
            self._chan_reserve(ch)
            self._conn_reserve(conn)
        except BaseException:
            if slot >= 0 and self._table[slot].n == 0:
                self._delete(slot)
            if new_channel:
                self._release_channel(cidx)
            raise
        ch.conns[ch.n] = key
        ch.slots[ch.n] = conn.n
        conn.entries[conn.n].chan = <uint32_t>cidx
        conn.entries[conn.n].index = ch.n
        ch.n += 1
        conn.n += 1
        self._subs += 1
        return True

    cdef Py_ssize_t _locate(self, object cid, object channel, Py_ssize_t* slot_out,
                            uint32_t* cidx_out) except -2:
        """Where ``cid``'s subscription to ``channel`` sits in its entries,
        or -1 when it has none (slot and channel id set when found)."""
        cdef uint32_t key = _cid(cid)
        cdef object found = self._ids.get(channel)
        cdef Py_ssize_t slot
        cdef uint32_t cidx, j
        cdef Conn *conn
        if found is None:
            return -1
        cidx = found
        slot = self._find(key)
        if slot < 0:
            return -1
        conn = &self._table[slot]
        for j in range(conn.n):
            if conn.entries[j].chan == cidx:
                slot_out[0] = slot
                cidx_out[0] = cidx
                return j
        return -1

    def remove(self, cid, channel):
        """Unsubscribe ``cid`` from ``channel``; False if it was not."""
        cdef Py_ssize_t slot, at
        cdef uint32_t cidx, i, j, n
        cdef Conn *conn
        cdef Entry e
        at = self._locate(cid, channel, &slot, &cidx)
        if at < 0:
            return False
        j = <uint32_t>at
        conn = &self._table[slot]
        n = conn.n
        self._unlink(cidx, conn.entries[j].index)
        # Keep the connection's entries in subscribe order.
        for i in range(j + 1, n):
            e = conn.entries[i]
            conn.entries[i - 1] = e
            self._chans[e.chan].slots[e.index] = i - 1
        conn.n = n - 1
        self._subs -= 1
        if conn.n == 0:
            self._delete(slot)
        if self._chans[cidx].n == 0:
            self._release_channel(cidx)
        else:
            self._chan_shrink(&self._chans[cidx])
        return True

    def remove_connection(self, cid):
        """Drop every subscription of ``cid``: its channels, subscribe order."""
        cdef uint32_t key = _cid(cid)
        cdef Py_ssize_t slot = self._find(key)
        cdef Conn *conn
        cdef uint32_t i, n
        cdef list out
        if slot < 0:
            return []
        conn = &self._table[slot]
        n = conn.n
        out = [self._names[conn.entries[i].chan] for i in range(n)]
        for i in range(n):
            self._unlink(conn.entries[i].chan, conn.entries[i].index)
        for i in range(n):
            if self._chans[conn.entries[i].chan].n == 0:
                self._release_channel(conn.entries[i].chan)
            else:
                self._chan_shrink(&self._chans[conn.entries[i].chan])
        self._subs -= n
        self._delete(slot)
        return out

    def subscribers(self, channel):
        """The conn ids subscribed to ``channel``: a read-only uint32
        memoryview (format ``'I'``) of the table's own array, zero-copy.

        Valid only until the next add/remove/remove_connection on this
        table: consume it at once (e.g. ``OutboundTable.append_many``) and
        do NOT store it. While the channel is unchanged, calls return the
        same view object (creating none). Unknown channel: an empty view.
        Order unspecified.
        """
        global _EMPTY_VIEW
        cdef object found = self._ids.get(channel)
        cdef Chan *ch
        cdef object view
        if found is None:
            if not _live(<PyObject *>_EMPTY_VIEW):
                _EMPTY_VIEW = _uint32_view(_EMPTY, 0)
            return _EMPTY_VIEW
        ch = &self._chans[<Py_ssize_t>found]
        if _live(ch.view):
            return <object>ch.view
        # One view per channel state, reused until the array changes.
        view = _uint32_view(ch.conns, ch.n)
        _stale(ch)
        Py_INCREF(<PyObject *>view)
        ch.view = <PyObject *>view
        return view

    def count(self, channel):
        """How many connections are subscribed to ``channel``."""
        cdef object found = self._ids.get(channel)
        if found is None:
            return 0
        return self._chans[<Py_ssize_t>found].n

    def channels_of(self, cid):
        """The channels ``cid`` is subscribed to, in subscribe order."""
        cdef uint32_t key = _cid(cid)
        cdef Py_ssize_t slot = self._find(key)
        cdef Conn *conn
        cdef uint32_t i
        if slot < 0:
            return []
        conn = &self._table[slot]
        return [self._names[conn.entries[i].chan] for i in range(conn.n)]

    def is_subscribed(self, cid, channel):
        cdef Py_ssize_t slot
        cdef uint32_t cidx
        return self._locate(cid, channel, &slot, &cidx) >= 0

    def channel_id(self, channel):
        """The interned id of ``channel``; -1 when it has no subscriber."""
        return self._ids.get(channel, -1)

    def channels(self):
        """Channels with at least one subscriber (first-subscribed order)."""
        return list(self._ids)

    def __len__(self):
        return len(self._ids)

    @property
    def subscriptions(self):
        """(cid, channel) pairs."""
        return self._subs

    @property
    def connections(self):
        """Connection ids with at least one subscription."""
        return self._used

    def __repr__(self):
        return (
            f"<SubscriptionTable channels={len(self._ids)} "
            f"connections={self._used} subscriptions={self._subs}>"
        )

"""HistoryWindow, compiled: one channel's recovery window.

Publications ``(offset, data, time)`` bounded by count and by age. Storage
is a circular C array of ``(PyObject *data, double time)`` (one strong
reference per retained payload); offsets are implicit: the i-th retained
entry has offset ``first_offset + i``. The array grows on demand (doubling,
never beyond ``max_count``) and ``resize`` gives memory back.

Age trimming uses the ``now`` passed in (callers pass ``time.monotonic()``);
nothing here reads a clock. An entry stamped ``t`` is expired at ``now``
when ``now - t > max_age`` (``max_age`` 0: no age bound).

The pure-Python twin is ``history_py``; both behave the same.
"""
from cpython.long cimport PyLong_Check
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject
from libc.stdint cimport INT64_MAX, INT64_MIN, int64_t

__all__ = ["HistoryWindow"]


cdef extern from "Python.h":
    long long PyLong_AsLongLongAndOverflow(object obj, int *overflow) except? -1
    Py_ssize_t _size "PyBytes_GET_SIZE"(PyObject *o)
    void _incref "Py_INCREF"(PyObject *o)
    void _decref "Py_DECREF"(PyObject *o)


cdef struct Slot:
    PyObject *data   # a strong reference to an exact bytes
    double t


cdef inline int64_t _offset(object value) except? -1:
    """An int offset as int64, clamped (huge values compare the same way)."""
    cdef int overflow = 0
    cdef long long v
    if not PyLong_Check(value):
        raise TypeError(
            f"offset must be an integer, not {type(value).__name__}"
        )
    v = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow > 0:
        return INT64_MAX
    if overflow < 0:
        return INT64_MIN
    return v


cdef Py_ssize_t _max_count(object max_count) except -1:
    """The count bound, checked: an integer >= 0 that fits a Py_ssize_t."""
    if not PyLong_Check(max_count):
        raise TypeError(f"max_count must be an integer, not {type(max_count).__name__}")
    if max_count < 0:
        raise ValueError(f"max_count must be >= 0, got {max_count!r}")
    return max_count


cdef class HistoryWindow:
    """``HistoryWindow(max_count, max_age, last_offset=0)``.

    ``append(offset, data, now)`` (offset must be ``last_offset + 1``, else
    ValueError; data: bytes), ``last_offset``, ``first_offset`` (oldest
    retained, or ``last_offset + 1`` when empty), ``covers(offset, now)``,
    ``since(offset, now, limit=None) -> list[(offset, data)]``,
    ``trim(now) -> int``, ``resize(max_count)``, ``len()``, ``nbytes``.
    ``max_count`` 0 retains nothing (offsets still advance); ``max_age`` 0
    means no age bound. Offsets are int64.
    """

    cdef Slot *_buf
    cdef Py_ssize_t _cap      # slots allocated (<= max_count)
    cdef Py_ssize_t _head     # index of the oldest retained entry
    cdef Py_ssize_t _n        # retained entries
    cdef Py_ssize_t _max_count
    cdef double _max_age
    cdef int64_t _last
    cdef Py_ssize_t _nbytes

    def __cinit__(self, max_count, max_age, last_offset=0):
        self._buf = NULL
        self._cap = 0
        self._head = 0
        self._n = 0
        self._nbytes = 0

    def __init__(self, max_count, max_age, last_offset=0):
        cdef Py_ssize_t count
        cdef double age
        count = _max_count(max_count)
        age = max_age
        if not age >= 0.0:  # also rejects NaN
            raise ValueError(f"max_age must be >= 0, got {max_age!r}")
        if not PyLong_Check(last_offset):
            raise TypeError(
                f"last_offset must be an integer, not {type(last_offset).__name__}"
            )
        if not INT64_MIN <= last_offset <= INT64_MAX:
            raise OverflowError("last_offset does not fit in int64")
        self._clear()
        self._max_count = count
        self._max_age = age
        self._last = last_offset

    def __dealloc__(self):
        self._clear()

    # ------------------------------------------------------------------

    cdef void _clear(self) noexcept:
        cdef Slot *buf = self._buf
        cdef Py_ssize_t cap = self._cap, head = self._head, n = self._n, i
        self._buf = NULL
        self._cap = 0
        self._head = 0
        self._n = 0
        self._nbytes = 0
        if buf != NULL:
            for i in range(n):
                _decref(buf[(head + i) % cap].data)
            PyMem_Free(buf)

    cdef inline void _pop_oldest(self) noexcept:
        cdef PyObject *data = self._buf[self._head].data
        self._head += 1
        if self._head == self._cap:
            self._head = 0
        self._n -= 1
        self._nbytes -= _size(data)
        _decref(data)  # the state is consistent before any dealloc

    cdef Py_ssize_t _trim(self, double now) noexcept:
        cdef Py_ssize_t dropped = 0
        if self._max_age > 0.0:
            while self._n and now - self._buf[self._head].t > self._max_age:
                self._pop_oldest()
                dropped += 1
        return dropped

    cdef int _realloc(self, Py_ssize_t cap) except -1:
        """Move the ``_n`` retained entries into ``cap`` (>= _n) fresh slots."""
        cdef Slot *new = NULL
        cdef Py_ssize_t i
        if cap > 0:
            if <size_t>cap > (<size_t>-1) // sizeof(Slot):
                raise MemoryError()
            new = <Slot *>PyMem_Malloc(cap * sizeof(Slot))
            if new == NULL:
                raise MemoryError()
            for i in range(self._n):
                new[i] = self._buf[(self._head + i) % self._cap]
        PyMem_Free(self._buf)
        self._buf = new
        self._cap = cap
        self._head = 0
        return 0

    # ------------------------------------------------------------------

    def append(self, offset, data, double now):
        """Retain publication ``offset`` (must be ``last_offset + 1``)."""
        cdef int64_t off
        cdef Py_ssize_t cap, tail
        if self._last == INT64_MAX:
            raise OverflowError("offset space exhausted")
        off = _offset(offset)
        if off != self._last + 1 or off == INT64_MAX and offset != INT64_MAX:
            raise ValueError(
                f"offset {offset!r} does not follow last_offset {self._last}"
            )
        if type(data) is not bytes:
            raise TypeError(f"data must be bytes, not {type(data).__name__}")
        if self._max_count == 0:
            self._last = off
            return
        self._trim(now)
        if self._n == self._max_count:
            self._pop_oldest()
        elif self._n == self._cap:
            cap = self._cap * 2 if self._cap >= 4 else 8
            if cap > self._max_count:
                cap = self._max_count
            self._realloc(cap)
        tail = self._head + self._n
        if tail >= self._cap:
            tail -= self._cap
        _incref(<PyObject *>data)
        self._buf[tail].data = <PyObject *>data
        self._buf[tail].t = now
        self._n += 1
        self._nbytes += _size(<PyObject *>data)
        self._last = off

    @property
    def last_offset(self):
        return self._last

    @property
    def first_offset(self):
        """Offset of the oldest retained publication (``last_offset + 1``
        when empty)."""
        return self._last - self._n + 1

    @property
    def max_count(self):
        return self._max_count

    @property
    def max_age(self):
        return self._max_age

    @property
    def nbytes(self):
        """Sum of ``len(data)`` over the retained publications."""
        return self._nbytes

    def __len__(self):
        return self._n

    def covers(self, offset, double now):
        """Whether every publication after ``offset`` up to ``last_offset``
        is still retained (age-trims first)."""
        cdef int64_t off = _offset(offset)
        self._trim(now)
        return off >= self._last - self._n

    def since(self, offset, double now, limit=None):
        """Retained ``(offset, data)`` with offset > ``offset``, oldest
        first, at most ``limit`` (None: all). Age-trims first."""
        cdef int64_t off = _offset(offset)
        cdef int64_t first
        cdef Py_ssize_t start, count, i
        cdef Slot *slot
        cdef list out
        if limit is None:
            count = -1
        else:
            if not PyLong_Check(limit):
                raise TypeError(
                    f"limit must be an integer or None, not {type(limit).__name__}"
                )
            if limit < 0:
                raise ValueError(f"limit must be >= 0, got {limit!r}")
            count = limit if limit < self._n else self._n
        self._trim(now)
        first = self._last - self._n + 1
        if off >= self._last:
            return []
        start = 0 if off < first else <Py_ssize_t>(off - first + 1)
        if count < 0 or count > self._n - start:
            count = self._n - start
        out = []
        for i in range(start, start + count):
            slot = &self._buf[(self._head + i) % self._cap]
            out.append((first + i, <object>slot.data))
        return out

    def trim(self, double now):
        """Drop the publications expired at ``now``; how many."""
        return self._trim(now)

    def resize(self, max_count):
        """Set the count bound: drops the oldest beyond it and gives the
        spare storage back."""
        cdef Py_ssize_t count
        count = _max_count(max_count)
        while self._n > count:
            self._pop_oldest()
        self._max_count = count
        if self._cap > count or (self._cap > self._n and self._cap > 8):
            self._realloc(self._n)

    def __repr__(self):
        return (
            f"<HistoryWindow first_offset={self._last - self._n + 1} "
            f"last_offset={self._last} len={self._n} nbytes={self._nbytes} "
            f"max_count={self._max_count} max_age={self._max_age}>"
        )

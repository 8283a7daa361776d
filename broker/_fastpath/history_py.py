"""HistoryWindow, pure-Python twin of ``history.pyx``.

Same names, same behaviour: a ``collections.deque`` of ``(data, time)``
with implicit offsets (the i-th retained entry has offset
``first_offset + i``). Age trimming uses the ``now`` passed in; an entry
stamped ``t`` is expired at ``now`` when ``now - t > max_age`` (``max_age``
0: no age bound). Offsets are int64, as in the compiled module.
"""
from __future__ import annotations

from collections import deque
from itertools import islice
from typing import SupportsFloat, cast

__all__ = ["HistoryWindow"]

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


def _float(value: object) -> float:
    """``value`` as a C double the way the compiled module converts it."""
    if isinstance(value, (str, bytes, bytearray)):
        raise TypeError(f"must be real number, not {type(value).__name__}")
    return float(cast(SupportsFloat, value))  # float() raises TypeError for the rest


def _offset_type(value: object) -> None:
    if not isinstance(value, int):
        raise TypeError(f"offset must be an integer, not {type(value).__name__}")


def _check_max_count(max_count: int) -> None:
    """The count bound: an integer >= 0 that fits a Py_ssize_t (as compiled)."""
    if not isinstance(max_count, int):
        raise TypeError(f"max_count must be an integer, not {type(max_count).__name__}")
    if max_count < 0:
        raise ValueError(f"max_count must be >= 0, got {max_count!r}")
    if max_count > _INT64_MAX:
        raise OverflowError("max_count does not fit in Py_ssize_t")


class HistoryWindow:
    """``HistoryWindow(max_count, max_age, last_offset=0)``.

    ``append(offset, data, now)`` (offset must be ``last_offset + 1``, else
    ValueError; data: bytes), ``last_offset``, ``first_offset`` (oldest
    retained, or ``last_offset + 1`` when empty), ``covers(offset, now)``,
    ``since(offset, now, limit=None) -> list[(offset, data)]``,
    ``trim(now) -> int``, ``resize(max_count)``, ``len()``, ``nbytes``.
    ``max_count`` 0 retains nothing (offsets still advance); ``max_age`` 0
    means no age bound. Offsets are int64.
    """

    __slots__ = ("_items", "_max_count", "_max_age", "_last", "_nbytes")

    def __init__(self, max_count: int, max_age: float, last_offset: int = 0) -> None:
        _check_max_count(max_count)
        age = _float(max_age)
        if not age >= 0.0:  # also rejects NaN
            raise ValueError(f"max_age must be >= 0, got {max_age!r}")
        if not isinstance(last_offset, int):
            raise TypeError(
                f"last_offset must be an integer, not {type(last_offset).__name__}"
            )
        if not _INT64_MIN <= last_offset <= _INT64_MAX:
            raise OverflowError("last_offset does not fit in int64")
        self._items: deque[tuple[bytes, float]] = deque()
        self._max_count = int(max_count)
        self._max_age = age
        self._last = int(last_offset)
        self._nbytes = 0

    def _trim(self, now: float) -> int:
        max_age = self._max_age
        if max_age <= 0.0:
            return 0
        items = self._items
        dropped = 0
        while items and now - items[0][1] > max_age:
            self._nbytes -= len(items.popleft()[0])
            dropped += 1
        return dropped

    def append(self, offset: int, data: bytes, now: float) -> None:
        """Retain publication ``offset`` (must be ``last_offset + 1``)."""
        if type(now) is not float:
            now = _float(now)
        if self._last == _INT64_MAX:
            raise OverflowError("offset space exhausted")
        if type(offset) is not int:
            _offset_type(offset)
        if offset != self._last + 1:
            raise ValueError(
                f"offset {offset!r} does not follow last_offset {self._last}"
            )
        if type(data) is not bytes:
            raise TypeError(f"data must be bytes, not {type(data).__name__}")
        if self._max_count == 0:
            self._last = int(offset)
            return
        self._trim(now)
        items = self._items
        if len(items) == self._max_count:
            self._nbytes -= len(items.popleft()[0])
        items.append((data, now))
        self._nbytes += len(data)
        self._last = int(offset)

    @property
    def last_offset(self) -> int:
        return self._last

    @property
    def first_offset(self) -> int:
        """Offset of the oldest retained publication (``last_offset + 1``
        when empty)."""
        return self._last - len(self._items) + 1

    @property
    def max_count(self) -> int:
        return self._max_count

    @property
    def max_age(self) -> float:
        return self._max_age

    @property
    def nbytes(self) -> int:
        """Sum of ``len(data)`` over the retained publications."""
        return self._nbytes

    def __len__(self) -> int:
        return len(self._items)

    def covers(self, offset: int, now: float) -> bool:
        """Whether every publication after ``offset`` up to ``last_offset``
        is still retained (age-trims first)."""
        if type(now) is not float:
            now = _float(now)
        if type(offset) is not int:
            _offset_type(offset)
        self._trim(now)
        return offset >= self._last - len(self._items)

    def since(
        self, offset: int, now: float, limit: int | None = None
    ) -> list[tuple[int, bytes]]:
        """Retained ``(offset, data)`` with offset > ``offset``, oldest
        first, at most ``limit`` (None: all). Age-trims first."""
        if type(now) is not float:
            now = _float(now)
        if type(offset) is not int:
            _offset_type(offset)
        if limit is not None:
            if not isinstance(limit, int):
                raise TypeError(
                    f"limit must be an integer or None, not {type(limit).__name__}"
                )
            if limit < 0:
                raise ValueError(f"limit must be >= 0, got {limit!r}")
        self._trim(now)
        items = self._items
        first = self._last - len(items) + 1
        if offset >= self._last:
            return []
        start = 0 if offset < first else offset - first + 1
        stop = len(items) if limit is None else min(len(items), start + limit)
        return [
            (off, item[0])
            for off, item in enumerate(islice(items, start, stop), first + start)
        ]

    def trim(self, now: float) -> int:
        """Drop the publications expired at ``now``; how many."""
        if type(now) is not float:
            now = _float(now)
        return self._trim(now)

    def resize(self, max_count: int) -> None:
        """Set the count bound: drops the oldest beyond it and gives the
        spare storage back."""
        _check_max_count(max_count)
        items = self._items
        while len(items) > max_count:
            self._nbytes -= len(items.popleft()[0])
        self._max_count = int(max_count)

    def __repr__(self) -> str:
        return (
            f"<HistoryWindow first_offset={self.first_offset} "
            f"last_offset={self._last} len={len(self._items)} "
            f"nbytes={self._nbytes} max_count={self._max_count} "
            f"max_age={self._max_age}>"
        )

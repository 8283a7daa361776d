"""SubscriptionTable, pure-Python twin of ``subtable.pyx``.

Same names, same behaviour, same layout in Python objects: channels are
interned to ids (LIFO free list, reused after a channel's last subscriber
leaves); per channel an ``array('I')`` of conn ids kept dense by swap-remove;
per connection an insertion-ordered dict ``channel id -> index in that
channel's array``. The only difference: ``subscribers()`` returns a copy
(an ``array('I')``) instead of a view of the table's own storage.
"""
from __future__ import annotations

from array import array
from typing import cast

__all__ = ["SubscriptionTable"]

_CID_MAX = 0xFFFFFFFF


def _cid(cid: object) -> int:
    """``cid`` as a plain int in [0, 2**32) (no float/__int__ truncation)."""
    if type(cid) is not int:
        if not isinstance(cid, int):
            raise TypeError(f"conn id must be an int, not {type(cid).__name__}")
        cid = int(cid)
    if not 0 <= cid <= _CID_MAX:
        raise OverflowError(f"conn id {cid} is outside [0, 2**32)")
    return cid


class SubscriptionTable:
    """Channel -> subscribed local connection ids.

    ``add(cid, channel) -> bool``, ``remove(cid, channel) -> bool``,
    ``remove_connection(cid) -> list[str]``, ``subscribers(channel)``,
    ``count(channel)``, ``channels_of(cid)``, ``is_subscribed(cid, channel)``,
    ``channel_id(channel)``, ``channels()``, ``len()``, ``.subscriptions``,
    ``.connections``. Conn ids are ints in ``[0, 2**32)`` (OverflowError
    otherwise); channels are str.
    """

    __slots__ = ("_ids", "_names", "_free", "_arrays", "_conns", "_subs")

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}          # channel -> id
        self._names: list[str | None] = []      # id -> channel (None: free)
        self._free: list[int] = []              # free ids, reused LIFO
        self._arrays: list[array[int] | None] = []  # id -> conn ids (dense)
        self._conns: dict[int, dict[int, int]] = {}  # cid -> {id: index}
        self._subs = 0

    # -- internals ------------------------------------------------------

    def _new_channel(self, channel: str) -> int:
        if self._free:
            cidx = self._free[-1]
            self._ids[channel] = cidx
            self._names[cidx] = channel
            self._arrays[cidx] = array("I")
            self._free.pop()
        else:
            cidx = len(self._names)
            self._ids[channel] = cidx
            self._names.append(channel)
            self._arrays.append(array("I"))
        return cidx

    def _release_channel(self, cidx: int) -> None:
        name = self._names[cidx]
        assert name is not None, "releasing a free channel id"
        self._names[cidx] = None
        self._arrays[cidx] = None
        del self._ids[name]
        self._free.append(cidx)

    def _unlink(self, cidx: int, index: int) -> None:
        """Swap-remove position ``index`` of channel ``cidx``'s array."""
        arr = self._arrays[cidx]
        assert arr is not None, "unlinking from a free channel id"
        moved = arr.pop()
        if index != len(arr):
            arr[index] = moved
            self._conns[moved][cidx] = index

    # -- API ------------------------------------------------------------

    def add(self, cid: int, channel: str) -> bool:
        """Subscribe ``cid`` to ``channel``; False if it already was."""
        if type(cid) is not int or not 0 <= cid <= _CID_MAX:
            cid = _cid(cid)
        cidx = self._ids.get(channel)
        subs = self._conns.get(cid)
        if cidx is None:
            if not isinstance(channel, str):
                raise TypeError(f"channel must be str, not {type(channel).__name__}")
            cidx = self._new_channel(str.__str__(channel))  # an exact str
        elif subs is not None and cidx in subs:
            return False
        if subs is None:
            subs = self._conns[cid] = {}
        arr = self._arrays[cidx]
        assert arr is not None, "an interned channel id has an array"
        subs[cidx] = len(arr)
        arr.append(cid)
        self._subs += 1
        return True

    def remove(self, cid: int, channel: str) -> bool:
        """Unsubscribe ``cid`` from ``channel``; False if it was not."""
        if type(cid) is not int or not 0 <= cid <= _CID_MAX:
            cid = _cid(cid)
        cidx = self._ids.get(channel)
        if cidx is None:
            return False
        subs = self._conns.get(cid)
        if subs is None:
            return False
        index = subs.pop(cidx, None)
        if index is None:
            return False
        self._unlink(cidx, index)
        if not subs:
            del self._conns[cid]
        self._subs -= 1
        if not self._arrays[cidx]:
            self._release_channel(cidx)
        return True

    def remove_connection(self, cid: int) -> list[str]:
        """Drop every subscription of ``cid``: its channels, subscribe order."""
        cid = _cid(cid)
        subs = self._conns.pop(cid, None)
        if subs is None:
            return []
        # A channel with a subscriber is interned: its name is never None.
        names = cast("list[str]", self._names)
        out = [names[cidx] for cidx in subs]
        for cidx, index in subs.items():
            self._unlink(cidx, index)
        arrays = self._arrays
        for cidx in subs:
            if not arrays[cidx]:
                self._release_channel(cidx)
        self._subs -= len(subs)
        return out

    def subscribers(self, channel: str) -> array[int]:
        """The conn ids subscribed to ``channel``: an ``array('I')`` copy
        (the compiled module returns a view valid only until the next
        add/remove: do NOT store it). Unknown channel: an empty array.
        Order unspecified (the same as the compiled module's)."""
        cidx = self._ids.get(channel)
        if cidx is None:
            return array("I")
        arr = self._arrays[cidx]
        assert arr is not None, "an interned channel id has an array"
        return arr[:]

    def count(self, channel: str) -> int:
        """How many connections are subscribed to ``channel``."""
        cidx = self._ids.get(channel)
        if cidx is None:
            return 0
        arr = self._arrays[cidx]
        assert arr is not None, "an interned channel id has an array"
        return len(arr)

    def channels_of(self, cid: int) -> list[str]:
        """The channels ``cid`` is subscribed to, in subscribe order."""
        subs = self._conns.get(_cid(cid))
        if subs is None:
            return []
        names = cast("list[str]", self._names)  # subscribed: interned, named
        return [names[cidx] for cidx in subs]

    def is_subscribed(self, cid: int, channel: str) -> bool:
        cid = _cid(cid)
        cidx = self._ids.get(channel)
        if cidx is None:
            return False
        subs = self._conns.get(cid)
        return subs is not None and cidx in subs

    def channel_id(self, channel: str) -> int:
        """The interned id of ``channel``; -1 when it has no subscriber."""
        return self._ids.get(channel, -1)

    def channels(self) -> list[str]:
        """Channels with at least one subscriber (first-subscribed order)."""
        return list(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def subscriptions(self) -> int:
        """(cid, channel) pairs."""
        return self._subs

    @property
    def connections(self) -> int:
        """Connection ids with at least one subscription."""
        return len(self._conns)

    def __repr__(self) -> str:
        return (
            f"<SubscriptionTable channels={len(self._ids)} "
            f"connections={len(self._conns)} subscriptions={self._subs}>"
        )

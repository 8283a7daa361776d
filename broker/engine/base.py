"""The engine interface the shard depends on."""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from collections.abc import Callable

__all__ = ["Engine", "Position", "Recovery", "DeliverFn"]

# deliver(channel, offset, data_json): called once per accepted publication,
# in offset order per channel, after it is stored in the channel's history.
DeliverFn = Callable[[str, int, bytes], None]


@dataclass(frozen=True, slots=True)
class Position:
    """Where a channel's stream stands: its epoch and its last offset."""

    epoch: str
    offset: int


@dataclass(slots=True)
class Recovery:
    """Answer to a recover request: ``recovered`` is True only when every
    publication after the client's offset is in ``publications``."""

    position: Position
    recovered: bool
    publications: list[tuple[int, bytes]] = field(default_factory=list)


class Engine(abc.ABC):
    """Sequencing and history for channels.

    Methods are coroutines so a networked engine (Redis) fits; the memory
    engine completes them without suspending.
    """

    deliver: DeliverFn
    # lost(channel, reason): the stream of a channel with local subscribers
    # cannot continue (epoch changed, gap not in history): the shard tells
    # its subscribers ("unsubscribed" with the reason) and drops them.
    lost: Callable[[str, str], None] = staticmethod(lambda channel, reason: None)

    @abc.abstractmethod
    async def publish(self, channel: str, data_json: bytes) -> Position:
        """Store the publication (next offset) and deliver it; returns its position.

        Raises EngineUnavailable when it cannot be stored: no false acks."""

    async def publish_many(self, items: list[tuple[str, bytes]]) -> list[Position]:
        """Publish (channel, data) items, in order per channel; positions in
        item order. Engines that can batch (one request per home shard, one
        Redis pipeline) override it."""
        return [await self.publish(channel, data_json) for channel, data_json in items]

    @abc.abstractmethod
    async def position(self, channel: str) -> Position:
        """The channel's current epoch and last offset."""

    @abc.abstractmethod
    async def recover(self, channel: str, epoch: str, offset: int) -> Recovery:
        """Publications after ``offset`` if the history still covers them."""

    @abc.abstractmethod
    async def history(self, channel: str, since: int, limit: int) -> tuple[Position, list[tuple[int, bytes]]]:
        """Retained publications with offset > ``since``, oldest first."""

    @abc.abstractmethod
    def ready(self) -> bool:
        """True when publishing and subscribing can succeed now."""

    def release(self, channel: str) -> None:  # noqa: B027 - an optional hook: most engines keep nothing per channel
        """The last local subscriber of ``channel`` left."""

    def sweep(self, is_active: Callable[[str], bool]) -> int:
        """Forget idle channel state; returns how many. ``is_active(channel)``
        says whether the channel has a subscriber on this shard; an engine
        that knows of followers elsewhere (other shards, other hosts) must
        keep their channels too."""
        return 0

    def resync_home(self, shard_id: int) -> None:  # noqa: B027 - an optional hook: only a cluster has homes
        """Shard ``shard_id`` was restarted: re-check the streams it sequences."""

    async def presence(self, channel: str) -> dict[str, object] | None:
        """``{"channel", "subscribers", "users"}`` across every host, or None
        when this engine does not track presence (only the Redis engine does)."""
        return None

    def rebound(self) -> int:
        """Apply reloaded history sizes and TTLs to existing channels."""
        return 0

    def scale_history(self, fraction: float) -> int:
        """Memory pressure: keep ``fraction`` of every namespace's history
        size in this process (1.0 again when it passes); returns how many
        windows changed. Engines whose history lives elsewhere (Redis) keep
        theirs: it costs the shard nothing."""
        return 0

    def fence(self, fenced: bool = True) -> None:  # noqa: B027 - optional: engines with local state
        """Stop (or resume) writing channel state: a deploy hands it over."""

    def stats(self) -> dict[str, int]:
        return {}

    async def close(self) -> None:
        return None

"""Keeping a retiring generation's clients live until their wave.

During a deploy the old generation is fenced and, after the take-over, a
client of it waits up to several waves before it is asked to move. So that
it keeps receiving publications meanwhile, each old shard follows the new
generation's publication streams (its home shards' XPUBs) for the channels
its clients are subscribed to, from the fence on, and delivers them
locally — as a remote shard of the new generation would, minus the repair:
the stream is followed only while it continues exactly (same epoch, the
next offset). A stream that jumps (the subscription reached the new home
after its first publications) is simply no longer fed: nothing is ever
skipped, its clients recover the rest when their wave moves them.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import zmq

from .router import SYNC, Drain, topic_of

__all__ = ["GenerationFeed"]

log = logging.getLogger("broker.feed")


class GenerationFeed:
    """One old shard's subscription to the new generation's streams."""

    def __init__(self, shard: Any, pub_endpoints: list[str], ctx: zmq.Context,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.shard = shard
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, 0)
        for endpoint in pub_endpoints:
            self.sub.connect(endpoint)
        self.cursors: dict[str, tuple[str, int]] = {}
        self.delivered = 0
        self.dropped = 0
        self._drain = Drain(loop, self.sub, self._on_message)

    def follow(self, channel: str, epoch: str, offset: int) -> None:
        """Deliver ``channel``'s publications after ``offset`` (of ``epoch``)."""
        self.cursors[channel] = (epoch, offset)
        self.sub.setsockopt(zmq.SUBSCRIBE, topic_of(channel))
        self._drain.kick()

    def _on_message(self, frames: list[bytes]) -> None:
        topic = frames[0]
        if topic[:1] == SYNC:
            return
        channel = topic[:-1].decode()
        cursor = self.cursors.get(channel)
        if cursor is None:
            return
        epoch, offset = frames[1].decode(), int(frames[2])
        if epoch == cursor[0] and offset <= cursor[1]:
            return
        if epoch != cursor[0] or offset != cursor[1] + 1:
            # Joined too late (or another epoch): stop rather than skip.
            del self.cursors[channel]
            self.sub.setsockopt(zmq.UNSUBSCRIBE, topic)
            self.dropped += 1
            log.info("shard %d: %s continues at %d, not %d: its clients recover it when they move",
                     self.shard.id, channel, offset, cursor[1] + 1)
            return
        self.cursors[channel] = (epoch, offset)
        self.delivered += 1
        self.shard.deliver(channel, offset, frames[3])

    def close(self) -> None:
        self._drain.close()
        self.sub.close(0)

"""Sharded pub/sub (SSUBSCRIBE) from Redis to one shard.

One ``PubSubLink`` is one dedicated connection to one Redis node: a single
Redis has one, a Redis Cluster one per primary that owns a followed channel
(``Links`` routes each channel to the owner of its slot). A link reconnects
by itself with jittered exponential backoff and subscribes its channels
again; once Redis has confirmed them it reports ``on_restored`` so the
engine can repair what was published while it was away.

Commands leave a link strictly in the order they were asked for (each is
written at once), so an unsubscribe followed by a subscribe of the same
channel can never reach Redis the other way round. redis-py opens the
connection; from then on its replies are parsed as they arrive and each
message goes to ``on_message`` from the protocol itself (no coroutine per
message).
"""
from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from typing import Any
from collections.abc import Callable

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import RedisError, ResponseError

from ..errors import EngineUnavailable
from .redis_pipe import Reader, adopt
from .redis_store import pack_command

__all__ = ["PubSubLink", "Links"]

log = logging.getLogger("broker.engine.redis")

MessageFn = Callable[[bytes, bytes], None]


class PubSubLink:
    def __init__(self, loop: asyncio.AbstractEventLoop, make_connection: Callable[[], Any],
                 on_message: MessageFn, on_restored: Callable[[set[bytes]], None],
                 timeout: float, backoff_max: float, name: str) -> None:
        self.loop = loop
        self.name = name
        self._make = make_connection
        self.on_message = on_message
        self.on_restored = on_restored
        self.timeout = timeout
        self.backoff_max = backoff_max
        self.topics: set[bytes] = set()
        self.up = False
        self.reconnects = 0
        self._transport: asyncio.Transport | None = None
        self._keep: Any = None  # redis-py's stream writer for the transport (see ``adopt``)
        self._protocol: _LinkProtocol | None = None  # the current connection's
        self._confirm: dict[bytes, deque[asyncio.Future[None]]] = {}
        self._closed = False
        self._up_event = asyncio.Event()
        self._restored: set[bytes] = set()  # topics the last (re)connect subscribed
        self._task = loop.create_task(self._run())

    # ------------------------------------------------------------ callers
    async def subscribe(self, topic: bytes) -> None:
        """Follow ``topic``; returns once Redis confirmed (EngineUnavailable if not)."""
        self.topics.add(topic)
        if not self.up:
            # A new link (a cluster node seen for the first time) is still
            # connecting, or a broken one is reconnecting: give it the timeout.
            try:
                await asyncio.wait_for(self._up_event.wait(), self.timeout)
            except TimeoutError:
                raise EngineUnavailable(f"Redis pub/sub ({self.name}) is not connected") from None
            if topic not in self.topics:
                return  # left while waiting
            up: bool = self.up  # re-read after the wait (mypy would keep the narrowing from before it)
            if not up:
                raise EngineUnavailable(f"Redis pub/sub ({self.name}) is not connected")
            if topic in self._restored:
                return  # the (re)connect subscribed it already
        confirmed = self._expect(topic)
        self._send(b"SSUBSCRIBE", topic)
        try:
            await asyncio.wait_for(asyncio.shield(confirmed), self.timeout)
        except TimeoutError:
            raise EngineUnavailable(f"Redis did not confirm a subscription in {self.timeout:g}s") from None

    def unsubscribe(self, topic: bytes) -> None:
        self.topics.discard(topic)
        if self.up:
            self._send(b"SUNSUBSCRIBE", topic)

    # ------------------------------------------------------------ sending
    def _expect(self, topic: bytes) -> asyncio.Future[None]:
        future: asyncio.Future[None] = self.loop.create_future()
        self._confirm.setdefault(topic, deque()).append(future)
        return future

    def _send(self, *command: bytes) -> None:
        """Written at once, so commands reach Redis in the order asked for
        (an unsubscribe never overtakes the subscribe before it). Without a
        connection there is nothing to send: the reconnect subscribes
        ``topics`` as they are then."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(pack_command(command))

    # ------------------------------------------------------------ reading
    async def _run(self) -> None:
        delay = 0.0
        first = True
        while not self._closed:
            protocol = self._protocol = _LinkProtocol(self)
            try:
                self._transport, self._keep = await adopt(self._make, protocol, self.timeout)
                restored = self._restored = set(self.topics)
                waits = [self._expect(topic) for topic in restored]
                for topic in restored:
                    self._send(b"SSUBSCRIBE", topic)
                if waits:
                    await asyncio.wait_for(asyncio.gather(*waits), self.timeout)
                self.up = True
                self._up_event.set()
                delay = 0.0
                if not first:
                    self.reconnects += 1
                    log.info("Redis pub/sub %s reconnected; %d channels resubscribed",
                             self.name, len(restored))
                    self.on_restored(restored)
                first = False
                await protocol.lost
            except (TimeoutError, RedisError, OSError, EngineUnavailable) as exc:
                if self.up:
                    log.warning("Redis pub/sub %s lost: %s", self.name, exc or type(exc).__name__)
            except asyncio.CancelledError:
                self._disconnect()
                raise
            except Exception:  # a bug must not end the link for good: reconnect and repair
                log.exception("Redis pub/sub %s failed; reconnecting", self.name)
            self.up = False
            self._up_event.clear()
            self._fail_confirmations()
            self._disconnect()
            closed: bool = self._closed  # re-read: close() may have run during the awaits
            if closed:
                return
            delay = min(self.backoff_max, max(0.05, delay * 2))
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))

    def _reply(self, reply: Any) -> None:
        """One reply or message from Redis (raises to break the link)."""
        if isinstance(reply, ResponseError):
            log.warning("pub/sub %s: Redis refused a command: %s", self.name, reply)
            self._fail_confirmations(reply)
            return
        kind = reply[0]
        if kind == b"smessage":
            self.on_message(reply[1], reply[2])
        elif kind == b"ssubscribe":
            waiting = self._confirm.get(reply[1])
            if waiting:
                future = waiting.popleft()
                if not waiting:
                    del self._confirm[reply[1]]
                if not future.done():
                    future.set_result(None)
        elif kind == b"sunsubscribe" and reply[1] in self.topics:
            # Not asked for: the slot moved to another node (resharding,
            # failover). Break the link; its reconnect resubscribes, and the
            # engine repairs what was published meanwhile.
            raise EngineUnavailable(f"Redis dropped the subscription of {reply[1]!r}")

    def _fail_confirmations(self, exc: Exception | None = None) -> None:
        error = EngineUnavailable(f"Redis pub/sub ({self.name}): {exc}" if exc else
                                  f"Redis pub/sub ({self.name}) disconnected")
        for waiting in self._confirm.values():
            for future in waiting:
                if not future.done():
                    future.set_exception(error)
                    future.exception()
        self._confirm.clear()

    def _disconnect(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()
        self._keep = None

    async def close(self) -> None:
        self._closed = True
        self._task.cancel()
        try:
            await self._task
        except (asyncio.CancelledError, Exception):
            pass


class _LinkProtocol(asyncio.Protocol):
    """A link's connection once open: replies parsed as they arrive and
    handed to the link in order; ``lost`` ends when the connection does."""

    def __init__(self, link: PubSubLink) -> None:
        self.link = link
        self.reader = Reader()
        self.lost: asyncio.Future[None] = link.loop.create_future()
        self.lost.add_done_callback(lambda lost: lost.cancelled() or lost.exception())  # read by _run, or not

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        handle = self.link._reply
        try:
            while (reply := reader.gets()) is not False:
                handle(reply)
        except Exception as exc:  # the link breaks; its reconnect repairs
            if not self.lost.done():
                self.lost.set_exception(exc)
            if self.link._protocol is self:
                self.link._disconnect()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_exception(ConnectionError(f"Redis pub/sub connection lost: {exc or 'closed'}"))
        if self.link._protocol is self:
            self.link._fail_confirmations()  # a (re)subscribe waiting for Redis learns it at once


class Links:
    """The links of one shard: one for a single Redis, one per primary of a
    cluster (a channel goes to the node that owns its slot)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, client: Redis | RedisCluster,
                 on_message: MessageFn, on_restored: Callable[[set[bytes]], None],
                 timeout: float, backoff_max: float) -> None:
        self.loop = loop
        self.client = client
        self.on_message = on_message
        self.on_restored = on_restored
        self.timeout = timeout
        self.backoff_max = backoff_max
        self.links: dict[str, PubSubLink] = {}
        self._of_topic: dict[bytes, PubSubLink] = {}
        if not isinstance(client, RedisCluster):
            pool = client.connection_pool
            self._single: PubSubLink | None = self._link("redis", pool.connection_class,
                                                         pool.connection_kwargs)
        else:
            self._single = None

    def _link(self, name: str, connection_class: Any, kwargs: dict[str, Any]) -> PubSubLink:
        options = {**kwargs, "socket_timeout": None, "socket_connect_timeout": self.timeout}
        link = PubSubLink(self.loop, lambda: connection_class(**options), self.on_message,
                          self.on_restored, self.timeout, self.backoff_max, name)
        self.links[name] = link
        return link

    def _link_for(self, topic: bytes) -> PubSubLink:
        if self._single is not None:
            return self._single
        link = self._of_topic.get(topic)
        if link is not None:
            return link
        cluster: Any = self.client
        try:
            node = cluster.get_node_from_key(topic)
        except (RedisError, IndexError, KeyError, AttributeError) as exc:
            raise EngineUnavailable(f"Redis Cluster slots unknown: {exc}") from None
        if node is None:
            raise EngineUnavailable("Redis Cluster slots unknown")
        link = self.links.get(node.name) or self._link(node.name, node.connection_class,
                                                        node.connection_kwargs)
        return link

    async def subscribe(self, topic: bytes) -> None:
        link = self._link_for(topic)
        self._of_topic[topic] = link
        await link.subscribe(topic)

    def unsubscribe(self, topic: bytes) -> None:
        link = self._of_topic.pop(topic, None) or self._single
        if link is not None:
            link.unsubscribe(topic)

    @property
    def up(self) -> bool:
        """Every link that carries channels is connected."""
        return all(link.up for link in self.links.values() if link.topics or link is self._single)

    @property
    def reconnects(self) -> int:
        return sum(link.reconnects for link in self.links.values())

    async def close(self) -> None:
        for link in list(self.links.values()):
            await link.close()

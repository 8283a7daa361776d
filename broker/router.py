"""ZeroMQ between the shards of one host (DESIGN.md "Processes").

Per shard:
- XPUB (bound): the publications of the channels this shard is home of, one
  message ``[channel + NUL, epoch, offset, data]``; ZeroMQ filters by topic
  at the sender, so a shard receives only channels it subscribed to.
- SUB (connected to every other shard's XPUB): subscribed to a channel's
  topic on the first local subscriber, unsubscribed on the last.
- requests between shards (forwarded publishes, recovery, history, stats),
  each with a deadline, go over ``broker.peerlink``'s stream sockets, not
  ZeroMQ.
- SUB to the supervisor's status, PUSH to the supervisor's control socket.

Joining a channel's stream without a gap uses the stream itself: the shard
subscribes the channel's topic and then a unique *sync topic*; the home
shard's XPUB sees the sync subscription after the channel's (same pipe, in
order) and answers ON THE PUBLICATION STREAM with the channel's position.
Every publication after that position follows the answer on the same pipe.

Sockets are plain (non-asyncio) pyzmq sockets driven by ``loop.add_reader``
on their FD and drained until EAGAIN, so no future or task is made per message.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import os
import struct
import time
from dataclasses import dataclass
from typing import Any, cast
from collections.abc import Callable

import zmq

from .errors import EngineUnavailable
from .peerlink import RECONNECT_DELAY, PeerLinks

__all__ = ["Endpoints", "Router", "Drain", "topic_of", "SYNC"]

log = logging.getLogger("broker.router")

SYNC = b"\x01"            # first byte of a sync topic (never in a channel name)
_SYNC_HEAD = struct.Struct("!HQ")  # home shard id, nonce
OK = b"ok"
ERR = b"err"


# pyzmq's send_multipart / recv_multipart cost about as much again as the
# sends themselves (type checks, enum flag arithmetic, one getsockopt per
# frame through the sugar layer): the hot path calls the compiled socket
# methods with plain int flags instead.
_zsend = zmq.backend.Socket.send
_zrecv = zmq.backend.Socket.recv
_zget = zmq.backend.Socket.get
_NB = int(zmq.NOBLOCK)
_MORE_NB = int(zmq.SNDMORE) | _NB
_RCVMORE = int(zmq.RCVMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


def send_frames(sock: zmq.Socket[bytes], frames: list[bytes]) -> None:
    """``send_multipart(frames, NOBLOCK)``: all frames or zmq.Again."""
    last = len(frames) - 1
    for i in range(last):
        _zsend(sock, frames[i], _MORE_NB)
    _zsend(sock, frames[last], _NB)


def recv_frames(sock: zmq.Socket[bytes]) -> list[bytes]:
    """``recv_multipart(NOBLOCK)``: one whole message, or zmq.Again."""
    frames = [_zrecv(sock, _NB)]
    while _zget(sock, _RCVMORE):
        frames.append(_zrecv(sock, _NB))
    return frames


def _batch(messages: list[list[bytes]]) -> list[bytes]:
    """One message as itself; several as one: an empty frame, then each
    message's frame count and frames (a request id is never empty)."""
    if len(messages) == 1:
        return messages[0]
    frames = [b""]
    for message in messages:
        frames.append(b"%d" % len(message))
        frames += message
    return frames


def _unbatch(frames: list[bytes]) -> list[list[bytes]]:
    """The messages of ``_batch``'s output."""
    if frames[0] != b"":
        return [frames]
    messages, i = [], 1
    while i < len(frames):
        n = int(frames[i])
        messages.append(frames[i + 1:i + 1 + n])
        i += 1 + n
    return messages


def topic_of(channel: str) -> bytes:
    """The channel's topic: NUL-terminated so ``bill:1`` never matches ``bill:10``."""
    return channel.encode() + b"\x00"


@dataclass
class Endpoints:
    """Where every socket of one host's cluster lives (written by the supervisor)."""

    pub: list[str]
    req: list[str]
    status: str
    control: str

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Endpoints:
        return cls(list(data["pub"]), list(data["req"]), data["status"], data["control"])

    def to_dict(self) -> dict[str, Any]:
        return {"pub": self.pub, "req": self.req, "status": self.status, "control": self.control}


class Drain:
    """Reads every message queued on a socket whenever its FD says so.

    ZeroMQ's FD is edge-triggered: after any send on the socket the read
    state may have changed unseen, so senders call ``kick()``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: zmq.Socket[bytes],
                 handler: Callable[[list[bytes]], None],
                 after: Callable[[], None] | None = None) -> None:
        self.loop, self.sock, self.handler, self.after = loop, sock, handler, after
        self._scheduled = False
        loop.add_reader(cast(int, sock.getsockopt(zmq.FD)), self.run)  # FD and EVENTS are int options

    def kick(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self.run)

    def run(self) -> None:
        self._scheduled = False
        sock, handler = self.sock, self.handler
        if sock.closed:
            return
        try:
            while cast(int, _zget(sock, _EVENTS)) & _POLLIN:  # EVENTS is an int option
                handler(recv_frames(sock))
        except zmq.Again:
            pass
        except zmq.ZMQError as exc:  # pragma: no cover - socket closed under us
            log.debug("drain stopped: %s", exc)
        if self.after is not None:
            self.after()  # what the handled messages produced goes out in one batch

    def close(self) -> None:
        try:
            self.loop.remove_reader(cast(int, self.sock.getsockopt(zmq.FD)))
        except (zmq.ZMQError, ValueError):
            pass


UNREACHABLE_RETRY = RECONNECT_DELAY  # seconds between tries to send requests to a peer that is not connected
RESEND_DELAY = 0.005  # seconds before publications that met a full pipe are tried again
BACKLOG_LIMIT = 100000  # publications waiting for a full pipe before they are dropped (and repaired)


class Router:
    """One shard's ZeroMQ sockets, its request links and the request/response bookkeeping."""

    def __init__(self, shard_id: int, endpoints: Endpoints, loop: asyncio.AbstractEventLoop,
                 high_water_mark: int, request_timeout: float) -> None:
        self.id = shard_id
        self.loop = loop
        self.request_timeout = request_timeout
        self.ctx = zmq.Context()
        self.hwm_drops = 0
        self.requests_failed = 0
        # Publications that met a full pipe wait here, in order, and go out
        # as soon as the pipe takes them (a burst, e.g. a batch of hundreds
        # for one home, outruns a small high-water mark). Past BACKLOG_LIMIT
        # they are dropped and repaired from history; the newest dropped one
        # of each channel is kept and sent again, so a drop at the END of a
        # burst (no later publication to reveal the gap) still reaches
        # followers, who see the jump, repair it and drop the duplicate.
        self._backlog: collections.deque[list[bytes]] = collections.deque()
        self._unsent: dict[bytes, list[bytes]] = {}
        self._resend: asyncio.Handle | None = None
        self.remote_topics: set[bytes] = set()  # topics some other shard subscribed to
        # callbacks set by the cluster engine / shard
        self.on_publication: Callable[[bytes, bytes, int, bytes], None] = lambda *a: None
        self.on_sync_request: Callable[[int, str], tuple[str, int]] = lambda *a: ("", 0)
        self.on_request: Callable[[bytes, list[bytes]], list[bytes]] = lambda *a: [ERR, b"no handler"]
        self.on_status: Callable[[dict[str, Any]], None] = lambda status: None

        # The high-water mark bounds publications (XPUB out, SUB in) only.
        # Subscriptions travel the other way and ZeroMQ drops them silently
        # at a full pipe: a lost one would leave a shard deaf to a channel it
        # believes it follows. They are few (one per channel), so no limit.
        self.xpub = self._socket(zmq.XPUB, high_water_mark, receive_hwm=0)
        self.xpub.setsockopt(zmq.XPUB_NODROP, 1)  # a full peer makes send fail: we count it
        self.xpub.bind(endpoints.pub[shard_id])
        self.sub = self._socket(zmq.SUB, 0, receive_hwm=high_water_mark)
        for peer, address in enumerate(endpoints.pub):
            if peer != shard_id:
                self.sub.connect(address)
        # Requests and their answers go over plain stream sockets the loop
        # reads itself (broker.peerlink): never dropped, no ZeroMQ thread.
        self.links = PeerLinks(shard_id, endpoints.req, loop, self._serve, self._on_reply, self._peer_connected)
        self.status = self._socket(zmq.SUB, 100)
        self.status.setsockopt(zmq.SUBSCRIBE, b"")
        self.status.connect(endpoints.status)
        self.control = self._socket(zmq.PUSH, 100)
        self.control.connect(endpoints.control)

        self._pending: dict[bytes, asyncio.Future[list[bytes]]] = {}
        self._syncs: dict[bytes, asyncio.Future[tuple[str, int]]] = {}
        self._ids = itertools.count(1)
        self._nonce = itertools.count(int.from_bytes(os.urandom(4), "big") << 20)
        self._sub_drain = Drain(loop, self.sub, self._on_sub)
        self._xpub_drain = Drain(loop, self.xpub, self._on_xpub)
        self._outbox: dict[int, list[tuple[list[bytes], float, asyncio.Future[list[bytes]]]]] = {}
        self._send_handle: asyncio.Handle | None = None
        self._drains = [self._sub_drain, self._xpub_drain, Drain(loop, self.status, self._on_status)]

    def _socket(self, kind: int, hwm: int, receive_hwm: int | None = None) -> zmq.Socket[bytes]:
        """A socket with send/receive high-water marks (0 = no limit)."""
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm if receive_hwm is None else receive_hwm)
        return sock

    def close(self) -> None:
        if self._send_handle is not None:
            self._send_handle.cancel()
            self._send_handle = None
        if self._resend is not None:
            self._resend.cancel()
            self._resend = None
        for drain in self._drains:
            drain.close()
        self.links.close()
        futures: list[asyncio.Future[Any]] = [*self._pending.values(), *self._syncs.values()]
        for future in futures:
            if not future.done():
                future.set_exception(EngineUnavailable("shard stopping"))
        self.ctx.destroy(linger=0)

    # --------------------------------------------------------- publications
    def publish(self, channel: str, epoch: str, offset: int, data: bytes) -> None:
        """Send one publication of a channel homed here to subscribed shards."""
        topic = topic_of(channel)
        if topic not in self.remote_topics:
            return  # no other shard subscribed: skip ZeroMQ altogether
        message = [topic, epoch.encode(), b"%d" % offset, data]
        # Sent at the end of the loop turn with the turn's other
        # publications: back to back, they wake ZeroMQ's I/O thread once.
        if len(self._backlog) < BACKLOG_LIMIT:
            self._backlog.append(message)
        else:
            self.hwm_drops += 1  # the receiving shard repairs the gap from history
            self._unsent[topic] = message
        if self._resend is None:
            self._resend = self.loop.call_soon(self._send_waiting)

    def _send_waiting(self) -> None:
        """Send what waits (the backlog in order, then dropped tails) until
        the pipe is full again; come back shortly for the rest."""
        self._resend = None
        try:
            while self._backlog:
                send_frames(self.xpub, self._backlog[0])
                self._unsent.pop(self._backlog.popleft()[0], None)
            for topic, message in list(self._unsent.items()):
                if topic in self.remote_topics:
                    send_frames(self.xpub, message)
                del self._unsent[topic]
        except zmq.Again:
            pass
        if self._backlog or self._unsent:
            self._resend = self.loop.call_later(RESEND_DELAY, self._send_waiting)
        self._xpub_drain.kick()

    def followed(self, channel: str) -> bool:
        """Does another shard follow ``channel`` (its SUB subscribed the
        topic)? As of the subscription messages read so far: call
        ``read_subscriptions()`` first where it matters."""
        return topic_of(channel) in self.remote_topics

    def read_subscriptions(self) -> None:
        """Take in every (un)subscription the XPUB has queued, so that
        ``followed`` is current (the home's sweep asks it)."""
        self._xpub_drain.run()

    def subscribe(self, channel: str) -> None:
        self._sub_option(zmq.SUBSCRIBE, topic_of(channel))

    def unsubscribe(self, channel: str) -> None:
        self._sub_option(zmq.UNSUBSCRIBE, topic_of(channel))

    def _sub_option(self, option: int, topic: bytes) -> None:
        # (Un)subscribing sends on the socket, which can swallow the FD's
        # readable edge: drain once more so nothing waits for the next message.
        self.sub.setsockopt(option, topic)
        self._sub_drain.kick()

    def sync(self, home: int, channel: str) -> asyncio.Future[tuple[str, int]]:
        """Ask ``home`` for the channel's position through the publication stream
        (call after ``subscribe(channel)``); resolves to (epoch, offset)."""
        topic = SYNC + _SYNC_HEAD.pack(home, next(self._nonce)) + channel.encode()
        future: asyncio.Future[tuple[str, int]] = self.loop.create_future()
        self._syncs[topic] = future
        self._sub_option(zmq.SUBSCRIBE, topic)

        def done(_: object) -> None:
            self._syncs.pop(topic, None)
            self._sub_option(zmq.UNSUBSCRIBE, topic)

        future.add_done_callback(done)
        def expire() -> None:
            if not future.done():
                future.set_exception(EngineUnavailable(f"shard {home} did not answer a sync for {channel!r}"))

        timer = self.loop.call_later(self.request_timeout, expire)
        future.add_done_callback(lambda _: timer.cancel())
        return future

    def _on_sub(self, frames: list[bytes]) -> None:
        topic = frames[0]
        if topic[:1] == SYNC:
            future = self._syncs.get(topic)
            if future is not None and not future.done():
                future.set_result((frames[2].decode(), int(frames[3])))
            return
        self.on_publication(topic, frames[1], int(frames[2]), frames[3])

    def _on_xpub(self, frames: list[bytes]) -> None:
        message = frames[0]
        if message[1:2] != SYNC:
            # A channel's first subscriber anywhere (1) or its last leaving (0):
            # XPUB reports each once (not verbose), also when a peer dies.
            if message[:1] == b"\x01":
                self.remote_topics.add(message[1:])
            elif message[:1] == b"\x00":
                self.remote_topics.discard(message[1:])
            return
        if message[:1] != b"\x01":
            return
        topic = message[1:]
        home, _nonce = _SYNC_HEAD.unpack_from(topic, 1)
        if home != self.id:
            return
        self._answer_sync(topic, topic[1 + _SYNC_HEAD.size:].decode(),
                          self.loop.time() + self.request_timeout)

    def _answer_sync(self, topic: bytes, channel: str, give_up: float) -> None:
        """Send the channel's position on the stream. When the asker's pipe is
        full, try again shortly rather than drop it: the position is read at
        the moment it is sent, so it still precedes every later publication."""
        epoch, offset = self.on_sync_request(self.id, channel)
        try:
            self.xpub.send_multipart([topic, b"sync", epoch.encode(), b"%d" % offset], zmq.NOBLOCK)
        except zmq.Again:
            if self.loop.time() < give_up:
                self.loop.call_later(0.002, self._answer_sync, topic, channel, give_up)
            else:
                self.hwm_drops += 1  # the asking shard times out and answers 503
        self._xpub_drain.kick()

    # ------------------------------------------------------------- requests
    # Requests to a peer are sent once per loop turn: what one turn produced
    # for one peer goes out as ONE message (a batch: an empty first frame,
    # then each message as its frame count and its frames), and the answers
    # to one message come back as one, so a busy shard wakes its peer once
    # per turn, not once per publication. Both ends run the same code
    # (requests never cross generations).
    @property
    def peers(self) -> list[int]:
        """The other shards of this generation."""
        return self.links.peers

    async def request(self, peer: int, verb: bytes, *args: bytes,
                      timeout: float | None = None) -> list[bytes]:
        """Send a request to ``peer`` and wait for its answer; EngineUnavailable
        if the peer cannot be reached or does not answer in time."""
        timeout = self.request_timeout if timeout is None else timeout
        deadline = time.time() + timeout
        request_id = b"%d" % next(self._ids)
        future: asyncio.Future[list[bytes]] = self.loop.create_future()
        self._pending[request_id] = future
        self._outbox.setdefault(peer, []).append(([request_id, verb, b"%.3f" % deadline, *args], deadline, future))
        if self._send_handle is None:
            self._send_handle = self.loop.call_soon(self._send_requests)
        timer = self.loop.call_later(timeout, self._expire, future, peer, timeout)
        try:
            reply = await future
        finally:
            timer.cancel()
            self._pending.pop(request_id, None)
        if reply[0] != OK:
            raise EngineUnavailable(reply[1].decode() if len(reply) > 1 else "request failed")
        return reply[1:]

    def _expire(self, future: asyncio.Future[list[bytes]], peer: int, timeout: float) -> None:
        if not future.done():
            self.requests_failed += 1
            future.set_exception(EngineUnavailable(f"shard {peer} did not answer in {timeout:.1f}s"))

    def _send_requests(self) -> None:
        """Send every peer's queued requests, one message per peer. A peer
        that is not connected (down, restarting, or not yet reached) keeps
        its requests; they are tried again shortly until their deadline."""
        self._send_handle = None
        outbox, self._outbox = self._outbox, {}
        retry = False
        for peer, queued in outbox.items():
            queued = [item for item in queued if not item[2].done()]  # expired or cancelled: never sent late
            if not queued:
                continue
            if self.links.send(peer, _batch([message for message, _, _ in queued])):
                continue
            late = time.time() + UNREACHABLE_RETRY
            kept = []
            for item in queued:
                if item[1] < late:
                    self.requests_failed += 1
                    item[2].set_exception(EngineUnavailable(f"shard {peer} is unreachable"))
                else:
                    kept.append(item)
            if kept:
                self._outbox.setdefault(peer, [])[:0] = kept  # before anything queued meanwhile
                retry = True
        if retry and self._send_handle is None:
            self._send_handle = self.loop.call_later(UNREACHABLE_RETRY, self._send_requests)

    def _peer_connected(self, peer: int) -> None:
        """Requests that found no connection to ``peer`` go now, not at the next retry."""
        if self._outbox.get(peer):
            if self._send_handle is not None:
                self._send_handle.cancel()
            self._send_handle = self.loop.call_soon(self._send_requests)

    def _on_reply(self, frames: list[bytes]) -> None:
        for reply in _unbatch(frames):
            future = self._pending.get(reply[0])
            if future is not None and not future.done():
                future.set_result(reply[1:])

    def _serve(self, frames: list[bytes]) -> list[bytes] | None:
        """A peer's request message: the answers, as one message."""
        now = time.time()
        replies = []
        for request_id, verb, deadline, *args in _unbatch(frames):
            if float(deadline) < now:
                continue  # the asker has given up (and answered 503): do not act late
            try:
                result = self.on_request(verb, args)
            except Exception as exc:  # a bad request must not stop the others
                log.exception("request %r failed", verb)
                result = [ERR, str(exc).encode()]
            replies.append([request_id, *result])
        return _batch(replies) if replies else None

    # ------------------------------------------------------------ supervisor
    def _on_status(self, frames: list[bytes]) -> None:
        self.on_status(json.loads(frames[0]))

    def tell_supervisor(self, message: dict[str, Any]) -> None:
        try:
            self.control.send(json.dumps(message).encode(), zmq.NOBLOCK)
        except zmq.Again:
            log.warning("supervisor control queue full; dropped %s", message)

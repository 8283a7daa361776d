"""One shard: the sessions of one process, their subscriptions and
outbound buffers, and the fan-out of publications to them.

The shard deals with sessions through ``broker.adapters.session``: an
adapter (native, Socket.IO) parses its clients' messages and calls
``subscribe`` / ``unsubscribe`` / ``client_publish`` here; the shard tells a
session only what happened to it (a stream lost, a reconnect request, a
close). Connections reach the shard through ``ConnectionHost``: plain HTTP
goes to ``broker.api``, upgrades to the endpoint of their path.

The hot path (``deliver`` → ``_flush``) touches no Python object per
subscriber: for each adapter with subscribers of the channel, the
publication line is encoded once, the adapter's subscription table hands a
uint32 view of session ids to ``OutboundTable.append_many`` (a C loop), and
the C flush writes each dirty session's pending lines as its framing needs.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import socket
import time
from typing import Any

import psutil

from . import api
from ._fastpath import FRAMING_NATIVE, OutboundTable, SubscriptionTable
from .adapters.native.session import NativeEndpoint
from .adapters.session import Adapter, Session, Subscribed
from .adapters.socketio.session import PATH as SOCKETIO_PATH, SocketIOEndpoint
from .adapters.stream.session import StreamEndpoint
from .channels import check_client_publish, check_subscribe
from .config import Config
from .connection import Connection, WebSocketEndpoint
from .engine import Engine, MemoryEngine, Position
from .errors import EngineUnavailable, Overloaded, ProtocolViolation
from .gcpause import GcPauses
from .httpmsg import Request, Response, error_response
from .metrics import PowerHistogram
from .watch import Watch

__all__ = ["Shard"]

log = logging.getLogger("broker.shard")

# Adaptive batching: after a flush that cost T seconds of CPU, the next one
# waits until FLUSH_DUTY * T has passed (bounded by flush_max_window), so
# flushing takes at most 1 / (1 + FLUSH_DUTY) of a busy shard's time.
FLUSH_DUTY = 4.0
# The window opens only when publications arrive fast enough that at least
# one is expected within it (a quiet channel's publication is flushed at
# once); the rate is smoothed over flushes with this weight.
RATE_SMOOTHING = 0.3


class Shard:
    """One worker's sessions and fan-out; implements ``SessionHost`` (for the
    adapters), ``ConnectionHost`` (for connections) and the API's host."""

    def __init__(self, config: Config, shard_id: int = 0, engine: Engine | None = None,
                 loop: asyncio.AbstractEventLoop | None = None, shards: int = 1,
                 ip_table_path: str | None = None) -> None:
        self.config = config
        self.id = shard_id
        self.loop = loop or asyncio.get_event_loop()
        self.engine = engine or MemoryEngine(config)
        self.engine.deliver = self.deliver
        self.engine.lost = self.lose_channel
        self.router: Any = None                 # set by attach_router() in a multi-shard node
        self.cluster_status: dict[str, Any] | None = None
        # One subscription table per adapter: a publication is encoded once
        # per adapter that has subscribers of its channel.
        self._tables: dict[Adapter, SubscriptionTable] = {}
        self.outbound = OutboundTable(config.limits.outbound_buffer_bytes)
        self.sessions: list[Session | None] = []
        self._held: dict[int, float] = {}  # cid -> loop time its transport paused (set_paused)
        self._free_ids: list[int] = []
        self.endpoints: dict[str, WebSocketEndpoint] = {
            "/ws": NativeEndpoint(self),
            "/api/stream": StreamEndpoint(self),
            SOCKETIO_PATH: SocketIOEndpoint(self),
        }
        self.draining = False
        self.retired = False                    # a deploy's newer generation took over
        self.admin_endpoint: str | None = None  # the supervisor's admin socket (broker.admin)
        self._flush_handle: asyncio.Handle | asyncio.TimerHandle | None = None
        self._next_flush = 0.0  # perf_counter time before which an adaptive flush waits
        self._fanouts = 0       # publications delivered since the last flush began
        self._fanout_rate = 0.0  # publications per second, smoothed over flushes
        self._last_flush_start = time.perf_counter()
        self._process = psutil.Process(os.getpid())
        self.node_id = f"{socket.gethostname()}:{config.port}"
        # counters since start
        self.published = 0
        self.delivered = 0
        self.slow_consumers = 0
        self.bad_commands = 0
        self.connections_total = 0
        self.http_requests = 0
        self.http_errors = 0     # 5xx other than 503: a deploy's first wave watches it
        self.flush_latency = PowerHistogram(size=22, unit=1e-6)  # microsecond buckets up to ~2 s
        self.gc_pauses: GcPauses | None = None  # a worker process's collector (not an embedded shard's)
        self._oldest_pending: float | None = None
        self._sweeper: asyncio.TimerHandle | None = self.loop.call_later(
            config.cluster.sweep_interval, self._sweep)
        # Liveness, token expiry, memory levels, connections per IP.
        self.watch = Watch(self, shards, ip_table_path, shard_id)

    # ------------------------------------------------------ connections
    def protocol_factory(self) -> Connection:
        return Connection(self)

    async def handle_http(self, request: Request) -> Response:
        self.http_requests += 1
        # An endpoint that also answers plain HTTP (Socket.IO's long-polling)
        # takes its path; everything else is the API's.
        handler = getattr(self.endpoints.get(request.path), "handle_http", None)
        try:
            response = await (handler(request) if handler is not None else api.handle(self, request))
        except BaseException:
            self.http_errors += 1
            raise
        if response.status >= 500 and response.status != 503:
            self.http_errors += 1  # 503 is back-pressure (fenced, overloaded), not a fault
        if self.retired:  # a newer generation serves: let the client reconnect there
            response.close = True
        return response

    def websocket_endpoint(self, path: str) -> WebSocketEndpoint | None:
        return self.endpoints.get(path)

    def admission_refusal(self, ip: str) -> Response | None:
        if self.draining:
            return error_response(503, "draining: reconnect to another node",
                                  headers=(("Retry-After", "1"),))
        if self.websocket_count >= self.config.limits.max_connections:
            return error_response(503, "too many connections on this shard",
                                  headers=(("Retry-After", "1"),))
        return self.watch.refusal(ip)

    def release(self, ip: str) -> None:
        self.watch.release(ip)

    # --------------------------------------------------------- sessions
    def open_session(self, session: Session, fd: int = -1, framing: int = FRAMING_NATIVE,
                     window_bits: int = 0) -> None:
        cid = self._free_ids.pop() if self._free_ids else len(self.sessions)
        if cid == len(self.sessions):
            self.sessions.append(session)
        else:
            self.sessions[cid] = session
        session.cid = cid
        self.outbound.open(cid, framing)
        if window_bits:
            self.outbound.set_framing(cid, framing, window_bits)
        self.connections_total += 1
        if fd >= 0:
            self.outbound.set_fd(cid, fd)

    def set_framing(self, session: Session, framing: int, window_bits: int = 0) -> None:
        if session.cid >= 0:
            self.outbound.set_framing(session.cid, framing, window_bits)

    def set_fd(self, session: Session, fd: int) -> None:
        """Let the C flush write to the session's socket ``fd`` (owned by its
        transport, never closed here), or stop it (-1)."""
        if session.cid >= 0 and self.outbound.is_open(session.cid):
            self.outbound.set_fd(session.cid, fd)

    def set_paused(self, session: Session, paused: bool) -> None:
        if session.cid >= 0:
            self.outbound.set_paused(session.cid, paused)
            if not paused:
                self._held.pop(session.cid, None)
            elif session.cid not in self._held:
                self._held[session.cid] = self.loop.time()

    def held_back(self, for_at_least: float = 0.0) -> list[Session]:
        """Sessions whose transport has held unsent bytes for at least
        ``for_at_least`` seconds (the client's kernel buffers are full: it
        is not reading as fast as it is sent to)."""
        sessions = self.sessions
        since = self.loop.time() - for_at_least
        return [s for cid, paused_at in self._held.items()
                if paused_at <= since and (s := sessions[cid]) is not None and not s.closing]

    def close_session(self, session: Session) -> None:
        """The close is under way: nothing more is delivered to or queued for
        it, and the C flush forgets its socket (first: the transport may
        close that socket as soon as this returns)."""
        session.closing = True
        if session.cid >= 0 and self.outbound.is_open(session.cid):
            self.outbound.close(session.cid)
            self._forget(self._table(session.adapter).remove_connection(session.cid))

    def session_closed(self, session: Session) -> None:
        cid = session.cid
        if cid < 0:
            return
        self.close_session(session)
        session.cid = -1
        self._held.pop(cid, None)
        self.sessions[cid] = None
        self._free_ids.append(cid)

    def _table(self, adapter: Adapter) -> SubscriptionTable:
        table = self._tables.get(adapter)
        if table is None:
            table = self._tables[adapter] = SubscriptionTable()
        return table

    def local_subscribers(self, channel: str) -> int:
        return sum(table.count(channel) for table in self._tables.values())

    def _forget(self, channels: list[str]) -> None:
        """Tell the engine about channels that just lost their last local subscriber."""
        for channel in channels:
            if self.local_subscribers(channel) == 0:
                self.engine.release(channel)

    @property
    def websocket_count(self) -> int:
        return len(self.outbound)

    # ---------------------------------------------------------- sending
    def queue(self, session: Session, line: bytes) -> None:
        """Queue one line for a session; a full buffer is a slow consumer."""
        if session.cid < 0 or session.closing:
            return
        if not self.outbound.append(session.cid, line):
            self._slow_consumer(session)
            return
        self._schedule_flush()

    def take_frames(self, session: Session) -> bytes:
        """The session's pending lines as its framing writes them (for a
        transport the C flush does not write to: TLS, a resumed one)."""
        return self.outbound.take_frames(session.cid) if session.cid >= 0 else b""

    def take_payload(self, session: Session, sep: bytes = b"\x1e") -> bytes:
        """The session's pending lines joined by ``sep`` (a long-poll answer)."""
        return self.outbound.take_payload(session.cid, sep) if session.cid >= 0 else b""

    def pending_bytes(self, session: Session) -> int:
        return self.outbound.pending(session.cid) if session.cid >= 0 and not session.closing else 0


    def deliver(self, channel: str, offset: int, data_json: bytes) -> None:
        """Fan one publication out to this shard's subscribers of ``channel``."""
        self._fanouts += 1
        for adapter, table in self._tables.items():
            ids = table.subscribers(channel)
            count = len(ids)
            if count == 0:
                continue
            line = adapter.pub_line(channel, offset, data_json)
            overflowed = self.outbound.append_many(ids, line)
            del ids  # the view is valid only until the table changes
            if overflowed:
                overflowed = self._retry_after_flush(overflowed, line)
            self.delivered += count - len(overflowed)
            if self._oldest_pending is None:
                self._oldest_pending = self.loop.time()
            for cid in overflowed:
                session = self.sessions[cid]
                if session is not None and not session.closing:
                    self._slow_consumer(session)
            self._schedule_flush()
        # A burst delivered in one loop turn fills buffers before any flush.
        self.watch.note_pending(self.outbound.total_pending)

    def _retry_after_flush(self, overflowed: list[int], line: bytes) -> list[int]:
        """Buffers full in the middle of a burst (many publications delivered
        in one loop turn, before any flush): write what the sockets take
        now and try again; only a buffer still full is a slow consumer, not
        a client that reads but was not given the chance."""
        self.flush_now()
        outbound = self.outbound
        return [cid for cid in overflowed if outbound.is_open(cid) and not outbound.append(cid, line)]

    def _slow_consumer(self, session: Session) -> None:
        self.slow_consumers += 1
        if session.cid >= 0:
            self.outbound.take(session.cid)  # drop what it could not take
        session.close(1013, "slow consumer: outbound buffer full")

    def shed(self, session: Session, reason: str) -> None:
        """End ``session`` to free memory (degradation level 2): its queued
        bytes are dropped (not flushed into the transport), the close frame
        (1013) is written and the connection dropped at once, with what its
        transport still held: the client is not reading, so it would keep
        those bytes in memory for the whole close grace and could not reach
        the close frame behind them anyway."""
        if session.cid >= 0:
            self.outbound.take(session.cid)
        session.close(1013, reason)
        session.abort()

    def _schedule_flush(self) -> None:
        if self._flush_handle is None:
            interval = self.config.flush_interval
            if interval > 0:
                self._flush_handle = self.loop.call_later(interval, self._flush)
                return
            # Adaptive batching: an idle shard flushes at the end of this loop
            # turn; one whose last flush was recent waits until its window
            # (proportional to what that flush cost) has passed, so under load
            # more lines share each write, and a quiet shard adds no delay.
            wait = self._next_flush - time.perf_counter()
            self._flush_handle = (self.loop.call_later(wait, self._flush) if wait > 0
                                  else self.loop.call_soon(self._flush))

    def _flush(self) -> None:
        cpu_started = time.thread_time()
        began = time.perf_counter()
        elapsed = began - self._last_flush_start
        if elapsed > 0:
            self._fanout_rate += RATE_SMOOTHING * (self._fanouts / elapsed - self._fanout_rate)
        self._fanouts = 0
        self._last_flush_start = began
        self._flush_handle = None
        if self._oldest_pending is not None:
            self.flush_latency.observe(self.loop.time() - self._oldest_pending)
            self._oldest_pending = None
        sessions = self.sessions
        # One C pass writes the frames of every session it can, whatever its
        # framing and compression; what it cannot (a session without a
        # socket it may write to, a long-poll, a partial write) comes back.
        deferred, tails = self.outbound.flush()
        for cid in deferred:
            session = sessions[cid]
            if session is not None:
                session.write_pending()
        for cid, rest in tails:
            session = sessions[cid]
            if session is not None:
                session.write_tail(rest)
        self.watch.note_pending(self.outbound.total_pending)
        # The window follows what the flush cost in CPU (user + kernel), not
        # in wall time: on a shared machine a flush preempted halfway would
        # otherwise open a long window for a shard that is not busy at all.
        cost = time.thread_time() - cpu_started
        window = min(self.config.flush_max_window, FLUSH_DUTY * cost)
        if self._fanout_rate * window < 1.0:
            window = 0.0  # fewer than one publication expected within it: waiting batches nothing
        self._next_flush = time.perf_counter() + window

    def flush_now(self) -> int:
        """Flush at once, not at the end of the loop turn (a burst of
        deliveries fills every buffer alike: only what clients did not take
        should count); returns the bytes still pending."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._flush()
        pending: int = self.outbound.total_pending
        return pending

    def flush_session(self, session: Session, force: bool = False) -> None:
        """Write one session's pending lines now (resume, close, drain)."""
        cid = session.cid
        if cid >= 0 and self.outbound.is_open(cid) and self.outbound.pending(cid):
            session.write_pending(force)

    # -------------------------------------------------------- commands
    async def subscribe(self, session: Session, channel: str,
                        recover: tuple[str, int] | None = None) -> Subscribed:
        check_subscribe(self.config, session.identity, channel)
        table = self._table(session.adapter)
        if table.is_subscribed(session.cid, channel):
            raise ProtocolViolation(409, f"already subscribed to {channel!r}")
        limit = self.config.limits.subscriptions_per_connection
        if len(table.channels_of(session.cid)) >= limit:
            raise ProtocolViolation(429, f"at most {limit} subscriptions per connection")
        if not self.engine.ready():
            raise EngineUnavailable("cannot subscribe now")
        # The memory engine answers without suspending, so nothing can be
        # published between reading the position and joining the table: the
        # reply's offset and the first live publication are contiguous. The
        # adapter queues the reply and the missed publications as soon as
        # this returns, before the loop runs anything else.
        if recover is None:
            outcome = Subscribed(await self.engine.position(channel))
        else:
            recovery = await self.engine.recover(channel, *recover)
            outcome = Subscribed(recovery.position, recovery.recovered, recovery.publications)
        if session.closing or session.cid < 0:
            raise EngineUnavailable("the session closed while subscribing")
        if not table.add(session.cid, channel):
            raise ProtocolViolation(409, f"already subscribed to {channel!r}")
        return outcome

    def unsubscribe(self, session: Session, channel: str) -> None:
        if session.cid >= 0 and self._table(session.adapter).remove(session.cid, channel):
            self._forget([channel])

    async def client_publish(self, session: Session, channel: str, data_json: bytes) -> Position:
        check_client_publish(self.config, session.identity, channel)
        return await self.publish(channel, data_json)

    def lose_channel(self, channel: str, reason: str) -> None:
        """The channel's stream cannot continue here: every local subscriber is
        told (PROTOCOL.md "Lost stream") and dropped; they resubscribe with recover."""
        for table in self._tables.values():
            for cid in list(table.subscribers(channel)):
                session = self.sessions[cid]
                table.remove(cid, channel)
                if session is not None:
                    session.stream_lost(channel, reason)

    async def publish_many(self, items: list[tuple[str, bytes]]) -> list[Position]:
        """Many publications at once (a broadcast, a batch): the engine sends
        each home shard its items in one message."""
        if self.watch.level >= 3:
            raise Overloaded("the shard is over its memory budget; publishing is refused")
        positions = await self.engine.publish_many(items)
        self.published += len(items)
        return positions

    async def publish(self, channel: str, data_json: bytes) -> Position:
        """Sequence, store and deliver one publication (from the API or a client)."""
        if self.watch.level >= 3:
            raise Overloaded("the shard is over its memory budget; publishing is refused")
        position = await self.engine.publish(channel, data_json)
        self.published += 1
        return position

    # ------------------------------------------------------------ drain
    async def drain(self, timeout: float) -> None:
        """Ask every client to reconnect elsewhere, flush, close with 1012."""
        self.draining = True
        after_ms = 500
        for session in list(self.sessions):
            if session is not None and not session.closing:
                session.reconnect("server shutting down", after_ms)
        deadline = self.loop.time() + timeout
        while self.websocket_count and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            if session is not None:
                session.abort()

    def subscribed_channels(self) -> set[str]:
        """Every channel with a subscriber on this shard."""
        return {channel for table in self._tables.values() for channel in table.channels()}

    async def migrate(self, wave_size: int, interval: float, max_after_ms: int) -> int:
        """A deploy's paced migration: ask ``wave_size`` clients per
        ``interval`` seconds to reconnect (each after a random 0..max_after_ms,
        so a wave's reconnects spread out), until none is left; returns how
        many were asked. New upgrades are refused meanwhile (503)."""
        self.draining = self.retired = True
        asked = 0
        while True:
            live = [s for s in self.sessions if s is not None and not s.closing]
            if not live:
                return asked
            for session in live[:wave_size]:
                session.reconnect("deploy: a new generation serves",
                                  random.randint(0, min(max_after_ms, 30000)))
                asked += 1
            if len(live) <= wave_size:
                return asked
            await asyncio.sleep(interval)

    def close(self) -> None:
        self.watch.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None

    def _sweep(self) -> None:
        self.engine.sweep(lambda channel: self.local_subscribers(channel) > 0)
        self._sweeper = self.loop.call_later(self.config.cluster.sweep_interval, self._sweep)

    # ------------------------------------------------------------ cluster
    def attach_router(self, router: Any) -> None:
        """Join the node's other shards (see broker.router)."""
        self.router = router
        router.on_status = self._on_status
        self.engine.stats_provider = self.stats  # type: ignore[attr-defined]  # ClusterEngine

    def _on_status(self, status: dict[str, Any]) -> None:
        previous = self.cluster_status
        self.cluster_status = status
        if previous is None:
            return
        old_pids = {s["id"]: s["pid"] for s in previous["shards"]}
        for shard in status["shards"]:
            if shard["id"] != self.id and shard["up"] and old_pids.get(shard["id"]) != shard["pid"]:
                self.engine.resync_home(shard["id"])

    def not_ready_reason(self) -> str | None:
        """Why /readyz is 503, or None when this node accepts traffic."""
        if self.draining:
            return "draining"
        if self.retired:
            return "retiring: a newer generation serves"
        if self.watch.level >= 3:
            return "over the memory budget (degradation level 3)"
        if not self.engine.ready():
            return "engine unreachable"
        if self.router is not None:
            status = self.cluster_status
            if status is None:
                return "waiting for the supervisor"
            if status.get("draining"):
                return "draining"
            down = [s["id"] for s in status["shards"] if not s["up"]]
            if down:
                return f"shard(s) {', '.join(map(str, down))} down"
        return None

    async def cluster_stats(self) -> list[dict[str, Any]]:
        """Every shard's stats: this one's, and the others' over ZeroMQ."""
        if self.router is None:
            return [self.stats()]
        status = {s["id"]: s for s in (self.cluster_status or {"shards": []})["shards"]}
        peers = self.router.peers

        async def ask(peer: int) -> dict[str, Any]:
            try:
                if not status.get(peer, {}).get("up", True):
                    raise EngineUnavailable("down")  # the supervisor knows: don't wait for it
                (raw,) = await self.router.request(peer, b"STATS", timeout=1.0)
                answer: dict[str, Any] = json.loads(raw)
                return answer
            except Exception:
                known = status.get(peer, {})
                return {"id": peer, "pid": known.get("pid", 0), "up": False, "connections": 0,
                        "subscriptions": 0, "channels": 0, "published": 0, "delivered": 0,
                        "rss_bytes": 0, "degradation": 0}

        others = await asyncio.gather(*(ask(peer) for peer in peers))
        return sorted([self.stats(), *others], key=lambda s: s["id"])

    # ------------------------------------------------------------ stats
    def stats(self) -> dict[str, Any]:
        try:
            rss = self._process.memory_info().rss
        except psutil.Error:
            rss = 0
        return {
            "id": self.id,
            "pid": os.getpid(),
            "up": True,
            "draining": self.draining,
            "connections": self.websocket_count,
            "subscriptions": sum(table.subscriptions for table in self._tables.values()),
            "channels": len({channel for table in self._tables.values() for channel in table.channels()}),
            "published": self.published,
            "delivered": self.delivered,
            "slow_consumers": self.slow_consumers,
            "bad_commands": self.bad_commands,
            "frames_out": self.outbound.frames_written,
            "bytes_out": self.outbound.bytes_written,
            "connections_total": self.connections_total,
            "rss_bytes": rss,
            "degradation": self.watch.level,
            "memory_limit_bytes": self.watch.budget_bytes,
            "memory_cuts": self.watch.cut_for_memory,
            "upgrades_refused_memory": self.watch.refused_for_memory,
            "upgrades_refused_per_ip": self.watch.refused_per_ip,
            "upgrades_refused_fds": self.watch.fd_refusals.count,
            "websocket_capacity": self.watch.websocket_capacity,
            "engine": self.engine.stats(),
            "batch_lines": PowerHistogram.from_counts(self.outbound.batch_histogram(),
                                                      self.outbound.lines_written),
            "flush_latency": self.flush_latency.snapshot(),
            **({"gc_pauses": self.gc_pauses.histogram.snapshot(),
                "gc_full_collections": self.gc_pauses.full_collections} if self.gc_pauses else {}),
        }

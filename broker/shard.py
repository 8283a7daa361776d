"""One shard: the connections of one process, their subscriptions and
outbound buffers, and the fan-out of publications to them.

The hot path (``deliver`` → ``_flush``) touches no Python object per
subscriber: the subscription table hands a uint32 view of connection ids to
``OutboundTable.append_many`` (a C loop), and the flush turns each dirty
connection's pending lines into one frame built once per distinct batch.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from typing import Any

import psutil

from ._fastpath import Deflater, OutboundTable, SharedFrames, SubscriptionTable
from .channels import check_client_publish, check_subscribe
from .config import Config
from .connection import Connection
from .engine import Engine, MemoryEngine
from .errors import EngineUnavailable, ProtocolViolation
from .httpmsg import Response, error_response
from .metrics import PowerHistogram
from .protocol import BadCommandBudget, Command, error_line, parse_message, pub_line, reply_line

__all__ = ["Shard"]

log = logging.getLogger("broker.shard")

SWEEP_INTERVAL = 30.0  # seconds between idle-channel sweeps


class Shard:
    def __init__(self, config: Config, shard_id: int = 0, engine: Engine | None = None,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.config = config
        self.id = shard_id
        self.loop = loop or asyncio.get_event_loop()
        self.engine = engine or MemoryEngine(config)
        self.engine.deliver = self.deliver
        self.engine.lost = self.lose_channel
        self.router: Any = None                 # set by attach_router() in a multi-shard node
        self.cluster_status: dict[str, Any] | None = None
        self.subs = SubscriptionTable()
        self.outbound = OutboundTable(config.limits.outbound_buffer_bytes)
        self._frames: dict[int, Any] = {}  # window bits -> SharedFrames
        self.conns: list[Connection | None] = []
        self._free_ids: list[int] = []
        self._budgets: dict[int, BadCommandBudget] = {}
        self.draining = False
        self._flush_handle: asyncio.Handle | asyncio.TimerHandle | None = None
        self._process = psutil.Process(os.getpid())
        self.node_id = f"{socket.gethostname()}:{config.port}"
        # counters since start
        self.published = 0
        self.delivered = 0
        self.slow_consumers = 0
        self.bad_commands = 0
        self.connections_total = 0
        self.flush_latency = PowerHistogram(size=22, unit=1e-6)  # microsecond buckets up to ~2 s
        self._oldest_pending: float | None = None
        self._sweeper: asyncio.TimerHandle | None = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    # ------------------------------------------------------ connections
    def protocol_factory(self) -> Connection:
        return Connection(self)

    def admission_refusal(self) -> Response | None:
        if self.draining:
            return error_response(503, "draining: reconnect to another node",
                                  headers=(("Retry-After", "1"),))
        if self.websocket_count >= self.config.limits.max_connections:
            return error_response(503, "too many connections on this shard",
                                  headers=(("Retry-After", "1"),))
        return None

    def websocket_opened(self, conn: Connection) -> None:
        cid = self._free_ids.pop() if self._free_ids else len(self.conns)
        if cid == len(self.conns):
            self.conns.append(conn)
        else:
            self.conns[cid] = conn
        conn.cid = cid
        self.outbound.open(cid)
        self.connections_total += 1
        if not conn.deflate and conn.transport is not None:
            # flush() writes this connection's frames itself, on a dup of
            # the socket: the dup stays valid until connection_closed closes
            # it, so a socket number reused by a new connection in between is
            # never written to by mistake.
            sock = conn.transport.get_extra_info("socket")
            if sock is not None:
                conn.fd = os.dup(sock.fileno())
                self.outbound.set_fd(cid, conn.fd)
        self.outbound.set_paused(cid, conn.paused)

    def connection_closing(self, conn: Connection) -> None:
        """The close frame is out: nothing more is delivered to or queued for it."""
        if conn.cid >= 0:
            self._forget(self.subs.remove_connection(conn.cid))
            self.outbound.close(conn.cid)

    def _forget(self, channels: list[str]) -> None:
        """Tell the engine about channels that just lost their last local subscriber."""
        for channel in channels:
            if self.subs.count(channel) == 0:
                self.engine.release(channel)

    def connection_closed(self, conn: Connection) -> None:
        cid = conn.cid
        if cid < 0:
            return
        self.connection_closing(conn)
        conn.cid = -1
        if conn.fd >= 0:
            os.close(conn.fd)
            conn.fd = -1
        self._budgets.pop(cid, None)
        self.conns[cid] = None
        self._free_ids.append(cid)

    @property
    def websocket_count(self) -> int:
        return len(self.outbound)

    # ---------------------------------------------------------- sending
    def send(self, conn: Connection, line: bytes) -> None:
        """Queue one line for a connection; a full buffer is a slow consumer."""
        if conn.cid < 0 or conn.closing:
            return
        if not self.outbound.append(conn.cid, line):
            self._slow_consumer(conn)
            return
        self._schedule_flush()

    def deliver(self, channel: str, offset: int, data_json: bytes) -> None:
        """Fan one publication out to this shard's subscribers of ``channel``."""
        ids = self.subs.subscribers(channel)
        count = len(ids)
        if count == 0:
            return
        overflowed = self.outbound.append_many(ids, pub_line(channel, offset, data_json))
        del ids  # the view is valid only until the table changes
        self.delivered += count - len(overflowed)
        if self._oldest_pending is None:
            self._oldest_pending = self.loop.time()
        for cid in overflowed:
            conn = self.conns[cid]
            if conn is not None and not conn.closing:
                self._slow_consumer(conn)
        self._schedule_flush()

    def _slow_consumer(self, conn: Connection) -> None:
        self.slow_consumers += 1
        if conn.cid >= 0:
            self.outbound.take(conn.cid)  # drop what it could not take
        conn.close(1013, "slow consumer: outbound buffer full")

    def _schedule_flush(self) -> None:
        if self._flush_handle is None:
            interval = self.config.flush_interval
            self._flush_handle = (self.loop.call_later(interval, self._flush) if interval > 0
                                  else self.loop.call_soon(self._flush))

    def _frames_for(self, window_bits: int):
        frames = self._frames.get(window_bits)
        if frames is None:
            frames = self._frames[window_bits] = SharedFrames(Deflater(6, window_bits))
        return frames

    def _flush(self) -> None:
        self._flush_handle = None
        if self._oldest_pending is not None:
            self.flush_latency.observe(self.loop.time() - self._oldest_pending)
            self._oldest_pending = None
        conns = self.conns
        # One C pass writes the frames of every connection it can; what it
        # cannot (compressed connections, paused transports, partial writes)
        # comes back here.
        deferred, tails = self.outbound.flush()
        for cid in deferred:
            conn = conns[cid]
            if conn is not None and not conn.paused:
                self._write_pending(conn)
        for cid, rest in tails:
            conn = conns[cid]
            if conn is None or conn.transport is None:
                continue
            if rest is None:  # the socket failed: the transport will report it
                conn.transport.abort()
            else:
                conn.transport.write(rest)  # pauses it until the kernel took it all
        for frames in self._frames.values():
            frames.clear()

    def _write_pending(self, conn: Connection) -> None:
        payload = self.outbound.take(conn.cid)
        if not payload or conn.transport is None:
            return
        frame = self._frames_for(conn.window_bits).batch_frame(payload, conn.deflate)
        conn.transport.write(frame)
        self.outbound.count_frame(len(frame), payload.count(b"\n"))

    def flush_connection(self, conn: Connection, force: bool = False) -> None:
        """Write one connection's pending lines now (resume, close, drain)."""
        if conn.cid >= 0 and (force or not conn.paused) and self.outbound.pending(conn.cid):
            self._write_pending(conn)

    # --------------------------------------------------------- commands
    async def handle_message(self, conn: Connection, text: str) -> None:
        for item in parse_message(text):
            if conn.closing:
                return
            if isinstance(item, ProtocolViolation):
                self._bad_command(conn, getattr(item, "command_id", None), item)
                continue
            try:
                await self._command(conn, item)
            except ProtocolViolation as exc:
                if exc.code == 400:
                    self._bad_command(conn, item.id, exc)
                else:
                    self.send(conn, error_line(item.id, exc.code, exc.message))
            except EngineUnavailable as exc:
                self.send(conn, error_line(item.id, 503, f"engine unavailable: {exc}"))

    def _bad_command(self, conn: Connection, command_id: int | None, exc: ProtocolViolation) -> None:
        self.bad_commands += 1
        self.send(conn, error_line(command_id, exc.code, exc.message))
        limits = self.config.limits
        budget = self._budgets.get(conn.cid)
        if budget is None:
            budget = self._budgets[conn.cid] = BadCommandBudget(limits.bad_command_budget,
                                                                 limits.bad_command_window)
        if budget.spend(time.monotonic()):
            conn.close(1008, "too many bad commands")

    async def _command(self, conn: Connection, cmd: Command) -> None:
        op = cmd.op
        if op == "ping":
            self.send(conn, reply_line(cmd.id, "pong"))
        elif op == "subscribe":
            await self._subscribe(conn, cmd)
        elif op == "unsubscribe":
            assert cmd.channel is not None
            if self.subs.remove(conn.cid, cmd.channel):
                self._forget([cmd.channel])
            self.send(conn, reply_line(cmd.id, "unsubscribed", channel=cmd.channel))
        elif op == "publish":
            assert cmd.channel is not None and cmd.data_json is not None
            check_client_publish(self.config, conn.identity, cmd.channel)
            position = await self.publish(cmd.channel, cmd.data_json)
            self.send(conn, reply_line(cmd.id, "published", channel=cmd.channel,
                                       offset=position.offset))

    async def _subscribe(self, conn: Connection, cmd: Command) -> None:
        channel = cmd.channel
        assert channel is not None
        check_subscribe(self.config, conn.identity, channel)
        if self.subs.is_subscribed(conn.cid, channel):
            raise ProtocolViolation(409, f"already subscribed to {channel!r}")
        if not self.engine.ready():
            raise EngineUnavailable("cannot subscribe now")
        # The memory engine answers without suspending, so nothing can be
        # published between reading the position and joining the table:
        # the reply's offset and the first live publication are contiguous.
        if cmd.recover is None:
            position = await self.engine.position(channel)
            missed: list[tuple[int, bytes]] = []
            extra: dict[str, Any] = {}
        else:
            recovery = await self.engine.recover(channel, *cmd.recover)
            position, missed = recovery.position, recovery.publications
            extra = {"recovered": recovery.recovered}
        if conn.closing or conn.cid < 0:
            return
        if not self.subs.add(conn.cid, channel):
            raise ProtocolViolation(409, f"already subscribed to {channel!r}")
        self.send(conn, reply_line(cmd.id, "subscribed", channel=channel, epoch=position.epoch,
                                   offset=position.offset, **extra))
        for offset, data_json in missed:
            self.send(conn, pub_line(channel, offset, data_json))

    def lose_channel(self, channel: str, reason: str) -> None:
        """The channel's stream cannot continue here: every local subscriber is
        told (PROTOCOL.md "Lost stream") and dropped; they resubscribe with recover."""
        line = reply_line(None, "unsubscribed", channel=channel, reason=reason)
        for cid in list(self.subs.subscribers(channel)):
            conn = self.conns[cid]
            self.subs.remove(cid, channel)
            if conn is not None:
                self.send(conn, line)

    async def publish(self, channel: str, data_json: bytes):
        """Sequence, store and deliver one publication (from the API or a client)."""
        position = await self.engine.publish(channel, data_json)
        self.published += 1
        return position

    # ------------------------------------------------------------ drain
    async def drain(self, timeout: float) -> None:
        """Ask every client to reconnect elsewhere, flush, close with 1012."""
        self.draining = True
        after_ms = 500
        line = reply_line(None, "reconnect", reason="server shutting down", after_ms=after_ms)
        for conn in list(self.conns):
            if conn is not None and not conn.closing:
                self.send(conn, line)
                conn.close(1012, "server restart")
        deadline = self.loop.time() + timeout
        while self.websocket_count and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.conns):
            if conn is not None and conn.transport is not None:
                conn.transport.abort()

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None

    def _sweep(self) -> None:
        self.engine.sweep(lambda channel: self.subs.count(channel) > 0)
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

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
        peers = sorted(self.router.dealers)

        async def ask(peer: int) -> dict[str, Any]:
            try:
                if not status.get(peer, {}).get("up", True):
                    raise EngineUnavailable("down")  # the supervisor knows: don't wait for it
                (raw,) = await self.router.request(peer, b"STATS", timeout=1.0)
                return json.loads(raw)
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
            "subscriptions": self.subs.subscriptions,
            "channels": len(self.subs),
            "published": self.published,
            "delivered": self.delivered,
            "slow_consumers": self.slow_consumers,
            "bad_commands": self.bad_commands,
            "frames_out": self.outbound.frames_written,
            "bytes_out": self.outbound.bytes_written,
            "connections_total": self.connections_total,
            "rss_bytes": rss,
            "degradation": 0,
            "engine": self.engine.stats(),
            "batch_lines": PowerHistogram.from_counts(self.outbound.batch_histogram(),
                                                      self.outbound.lines_written),
            "flush_latency": self.flush_latency.snapshot(),
        }

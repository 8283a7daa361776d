"""The native protocol's adapter (PROTOCOL.md §1): one session per WebSocket.

``NativeEndpoint`` accepts upgrades at ``/ws``; each becomes a
``NativeSession`` that turns NDJSON commands into calls on the shard
(``SessionHost``) and the shard's answers and events into NDJSON lines.
Publications are encoded once per shard by ``NativeAdapter.pub_line``.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, ClassVar

from ...errors import EngineUnavailable, ProtocolViolation
from ...features import is_on
from ...handshake import Accepted, negotiate
from ...httpmsg import Request, Response
from ..session import Adapter, Session, SessionHost
from .protocol import BadCommandBudget, Command, error_line, parse_message, pub_line, reply_line

if TYPE_CHECKING:
    from ...connection import Connection

__all__ = ["NativeAdapter", "NativeEndpoint", "NativeSession"]


class NativeAdapter(Adapter):
    name: ClassVar[str] = "native"

    def pub_line(self, channel: str, offset: int, data_json: bytes) -> bytes:
        return pub_line(channel, offset, data_json)


NATIVE = NativeAdapter()


class NativeEndpoint:
    """``/ws``: the RFC 6455 handshake with the native protocol's auth rules."""

    def __init__(self, host: SessionHost) -> None:
        self.host = host

    def negotiate(self, request: Request) -> Accepted | Response:
        return negotiate(request, self.host.config)

    def open(self, conn: "Connection", accepted: Accepted) -> "NativeSession":
        session = NativeSession(self.host, conn, accepted)
        # The C flush writes plain frames to a dup of the socket itself;
        # compressed connections go through write_pending for now, and so do
        # those the "direct_write" switch leaves out.
        direct = not conn.deflate and is_on(self.host.config, "direct_write", accepted.rollout_key)
        self.host.open_session(session, fd=conn.dup_fd() if direct else -1)
        self.host.set_paused(session, conn.paused)
        return session


class NativeSession(Session):
    """One native WebSocket client."""

    __slots__ = ("host", "conn", "_budget")

    adapter: ClassVar[Adapter] = NATIVE

    def __init__(self, host: SessionHost, conn: "Connection", accepted: Accepted) -> None:
        super().__init__(accepted.identity)
        self.host = host
        self.conn = conn
        self._budget: BadCommandBudget | None = None

    # ------------------------------------------------ from the connection
    async def handle_text(self, text: str) -> None:
        """One text message: its commands in order, each answered in order."""
        for item in parse_message(text):
            if self.closing:
                return
            if isinstance(item, ProtocolViolation):
                self._bad_command(getattr(item, "command_id", None), item)
                continue
            try:
                await self._command(item)
            except ProtocolViolation as exc:
                if exc.code == 400:
                    self._bad_command(item.id, exc)
                else:
                    self.host.queue(self, error_line(item.id, exc.code, exc.message))
            except EngineUnavailable as exc:
                self.host.queue(self, error_line(item.id, 503, f"engine unavailable: {exc}"))

    def wire_paused(self, paused: bool) -> None:
        self.host.set_paused(self, paused)
        if not paused:
            self.host.flush_session(self)

    def wire_flush(self) -> None:
        self.host.flush_session(self, force=True)

    def wire_closing(self) -> None:
        self.closing = True
        self.host.close_session(self)

    def wire_lost(self) -> None:
        self.closing = True
        self.host.session_closed(self)

    # ---------------------------------------------------------- commands
    def _bad_command(self, command_id: int | None, exc: ProtocolViolation) -> None:
        self.host.bad_commands += 1
        self.host.queue(self, error_line(command_id, exc.code, exc.message))
        if self._budget is None:
            limits = self.host.config.limits
            self._budget = BadCommandBudget(limits.bad_command_budget, limits.bad_command_window)
        if self._budget.spend(time.monotonic()):
            self.close(1008, "too many bad commands")

    async def _command(self, cmd: Command) -> None:
        op = cmd.op
        if op == "ping":
            self.host.queue(self, reply_line(cmd.id, "pong"))
        elif op == "subscribe":
            assert cmd.channel is not None
            outcome = await self.host.subscribe(self, cmd.channel, cmd.recover)
            extra: dict[str, Any] = {} if outcome.recovered is None else {"recovered": outcome.recovered}
            self.host.queue(self, reply_line(cmd.id, "subscribed", channel=cmd.channel,
                                             epoch=outcome.position.epoch,
                                             offset=outcome.position.offset, **extra))
            for offset, data_json in outcome.missed:
                self.host.queue(self, pub_line(cmd.channel, offset, data_json))
        elif op == "unsubscribe":
            assert cmd.channel is not None
            self.host.unsubscribe(self, cmd.channel)
            self.host.queue(self, reply_line(cmd.id, "unsubscribed", channel=cmd.channel))
        elif op == "publish":
            assert cmd.channel is not None and cmd.data_json is not None
            position = await self.host.client_publish(self, cmd.channel, cmd.data_json)
            self.host.queue(self, reply_line(cmd.id, "published", channel=cmd.channel,
                                             offset=position.offset))

    # ------------------------------------------------- events from the shard
    def stream_lost(self, channel: str, reason: str) -> None:
        self.host.queue(self, reply_line(None, "unsubscribed", channel=channel, reason=reason))

    def reconnect(self, reason: str, after_ms: int) -> None:
        self.host.queue(self, reply_line(None, "reconnect", reason=reason, after_ms=after_ms))
        self.close(1012, "server restart")

    def close(self, code: int, reason: str) -> None:
        self.conn.close(code, reason)

    def abort(self) -> None:
        if self.conn.transport is not None:
            self.conn.transport.abort()

    def write_pending(self, force: bool = False) -> None:
        conn = self.conn
        if (conn.paused and not force) or conn.transport is None:
            return
        payload = self.host.take_pending(self)
        if payload:
            conn.transport.write(self.host.batch_frame(payload, conn.deflate, conn.window_bits))

    def write_tail(self, rest: bytes | None) -> None:
        transport = self.conn.transport
        if transport is None:
            return
        if rest is None:  # the socket failed: the transport will report it
            transport.abort()
        else:
            transport.write(rest)  # pauses it until the kernel took it all

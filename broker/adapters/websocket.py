"""What every session that lives on one WebSocket connection shares: the
connection's events (paused, closing, lost) mapped onto the shard, the
output the C flush left to Python, close and abort, and the bad-command
budget (PROTOCOL.md §1: errors in NDJSON, then 1008 when they persist).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..errors import ProtocolViolation
from ..handshake import Accepted
from .native.protocol import BadCommandBudget, error_line, reply_line
from .session import Session, SessionHost

if TYPE_CHECKING:
    from ..connection import Connection

__all__ = ["WebSocketSession"]


class WebSocketSession(Session):
    """A session bound to one WebSocket connection for its whole life."""

    __slots__ = ("host", "conn", "_budget")

    def __init__(self, host: SessionHost, conn: "Connection", accepted: Accepted) -> None:
        super().__init__(accepted.identity)
        self.host = host
        self.conn = conn
        self._budget: BadCommandBudget | None = None

    def start(self) -> None:
        """Join the shard: the C flush writes plain frames to a dup of the
        socket itself; compressed connections go through write_pending."""
        self.host.open_session(self, fd=-1 if self.conn.deflate else self.conn.dup_fd())
        self.host.set_paused(self, self.conn.paused)

    # ------------------------------------------------ from the connection
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

    # -------------------------------------------------------- errors
    def bad_command(self, command_id: int | None, exc: ProtocolViolation) -> None:
        """Answer a bad command; too many in the window close with 1008."""
        self.host.bad_commands += 1
        self.host.queue(self, error_line(command_id, exc.code, exc.message))
        if self._budget is None:
            limits = self.host.config.limits
            self._budget = BadCommandBudget(limits.bad_command_budget, limits.bad_command_window)
        if self._budget.spend(time.monotonic()):
            self.close(1008, "too many bad commands")

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

"""What every session that lives on one WebSocket connection shares: the
connection's events (paused, closing, lost) mapped onto the shard, the
output the C flush left to Python, close and abort, and the bad-command
budget (PROTOCOL.md §1: errors in NDJSON, then 1008 when they persist).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .._fastpath import FRAMING_NATIVE
from ..errors import ProtocolViolation
from ..features import is_on
from ..handshake import Accepted
from ..pressure import TokenBucket
from ..tls import is_tls
from .native.protocol import BadCommandBudget, error_line, reply_line
from .session import Session, SessionHost

if TYPE_CHECKING:
    from ..connection import Connection

__all__ = ["WebSocketSession"]


class WebSocketSession(Session):
    """A session bound to one WebSocket connection for its whole life."""

    __slots__ = ("host", "conn", "_budget", "_bucket", "_direct")

    def __init__(self, host: SessionHost, conn: Connection, accepted: Accepted) -> None:
        super().__init__(accepted.identity)
        self.host = host
        self.conn = conn
        # Feature flag "direct_write" (broker.features): off, every frame goes
        # through the transport instead of the C flush's direct write.
        self._direct = is_on(host.config, "direct_write", accepted.rollout_key)
        self._budget: BadCommandBudget | None = None
        self._bucket: TokenBucket | None = None

    def start(self) -> None:
        """Join the shard: the C flush writes this session's frames (plain or
        compressed) to the socket itself, except through TLS, where every
        byte must go through the transport (write_pending). The shard forgets
        that descriptor in ``wire_closing`` or ``wire_lost``, before the
        transport closes it."""
        conn = self.conn
        fd = -1 if conn.transport is None or is_tls(conn.transport) or not self._direct else conn.socket_fd()
        self.host.open_session(self, fd=fd, framing=FRAMING_NATIVE,
                               window_bits=conn.window_bits if conn.deflate else 0)
        self.host.set_paused(self, conn.paused)

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

    # -------------------------------------------------------- limits
    def over_rate(self, command_id: int | None) -> bool:
        """Take one command from the ``limits.commands_per_second`` bucket;
        when it is empty, answer 429 (which spends the bad-command budget,
        so refusals that persist close with 1008) and say so."""
        now = time.monotonic()
        if self._bucket is None:
            self._bucket = TokenBucket(self.host.config.limits.commands_per_second, now=now)
        if self._bucket.take(now):
            return False
        self.bad_command(command_id, ProtocolViolation(
            429, f"rate limited: more than {self.host.config.limits.commands_per_second} commands per second"))
        return True

    def tick(self, now: float, wall: float) -> None:
        self.conn.check_alive(now)
        expires = self.identity.expires
        if expires is not None and wall > expires + self.host.config.jwt.leeway and not self.closing:
            self.close(1008, "token expired: refresh it before exp")

    # -------------------------------------------------------- errors
    def bad_command(self, command_id: int | None, exc: ProtocolViolation) -> None:
        """Answer a bad command; too many in the window close with 1008."""
        self.host.bad_commands += 1
        self.answer(error_line(command_id, exc.code, exc.message))
        if self._budget is None:
            limits = self.host.config.limits
            self._budget = BadCommandBudget(limits.bad_command_budget, limits.bad_command_window)
        if self._budget.spend(time.monotonic()):
            self.close(1008, "too many bad commands")

    def answer(self, line: bytes) -> None:
        """Send a reply line (a session that answers out of turn orders them)."""
        self.host.queue(self, line)

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
        frames = self.host.take_frames(self)
        if frames:
            conn.transport.write(frames)

    def write_tail(self, rest: bytes | None) -> None:
        transport = self.conn.transport
        if transport is None:
            return
        if rest is None:  # the socket failed: the transport will report it
            transport.abort()
        else:
            transport.write(rest)  # pauses it until the kernel took it all

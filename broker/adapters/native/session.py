"""The native protocol's adapter (PROTOCOL.md §1): one session per WebSocket.

``NativeEndpoint`` accepts upgrades at ``/ws``; each becomes a
``NativeSession`` that turns NDJSON commands into calls on the shard
(``SessionHost``) and the shard's answers and events into NDJSON lines.
Publications are encoded once per shard by ``NativeAdapter.pub_line``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from ...errors import EngineUnavailable, ProtocolViolation
from ...handshake import Accepted, negotiate
from ...httpmsg import Request, Response
from ..session import Adapter, SessionHost, refresh_identity
from ..websocket import WebSocketSession
from .protocol import Command, error_line, parse_message, pub_line, reply_line

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

    @property
    def max_message_size(self) -> int:
        return self.host.config.limits.max_message_size

    def negotiate(self, request: Request) -> Accepted | Response:
        return negotiate(request, self.host.config)

    def open(self, conn: Connection, accepted: Accepted) -> NativeSession:
        session = NativeSession(self.host, conn, accepted)
        session.start()
        return session


class NativeSession(WebSocketSession):
    """One native WebSocket client."""

    __slots__ = ()

    adapter: ClassVar[Adapter] = NATIVE

    async def handle_text(self, text: str) -> None:
        """One text message: its commands in order, each answered in order."""
        for item in parse_message(text):
            if self.closing:
                return
            if isinstance(item, ProtocolViolation):
                self.bad_command(getattr(item, "command_id", None), item)
                continue
            if self.over_rate(item.id):
                continue
            try:
                await self._command(item)
            except ProtocolViolation as exc:
                if exc.code == 400:
                    self.bad_command(item.id, exc)
                else:
                    self.host.queue(self, error_line(item.id, exc.code, exc.message))
            except EngineUnavailable as exc:
                self.host.queue(self, error_line(item.id, 503, f"{exc.label}: {exc}"))

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
        elif op == "refresh":
            assert cmd.token is not None
            self._refresh(cmd.id, cmd.token)

    def _refresh(self, command_id: int | None, token: str) -> None:
        """A newer token for the same user: the session lives on to its exp."""
        exp = refresh_identity(self, token, self.host.config)
        self.host.queue(self, reply_line(command_id, "refreshed", exp=exp))

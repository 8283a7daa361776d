"""``GET /api/stream``: a backend's persistent publishing connection.

Authenticated by the API key at the upgrade (as every ``/api/`` route);
commands are pipelined and answered in command order, and ``published``
means exactly what a 200 from ``/api/publish`` means: the publication is
stored in its channel's history.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from ...auth import Identity, check_api_key
from ...config import Config
from ...errors import EngineUnavailable, ProtocolViolation
from ...handshake import Accepted, negotiate
from ...httpmsg import Request, Response, error_response
from ..native.protocol import error_line
from ..native.session import NATIVE
from ..session import Adapter, SessionHost
from ..websocket import WebSocketSession
from .protocol import StreamCommand, parse_stream_message

if TYPE_CHECKING:
    from ...connection import Connection

__all__ = ["StreamEndpoint", "StreamSession", "BACKEND"]

# A backend holds no user identity: it publishes anywhere, subscribes nowhere.
BACKEND = Identity(user=None, channels=frozenset(), anonymous=False)


def authenticate_backend(request: Request, config: Config) -> Any:
    if not check_api_key(request.headers.get("authorization"), config):
        return error_response(401, "missing or wrong API key (Authorization: apikey <KEY>)")
    return BACKEND


class StreamEndpoint:
    """``/api/stream``: the RFC 6455 handshake with the server API's key."""

    def __init__(self, host: SessionHost) -> None:
        self.host = host

    @property
    def max_message_size(self) -> int:
        # Pipelined commands share a message: allow what one HTTP body may carry.
        return self.host.config.limits.max_body_size

    def negotiate(self, request: Request) -> Accepted | Response:
        return negotiate(request, self.host.config, authenticate_backend)

    def open(self, conn: "Connection", accepted: Accepted) -> "StreamSession":
        session = StreamSession(self.host, conn, accepted)
        session.start()
        return session


def _position(channel: str, epoch: str, offset: int) -> bytes:
    # Channel names and epochs are validated ASCII / hex: no escaping needed.
    return b'{"channel":"%s","epoch":"%s","offset":%d}' % (channel.encode(), epoch.encode(), offset)


class StreamSession(WebSocketSession):
    """One backend's stream of publish and broadcast commands."""

    __slots__ = ()

    adapter: ClassVar[Adapter] = NATIVE  # never subscribes; replies are native-style lines

    async def handle_text(self, text: str) -> None:
        for item in parse_stream_message(self.host.config, text):
            if self.closing:
                return
            if isinstance(item, ProtocolViolation):
                command_id = getattr(item, "command_id", None)
                if item.code == 400:
                    self.bad_command(command_id, item)
                else:
                    self.host.queue(self, error_line(command_id, item.code, item.message))
                continue
            # No commands_per_second here: a backend holds the API key and
            # is the publisher the broker exists for.
            try:
                self.host.queue(self, await self._run(item))
            except EngineUnavailable as exc:
                self.host.queue(self, error_line(item.id, 503, f"{exc.label}: {exc}"))

    async def _run(self, cmd: StreamCommand) -> bytes:
        head = b'{"id":%d,' % cmd.id if cmd.id is not None else b"{"
        if cmd.op == "publish":
            channel = cmd.channels[0]
            position = await self.host.publish(channel, cmd.data_json)
            return b'%s"op":"published",%s}\n' % (head, _position(channel, position.epoch,
                                                                   position.offset)[1:-1])
        positions = await self.host.publish_many([(channel, cmd.data_json) for channel in cmd.channels])
        results = [_position(channel, p.epoch, p.offset) for channel, p in zip(cmd.channels, positions, strict=True)]
        return b'%s"op":"broadcasted","results":[%s]}\n' % (head, b",".join(results))

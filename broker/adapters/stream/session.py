"""``GET /api/stream``: a backend's persistent publishing connection.

Authenticated by the API key at the upgrade (as every ``/api/`` route);
commands are pipelined and answered in command order, and ``published``
means exactly what a 200 from ``/api/publish`` means: the publication is
stored in its channel's history.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import logging
from typing import TYPE_CHECKING, Any, ClassVar

from ... import eager
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

log = logging.getLogger("broker.stream")

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

    def open(self, conn: Connection, accepted: Accepted) -> StreamSession:
        session = StreamSession(self.host, conn, accepted)
        session.start()
        return session


def _position(channel: str, epoch: str, offset: int) -> bytes:
    # Channel names and epochs are validated ASCII / hex: no escaping needed.
    return b'{"channel":"%s","epoch":"%s","offset":%d}' % (channel.encode(), epoch.encode(), offset)


class StreamSession(WebSocketSession):
    """One backend's stream of publish and broadcast commands.

    Pipelined commands run concurrently: one whose channel is homed on
    another shard waits for that shard without holding up the commands
    behind it (a backend's stream used to stall for a round trip between
    shards on every such command). Replies still go out in command order,
    and a channel's publications keep theirs: a channel has one home, and
    the requests to one home travel in order on one connection."""

    __slots__ = ("_order", "_room")

    adapter: ClassVar[Adapter] = NATIVE  # never subscribes; replies are native-style lines

    def __init__(self, host: SessionHost, conn: Connection, accepted: Accepted) -> None:
        super().__init__(host, conn, accepted)
        # Replies not yet sent, in command order: a cell holds the line once
        # its command ended (None while it runs).
        self._order: collections.deque[list[bytes | None]] = collections.deque()
        self._room: asyncio.Future[None] | None = None

    async def handle_text(self, text: str) -> None:
        for item in parse_stream_message(self.host.config, text):
            if self.closing:
                return
            if isinstance(item, ProtocolViolation):
                command_id = getattr(item, "command_id", None)
                if item.code == 400:
                    self.bad_command(command_id, item)
                else:
                    self.answer(error_line(command_id, item.code, item.message))
                continue
            # No commands_per_second here: a backend holds the API key and
            # is the publisher the broker exists for.
            cell: list[bytes | None] = [None]
            self._order.append(cell)
            eager.start(self.host.loop, self._run(item), functools.partial(self._ended, cell, item.id))
        # Bounded like any connection's unprocessed commands: past the bound
        # this message's handling (and so the reading) waits for room.
        limit = self.host.config.limits.inbound_pending_commands
        if len(self._order) >= limit and not self.closing:
            self._room = self.host.loop.create_future()
            await self._room

    def answer(self, line: bytes) -> None:
        if self._order:
            self._order.append([line])  # after the replies still owed
            return
        self.host.queue(self, line)

    def _ended(self, cell: list[bytes | None], command_id: int | None,
               reply: bytes | None, error: BaseException | None) -> None:
        if isinstance(error, EngineUnavailable):
            reply = error_line(command_id, 503, f"{error.label}: {error}")
        elif error is not None or reply is None:
            log.error("stream command failed", exc_info=error)
            reply = error_line(command_id, 500, "internal error")
        cell[0] = reply
        order = self._order
        while order and order[0][0] is not None:
            self.host.queue(self, order.popleft()[0])  # type: ignore[arg-type]  # checked: not None
        room = self._room
        if room is not None and len(order) < self.host.config.limits.inbound_pending_commands // 2:
            self._room = None
            if not room.done():
                room.set_result(None)

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

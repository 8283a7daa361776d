"""The seam between the shard and the protocols its clients speak.

The shard knows sessions, not protocols. A protocol is an *adapter*: it
parses its clients' messages, asks the shard (the ``SessionHost``) to
subscribe, unsubscribe or publish, and encodes the shard's answers and
events in its own format. The shard, in turn, tells a session only what
happened to it (a stream lost, a reconnect request, a close) through the
``Session`` methods below.

Publications never go through a session object: an adapter encodes a
publication ONCE per shard (``Adapter.pub_line``) and the shard appends
those bytes to every subscriber's outbound buffer with one C loop. Each
session's buffer has the adapter's framing kind, so the C flush writes every
protocol's frames; what it cannot write (a paused transport, a long-poll)
comes back to the session as ``write_pending``.

Nothing here imports the shard: adapters depend on this module, the shard
implements ``SessionHost`` and imports the adapters (no cycle).
"""
from __future__ import annotations

import abc
import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol

if TYPE_CHECKING:
    from ..auth import Identity
    from ..config import Config
    from ..engine import Position

__all__ = ["Adapter", "Session", "SessionHost", "Subscribed", "refresh_identity"]


@dataclass(slots=True)
class Subscribed:
    """The outcome of a subscribe: where the stream stands when the session
    joined it, whether a requested recovery succeeded (None: none was asked),
    and the missed publications to send, in order, right after the reply and
    before anything newer."""

    position: Position
    recovered: bool | None = None
    missed: list[tuple[int, bytes]] = field(default_factory=list)


class Adapter(abc.ABC):
    """One protocol's encoding of what every session of it receives."""

    name: ClassVar[str]

    @abc.abstractmethod
    def pub_line(self, channel: str, offset: int, data_json: bytes) -> bytes:
        """One publication as this protocol's newline-terminated outbound line,
        built once per shard and shared by all of the adapter's subscribers."""


class Session(abc.ABC):
    """One client, whatever its protocol, as the shard sees it.

    ``cid`` is the session's id in the shard's subscription and outbound
    tables (-1 before ``SessionHost.open_session`` and after it is closed);
    ``closing`` is True once nothing more may be queued for it.
    """

    __slots__ = ("cid", "identity", "closing")

    adapter: ClassVar[Adapter]

    def __init__(self, identity: Identity) -> None:
        self.cid = -1
        self.identity = identity
        self.closing = False

    # Events from the shard -------------------------------------------------
    @abc.abstractmethod
    def stream_lost(self, channel: str, reason: str) -> None:
        """The shard dropped this session from ``channel``: its offsets cannot
        continue (PROTOCOL.md "Lost stream"). Tell the client."""

    @abc.abstractmethod
    def reconnect(self, reason: str, after_ms: int) -> None:
        """Ask the client to reconnect elsewhere after about ``after_ms``,
        then close (drain, migration)."""

    @abc.abstractmethod
    def close(self, code: int, reason: str) -> None:
        """End the session with a WebSocket-style close code (1008 policy,
        1011 error, 1012 restart, 1013 slow consumer or overload)."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Drop the session's connection now, without a closing handshake."""

    def tick(self, now: float, wall: float) -> None:  # noqa: B027 - a hook; most protocols need it
        """Once a second or so (``now``: loop time; ``wall``: unix time):
        liveness pings and token expiry, where the protocol has them."""

    # Output the C flush could not write itself -----------------------------
    @abc.abstractmethod
    def write_pending(self, force: bool = False) -> None:
        """Write what is pending in the session's outbound buffer now, in the
        session's own way (a resumed transport, a waiting long-poll); with
        ``force``, even behind a paused transport (a close frame follows)."""

    @abc.abstractmethod
    def write_tail(self, rest: bytes | None) -> None:
        """The unsent tail of a frame the C flush began writing (it must go
        out before anything else), or None when the socket failed."""


def refresh_identity(session: Session, token: str, config: Config) -> int | None:
    """``refresh`` for every protocol (PROTOCOL.md §1): a newer token for the
    same user replaces the session's identity; returns its exp. Another user
    or an invalid token: 403, the old token stays."""
    from ..auth import verify_token
    from ..errors import AuthError, ProtocolViolation

    try:
        identity = verify_token(token, config)
    except AuthError as exc:
        raise ProtocolViolation(403, f"refresh refused: {exc}") from None
    if session.identity.user is None or identity.user != session.identity.user:
        raise ProtocolViolation(403, "refresh refused: the token is for another user")
    session.identity = identity
    return int(identity.expires) if identity.expires is not None else None


class SessionHost(Protocol):
    """What a shard offers the adapters (implemented by ``broker.shard.Shard``)."""

    config: Config
    loop: asyncio.AbstractEventLoop
    bad_commands: int
    id: int                       # the shard's id (Socket.IO session ids name their owner)

    def open_session(self, session: Session, fd: int = -1, framing: int = 0,
                     window_bits: int = 0) -> None:
        """Give ``session`` a cid and an outbound buffer of a framing kind
        (``broker._fastpath.FRAMING_*``; ``window_bits`` > 0: permessage-deflate);
        with ``fd`` (its socket's own descriptor, which the host never
        closes), the C flush writes its frames directly until
        ``close_session`` or ``set_fd(session, -1)``: the session calls one
        of them before its transport can close the socket."""

    def set_framing(self, session: Session, framing: int, window_bits: int = 0) -> None:
        """Change how the session's lines go out (polling → WebSocket)."""

    def set_fd(self, session: Session, fd: int) -> None:
        """Let the C flush write to socket ``fd`` for the session (-1: no
        more; the host never closes ``fd``)."""

    def set_paused(self, session: Session, paused: bool) -> None:
        """The session's transport holds unsent bytes (True) or is empty again."""

    def close_session(self, session: Session) -> None:
        """Nothing more is delivered to or queued for ``session`` (its close
        is under way); its subscriptions end now."""

    def session_closed(self, session: Session) -> None:
        """The session is gone: its cid may be reused."""

    def queue(self, session: Session, line: bytes) -> None:
        """Queue one outbound line; a full buffer is a slow consumer (1013)."""

    def take_frames(self, session: Session) -> bytes:
        """Everything queued for ``session`` as its framing writes it
        (WebSocket frames, compressed where negotiated); empties it."""
        ...

    def pending_bytes(self, session: Session) -> int:
        """Bytes queued for ``session`` and not yet written."""
        ...

    def take_payload(self, session: Session, sep: bytes = b"\x1e") -> bytes:
        """Everything queued for ``session``, lines joined by ``sep``; empties it."""
        ...

    def flush_session(self, session: Session, force: bool = False) -> None:
        """Write the session's pending lines now (resume, close, drain)."""

    async def subscribe(self, session: Session, channel: str,
                        recover: tuple[str, int] | None = None) -> Subscribed:
        """Check the channel's policy, join its stream (recovering if asked)
        and add the session to its subscribers. Raises ProtocolViolation
        (400/401/403/404/409/429) or EngineUnavailable (503)."""
        ...

    def unsubscribe(self, session: Session, channel: str) -> None:
        """Leave ``channel`` (no error when not subscribed)."""

    async def publish(self, channel: str, data_json: bytes) -> Position:
        """Sequence, store and deliver one publication (backends: no policy
        check). EngineUnavailable when it cannot be stored: never a false ack."""
        ...

    async def publish_many(self, items: list[tuple[str, bytes]]) -> list[Position]:
        """Many publications at once (a backend's broadcast): positions in order."""
        ...

    async def client_publish(self, session: Session, channel: str, data_json: bytes) -> Position:
        """Publish for a client where its namespace allows it (ProtocolViolation
        otherwise; EngineUnavailable when it cannot be stored)."""
        ...

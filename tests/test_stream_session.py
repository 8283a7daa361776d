"""The backend stream's session logic with a host whose publishes we hold:
pipelined commands run concurrently, replies keep command order, and the
number of commands owed a reply is bounded (the wire behaviour, through
real sockets and shards, is in tests/integration/test_stream.py)."""
from __future__ import annotations

import asyncio
import json
from typing import Any

from broker.adapters.stream.session import BACKEND, StreamSession
from broker.config import Config
from broker.engine.base import Position
from broker.errors import EngineUnavailable
from broker.handshake import Accepted


class HeldHost:
    """Publishes to ``user:held*`` wait until the test releases them; the rest
    answer at once. Lines queued for the session are kept in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pending_limit: int = 1024) -> None:
        self.loop = loop
        self.config = Config()
        self.config.limits.inbound_pending_commands = pending_limit
        self.lines: list[dict[str, Any]] = []
        self.started: list[str] = []
        self.held: dict[str, asyncio.Future[Position]] = {}
        self.offsets: dict[str, int] = {}
        self.bad_commands = 0

    def queue(self, session: Any, line: bytes) -> None:
        self.lines.extend(json.loads(part) for part in line.splitlines())

    async def publish(self, channel: str, data: bytes) -> Position:
        self.started.append(channel)
        if channel.startswith("user:held"):
            self.held[channel] = self.loop.create_future()
            return await self.held[channel]
        self.offsets[channel] = self.offsets.get(channel, 0) + 1
        return Position("e", self.offsets[channel])


def _session(host: HeldHost) -> StreamSession:
    return StreamSession(host, conn=None, accepted=Accepted(b"", BACKEND, None, 0))  # type: ignore[arg-type]


def _commands(*channels: str) -> str:
    return "\n".join(json.dumps({"id": i, "op": "publish", "channel": c, "data": i})
                     for i, c in enumerate(channels))


def test_commands_behind_a_waiting_one_run_and_replies_keep_command_order():
    async def main() -> None:
        host = HeldHost(asyncio.get_running_loop())
        session = _session(host)
        await session.handle_text(_commands("user:held1", "bill:1", "user:held2", "bill:2"))
        # every command started, though the first still waits for its home
        assert host.started == ["user:held1", "bill:1", "user:held2", "bill:2"]
        assert host.lines == []  # ... and no reply may overtake it
        host.held["user:held2"].set_result(Position("e", 7))
        await asyncio.sleep(0.01)
        assert host.lines == []
        host.held["user:held1"].set_exception(EngineUnavailable("shard 1 did not answer"))
        await asyncio.sleep(0.01)
        assert [(r["id"], r["op"], r.get("code"), r.get("offset")) for r in host.lines] == [
            (0, "error", 503, None), (1, "published", None, 1), (2, "published", None, 7),
            (3, "published", None, 1)]

    asyncio.run(main())


def test_a_bad_command_behind_a_waiting_one_is_answered_in_its_turn():
    async def main() -> None:
        host = HeldHost(asyncio.get_running_loop())
        session = _session(host)
        await session.handle_text('{"id":0,"op":"publish","channel":"user:held1","data":0}\n{"id":1,"op":"nope"}')
        assert host.lines == [] and host.bad_commands == 1
        host.held["user:held1"].set_result(Position("e", 1))
        await asyncio.sleep(0.01)
        assert [(r.get("id"), r["op"]) for r in host.lines] == [(0, "published"), (1, "error")]

    asyncio.run(main())


def test_past_the_pending_bound_the_message_waits_for_room():
    async def main() -> None:
        host = HeldHost(asyncio.get_running_loop(), pending_limit=4)
        session = _session(host)
        four = _commands("user:held1", "user:held2", "user:held3", "user:held4")
        handling = asyncio.ensure_future(session.handle_text(four))
        await asyncio.sleep(0.01)
        assert not handling.done()  # four owed replies: the connection stops reading
        host.held["user:held1"].set_result(Position("e", 1))
        await asyncio.sleep(0.01)
        assert not handling.done()  # three owed: not yet below half the bound
        for n in (2, 3):
            host.held[f"user:held{n}"].set_result(Position("e", 1))
        await asyncio.wait_for(handling, 1)
        assert [r["id"] for r in host.lines] == [0, 1, 2]

    asyncio.run(main())

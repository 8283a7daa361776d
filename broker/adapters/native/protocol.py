"""The native protocol's text layer (PROTOCOL.md §1), Sans-I/O.

Text in, commands out; replies and publications out as bytes lines. No
asyncio, no sockets: the connection feeds a text message and writes what
comes back, so every rule here is testable with strings alone.

Every encoded line ends with ``\\n``; the frame builder drops the last one,
so a frame holds lines separated by single newlines and no trailing one.
"""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, TypeVar

from ...channels import validate_channel
from ...errors import ProtocolViolation
from ...jsoncodec import decode_json, encode_json

__all__ = ["Command", "parse_message", "parse_lines", "reply_line", "error_line", "pub_line",
           "BadCommandBudget", "OPS"]

T = TypeVar("T")

OPS = frozenset({"subscribe", "unsubscribe", "publish", "ping", "refresh"})


@dataclass(slots=True)
class Command:
    op: str
    id: int | None = None
    channel: str | None = None
    data_json: bytes | None = None          # publish: the data, encoded once
    recover: tuple[str, int] | None = None  # subscribe: (epoch, offset)
    token: str | None = None                # refresh: the newer JWT


def _parse_id(obj: dict[str, Any]) -> int | None:
    value = obj.get("id")
    if value is None:
        return None
    if type(value) is not int:
        raise ProtocolViolation(400, "id must be an integer")
    return value


def _parse_command(obj: Any) -> Command:
    if not isinstance(obj, dict):
        raise ProtocolViolation(400, "a command must be a JSON object")
    command_id = _parse_id(obj)
    op = obj.get("op")
    try:
        if not isinstance(op, str) or op not in OPS:
            raise ProtocolViolation(400, f"unknown op {op!r}")
        command = Command(op, command_id)
        if op == "ping":
            return command
        if op == "refresh":
            token = obj.get("token")
            if not isinstance(token, str) or not token:
                raise ProtocolViolation(400, "refresh needs a token (a JWT string)")
            command.token = token
            return command
        command.channel = validate_channel(obj.get("channel"))
        if op == "publish":
            if "data" not in obj:
                raise ProtocolViolation(400, "publish needs data")
            command.data_json = encode_json(obj["data"])
        elif op == "subscribe" and obj.get("recover") is not None:
            recover = obj["recover"]
            if not isinstance(recover, dict):
                raise ProtocolViolation(400, "recover must be an object with epoch and offset")
            epoch, offset = recover.get("epoch"), recover.get("offset")
            if not isinstance(epoch, str) or type(offset) is not int or offset < 0:
                raise ProtocolViolation(400, "recover needs a string epoch and a non-negative integer offset")
            command.recover = (epoch, offset)
        return command
    except ProtocolViolation as exc:
        exc.command_id = command_id  # type: ignore[attr-defined]
        raise


def parse_lines(text: str, parse: Callable[[Any], T]) -> list[T | ProtocolViolation]:
    """Split one text message into commands (NDJSON), each line decoded and
    handed to ``parse``; a bad line becomes a ProtocolViolation in its place
    so replies stay in command order (every NDJSON endpoint shares this)."""
    out: list[T | ProtocolViolation] = []
    for line in text.split("\n"):
        if not line.strip():
            continue
        try:
            out.append(parse(decode_json(line)))
        except ProtocolViolation as exc:
            out.append(exc)
        except ValueError as exc:
            out.append(ProtocolViolation(400, f"invalid JSON: {exc}"))
    return out


def parse_message(text: str) -> list[Command | ProtocolViolation]:
    """The native endpoint's commands of one text message."""
    return parse_lines(text, _parse_command)


def reply_line(command_id: int | None, op: str, **fields: Any) -> bytes:
    """A reply to a command, with the command's id when it had one."""
    body: dict[str, Any] = {"id": command_id} if command_id is not None else {}
    body["op"] = op
    body.update(fields)
    return encode_json(body) + b"\n"


def error_line(command_id: int | None, code: int, message: str) -> bytes:
    return reply_line(command_id, "error", code=code, message=message)


def pub_line(channel: str, offset: int, data_json: bytes) -> bytes:
    """The publication line, built once per shard and shared by every subscriber.
    Channel names are validated ASCII without quotes or backslashes, so they
    need no escaping."""
    return b'{"op":"pub","channel":"%s","offset":%d,"data":%s}\n' % (
        channel.encode(), offset, data_json)


class BadCommandBudget:
    """Counts bad commands in a sliding window; ``spend`` says when the budget
    is exceeded (the connection is then closed with 1008)."""

    __slots__ = ("budget", "window", "_times")

    def __init__(self, budget: int, window: float) -> None:
        self.budget = budget
        self.window = window
        self._times: list[float] = []

    def spend(self, now: float) -> bool:
        """Record one bad command at ``now``; True when over budget."""
        cutoff = now - self.window
        self._times = [t for t in self._times if t > cutoff]
        self._times.append(now)
        return len(self._times) > self.budget

"""The backend stream's text layer, Sans-I/O: NDJSON commands in, lines out.

``publish`` and ``broadcast`` only; any namespace may be published to. The
data of a command is encoded once here, as the HTTP API does, so a
publication's bytes are the same whichever way it entered.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...channels import namespace_of, validate_channel
from ...config import Config
from ...errors import ProtocolViolation
from ...jsoncodec import encode_json
from ..native.protocol import parse_lines

__all__ = ["StreamCommand", "parse_stream_message", "MAX_BROADCAST"]

MAX_BROADCAST = 10000  # channels in one broadcast, as /api/publish/batch


@dataclass(slots=True)
class StreamCommand:
    op: str                                   # "publish" | "broadcast"
    id: int | None
    channels: list[str] = field(default_factory=list)
    data_json: bytes = b""


def _channel(config: Config, value: object) -> str:
    name = validate_channel(value)
    namespace_of(config, name)  # 404 for an unknown namespace
    return name


def _command(config: Config, obj: Any) -> StreamCommand:
    if not isinstance(obj, dict):
        raise ProtocolViolation(400, "a command must be a JSON object")
    command_id = obj.get("id")
    if command_id is not None and type(command_id) is not int:
        raise ProtocolViolation(400, "id must be an integer")
    try:
        op = obj.get("op")
        if not isinstance(op, str) or op not in ("publish", "broadcast"):
            raise ProtocolViolation(400, f"unknown op {op!r} (the stream takes publish and broadcast)")
        if "data" not in obj:
            raise ProtocolViolation(400, f"{op} needs data")
        if op == "publish":
            channels = [_channel(config, obj.get("channel"))]
        else:
            raw = obj.get("channels")
            if not isinstance(raw, list) or not raw:
                raise ProtocolViolation(400, "broadcast needs a non-empty list of channels")
            if len(raw) > MAX_BROADCAST:
                raise ProtocolViolation(413, f"at most {MAX_BROADCAST} channels per broadcast")
            # Refused whole when any channel is invalid, as /api/broadcast.
            channels = [_channel(config, channel) for channel in raw]
        try:
            data_json = encode_json(obj["data"])
        except ValueError as exc:
            raise ProtocolViolation(400, f"data is not valid JSON: {exc}") from None
        return StreamCommand(op, command_id, channels, data_json)
    except ProtocolViolation as exc:
        exc.command_id = command_id  # type: ignore[attr-defined]
        raise


def parse_stream_message(config: Config, text: str) -> list[StreamCommand | ProtocolViolation]:
    """The backend stream's commands of one text message, in order."""
    return parse_lines(text, lambda obj: _command(config, obj))

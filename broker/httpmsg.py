"""Plain HTTP messages as the API sees them: parsed by httptools in the
connection, answered as bytes here. Sans-I/O: no sockets."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs

__all__ = ["Request", "Response", "json_response", "error_response"]


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query_string: str = ""
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""
    keep_alive: bool = True

    def query(self) -> dict[str, str]:
        return {k: v[-1] for k, v in parse_qs(self.query_string, keep_blank_values=True).items()}


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False

    def encode(self, keep_alive: bool = True) -> bytes:
        reason = HTTPStatus(self.status).phrase if self.status in HTTPStatus._value2member_map_ else ""
        lines = [f"HTTP/1.1 {self.status} {reason}",
                 f"Content-Type: {self.content_type}",
                 f"Content-Length: {len(self.body)}"]
        lines.extend(f"{name}: {value}" for name, value in self.headers)
        if not keep_alive or self.close:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


def json_response(status: int, value: Any, **kwargs: Any) -> Response:
    return Response(status, json.dumps(value, separators=(",", ":")).encode(), **kwargs)


def error_response(status: int, message: str, **kwargs: Any) -> Response:
    """Every API error: an HTTP status and a JSON body naming the problem."""
    return json_response(status, {"error": message}, **kwargs)

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
    peer: str = ""                                          # the client's IP address
    connection: Any = None   # the Connection it came on (a handler may pass it on: detach())

    def encode(self) -> bytes:
        """The request as HTTP/1.1 bytes again (to pass it, with its socket,
        to another process); a chunked body is sent with its length."""
        target = f"{self.path}?{self.query_string}" if self.query_string else self.path
        lines = [f"{self.method} {target} HTTP/1.1"]
        lines += [f"{name}: {value}" for name, value in self.headers.items()
                  if name not in ("content-length", "transfer-encoding")]
        if self.body or self.method in ("POST", "PUT", "PATCH"):
            lines.append(f"content-length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body

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
        head = _heads.get((self.status, self.content_type))
        if head is None:
            reason = _REASONS.get(self.status, "")
            head = _heads[self.status, self.content_type] = (
                f"HTTP/1.1 {self.status} {reason}\r\nContent-Type: {self.content_type}\r\n"
                "Content-Length: ").encode("latin-1")
        extra = "".join(f"{name}: {value}\r\n" for name, value in self.headers) if self.headers else ""
        if not keep_alive or self.close:
            extra += "Connection: close\r\n"
        return b"%s%d\r\n%s\r\n%s" % (head, len(self.body), extra.encode("latin-1"), self.body)


_REASONS = {status.value: status.phrase for status in HTTPStatus}
# "HTTP/1.1 <status>\r\nContent-Type: <type>\r\nContent-Length: " per (status, type)
_heads: dict[tuple[int, str], bytes] = {}


def json_response(status: int, value: Any, **kwargs: Any) -> Response:
    return Response(status, json.dumps(value, separators=(",", ":")).encode(), **kwargs)


def error_response(status: int, message: str, **kwargs: Any) -> Response:
    """Every API error: an HTTP status and a JSON body naming the problem."""
    return json_response(status, {"error": message}, **kwargs)

"""Small WebSocket clients for tests: a friendly one built on websockets'
sync client, and a raw one that can break RFC 6455 on purpose."""
from __future__ import annotations

import base64
import json
import os
import socket
import struct
from typing import Any

from websockets.sync.client import connect

__all__ = ["NativeClient", "RawSocket", "handshake_request"]


class NativeClient:
    """Speaks PROTOCOL.md §1 over websockets' sync client; splits NDJSON frames."""

    def __init__(self, url: str, token: str | None = None, compression: str | None = "deflate",
                 **kwargs: Any) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        self._connect = connect(url, additional_headers=headers, compression=compression,
                                open_timeout=10, max_size=None, max_queue=None, **kwargs)
        self.ws = self._connect.__enter__()
        self.pending: list[dict] = []
        self._next_id = 0

    def send(self, *commands: dict) -> None:
        self.ws.send("\n".join(json.dumps(c) for c in commands))

    def send_raw(self, text: str | bytes) -> None:
        self.ws.send(text)

    def recv(self, timeout: float = 5.0) -> dict:
        while not self.pending:
            frame = self.ws.recv(timeout=timeout)
            assert isinstance(frame, str), "server frames are text"
            assert not frame.endswith("\n"), "no trailing newline in a frame"
            self.pending.extend(json.loads(line) for line in frame.split("\n"))
        return self.pending.pop(0)

    def request(self, op: str, **fields: Any) -> dict:
        """Send one command with a fresh id; return its reply (skipping pubs)."""
        self._next_id += 1
        command_id = self._next_id
        self.send({"id": command_id, "op": op, **fields})
        skipped = []
        while True:
            message = self.recv()
            if message.get("id") == command_id:
                self.pending[:0] = skipped
                return message
            skipped.append(message)

    def subscribe(self, channel: str, **fields: Any) -> dict:
        return self.request("subscribe", channel=channel, **fields)

    def pubs(self, count: int, timeout: float = 5.0) -> list[dict]:
        out = []
        while len(out) < count:
            message = self.recv(timeout)
            if message.get("op") == "pub":
                out.append(message)
        return out

    def close(self) -> None:
        self.ws.close()

    def __enter__(self) -> NativeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def handshake_request(port: int, path: str = "/ws", version: str = "13",
                      extra: str = "", key: str | None = None) -> bytes:
    key = key or base64.b64encode(os.urandom(16)).decode()
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: {version}\r\n{extra}\r\n").encode()


class RawSocket:
    """A TCP client that writes exactly the bytes a test gives it."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_head(self) -> tuple[int, dict[str, str], bytes]:
        """Read an HTTP response head (and a Content-Length body)."""
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.buffer += chunk
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        self.buffer = rest[length:]
        return status, headers, rest[:length]

    def upgrade(self, port: int, token: str | None = None) -> None:
        extra = f"Authorization: Bearer {token}\r\n" if token else ""
        self.send(handshake_request(port, extra=extra))
        status, _, _ = self.read_head()
        assert status == 101

    @staticmethod
    def frame(opcode: int, payload: bytes, fin: bool = True, mask: bool = True, rsv: int = 0) -> bytes:
        head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
        length = len(payload)
        mask_bit = 0x80 if mask else 0
        if length < 126:
            head += bytes([mask_bit | length])
        elif length < 65536:
            head += bytes([mask_bit | 126]) + struct.pack("!H", length)
        else:
            head += bytes([mask_bit | 127]) + struct.pack("!Q", length)
        if not mask:
            return head + payload
        key = os.urandom(4)
        return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))

    def read_frame(self) -> tuple[int, bytes]:
        def need(n: int) -> bytes:
            while len(self.buffer) < n:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise EOFError("connection closed")
                self.buffer += chunk
            out, self.buffer = self.buffer[:n], self.buffer[n:]
            return out

        b0, b1 = need(2)
        length = b1 & 0x7F
        if length == 126:
            length = struct.unpack("!H", need(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", need(8))[0]
        return b0 & 0x0F, need(length)

    def close_code(self) -> int:
        """Read frames until the server's close frame; return its code."""
        while True:
            opcode, payload = self.read_frame()
            if opcode == 8:
                return struct.unpack("!H", payload[:2])[0]

    def close(self) -> None:
        self.sock.close()

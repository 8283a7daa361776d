"""What both baselines share: just enough of PROTOCOL.md for ``broker bench``.

* channel state: per-channel offsets (start at 0, +1 per publication) and
  the subscribers of each channel;
* the publication line ``{"op":"pub","channel":..,"offset":..,"data":..}``,
  built once per publication (``data`` serialized compactly once);
* a small keep-alive HTTP/1.1 server (httptools) for ``POST /api/publish``,
  ``GET /readyz`` and ``GET /healthz`` on its own port: neither picows nor
  websockets answers a POST on its WebSocket port, so the runner takes
  ``--http-url`` for baselines;
* argument parsing, RLIMIT_NOFILE, uvloop and SIGTERM handling.

No auth, no history, no recovery, no batching: the point is the cost of the
libraries' own fan-out, not a second broker.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import resource
import signal
from collections.abc import Callable
from typing import Any

import httptools

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class Channels:
    """Offsets and subscribers; ``deliver(subscribers, line)`` is the library's fan-out."""

    def __init__(self, deliver: Callable[[Any, bytes], None]) -> None:
        self.offsets: dict[str, int] = {}
        self.subscribers: dict[str, set[Any]] = {}
        self.deliver = deliver
        self.published = 0

    def subscribe(self, channel: str, conn: Any) -> int:
        self.subscribers.setdefault(channel, set()).add(conn)
        return self.offsets.get(channel, 0)

    def unsubscribe_all(self, conn: Any, channels: list[str]) -> None:
        for channel in channels:
            subs = self.subscribers.get(channel)
            if subs is not None:
                subs.discard(conn)
                if not subs:
                    del self.subscribers[channel]

    def publish(self, channel: str, data: Any) -> int:
        offset = self.offsets.get(channel, 0) + 1
        self.offsets[channel] = offset
        self.published += 1
        subs = self.subscribers.get(channel)
        if subs:
            line = b'{"op":"pub","channel":"%s","offset":%d,"data":%s}' % (
                channel.encode(), offset, _dumps(data).encode())
            self.deliver(subs, line)
        return offset


def command_replies(text: bytes | str, channels: Channels, conn: Any, subscribed: list[str]) -> list[bytes]:
    """Replies to the client commands in one message (subscribe, ping, and
    publish: a backend may publish over a WebSocket as over HTTP)."""
    if isinstance(text, str):
        text = text.encode()
    out = []
    for line in text.split(b"\n"):
        if not line.strip():
            continue
        try:
            cmd = json.loads(line)
            op = cmd.get("op")
        except (ValueError, AttributeError):
            out.append(b'{"op":"error","code":400,"message":"invalid JSON"}')
            continue
        cid = cmd.get("id")
        head = {"id": cid} if cid is not None else {}
        if op == "subscribe" and isinstance(cmd.get("channel"), str):
            channel = cmd["channel"]
            if channel in subscribed:
                out.append(_dumps({**head, "op": "error", "code": 409, "message": "already subscribed"}).encode())
                continue
            subscribed.append(channel)
            offset = channels.subscribe(channel, conn)
            out.append(_dumps({**head, "op": "subscribed", "channel": channel, "epoch": "baseline",
                               "offset": offset}).encode())
        elif op == "ping":
            out.append(_dumps({**head, "op": "pong"}).encode())
        elif op == "publish" and isinstance(cmd.get("channel"), str) and "data" in cmd:
            # a backend publishing over its WebSocket (the load runner's --publish-over stream)
            offset = channels.publish(cmd["channel"], cmd["data"])
            out.append(_dumps({**head, "op": "published", "channel": cmd["channel"], "epoch": "baseline",
                               "offset": offset}).encode())
        else:
            out.append(_dumps({**head, "op": "error", "code": 400, "message": "unsupported"}).encode())
    return out


_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed"}


class HttpApi(asyncio.Protocol):
    """Keep-alive HTTP/1.1: POST /api/publish, GET /readyz, GET /healthz."""

    def __init__(self, channels: Channels) -> None:
        self.channels = channels
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._respond(400, b'{"error":"bad request"}', keep_alive=False)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        path = self.url.split(b"?", 1)[0]
        body = b"".join(self.body)
        self.url, self.body = b"", []
        keep_alive = self.parser.should_keep_alive()
        if path == b"/api/publish" and method == b"POST":
            try:
                msg = json.loads(body)
                channel = msg["channel"]
                data = msg["data"]
                if not isinstance(channel, str) or not channel:
                    raise ValueError("channel")
            except (ValueError, KeyError, TypeError):
                self._respond(400, b'{"error":"bad publish body"}', keep_alive)
                return
            offset = self.channels.publish(channel, data)
            self._respond(200, b'{"channel":"%s","epoch":"baseline","offset":%d}' % (channel.encode(), offset),
                          keep_alive)
        elif path in (b"/readyz", b"/healthz") and method == b"GET":
            self._respond(200, b'{"ready":true}', keep_alive)
        else:
            self._respond(404, b'{"error":"not found"}', keep_alive)

    def _respond(self, status: int, body: bytes, keep_alive: bool) -> None:
        if self.transport is None:
            return
        self.transport.write(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (
            status, _REASONS.get(status, b"X"), len(body), b"" if keep_alive else b"Connection: close\r\n", body))
        if not keep_alive:
            self.transport.close()


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8801, help="WebSocket port (path /ws)")
    parser.add_argument("--http-port", type=int, default=8802, help="HTTP API port")
    return parser.parse_args()


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run(main: Callable[[asyncio.Event], Any]) -> None:
    """Run ``main(stop)`` on uvloop until SIGTERM/SIGINT sets ``stop``."""
    import uvloop

    raise_nofile()

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    uvloop.run(runner())
